"""Per-sample generalization-gap engines (docs/theory.md §2–§3). Pure tensor code.

Both engines follow, for each probe sample i, the first-order perturbation between training
without z_i (leave-one-out) or with z_i replaced by a stand-in z' (replace-one) and the real
trajectory, and read out the exact loss difference ``g_i = ℓ(f_i + u_i, y_i) − ℓ(f_i, y_i)``.

- :class:`ParameterSpaceEngine` (engine (a), the default) keeps ``δ_i`` in parameter
  coordinates (exact, dimension P) or in sketched coordinates (dimension s), contracts it with
  the Gauss–Newton matrix of the *other* samples and reads it out through the *current*
  Jacobian, ``u_i = J_i(t) δ_i``.
- :class:`FunctionSpaceEngine` (engine (b)) keeps the perturbation of all probe outputs. It is
  exact in the kernel regime when the probe is the whole training set, and is the baseline.

Time stepping. A measurement at time t supplies :class:`Rates` evaluated at the current weights.
The engine first advances the state over the elapsed interval with the contraction of the
*previous* measurement (left endpoint) and an injection rate interpolated from the previous to the
current one, then reads out through the current Jacobian. Given the number of optimizer steps in
the interval it integrates the discrete optimizer map instead of the flow (exact for gradient
descent with a fixed kernel). See :func:`_integrate`.

Contraction operator. Rows ``Z`` stack ``sqrt(w)·Λ_j^{1/2} J_j`` for the reference batch (weight
``w = ref_weight/B`` each, the reference standing for the non-probe share of the data) and for
every probe sample (weight 1/n each). The probe's own rows are always in ``Z``, so sample i's own
share ``(1/n) J_iᵀ Λ_i J_i`` can be taken out exactly: the own sample must never contract its own
perturbation (docs/theory.md §3, "the exclusion is essential").
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import linalg

LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "Mode",
    "Standin",
    "Rates",
    "EngineConfig",
    "GapEstimate",
    "ParameterSpaceEngine",
    "FunctionSpaceEngine",
    "perturbation_factor",
    "fold_rates",
    "sketch_extrapolation_factor",
]


class Mode(str, enum.Enum):
    LOO = "loo"
    REPLACE = "replace"


class Standin(str, enum.Enum):
    """Who stands in for z' in replace-one mode."""

    PROBE = "probe"      # the mean gradient of the other probe samples
    HOLDOUT = "holdout"  # the mean gradient of a labelled holdout set


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Settings of a gap engine.

    Attributes:
        n_train: n, the size of the training set.
        m: probe size.
        mode: leave-one-out or replace-one.
        standin: stand-in for z' in replace-one mode.
        reference_history: how many reference batches, the current one and the most recent
            earlier ones, make up the contraction of an interval. More batches give a smoothed,
            higher-rank estimate of H at no extra Jacobian cost (docs/theory.md §3, "apply the exponential
            of a smoothed estimate of H"); 1 uses the current batch alone.
        history_decay: weight ratio of each earlier batch to the next newer one; the weights are
            normalized to sum to one, so the rows still estimate H.
        contraction: ``"left"`` applies the contraction measured at an interval's start;
            ``"trapezoid"`` averages the start's and the end's (see ``_interval_rows``).
        sketch_extrapolation: the state is in sketched coordinates of dimension s (divisible by
            4). The engine also runs on the sketch folded to s/2 and s/4 (free:
            :func:`fold_rates`) and scales the gaps by :func:`sketch_extrapolation_factor`,
            extrapolating the sketch's bias away (see :meth:`ParameterSpaceEngine.measure`).
            Exact coordinates cannot be folded.
    """

    n_train: int
    m: int
    mode: Mode = Mode.LOO
    standin: Standin = Standin.PROBE
    reference_history: int = 1
    history_decay: float = 0.7
    contraction: str = "left"
    sketch_extrapolation: bool = False

    def __post_init__(self):
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "standin", Standin(self.standin))
        if self.m < 1:
            raise ValueError("The probe is empty: give at least one probe sample (m ≥ 1).")
        if self.n_train < self.m:
            raise ValueError(
                f"n_train={self.n_train} is smaller than the probe (m={self.m}); pass the size of "
                "the whole training set as n_train (the probe is a subset of it)."
            )
        if self.mode is Mode.REPLACE and self.standin is Standin.PROBE and self.m < 2:
            raise ValueError("Replace-one with the probe as stand-in needs at least two probe samples.")
        if isinstance(self.reference_history, bool) or not isinstance(self.reference_history, int) or self.reference_history < 1:
            raise ValueError(f"reference_history must be a positive int (1: the current batch only), got {self.reference_history!r}.")
        if self.contraction not in ("left", "trapezoid"):
            raise ValueError(f"contraction must be 'left' or 'trapezoid', got {self.contraction!r}.")
        if not 0.0 < self.history_decay <= 1.0:
            raise ValueError(f"history_decay must lie in (0, 1], got {self.history_decay!r}.")


@dataclasses.dataclass
class Rates:
    """Quantities at the current weights, in the engine's coordinates (dimension D).

    Attributes:
        outputs: probe outputs ``(m, k)``.
        targets: probe targets ``(m, ...)``.
        residual: ``r`` ``(m, k)``.
        hessian: ``Λ`` ``(m, k, k)``.
        probe_jac: ``(m, k, D)``. Exact coordinates: ``J_i``. Sketched coordinates: ``ĵ_iᵀ``
            (the preconditioner is already inside, and ``metric`` is ``None``).
        ref_jac: reference batch ``(B, k, D)`` or ``None``.
        ref_hessian: ``(B, k, k)`` or ``None``.
        ref_weight: the share of the training set the reference batch stands for.
        metric: diagonal of P in these coordinates ``(D,)``; ``None`` is the identity.
        decay: weight-decay rate per unit time, scalar or ``(D,)``.
        standin_grad: loss gradient of the stand-in z' (replace-one with a holdout): the holdout
            mean ``(D,)``, or one holdout sample per probe sample ``(m, D)``.
        standin_jac, standin_hessian: with paired stand-ins, their Jacobians ``(m, k, D)`` and
            Hessians ``(m, k, k)``: z'_i joins the training set, so it contracts δ_i.
        probe_weight: the weight of each probe row in the contraction, in units of 1/n. It is 1
            when a reference batch stands for the other samples; with no reference batch the probe
            stands for the whole training set and the monitor sets ``(n − 1)/(m − 1)``, so that the
            other m − 1 probe samples carry the n − 1 others of each leave-one-out run. Sample i's
            own row, whatever its weight, is excluded from its own contraction.
        own_cotangents: ``(m, q, k)`` rows ``c`` with ``E[Σ c cᵀ] = Λ_i`` (sampled output directions,
            :func:`gramhook.measure.sampled_half_hessian`): the probe's contraction rows are then
            ``c J_i`` instead of ``Λ_i^{1/2} J_i``, q rows per sample instead of k. Sample i's own
            rows are still excluded exactly, since they are the rows that were put in.
    """

    outputs: Tensor
    targets: Tensor
    residual: Tensor
    hessian: Tensor
    probe_jac: Tensor
    ref_jac: Optional[Tensor] = None
    ref_hessian: Optional[Tensor] = None
    ref_weight: float = 1.0
    metric: Optional[Tensor] = None
    decay: Union[None, float, Tensor] = None
    standin_grad: Optional[Tensor] = None
    standin_jac: Optional[Tensor] = None
    standin_hessian: Optional[Tensor] = None
    probe_weight: float = 1.0
    own_cotangents: Optional[Tensor] = None
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def fields(self) -> dict:
        """The defining tensors (for ``state_dict``), without the engine's cache."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cache"}


def fold_rates(rates: Rates, dim: int) -> Rates:
    """The same rates in a count-sketch of size ``dim`` folded from theirs (D a multiple of dim).

    The sketches here hash every coordinate into ``[0, D)`` uniformly; bucket ``b`` folded to
    ``b mod dim`` is a sketch of size ``dim`` with the same signs, so the folded Jacobians are the
    sketched Jacobians of a smaller sketch, for free. Exact coordinates cannot be folded.
    """
    if rates.metric is not None:
        raise ValueError("fold_rates needs sketched coordinates (rates.metric is None there).")

    def fold(t):
        if t is None:
            return None
        d = t.shape[-1]
        if d % dim:
            raise ValueError(f"cannot fold dimension {d} to {dim}: not a multiple")
        return t.reshape(*t.shape[:-1], d // dim, dim).sum(-2)

    out = dataclasses.replace(rates, probe_jac=fold(rates.probe_jac), ref_jac=fold(rates.ref_jac),
                              standin_grad=fold(rates.standin_grad), standin_jac=fold(rates.standin_jac))
    out.cache = {}
    return out


def sketch_extrapolation_factor(g_s: float, g_half: float, g_quarter: float) -> float:
    """The factor that takes the mean gap in a sketch of size s to s = ∞, from the mean gaps of the
    same engine at s, s/2 and s/4 (folded sketches), assuming ``log ḡ_s = log ḡ_∞ − c/s^α``.

    With ``r1 = log(ḡ_s/ḡ_{s/2})`` and ``r2 = log(ḡ_{s/2}/ḡ_{s/4})``, ``2^α = r2/r1`` (Aitken's
    Δ² in log space) and the factor is ``exp(r1/(2^α − 1))``. α is clipped to [1, 2] (the bias
    shrinks at least like 1/s; noisy ratios would otherwise extrapolate wildly), which keeps the
    correction between a third of r1 and r1; the factor is clipped to [0.5, 2]. 1 when a mean is
    not positive.
    """
    if not (g_s > 0 and g_half > 0 and g_quarter > 0):
        return 1.0
    r1, r2 = math.log(g_s / g_half), math.log(g_half / g_quarter)
    q = r2 / r1 if r1 * r2 > 0 else 2.0
    q = min(max(q, 2.0), 4.0)
    return min(max(math.exp(r1 / (q - 1.0)), 0.5), 2.0)


@dataclasses.dataclass
class GapEstimate:
    """One measurement of the engine.

    Attributes:
        per_sample: ``g_i`` ``(m,)``.
        mean: ḡ; ``se``: its standard error ``std(g)/sqrt(m)``.
        perturbation: ε̄ (docs/theory.md §2); contraction: c̄, ``nan`` where ḡ is too small.
        time: the flow time of the measurement.
    """

    per_sample: Tensor
    mean: float
    se: float
    perturbation: float
    contraction: float
    time: float


def perturbation_factor(grads: Tensor, metric: Optional[Tensor], n_train: int, standin: Optional[Tensor] = None) -> float:
    """ε̄ = (1/n)·[mean_i G_ii − mean_{i≠j} G_ij] (or minus mean_i ⟨∇ℓ_i, P ∇ℓ_h⟩ with a holdout).

    Args:
        grads: per-sample loss gradients ``(m, D)``.
        metric: diagonal of P ``(D,)`` or ``None``.
        standin: mean holdout gradient ``(D,)`` or ``None``.
    """
    gp = grads if metric is None else grads * metric
    m = grads.shape[0]
    diag = (gp * grads).sum(1)
    if standin is not None:
        cross = (gp @ (standin.mean(0) if standin.dim() == 2 else standin)).mean()
    else:
        if m < 2:
            return float("nan")
        total = gp.sum(0) @ grads.sum(0)
        cross = (total - diag.sum()) / (m * (m - 1))
    return float((diag.mean() - cross) / n_train)


def _integrate(a: Tensor, a_inj: Tensor, a_end: Tensor, e: Tensor, q_own: Tensor, dt: float, steps: Optional[int]):
    """Integrate the own-excluded contraction in the eigen-coordinates of a row Gram.

    Both engines write their state as ``x_i = x_i(0) + dt·inj_i + (row map)(Q b_i)`` where
    ``Q diag(e) Qᵀ`` is the Gram of the contraction rows and ``a_i = Qᵀ (rows · x_i)``. The
    contraction acts diagonally on ``a``; sample i's own rows are the rows ``q_own[i]`` of Q.

    Args:
        a: ``(c, R)`` initial coordinates, one row per perturbation.
        a_inj, a_end: ``(c, R)`` coordinates of the injection rate at the interval's start and
            end; the rate is interpolated linearly in between.
        e: ``(R,)`` eigenvalues (≥ 0); q_own: ``(c, k, R)``.
        steps: ``None`` for the continuous flow, else the number of discrete optimizer steps.

    Returns:
        ``b`` of shape ``(c, R)`` and the weight ``w`` of the end rate in the injected total
        ``dt·((1 − w)·inj_start + w·inj_end)``. A single discrete step injects the start rate only
        (w = 0), which makes every-step cadence reproduce gradient descent exactly.

    Continuous flow: sub-steps of ``h = dt/N`` with ``h·max e_own ≤ 0.05``; each is half the
    (midpoint) injection, ``exp(−h·Gram)`` (exact), the own share restored with ``exp(+h·own Gram)``, and the
    other half of the injection. Discrete map: N steps ``x ← x − h (Gram − own) x + h·inj``, exact
    for a constant operator, with the factor ``1 − h e`` kept ≥ −1 (the edge of stability).
    Either way a sub-step costs O(c·R·k).
    """
    b = torch.zeros_like(a)
    if steps is None:
        own_gram = torch.einsum("ikr,r,ilr->ikl", q_own, e, q_own)
        e_own, v_own = linalg.eigh(own_gram)
        n_sub = int(min(4096, max(1, math.ceil(dt * float(e_own.max().clamp(min=0)) / 0.05))))
        h = dt / n_sub
        restore = (v_own * linalg.growth_integral(e_own.clamp(min=0), h).unsqueeze(1)) @ v_own.transpose(1, 2)
        decay, phi = torch.exp(-h * e), linalg.decay_integral(e, h)
        for j in range(n_sub):
            rate = a_inj + ((j + 0.5) / n_sub) * (a_end - a_inj)
            a = a + 0.5 * h * rate
            b = b - phi * a
            a = decay * a
            db = torch.einsum("ikr,ik->ir", q_own, torch.einsum("ikl,ilr,ir->ik", restore, q_own, a))
            b, a = b + db, a + e * db + 0.5 * h * rate
        return b, 0.5
    h = dt / steps
    factor = (1 - h * e).clamp(min=-1.0)
    shrink = torch.where(e > 0, (1 - factor) / torch.where(e > 0, e, torch.ones_like(e)), h * torch.ones_like(e))
    for j in range(steps):
        rate = a_inj + (j / steps) * (a_end - a_inj)
        db = -shrink * a + h * torch.einsum("ikr,ik->ir", q_own, torch.einsum("ikr,ir->ik", q_own, a))
        b, a = b + db, a + e * db + h * rate
    return b, (steps - 1) / (2 * steps)


class _Engine:
    """Shared measurement logic: left-endpoint stepping, readout, ε̄ and c̄."""

    def __init__(self, config: EngineConfig, loss: LossFn):
        self.config = config
        self.loss = loss
        self.time = 0.0
        self._pending: Optional[Rates] = None

    # -- to be provided by an engine ---------------------------------------------------------
    def _advance(self, dt: float, rates, steps: Optional[int], end) -> None:
        """Advance over ``dt`` with the operators of ``rates`` (interval start); the injection rate
        is interpolated linearly towards ``end``, the rates at the interval's end."""
        raise NotImplementedError

    def _own_outputs(self, rates: Rates) -> Tensor:
        """``u_i``, the perturbation of sample i's own output ``(m, k)``."""
        raise NotImplementedError

    def _own_velocity(self, rates: Rates) -> Tensor:
        """``du_i/dt`` without the injection, from contraction and decay ``(m, k)``."""
        raise NotImplementedError

    def _injection_rate(self, rates: Rates) -> Tensor:
        """Rate of injection into the own output ``(m, k)``: ``J_i P (∇ℓ_i − ∇ℓ') / n``."""
        raise NotImplementedError

    def perturbation(self, rates) -> float:
        """ε̄ (docs/theory.md §2): the U-statistic of the per-sample gradient covariance, over n."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def measure(self, dt: float, rates: Rates, steps: Optional[int] = None) -> GapEstimate:
        """Advance by ``dt`` with the previous rates, then read out with these rates.

        Args:
            dt: flow time since the previous measurement.
            rates: quantities at the current weights.
            steps: optimizer steps in the interval. When given, the parameter-space engine
                integrates the discrete optimizer map (see :class:`ParameterSpaceEngine`);
                ``None`` integrates the continuous flow.
        """
        if dt < 0:
            raise ValueError(f"dt must be non-negative, got {dt}.")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be a positive count of optimizer steps, got {steps}.")
        if self._pending is not None and dt > 0:
            self._advance(dt, self._pending, steps, rates)
        self.time += dt
        self._pending = rates
        return self._estimate(rates)

    def _estimate(self, rates: Rates) -> GapEstimate:
        out, y = rates.outputs.detach(), rates.targets
        u = self._own_outputs(rates).to(out.dtype)
        with torch.enable_grad():
            shifted = (out + u).requires_grad_(True)
            lp = self.loss(shifted, y)
            (r_shift,) = torch.autograd.grad(lp.sum(), shifted)
        g = (lp.detach() - self.loss(out, y)).detach()
        m = g.shape[0]
        mean = float(g.mean())
        se = float(g.std(unbiased=True) / math.sqrt(m)) if m > 1 else float("nan")
        inj = self._injection_rate(rates)
        eps = self.perturbation(rates)
        dgdt = float((r_shift * (self._own_velocity(rates) + inj)).sum(1).mean())
        scale = max(abs(eps) * max(self.time, 1e-12), 1e-12)
        contraction = (eps - dgdt) / mean if abs(mean) > 1e-6 * scale else float("nan")
        return GapEstimate(g, mean, se, eps, contraction, self.time)

    def state_dict(self) -> dict:
        return {"time": self.time, "pending": self._pending.fields() if self._pending else None}

    def load_state_dict(self, state: dict) -> None:
        self.time = float(state["time"])
        self._pending = Rates(**state["pending"]) if state["pending"] is not None else None


class ParameterSpaceEngine(_Engine):
    """Engine (a): per-sample perturbations ``δ_i`` in parameter or sketched coordinates.

    Args:
        config: engine settings.
        dim: D, the number of coordinates (P exact, s sketched).
        loss: per-sample loss on flattened outputs ``(m, k)``.

    State: ``delta`` of shape ``(m, D)``.

    Example:
        >>> cfg = EngineConfig(n_train=10, m=2)
        >>> eng = ParameterSpaceEngine(cfg, dim=3, loss=lambda f, y: 0.5 * ((f - y) ** 2).sum(1))
        >>> eng.delta.shape
        torch.Size([2, 3])
    """

    def __init__(self, config: EngineConfig, dim: int, loss: LossFn, *, dtype=torch.float32, device=None):
        super().__init__(config, loss)
        self.delta = torch.zeros(config.m, dim, dtype=dtype, device=device)
        # Reference row blocks of earlier measurements, (time, rows) oldest first; see reference_history.
        self._history: list = []
        # The same engine on the sketch folded to dim/2 and dim/4, and the last gap factor (sketch_extrapolation).
        self._folds: list = []
        self.extrapolation = 1.0
        if config.sketch_extrapolation:
            if dim % 4 or dim < 4:
                raise ValueError(f"sketch_extrapolation folds the sketch to a half and a quarter of its size: use a "
                                 f"sketch dimension divisible by 4 (got {dim}) or sketch_extrapolation=False.")
            plain = dataclasses.replace(config, sketch_extrapolation=False)
            self._folds = [ParameterSpaceEngine(plain, dim // f, loss, dtype=dtype, device=device) for f in (2, 4)]

    # rows Z and own rows z_i -------------------------------------------------------------------
    def _rows(self, rates: Rates) -> Tensor:
        if "rows" not in rates.cache:
            rates.cache["rows"] = self._build_rows(rates)
        return rates.cache["rows"]

    def _ref_block(self, rates: Rates) -> Optional[Tensor]:
        """The reference batch's rows ``sqrt(ref_weight/B)·Λ_b^{1/2} J_b`` ``(R_b, D)``, or ``None``."""
        if "ref_block" not in rates.cache:
            block = None
            if rates.ref_jac is not None and rates.ref_jac.shape[0] > 0:
                b, k, d = rates.ref_jac.shape
                # Rows sqrt(e) vᵀ J_b from Λ_b = V diag(e) Vᵀ. Directions with e below 1e-3 of the
                # batch's largest (always one for softmax cross-entropy, most of them for confident
                # predictions) carry almost no contraction and are dropped: R sets the O(R²·D) cost.
                e, v = linalg.eigh(rates.ref_hessian.to(self.delta.dtype))
                keep = e > 1e-3 * e.max().clamp(min=1e-30)
                rows = torch.einsum("bke,bkd->bed", v * e.clamp(min=0).sqrt().unsqueeze(1), rates.ref_jac.to(self.delta.dtype))
                block = rows[keep] * math.sqrt(rates.ref_weight / b)
            rates.cache["ref_block"] = block
        return rates.cache["ref_block"]

    def _build_rows(self, rates: Rates) -> Tensor:
        parts = []
        block = self._ref_block(rates)
        if block is not None:
            # This batch and the earlier ones (measured before this rates' time), weighted by
            # history_decay per step back and normalized: a smoothed estimate of the same H.
            earlier = [b for t, b in self._history if t < self.time][-(self.config.reference_history - 1):] \
                if self.config.reference_history > 1 else []
            blocks = earlier + [block]
            w = torch.tensor([self.config.history_decay ** a for a in range(len(blocks) - 1, -1, -1)], dtype=torch.float64)
            w = (w / w.sum()).tolist()
            parts.extend(bl.to(block.device) * math.sqrt(wi) for bl, wi in zip(blocks, w))
        own = self._own_rows(rates)
        parts.append(own.reshape(-1, own.shape[-1]))               # last: the own rows
        return torch.cat(parts).to(self.delta.dtype)

    def _own_rows(self, rates: Rates) -> Tensor:
        """``z_i = Λ_i^{1/2} J_i · sqrt(probe_weight / n)`` ``(m, k, D)`` (or ``c_i J_i``, ``(m, q, D)``)."""
        if "own" not in rates.cache:
            half = linalg.sqrt_psd(rates.hessian) if rates.own_cotangents is None else rates.own_cotangents
            half = half.to(self.delta.dtype)
            jac = rates.probe_jac.to(self.delta.dtype)
            rates.cache["own"] = (half @ jac) * math.sqrt(rates.probe_weight / self.config.n_train)
        return rates.cache["own"]

    def _grads(self, rates: Rates) -> Tensor:
        """Per-sample loss gradients ``J_iᵀ r_i`` ``(m, D)``, computed once per rates."""
        if "grads" not in rates.cache:
            rates.cache["grads"] = torch.einsum("ikd,ik->id", rates.probe_jac, rates.residual.to(rates.probe_jac.dtype))
        return rates.cache["grads"]

    def _injection(self, rates: Rates) -> Tensor:
        """``P (∇ℓ_i − ∇ℓ') / n`` ``(m, D)``."""
        grads = self._grads(rates)
        cfg = self.config
        if cfg.mode is Mode.REPLACE:
            if cfg.standin is Standin.HOLDOUT:
                if rates.standin_grad is None:
                    raise ValueError("Replace-one with a holdout needs rates.standin_grad.")
                grads = grads - rates.standin_grad
            else:
                m = grads.shape[0]
                grads = grads - (grads.sum(0, keepdim=True) - grads) / (m - 1)
        if rates.metric is not None:
            grads = grads * rates.metric
        return grads / cfg.n_train

    @staticmethod
    def _rank_k_update(d: Tensor, z: Tensor, metric: Optional[Tensor], gain) -> Tensor:
        """``P z_iᵀ Q_i diag(gain(e_i)) Q_iᵀ z_i d_i`` for rows ``z`` ``(m, k, D)``: a rank-k map per sample."""
        zp = z if metric is None else z * metric
        e, q = linalg.eigh(zp @ z.transpose(1, 2))                  # (m, k), (m, k, k)
        coef = torch.einsum("id,ikd->ik", d, z)
        coef = torch.einsum("ikl,il,ijl,ij->ik", q, gain(e.clamp(min=0)), q, coef)
        return torch.einsum("ik,ikd->id", coef, zp)

    def _advance(self, dt: float, rates: Rates, steps: Optional[int], end: Rates) -> None:
        """Advance every δ_i over ``dt``: ``δ_i = δ_i(0) + dt·inj_i + P Zᵀ Q b_i`` (see :func:`_integrate`).

        The D-dimensional state is touched twice per interval, whatever the number of sub-steps.
        """
        dtype = self.delta.dtype
        inj = self._injection(rates).to(dtype)
        inj_end = self._injection(end).to(dtype)
        metric = None if rates.metric is None else rates.metric.to(dtype)
        rows, own = self._interval_rows(rates, end)                 # (R, D), own rows (m, k, D)
        zp = rows if metric is None else rows * metric
        e, q = linalg.eigh(zp @ rows.T)                             # (R,), (R, R)
        e = e.clamp(min=0)
        m, k, _ = own.shape                                         # k here: own rows per sample
        q_own = q[rows.shape[0] - m * k:].reshape(m, k, -1)         # Q rows of each own row, (m, k, R)
        a = (self.delta @ rows.T) @ q                               # (m, R)
        b, w = _integrate(a, (inj @ rows.T) @ q, (inj_end @ rows.T) @ q, e, q_own, dt, steps)
        d = self.delta + dt * ((1 - w) * inj + w * inj_end) + (b @ q.T) @ zp
        if rates.standin_jac is not None:
            # A paired stand-in z'_i is in the training set of run i: it contracts δ_i too.
            zs = (linalg.sqrt_psd(rates.standin_hessian) @ rates.standin_jac).to(dtype) / math.sqrt(self.config.n_train)
            if steps is None:
                gain = lambda ev: -linalg.decay_integral(ev, dt)
            else:
                h = dt / steps
                gain = lambda ev: ((1 - (h * ev).clamp(max=2.0)) ** steps - 1) / torch.where(ev > 0, ev, torch.ones_like(ev)) * (ev > 0) - dt * (ev <= 0)
            d = d + self._rank_k_update(self.delta, zs, metric, gain)
        if rates.decay is not None:
            d = d * torch.exp(-dt * torch.as_tensor(rates.decay, dtype=dtype, device=d.device))
        self.delta = d

    def _interval_rows(self, rates: Rates, end: Rates):
        """Contraction rows of an interval and the own rows among them (last, sample-major).

        ``"left"``: the rows at the interval's start. ``"trapezoid"``: both ends' rows, each
        weighted 1/2, so the exponent is ``dt·(H_start + H_end)/2`` (second order in dt where H
        moves, as it does fast early in training); sample i's own rows at both ends are excluded.
        """
        rows, own = self._rows(rates), self._own_rows(rates)
        if self.config.contraction == "left" or end is rates:
            return rows, own
        own_end = self._own_rows(end)
        if own_end.shape != own.shape:
            return rows, own
        half = math.sqrt(0.5)
        ref_start = rows[: rows.shape[0] - own.shape[0] * own.shape[1]]
        ref_end = self._ref_block(end)
        both = torch.cat([own, own_end.to(own.dtype)], 1) * half
        parts = [ref_start * half] + ([] if ref_end is None else [ref_end.to(rows.dtype) * half])
        return torch.cat(parts + [both.reshape(-1, both.shape[-1])]), both

    def measure(self, dt: float, rates: Rates, steps: Optional[int] = None) -> GapEstimate:
        """See :meth:`_Engine.measure`. With ``sketch_extrapolation`` the gaps are scaled by the factor
        of :func:`sketch_extrapolation_factor` from the mean gaps at s, s/2 and s/4.

        Why: a count-sketch aliases every coordinate onto the rows' directions, so the sketched
        contraction also removes a share of the perturbation that no other sample contracts: the
        gap comes out low by a factor ≈ exp(−c/s^α) that grows with training time (SGD MLP,
        t = 300: 0.74 at s = 256, 0.93 at s = 1024, 0.985 at s = 4096). The folded sketches
        (:func:`fold_rates`) cost no Jacobians; extrapolating the three means to s = ∞ removes
        most of it (``tests/test_engine_loo.py``).
        """
        est = super().measure(dt, rates, steps)
        if self._folds:
            means = [est.mean] + [f.measure(dt, fold_rates(rates, f.delta.shape[1]), steps).mean for f in self._folds]
            self.extrapolation = rho = sketch_extrapolation_factor(*means)
            est = dataclasses.replace(est, per_sample=est.per_sample * rho, mean=est.mean * rho, se=est.se * rho)
        if self.config.reference_history > 1:
            block = self._ref_block(rates)
            if block is not None:
                # Kept: the pending batch and the L − 1 before it, so that its rows can be rebuilt.
                self._history = (self._history + [(self.time, block)])[-self.config.reference_history:]
        return est

    def _own_outputs(self, rates: Rates) -> Tensor:
        return torch.einsum("ikd,id->ik", rates.probe_jac.to(self.delta.dtype), self.delta)

    def _own_velocity(self, rates: Rates) -> Tensor:
        rows = self._rows(rates)
        z = self._own_rows(rates).to(self.delta.dtype)
        h = (self.delta @ rows.T) @ rows - torch.einsum("ikd,id,ikf->if", z, self.delta, z)
        if rates.metric is not None:
            h = h * rates.metric.to(h.dtype)
        if rates.decay is not None:
            h = h + torch.as_tensor(rates.decay, dtype=h.dtype, device=h.device) * self.delta
        return -torch.einsum("ikd,id->ik", rates.probe_jac.to(h.dtype), h)

    def _injection_rate(self, rates: Rates) -> Tensor:
        inj = self._injection(rates).to(self.delta.dtype)
        return torch.einsum("ikd,id->ik", rates.probe_jac.to(inj.dtype), inj)

    def perturbation(self, rates: Rates) -> float:
        """ε̄ from these rates' per-sample gradients (docs/theory.md §2)."""
        standin = rates.standin_grad if self.config.standin is Standin.HOLDOUT else None
        return perturbation_factor(self._grads(rates), rates.metric, self.config.n_train, standin)

    def state_dict(self) -> dict:
        out = {**super().state_dict(), "delta": self.delta.clone(),
               "history": [(t, b.clone()) for t, b in self._history]}
        if self._folds:
            out.update(folds=[f.state_dict() for f in self._folds], extrapolation=self.extrapolation)
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.delta = state["delta"].clone().to(self.delta.device)
        self._history = [(float(t), b.clone().to(self.delta.device)) for t, b in state.get("history", [])]
        if self._folds:
            if "folds" not in state:
                raise ValueError("This state has no folded-sketch engines: it was saved with sketch_extrapolation off.")
            for f, st in zip(self._folds, state["folds"]):
                f.load_state_dict(st)
            self.extrapolation = float(state["extrapolation"])


@dataclasses.dataclass
class KernelRates:
    """Function-space rates on the probe.

    Attributes:
        outputs ``(m, k)``, targets ``(m, ...)``, residual ``(m, k)``, hessian ``(m, k, k)``.
        theta: the probe NTK in the optimizer metric ``(m, k, m, k)``.
        decay: scalar weight-decay rate.
        standin_cross: ``Θ_{P,h} r_h`` for a holdout stand-in: averaged ``(m, k)``, or paired with
            the probe samples ``(m, k, m)`` (column i for probe sample i).
    """

    outputs: Tensor
    targets: Tensor
    residual: Tensor
    hessian: Tensor
    theta: Tensor
    decay: Optional[float] = None
    standin_cross: Optional[Tensor] = None


class FunctionSpaceEngine(_Engine):
    """Engine (b): perturbations of all probe outputs, one column per left-out sample.

    State ``U`` of shape ``(m, k, m)``: ``U[:, :, i]`` is the perturbation of every probe output
    caused by leaving out (or replacing) sample i. Contraction is the Monte-Carlo estimate
    ``(1/m) Σ_{j ∈ probe, j ≠ i} Θ_{:,j} Λ_j u_j``, exact when the probe is the training set.
    """

    def __init__(self, config: EngineConfig, k: int, loss: LossFn, *, dtype=torch.float32, device=None):
        super().__init__(config, loss)
        self.u = torch.zeros(config.m, k, config.m, dtype=dtype, device=device)

    def _injection_cols(self, rates: KernelRates) -> Tensor:
        """Injection rate into every probe output, per column i: ``(m, k, m)``."""
        cfg = self.config
        theta = rates.theta.to(self.u.dtype)
        r = rates.residual.to(self.u.dtype)
        cols = torch.einsum("ajib,ib->aji", theta, r)               # Θ_{:,i} r_i
        if cfg.mode is Mode.REPLACE:
            if cfg.standin is Standin.HOLDOUT:
                if rates.standin_cross is None:
                    raise ValueError("Replace-one with a holdout needs rates.standin_cross.")
                cross = rates.standin_cross.to(cols.dtype)
                cols = cols - (cross if cross.dim() == 3 else cross.unsqueeze(2))
            else:
                m = cols.shape[2]
                cols = cols - (cols.sum(2, keepdim=True) - cols) / (m - 1)
        return cols / cfg.n_train

    def _advance(self, dt: float, rates: KernelRates, steps: Optional[int], end: KernelRates) -> None:
        """``u^(i) = u^(i)(0) + dt·inj^(i) + w Θ L Q b_i`` with ``Q diag(e) Qᵀ = w Lᵀ Θ L``, Λ = L Lᵀ."""
        m, k, _ = self.u.shape
        w = 1.0 / m
        theta = rates.theta.to(self.u.dtype).reshape(m * k, m * k)
        lower = torch.block_diag(*linalg.sqrt_psd(rates.hessian.to(self.u.dtype)))   # (mk, mk)
        tl = theta @ lower
        e, q = linalg.eigh(w * lower.T @ tl)
        e = e.clamp(min=0)
        u = self.u.reshape(m * k, m).T                              # (m columns, mk)
        inj = self._injection_cols(rates).reshape(m * k, m).T
        inj_end = self._injection_cols(end).reshape(m * k, m).T
        q_own = q.reshape(m, k, m * k)                              # own block of column i
        b, wt = _integrate((u @ lower) @ q, (inj @ lower) @ q, (inj_end @ lower) @ q, e, q_own, dt, steps)
        u = u + dt * ((1 - wt) * inj + wt * inj_end) + w * (b @ q.T) @ tl.T
        if rates.decay:
            u = u * math.exp(-dt * float(rates.decay))
        self.u = u.T.reshape(m, k, m)

    def _own_outputs(self, rates: KernelRates) -> Tensor:
        return self.u.diagonal(dim1=0, dim2=2).T                    # (m, k): U[i, :, i]

    def _own_velocity(self, rates: KernelRates) -> Tensor:
        m, k, _ = self.u.shape
        theta = rates.theta.to(self.u.dtype)
        lam = rates.hessian.to(self.u.dtype)
        lu = torch.einsum("jkl,jli->jki", lam, self.u)              # Λ_j u_j^(i)
        mask = 1 - torch.eye(m, dtype=self.u.dtype)
        vel = -torch.einsum("ikjl,jli,ji->ik", theta, lu, mask) / m  # own output, others' contraction
        if rates.decay:
            vel = vel - float(rates.decay) * self._own_outputs(rates)
        return vel

    def _injection_rate(self, rates: KernelRates) -> Tensor:
        return self._injection_cols(rates).diagonal(dim1=0, dim2=2).T

    def perturbation(self, rates: KernelRates) -> float:
        r = rates.residual.to(self.u.dtype)
        gram = torch.einsum("ia,iajb,jb->ij", r, rates.theta.to(r.dtype), r)     # G_ij
        m = gram.shape[0]
        diag = gram.diagonal().mean()
        if self.config.standin is Standin.HOLDOUT and rates.standin_cross is not None:
            sc = rates.standin_cross.to(r.dtype)
            cross = (r * (sc.mean(2) if sc.dim() == 3 else sc)).sum(1).mean()
        elif m > 1:
            cross = (gram.sum() - gram.diagonal().sum()) / (m * (m - 1))
        else:
            return float("nan")
        return float((diag - cross) / self.config.n_train)

    def state_dict(self) -> dict:
        # KernelRates has no cache to leave out: all of its fields are its state.
        pending = None if self._pending is None else dataclasses.asdict(self._pending)
        return {"time": self.time, "pending": pending, "u": self.u.clone()}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        pending = state.get("pending")
        self.time = float(state["time"])
        self._pending = KernelRates(**pending) if pending is not None else None
        self.u = state["u"].clone().to(self.u.device)
