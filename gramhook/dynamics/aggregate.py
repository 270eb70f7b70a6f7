"""From per-sample probe gaps to one predicted test loss (pure tensor code).

The per-sample gaps ``g_i`` of a probe are heavy-tailed (on MNIST and sklearn digits MLPs the 2% of
samples with the largest leave-one-out gaps carry 30–45% of the total), and they correlate with the
per-sample train loss ``ℓ_i``. A probe of 64 samples that happens to miss the hard samples then
under-states both the train loss and the gap. :func:`regression_estimate` corrects both with a
larger labelled *train sample* whose losses cost one forward pass each: the classical regression
estimator of survey sampling, with ``ℓ`` as the auxiliary variable known on the larger sample.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

from torch import Tensor

__all__ = ["Estimate", "regression_estimate", "MAX_SLOPE"]

MAX_SLOPE = 5.0


class Estimate(NamedTuple):
    train_loss: float
    gap: float
    se: float
    slope: float


def regression_estimate(probe_losses: Tensor, gaps: Tensor, sample_losses: Optional[Tensor] = None) -> Estimate:
    """Train loss, gap, the gap's standard error and the slope β.

    Args:
        probe_losses: per-sample train losses ``ℓ_i`` of the probe ``(m,)``.
        gaps: per-sample gaps ``g_i`` of the probe ``(m,)``.
        sample_losses: train losses of a larger sample ``(L,)`` of the training set (it may contain
            the probe), or ``None``.

    Without ``sample_losses``: ``(ℓ̄, ḡ, std(g)/√m, 0)``. With them: the train loss is their mean
    ``ℓ̄_L`` and the gap ``ḡ + β (ℓ̄_L − ℓ̄)``, where β is the least-squares slope of g on ℓ over the
    probe, clipped to ``[0, MAX_SLOPE]`` (a gap that falls with the train loss is noise, and a huge
    slope from a near-constant ℓ would amplify it). Its variance is
    ``var(g − βℓ)/m + β² var(ℓ_L)/L``.
    """
    m = gaps.shape[0]
    lp, g = probe_losses.double(), gaps.double()
    train_loss, gap = float(lp.mean()), float(g.mean())
    se = float(g.std(unbiased=True)) / math.sqrt(m) if m > 1 else math.nan
    if sample_losses is None or m < 3 or sample_losses.numel() < 2:
        return Estimate(train_loss, gap, se, 0.0)
    dl = lp - lp.mean()
    var = float((dl * dl).sum())
    slope = float((dl * (g - g.mean())).sum()) / var if var > 1e-12 * max(1.0, float((lp * lp).sum())) else 0.0
    slope = min(max(slope, 0.0), MAX_SLOPE)
    big = sample_losses.double()
    l_train = float(big.mean())
    resid = g - slope * lp
    var_gap = float(resid.var(unbiased=True)) / m + slope**2 * float(big.var(unbiased=True)) / big.numel()
    return Estimate(l_train, gap + slope * (l_train - train_loss), math.sqrt(max(var_gap, 0.0)), slope)
