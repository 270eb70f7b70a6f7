"""Per-sample insight from the leave-one-out engine: noisy-label scores, companion diagnostics
(docs/theory.md §5) at each diagnostics readout, and a forecast of the test loss. No hooks, no I/O.

:class:`SampleRecord` keeps, for every probe sample, running sums of its loss and predicted gap
over the diagnostics readouts: O(m) floats whatever the run's length. A mislabeled sample is one
the network can only memorise: its own loss falls late, and its leave-one-out loss
``ℓ_i + g_i`` (the loss it would have, had it not been trained on) stays high all along, because
the rest of the data pull its prediction to the true class. The scores read that out.

Index convention: probe row i is sample ``probe.indices[i]`` of the user's probe data
(``indices is None``: row i is sample i).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .dynamics.spectral import alignment, information_space, normalized_margins, weight_matrices

__all__ = [
    "SampleRecord", "SCORES", "DEFAULT_SCORE", "score", "class_nuisance", "companion",
    "forecast", "suspects", "INSIGHT_KEYS",
]

# History fields written at each diagnostics readout (NaN elsewhere).
INSIGHT_KEYS = (
    "label_alignment", "residual_alignment", "information_dim", "effective_rank", "spectrum_top",
    "rho", "margin_min", "margin_q10", "margin_median", "margin_q90", "normalized_ce",
    "nuisance_mean", "forecast_final_test_loss", "forecast_best_step",
)


class SampleRecord:
    """Running per-sample sums over the diagnostics readouts, ``(m,)`` float64 each.

    Attributes:
        readouts: readouts folded in so far.
        gap, loss: the latest predicted gap ``g_i`` and loss ``ℓ_i``.
        gap_sum, loss_sum: ``Σ_t g_i(t)`` and ``Σ_t ℓ_i(t)`` over the readouts.
        margin_sum: ``Σ_t (f_{y_i} − max_{c≠y_i} f_c)`` (classification only, else zeros).
        loo_wsum, weight: ``Σ_t t·(ℓ_i + g_i)(t)`` and ``Σ_t t`` (t = 1, 2, … counts readouts), a
            leave-one-out loss average that leans on the later readouts.
        nuisance: latest nuisance share of the residual (NaN where not measured).
    """

    def __init__(self, m: int):
        z = lambda: torch.zeros(m, dtype=torch.float64)  # noqa: E731
        self.m = m
        self.readouts = 0
        self.gap, self.loss, self.gap_sum, self.loss_sum, self.margin_sum = z(), z(), z(), z(), z()
        self.loo_wsum, self.weight = z(), 0.0  # Σ_t t·(ℓ_i + g_i)(t) and Σ_t t
        self.nuisance = torch.full((m,), math.nan, dtype=torch.float64)

    def update(self, gaps: Tensor, losses: Tensor, margins: Optional[Tensor] = None,
               nuisance: Optional[Tensor] = None) -> None:
        """Fold in one readout: gaps, losses, margins ``(m,)``; nuisance ``(m',)`` for rows ``0..m'-1``."""
        g, l = gaps.detach().double().cpu().reshape(-1), losses.detach().double().cpu().reshape(-1)
        self.gap, self.loss = g, l
        self.gap_sum += g
        self.loss_sum += l
        self.loo_wsum += (self.readouts + 1) * (g + l)
        self.weight += self.readouts + 1
        if margins is not None:
            self.margin_sum += margins.detach().double().cpu().reshape(-1)
        if nuisance is not None:
            n = nuisance.detach().double().cpu().reshape(-1)
            self.nuisance[: n.shape[0]] = n
        self.readouts += 1

    def state_dict(self) -> dict:
        return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in vars(self).items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v.clone() if isinstance(v, Tensor) else v)


def _mean(total: Tensor, rec: SampleRecord) -> Tensor:
    return total / max(rec.readouts, 1)


def _rank(v: Tensor) -> Tensor:
    """Ranks in [0, 1] (ties broken by order); NaN counts as the lowest."""
    v = torch.nan_to_num(v, nan=-math.inf)
    r = torch.empty_like(v)
    r[v.argsort()] = torch.arange(v.numel(), dtype=v.dtype)
    return r / max(v.numel() - 1, 1)


# Candidate scores, higher = more likely mislabeled. The default, the rank of the mean
# leave-one-out loss plus the rank of the (negated) mean margin, had the highest mean AUROC over
# the 12 configurations of benchmarks/label_noise.py at seed 1 (0.821; the mean gap alone 0.791,
# the margin alone 0.819 at readouts); benchmarks/results/label_noise.md reports seed 0. Also
# tried there, off the monitor: the nuisance share of the residual on the final kernel of the
# whole probe (Oymak et al.), 0.74–0.86 alone, and it lowered every combination it entered.
SCORES: Dict[str, Callable[[SampleRecord], Tensor]] = {
    "gap": lambda r: r.gap,
    "mean_gap": lambda r: _mean(r.gap_sum, r),
    "loo_loss": lambda r: r.loss + r.gap,
    "mean_loo_loss": lambda r: _mean(r.loss_sum + r.gap_sum, r),
    "mean_loss": lambda r: _mean(r.loss_sum, r),
    "rank_gap_loss": lambda r: _rank(r.gap_sum) + _rank(r.loss_sum),
    "loo_margin": lambda r: -_mean(r.margin_sum, r) + _mean(r.gap_sum, r),
    "wmean_loo_loss": lambda r: r.loo_wsum / max(r.weight, 1e-300),
    "rank_loo_aum": lambda r: _rank(r.loss_sum + r.gap_sum) + _rank(-r.margin_sum),
    "rank_loo_aum_gap": lambda r: _rank(r.loss_sum + r.gap_sum) + _rank(-r.margin_sum) + _rank(r.gap_sum),
}
DEFAULT_SCORE = "rank_loo_aum"


def score(record: SampleRecord, name: str = DEFAULT_SCORE) -> Tensor:
    """Noisy-label score per probe row ``(m,)``, higher = more suspect.

    Args:
        record: the monitor's :class:`SampleRecord`.
        name: one of :data:`SCORES`.

    Example:
        >>> rec = SampleRecord(3)
        >>> rec.update(torch.tensor([0.1, 2.0, 0.0]), torch.tensor([0.2, 1.0, 0.1]), torch.tensor([2.0, -1.0, 1.0]))
        >>> score(rec).tolist()
        [0.5, 2.0, 0.5]
    """
    if name not in SCORES:
        raise ValueError(f"Unknown score {name!r}; use one of {sorted(SCORES)}.")
    if record.readouts == 0:
        return torch.full((record.m,), math.nan, dtype=torch.float64)
    return SCORES[name](record)


def class_nuisance(theta: Tensor, residual: Tensor, *, alpha: float = 0.1) -> Tensor:
    """Nuisance share of each sample's residual on the output-summed kernel ``K = Σ_a Θ_{ia,ja}``.

    With ``Θ ≈ K ⊗ I_k`` the information space of Θ is that of K for every output column, so
    ``Π_I r`` projects each column of r ``(m, k)`` on K's top eigenvectors (``λ ≥ α·λ_max``):
    an ``(m, m)`` eigenproblem instead of ``(m·k, m·k)``.

    Args:
        theta: probe kernel ``(m, k, m, k)``.
        residual: r ``(m, k)``.

    Returns:
        ``(m,)`` in ``[0, 1]``, as :func:`gramhook.dynamics.spectral.nuisance_scores`.
    """
    m, k = theta.shape[0], theta.shape[1]
    kmat = torch.einsum("iaja->ij", theta.detach()).double()
    e, q = torch.linalg.eigh(0.5 * (kmat + kmat.T))
    keep = e >= alpha * e.max().clamp(min=0)
    qi = q[:, keep]
    r = residual.detach().double().reshape(m, -1)
    info = qi @ (qi.T @ r)
    num = (r - info).pow(2).sum(1)
    den = num + info.pow(2).sum(1)
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(den, math.nan))


def margins_of(outputs: Tensor, targets: Tensor) -> Optional[Tensor]:
    """``f_y − max_{c≠y} f_c`` per sample ``(m,)`` for class-index targets, else ``None``."""
    if targets.dim() != 1 or targets.dtype not in (torch.int64, torch.int32) or outputs.shape[-1] < 2:
        return None
    out = outputs.detach().reshape(outputs.shape[0], -1).double()
    y = targets.reshape(-1, 1).long()
    own = out.gather(1, y)[:, 0]
    return own - out.scatter(1, y, float("-inf")).amax(1)


def companion(theta: Optional[Tensor], residual: Tensor, outputs: Tensor, targets: Tensor,
              named_parameters, *, alpha: float = 0.1) -> Tuple[Dict[str, float], Optional[Tensor], Optional[Tensor]]:
    """docs/theory.md §5 on the sub-probe kernel at one readout.

    Args:
        theta: Θ on the first m_K probe samples ``(m_K, k, m_K, k)`` (``None``: margins only).
        residual: r on the whole probe ``(m, k)``.
        outputs, targets: the probe's outputs ``(m, k)`` and targets.
        named_parameters: the model's ``named_parameters()`` (for ρ).

    Returns:
        ``(fields, spectrum, nuisance)``: history fields (NaN where undefined), the eigenvalues
        of ``Θ/m_K`` descending ``(m_K·k,)`` or ``None``, and the nuisance share ``(m_K,)`` or ``None``.
    """
    out = {key: math.nan for key in INSIGHT_KEYS if not key.startswith("forecast")}
    spectrum = nuisance = None
    if theta is not None:
        m_k, k = theta.shape[0], theta.shape[1]
        space = information_space(theta, alpha=alpha)
        spectrum = space.eigenvalues
        r = residual[:m_k].reshape(m_k, k)
        out.update(residual_alignment=alignment(space, r), information_dim=float(space.info_dim),
                   effective_rank=space.effective_rank, spectrum_top=float(spectrum[0]))
        labels = _label_vector(targets[:m_k], outputs[:m_k])
        if labels is not None:
            out["label_alignment"] = alignment(space, labels)
        nuisance = class_nuisance(theta, r, alpha=alpha)
        out["nuisance_mean"] = float(torch.nanmean(nuisance))
    if margins_of(outputs, targets) is not None:
        weights = weight_matrices(named_parameters)
        if weights:
            stats = normalized_margins(weights, outputs, targets)
            out.update(rho=stats.rho, margin_min=stats.min, margin_q10=stats.q10,
                       margin_median=stats.median, margin_q90=stats.q90,
                       normalized_ce=stats.normalized_ce)
    return out, spectrum, nuisance


def _label_vector(targets: Tensor, outputs: Tensor) -> Optional[Tensor]:
    """Labels as a per-sample vector ``(m, k)``: one-hot for class indices, else the targets."""
    k = outputs.reshape(outputs.shape[0], -1).shape[1]
    if targets.dim() == 1 and not targets.is_floating_point():
        return torch.nn.functional.one_hot(targets.long(), k).to(outputs.dtype)
    if targets.numel() == outputs.numel():
        return targets.reshape(outputs.shape[0], -1).to(outputs.dtype)
    return None


def forecast(steps: Sequence[float], values: Sequence[float], total_steps: int) -> Tuple[float, float]:
    """Extrapolate the predicted test loss to the end of the schedule.

    Fits ``v(s) = a + b·log s`` by least squares to the latter half of the readouts so far (at
    least 4 readouts in all) and evaluates it at ``total_steps``, clamped to
    ``[0.5·min v, 2·max v]`` of the points fitted. The best step is ``total_steps`` while the fit
    falls (``b < 0``), else the step of the lowest value so far. On ``benchmarks/forecast.py``
    this beat a quadratic in ``log s`` (which bends wildly when extrapolated) and holding the
    current value (``benchmarks/results/forecast.md``).

    Args:
        steps, values: the history's ``step`` and ``predicted_test_loss`` (non-finite entries
            are skipped).
        total_steps: the schedule's last step.

    Returns:
        ``(forecast_final_test_loss, forecast_best_step)``; NaN when there are too few points.

    Example:
        >>> s = [10, 20, 40, 80, 160]
        >>> final, best = forecast(s, [3.0 - 0.3 * math.log(x) for x in s], 320)
        >>> round(final, 4), best
        (1.2695, 320.0)
    """
    pts = [(float(s), float(v)) for s, v in zip(steps, values) if s > 0 and math.isfinite(v)]
    if len(pts) < 4 or total_steps is None:
        return math.nan, math.nan
    lowest = min(pts, key=lambda p: p[1])[0]
    if total_steps <= pts[-1][0]:
        return pts[-1][1], lowest
    fit = pts[len(pts) // 2:]
    ls = torch.tensor([p[0] for p in fit], dtype=torch.float64).log()
    v = torch.tensor([p[1] for p in fit], dtype=torch.float64)
    design = torch.stack([torch.ones_like(ls), ls], 1)
    a, b = torch.linalg.lstsq(design, v[:, None]).solution[:, 0].tolist()
    final = min(max(a + b * math.log(total_steps), 0.5 * float(v.min())), 2.0 * float(v.max()))
    return final, float(total_steps) if b < 0 else lowest


def suspects(index: Tensor, scores: Tensor, targets: Tensor, record: SampleRecord, k: int) -> List[Dict[str, float]]:
    """The ``k`` highest-scoring probe samples, highest first.

    Args:
        index: ``(m,)`` positions of the probe samples in the user's data.
        scores: ``(m,)`` noisy-label scores (NaN ranks last).
        targets: the probe's targets ``(m, ...)``; class indices give a ``label``.
        record: the per-sample record whose latest ``gap`` and ``loss`` are reported.

    Returns:
        dicts with ``index``, ``score``, ``label`` (NaN for non-class targets), ``gap``, ``loss``
        and ``row`` (the probe row).
    """
    order = torch.nan_to_num(scores, nan=-math.inf).argsort(descending=True)[:k]
    y = targets.detach().cpu()
    classes = y.dim() == 1 and not y.is_floating_point()
    return [{"index": int(index[i]), "score": float(scores[i]), "label": int(y[i]) if classes else math.nan,
             "gap": float(record.gap[i]), "loss": float(record.loss[i]), "row": int(i)} for i in order.tolist()]
