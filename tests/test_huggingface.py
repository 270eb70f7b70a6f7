"""A real ``transformers.Trainer`` with a real model class from a tiny config (no download)."""
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gramhook import MonitorConfig  # noqa: E402
from gramhook.adapt import Adapted  # noqa: E402
from gramhook.integrations.huggingface import GramMonitorCallback  # noqa: E402

SEQ, VOCAB, N = 8, 24, 64
OPTS = dict(every=2, probe_size=16, config=MonitorConfig(train_sample_size=0, effective_gram_size=0))


class Tokens(torch.utils.data.Dataset):
    """Token sequences; the label says which third of the vocabulary the first token is in."""

    def __init__(self, n=N, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": int(ids[0]) * 3 // VOCAB}


def _model():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=SEQ, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def _trainer(tmp_path, callback, max_steps, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=max_steps, learning_rate=5e-3,
        logging_steps=1000, report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        **{"save_strategy": "no", **kw})
    return transformers.Trainer(model=_model(), args=args, train_dataset=Tokens(), callbacks=[callback],
                                data_collator=transformers.default_data_collator)


def _train(trainer, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return trainer.train(**kw)


def test_trainer_logs_measurements_and_recognises_probe_samples(tmp_path):
    cb = GramMonitorCallback(**OPTS)
    trainer = _trainer(tmp_path, cb, 6)
    _train(trainer)
    mon = cb.monitor
    assert isinstance(mon.model, Adapted) and mon.k == 3 and mon.n_train == N
    assert mon.step == trainer.state.global_step == 6
    logged = [(h["step"], h["gramhook/predicted_test_loss"]) for h in trainer.state.log_history
              if "gramhook/predicted_test_loss" in h]
    assert [s for s, _ in logged] == [0, 2, 4, 6]
    assert all(math.isfinite(v) for _, v in logged)
    assert logged[-1][1] == pytest.approx(mon.history[-1].predicted_test_loss)
    assert mon._stepper.recognised > 0 and mon.perstep.injections > 0


def test_stop_sets_should_training_stop(tmp_path):
    cb = GramMonitorCallback(stop=True, patience=1, min_delta=1e9, **{**OPTS, "every": 1})
    trainer = _trainer(tmp_path, cb, 40)
    _train(trainer)
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("restore", [False, True], ids=["default", "restore_callback_states"])
def test_checkpoint_resume_continues_history(tmp_path, restore):
    first = GramMonitorCallback(**OPTS)
    _train(_trainer(tmp_path, first, 4, save_strategy="steps", save_steps=4))
    assert (tmp_path / "checkpoint-4" / "gramhook_monitor.pt").is_file()
    cb = GramMonitorCallback(**OPTS)
    trainer = _trainer(tmp_path, cb, 8, restore_callback_states_from_checkpoint=restore)
    _train(trainer, resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    if restore:   # the Trainer rebuilt the callback from its ExportableState; cb.monitor follows it
        assert not any(c is cb for c in trainer.callback_handler.callbacks)
    mon = cb.monitor
    assert [h.step for h in mon.history] == [0, 2, 4, 6, 8]
    assert mon.history[2].predicted_test_loss == first.monitor.history[2].predicted_test_loss
    assert mon.history[3].injected > mon.history[2].injected > 0
