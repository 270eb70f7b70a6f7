"""How the gap estimate degrades when contraction is sampled more sparsely (docs/theory.md §3, §8).

Prints two markdown tables:

1. Engine (a) on docs/theory.md §7's SGD problem (tanh MLP 2×128, n=256, batch 32, lr 0.5, probe m=48):
   mean gap against coupled brute-force leave-one-out at t=300 (and 600 with ``--long``), for
   measurements every E steps with R reference batches of 32 per interval.
2. Engine (b) on the linear problem (n=60, d=80, full-batch GD, probe = training set): every
   step against every 25 steps.

Run: ``python benchmarks/research/cadence.py [--long] [--sketch S]``. About 3 minutes on one core.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
import bruteforce as bf  # noqa: E402
from engine_runs import run_engine  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="also report t=600 (twice the time)")
    parser.add_argument("--sketch", type=int, default=0, help="sketch dimension (0: exact coordinates)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    coords = args.sketch or "exact"

    steps = 600 if args.long else 300
    checkpoints = [300, 600] if args.long else [300]
    problem = bf.sgd_mlp_problem()
    batches = bf.make_batches(256, 32, 600, problem.generator)
    probe = torch.randperm(256, generator=problem.generator)[:48]
    loo = bf.loo_gaps(problem, 0.5, steps, checkpoints, samples=probe, batches=batches)
    print(f"Engine (a), SGD MLP, coordinates={coords}; coupled LOO on the probe: "
          + ", ".join(f"t={t}: {loo[t].mean():.3f}" for t in checkpoints))
    print()
    print("| every | ref batches / interval | " + " | ".join(f"gap t={t} | error t={t}" for t in checkpoints) + " | engine s |")
    print("|---|---|" + "---|---|" * len(checkpoints) + "---|")
    for every, per in [(1, 1), (5, 1), (10, 1), (10, 5), (25, 1), (25, 5)]:
        start = time.perf_counter()
        run = run_engine(problem, 0.5, steps, checkpoints, probe=probe, batches=batches, every=every,
                         ref_batches_per_interval=per, coordinates=coords)
        cells = []
        for t in checkpoints:
            est, truth = run.gaps[t].mean().item(), loo[t].mean().item()
            cells.append(f"{est:.3f} | {est / truth - 1:+.1%}")
        print(f"| {every} | {per} | " + " | ".join(cells) + f" | {time.perf_counter() - start:.1f} |", flush=True)

    print()
    linear = bf.linear_regression_problem()
    marks = [100, 200, 400]
    dense = run_engine(linear, 0.5, 400, marks, engine="function", every=1)
    sparse = run_engine(linear, 0.5, 400, marks, engine="function", every=25)
    print("Engine (b), linear regression, probe = training set")
    print()
    print("| t | every=1 | every=25 | difference |")
    print("|---|---|---|---|")
    for t in marks:
        a, b = dense.gaps[t].mean().item(), sparse.gaps[t].mean().item()
        print(f"| {t} | {a:.4f} | {b:.4f} | {b / a - 1:+.2%} |")


if __name__ == "__main__":
    main()
