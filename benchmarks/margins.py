"""Theory III claims on the monitor's live normalized margins (docs/theory.md §5).

1. Once the training data are separated (minimum normalized margin > 0 on the whole training
   set, here the probe), the minimum normalized margin increases monotonically.
2. Normalized train and test cross-entropy, CE(f/ρ), are linearly related over training.

Each run logs ``margin_min`` and ``normalized_ce`` at every readout (``diagnostics_every=1``,
the whole training set as probe); the test side is ``normalized_margins`` on the test set at the
same steps. Reported: the share of increasing steps of ``margin_min`` after separation, and the
Pearson correlation and R² of a line through (train CE(f/ρ), test CE(f/ρ)).

Usage::

    python benchmarks/margins.py [--out benchmarks/results/margins.md]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gramhook import GramMonitor, MonitorConfig  # noqa: E402
from gramhook.data import mnist1d_tensors, mnist_tensors  # noqa: E402
from gramhook.training import train  # noqa: E402
from gramhook.zoo import cnn1d  # noqa: E402
from gramhook.dynamics.spectral import normalized_margins, weight_matrices  # noqa: E402


def models():
    return {
        # Bias-free ReLU MLP: homogeneous, so f = ρ f(V) exactly (the theory's setting).
        "mnist-mlp-nobias-sgd": ("mnist", lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 128, bias=False), nn.ReLU(),
                                                                 nn.Linear(128, 10, bias=False)), "sgd", 0.05),
        "mnist1d-cnn-adam": ("mnist1d", cnn1d, "adam", 3e-3),  # with biases: not homogeneous
    }


def run(name, *, n, steps, seed):
    dataset, make, opt_name, lr = models()[name]
    torch.manual_seed(seed)
    x, y, xt, yt = (mnist_tensors if dataset == "mnist" else mnist1d_tensors)(n_train=n, seed=seed)
    xt, yt = xt[:1000], yt[:1000]
    model = make()
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    every = max(1, steps // 30)
    monitor = GramMonitor(model, opt, probe=(x, y), n_train=n, probe_size=n, every=every, seed=seed, config=MonitorConfig(diagnostics_every=1, train_sample_size=0, effective_gram_size=16))
    test_ce = []

    def log_test():
        model.eval()  # the monitor follows the model's train-mode forwards as training batches
        with torch.no_grad():
            test_ce.append(normalized_margins(weight_matrices(model.named_parameters()), model(xt), yt).normalized_ce)
        model.train()

    log_test()
    gen = torch.Generator().manual_seed(seed + 1)
    batches = (torch.randint(0, n, (32,), generator=gen) for _ in range(steps))   # with replacement

    def on_step(step, b, out):
        if step % every == 0:
            log_test()

    train(model, opt, x, y, loss=F.cross_entropy, batches=batches, on_step=on_step)
    hist = monitor.history
    monitor.close()
    mins = [h.margin_min for h in hist]
    train_ce = [h.normalized_ce for h in hist]
    sep = next((i for i, v in enumerate(mins) if v > 0), None)
    if sep is None or sep >= len(mins) - 1:
        mono, sep_step = float("nan"), None
    else:
        diffs = [b - a for a, b in zip(mins[sep:], mins[sep + 1:])]
        mono, sep_step = sum(d > 0 for d in diffs) / len(diffs), hist[sep].step
    a, b = torch.tensor(train_ce, dtype=torch.float64), torch.tensor(test_ce[: len(train_ce)], dtype=torch.float64)
    r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return {"separated_at": sep_step, "monotone_share": mono, "pearson": r, "r2": r * r, "readouts": len(hist),
            "final_min": mins[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    lines = [f"n = {args.n} (all in the probe), {args.steps} steps, batch 32, seed {args.seed}.", "",
             "| run | readouts | separated at step | share of rising steps of min margin after | final min margin | "
             "Pearson r (train vs test CE(f/ρ)) | R² |", "|---|---|---|---|---|---|---|"]
    for name in models():
        res = run(name, n=args.n, steps=args.steps, seed=args.seed)
        lines.append(f"| {name} | {res['readouts']} | {res['separated_at']} | {res['monotone_share']:.2f} | "
                     f"{res['final_min']:.3g} | {res['pearson']:.3f} | {res['r2']:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text("# Theory III claims on the live normalized margins (benchmarks/margins.py)\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
