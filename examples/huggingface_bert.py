"""Hugging Face Trainer with gramhook: one callback.

A small BERT built from a config (no download) learns which third of the vocabulary a token
sequence starts with. The callback's measurements appear in ``trainer.state.log_history`` (and
every ``report_to`` backend) under ``gramhook/…``.

    python examples/huggingface_bert.py --steps 100
"""
import argparse
import json

import torch
import transformers

from gramhook.integrations.huggingface import GramMonitorCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids, self.vocab = torch.randint(1, vocab, (n, seq), generator=g), vocab

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": int(ids[0]) * 3 // self.vocab}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--probe-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--stop", action="store_true")
    ap.add_argument("--output-dir", default="runs/huggingface")
    args = ap.parse_args(argv)

    seq, vocab = 16, 64
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=2 * args.hidden,
                                     max_position_embeddings=seq, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    callback = GramMonitorCallback(every=args.every, probe_size=args.probe_size, stop=args.stop)
    training = transformers.TrainingArguments(output_dir=args.output_dir, per_device_train_batch_size=32,
                                              max_steps=args.steps, learning_rate=2e-3, logging_steps=args.every,
                                              report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=Tokens(args.n_train, seq, vocab),
                                   data_collator=transformers.default_data_collator, callbacks=[callback])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "gramhook/predicted_test_loss" in h]
    print(json.dumps({"global_step": trainer.state.global_step, "logged_steps": [h["step"] for h in logged],
                      "predicted_test_loss": callback.monitor.predicted_test_loss}))


if __name__ == "__main__":
    main()
