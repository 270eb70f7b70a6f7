"""Lightning: ``Trainer(callbacks=[GramMonitorCallback()])``.

At the start of training the callback attaches a :class:`gramhook.GramMonitor` to the
LightningModule and its (unwrapped) optimizer; the probe defaults to the train dataloader's
dataset. Each measurement goes to every logger of the trainer under ``gramhook/…`` and into
``trainer.callback_metrics`` (so ``ModelCheckpoint(monitor="gramhook/predicted_test_loss")``
works). ``stop=True`` sets ``trainer.should_stop`` through
``trainer.strategy.reduce_boolean_decision`` as Lightning's EarlyStopping does. The monitor's
state travels in Lightning checkpoints, so a resumed fit continues its history. Under a
multi-process strategy (``"ddp"``) the monitors of the ranks are coordinated by
:class:`gramhook.integrations.ddp.DistributedGramMonitor`.

The per-step engine sees the model's training forwards through a forward pre-hook on the
LightningModule: call ``self(x)`` in ``training_step`` (or pass ``module="net"`` for the submodule
you call).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - guarded import
    raise ImportError("gramhook.integrations.lightning needs Lightning: pip install gramhook[lightning]") from e

from .. import GramMonitor
from ._common import metrics_of, split_options, unwrap_optimizer

__all__ = ["GramMonitorCallback"]


class GramMonitorCallback(pl.Callback):
    """Attach a :class:`gramhook.GramMonitor` to a Lightning fit.

    Args:
        probe: training samples for the probe (default: the train dataloader's dataset).
        n_train: the training set size (default: the length of that dataset).
        module: the module whose forward the training step calls: ``None`` (the LightningModule),
            an attribute name, or a module.
        stop: stop the fit once the prediction has not improved for ``patience`` measurements.
        patience, min_delta, metric: see :meth:`gramhook.GramMonitor.should_stop`.
        prefix: the prefix of the logged metric names.
        **options: any other :class:`gramhook.GramMonitor` argument (``every``, ``loss``,
            ``logdir``, ``probe_size``, ``config=MonitorConfig(...)``).

    Attributes:
        monitor: the :class:`gramhook.GramMonitor` (``None`` before training starts).
    """

    def __init__(self, *, probe=None, n_train: Optional[int] = None, module: Union[None, str, nn.Module] = None,
                 stop: bool = False, patience: int = 5, min_delta: float = 0.0,
                 metric: str = "predicted_test_loss", prefix: str = "gramhook/", **options: Any):
        super().__init__()
        self.rule = split_options(stop, patience, min_delta, metric)
        self.probe, self.n_train, self.module, self.prefix, self.options = probe, n_train, module, prefix, options
        self.monitor: Optional[GramMonitor] = None
        self._coordinator = None
        self._pending: Optional[dict] = None
        self._logged = 0

    # -- attach ------------------------------------------------------------------------------
    def _model(self, pl_module: "pl.LightningModule") -> nn.Module:
        if self.module is None:
            return pl_module
        if isinstance(self.module, str):
            return getattr(pl_module, self.module)
        return self.module

    def _probe(self, trainer: "pl.Trainer"):
        if self.probe is not None:
            return self.probe
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError("GramMonitorCallback found no single train DataLoader to draw the probe from; "
                             "pass probe=(x, y) or probe=dataset.")
        return dataset

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.optimizers:
            raise ValueError("GramMonitorCallback needs an optimizer (configure_optimizers returned none).")
        optimizer = unwrap_optimizer(trainer.optimizers[0])
        model, probe = self._model(pl_module), self._probe(trainer)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            from .ddp import DistributedGramMonitor

            self._coordinator = DistributedGramMonitor(model, optimizer, probe=probe, n_train=self.n_train,
                                                       **self.options)
            self.monitor = self._coordinator.monitor
        else:
            self.monitor = GramMonitor(model, optimizer, probe=probe, n_train=self.n_train, **self.options)
        if self._pending is not None:
            (self._coordinator or self.monitor).load_state_dict(self._pending)
            self._logged, self._pending = len(self.monitor.history), None
        else:
            self._logged = 0
        self._log(trainer)

    # -- every batch ---------------------------------------------------------------------------
    def _log(self, trainer: "pl.Trainer") -> None:
        history = self.monitor.history
        for record in history[self._logged:]:
            metrics = metrics_of(record, self.prefix)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=record.step)
            for key, value in metrics.items():
                trainer.callback_metrics[key] = torch.tensor(value)
        self._logged = len(history)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None:
            return
        self._log(trainer)
        if self.rule.enabled:
            decision = trainer.strategy.reduce_boolean_decision(self.rule.decide(self.monitor), all=False)
            trainer.should_stop = trainer.should_stop or decision

    def on_train_end(self, trainer: "pl.Trainer", pl_module) -> None:
        if self.monitor is not None:
            self._log(trainer)
            (self._coordinator or self.monitor).close()

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        if self.monitor is not None:
            return {"monitor": self.monitor.state_dict()}
        return {"monitor": self._pending} if self._pending is not None else {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = state_dict.get("monitor")
        if state is None:
            return
        if self.monitor is not None:
            (self._coordinator or self.monitor).load_state_dict(state)
            self._logged = len(self.monitor.history)
        else:
            self._pending = state    # restored before training starts; applied at attach
