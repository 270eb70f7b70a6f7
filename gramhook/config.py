"""Settings of a :class:`gramhook.GramMonitor`: one frozen dataclass, checked in one place.

``GramMonitor(model, optimizer, probe=..., config=MonitorConfig(rows=16))``. The constructor's own
keywords (``every``, ``probe_size``, ``seed``) are fields here too, so everything a monitor runs
with is one value, :attr:`GramMonitor.config`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

from . import kernel

__all__ = ["MonitorConfig", "Schedule", "REMOVED_OPTIONS", "check_options"]

Schedule = Union[int, Callable[[int], bool], None]

# Options that existed once, each with the reason it went; passing one fails at construction.
REMOVED_OPTIONS = {
    "contraction": "it chose how the periodic engine integrated between measurements ('left' or "
                   "'trapezoid'); 'left' was the default, no benchmark at the defaults showed 'trapezoid' "
                   "helping, and the per-step engine integrates every step, so there is no interval to choose",
    "reference_history": "stacking earlier reference batches (+8% drift at 3 batches) did worse than "
                         "sampling output directions (+6%, reference_outputs=1, the default) for the same "
                         "Jacobian cost",
    "sketch_extrapolation": "it hurt, which is why it was off by default: on the accuracy grid it "
                            "took the periodic engine from 17 to 12 of 28 configurations within target",
    "loss_history": "the second covariate moved single accuracy-grid configurations by ±0.1–0.3 both "
                    "ways and the grid's summary not at all",
    "mode": "replace-one ran only in the periodic engine and the default per-step engine ignored it; "
            "the leave-one-out gap is the quantity gramhook predicts (gramhook.dynamics.engine.Mode "
            "keeps replace-one for research)",
    "window": "it set how many steps of contraction rows the per-step engine buffered before folding "
              "them into its state; the engine now updates its state in place at every step, which costs "
              "about half as much, so there is nothing to buffer",
    "holdout": "it was only the stand-in of mode='replace', which was removed; measure your own held-out "
               "loss and pass its TensorBoard tag as MonitorConfig(compare_tag=...) to draw it beside the "
               "prediction",
}


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """Settings of a :class:`gramhook.GramMonitor`, checked when built.

    Attributes:
        every: measure every this many optimizer steps, or a callable ``step -> bool``. ``None``
            (the default) measures whenever the measurements' time has fallen below ``overhead``
            times the rest of the run's time since the monitor was attached (your loop, and the
            per-step engine's work inside it), so their cost stays near that budget on any model
            and machine. Pass an int for a reproducible cadence. Also a ``GramMonitor`` keyword.
        probe_size: probe samples m (default 128 on CPU, 512 on CUDA). Also a ``GramMonitor`` keyword.
        seed: seed of the probe choice, sketch and row sampling (private generators; your RNG
            streams are never touched). Also a ``GramMonitor`` keyword.
        overhead: the cost budget of ``every=None``: measurement seconds per second of the rest
            of the run.
        coordinates: ``"exact"`` (δ in parameter coordinates), an int sketch dimension s, or
            ``"auto"``: exact while the probe Jacobians (m·k·P floats) stay under 64 MiB, else
            s = 4096.
        train_sample_size: labelled training samples (a superset of the probe, drawn from the
            same ``probe`` data) whose loss, one forward pass per measurement, estimates the train
            loss; the probe's gap is then corrected by its regression on the per-sample train loss
            (:func:`gramhook.dynamics.aggregate.regression_estimate`). ``0`` (or any size ≤ the
            probe) uses the probe alone.
        effective_gram_size: m_K, the sub-probe size for the effective Gram matrix K_n
            (0 disables it).
        diagnostics_every: every this many readouts (the first included) also measure the
            diagnostics (perturbation ε̄, contraction c̄, the effective Gram matrix K_n and its
            alignment), which cost three to four plain readouts (the demo CNN: 95 ms against 22 ms);
            the readouts in between log NaN for them. Under ``every=None`` the budget they take is
            readouts not made, so 8 keeps the curve dense (the 30-epoch demo run: 11 readouts at
            8, 8 at 4).
        rows: contraction rows drawn from each trained batch (``None``: half the batch, rounded
            up). Fewer rows stand for more samples each, which inflates their curvature; on an
            MNIST MLP (batch 64) 32 rows gave 1.02× brute-force leave-one-out and 8 rows 3.0×.
        directions: how each contraction row's output direction is drawn, ``"signs"`` (random
            signs over Λ's eigenvectors) or ``"eigen"`` (one eigenvector in proportion to its
            eigenvalue); see :class:`gramhook.capture.StepCapture`.
        method: kernel method, ``"auto"``, ``"fast"`` or ``"reference"`` (torch.func, slow).
        output: which part of a structured model output is the prediction: a key (dict,
            ``ModelOutput``), an index (tuple) or a callable; by default the output itself if it
            is a tensor, else ``logits``, else the first tensor (:func:`gramhook.adapt.select_output`).
        inputs: for dict samples, the keys that go to the model as keywords (default: all but the
            label key, one of :data:`gramhook.adapt.LABEL_KEYS`), or a callable
            ``sample -> (model_inputs, target)``.
        compare_tag: the TensorBoard tag of your measured test loss, drawn beside the prediction.
        total_steps: the optimizer steps the run will take, for the forecast (also
            :meth:`gramhook.GramMonitor.set_total_steps`); ``None``: no forecast.
        engine: ``"perstep"`` (the default) integrates the leave-one-out dynamics at every
            optimizer step from the trained batch; a measurement only reads out, so its cadence
            does not change the prediction. ``"periodic"`` is a research option that integrates
            between measurements from a reference reservoir: it is cadence-dependent and slower,
            and on the fidelity benchmark it is closer to leave-one-out only on the memorizing
            digits MLP (36 of 40 measurements in band against 29). The three settings below apply
            to it only.
        reference_size: periodic engine: training inputs per reference batch (captured, or drawn
            from ``reference``).
        reference_outputs: periodic engine: output directions per reference sample, drawn from
            the eigenvectors of its output Hessian Λ in proportion to their eigenvalues (unbiased
            for JᵀΛJ); ``None`` uses all k outputs.
        reference: periodic engine: training inputs ``x`` or ``(x, y)`` for the contraction,
            instead of sampling the inputs of your training forwards. A custom loss whose Hessian
            depends on the target needs ``(x, y)`` here.

    Example:
        >>> MonitorConfig(rows=8).rows
        8
        >>> MonitorConfig(rows=0)
        Traceback (most recent call last):
        ...
        ValueError: `rows` must be None (half the batch) or a positive int (contraction rows per step), got 0.
    """

    every: Schedule = None
    probe_size: Optional[int] = None
    seed: int = 0
    overhead: float = 0.05
    coordinates: Union[str, int] = "auto"
    train_sample_size: int = 1024
    effective_gram_size: int = 32
    diagnostics_every: int = 8
    rows: Optional[int] = None
    directions: str = "signs"
    method: str = "auto"
    output: Any = None
    inputs: Any = None
    compare_tag: Optional[str] = None
    total_steps: Optional[int] = None
    engine: str = "perstep"
    reference_size: int = 320
    reference_outputs: Optional[int] = 1
    reference: Any = None

    def __post_init__(self):
        if self.every is not None and not callable(self.every) and not _positive_int(self.every):
            raise ValueError(f"`every` must be a positive int or a callable step -> bool, got {self.every!r}.")
        if self.probe_size is not None and not (_positive_int(self.probe_size) and self.probe_size >= 2):
            raise ValueError(f"`probe_size` must be at least 2, got {self.probe_size!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an int, got {self.seed!r}.")
        if isinstance(self.overhead, bool) or not isinstance(self.overhead, (int, float)) or not self.overhead > 0:
            raise ValueError(f"`overhead` must be a positive fraction such as 0.05, got {self.overhead!r}.")
        if not (self.coordinates in ("auto", "exact") or _positive_int(self.coordinates)):
            raise ValueError(f"`coordinates` must be 'auto', 'exact' or a positive sketch size, got {self.coordinates!r}.")
        if isinstance(self.train_sample_size, bool) or not isinstance(self.train_sample_size, int) or self.train_sample_size < 0:
            raise ValueError(f"`train_sample_size` must be a non-negative int (0 disables it), got {self.train_sample_size!r}.")
        if isinstance(self.effective_gram_size, bool) or not isinstance(self.effective_gram_size, int) or self.effective_gram_size < 0:
            raise ValueError(f"`effective_gram_size` must be a non-negative int (0 disables K_n), got {self.effective_gram_size!r}.")
        if not _positive_int(self.diagnostics_every):
            raise ValueError(f"`diagnostics_every` must be a positive int (1: diagnostics at every readout), "
                             f"got {self.diagnostics_every!r}.")
        if self.rows is not None and not _positive_int(self.rows):
            raise ValueError(f"`rows` must be None (half the batch) or a positive int (contraction rows per step), got {self.rows!r}.")
        if self.directions not in ("signs", "eigen"):
            raise ValueError(f"`directions` must be 'signs' or 'eigen', got {self.directions!r}.")
        if self.method not in kernel.METHODS:
            raise ValueError(f"`method` must be one of {kernel.METHODS}, got {self.method!r}.")
        if self.compare_tag is not None and not isinstance(self.compare_tag, str):
            raise ValueError(f"`compare_tag` must be a TensorBoard tag (str), got {self.compare_tag!r}.")
        if self.total_steps is not None and not _positive_int(self.total_steps):
            raise ValueError(f"`total_steps` must be a positive int (the run's optimizer steps), got {self.total_steps!r}.")
        if self.engine not in ("perstep", "periodic"):
            raise ValueError(f"`engine` must be 'perstep' or 'periodic', got {self.engine!r}.")
        if not _positive_int(self.reference_size):
            raise ValueError(f"`reference_size` must be a positive int, got {self.reference_size!r}.")
        if self.reference_outputs is not None and not _positive_int(self.reference_outputs):
            raise ValueError(f"`reference_outputs` must be None (all outputs) or a positive int, got {self.reference_outputs!r}.")
        if self.reference is not None and self.engine != "periodic":
            raise ValueError("`reference` feeds the periodic engine only (the per-step engine reads the batches "
                             "you train on): drop it, or pass MonitorConfig(engine='periodic', reference=...).")


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


_FIELDS = tuple(f.name for f in dataclasses.fields(MonitorConfig))
_KEYWORDS = ("every", "probe_size", "seed")   # GramMonitor keywords that are also fields


def check_options(options: Mapping[str, object], where: str = "GramMonitor") -> None:
    """Refuse unknown keywords to ``where``, saying what to pass instead.

    Raises:
        TypeError: a removed option (with the reason), a :class:`MonitorConfig` field passed as a
            keyword (with the ``config=`` to write), or a misspelt name (with the closest ones).
    """
    if not options:
        return
    name = next(iter(options))
    if name in REMOVED_OPTIONS:
        raise TypeError(f"{where}() got the option {name!r}, which was removed because {REMOVED_OPTIONS[name]}. "
                        f"Drop it.")
    if name in _FIELDS:
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items() if k in _FIELDS)
        raise TypeError(f"{where}() got an unexpected keyword argument {name!r}: it is a setting, "
                        f"pass config=MonitorConfig({shown}).")
    import difflib
    close = difflib.get_close_matches(name, _FIELDS + ("probe", "n_train", "loss", "logdir", "config"), n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise TypeError(f"{where}() got an unexpected keyword argument {name!r}.{hint} The arguments are "
                    f"model, optimizer, probe, n_train, loss, logdir, every, probe_size, seed and "
                    f"config=MonitorConfig(...) (fields: {', '.join(_FIELDS)}).")


def merge(config: Optional[MonitorConfig], **keywords) -> MonitorConfig:
    """``config`` with the constructor's keywords ``every``/``probe_size``/``seed`` set where they
    differ from their defaults; a field set differently in both raises."""
    if config is None:
        config = MonitorConfig()
    elif not isinstance(config, MonitorConfig):
        raise TypeError(f"`config` must be a gramhook.MonitorConfig, got {type(config).__name__}.")
    default = MonitorConfig()
    changes = {}
    for name, value in keywords.items():
        if value is getattr(default, name) or value == getattr(default, name):
            continue
        mine = getattr(config, name)
        if not (mine is getattr(default, name) or mine == getattr(default, name)) and mine != value:
            raise TypeError(f"`{name}` was given twice, {value!r} as a keyword and {mine!r} in config: "
                            f"set it in one place.")
        changes[name] = value
    return dataclasses.replace(config, **changes) if changes else config
