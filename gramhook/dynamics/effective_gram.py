"""The effective Gram matrix K_n on a sub-probe (docs/theory.md §4). Pure tensor code.

The perturbation factor is a quadratic form in the residual, ``ε̄(s) = r(s)ᵀ A(s) r(s)``
(:func:`gap_operator`). In the kernel regime the probe residual follows
``ṙ = −(1/m) Λ Θ r``: the probe is a Monte-Carlo estimate of the average over the training set,
``(1/n) Σ_{j ∈ S}`` ≈ ``(1/m) Σ_{j ∈ probe}``. With the propagator ``Φ̇ = −(1/m) Λ Θ Φ``,
``Φ(0) = I``, so that ``r(s) ≈ Φ(s) r(0)``, the scalar gap equation ``dḡ/dt = −c̄ ḡ + ε̄``
integrates to ``ḡ(t) ≈ r(0)ᵀ K_n(t) r(0)`` with

.. math:: K_n(t) = \\int_0^t e^{-\\int_s^t \\bar c}\\, Φ(s)ᵀ A(s) Φ(s)\\, ds.

Index convention: every matrix here is ``(m*k, m*k)`` with row ``i*k + a`` for probe sample i and
output a, i.e. ``theta.reshape(m*k, m*k)`` of a kernel ``(m, k, m, k)``.

Time stepping (left endpoint, like :mod:`gramhook.dynamics.engine`). A call at time t supplies
Θ(t), r(t), Λ(t) and c̄(t). Over the elapsed interval ``Δt`` it first applies the rates of the
*previous* call:

- ``Φ ← exp(−(Δt/m) Λ_prev Θ_prev) Φ``, applied exactly and A-stably through the symmetric
  ``Lᵀ Θ L`` (``Λ = L Lᵀ``), so a stiff ``Δt·λ_max`` is harmless;
- ``K ← e^{−c̄_prev Δt} K + (Δt/2)(e^{−c̄_prev Δt} F_prev + F_new)`` with ``F = Φᵀ A Φ``: the
  trapezoid rule on ``F`` with the contraction factor held at its left-endpoint value, which is
  exact for the decay over the interval. ``F_new`` uses the new Φ and the new ``A(t)``.

These are the same quadratures as the scalar recursion
``ḡ ← e^{−c̄_prev Δt} ḡ + (Δt/2)(e^{−c̄_prev Δt} ε̄_prev + ε̄_new)``, so in the constant-kernel
MSE case with the probe equal to the training set ``r(0)ᵀ K r(0)`` equals that ḡ exactly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from . import linalg

__all__ = [
    "EffectiveGramStats",
    "EffectiveGram",
    "gap_operator",
    "residual_propagator",
    "kernel_alignment",
    "benign_fraction",
    "kernel_fidelity",
]


@dataclasses.dataclass
class EffectiveGramStats:
    """One measurement of the effective Gram matrix (docs/theory.md §4).

    Attributes:
        gap: ``r(0)ᵀ K_n(t) r(0)``, the K-based estimate of ḡ.
        alignment: ``r(t)ᵀ K r(t) / (‖r(t)‖² · tr(K)/(m_K k))``; below 1 means the residual avoids
            the directions that generate gap. ``nan`` when ``r(t) = 0`` or ``tr(K) ≤ 0``.
        benign_fraction: share of ``‖r(t)‖²`` in the benign eigenspace of K (see
            :func:`benign_fraction`); ``nan`` when undefined.
        kernel_fidelity: ``1 − ‖r(t) − Φ(t) r(0)‖ / ‖r(t)‖``; 1 in the kernel regime.
    """

    gap: float
    alignment: float
    benign_fraction: float
    kernel_fidelity: float


def gap_operator(theta: Tensor, n_train: int) -> Tensor:
    """The quadratic form ``A`` of the perturbation factor, ``rᵀ A r = ε̄`` (docs/theory.md §2, §4).

    .. math:: A = \\frac1n\\Big[\\frac1m \\mathrm{blockdiag}(Θ) - \\frac{1}{m(m-1)}(Θ - \\mathrm{blockdiag}(Θ))\\Big]

    so that ``rᵀ A r = (1/n)[mean_i G_ii − mean_{i≠j} G_ij]`` with ``G_ij = r_iᵀ Θ_ij r_j``.

    Args:
        theta: probe NTK in the optimizer metric ``(m, k, m, k)``, ``m ≥ 2``.
        n_train: n, the size of the training set.

    Returns:
        ``A`` of shape ``(m*k, m*k)``, row ``i*k + a``, symmetrized.

    Example:
        >>> theta = torch.eye(4).reshape(2, 2, 2, 2)
        >>> gap_operator(theta, n_train=10).diagonal()
        tensor([0.0500, 0.0500, 0.0500, 0.0500])
    """
    m, k = _kernel_shape(theta)
    if m < 2:
        raise ValueError("gap_operator needs at least two probe samples (m ≥ 2) for the cross term.")
    eye = torch.eye(m, dtype=theta.dtype, device=theta.device)
    own = 1.0 / m
    cross = 1.0 / (m * (m - 1))
    weight = (own + cross) * eye - cross                           # (m, m): own on diag, −cross off it
    a = (theta * weight[:, None, :, None]).reshape(m * k, m * k) / n_train
    return 0.5 * (a + a.T)


def residual_propagator(theta: Tensor, hessian: Tensor, dt: float, state: Optional[Tensor] = None) -> Tensor:
    """``exp(−(dt/m) Λ Θ)``, the kernel-regime residual propagator over ``dt`` (docs/theory.md §4).

    With ``Λ = L Lᵀ`` (L block diagonal) and ``Q diag(e) Qᵀ = (1/m) Lᵀ Θ L`` (symmetric PSD), the
    push-through identity gives

    .. math:: e^{-(dt/m) L Lᵀ Θ} = I - \\tfrac1m L Q \\,\\mathrm{diag}\\big((1 - e^{-dt\\, e})/e\\big)\\, Qᵀ Lᵀ Θ,

    which stays bounded for any ``dt ≥ 0``.

    Args:
        theta: ``(m, k, m, k)``; hessian: the blocks of Λ, ``(m, k, k)``.
        state: ``(m*k, c)`` to apply the propagator to, or ``None`` for the matrix itself.

    Returns:
        ``exp(−(dt/m) Λ Θ) @ state``, ``(m*k, c)``, or the ``(m*k, m*k)`` matrix.
    """
    m, k = _kernel_shape(theta)
    half = linalg.sqrt_psd(hessian)                                 # L_i, (m, k, k), symmetric
    tl = torch.einsum("iajc,jcb->iajb", 0.5 * (theta + theta.permute(2, 3, 0, 1)), half)   # Θ L
    ltl = torch.einsum("ica,icjb->iajb", half, tl).reshape(m * k, m * k)                 # Lᵀ Θ L
    e, q = linalg.eigh(ltl / m)
    tl = tl.reshape(m * k, m * k)
    if state is None:
        state = torch.eye(m * k, dtype=theta.dtype, device=theta.device)
    coef = (q * linalg.decay_integral(e.clamp(min=0), dt)) @ (q.T @ (tl.T @ state))   # (mk, c)
    return state - torch.einsum("iac,icx->iax", half, coef.reshape(m, k, -1)).reshape(m * k, -1) / m


def kernel_alignment(matrix: Tensor, residual: Tensor) -> float:
    """``rᵀ K r / (‖r‖² · tr(K)/(m k))``: 1 for an isotropic K, below 1 when r avoids K's top.

    Args:
        matrix: K ``(m*k, m*k)``; residual: r ``(m, k)`` or ``(m*k,)``.

    Returns:
        The ratio, ``nan`` when ``r = 0`` or ``tr(K) ≤ 0``.

    Example:
        >>> kernel_alignment(2 * torch.eye(3), torch.tensor([1.0, -2.0, 0.5]))
        1.0
    """
    r = residual.reshape(-1).to(matrix.dtype)
    norm2 = float(r @ r)
    trace = float(matrix.diagonal().sum())
    if norm2 == 0.0 or trace <= 0.0:
        return float("nan")
    return float(r @ matrix @ r) / (norm2 * trace / matrix.shape[0])


def benign_fraction(matrix: Tensor, residual: Tensor) -> float:
    """Share of ``‖r‖²`` in the benign eigenspace of K.

    The benign eigenspace is spanned by the eigenvectors of K with the smallest eigenvalues,
    taken in ascending order for as long as their cumulative sum stays at most ``tr(K)/2``;
    equivalently, the complement of the fewest top eigenvectors that carry at least half of the
    trace. Negative round-off eigenvalues count as 0.

    Args:
        matrix: K ``(m*k, m*k)``, symmetric PSD; residual: r ``(m, k)`` or ``(m*k,)``.

    Returns:
        ``‖Π_B r‖² / ‖r‖²`` in ``[0, 1]``; ``nan`` when ``r = 0`` or ``tr(K) ≤ 0``.

    Example:
        >>> benign_fraction(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.ones(4))
        0.5
    """
    r = residual.reshape(-1).to(matrix.dtype)
    norm2 = float(r @ r)
    e, q = linalg.eigh(matrix)                                     # ascending
    e = e.clamp(min=0)
    trace = float(e.sum())
    if norm2 == 0.0 or trace <= 0.0:
        return float("nan")
    slack = 64 * torch.finfo(e.dtype).eps * trace                  # ties at exactly half
    benign = torch.cumsum(e, 0) <= 0.5 * trace + slack
    coords = q[:, benign].T @ r
    return float(coords @ coords) / norm2


def kernel_fidelity(residual: Tensor, predicted: Tensor) -> float:
    """``1 − ‖r − r̂‖ / ‖r‖`` with ``r̂ = Φ r(0)``; 1 in the kernel regime, ``nan`` when ``r = 0``."""
    r = residual.reshape(-1)
    norm = float(torch.linalg.vector_norm(r))
    if norm == 0.0:
        return float("nan")
    return 1.0 - float(torch.linalg.vector_norm(r - predicted.reshape(-1).to(r.dtype))) / norm


class EffectiveGram:
    """Streams ``K_n``, the residual propagator Φ and ``r(0)`` on a fixed sub-probe of size m_K.

    Args:
        n_train: n, the size of the training set.
        dtype, device: of the state (``Φ``, ``K``: ``(m_K k, m_K k)`` each).

    Attributes:
        time: flow time since the first call.

    The sub-probe size m_K and k are read from the first call. Cost per call:
    ``O((m_K k)^3)``, from one eigendecomposition and a few dense products.

    Example:
        >>> eg = EffectiveGram(n_train=4, dtype=torch.float64)
        >>> theta = torch.eye(4, dtype=torch.float64).reshape(2, 2, 2, 2)
        >>> lam = torch.eye(2, dtype=torch.float64).expand(2, 2, 2)
        >>> r = torch.ones(2, 2, dtype=torch.float64)
        >>> eg.update(0.0, theta, r, lam, 0.0).gap
        0.0
        >>> round(eg.update(0.1, theta, r, lam, 0.0).gap, 6)    # (Δt/2)·0.5·(1 + e^{−Δt})
        0.047621
    """

    def __init__(self, n_train: int, *, dtype=torch.float32, device=None):
        if n_train < 2:
            raise ValueError(f"n_train must be at least 2, got {n_train}.")
        self.n_train = int(n_train)
        self.dtype = dtype
        self.device = device
        self.time = 0.0
        self._r0: Optional[Tensor] = None         # (mk,)
        self._phi: Optional[Tensor] = None        # (mk, mk)
        self._k: Optional[Tensor] = None          # (mk, mk)
        self._theta: Optional[Tensor] = None      # previous Θ (m, k, m, k)
        self._hessian: Optional[Tensor] = None    # previous Λ (m, k, k)
        self._contraction = 0.0                   # previous c̄ (nan → 0)
        self._f: Optional[Tensor] = None          # previous F = Φᵀ A Φ (mk, mk)

    @property
    def matrix(self) -> Tensor:
        """``K_n`` of shape ``(m_K k, m_K k)``, row ``i*k + a``."""
        if self._k is None:
            raise RuntimeError("EffectiveGram has no state yet: call update() first.")
        return self._k

    def update(self, dt: float, theta: Tensor, residual: Tensor, hessian: Tensor, contraction: float) -> EffectiveGramStats:
        """Advance by ``dt`` with the previous call's rates, then measure with these.

        Args:
            dt: flow time elapsed since the previous call (ignored on the first call).
            theta: sub-probe NTK in the optimizer metric ``(m_K, k, m_K, k)``.
            residual: r ``(m_K, k)``.
            hessian: Λ ``(m_K, k, k)``.
            contraction: c̄ at this time; ``nan`` (or ``None``) is treated as 0.

        Returns:
            :class:`EffectiveGramStats` at this time.
        """
        theta = theta.detach().to(dtype=self.dtype, device=self.device)
        r = residual.detach().to(dtype=self.dtype, device=self.device).reshape(-1)
        hessian = hessian.detach().to(dtype=self.dtype, device=self.device)
        m, k = _kernel_shape(theta)
        if r.numel() != m * k or hessian.shape != (m, k, k):
            raise ValueError(
                f"Expected residual ({m}, {k}) and hessian ({m}, {k}, {k}) for theta {tuple(theta.shape)}, "
                f"got {tuple(residual.shape)} and {tuple(hessian.shape)}."
            )
        c = 0.0 if contraction is None or math.isnan(float(contraction)) else float(contraction)
        a = gap_operator(theta, self.n_train)
        if self._r0 is None:
            self._r0 = r.clone()
            self._phi = torch.eye(m * k, dtype=self.dtype, device=self.device)
            self._k = torch.zeros(m * k, m * k, dtype=self.dtype, device=self.device)
            f = a
        else:
            if r.numel() != self._r0.numel():
                raise ValueError(
                    f"The sub-probe changed size: expected {self._r0.numel()} residual entries, got {r.numel()}. "
                    "Keep the same m_K samples for the whole run."
                )
            if dt < 0:
                raise ValueError(f"dt must be non-negative, got {dt}.")
            if dt > 0:
                self._phi = residual_propagator(self._theta, self._hessian, dt, self._phi)
            f = self._phi.T @ a @ self._phi
            if dt > 0:
                decay = math.exp(-self._contraction * dt)
                kk = decay * self._k + 0.5 * dt * (decay * self._f + f)
                self._k = 0.5 * (kk + kk.T)
            self.time += float(dt)
        self._f = 0.5 * (f + f.T)
        self._theta, self._hessian, self._contraction = theta, hessian, c
        return self._stats(r)

    def _stats(self, r: Tensor) -> EffectiveGramStats:
        return EffectiveGramStats(
            gap=float(self._r0 @ self._k @ self._r0),
            alignment=kernel_alignment(self._k, r),
            benign_fraction=benign_fraction(self._k, r),
            kernel_fidelity=kernel_fidelity(r, self._phi @ self._r0),
        )

    def state_dict(self) -> dict:
        """Tensors are cloned; ``None`` entries mean no call yet."""
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return {
            "n_train": self.n_train,
            "time": self.time,
            "r0": clone(self._r0),
            "phi": clone(self._phi),
            "K": clone(self._k),
            "theta": clone(self._theta),
            "hessian": clone(self._hessian),
            "contraction": self._contraction,
            "F": clone(self._f),
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["n_train"]) != self.n_train:
            raise ValueError(f"State is for n_train={state['n_train']}, this EffectiveGram has n_train={self.n_train}.")
        load = lambda t: None if t is None else t.clone().to(dtype=self.dtype, device=self.device)  # noqa: E731
        self.time = float(state["time"])
        self._r0, self._phi, self._k = load(state["r0"]), load(state["phi"]), load(state["K"])
        self._theta, self._hessian, self._f = load(state["theta"]), load(state["hessian"]), load(state["F"])
        self._contraction = float(state["contraction"])


def _kernel_shape(theta: Tensor):
    if theta.dim() != 4 or theta.shape[0] != theta.shape[2] or theta.shape[1] != theta.shape[3]:
        raise ValueError(f"Expected a probe kernel of shape (m, k, m, k), got {tuple(theta.shape)}.")
    return int(theta.shape[0]), int(theta.shape[1])
