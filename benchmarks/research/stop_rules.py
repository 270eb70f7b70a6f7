"""Early-stopping rules on the predicted test loss, replayed offline on an accuracy run.

Reads ``accuracy_rows.csv`` (every measurement: predicted and measured test loss) and
``accuracy.csv`` (the holdout baseline) written by ``benchmarks/accuracy.py`` and replays
stopping rules on the recorded curves: patience on the raw prediction (``should_stop``'s rule), on
an exponential moving average, on the lower confidence bound (prediction − 1 SE), and the
hindsight ceiling "the argmin of the whole predicted curve". For each it counts the issue's goal
(measured test loss at the stop ≤ 1.02× the run's minimum and no worse than the holdout's stop)
and the same when the best checkpoint is restored.

    python benchmarks/research/stop_rules.py benchmarks/results
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path
from typing import Callable, Dict, List

GOAL = 1.02
Key = Callable[[List[Dict], int], float]


def patience_stop(rows: List[Dict], key: Key, patience: int) -> int:
    """Index of the first measurement after ``patience`` without improvement of ``key`` (else the last)."""
    best, since = math.inf, 0
    for i in range(len(rows)):
        v = key(rows, i)
        if v < best:
            best, since = v, 0
        else:
            since += 1
        if since >= patience:
            return i
    return len(rows) - 1


def raw(rows, i):
    return rows[i]["predicted_test_loss"]


def lower_bound(rows, i):
    return rows[i]["predicted_test_loss"] - rows[i]["predicted_gap_se"]


def ema(alpha: float) -> Key:
    def key(rows, i):
        v = rows[0]["predicted_test_loss"]
        for r in rows[1: i + 1]:
            v = alpha * r["predicted_test_loss"] + (1 - alpha) * v
        return v
    return key


RULES: Dict[str, Callable[[List[Dict]], int]] = {
    "patience 5 (should_stop)": lambda rows: patience_stop(rows, raw, 5),
    "patience 3": lambda rows: patience_stop(rows, raw, 3),
    "patience 8": lambda rows: patience_stop(rows, raw, 8),
    "EMA 0.3, patience 5": lambda rows: patience_stop(rows, ema(0.3), 5),
    "prediction − 1 SE, patience 5": lambda rows: patience_stop(rows, lower_bound, 5),
    "argmin of the whole predicted curve (hindsight)": lambda rows: len(rows) - 1,
}


def load(folder: Path):
    curves: Dict[str, List[Dict]] = {}
    with open(folder / "accuracy_rows.csv", newline="") as f:
        for r in csv.DictReader(f):
            curves.setdefault(r["config"], []).append(
                {k: float(r[k]) for k in ("predicted_test_loss", "predicted_gap_se", "measured_test_loss")})
    with open(folder / "accuracy.csv", newline="") as f:
        holdout = {r["config"]: (float(r["hold_orc"]), float(r["hold_best_orc"])) for r in csv.DictReader(f)}
    return curves, holdout


def evaluate(curves, holdout) -> List[Dict]:
    out = []
    for name, rule in RULES.items():
        ok = ok_best = 0
        ratios = []
        for config, rows in curves.items():
            meas = [r["measured_test_loss"] for r in rows]
            oracle = min(meas)
            i = rule(rows)
            best = min(range(i + 1), key=lambda k: rows[k]["predicted_test_loss"])
            at_stop, at_best = meas[i] / oracle, meas[best] / oracle
            hold, hold_best = holdout[config]
            if name.startswith("argmin"):
                at_stop = at_best
            ok += at_stop <= GOAL and at_stop <= hold
            ok_best += at_best <= GOAL and at_best <= hold_best
            ratios.append(at_stop)
        out.append({"rule": name, "ok": ok, "ok_best": ok_best, "median": statistics.median(ratios), "n": len(curves)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="an accuracy.py output folder")
    args = p.parse_args(argv)
    curves, holdout = load(args.folder)
    print("| rule | stop ≤ 1.02× oracle and ≤ holdout | restoring the best checkpoint | median stop / oracle |")
    print("|---|---|---|---|")
    for r in evaluate(curves, holdout):
        print(f"| {r['rule']} | {r['ok']}/{r['n']} | {r['ok_best']}/{r['n']} | {r['median']:.3f} |")
    hold_ok = sum(h <= GOAL for h, _ in holdout.values())
    print(f"\nThe 10%-holdout baseline itself stops within {GOAL}× the oracle in {hold_ok}/{len(holdout)}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
