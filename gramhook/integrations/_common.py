"""What the framework adapters share: option splitting, metric records, unwrapping optimizers."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional

import torch

__all__ = ["StopRule", "split_options", "metrics_of", "unwrap_optimizer"]


@dataclasses.dataclass(frozen=True)
class StopRule:
    """Early stopping on the monitor's prediction (:meth:`gramhook.GramMonitor.should_stop`).

    Attributes:
        enabled: whether the adapter stops the framework's training loop.
        patience: measurements without improvement before stopping.
        min_delta: the improvement that counts.
        metric: the history key watched.
    """

    enabled: bool = False
    patience: int = 5
    min_delta: float = 0.0
    metric: str = "predicted_test_loss"

    def __post_init__(self):
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"`patience` must be a positive int, got {self.patience!r}.")

    def decide(self, monitor) -> bool:
        return bool(self.enabled and monitor is not None
                    and monitor.should_stop(self.patience, self.min_delta, self.metric))


def split_options(stop: bool, patience: int, min_delta: float, metric: str) -> StopRule:
    return StopRule(bool(stop), patience, float(min_delta), metric)


def metrics_of(record, prefix: str = "gramhook/") -> Dict[str, float]:
    """The finite fields of a :class:`gramhook.Measurement`, keys prefixed (``gramhook/predicted_test_loss``)."""
    return {prefix + k: float(v) for k, v in record.as_dict().items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a framework's wrapper (``LightningOptimizer``,
    accelerate's ``AcceleratedOptimizer``, ...)."""
    # AcceleratedOptimizer subclasses torch.optim.Optimizer itself: unwrap while there is an inner one.
    for _ in range(8):
        inner: Optional[Any] = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"Could not find a torch.optim.Optimizer inside {type(optimizer).__name__}; "
                        "pass the underlying optimizer.")
    return optimizer
