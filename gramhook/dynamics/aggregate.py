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

import torch
from torch import Tensor

__all__ = ["Estimate", "regression_estimate", "effective_samples", "MAX_SLOPE"]

MAX_SLOPE = 5.0


class Estimate(NamedTuple):
    train_loss: float
    gap: float
    se: float
    slope: float
    history_slope: float = 0.0


def effective_samples(gaps: Tensor) -> float:
    """Kish's effective sample size of the probe's gap, ``(Σ g⁺)² / Σ (g⁺)²`` with ``g⁺ = max(g, 0)``.

    It is m when every probe sample carries the same gap and 1 when one sample carries all of it.
    The relative standard error of the mean gap is about ``sqrt(1/ESS − 1/m)``, so a small ESS
    says the estimate rests on a handful of samples: on an MNIST MLP (n = 500, cross-entropy, SGD)
    trained to zero loss, 5% of the samples carry 73% of the gap and random 64-sample probes have
    ESS 3–7 (10th–90th percentile). NaN when no sample has a positive gap.
    """
    g = gaps.double().clamp(min=0)
    sq = float((g * g).sum())
    return float(g.sum()) ** 2 / sq if sq > 0 else math.nan


def _slopes(x: Tensor, g: Tensor, bound: Tensor) -> Tensor:
    """Least-squares slopes of g on the columns of x (both centred), non-negative and bounded.

    A covariate whose slope comes out negative is dropped and the rest refitted (a gap that falls
    with the loss is noise here); each slope is then clipped to its ``bound``.
    """
    active = list(range(x.shape[1]))
    beta = torch.zeros(x.shape[1], dtype=x.dtype)
    while active:
        xa = x[:, active]
        gram = xa.T @ xa
        if float(torch.linalg.matrix_rank(gram, rtol=1e-10)) < len(active):
            active.pop()          # the last covariate adds nothing independent
            continue
        sol = torch.linalg.solve(gram, xa.T @ g)
        if bool((sol >= 0).all()):
            beta[active] = sol
            break
        active.pop(int(torch.argmin(sol)))
    return torch.minimum(beta, bound)


def regression_estimate(probe_losses: Tensor, gaps: Tensor, sample_losses: Optional[Tensor] = None,
                        probe_history: Optional[Tensor] = None, sample_history: Optional[Tensor] = None) -> Estimate:
    """Train loss, gap, the gap's standard error and the slopes.

    Args:
        probe_losses: per-sample train losses ``ℓ_i`` of the probe ``(m,)``.
        gaps: per-sample gaps ``g_i`` of the probe ``(m,)``.
        sample_losses: train losses of a larger sample ``(L,)`` of the training set (it may contain
            the probe), or ``None``.
        probe_history, sample_history: a second covariate on the probe ``(m,)`` and on the larger
            sample ``(L,)``: the monitor passes each sample's loss integrated over training time,
            ``∫ ℓ_i dt``. Samples the network memorized late have small losses now but large
            integrals and large gaps (on MNIST n=500 CE, correlation with the leave-one-out gap
            0.77 against 0.45–0.59 for the current loss).

    Without ``sample_losses``: ``(ℓ̄, ḡ, std(g)/√m, 0)``. With them: the train loss is their mean
    ``ℓ̄_L`` and the gap ``ḡ + Σ_j β_j (x̄_{j,L} − x̄_j)``, where β are the least-squares slopes of g
    on the covariates over the probe, non-negative (a gap that falls with the train loss is noise)
    and bounded (ℓ's by MAX_SLOPE, the history's by ``2·std(g)/std(x)`` over the probe): a huge
    slope from a near-constant covariate would amplify noise. Its variance is ``var(g − Σ β_j x_j)/m + βᵀ Cov_L(x) β / L``.
    """
    m = gaps.shape[0]
    lp, g = probe_losses.double(), gaps.double()
    train_loss, gap = float(lp.mean()), float(g.mean())
    se = float(g.std(unbiased=True)) / math.sqrt(m) if m > 1 else math.nan
    if sample_losses is None or m < 3 or sample_losses.numel() < 2:
        return Estimate(train_loss, gap, se, 0.0)
    cols, big_cols = [lp], [sample_losses.double()]
    if probe_history is not None and sample_history is not None:
        cols.append(probe_history.double())
        big_cols.append(sample_history.double())
    x, big = torch.stack(cols, 1), torch.stack(big_cols, 1)
    xc = x - x.mean(0)
    # A covariate that is constant over the probe (to rounding) carries no slope.
    usable = [j for j in range(x.shape[1]) if float((xc[:, j] ** 2).sum()) > 1e-12 * max(1.0, float((x[:, j] ** 2).sum()))]
    beta = torch.zeros(x.shape[1], dtype=torch.float64)
    if usable:
        # ℓ's slope is capped at MAX_SLOPE; another covariate's at twice the largest slope a
        # univariate fit could give, std(g)/std(x_j) (so a near-constant column cannot blow up).
        bound = 2 * float(g.std(unbiased=True)) / x.std(0, unbiased=True).clamp(min=1e-300)
        bound[0] = MAX_SLOPE
        beta[usable] = _slopes(xc[:, usable], g - g.mean(), bound[usable])
    l_train = float(big[:, 0].mean())
    resid = g - x @ beta
    cov = torch.cov(big.T).reshape(x.shape[1], x.shape[1])
    var_gap = float(resid.var(unbiased=True)) / m + float(beta @ cov @ beta) / big.shape[0]
    gap = gap + float((big.mean(0) - x.mean(0)) @ beta)
    return Estimate(l_train, gap, math.sqrt(max(var_gap, 0.0)), float(beta[0]),
                    float(beta[1]) if beta.numel() > 1 else 0.0)
