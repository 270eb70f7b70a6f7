"""PyTorch Ignite: ``GramMonitorHandler(model, optimizer).attach(trainer)``.

The handler runs on ``Events.ITERATION_COMPLETED``: it puts the latest measurement into
``engine.state.metrics`` under ``gramhook/…`` (where Ignite's loggers, e.g.
``OutputHandler(metric_names="all")``, find it) and, with ``stop=True``, calls
``engine.terminate()`` once the prediction has not improved for ``patience`` measurements. The
monitor is built when the engine starts; without ``probe`` it is drawn from the engine's
dataloader's dataset. ``state_dict``/``load_state_dict`` make the handler checkpointable with
``ignite.handlers.Checkpoint``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

try:
    from ignite.engine import Engine, Events
except ImportError as e:  # pragma: no cover - guarded import
    raise ImportError("gramhook.integrations.ignite needs pytorch-ignite: pip install gramhook[ignite]") from e

from .. import GramMonitor
from ._common import metrics_of, split_options, unwrap_optimizer

__all__ = ["GramMonitorHandler"]


class GramMonitorHandler:
    """Attach a :class:`gramhook.GramMonitor` to an Ignite training engine.

    Args:
        model, optimizer: what the engine trains.
        probe: training samples for the probe (default: the dataset of the engine's dataloader).
        n_train: the training set size (default: that dataset's length).
        stop: terminate the engine once the prediction has not improved for ``patience`` measurements.
        patience, min_delta, metric: see :meth:`gramhook.GramMonitor.should_stop`.
        prefix: the prefix of the metric names in ``engine.state.metrics``.
        **options: any other :class:`gramhook.GramMonitor` argument.

    Attributes:
        monitor: the :class:`gramhook.GramMonitor` (``None`` until the engine starts).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, probe=None,
                 n_train: Optional[int] = None, stop: bool = False, patience: int = 5, min_delta: float = 0.0,
                 metric: str = "predicted_test_loss", prefix: str = "gramhook/", **options: Any):
        self.model, self.optimizer = model, unwrap_optimizer(optimizer)
        self.rule = split_options(stop, patience, min_delta, metric)
        self.probe, self.n_train, self.prefix, self.options = probe, n_train, prefix, options
        self.monitor: Optional[GramMonitor] = None
        self._pending: Optional[dict] = None

    def attach(self, engine: Engine) -> "GramMonitorHandler":
        """Register on ``STARTED`` (build the monitor), ``ITERATION_COMPLETED`` and ``COMPLETED``."""
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._complete)
        return self

    def _start(self, engine: Engine) -> None:
        if self.monitor is not None:
            return
        probe = self.probe
        if probe is None:
            probe = getattr(engine.state.dataloader, "dataset", None)
            if probe is None:
                raise ValueError("GramMonitorHandler found no dataset in the engine's dataloader: pass probe=.")
        self.monitor = GramMonitor(self.model, self.optimizer, probe=probe, n_train=self.n_train, **self.options)
        if self._pending is not None:
            self.monitor.load_state_dict(self._pending)
            self._pending = None
        self._publish(engine)

    def _publish(self, engine: Engine) -> None:
        if self.monitor.history:
            engine.state.metrics.update(metrics_of(self.monitor.history[-1], self.prefix))

    def __call__(self, engine: Engine) -> None:
        if self.monitor is None:
            return
        self._publish(engine)
        if self.rule.decide(self.monitor):
            engine.terminate()

    def _complete(self, engine: Engine) -> None:
        if self.monitor is not None:
            self.monitor.detach()

    def state_dict(self) -> dict:
        return self.monitor.state_dict() if self.monitor is not None else dict(self._pending or {})

    def load_state_dict(self, state: dict) -> None:
        if self.monitor is not None:
            self.monitor.load_state_dict(state)
        else:
            self._pending = state
