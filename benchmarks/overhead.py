"""Monitor cost at the constructor's defaults, as ratios in one run; prints a markdown table.

Per case, in one process and with the same batches: the training loop without a monitor, then
with ``GramMonitor(model, optimizer, probe=..., n_train=...)`` and nothing else (``every=None``:
readouts while their time is under 5% of the loop's). Columns:

- ``wall ratio``: monitored wall time over unmonitored (the user's figure);
- ``train ms/step``: one unmonitored training step;
- ``engine ms/step``: the per-step engine's work in the optimizer's step pre-hook;
- ``step ratio``: engine over training, per step;
- ``readouts`` after step 0 and the last readout's step (is the curve live to the end?);
- ``s/readout``: median seconds of one readout, and ``readout/steps``: the same in training steps.

Cases: the ``gramhook demo`` CNN for 30 epochs (n=1000, batch 64: 480 steps; goal ≥ 10 readouts at
≤ 1.25×) and the benchmark's mid-size CNN (~0.32M parameters, n=4000, 11 epochs of batch 64: 693
steps; goal ≥ 20 readouts at ≤ 1.10×).

Usage::

    python benchmarks/overhead.py                 # both cases, cpu, 1 thread
    python benchmarks/overhead.py --cases demo --epochs 5
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from gramhook import GramMonitor
from gramhook.data import mnist_tensors
from gramhook.zoo import small_cnn


def _mid_cnn():
    spec = importlib.util.spec_from_file_location("gramhook_bench_accuracy", Path(__file__).with_name("accuracy.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.mid_cnn()


CASES = {  # name -> (model factory, n_train, epochs, goal readouts, goal wall ratio)
    "demo": (small_cnn, 1000, 30, 10, 1.25),
    "midcnn": (_mid_cnn, 4000, 11, 20, 1.10),
}


def _loop(model, opt, x, y, batches, device, sync):
    model.train()
    start = time.perf_counter()
    for idx in batches:
        idx = idx.to(device)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    sync()
    return time.perf_counter() - start


def run(case: str, device: str, args) -> dict:
    factory, n, epochs, goal_reads, goal_ratio = CASES[case]
    epochs = args.epochs or epochs
    x, y, _, _ = mnist_tensors(n_train=n, seed=args.seed)
    x, y = x.to(device), y.to(device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [p[i:i + args.batch_size] for p in (torch.randperm(n, generator=gen) for _ in range(epochs))
               for i in range(0, n, args.batch_size)]
    cuda = torch.device(device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def fresh():
        torch.manual_seed(args.seed)
        model = factory().to(device)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, opt = fresh()
    plain = _loop(model, opt, x, y, batches, device, sync)
    model, opt = fresh()
    start = time.perf_counter()
    monitor = GramMonitor(model, opt, probe=(x, y), n_train=n, seed=args.seed)
    _loop(model, opt, x, y, batches, device, sync)
    watched = time.perf_counter() - start           # construction and step-0 readout included
    monitor.close()
    later = [r for r in monitor.history if r.step > 0]
    per = statistics.median(r.monitor_seconds for r in monitor.history)
    train_step = plain / len(batches)
    engine_step = monitor.step_seconds / max(monitor.step, 1)
    return {
        "case": case, "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} thr)",
        "params": sum(p.numel() for p in model.parameters()), "steps": len(batches), "probe": monitor.probe.x.shape[0],
        "coords": monitor.coordinates, "ratio": watched / plain, "train_ms": 1e3 * train_step,
        "engine_ms": 1e3 * engine_step, "step_ratio": engine_step / train_step, "readouts": len(later),
        "last": later[-1].step if later else 0, "per": per, "per_steps": per / train_step,
        "goal": f"≥ {goal_reads} readouts, ≤ {goal_ratio:.2f}×",
        "pass": len(later) >= goal_reads and watched / plain <= goal_ratio,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--devices", nargs="+", default=["cpu"])
    p.add_argument("--epochs", type=int, default=None, help="override every case's epochs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    rows = [run(c, d, args) for d in args.devices for c in args.cases]
    print(f"\ntorch {torch.__version__}; SGD lr 0.05 momentum 0.9, batch {args.batch_size}; GramMonitor defaults\n")
    print("| case | device | params | steps | probe | coords | wall ratio | train ms/step | engine ms/step | step ratio "
          "| readouts | last readout | s/readout | readout/steps | goal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['device']} | {r['params']:,} | {r['steps']} | {r['probe']} | {r['coords']} "
              f"| {r['ratio']:.2f} | {r['train_ms']:.2f} | {r['engine_ms']:.2f} | {r['step_ratio']:.2f} "
              f"| {r['readouts']} | {r['last']} | {r['per']:.3f} | {r['per_steps']:.1f} "
              f"| {'PASS' if r['pass'] else 'MISS'} {r['goal']} |")


if __name__ == "__main__":
    main()
