"""How much of the accuracy table is the monitor's own sampling noise?

Reads ``accuracy.csv`` files written by ``benchmarks/accuracy.py`` for the *same* training runs
under different monitor seeds (variants ``mseed1``–``mseed3`` change only the probe draw, the
sketch and the reference rows; the model, data and batch order, and so the measured curve, are
the same). Per configuration it prints the measured final test loss, the predicted one under every
run, the signed final error of their mean (the estimator's bias at this probe size) and the spread
between runs (its noise), and whether each run meets the accuracy goal (median error ≤ 10% and
final ≤ 15%).

    python benchmarks/accuracy.py --configs n500-mlp-ce-sgd n1000-cnn-ce \\
        --variant mseed1 mseed2 mseed3 --out runs/seeds
    python benchmarks/research/seed_spread.py benchmarks/results/accuracy.csv runs/seeds/mseed*/accuracy.csv

With ``--per-sample DIR`` (an ``accuracy.py`` output folder, typically of a large-probe variant
such as ``probe256``) it also prints the probe-sampling noise floor: from the final per-sample
gaps of that run, the relative standard error a random probe of 64 (and 128) samples would have on
the final test loss, ``std(g) / sqrt(m) / measured``, and the share of the gap carried by the top
5% of the samples.

Writes nothing; pipe the markdown where it should go.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path
from typing import Dict, List

import torch

from gramhook.dynamics.aggregate import effective_samples

GOAL_ERR = (0.10, 0.15)


def read(paths: List[Path]) -> Dict[str, List[Dict]]:
    """config -> rows, one per file that has it, in the order of ``paths``."""
    by_config: Dict[str, List[Dict]] = {}
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                row = {k: (float(v) if k not in ("config", "variant", "band_fin", "stop_fired") else v) for k, v in row.items()}
                row["run"] = row.get("variant") or path.parent.name
                by_config.setdefault(row["config"], []).append(row)
    return by_config


def spread(rows: List[Dict]) -> Dict:
    meas = rows[0]["meas_fin"]
    preds = [r["pred_fin"] for r in rows]
    signed = [(p - meas) / meas for p in preds]
    passes = [r["med_err"] <= GOAL_ERR[0] and r["fin_err"] <= GOAL_ERR[1] for r in rows]
    return {
        "meas": meas, "preds": preds,
        "bias": (statistics.mean(preds) - meas) / meas,
        "sd": statistics.stdev(signed) if len(signed) > 1 else math.nan,
        "med_errs": [r["med_err"] for r in rows],
        "passes": passes,
        "top5": statistics.mean(r["top5"] for r in rows) if all("top5" in r for r in rows) else math.nan,
    }


def markdown(by_config: Dict[str, List[Dict]]) -> str:
    runs = max(len(v) for v in by_config.values())
    lines = ["| config | meas_fin | pred_fin per run | fin bias of mean | sd between runs | med_err per run | goal met |",
             "|---|---|---|---|---|---|---|"]
    totals = [0] * runs
    common = [name for name, rows in by_config.items() if len(rows) == runs]
    for name, rows in by_config.items():
        s = spread(rows)
        if name in common:
            for j, ok in enumerate(s["passes"]):
                totals[j] += ok
        lines.append(
            f"| {name} | {s['meas']:.3f} | {' / '.join(f'{p:.3f}' for p in s['preds'])} | {s['bias']:+.2f} | "
            f"{s['sd']:.2f} | {' / '.join(f'{e:.2f}' for e in s['med_errs'])} | {sum(s['passes'])}/{len(rows)} |")
    lines.append("")
    lines.append(f"Goal met per run, over the {len(common)} configurations every run has: "
                 + ", ".join(f"run {j + 1}: {t}/{len(common)}" for j, t in enumerate(totals)))
    return "\n".join(lines)


def noise_floor(folder: Path) -> str:
    """Markdown: per configuration, how much a random m-sample probe mean would scatter."""
    gaps: Dict[str, List[float]] = {}
    with open(folder / "accuracy_per_sample.csv", newline="") as f:
        for row in csv.DictReader(f):
            gaps.setdefault(row["config"], []).append(float(row["gap"]))
    summary = {name: rows[0] for name, rows in read([folder / "accuracy.csv"]).items()}
    lines = ["| config | probe | meas_fin | pred_fin | mean gap | top 5% share | ESS | rel. SE, probe 64 | rel. SE, probe 128 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, g in gaps.items():
        r = summary[name]
        mean, sd = statistics.mean(g), statistics.stdev(g)
        ess = effective_samples(torch.tensor(g, dtype=torch.float64))
        top = sorted(g, reverse=True)[:max(1, round(0.05 * len(g)))]
        lines.append(f"| {name} | {len(g)} | {r['meas_fin']:.3f} | {r['pred_fin']:.3f} | {mean:.3f} | "
                     f"{sum(top) / sum(g):.2f} | {ess:.1f} | {sd / 8 / r['meas_fin']:.2f} | "
                     f"{sd / math.sqrt(128) / r['meas_fin']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv", nargs="*", type=Path, help="accuracy.csv files of the same configurations under different monitor seeds")
    p.add_argument("--per-sample", type=Path, default=None, help="an accuracy.py output folder with accuracy_per_sample.csv")
    args = p.parse_args(argv)
    if args.csv:
        print(markdown(read(args.csv)))
    if args.per_sample is not None:
        print()
        print(noise_floor(args.per_sample))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
