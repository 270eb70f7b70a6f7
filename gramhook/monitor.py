"""GramMonitor: the two-line hook. Schedule, hook handles, history and early stopping; no maths.

Data flows one way: optimizer step → :class:`GramMonitor` (decides when to measure; settings in
:class:`gramhook.config.MonitorConfig`) → :mod:`gramhook.capture` (each step's batch, per-step
engine) → :mod:`gramhook.readout` (the prediction and diagnostics at the current weights) →
:class:`gramhook.measurement.Measurement` in :attr:`GramMonitor.history` → sinks (TensorBoard).
The periodic research engine reads :mod:`gramhook.measure` instead of the per-step state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from . import adapt, guard, insight, kernel, readout
from .capture import ProbeMatcher, StepCapture
from .config import MonitorConfig, Schedule, check_options, merge
from .dynamics.effective_gram import EffectiveGram
from .dynamics.engine import EngineConfig, ParameterSpaceEngine
from .dynamics.perstep import PerStepEngine
from .losses import resolve_loss
from .measure import compute_rates
from .measurement import HISTORY_KEYS, Measurement
from .optim import check_optimizer, check_trains, momentum_is_warm, over_coordinates, read_optimizer, step_dt, whitening
from .probe import (Reservoir, as_reference, check_probe_against_model, check_targets, default_probe_size, make_probe,
                    rows_in)

# The monitor reads wall time through this name only (tests drive a fake clock through it).
_clock = time.perf_counter

# Growth of the per-step engine's sentinel (Measurement.linear_growth) that marks the first-order
# dynamics unstable: a stable contraction never grows it; momentum's transient stays within a few.
UNSTABLE_GROWTH = 10.0

__all__ = ["GramMonitor"]


def _uncompiled(model: nn.Module) -> nn.Module:
    """The eager module inside a ``torch.compile`` wrapper (``OptimizedModule``), else ``model``."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule" else model


def _trainable_names(model: nn.Module) -> tuple:
    return tuple(n for n, p in model.named_parameters() if p.requires_grad)


def _weak_hook(monitor: "GramMonitor", method: str) -> Callable:
    """A hook calling ``monitor.<method>`` while the monitor is alive, a no-op after; it never
    raises into the user's loop."""
    ref = weakref.ref(monitor)

    def hook(*args, **kwargs):
        mon = ref()
        if mon is None:
            return None
        try:
            # None, except the step pre-hook's (args, kwargs) that wrap a closure (_pre_step).
            return getattr(mon, method)(*args, **kwargs)
        except Exception:
            return None

    return hook


class GramMonitor:
    """Predict the test loss of a model while it trains, from the empirical NTK on a probe.

    Args:
        model: the model being trained; ``model(x)`` with one tensor, or keyword/positional tensors
            (dict samples) returning a tensor, a dict, a tuple or a ``ModelOutput``.
        optimizer: a ``torch.optim`` optimizer of :data:`gramhook.optim.SUPPORTED_OPTIMIZERS` (SGD,
            Adam, AdamW, RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam; foreach/fused too)
            training ``model``.
        probe: ``(x, y)`` tensors, a ``Dataset`` or a ``DataLoader`` of *training* samples; a
            fixed subset of ``probe_size`` samples is drawn once, deterministically.
        n_train: size of the training set (inferred from a Dataset/DataLoader probe).
        loss: ``"cross_entropy"``, ``"mse"`` or a per-sample callable ``(out, y) -> (batch,)``.
        logdir: a path or a ``SummaryWriter`` for TensorBoard, or ``None``.
        every: measurement schedule: an int, a callable ``step -> bool``, or ``None`` for a 5%
            time budget (see :class:`MonitorConfig`).
        probe_size: probe samples m (default 128 on CPU, 512 on CUDA).
        seed: seed of the probe choice and of the monitor's private sampling.
        config: every other setting, a :class:`MonitorConfig`.

    Raises:
        TypeError: an unknown keyword; the message says what to pass instead (a setting goes in
            ``config=MonitorConfig(...)``; a removed option says why it went).

    Results are :class:`Measurement` records in :attr:`history` (also returned by
    :meth:`measure`). The hooks hold the monitor weakly: one that is no longer referenced stops
    measuring. Call :meth:`close` (or use ``with GramMonitor(...) as monitor:``) when done;
    :meth:`detach` only removes the hooks. Nothing raised inside a hook reaches your loop.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> monitor = GramMonitor(model, opt, probe=(x, y), n_train=32, every=1)
        >>> for _ in range(3):
        ...     opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
        >>> len(monitor.history), monitor.history[-1].step
        (4, 3)
        >>> monitor.close()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        probe,
        n_train: Optional[int] = None,
        loss="cross_entropy",
        logdir=None,
        every: Schedule = None,
        probe_size: Optional[int] = None,
        seed: int = 0,
        config: Optional[MonitorConfig] = None,
        **unknown,
    ):
        check_options(unknown)
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        check_optimizer(optimizer)
        self.config = config = merge(config, every=every, probe_size=probe_size, seed=seed)
        # A torch.compile'd module: the monitor's kernels run on the eager module inside it (same
        # parameters), and the training inputs are read where the user calls, on the wrapper.
        called = model
        model = _uncompiled(model)
        # Keyword/dict inputs and structured outputs: measure an adapter around the model.
        self.user_model = called
        probe, model = adapt.prepare(model, probe, output=config.output, inputs=config.inputs)
        reference = config.reference
        if isinstance(model, adapt.Adapted):
            reference = model.convert(reference)
        self.model, self.optimizer = model, optimizer
        self.loss = resolve_loss(loss)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                "The model has no trainable parameters (none, or all with requires_grad=False); gramhook "
                "follows the training of parameters: attach the monitor to the model you train.")
        self.device = next(model.parameters()).device
        cause = guard.nonfinite_cause(model)
        if cause is not None:
            raise ValueError(f"Cannot attach to the model: {cause}. Fix the model (or restore a finite "
                             "checkpoint) before attaching the monitor.")
        size = self.config.probe_size or default_probe_size(self.device)
        self.probe, self.n_train = make_probe(probe, size=size, n_train=n_train, seed=self.config.seed, device=self.device)
        if self.probe.m < 2:
            raise ValueError(
                f"The probe has {self.probe.m} sample; leave-one-out needs at least 2 (the other probe "
                "samples stand in for the training set). Pass more samples: a few hundred are typical.")
        self.k = check_probe_against_model(model, self.probe, self.loss)
        self.loss = self.loss.with_out_shape(self._out_shape())
        m = self.probe.x.shape[0]
        check_trains(model, optimizer)
        # The same seed draws the same permutation, so the train sample contains the probe.
        self.train_sample = None
        if self.config.train_sample_size > m:
            sample, _ = make_probe(probe, size=self.config.train_sample_size, n_train=n_train,
                                   seed=self.config.seed, device=self.device)
            if sample.x.shape[0] > m:
                check_targets(sample, self.k, self.loss, what="train sample (probe data beyond the probe)")
                self.train_sample = sample
                self._probe_rows = rows_in(self.probe, sample)
        # Probe rows in training batches: the per-step engine injects them; the periodic engine keeps
        # them out of its reference (there a probe sample would contract its own perturbation).
        self._probe_filter = ProbeMatcher(self.probe.x, self.config.seed)
        self.reference = as_reference(reference, self.device)
        if self.reference is not None:
            keep = self._probe_filter.keep(self.reference[0])
            if not bool(keep.any()):
                raise ValueError(
                    "`reference` holds only probe samples; it must stand for the *other* training "
                    "samples: pass the whole training set (probe rows are left out automatically)."
                )
            x_ref, y_ref = self.reference
            self.reference = (x_ref[keep], None if y_ref is None else y_ref[keep])
        if self.loss.hessian_needs_target and (self.reference is None or self.reference[1] is None):
            raise ValueError(
                f"The loss {self.loss.name!r} may have a target-dependent Hessian, but the contraction "
                "rows are drawn from unlabelled training inputs: set `loss.hessian_needs_target = False` "
                "on your loss function if Λ does not depend on y, or use labelled reference batches with "
                "config=MonitorConfig(engine='periodic', reference=(x_train, y_train))."
            )
        # The probe's own rows enter the contraction exactly (weight 1/n each) and the reference batch
        # stands for the other n − m samples, so the own-sample exclusion is exact (docs/theory.md §3(a)).
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        coords = self.config.coordinates
        if coords == "auto":
            # Exact coordinates hold (m, k, P) Jacobians and cost O(R²·P) per measurement.
            coords = "exact" if m * self.k * n_params * 4 <= 64 * 2**20 else 4096
        self.coordinates = coords
        dim = n_params if coords == "exact" else int(coords)
        dtype = next(model.parameters()).dtype
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        self.engine: Optional[ParameterSpaceEngine] = None
        self.perstep: Optional[PerStepEngine] = None
        self._stepper: Optional[StepCapture] = None
        if self.config.engine == "periodic":
            self.engine = ParameterSpaceEngine(EngineConfig(n_train=self.n_train, m=m), dim, self.loss, dtype=dtype,
                                               device=self.device)
        else:
            self.perstep = PerStepEngine(m, dim, dtype=dtype, device=self.device)
            self._stepper = StepCapture(model, optimizer, self.loss, self.probe.x, self.probe.y, self.n_train,
                                        self.perstep, sketch=None if coords == "exact" else int(coords),
                                        rows=self.config.rows, seed=self.config.seed, method=self.config.method,
                                        matcher=self._probe_filter, names=_trainable_names(model),
                                        directions=self.config.directions)
        self._prev_readout = None  # (time, mean gap) of the previous per-step readout with diagnostics
        self._readouts = 0         # per-step readouts so far
        self._elapsed_total = 0.0  # flow time of the per-step engine's readouts
        m_k = min(self.config.effective_gram_size, m)
        self.effective = EffectiveGram(self.n_train, dtype=dtype, device=self.device) if m_k >= 2 else None
        self._m_k = m_k
        self._reservoir = Reservoir(self.config.reference_size, self.config.seed + 1)
        self._ref_gen = torch.Generator().manual_seed(self.config.seed + 2)
        self.history: List[Measurement] = []
        self.step = 0
        self._elapsed = 0.0
        self._monitor_seconds = 0.0
        self._step_seconds = 0.0      # per-step engine time, included in _monitor_seconds
        self._started = _clock()
        self._failures = guard.Failures()
        self._trainable = _trainable_names(model)
        self._told_new = False
        self._told_unstable = False
        self._last_gaps: Optional[Tensor] = None
        self._samples = insight.SampleRecord(m)  # per-sample sums for the noisy-label scores
        # SGD momentum builds up from an empty buffer: the first steps move less (optim.step_dt).
        self._cold_start = not momentum_is_warm(optimizer)
        # What a saved state must match to be loaded here (see load_state_dict).
        self._fingerprint = guard.fingerprint(
            self.model, self._trainable, self.probe.x, self.probe.y, m=self.probe.m, k=self.k, n_train=self.n_train,
            loss=self.loss.name, engine=config.engine, coordinates=self.coordinates, seed=config.seed,
            effective_gram_size=self._m_k, train_sample=0 if self.train_sample is None else self.train_sample.m)
        sink = self._make_sink(logdir, config.compare_tag)  # a bad logdir fails here, before any hook
        # Hooks hold the monitor weakly: a monitor that is no longer referenced stops measuring.
        self._handles = [optimizer.register_step_post_hook(_weak_hook(self, "_on_step"))]
        if self._stepper is not None:
            self._handles.append(optimizer.register_step_pre_hook(_weak_hook(self, "_pre_step")))
            self._handles.extend(self._stepper.statistics.handles)
        if self._stepper is not None or self.reference is None:
            if not isinstance(model, adapt.Adapted) or model.spec is None:
                self._handles.append(called.register_forward_pre_hook(_weak_hook(self, "_capture")))
            else:  # the user's model is called with its own arguments: pack them like the probe
                self._handles.append(called.register_forward_pre_hook(_weak_hook(self, "_capture_call"),
                                                                      with_kwargs=True))
        # The first point is written at the first step: a monitor resumed by load_state_dict
        # before training must not write a second step-0 point into the same logdir.
        self.sink = None
        self.measure()
        self.sink = sink
        self._unwritten = self.history[-1] if self.history else None
        # The budget of every=None counts from here: the step-0 readout (plans built, first calls)
        # is a one-off cost, and charging it would starve the first part of the run of readouts.
        self._budget_origin = (_clock(), self._monitor_seconds)

    # -- construction helpers -----------------------------------------------------------------
    def _out_shape(self):
        with torch.no_grad(), kernel.eval_mode(self.model):
            return tuple(self.model(self.probe.x[:1]).shape[1:])

    def _due(self, step: int) -> bool:
        every = self.config.every
        if every is None:
            since, spent = getattr(self, "_budget_origin", (self._started, 0.0))
            readouts = self._monitor_seconds - spent - self._step_seconds
            rest = _clock() - since - readouts
            return readouts <= self.config.overhead * rest
        if callable(every):
            return bool(every(step))
        return step % every == 0

    @staticmethod
    def _make_sink(logdir, compare_tag):
        if logdir is None:
            return None
        from .sinks.tensorboard import TensorBoardSink

        sink = TensorBoardSink(logdir, compare_tag=compare_tag)
        sink.write_layout()
        return sink

    # -- hooks --------------------------------------------------------------------------------
    def _capture(self, module, args):
        """Training inputs: the per-step engine's pending batch, or the periodic reservoir. A forward
        in train mode but without autograd (an evaluation that forgot ``model.eval()``) trains
        nothing and is not recorded."""
        if not self.model.training or not torch.is_grad_enabled() or not args or not isinstance(args[0], Tensor):
            return
        try:
            (self._stepper.record if self._stepper is not None else self._reservoir.add)(args[0])
        except Exception as exc:  # never break the user's forward
            self._report("capture", exc)

    def _capture_call(self, module, args, kwargs):
        """:meth:`_capture` for a model called with several tensors or keywords: packed like the probe."""
        if not module.training or not torch.is_grad_enabled():
            return
        try:
            packed = self.model.spec.pack_call(args, kwargs)
        except Exception as exc:
            self._report("capture", exc)
            return
        if packed is not None:
            self._capture(module, (packed,))

    def _pre_step(self, optimizer, args, kwargs):
        # optimizer.step(closure) (Lightning, LBFGS-style loops) runs forward and backward inside
        # the step, after this hook: the engine step then follows the closure.
        # ``args`` starts with the optimizer itself.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if callable(closure):
            done = []

            def after_closure():
                loss = closure()
                if not done:  # a closure evaluated again (line search) is not another step
                    done.append(True)
                    self._engine_step()
                return loss
            if "closure" in kwargs:
                return tuple(args), {**kwargs, "closure": after_closure}
            return (args[0], after_closure) + tuple(args[2:]), dict(kwargs)
        self._engine_step()
        return None

    def _engine_step(self) -> None:
        start = _clock()
        batch = self._stepper.pending[0] if self._stepper.pending else None
        try:
            with self._isolated():
                if not self._failures.due("step", self.step):
                    self._stepper.pending = []
                    return
                # A closure has run by now (_pre_step wraps it): the batch and gradients are this step's.
                self._check_step(closure=False)
                self._stepper.step()
            self._succeeded("step")
        except Exception as exc:
            self._stepper.pending = []
            self._report("step", self._explain(exc, batch))
        finally:
            spent = _clock() - start
            self._monitor_seconds += spent
            self._step_seconds += spent

    def _check_step(self, closure: bool = False) -> None:
        """Refuse a step the per-step engine cannot follow, naming the cause and the fix."""
        if self.coordinates == "exact" and not self._told_new:
            known = set(self._trainable)
            new = [n for n in _trainable_names(self.model) if n not in known]
            if new:
                # Frozen since: P = 0 on them (optim.whitening). Unfrozen since: outside the coordinates.
                self._told_new = True
                guard.emit(
                    f"gramhook: {len(new)} parameter(s) became trainable after the monitor was attached "
                    f"({', '.join(new[:4])}{', ...' if len(new) > 4 else ''}); exact coordinates were fixed "
                    "then, so the prediction holds them fixed. Attach the monitor after unfreezing, or use "
                    "sketched coordinates (config=MonitorConfig(coordinates=4096)), which follow them.", UserWarning)
        if closure:
            self._stepper.pending = []
            raise RuntimeError(
                "optimizer.step(closure) runs the model inside the step, after the monitor reads the "
                "step's batch and gradients: compute the loss and call backward() before "
                "optimizer.step() (without a closure)")
        if not self._stepper.pending:
            self._stepper.step()  # keeps the momentum bookkeeping; then the step is reported
            raise RuntimeError(
                "no training forward of the model was seen before this optimizer step, so the step "
                "cannot be followed: run the model in train mode (model.train()) through its own "
                "__call__; a module torch.compile'd before the monitor was attached bypasses its hooks, "
                "so pass the compiled module itself to GramMonitor (or attach before the first "
                "compiled call)")

    def _nonfinite(self, x: Optional[Tensor]) -> Optional[str]:
        """What is NaN/inf (parameters, the batch ``x``, gradients), said as such: an eigensolver's
        "failed to converge" says nothing of it. ``None`` when everything is finite."""
        try:
            cause = guard.nonfinite_cause(self.model, x)
        except Exception:
            return None
        return None if cause is None else f"{cause}; the monitor skips until they are finite again"

    def _explain(self, exc: BaseException, x: Optional[Tensor]) -> BaseException:
        cause = self._nonfinite(x)
        return exc if cause is None else FloatingPointError(cause)

    def _on_step(self, optimizer, args, kwargs):
        self.step += 1
        if self._unwritten is not None:
            record, self._unwritten = self._unwritten, None
            if self.sink is not None:
                with guard.quiet():
                    self._write(record)
        try:
            self._elapsed += step_dt(optimizer, self.step if self._cold_start else None)
        except Exception as exc:
            self._report("dt", exc)
        try:
            due = self._due(self.step) and self._failures.due("measure", self.step)
        except Exception as exc:
            self._report("schedule", exc)
            return
        if due:
            self.measure()

    # -- measurement --------------------------------------------------------------------------
    def measure(self) -> Optional[Measurement]:
        """Measure now and append the result to :attr:`history`. Failures are reported once and
        skipped (``None``); training goes on."""
        start = _clock()
        try:
            with self._isolated():
                record = self._measure()
        except Exception as exc:
            self._report("measure", exc)
            if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc):
                self._shrink()
            return None
        finally:
            self._monitor_seconds += _clock() - start
        record["monitor_seconds"] = _clock() - start
        outside = _clock() - self._started - self._monitor_seconds
        # Monitor time over the user's time since the monitor was attached; undefined before any step.
        record["overhead"] = self._monitor_seconds / outside if self.step > 0 and outside > 0 else math.nan
        record = Measurement(**record)
        self.history.append(record)
        if self.sink is not None:
            self._write(record)
        return record

    @contextlib.contextmanager
    def _isolated(self):
        """RNG streams, grad mode and module modes are restored whatever happens."""
        devices = [self.device] if self.device.type == "cuda" else []
        with guard.quiet(), torch.random.fork_rng(devices=devices), torch.enable_grad():
            yield

    def _reference_batch(self):
        if self.reference is not None:
            x, y = self.reference
            idx = torch.randint(0, x.shape[0], (min(self.config.reference_size, x.shape[0]),), generator=self._ref_gen)
            idx = idx.to(x.device)
            return x[idx], None if y is None else y[idx]
        x = self._reservoir.take()
        if x is not None:  # probe rows are dropped here, off the training forward's hot path
            x = x.to(self.device)
            x = x[self._probe_filter.keep(x)]
        return (None, None) if x is None or x.shape[0] == 0 else (x, None)

    def _measure(self) -> Dict[str, float]:
        try:
            if self.perstep is not None:
                if self._failures.failing("step"):
                    raise RuntimeError("the per-step engine could not follow the latest training steps "
                                       "(see the step failure reported before)")
                record = self._readout()
            else:
                record = self._measure_periodic()  # no injections, no per-sample insight
        except Exception as exc:
            cause = self._nonfinite(None)
            if cause is None:
                raise
            raise FloatingPointError(cause) from exc
        self._succeeded("measure")
        return record

    def _readout(self) -> Dict[str, float]:
        """Per-step engine: read the maintained perturbations out at the current weights.

        The prediction costs one forward pass and one forward-mode pass over the probe (and one
        forward over the train sample); every ``diagnostics_every``-th readout also measures ε̄
        (the probe's residual gradients), c̄ (by finite differences between such readouts) and
        the effective Gram matrix (the first m_K probe Jacobians).
        """
        names = self._stepper.names  # exact coordinates: the parameters trainable at attach time
        pre = whitening(self.optimizer, self.model, names=names, still=self._stepper.still)
        x, y = self.probe.x, self.probe.y
        sketch = None if self.coordinates == "exact" else int(self.coordinates)
        seed = self.config.seed
        sample_losses = None
        if self.train_sample is None:
            out = readout.batched_outputs(self.model, x)
        else:  # the probe is part of the train sample: one forward pass serves both
            sample_out = readout.batched_outputs(self.model, self.train_sample.x)
            sample_losses = self.loss(sample_out, self.train_sample.y).detach()
            out = sample_out[self._probe_rows.to(sample_out.device)]
        # u_i = J_i δ_i by forward mode: one tangent per sample, no (m, k, D) Jacobian.
        u = kernel.tangent_outputs(self.model, x, self.perstep.delta(), s=sketch, seed=seed, preconditioner=pre,
                                   names=names)
        gaps = self.perstep.loss_gaps(u, out, y, self.loss)
        record = readout.gap_fields(self.loss(out, y).detach(), gaps, sample_losses)
        self._elapsed_total += self._elapsed
        self._elapsed = 0.0
        t = self._elapsed_total
        mean = record["probe_gap"]
        self._last_gaps = gaps.detach().cpu()
        growth = self.perstep.growth()
        record.update(step=self.step, time=t, injected=float(self.perstep.injections),
                      injection_simulated=float(self._stepper.simulate), linear_growth=growth)
        if growth >= UNSTABLE_GROWTH and not self._told_unstable:
            self._told_unstable = True
            guard.emit(
                f"gramhook: at step {self.step} the first-order leave-one-out dynamics is unstable (an "
                f"uninjected perturbation grew {growth:.3g}-fold): the step size times the curvature is past "
                "the optimizer's stability limit, as at the edge of stability, and the predicted test loss "
                "overstates the gap from here on. The history's `linear_growth` tracks it; a smaller learning "
                "rate, or a schedule that decays it, brings the dynamics back.", RuntimeWarning)
        full = self._readouts % self.config.diagnostics_every == 0
        self._readouts += 1
        if full:
            record.update(self._diagnostics(x, out, y, pre, sketch, names, t, mean))
        return record

    def _diagnostics(self, x, out, y, pre, sketch, names, t: float, mean: float) -> Dict[str, float]:
        """ε̄, c̄ and the effective Gram matrix's statistics at a readout."""
        seed, method = self.config.seed, self.config.method
        eps, r, lam = readout.perturbation(self.model, self.loss, x, out, y, self.n_train, sketch=sketch, seed=seed,
                                           preconditioner=pre, method=method, names=names)
        contraction = readout.contraction_rate(eps, (t, mean), self._prev_readout)
        self._prev_readout = (t, mean)
        record = {"contraction": contraction, "perturbation": eps}
        if self.effective is not None:
            sub = readout.sub_probe_jacobian(self.model, x[: self._m_k], sketch=sketch, seed=seed, preconditioner=pre,
                                             method=method, names=names)
            sub = sub.to(self.perstep.dtype)  # float32 for 16-bit models (no 16-bit eigensolver)
            theta = readout.sub_probe_ntk(sub)
            dt = t - getattr(self, "_k_time", t)
            self._k_time = t
            c = contraction if math.isfinite(contraction) else 0.0
            stats = self.effective.update(dt, theta, r[: self._m_k], lam[: self._m_k], c)
            record.update(alignment=stats.alignment, benign_fraction=stats.benign_fraction,
                          kernel_fidelity=stats.kernel_fidelity, effective_gram_gap=stats.gap)
            self._last_spectrum = readout.ntk_spectrum(theta)
        record.update(self._insight(out, y, r, theta if self.effective is not None else None))
        return record

    def _measure_periodic(self) -> Dict[str, float]:
        metric = over_coordinates(read_optimizer(self.optimizer, self.model), self.model, self._trainable)
        ref_x, ref_y = self._reference_batch()
        rates = compute_rates(
            self.model, self.loss, self.probe.x, self.probe.y, metric,
            coordinates=self.coordinates, ref_x=ref_x, ref_y=ref_y,
            ref_weight=(self.n_train - self.probe.x.shape[0]) / self.n_train,
            seed=self.config.seed, method=self.config.method,
            ref_outputs=self.config.reference_outputs, generator=self._ref_gen,
        )
        m = self.probe.x.shape[0]
        if rates.ref_jac is None and self.n_train > m > 1:
            # Nothing captured yet: the probe stands for the whole training set. Each probe row
            # then carries (n − 1)/(m − 1) samples, so that in run i the m − 1 others carry the
            # n − 1 others; sample i's own row is excluded whatever its weight.
            rates.probe_weight = (self.n_train - 1) / (m - 1)
        guard.check_finite(rates, ("outputs", "residual", "probe_jac", "ref_jac"))  # before the engine: a failed measurement must not leave NaN in its state
        # The continuous flow: across docs/theory.md §7's checks it tracked leave-one-out better than the
        # discrete optimizer map whenever the kernel moves (tanh MLP +0.5% against +9%).
        est = self.engine.measure(self._elapsed if self.history else 0.0, rates)
        self._elapsed = 0.0
        sample_losses = None if self.train_sample is None else self.loss(
            readout.batched_outputs(self.model, self.train_sample.x), self.train_sample.y).detach()
        record = readout.gap_fields(self.loss(rates.outputs, self.probe.y).detach(), est.per_sample, sample_losses)
        self._last_gaps = est.per_sample.detach().cpu()
        record.update(step=self.step, time=est.time, contraction=est.contraction, perturbation=est.perturbation)
        if self.effective is not None:
            # float32 for 16-bit models
            theta = readout.sub_probe_ntk(rates.probe_jac[: self._m_k].to(self.engine.delta.dtype), rates.metric)
            dt = est.time - getattr(self, "_k_time", est.time)
            self._k_time = est.time
            c = est.contraction if math.isfinite(est.contraction) else 0.0
            stats = self.effective.update(dt, theta, rates.residual[: self._m_k], rates.hessian[: self._m_k], c)
            record.update(
                alignment=stats.alignment, benign_fraction=stats.benign_fraction,
                kernel_fidelity=stats.kernel_fidelity, effective_gram_gap=stats.gap,
            )
            self._last_spectrum = readout.ntk_spectrum(theta)
        return record

    def _shrink(self) -> None:
        """After an out-of-memory failure: halve the reference batch and the kernel budget."""
        self.config = dataclasses.replace(self.config, reference_size=max(1, self.config.reference_size // 2))
        self._reservoir.capacity = self.config.reference_size

    def _report(self, where: str, exc: BaseException) -> None:
        """Report a failure (each distinct one once per episode; see :class:`gramhook.guard.Failures`).
        Never raises, also under ``-W error``."""
        try:
            what = {"measure": "measurement", "step": "step's update"}.get(where, "call")
            self._tell(self._failures.failed(where, exc, self.step, what))
        except Exception:
            pass

    def _succeeded(self, where: str) -> None:
        self._tell(self._failures.succeeded(where, self.step))

    def _tell(self, msg: Optional[str]) -> None:
        if msg is None:
            return
        guard.emit(msg)
        if getattr(self, "sink", None) is not None:
            try:
                with guard.quiet():
                    self.sink.write_text(self.step, "errors", msg)
            except Exception:
                pass

    def _write(self, record: Measurement) -> None:
        try:
            self.sink.write_scalars(record.step, {k: v for k, v in record.as_dict().items() if k != "step"})
            spectrum = getattr(self, "_last_spectrum", None)
            self.sink.write_histograms(record.step, self._last_gaps, spectrum)
        except Exception as exc:
            self._report("tensorboard", exc)

    # -- results ------------------------------------------------------------------------------
    def _latest(self, key: str) -> float:
        return getattr(self.history[-1], key) if self.history else math.nan

    @property
    def seconds(self) -> float:
        """Monitor time so far: readouts and, with the per-step engine, its work at every step."""
        return self._monitor_seconds

    @property
    def step_seconds(self) -> float:
        """The per-step engine's share of :attr:`seconds` (0 with the periodic engine)."""
        return self._step_seconds

    @property
    def train_loss(self) -> float:
        """Train loss (eval mode) at the last measurement: on the train sample, else the probe."""
        return self._latest("train_loss")

    @property
    def predicted_gap(self) -> float:
        return self._latest("predicted_gap")

    @property
    def predicted_test_loss(self) -> float:
        return self._latest("predicted_test_loss")

    def per_sample_gap(self) -> Tensor:
        """Per-sample gaps ``g_i`` at the last measurement, ``(m,)``."""
        if self._last_gaps is None:
            return torch.full((self.probe.x.shape[0],), math.nan)
        return self._last_gaps.clone()

    def effective_gram(self) -> Tensor:
        """K_n on the sub-probe, ``(m_K·k, m_K·k)``, index ``i·k + a``."""
        if self.effective is None:
            raise RuntimeError("The effective Gram matrix is disabled (MonitorConfig(effective_gram_size=0)).")
        return self.effective.matrix.clone()

    def _series(self, metric: str) -> List[tuple]:
        if metric not in HISTORY_KEYS:
            raise KeyError(f"Unknown metric {metric!r}; use one of {sorted(HISTORY_KEYS)}.")
        values = [(h.step, getattr(h, metric)) for h in self.history]
        return [(step, v) for step, v in values if math.isfinite(v)]

    @property
    def best(self) -> Optional[Dict[str, float]]:
        """The step and value of the lowest predicted test loss so far."""
        series = self._series("predicted_test_loss")
        if not series:
            return None
        step, value = min(series, key=lambda sv: sv[1])
        return {"step": step, "value": value}

    def should_stop(self, patience: int = 5, min_delta: float = 0.0, metric: str = "predicted_test_loss") -> bool:
        """True once ``metric`` has not improved by ``min_delta`` for ``patience`` measurements."""
        if patience < 1:
            raise ValueError(f"`patience` must be at least 1, got {patience}.")
        series = [v for _, v in self._series(metric)]
        if len(series) <= patience:
            return False
        best_before = min(series[:-patience])
        return min(series[-patience:]) > best_before - min_delta

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "fingerprint": dict(self._fingerprint),
            "step": self.step,
            "elapsed": self._elapsed,
            "history": [h.as_dict() for h in self.history],
            "engine": None if self.engine is None else self.engine.state_dict(),
            "effective": None if self.effective is None else self.effective.state_dict(),
            "k_time": getattr(self, "_k_time", None),
            "reservoir": self._reservoir.state_dict(),
            "ref_gen": self._ref_gen.get_state(),
            "last_gaps": self._last_gaps,
            "cold_start": self._cold_start,
            "perstep": None if self.perstep is None else self.perstep.state_dict(),
            "stepper": None if self._stepper is None else self._stepper.state_dict(),
            "elapsed_total": self._elapsed_total,
            "prev_readout": self._prev_readout,
            "readouts": self._readouts,
            "samples": self._samples.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`. The state is checked against this monitor (model
        parameter shapes, probe data, ``n_train``, settings) before anything is changed.

        Raises:
            ValueError: the state comes from another model, probe or configuration.
        """
        self._check_state(state)
        self._unwritten = None  # the saved run already wrote its points
        self.step = state["step"]
        self._elapsed = state["elapsed"]
        self.history = [Measurement.from_dict(h) for h in state["history"]]
        if self.engine is not None:
            self.engine.load_state_dict(state["engine"])
        if self.effective is not None and state["effective"] is not None:
            self.effective.load_state_dict(state["effective"])
        if state["k_time"] is not None:
            self._k_time = state["k_time"]
        self._reservoir.load_state_dict(state["reservoir"])
        self._ref_gen.set_state(state["ref_gen"])
        self._last_gaps = state["last_gaps"]
        self._cold_start = state.get("cold_start", False)
        if self.perstep is not None and state.get("perstep") is not None:
            self.perstep.load_state_dict(state["perstep"])
            self._stepper.load_state_dict(state["stepper"])
        self._elapsed_total = state.get("elapsed_total", 0.0)
        self._prev_readout = state.get("prev_readout")
        self._readouts = int(state.get("readouts", 0))
        if state.get("samples") is not None:
            self._samples.load_state_dict(state["samples"])

    def _check_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "history" not in state or "step" not in state:
            raise ValueError("This is not a GramMonitor state: pass what GramMonitor.state_dict() returned.")
        saved = state.get("fingerprint")
        problems = [] if saved is None else guard.differences(saved, self._fingerprint)
        engine = state.get("perstep") if self.perstep is not None else state.get("engine")
        if (self.perstep is None) != (state.get("perstep") is None):
            problems.append("engine: the state was saved with the other engine")
        elif self.perstep is not None and PerStepEngine.state_shape(engine) != tuple(self.perstep.y.shape):
            problems.append(f"per-step state: saved {PerStepEngine.state_shape(engine)}, here {tuple(self.perstep.y.shape)}")
        if problems:
            raise ValueError(
                "Cannot load this monitor state: it was saved for another run (" + "; ".join(problems) + "). "
                "Build the monitor with the same model, probe data, probe_size, seed, n_train and "
                "settings as the run that saved it. Nothing was changed.")

    # -- lifecycle ------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook; the monitor stops measuring. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def close(self) -> None:
        """Detach and close the TensorBoard sink."""
        self.detach()
        record, self._unwritten = getattr(self, "_unwritten", None), None
        if record is not None and self.sink is not None:
            self._write(record)
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    def __enter__(self) -> "GramMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if self._handles:
                guard.emit("gramhook: a GramMonitor was garbage-collected while attached; it stopped "
                           "measuring. Call monitor.close() (or use `with GramMonitor(...)`) when done.",
                           ResourceWarning)
            self.close()
        except Exception:
            pass

    # -- per-sample insight (gramhook.insight) --------------------------------------------------
    def _insight(self, out: Tensor, y: Tensor, r: Tensor, theta: Optional[Tensor]) -> Dict[str, float]:
        """Fold this diagnostics readout into the per-sample record; the companion diagnostics
        (docs/theory.md §5) and the forecast as history fields."""
        fields, spectrum, nuisance = insight.companion(theta, r, out, y, self.model.named_parameters())
        self._samples.update(self._last_gaps, self.loss(out, y), insight.margins_of(out, y), nuisance)
        final = best = math.nan
        if self.total_steps is not None:
            series = self._series("predicted_test_loss")
            final, best = insight.forecast([s for s, _ in series], [v for _, v in series], self.total_steps)
        fields.update(forecast_final_test_loss=final, forecast_best_step=best)
        if self.sink is not None and self._samples.readouts:
            try:
                rows = self._suspect_rows(10)
                x = self.probe.x[[row["row"] for row in rows]]
                images = x if x.dim() == 4 and x.shape[1] in (1, 3) else None
                self.sink.write_suspects(self.step, rows, self.label_noise_scores()[1], images, spectrum)
            except Exception as exc:
                self._report("tensorboard", exc)
        return fields

    def set_total_steps(self, total_steps: int) -> None:
        """The optimizer steps the whole run will take; turns the forecast on."""
        self.config = dataclasses.replace(self.config, total_steps=total_steps)

    @property
    def total_steps(self) -> Optional[int]:
        """The run's optimizer steps for the forecast (:attr:`MonitorConfig.total_steps`)."""
        return self.config.total_steps

    def _probe_index(self) -> Tensor:
        return self.probe.indices.clone() if self.probe.indices is not None else torch.arange(self.probe.m)

    def label_noise_scores(self, score: str = insight.DEFAULT_SCORE):
        """Noisy-label score of every probe sample, higher = more likely mislabeled.

        The default ranks each sample by its leave-one-out loss ``ℓ_i + g_i`` and by its margin
        ``f_y − max_{c≠y} f_c``, both averaged over the diagnostics readouts, and adds the two
        ranks (:data:`gramhook.insight.SCORES`; measured in ``benchmarks/results/label_noise.md``).
        Pass the whole (small) training set as ``probe`` with ``probe_size`` at least its size
        for a score on every sample. Per-step engine only (the default); NaN with
        ``engine="periodic"``.

        Returns:
            ``(index, score)``: int64 positions in the ``probe`` data ``(m,)`` and float64 scores
            ``(m,)`` (NaN before the first diagnostics readout).
        """
        return self._probe_index(), insight.score(self._samples, score)

    def _suspect_rows(self, k: int, score: str = insight.DEFAULT_SCORE) -> List[Dict[str, float]]:
        index, s = self.label_noise_scores(score)
        return insight.suspects(index, s, self.probe.y, self._samples, k)

    def suspect_samples(self, k: int = 10, score: str = insight.DEFAULT_SCORE) -> List[Dict[str, float]]:
        """The ``k`` most suspect samples, most suspect first: dicts with ``index`` (position in
        the ``probe`` data), ``score``, ``label``, latest ``gap`` and ``loss``."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int, got {k!r}.")
        rows = self._suspect_rows(k, score)
        for row in rows:
            row.pop("row")
        return rows
