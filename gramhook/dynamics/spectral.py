"""Companion analyses on the probe kernel (docs/theory.md §5). Pure tensor code.

- Information and nuisance spaces (Oymak et al., arXiv 1906.05392): the eigenspaces of
  ``Θ_PP/m`` above and below a cutoff; label/residual alignment with the information space and a
  per-sample nuisance score that flags noisy labels.
- Normalized margins (Poggio et al., arXiv 1903.04991): ``ρ = Π_l ‖W_l‖_F`` and the margins and
  cross-entropy of ``f/ρ``, which for a bias-free homogeneous network equals ``f(V; x)`` with
  ``V_l = W_l/‖W_l‖_F``.

Index convention: a probe kernel ``(m, k, m, k)`` is read as the ``(m*k, m*k)`` matrix with row
``i*k + a`` (probe sample i, output a), and a per-sample vector ``(m, k)`` as ``(m*k,)``.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import linalg

__all__ = [
    "InformationSpace",
    "information_space",
    "alignment",
    "nuisance_scores",
    "MarginStats",
    "normalized_margins",
    "weight_matrices",
]


@dataclasses.dataclass
class InformationSpace:
    """Eigendecomposition of ``Θ_PP/m`` split into information and nuisance spaces.

    Attributes:
        eigenvalues: ``(m*k,)``, descending.
        eigenvectors: ``(m*k, m*k)``, column c belongs to ``eigenvalues[c]``; rows ``i*k + a``.
        info_dim: the information space I is spanned by the first ``info_dim`` columns, the
            nuisance space N by the rest.
        effective_rank: ``(Σ λ)² / Σ λ²`` over the (non-negative) eigenvalues: the participation
            ratio, between 1 (one direction) and ``m*k`` (flat spectrum).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    info_dim: int
    effective_rank: float

    @property
    def info_basis(self) -> Tensor:
        """Orthonormal basis of I, ``(m*k, info_dim)``."""
        return self.eigenvectors[:, : self.info_dim]


def information_space(theta: Tensor, *, alpha: float = 0.1, top_r: Optional[int] = None) -> InformationSpace:
    """Eigendecompose ``Θ_PP/m`` and split off the information space (docs/theory.md §5).

    Args:
        theta: probe NTK ``(m, k, m, k)``.
        alpha: I holds the eigenvalues ``λ ≥ α·λ_max``; ignored when ``top_r`` is given.
        top_r: take the top ``r`` eigenvectors as I instead (clipped to ``[0, m*k]``).

    Returns:
        :class:`InformationSpace`. Round-off negative eigenvalues are clamped to 0.

    Example:
        >>> theta = torch.diag(torch.tensor([8.0, 4.0, 0.2, 0.0])).reshape(2, 2, 2, 2)
        >>> space = information_space(theta, alpha=0.1)
        >>> space.eigenvalues, space.info_dim
        (tensor([4.0000, 2.0000, 0.1000, 0.0000]), 2)
    """
    if theta.dim() != 4 or theta.shape[0] != theta.shape[2] or theta.shape[1] != theta.shape[3]:
        raise ValueError(f"Expected a probe kernel of shape (m, k, m, k), got {tuple(theta.shape)}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    m, k = theta.shape[0], theta.shape[1]
    mat = theta.detach().reshape(m * k, m * k) / m
    e, q = linalg.eigh(mat)  # float64 inside: the small eigenvalues that decide the split
    e, q = e.flip(0).clamp(min=0), q.flip(1)                                # descending
    if top_r is not None:
        dim = max(0, min(int(top_r), m * k))
    else:
        dim = int((e >= alpha * e[0]).sum()) if float(e[0]) > 0 else 0
    sq = float((e * e).sum())
    rank = float(e.sum()) ** 2 / sq if sq > 0 else 0.0
    return InformationSpace(eigenvalues=e, eigenvectors=q, info_dim=dim, effective_rank=rank)


def alignment(space: InformationSpace, v: Tensor) -> float:
    """``‖Π_I v‖ / ‖v‖`` for a per-sample vector ``v`` ``(m, k)`` (labels y or residual r).

    Returns ``nan`` for ``v = 0``.

    Example:
        >>> space = information_space(torch.diag(torch.tensor([8.0, 4.0, 0.2, 0.0])).reshape(2, 2, 2, 2))
        >>> alignment(space, torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        1.0
    """
    flat = v.reshape(-1).to(space.eigenvectors.dtype)
    norm = float(torch.linalg.vector_norm(flat))
    if norm == 0.0:
        return float("nan")
    return float(torch.linalg.vector_norm(space.info_basis.T @ flat)) / norm


def nuisance_scores(space: InformationSpace, residual: Tensor) -> Tensor:
    """Per-sample nuisance score: the share of sample i's residual energy that lies on N.

    The whole residual vector is split into its information and nuisance parts,
    ``r = Π_I r + Π_N r`` with ``Π_I = Q_I Q_Iᵀ``. Sample i's block of each part,
    ``b_i = (Π_I r)_i`` and ``a_i = (Π_N r)_i`` (so ``a_i + b_i = r_i``), gives the score

    .. math:: s_i = \\frac{\\|a_i\\|^2}{\\|a_i\\|^2 + \\|b_i\\|^2} \\in [0, 1].

    The denominators add up to ``‖r‖²`` over the probe (the two parts are orthogonal), and the
    numerators to ``‖Π_N r‖²``. A residual the kernel cannot fit fast, such as a flipped label,
    lives mostly on N, so its score is near 1.

    Why not ``‖a_i‖²/‖r_i‖²``: the projection mixes samples, so a well-fit sample (``r_i ≈ 0``)
    still carries a nuisance component leaked from the others, and that ratio explodes (values
    above 100 on the noisy-label test problem), which makes means over samples meaningless. The
    denominator used here is at least ``‖r_i‖²/2``.

    Args:
        space: from :func:`information_space` on the same probe.
        residual: r ``(m, k)``.

    Returns:
        ``(m,)`` in ``[0, 1]``; ``nan`` where ``a_i = b_i = 0`` (which needs ``r_i = 0``).

    Example:
        >>> space = information_space(torch.diag(torch.tensor([8.0, 4.0, 0.2, 0.0])).reshape(2, 2, 2, 2))
        >>> nuisance_scores(space, torch.tensor([[1.0, 2.0], [0.5, 0.0]]))
        tensor([0., 1.])
    """
    m = residual.shape[0]
    r = residual.reshape(-1).to(space.eigenvectors.dtype)
    if r.numel() != space.eigenvectors.shape[0]:
        raise ValueError(
            f"The residual has {r.numel()} entries but the information space has dimension "
            f"{space.eigenvectors.shape[0]}; use the same probe (m, k) for both."
        )
    basis = space.info_basis
    info = (basis @ (basis.T @ r)).reshape(m, -1)                 # b_i
    nuisance = r.reshape(m, -1) - info                            # a_i
    num = nuisance.pow(2).sum(1)
    den = num + info.pow(2).sum(1)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.full_like(den, float("nan")))


@dataclasses.dataclass
class MarginStats:
    """Normalized classification margins on the probe (docs/theory.md §5, Theory III).

    Attributes:
        rho: ``ρ = Π_l ‖W_l‖_F``.
        layer_norms: ``‖W_l‖_F`` per weight layer, ``(L,)``, float64.
        margins: ``(f_y − max_{c≠y} f_c)/ρ`` per sample, ``(m,)``, in the outputs' dtype
            (computed in float64).
        min, q10, median, q90: quantiles of ``margins``.
        normalized_ce: mean cross-entropy of ``f/ρ``.
    """

    rho: float
    layer_norms: Tensor
    margins: Tensor
    min: float
    q10: float
    median: float
    q90: float
    normalized_ce: float


def normalized_margins(weights: List[Tensor], outputs: Tensor, targets: Tensor) -> MarginStats:
    """Margins and cross-entropy of the outputs scaled by ``1/ρ``, ``ρ = Π_l ‖W_l‖_F``.

    For a homogeneous network (bias-free ReLU layers) ``f(W; x) = ρ f(V; x)`` with
    ``V_l = W_l/‖W_l‖_F``, so these are the margins and loss of the normalized network.

    Args:
        weights: the weight tensors W_l (see :func:`weight_matrices`).
        outputs: logits ``(m, k)``. With ``k = 1`` the single logit is read as binary, with the
            margin ``(2y − 1) f/ρ`` and the logistic loss.
        targets: class indices ``(m,)``.

    Returns:
        :class:`MarginStats`.

    Example:
        >>> w = [2 * torch.eye(2), torch.eye(2)]
        >>> stats = normalized_margins(w, torch.tensor([[3.0, 1.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        >>> round(stats.rho, 4), stats.margins
        (4.0, tensor([ 0.5000, -0.5000]))
    """
    if not weights:
        raise ValueError("normalized_margins needs at least one weight tensor; see weight_matrices().")
    norms = torch.stack([torch.linalg.vector_norm(w.detach().double()) for w in weights])
    rho = float(torch.exp(torch.log(norms).sum()))
    out = outputs.detach().reshape(outputs.shape[0], -1).double()
    y = targets.detach().reshape(-1).long()
    z = out / rho
    if out.shape[1] == 1:
        sign = (2 * y - 1).to(z.dtype)
        margins = sign * z[:, 0]
        ce = F.softplus(-margins).mean()
    else:
        own = z.gather(1, y[:, None])[:, 0]
        others = z.scatter(1, y[:, None], float("-inf")).amax(1)
        margins = own - others
        ce = F.cross_entropy(z, y)
    qs = torch.quantile(margins, torch.tensor([0.1, 0.5, 0.9], dtype=margins.dtype))
    return MarginStats(
        rho=rho,
        layer_norms=norms,
        margins=margins.to(outputs.dtype),
        min=float(margins.min()),
        q10=float(qs[0]),
        median=float(qs[1]),
        q90=float(qs[2]),
        normalized_ce=float(ce),
    )


def weight_matrices(named_parameters: Iterable[Tuple[str, Tensor]]) -> List[Tensor]:
    """The weight tensors among ``(name, tensor)`` pairs: those with ``dim ≥ 2`` (Linear, Conv).

    Biases and norm scales (``dim < 2``) are dropped; the order is kept.

    Example:
        >>> weight_matrices([("0.weight", torch.ones(3, 2)), ("0.bias", torch.ones(3))])[0].shape
        torch.Size([3, 2])
    """
    return [t.detach() for _, t in named_parameters if t.dim() >= 2]
