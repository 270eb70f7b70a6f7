"""What one readout of a :class:`gramhook.GramMonitor` returns: a :class:`Measurement`.

``monitor.history`` is a list of them, ``monitor.measure()`` returns one. Sinks, reports and the
framework adapters take :meth:`Measurement.as_dict` (one float per field, NaN where a readout did
not measure it).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Mapping, Tuple

__all__ = ["Measurement", "HISTORY_KEYS"]

_NAN = math.nan


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One readout. Losses are per-sample means in the units of the monitor's ``loss``.

    Attributes:
        step: optimizer steps taken when it was read out.
        time: flow time ∑ dt of the optimizer steps so far (``gramhook.optim.step_dt``).
        train_loss: train loss (eval mode): the train sample's mean, else the probe's.
        predicted_gap: predicted generalization gap, test minus train loss.
        predicted_gap_se: standard error of ``predicted_gap`` over the probe.
        predicted_test_loss: ``train_loss + predicted_gap``.
        probe_train_loss, probe_gap: the probe's own mean loss and mean gap (before the
            train-sample regression).
        gap_slope: slope of the per-sample gap on the per-sample train loss.
        gap_effective_samples: Kish's effective sample size of the probe's gap.
        perturbation: ε̄, the mean perturbation of a left-out sample (diagnostics readouts).
        contraction: c̄, the mean contraction rate (diagnostics readouts).
        alignment, benign_fraction, kernel_fidelity, effective_gram_gap: statistics of the
            effective Gram matrix K_n on the sub-probe (diagnostics readouts).
        injected: probe-sample injections the per-step engine made so far.
        injection_simulated: 1.0 when probe injection is simulated (no probe sample recognised
            in the training batches), 0.0 when matched.
        linear_growth: how far an uninjected perturbation, contracted by the same steps as the
            probe's, has grown since its smallest norm (per-step engine). About 1 or less while
            the first-order leave-one-out dynamics is stable; 10 or more means it is unstable
            (step size times curvature past the optimizer's stability limit, as at the edge of
            stability) and the predicted gap is not to be trusted.
        monitor_seconds: cost of this readout; overhead: monitor time over your time so far.
        label_alignment … forecast_best_step: the per-sample insight fields
            (:data:`gramhook.insight.INSIGHT_KEYS`; diagnostics readouts of the per-step engine).
    """

    step: int
    time: float = _NAN
    train_loss: float = _NAN
    predicted_gap: float = _NAN
    predicted_gap_se: float = _NAN
    predicted_test_loss: float = _NAN
    probe_train_loss: float = _NAN
    probe_gap: float = _NAN
    gap_slope: float = _NAN
    gap_effective_samples: float = _NAN
    perturbation: float = _NAN
    contraction: float = _NAN
    alignment: float = _NAN
    benign_fraction: float = _NAN
    kernel_fidelity: float = _NAN
    effective_gram_gap: float = _NAN
    injected: float = _NAN
    injection_simulated: float = _NAN
    linear_growth: float = _NAN
    monitor_seconds: float = _NAN
    overhead: float = _NAN
    label_alignment: float = _NAN
    residual_alignment: float = _NAN
    information_dim: float = _NAN
    effective_rank: float = _NAN
    spectrum_top: float = _NAN
    rho: float = _NAN
    margin_min: float = _NAN
    margin_q10: float = _NAN
    margin_median: float = _NAN
    margin_q90: float = _NAN
    normalized_ce: float = _NAN
    nuisance_mean: float = _NAN
    forecast_final_test_loss: float = _NAN
    forecast_best_step: float = _NAN

    @property
    def band(self) -> Tuple[float, float]:
        """``(lo, hi)``: the predicted test loss ± 2 standard errors of the gap."""
        return (self.predicted_test_loss - 2.0 * self.predicted_gap_se,
                self.predicted_test_loss + 2.0 * self.predicted_gap_se)

    def as_dict(self) -> Dict[str, float]:
        """Every field by name (``step`` an int, the rest floats)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, float]) -> "Measurement":
        """The inverse of :meth:`as_dict`; keys that are not fields (older histories) are ignored."""
        return cls(**{k: v for k, v in values.items() if k in _FIELDS})


_FIELDS = frozenset(f.name for f in dataclasses.fields(Measurement))
HISTORY_KEYS = tuple(f.name for f in dataclasses.fields(Measurement))
