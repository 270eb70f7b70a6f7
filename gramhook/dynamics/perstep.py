"""Per-step (cadence-free) coupled leave-one-out engine (docs/theory.md §9). Pure tensor code.

For every probe sample i the engine follows ``δ_i = w^(−i) − w``, the first-order difference
between the run without z_i and the real run, at the resolution of the optimizer's own steps:

.. math::
    δg_i = H_{B_t∖i} δ_i + [i ∈ B_t] (ḡ_{B_t} − ∇ℓ_i)/(B − 1), \\qquad
    ν_i ← μ ν_i + a·δg_i, \\qquad δ_i ← σ δ_i − η·\\mathrm{dir}(ν_i, δg_i)

with the optimizer's own buffer rule (SGD heavy-ball, dampening and Nesterov; Adam's first
moment with bias correction) and its decay (σ). ``H_{B∖i}`` is estimated from sampled
contraction rows ``z_j = c_jᵀ J_j`` of the trained batch (``E[c cᵀ] = Λ_j``), and sample i's own
row is excluded exactly. A measurement only *reads out*: ``u_i = J_i δ_i`` and
``g_i = ℓ(f_i + u_i) − ℓ(f_i)``; nothing is integrated there, so readout cadence does not enter.

Coordinates. The state lives in whitened coordinates ``y = P^{-1/2} δ`` (exact, dimension P) or
their count-sketch ``Sᵀ P^{-1/2} δ`` (dimension s). Rows and injections come in as
``P^{1/2}``-weighted vectors, so a step is ``y ← σ y − η·dir`` with ``δg = Σ_r ẑ_r (ẑ_r·y)``, and a
readout is ``u_i = ĵ_iᵀ y_i`` with the same weighting. P is taken at the step (Adam reads its
current ``v̂``); between steps the coordinates follow it, which treats P as slowly varying.

Cost. The state is kept as it is, ``δ`` ``(m, D)`` and the optimizer-buffer perturbation ``ν``
``(m, D)``, updated in place at every step: one ``(m, D) × (D, R)`` product for the projections
``⟨δ_i, z_r⟩``, one ``(m, R) × (R, D)`` product for ``δg``, and a few elementwise passes, about
``2·m·D·R`` multiply-adds per step (the injections are row additions).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .linalg import decay_integral, eigh

LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["StepRule", "PerStepEngine"]


@dataclasses.dataclass(frozen=True)
class StepRule:
    """How one optimizer step moves the weights, read from the optimizer at that step.

    Attributes:
        kind: ``"sgd"``, ``"adam"`` or ``"nadam"`` (Adam's first moment; the step mixes it with
            the gradient: ``bias_correction·ν + grad_weight·δg``).
        lr: η, the first trained group's learning rate (other groups are folded into P).
        momentum: μ (SGD) or β₁ (Adam).
        dampening: SGD's dampening d.
        nesterov: SGD's Nesterov flag.
        first: SGD: the momentum buffer is empty before this step (torch then sets buf = g).
        bias_correction: Adam's ``1/(1 − β₁^t)`` at this step; NAdam's weight of the first moment.
        grad_weight: NAdam's weight of this step's gradient in its update.
        shrink: σ, the multiplicative decay of the weights this step: ``1 − η·λ`` for decoupled
            weight decay; coupled decay is folded in as ``1 − η·λ/(1 − μ)``.
    """

    kind: str
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    first: bool = False
    bias_correction: float = 1.0
    shrink: float = 1.0
    grad_weight: float = 0.0

    def __post_init__(self):
        if self.kind not in ("sgd", "adam", "nadam"):
            raise ValueError(f"kind must be 'sgd', 'adam' or 'nadam', got {self.kind!r}")

    @property
    def inflow(self) -> float:
        """Weight of this step's δg in the optimizer buffer."""
        if self.kind in ("adam", "nadam"):
            return 1.0 - self.momentum
        return 1.0 if (self.first or self.momentum == 0) else 1.0 - self.dampening

    def direction(self, nu: Tensor, dg: Optional[Tensor]) -> Optional[Tensor]:
        """This step's update direction from the buffer ``nu`` (after this step's decay and
        inflow) and this step's ``dg`` (``None``: zero); ``None`` when it is zero."""
        if self.kind == "adam":
            return nu * self.bias_correction
        if self.kind == "nadam":
            out = nu * self.bias_correction
            return out if dg is None else out.add_(dg, alpha=self.grad_weight)
        if self.momentum == 0:
            return dg
        if self.nesterov:
            return nu * self.momentum if dg is None else torch.add(dg, nu, alpha=self.momentum)
        return nu


class PerStepEngine:
    """Coupled leave-one-out perturbations of m probe samples, advanced once per optimizer step.

    Args:
        m: probe samples.
        dim: D, the coordinates (parameters, or the sketch size).
        dtype, device: of the state.

    Attributes:
        y: ``(m + 1, D)``, the perturbations δ_i (rows ``0..m−1``) and the stability sentinel (row m).
        nu: ``(m + 1, D)``, their optimizer-buffer perturbations ν_i.

    Example:
        >>> eng = PerStepEngine(2, 3)
        >>> rows = torch.tensor([[1.0, 0.0, 0.0]])
        >>> inj = torch.tensor([[0.0, 1.0, 0.0]])
        >>> eng.step(StepRule("sgd", lr=0.1), rows, torch.tensor([-1]), torch.tensor([0]), inj)
        >>> eng.delta()[0]
        tensor([ 0.0000, -0.1000,  0.0000])
    """

    def __init__(self, m: int, dim: int, *, dtype=torch.float32, device=None):
        if m < 1 or dim < 1:
            raise ValueError(f"PerStepEngine needs m ≥ 1 and dim ≥ 1, got m={m}, dim={dim}.")
        self.m, self.dim = m, dim
        # Row m is the sentinel: a unit perturbation that is contracted like every δ_i but never
        # injected. It cannot grow while the first-order dynamics is stable (:meth:`growth`).
        self.y = torch.zeros(m + 1, dim, dtype=dtype, device=device)
        self.nu = torch.zeros(m + 1, dim, dtype=dtype, device=device)
        unit = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.y[m] = (unit / unit.norm()).to(dtype)
        self.smallest = 1.0                                           # the sentinel's smallest norm
        self.seeded = False                                           # pointed along the first injections
        self.steps = 0
        self.injections = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.y.dtype

    def stacked(self) -> Tensor:
        """``(2, m + 1, D)``: δ and ν in one tensor (what data-parallel ranks sum)."""
        return torch.stack([self.y, self.nu])

    # -- the step -------------------------------------------------------------------------------
    def project(self, vectors: Tensor) -> Tensor:
        """``⟨δ_i, v_r⟩`` for every row (the m probe samples and the sentinel) and vector,
        ``(m + 1, R)``, from ``vectors`` ``(R, D)``."""
        return self.y @ vectors.to(self.y.dtype).T

    def step(self, rule: StepRule, rows: Optional[Tensor], owner: Optional[Tensor],
             inj_idx: Optional[Tensor] = None, inj: Optional[Tensor] = None, batch: Optional[int] = None,
             saturate: bool = False) -> None:
        """Advance every δ_i by one optimizer step.

        Args:
            rule: the step's update rule.
            rows: contraction rows ``(R, D)``, ``P^{1/2}``-weighted and scaled so that
                ``Σ_r z_r z_rᵀ`` estimates ``P^{1/2} H_B P^{1/2}`` (or ``None``: no contraction).
            owner: ``(R,)`` the probe sample each row belongs to, −1 for others: that sample's own
                row is excluded from its own contraction.
            inj_idx: ``(q,)`` probe samples trained in this step's batch.
            inj: ``(q, D)`` their injections ``P^{1/2}(ḡ_B − ∇ℓ_i)/(B − 1)``.
            batch: B. Run i averages its batch over the B − 1 others, so the contraction of the
                samples in ``inj_idx`` is scaled by ``B/(B − 1)``.
            saturate: the rows are a subsample of the batch, each standing for B/R samples. Their
                operator ``ZᵀZ`` is replaced by ``Zᵀ M Z``, ``M = Q diag(φ(e)/e) Qᵀ``, with
                ``φ(e) = (1 − exp(−η e))/η`` (``Q diag(e) Qᵀ = Z Zᵀ``): the same to first order in
                ηe, but a kick never removes more than the component it acts on. Without it, the
                curvature of nearly orthogonal per-sample gradients is inflated B/R-fold and the
                momentum recursion can leave its stability region (η e > 2(1 + μ)).
        """
        dtype, device = self.y.dtype, self.y.device
        if not self.seeded and inj is not None and inj.shape[0] > 0:
            self._seed_sentinel(inj)
        dg = None
        if rows is not None and rows.shape[0] > 0:
            rows = rows.to(dtype)
            own = None if owner is None else owner.to(device)
            mine = torch.zeros(rows.shape[0], dtype=torch.bool, device=device) if own is None else own >= 0
            full = self.project(rows)                                  # (m + 1, R): ⟨δ_i, z_r⟩
            # δg_i = Σ_r coef[i, r] z_r; with saturation the operator is Zᵀ M Z.
            owned = torch.nonzero(mine).squeeze(1)
            ops = self._saturation(rows, rule.lr, owned) if saturate else None     # (1 + q, R, R)
            coef = full @ ops[0] if saturate else full.clone()
            for j, r in enumerate(owned.tolist()):
                # A probe sample that owns a row contracts with the other rows only.
                who = int(own[r])
                others = full[who].clone()
                others[r] = 0.0
                coef[who] = others @ ops[1 + j] if saturate else others
            if batch is not None and batch > 1 and inj_idx is not None and inj_idx.numel() > 0:
                coef[inj_idx.to(device)] *= batch / (batch - 1)
            dg = coef @ rows                                           # (m + 1, D)
        if inj_idx is not None and inj_idx.numel() > 0:
            if dg is None:
                dg = torch.zeros_like(self.y)
            dg.index_add_(0, inj_idx.to(device), inj.to(dtype))
            self.injections += int(inj_idx.numel())
        self.nu.mul_(rule.momentum)
        if dg is not None:
            self.nu.add_(dg, alpha=rule.inflow)
        direction = rule.direction(self.nu, dg)
        if rule.shrink != 1.0:
            self.y.mul_(rule.shrink)
        if direction is not None:
            self.y.add_(direction, alpha=-rule.lr)
        self.steps += 1

    @staticmethod
    def _saturation(z: Tensor, lr: float, without: Optional[Tensor] = None) -> Tensor:
        """``M = Q diag(φ(e)/e) Qᵀ`` ``(1 + q, R, R)`` with ``Q diag(e) Qᵀ = z zᵀ``: the saturated
        operator is ``zᵀ M z`` (see :meth:`step`); ``M = I`` to first order in ``η e``. Entry
        ``1 + j`` leaves row ``without[j]`` out (its row and column of ``z zᵀ`` zeroed: there ``M``
        is the identity, and on the other rows it is their own saturation), in one batched
        eigendecomposition."""
        gram = (z @ z.T).double()
        if without is not None and without.numel():
            keep = torch.ones(without.numel(), z.shape[0], dtype=gram.dtype, device=gram.device)
            keep[torch.arange(without.numel(), device=gram.device), without.to(gram.device)] = 0.0
            masked = gram.unsqueeze(0) * keep.unsqueeze(2) * keep.unsqueeze(1)
            gram = torch.cat([gram.unsqueeze(0), masked])
        else:
            gram = gram.unsqueeze(0)
        e, q = eigh(gram)
        # (1 − exp(−ηe))/(ηe); 1 where η = 0 (a schedule at zero).
        ratio = decay_integral(e.clamp(min=0), lr) / lr if lr > 0 else torch.ones_like(e)
        return ((q * ratio.unsqueeze(1)) @ q.transpose(1, 2)).to(z.dtype)

    # -- readout --------------------------------------------------------------------------------
    def delta(self) -> Tensor:
        """The current δ_i (whitened coordinates), ``(m, D)``, a copy."""
        return self.y[: self.m].clone()

    def _seed_sentinel(self, inj: Tensor) -> None:
        """Point the sentinel along the first injections (a random-sign sum of them): per-sample
        gradients overlap the stiff directions where an instability shows first, which a random
        direction in D dimensions hardly does."""
        signs = torch.randint(0, 2, (inj.shape[0], 1), generator=torch.Generator().manual_seed(1)) * 2.0 - 1.0
        vec = (inj.double() * signs.double()).sum(0)
        norm = float(vec.norm())
        if not math.isfinite(norm) or norm == 0.0:
            return
        m = self.m
        self.y[m] = (vec / norm).to(self.y.dtype)
        self.nu[m] = 0.0
        self.smallest = 1.0
        self.seeded = True

    def growth(self) -> float:
        """How far the sentinel has grown since its smallest norm: about 1 or less while the
        first-order leave-one-out dynamics contracts, and without bound when it is unstable (the
        step size times the curvature beyond the optimizer's stability limit, as at the edge of
        stability), where first-order gaps stop meaning anything. Renormalises the sentinel when
        its norm leaves [1e-6, 1e6] (its row alone is scaled, which the other rows never see)."""
        norm = float(self.y[self.m].double().norm())
        if not math.isfinite(norm) or norm == 0.0:
            return math.inf if not math.isfinite(norm) else 1.0
        self.smallest = min(self.smallest, norm)
        out = norm / self.smallest
        if not 1e-6 <= norm <= 1e6:
            self.y[self.m] /= norm
            self.nu[self.m] /= norm
            self.smallest /= norm
        return out

    def own_outputs(self, jac: Tensor) -> Tensor:
        """``u_i = ĵ_iᵀ y_i`` ``(m, k)`` from the probe's weighted Jacobians ``jac`` ``(m, k, D)``."""
        return torch.einsum("ikd,id->ik", jac.to(self.y.dtype), self.y[: self.m])

    def gaps(self, jac: Tensor, outputs: Tensor, targets: Tensor, loss: LossFn) -> Tensor:
        """``g_i = ℓ(f_i + u_i, y_i) − ℓ(f_i, y_i)`` ``(m,)``, the exact loss difference."""
        return self.loss_gaps(self.own_outputs(jac), outputs, targets, loss)

    @staticmethod
    def loss_gaps(u: Tensor, outputs: Tensor, targets: Tensor, loss: LossFn) -> Tensor:
        """``g_i = ℓ(f_i + u_i, y_i) − ℓ(f_i, y_i)`` ``(m,)`` from the own-output perturbations ``u``."""
        f = outputs.to(u.dtype)
        return (loss(f + u, targets) - loss(f, targets)).detach()

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"delta": self.y.clone(), "momentum": self.nu.clone(), "steps": self.steps,
                "injections": self.injections, "smallest": self.smallest, "seeded": self.seeded}

    @staticmethod
    def state_shape(state: dict) -> tuple:
        """The ``(m + 1, D)`` shape of a saved state."""
        if "delta" not in state:
            raise ValueError("this per-step state was saved by an earlier gramhook (a buffered state) and "
                             "cannot be resumed; start the monitor afresh.")
        return tuple(state["delta"].shape)

    def load_state_dict(self, state: dict) -> None:
        if self.state_shape(state) != tuple(self.y.shape):
            raise ValueError(f"engine state of shape {self.state_shape(state)} does not fit this engine "
                             f"{tuple(self.y.shape)} (another probe size or coordinates).")
        dev, dt = self.y.device, self.y.dtype
        self.y = state["delta"].to(dev, dt).clone()
        self.nu = state["momentum"].to(dev, dt).clone()
        self.steps, self.injections = int(state["steps"]), int(state["injections"])
        self.smallest, self.seeded = float(state["smallest"]), bool(state["seeded"])

