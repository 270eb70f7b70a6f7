"""Hugging Face Trainer: ``Trainer(..., callbacks=[GramMonitorCallback()])``.

In ``on_train_begin`` the callback attaches a :class:`gramhook.GramMonitor` to the Trainer's model
and optimizer (accelerate's ``AcceleratedOptimizer`` unwrapped). The probe defaults to the
Trainer's train dataset, each sample collated by the Trainer's data collator; the target is the
``labels`` entry and the prediction ``outputs.logits`` (:mod:`gramhook.adapt`). Give every sample
the same shape (``padding="max_length"``): training batches of another shape are not seen by the
per-step engine.

Each measurement is added to the Trainer's next log (``trainer.state.log_history``, and every
``report_to`` callback placed after this one) under ``gramhook/…``. ``stop=True`` sets
``control.should_training_stop`` once the prediction stops improving, the decision reduced over
the ranks when training is distributed (the ranks' monitors are then coordinated by
:class:`gramhook.integrations.ddp.DistributedGramMonitor`). The callback is an
``ExportableState``: a checkpoint records it, and the monitor's state is saved in the
checkpoint folder (``gramhook_monitor.pt``), so a resumed ``train(resume_from_checkpoint=...)``
continues the history (found through the recorded path with
``restore_callback_states_from_checkpoint=True``, else in ``output_dir/checkpoint-<step>``).
"""
from __future__ import annotations

import json
import os
import uuid
import warnings
import weakref
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # pragma: no cover - guarded import
    raise ImportError("gramhook.integrations.huggingface needs transformers: pip install gramhook[hf]") from e

from .. import GramMonitor
from ._common import metrics_of, split_options, unwrap_optimizer

__all__ = ["GramMonitorCallback"]

STATE_FILE = "gramhook_monitor.pt"
_live: "weakref.WeakValueDictionary[str, GramMonitorCallback]" = weakref.WeakValueDictionary()


class _Collated(Dataset):
    """Each sample of ``data`` collated alone by ``collate`` (the batch dimension removed)."""

    def __init__(self, data, collate):
        self.data, self.collate = data, collate

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        batch = self.collate([self.data[i]])
        return {k: v[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


class GramMonitorCallback(TrainerCallback, ExportableState):
    """Attach a :class:`gramhook.GramMonitor` to a ``transformers.Trainer``.

    Args:
        probe: training samples for the probe (default: the Trainer's train dataset, collated
            by its data collator).
        n_train: the training set size (default: the length of the train dataset).
        stop: stop training once the prediction has not improved for ``patience`` measurements.
        patience, min_delta, metric: see :meth:`gramhook.GramMonitor.should_stop`.
        prefix: the prefix of the logged metric names.
        **options: any other :class:`gramhook.GramMonitor` argument (``every``, ``probe_size``,
            ``config=MonitorConfig(output=..., inputs=...)``, ...).

    Attributes:
        monitor: the :class:`gramhook.GramMonitor` (``None`` before training starts).
    """

    def __init__(self, *, probe=None, n_train: Optional[int] = None, stop: bool = False, patience: int = 5,
                 min_delta: float = 0.0, metric: str = "predicted_test_loss", prefix: str = "gramhook/",
                 _token: Optional[str] = None, **options: Any):
        origin = None
        if _token is not None:
            # Recreated by the Trainer from a checkpoint (restore_callback_states_from_checkpoint):
            # it replaces the user's callback not yet attached, whose options it takes and whose
            # .monitor it fills; else the one that saved the checkpoint.
            waiting = [cb for cb in list(_live.values()) if cb.monitor is None and cb._origin is None
                       and cb._token != _token]
            origin = waiting[-1] if waiting else _live.get(_token)
        if origin is not None:
            probe, n_train, options = origin.probe, origin.n_train, {**options, **origin.options}
        self.rule = split_options(stop, patience, min_delta, metric)
        self.probe, self.n_train, self.prefix, self.options = probe, n_train, prefix, options
        self.monitor: Optional[GramMonitor] = None
        self._origin = origin
        self._token = uuid.uuid4().hex
        _live[self._token] = self
        self._coordinator = None
        self._logged = 0
        self._pending: Dict[str, float] = {}
        self._state_file: Optional[str] = None
        self._checkpoint_dir: Optional[str] = None

    # -- attach --------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("GramMonitorCallback needs the Trainer's model and optimizer in on_train_begin.")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        optimizer = unwrap_optimizer(optimizer)
        probe = self.probe
        if probe is None:
            if train_dataloader is None or getattr(train_dataloader, "dataset", None) is None:
                raise ValueError("GramMonitorCallback found no train dataset: pass probe=.")
            probe = _Collated(train_dataloader.dataset, train_dataloader.collate_fn)
        dist = torch.distributed
        if args.world_size > 1 and dist.is_available() and dist.is_initialized():
            from .ddp import DistributedGramMonitor

            self._coordinator = DistributedGramMonitor(model, optimizer, probe=probe, n_train=self.n_train,
                                                       **self.options)
            self.monitor = self._coordinator.monitor
        else:
            self.monitor = GramMonitor(model, optimizer, probe=probe, n_train=self.n_train, **self.options)
        self._logged = 0
        if self._state_file is None and state.global_step > 0:
            # Resuming without restore_callback_states_from_checkpoint: the usual checkpoint folder.
            candidate = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            self._state_file = candidate if os.path.isfile(candidate) else None
        if self._state_file is not None:
            if os.path.isfile(self._state_file):
                saved = torch.load(self._state_file, map_location=self.monitor.device, weights_only=False)
                (self._coordinator or self.monitor).load_state_dict(saved)
                self._logged = len(self.monitor.history)
            else:
                warnings.warn(f"gramhook: the monitor state {self._state_file} of the checkpoint is missing; "
                              "the history starts again.", RuntimeWarning)
        if self._origin is not None:
            self._origin.monitor = self.monitor
        if self._collect():   # the measurement at attach, before any log event of this run
            state.log_history.append({**self._pending, "step": state.global_step})
            self._pending = {}

    # -- every step ----------------------------------------------------------------------------
    def _collect(self) -> bool:
        history = self.monitor.history
        for record in history[self._logged:]:
            self._pending.update(metrics_of(record, self.prefix))
        self._logged = len(history)
        return bool(self._pending)

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is None:
            return control
        # A checkpoint of this step (saved next) goes here; state() records the path.
        self._checkpoint_dir = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self._collect():
            control.should_log = True
        decision = self.rule.decide(self.monitor)
        dist = torch.distributed
        if self.rule.enabled and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([float(decision)], device=self.monitor.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            decision = bool(flag.item() > 0)
        if decision:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending:
            return control
        if logs is not None:
            logs.update(self._pending)
        if state.log_history:
            state.log_history[-1].update(self._pending)
        self._pending = {}
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            if self._collect():
                state.log_history.append({**self._pending, "step": state.global_step})
                self._pending = {}
            (self._coordinator or self.monitor).close()
        return control

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        """The checkpoint's record: JSON-able options, and the path of the monitor's saved state."""
        keep = {k: v for k, v in self.options.items() if _jsonable(v)}
        if self.n_train is not None:
            keep["n_train"] = self.n_train
        return {"args": {**keep, "stop": self.rule.enabled, "patience": self.rule.patience,
                         "min_delta": self.rule.min_delta, "metric": self.rule.metric, "prefix": self.prefix,
                         "_token": self._token},
                "attributes": {"_state_file": self._next_state_file}}

    @property
    def _next_state_file(self) -> Optional[str]:
        return None if self._checkpoint_dir is None else os.path.abspath(os.path.join(self._checkpoint_dir, STATE_FILE))

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is not None and args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                torch.save(self.monitor.state_dict(), os.path.join(folder, STATE_FILE))
        return control
