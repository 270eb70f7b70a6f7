"""Pure maths of a readout: what the monitor computes from the model's tensors at a measurement.

Nothing here holds state or hooks; :class:`gramhook.GramMonitor` decides when to call it.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import kernel
from .dynamics.aggregate import effective_samples, regression_estimate
from .dynamics.engine import perturbation_factor
from .losses import Loss, residual_and_hessian

__all__ = ["batched_outputs", "gap_fields", "perturbation", "sub_probe_jacobian", "sub_probe_ntk", "ntk_spectrum",
           "contraction_rate"]


def batched_outputs(model: nn.Module, x: Tensor, chunk: int = 512) -> Tensor:
    """Eval-mode outputs on ``x``, flattened to ``(N, k)``, in chunks of ``chunk`` rows, no autograd."""
    out = []
    with torch.no_grad(), kernel.eval_mode(model):
        for lo in range(0, x.shape[0], chunk):
            part = model(x[lo:lo + chunk])
            out.append(part.reshape(part.shape[0], -1))
    return torch.cat(out)


def gap_fields(probe_losses: Tensor, gaps: Tensor, sample_losses: Optional[Tensor]) -> Dict[str, float]:
    """The prediction's fields of a :class:`gramhook.Measurement` from per-sample values.

    Args:
        probe_losses: the probe's losses ``(m,)``.
        gaps: the probe's predicted gaps ``g_i`` ``(m,)``.
        sample_losses: the train sample's losses ``(N,)`` (the probe among them), or ``None``:
            the probe's gap is then corrected along its regression on the per-sample loss
            (:func:`gramhook.dynamics.aggregate.regression_estimate`).

    Returns:
        ``train_loss``, ``predicted_gap``, ``predicted_gap_se``, ``predicted_test_loss``,
        ``probe_train_loss``, ``probe_gap``, ``gap_slope``, ``gap_effective_samples``.
    """
    if not bool(torch.isfinite(gaps).all()):
        raise FloatingPointError("the per-sample gaps are not finite (NaN/inf in the model or its gradients)")
    if sample_losses is not None and not bool(torch.isfinite(sample_losses).all()):
        raise FloatingPointError("the train-sample losses are not finite (NaN/inf in the model)")
    train_loss, gap, gap_se, slope, _ = regression_estimate(probe_losses, gaps, sample_losses, None, None)
    return {"train_loss": train_loss, "predicted_gap": gap, "predicted_gap_se": gap_se,
            "predicted_test_loss": train_loss + gap, "probe_train_loss": float(probe_losses.double().mean()),
            "probe_gap": float(gaps.double().mean()), "gap_slope": slope,
            "gap_effective_samples": effective_samples(gaps)}


def perturbation(model: nn.Module, loss: Loss, x: Tensor, out: Tensor, y: Tensor, n_train: int, *,
                 sketch: Optional[int], seed: int, preconditioner, method: str,
                 names: Optional[Sequence[str]]) -> Tuple[float, Tensor, Tensor]:
    """ε̄ from the probe's residual gradients ``P^{1/2} J_iᵀ r_i``, with the residuals and Hessians.

    Args:
        out: the probe's outputs ``(m, k)`` at the current weights; ``y`` its targets.
        sketch: sketch dimension s, or ``None`` for exact coordinates.

    Returns:
        ``(ε̄, r (m, k), Λ (m, k, k))``.
    """
    r, lam = residual_and_hessian(loss, out, y)
    grads = kernel.vjp_rows(model, x, r.unsqueeze(1), s=sketch, seed=seed, preconditioner=preconditioner,
                            method=method, names=names)[:, 0]
    return perturbation_factor(grads, None, n_train), r, lam


def sub_probe_jacobian(model: nn.Module, x: Tensor, *, sketch: Optional[int], seed: int, preconditioner,
                       method: str, names: Optional[Sequence[str]]) -> Tensor:
    """``P^{1/2}``-scaled Jacobians of the sub-probe ``x``: ``(m_K, k, P)`` exact, ``(m_K, k, s)`` sketched."""
    if sketch is None:
        return kernel.flat_jacobian(model, x, preconditioner=preconditioner, power=0.5, method=method, names=names)
    return kernel.sketched_jacobian(model, x, sketch, seed=seed, preconditioner=preconditioner, method=method)


def sub_probe_ntk(jac: Tensor, metric: Optional[Tensor] = None) -> Tensor:
    """The empirical NTK on a sub-probe from its Jacobians.

    .. math:: Θ_{ia,jb} = \\sum_p J_{iap} P_p J_{jbp}

    Args:
        jac: ``(m_K, k, D)`` Jacobians (rows already scaled by P^{1/2} when ``metric`` is ``None``).
        metric: optional ``(D,)`` diagonal preconditioner P.

    Returns:
        Θ ``(m_K, k, m_K, k)``, index ``[i, a, j, b]``.
    """
    left = jac if metric is None else jac * metric.to(jac.dtype)
    return torch.einsum("iap,jbp->iajb", left, jac)


def ntk_spectrum(theta: Tensor) -> Tensor:
    """Eigenvalues of Θ/m_K ``(m_K·k,)`` ascending, on the CPU, for the spectrum histogram."""
    m, k = theta.shape[0], theta.shape[1]
    return torch.linalg.eigvalsh(theta.reshape(m * k, m * k) / m).cpu()


def contraction_rate(eps: float, now: Tuple[float, float], before: Optional[Tuple[float, float]]) -> float:
    """c̄ by finite differences between two readouts of the mean gap ``ḡ``.

    .. math:: \\dot{\\bar g} = ε̄ - c̄\\,\\bar g \\quad⇒\\quad c̄ = (ε̄ - Δ\\bar g/Δt)/\\bar g

    Args:
        eps: ε̄ at this readout.
        now, before: ``(time, mean gap)`` at this readout and the previous one (``None``: none).

    Returns:
        c̄, NaN without a previous readout, an empty interval or a vanishing gap.
    """
    t, mean = now
    if before is None or not t > before[0] or abs(mean) <= 1e-12:
        return math.nan
    rate = (mean - before[1]) / (t - before[0])
    return (eps - rate) / mean
