"""Pure maths of a readout: what the monitor computes from the model's tensors at a measurement.

Nothing here holds state or hooks; :class:`gramhook.GramMonitor` decides when to call it.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import kernel

__all__ = ["batched_outputs", "sub_probe_ntk", "ntk_spectrum", "contraction_rate"]


def batched_outputs(model: nn.Module, x: Tensor, chunk: int = 512) -> Tensor:
    """Eval-mode outputs on ``x``, flattened to ``(N, k)``, in chunks of ``chunk`` rows, no autograd."""
    out = []
    with torch.no_grad(), kernel.eval_mode(model):
        for lo in range(0, x.shape[0], chunk):
            part = model(x[lo:lo + chunk])
            out.append(part.reshape(part.shape[0], -1))
    return torch.cat(out)


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
