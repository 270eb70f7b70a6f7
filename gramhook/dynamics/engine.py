"""Per-sample generalization-gap engines (THEORY §2–§3). Pure tensor code.

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
The engine first advances the state over the elapsed interval with the rates of the *previous*
measurement (left endpoint, which makes every-step cadence match discrete gradient descent),
then reads out through the current Jacobian. Over an interval ``Δt`` it applies, in this order,
half the injection, the A-stable low-rank exponential of the contraction, the exact restoration
of the own-sample term, the weight decay, and the other half of the injection (Strang splitting).

Contraction operator. Rows ``Z`` stack ``sqrt(w)·Λ_j^{1/2} J_j`` for the reference batch (weight
``w = ref_weight/B`` each) and, when ``probe_rows`` is set, for the probe samples (weight 1/n
each). With ``Q diag(e) Qᵀ = Z P Zᵀ``:
  ``exp(−Δt P ZᵀZ) δ = δ − P Zᵀ Q diag((1 − e^{−Δt e})/e) Qᵀ Z δ``.
The own sample's share ``(1/n) J_iᵀ Λ_i J_i`` of that operator is then undone exactly with the
rank-k exponential ``exp(+Δt (1/n) P J_iᵀ Λ_i J_i)``; the own sample must never contract its own
perturbation (THEORY §3, "the exclusion is essential").
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

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
    "expm_lowrank_apply",
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
        probe_rows: include the probe samples' rows (weight 1/n) in the contraction. Set it when
            the reference batches exclude the probe (they then stand for the other n − m
            samples) or when there are none (probe = training set).
    """

    n_train: int
    m: int
    mode: Mode = Mode.LOO
    standin: Standin = Standin.PROBE
    probe_rows: bool = False

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
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def fields(self) -> dict:
        """The defining tensors (for ``state_dict``), without the engine's cache."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cache"}


@dataclasses.dataclass
class GapEstimate:
    """One measurement of the engine.

    Attributes:
        per_sample: ``g_i`` ``(m,)``.
        mean: ḡ; ``se``: its standard error ``std(g)/sqrt(m)``.
        perturbation: ε̄ (THEORY §2); contraction: c̄, ``nan`` where ḡ is too small.
        time: the flow time of the measurement.
    """

    per_sample: Tensor
    mean: float
    se: float
    perturbation: float
    contraction: float
    time: float


def _eigh(mat: Tensor) -> tuple:
    """``eigh`` in float64 (much faster and more accurate than float32 LAPACK on CPU here)."""
    e, v = torch.linalg.eigh(mat.double())
    return e.to(mat.dtype), v.to(mat.dtype)


def _sqrt_psd(mat: Tensor) -> Tensor:
    """Symmetric square root of a batch of PSD matrices ``(..., k, k)``."""
    e, v = _eigh(mat)
    return (v * e.clamp(min=0).sqrt().unsqueeze(-2)) @ v.transpose(-1, -2)


def _phi(e: Tensor, dt: float) -> Tensor:
    """``(1 − exp(−dt e))/e``, continuous at ``e = 0``."""
    small = (dt * e).abs() < 1e-8
    safe = torch.where(small, torch.ones_like(e), e)
    return torch.where(small, dt * (1 - 0.5 * dt * e), -torch.expm1(-dt * safe) / safe)


def _psi(e: Tensor, dt: float, cap: float = 30.0) -> Tensor:
    """``(exp(dt e) − 1)/e``, with the exponent capped to keep splitting stable."""
    small = (dt * e).abs() < 1e-8
    safe = torch.where(small, torch.ones_like(e), e)
    return torch.where(small, dt * (1 + 0.5 * dt * e), torch.expm1((dt * safe).clamp(max=cap)) / safe)


def expm_lowrank_apply(state: Tensor, rows: Tensor, metric: Optional[Tensor], dt: float) -> Tensor:
    """Apply ``exp(−dt P ZᵀZ)`` to each row of ``state`` without forming a D×D matrix.

    Args:
        state: ``(m, D)``, one vector per row.
        rows: ``Z`` ``(R, D)``.
        metric: diagonal of P ``(D,)`` or ``None``.

    Returns:
        ``(m, D)``.
    """
    if rows.shape[0] == 0:
        return state
    zp = rows if metric is None else rows * metric
    e, q = _eigh(zp @ rows.T)                 # (R,), (R, R)
    e = e.clamp(min=0)
    coef = ((state @ rows.T) @ q) * _phi(e, dt)           # (m, R)
    return state - (coef @ q.T) @ zp


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


class _Engine:
    """Shared measurement logic: left-endpoint stepping, readout, ε̄ and c̄."""

    def __init__(self, config: EngineConfig, loss: LossFn):
        self.config = config
        self.loss = loss
        self.time = 0.0
        self._pending: Optional[Rates] = None

    # -- to be provided by an engine ---------------------------------------------------------
    def _advance(self, dt: float, rates: Rates, steps: Optional[int]) -> None:
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
        """ε̄ (THEORY §2): the U-statistic of the per-sample gradient covariance, over n."""
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
            self._advance(dt, self._pending, steps)
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
        >>> cfg = EngineConfig(n_train=10, m=2, probe_rows=True)
        >>> eng = ParameterSpaceEngine(cfg, dim=3, loss=lambda f, y: 0.5 * ((f - y) ** 2).sum(1))
        >>> eng.delta.shape
        torch.Size([2, 3])
    """

    def __init__(self, config: EngineConfig, dim: int, loss: LossFn, *, dtype=torch.float32, device=None):
        super().__init__(config, loss)
        self.delta = torch.zeros(config.m, dim, dtype=dtype, device=device)

    # rows Z and own rows z_i -------------------------------------------------------------------
    def _rows(self, rates: Rates) -> Tensor:
        if "rows" not in rates.cache:
            rates.cache["rows"] = self._build_rows(rates)
        return rates.cache["rows"]

    def _build_rows(self, rates: Rates) -> Tensor:
        parts = []
        if rates.ref_jac is not None and rates.ref_jac.shape[0] > 0:
            b, k, d = rates.ref_jac.shape
            # Rows sqrt(e) vᵀ J_b from Λ_b = V diag(e) Vᵀ; directions with e ≈ 0 (always one for
            # softmax cross-entropy, most of them for confident predictions) carry no contraction.
            e, v = _eigh(rates.ref_hessian.to(self.delta.dtype))
            keep = e > 1e-6 * e.max().clamp(min=1e-30)
            rows = torch.einsum("bke,bkd->bed", v * e.clamp(min=0).sqrt().unsqueeze(1), rates.ref_jac.to(self.delta.dtype))
            parts.append(rows[keep] * math.sqrt(rates.ref_weight / b))
        if self.config.probe_rows:
            m, k, d = rates.probe_jac.shape
            parts.append(self._own_rows(rates).reshape(m * k, d))
        if not parts:
            return rates.probe_jac.new_zeros(0, rates.probe_jac.shape[2])
        return torch.cat(parts).to(self.delta.dtype)

    def _own_rows(self, rates: Rates) -> Tensor:
        """``z_i = Λ_i^{1/2} J_i / sqrt(n)`` ``(m, k, D)``."""
        if "own" not in rates.cache:
            half = _sqrt_psd(rates.hessian).to(self.delta.dtype)
            jac = rates.probe_jac.to(self.delta.dtype)
            rates.cache["own"] = (half @ jac) / math.sqrt(self.config.n_train)
        return rates.cache["own"]

    def _grads(self, rates: Rates) -> Tensor:
        """Per-sample loss gradients ``J_iᵀ r_i`` ``(m, D)``."""
        return torch.einsum("ikd,ik->id", rates.probe_jac, rates.residual.to(rates.probe_jac.dtype))

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

    def _decay_factor(self, rates: Rates, dt: float):
        if rates.decay is None:
            return None
        return torch.exp(-dt * torch.as_tensor(rates.decay, dtype=self.delta.dtype, device=self.delta.device))

    def _own_restore(self, rates: Rates, d: Tensor, metric: Optional[Tensor], gain, z: Optional[Tensor] = None) -> Tensor:
        """``(R_i − I) d_i`` with ``R_i = P z_iᵀ Q_i diag(gain(e_i)) Q_iᵀ z_i``, rank k per sample."""
        z = self._own_rows(rates) if z is None else z              # (m, k, D)
        zp = z if metric is None else z * metric
        e, q = _eigh(zp @ z.transpose(1, 2))            # (m, k), (m, k, k)
        coef = torch.einsum("id,ikd->ik", d, z)
        coef = torch.einsum("ikl,il,ijl,ij->ik", q, gain(e.clamp(min=0)), q, coef)
        return torch.einsum("ik,ikd->id", coef, zp)

    def _advance(self, dt: float, rates: Rates, steps: Optional[int]) -> None:
        inj = self._injection(rates).to(self.delta.dtype)
        metric = None if rates.metric is None else rates.metric.to(self.delta.dtype)
        if steps is None:
            d = self.delta + 0.5 * dt * inj
            d = expm_lowrank_apply(d, self._rows(rates), metric, dt)
            d = d + self._own_restore(rates, d, metric, lambda e: _psi(e, dt))
            standin_gain = lambda e: -_phi(e, dt)
            tail = 0.5 * dt * inj
        else:
            d, tail = self._discrete(dt, steps, rates, inj, metric)
            h = dt / steps
            standin_gain = lambda e: ((1 - (h * e).clamp(max=2.0)) ** steps - 1) / torch.where(e > 0, e, torch.ones_like(e)) * (e > 0) - steps * h * (e <= 0)
        if rates.standin_jac is not None:
            # A paired stand-in z'_i is in the training set of run i: it contracts δ_i.
            zs = (_sqrt_psd(rates.standin_hessian) @ rates.standin_jac).to(d.dtype) / math.sqrt(self.config.n_train)
            d = d + self._own_restore(rates, d, metric, standin_gain, z=zs)
        factor = self._decay_factor(rates, dt)
        if factor is not None:
            d = d * factor
        self.delta = d + tail

    def _discrete(self, dt: float, steps: int, rates: Rates, inj: Tensor, metric: Optional[Tensor]):
        """N steps of the optimizer map ``δ ← (I − hP H_{S∖i}) δ + h·inj``, ``h = dt/N``.

        In the eigenbasis of ``Z P Zᵀ`` the N-step factor is ``(1 − h e)^N``; ``h e`` is capped at 2
        (the edge of stability, where a real optimizer stops contracting a direction). The own
        sample's share is removed exactly for N = 1 and by a multiplicative split for N > 1.
        The injected term is the exact discrete sum ``Σ_s (I − hPH)^s h·inj``.
        """
        h = dt / steps
        rows = self._rows(rates)
        zp = rows if metric is None else rows * metric
        e, q = _eigh(zp @ rows.T)
        x = (h * e).clamp(min=0.0, max=2.0)
        mult = (1 - x) ** steps
        safe = torch.where(x > 1e-12, e, torch.ones_like(e))
        coef = torch.where(x > 1e-12, (1 - mult) / safe, steps * h * torch.ones_like(e))  # f(e)
        old = self.delta
        d = old - (((old @ rows.T) @ q) * coef) @ q.T @ zp
        total = steps * h
        extra = torch.where(x > 1e-12, (coef - total) / safe, -0.5 * steps * (steps - 1) * h * h * torch.ones_like(e))
        tail = total * inj + (((inj @ rows.T) @ q) * extra) @ q.T @ zp
        gain = lambda ev: ((1 + h * ev).clamp(max=math.exp(30.0 / steps)) ** steps - 1) / torch.where(ev > 0, ev, torch.ones_like(ev)) * (ev > 0) + steps * h * (ev <= 0)
        base = old if steps == 1 else d
        return d + self._own_restore(rates, base, metric, gain), tail

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
        """ε̄ from these rates' per-sample gradients (THEORY §2)."""
        standin = rates.standin_grad if self.config.standin is Standin.HOLDOUT else None
        return perturbation_factor(self._grads(rates), rates.metric, self.config.n_train, standin)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "delta": self.delta.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.delta = state["delta"].clone().to(self.delta.device)


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

    def _advance(self, dt: float, rates: KernelRates, steps: Optional[int]) -> None:
        m, k, _ = self.u.shape
        w = 1.0 / m
        theta = rates.theta.to(self.u.dtype).reshape(m * k, m * k)
        half = _sqrt_psd(rates.hessian.to(self.u.dtype))            # (m, k, k)
        lower = torch.block_diag(*half)                             # L with Λ = L Lᵀ
        inj = self._injection_cols(rates).reshape(m * k, m)
        u = self.u.reshape(m * k, m) + 0.5 * dt * inj
        # exp(−dt w Θ L Lᵀ) = I − Θ L Q φ Qᵀ Lᵀ w   (push-through with Q e Qᵀ = w Lᵀ Θ L)
        tl = theta @ lower
        e, q = _eigh(w * lower.T @ tl)
        u = u - w * tl @ (q * _phi(e.clamp(min=0), dt)) @ q.T @ (lower.T @ u)
        # Undo own-sample contraction per column: exp(+dt w Θ_{:,i} L_i L_iᵀ E_iᵀ).
        tl_cols = tl.reshape(m * k, m, k)                           # Θ_{:,i} L_i
        own = torch.einsum("ilk,il->ik", half, u.reshape(m, k, m).diagonal(dim1=0, dim2=2).T)  # L_iᵀ u_i
        blk = torch.stack([half[i].T @ rates.theta.to(u.dtype)[i, :, i, :] @ half[i] for i in range(m)])
        e2, q2 = _eigh(w * blk)
        coef = torch.einsum("ikl,il,ijl,ij->ik", q2, _psi(e2.clamp(min=0), dt), q2, own)
        u = u + w * torch.einsum("aik,ik->ai", tl_cols, coef)
        if rates.decay:
            u = u * math.exp(-dt * float(rates.decay))
        self.u = (u + 0.5 * dt * inj).reshape(m, k, m)

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
        return {**super().state_dict(), "u": self.u.clone()}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        pending = state.get("pending")
        self.time = float(state["time"])
        self._pending = KernelRates(**pending) if pending is not None else None
        self.u = state["u"].clone().to(self.u.device)
