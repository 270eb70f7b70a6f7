"""Forecast of the final test loss and of the best step, made at 25% and 50% of training.

A few small runs (MNIST-1D with the 1-D CNN, MNIST with an MLP; SGD and Adam) with the schedule's
length known. The forecast made at a readout, :func:`gramhook.insight.forecast` of the history
of ``predicted_test_loss`` so far (what ``GramMonitor`` logs as ``forecast_final_test_loss`` and
``forecast_best_step`` when given ``total_steps``), is compared with the *measured* test loss at
the last step and the step of the lowest measured test loss. Beside it, two naive forecasts:
the current predicted test loss ("hold": nothing changes from here) and the current measured
test loss ("measured now", which the monitor does not have).

Usage::

    python benchmarks/forecast.py            # 4 runs, a few minutes on a CPU
    python benchmarks/forecast.py --quick    # 2 short runs
    python benchmarks/forecast.py --out benchmarks/results/forecast.md
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gramhook import GramMonitor, MonitorConfig  # noqa: E402
from gramhook.data import mnist1d_tensors, mnist_tensors  # noqa: E402
from gramhook.training import train  # noqa: E402
from gramhook.zoo import cnn1d, mlp  # noqa: E402
from gramhook.insight import forecast  # noqa: E402

RUNS = {
    "mnist1d-cnn-adam": ("mnist1d", "adam", 3e-3),
    "mnist1d-cnn-sgd": ("mnist1d", "sgd", 0.05),
    "mnist-mlp-adam": ("mnist", "adam", 1e-3),
    "mnist-mlp-sgd": ("mnist", "sgd", 0.05),
}


def run(name: str, *, n: int, epochs: int, seed: int):
    dataset, opt_name, lr = RUNS[name]
    torch.manual_seed(seed)
    if dataset == "mnist":
        x, y, xt, yt = mnist_tensors(n_train=n, seed=seed)
        model = mlp(784, hidden=128)
    else:
        x, y, xt, yt = mnist1d_tensors(n_train=n, seed=seed)
        model = cnn1d()
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if opt_name == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    batch = 32
    total = epochs * math.ceil(n / batch)
    every = max(1, total // 20)
    monitor = GramMonitor(model, opt, probe=(x, y), n_train=n, every=every, seed=seed, config=MonitorConfig(total_steps=total))
    measured = []
    gen = torch.Generator().manual_seed(seed + 1)

    def test_loss():
        # Eval mode: the monitor follows the model's train-mode forwards as training batches.
        model.eval()
        with torch.no_grad():
            loss = float(F.cross_entropy(model(xt), yt))
        model.train()
        return loss

    def on_step(step, idx, out):
        if step % every == 0 or step == total:
            measured.append((step, test_loss()))
        if step % 50 == 0:
            print(f"  {name}: step {step}/{total}", file=sys.stderr, flush=True)

    measured.append((0, test_loss()))
    train(model, opt, x, y, loss=F.cross_entropy, batch_size=batch, steps=total, generator=gen, on_step=on_step)
    if monitor.history[-1].step != total:
        monitor.measure()
    history = [{"step": h.step, "predicted_test_loss": h.predicted_test_loss} for h in monitor.history]
    monitor.close()
    return {"history": history, "measured": measured, "total": total}


def score(saved: dict) -> dict:
    """Forecasts at 25% and 50% of a saved run against its measured outcome."""
    history, measured, total = saved["history"], saved["measured"], saved["total"]
    final = measured[-1][1]
    best_step = min(measured, key=lambda sv: sv[1])[0]
    out = {"final": final, "best_step": best_step, "total": total}
    for frac in (0.25, 0.5):
        upto = [h for h in history if h["step"] <= frac * total]
        steps = [h["step"] for h in upto if math.isfinite(h["predicted_test_loss"])]
        values = [h["predicted_test_loss"] for h in upto if math.isfinite(h["predicted_test_loss"])]
        f_final, f_best = forecast(steps, values, total)
        now = [v for s, v in measured if s <= frac * total][-1]
        out[frac] = {"forecast": f_final, "best": f_best, "hold": values[-1], "measured_now": now}
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, choices=list(RUNS), help="run only these")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--runs", type=Path, default=None,
                        help="JSON of the runs' histories: written after training, or read instead of "
                             "training with --replay")
    parser.add_argument("--replay", action="store_true", help="score the runs saved in --runs, no training")
    args = parser.parse_args(argv)
    names = args.only or list(RUNS)
    n, epochs = args.n, args.epochs
    if args.quick:
        names, n, epochs = names[:1] + names[2:3], 400, 6
    lines = [f"n = {n} training samples, {epochs} epochs, batch 32, probe 128, seed {args.seed}; "
             "relative error of the forecast of the final measured test loss; best step: forecast / measured.", "",
             "| run | steps | final test loss | at 25%: forecast / hold / measured now | best step | "
             "at 50%: forecast / hold / measured now | best step |", "|---|---|---|---|---|---|---|"]
    errors = {f: {"forecast": [], "hold": [], "measured_now": []} for f in (0.25, 0.5)}
    saved = json.loads(args.runs.read_text()) if args.replay else {}
    for name in names:
        start = time.perf_counter()
        if not args.replay:
            saved[name] = run(name, n=n, epochs=epochs, seed=args.seed)
            if args.runs is not None:
                args.runs.write_text(json.dumps(saved))
        res = score(saved[name])
        cells = []
        for f in (0.25, 0.5):
            r = res[f]
            for key in errors[f]:
                errors[f][key].append(rel(r[key], res["final"]))
            cells.append(" / ".join(f"{rel(r[k], res['final']):.1%}" for k in ("forecast", "hold", "measured_now")))
            cells.append(f"{r['best']:.0f} / {res['best_step']}")
        lines.append(f"| {name} | {res['total']} | {res['final']:.3f} | " + " | ".join(cells) + " |")
        print(lines[-1] + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    lines.append("")
    for f in (0.25, 0.5):
        lines.append(f"Median relative error at {f:.0%}: " + ", ".join(
            f"{k} {statistics.median(v):.1%}" for k, v in errors[f].items()))
    med = statistics.median(errors[0.5]["forecast"])
    lines += ["", f"Goal (median relative error of the forecast at 50% ≤ 15%): {med:.1%}: "
              + ("PASS" if med <= 0.15 else "MISS")]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text("# Forecast of the final test loss (benchmarks/forecast.py)\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
