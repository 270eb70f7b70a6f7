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

Cost. Every update is a combination of the rows seen so far, so the engine keeps the state
lazily: ``δ = σ·Y − β·V + Σ_u (−b_u) C_u Z_u`` and ``ν = α·V + Σ_u a_u C_u Z_u``, with a base
``Y`` ``(m, D)``, the momentum base ``V`` ``(m, D)``, and a buffer of recent steps' rows ``Z_u``
``(R_u, D)`` with their per-sample coefficients ``C_u`` ``(m, R_u)``; the scalars say how much of
each part is still in the momentum buffer (``α``, ``a_u``) and how far it has moved the weights
(``β``, ``b_u``). A step reads ``Y`` and ``V`` once each (``Y @ Zᵀ``); once the buffer holds ``2m``
rows (or ``window`` steps) it is folded into ``Y`` and ``V``, exactly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional

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
        """Weight of this step's δg in the buffer (``a`` of the new entry)."""
        if self.kind in ("adam", "nadam"):
            return 1.0 - self.momentum
        return 1.0 if (self.first or self.momentum == 0) else 1.0 - self.dampening

    def direction(self, a: Tensor, new: Tensor) -> Tensor:
        """Weight of each entry in this step's update direction, from its buffer weight ``a``
        (after this step's decay and inflow) and ``new`` (1 for this step's entry)."""
        if self.kind == "adam":
            return self.bias_correction * a
        if self.kind == "nadam":
            return self.bias_correction * a + self.grad_weight * new
        if self.momentum == 0:
            return new
        return self.momentum * a + new if self.nesterov else a


class _Buffer:
    """Rows of the steps since the last fold ``(U_rows, D)`` and their per-sample coefficients
    ``(m, U_rows)``, in preallocated storage (no concatenation per step).

    ``full`` once it holds ``capacity`` rows: the per-step cost of reading it (``U_rows·D·R``)
    then matches the cost of folding it (``m·D`` per row), so the engine folds.
    """

    def __init__(self, m: int, dim: int, capacity: int, dtype, device):
        self.capacity = capacity
        self.rows = torch.empty(capacity, dim, dtype=dtype, device=device)
        self.coef = torch.empty(m, capacity, dtype=dtype, device=device)
        self.used = 0
        self.sizes: List[int] = []      # rows appended per step

    @property
    def steps(self) -> int:
        return len(self.sizes)

    @property
    def full(self) -> bool:
        return self.used >= self.capacity

    def append(self, rows: Tensor, coef: Tensor) -> None:
        r = rows.shape[0]
        if self.used + r > self.rows.shape[0]:
            grow = self.used + r
            self.rows = torch.cat([self.rows[: self.used], rows.new_empty(grow - self.used, rows.shape[1])])
            self.coef = torch.cat([self.coef[:, : self.used], coef.new_empty(coef.shape[0], grow - self.used)], 1)
        self.rows[self.used:self.used + r] = rows
        self.coef[:, self.used:self.used + r] = coef
        self.used += r
        self.sizes.append(r)

    def rows_view(self) -> Optional[Tensor]:
        return self.rows[: self.used] if self.used else None

    def coef_view(self, weights: Tensor) -> Optional[Tensor]:
        """Coefficients with each step's block scaled by its entry of ``weights`` ``(steps,)``."""
        if not self.used:
            return None
        w = torch.repeat_interleave(weights.to(self.coef.device, self.coef.dtype),
                                    torch.tensor(self.sizes, device=self.coef.device))
        return self.coef[:, : self.used] * w

    def clear(self) -> None:
        self.used, self.sizes = 0, []

    def state_dict(self) -> dict:
        return {"rows": self.rows[: self.used].clone(), "coef": self.coef[:, : self.used].clone(),
                "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        if state["sizes"]:
            self.append(state["rows"].to(self.rows.device, self.rows.dtype), state["coef"].to(self.coef.device, self.coef.dtype))
            self.sizes = list(state["sizes"])


class PerStepEngine:
    """Coupled leave-one-out perturbations of m probe samples, advanced once per optimizer step.

    Args:
        m: probe samples.
        dim: D, the coordinates (parameters, or the sketch size).
        window: fold the buffer at least every this many steps (``None``: only when it holds
            ``2m`` rows). Folding is exact; it only trades memory and per-step reads for GEMMs.
        dtype, device: of the state.

    Example:
        >>> eng = PerStepEngine(2, 3)
        >>> rows = torch.tensor([[1.0, 0.0, 0.0]])
        >>> inj = torch.tensor([[0.0, 1.0, 0.0]])
        >>> eng.step(StepRule("sgd", lr=0.1), rows, torch.tensor([-1]), torch.tensor([0]), inj)
        >>> eng.delta()[0]
        tensor([ 0.0000, -0.1000,  0.0000])
    """

    def __init__(self, m: int, dim: int, *, window: Optional[int] = 32, dtype=torch.float32, device=None):
        if m < 1 or dim < 1:
            raise ValueError(f"PerStepEngine needs m ≥ 1 and dim ≥ 1, got m={m}, dim={dim}.")
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive int or None, got {window!r}.")
        self.m, self.dim, self.window = m, dim, window
        # Row m is the sentinel: a unit perturbation that is contracted like every δ_i but never
        # injected. It cannot grow while the first-order dynamics is stable (:meth:`growth`).
        rows = m + 1
        self.base = torch.zeros(rows, dim, dtype=dtype, device=device)   # Y (m + 1, D)
        self.velocity = torch.zeros(rows, dim, dtype=dtype, device=device)  # V (m + 1, D)
        unit = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.base[m] = (unit / unit.norm()).to(dtype)
        self.smallest = 1.0                                           # the sentinel's smallest norm
        self.seeded = False                                           # pointed along the first injections
        self.sigma = 1.0                                              # δ = σ·Y − β·V + buffer
        self.alpha, self.beta = 1.0, 0.0                              # ν = α·V + buffer
        self.buffer = _Buffer(rows, dim, max(2 * m, 64), dtype, device)  # rows Z_u and coefficients C_u
        self.a = torch.zeros(0, dtype=torch.float64)                  # buffer weights (U,)
        self.b = torch.zeros(0, dtype=torch.float64)                  # displacements (U,)
        self.steps = 0
        self.injections = 0

    # -- the step -------------------------------------------------------------------------------
    def _weighted_coef(self) -> Optional[Tensor]:
        """``(m, U_rows)``: each buffered row's coefficient in δ now (``−b_u`` times its δg share)."""
        return self.buffer.coef_view(-self.b)

    def project(self, vectors: Tensor) -> Tensor:
        """``⟨δ_i, v_r⟩`` for every row (the m probe samples and the sentinel) and vector,
        ``(m + 1, R)``, from ``vectors`` ``(R, D)``."""
        vectors = vectors.to(self.base.dtype)
        out = (self.base @ vectors.T) * self.sigma
        if self.beta != 0.0:
            out = out - (self.velocity @ vectors.T) * self.beta
        rows, coef = self.buffer.rows_view(), self._weighted_coef()
        if rows is not None:
            out = out + coef @ (rows @ vectors.T)
        return out

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
        dtype, device = self.base.dtype, self.base.device
        if not self.seeded and inj is not None and inj.shape[0] > 0:
            self._seed_sentinel(inj)
        new_rows, new_coef = [], []
        if rows is not None and rows.shape[0] > 0:
            rows = rows.to(dtype)
            own = None if owner is None else owner.to(device)
            mine = torch.zeros(rows.shape[0], dtype=torch.bool, device=device) if own is None else own >= 0
            scale = None
            if batch is not None and batch > 1 and inj_idx is not None and inj_idx.numel() > 0:
                scale = torch.ones(self.m + 1, 1, dtype=dtype, device=device)
                scale[inj_idx.to(device)] = batch / (batch - 1)
            full = self.project(rows)                                  # (m, R): ⟨δ_i, z_r⟩
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
                coef[who, r] = 0.0
            if scale is not None:
                coef = coef * scale
            new_rows.append(rows)
            new_coef.append(coef)
        if inj_idx is not None and inj_idx.numel() > 0:
            c = torch.zeros(self.m + 1, inj_idx.numel(), dtype=dtype, device=device)
            c[inj_idx.to(device), torch.arange(inj_idx.numel(), device=device)] = 1.0
            new_rows.append(inj.to(dtype))
            new_coef.append(c)
            self.injections += int(inj_idx.numel())
        mu = rule.momentum
        self.a = self.a * mu
        new = torch.zeros_like(self.a)
        if new_rows:
            self.buffer.append(torch.cat(new_rows), torch.cat(new_coef, 1))
            self.a = torch.cat([self.a, torch.tensor([rule.inflow], dtype=torch.float64)])
            self.b = torch.cat([self.b, torch.zeros(1, dtype=torch.float64)])
            new = torch.cat([new, torch.ones(1, dtype=torch.float64)])
        self.b = rule.shrink * self.b + rule.lr * rule.direction(self.a, new)
        self.alpha *= mu
        zero = torch.zeros(1, dtype=torch.float64)
        self.beta = rule.shrink * self.beta + rule.lr * float(rule.direction(torch.tensor([self.alpha], dtype=torch.float64), zero))
        self.sigma *= rule.shrink
        self.steps += 1
        if self.buffer.full or (self.window is not None and self.buffer.steps >= self.window):
            self.fold()

    def _momentum(self) -> Tensor:
        """The current ν_i, ``(m, D)``."""
        out = self.velocity * self.alpha
        return out if not self.buffer.steps else out + self.buffer.coef_view(self.a) @ self.buffer.rows_view()

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

    def fold(self) -> None:
        """Fold the buffer into ``Y`` and ``V`` (exact)."""
        if not self.buffer.steps:
            return
        self.base, self.velocity = self._state(), self._momentum()
        self.sigma, self.alpha, self.beta = 1.0, 1.0, 0.0
        self.buffer.clear()
        self.a = torch.zeros(0, dtype=torch.float64)
        self.b = torch.zeros(0, dtype=torch.float64)

    # -- readout --------------------------------------------------------------------------------
    def delta(self) -> Tensor:
        """The current δ_i (whitened coordinates), ``(m, D)``; the state is not changed."""
        return self._state(slice(0, self.m))

    def _seed_sentinel(self, inj: Tensor) -> None:
        """Point the sentinel along the first injections (a random-sign sum of them): per-sample
        gradients overlap the stiff directions where an instability shows first, which a random
        direction in D dimensions hardly does."""
        signs = torch.randint(0, 2, (inj.shape[0], 1), generator=torch.Generator().manual_seed(1)) * 2.0 - 1.0
        vec = (inj.double() * signs.double()).sum(0)
        norm = float(vec.norm())
        if not math.isfinite(norm) or norm == 0.0 or self.sigma == 0.0:
            return
        m = self.m
        self.base[m] = (vec / (norm * self.sigma)).to(self.base.dtype)
        self.velocity[m] = 0.0
        if self.buffer.used:
            self.buffer.coef[m, : self.buffer.used] = 0.0
        self.smallest = 1.0
        self.seeded = True

    def growth(self) -> float:
        """How far the sentinel has grown since its smallest norm: about 1 or less while the
        first-order leave-one-out dynamics contracts, and without bound when it is unstable (the
        step size times the curvature beyond the optimizer's stability limit, as at the edge of
        stability), where first-order gaps stop meaning anything. Renormalises the sentinel when
        its norm leaves [1e-6, 1e6] (its row alone is scaled, which the other rows never see)."""
        norm = float(self._state(slice(self.m, self.m + 1)).double().norm())
        if not math.isfinite(norm) or norm == 0.0:
            return math.inf if not math.isfinite(norm) else 1.0
        self.smallest = min(self.smallest, norm)
        out = norm / self.smallest
        if not 1e-6 <= norm <= 1e6:
            self.base[self.m] /= norm
            self.velocity[self.m] /= norm
            if self.buffer.used:
                self.buffer.coef[self.m, : self.buffer.used] /= norm
            self.smallest /= norm
        return out

    def _state(self, which: slice = slice(None)) -> Tensor:
        """δ of the rows ``which`` (default: every row, the sentinel included), ``(rows, D)``."""
        out = self.base[which] * self.sigma
        if self.beta != 0.0:
            out = out - self.velocity[which] * self.beta
        rows, coef = self.buffer.rows_view(), self._weighted_coef()
        return out if rows is None else out + coef[which] @ rows

    def own_outputs(self, jac: Tensor) -> Tensor:
        """``u_i = ĵ_iᵀ y_i`` ``(m, k)`` from the probe's weighted Jacobians ``jac`` ``(m, k, D)``."""
        jac = jac.to(self.base.dtype)
        m = self.m
        out = torch.einsum("ikd,id->ik", jac, self.base[:m]) * self.sigma
        if self.beta != 0.0:
            out = out - torch.einsum("ikd,id->ik", jac, self.velocity[:m]) * self.beta
        rows, coef = self.buffer.rows_view(), self._weighted_coef()
        if rows is not None:
            out = out + torch.einsum("ikr,ir->ik", torch.einsum("ikd,rd->ikr", jac, rows), coef[:m])
        return out

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
        return {"base": self.base.clone(), "velocity": self.velocity.clone(), "sigma": self.sigma,
                "alpha": self.alpha, "beta": self.beta, "buffer": self.buffer.state_dict(),
                "a": self.a.clone(), "b": self.b.clone(),
                "steps": self.steps, "injections": self.injections, "window": self.window,
                "smallest": self.smallest, "seeded": self.seeded}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["base"].shape) != tuple(self.base.shape):
            raise ValueError(f"engine state of shape {tuple(state['base'].shape)} does not fit this engine "
                             f"{tuple(self.base.shape)} (another probe size or coordinates).")
        dev, dt = self.base.device, self.base.dtype
        self.base = state["base"].to(dev, dt).clone()
        self.velocity = state["velocity"].to(dev, dt).clone()
        self.sigma, self.alpha, self.beta = float(state["sigma"]), float(state["alpha"]), float(state["beta"])
        self.buffer.load_state_dict(state["buffer"])
        self.a, self.b = state["a"].clone(), state["b"].clone()
        self.steps, self.injections = int(state["steps"]), int(state["injections"])
        self.smallest, self.seeded = float(state["smallest"]), bool(state["seeded"])
