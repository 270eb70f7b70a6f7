"""Plain ``DistributedDataParallel``: one :class:`gramhook.GramMonitor` per rank, one prediction.

Each rank's per-step engine follows the probe samples that *its* batches train (a
``DistributedSampler`` shards them) with contraction rows from its own batch; the injections use
the global batch size (``.grad`` is averaged over all ranks). The leave-one-out dynamics is
linear in the perturbations, so the run's δ_i is the sum of the ranks' δ_i. At each measurement
step, on every rank, in a fixed order:

1. the engines' states are summed onto rank ``src`` (``all_reduce``; the other
   ranks restart from zero, so later sums stay exact);
2. rank ``src`` reads out (a failure there is reported and skipped, as in a single process);
3. its record, or ``None``, is broadcast and appended to every rank's history.

A failure on any rank is caught locally and that rank contributes zeros, so every rank still
enters each collective: no deadlock, and every rank holds the same history, hence the same
:meth:`should_stop` at the same step. With ``every=None`` rank ``src`` decides at each step
whether a measurement is due (its time budget) and broadcasts the decision.

Cost per measurement: one ``all_reduce`` of ``2·m·D`` floats (D: the engine's coordinates; use a
sketch, ``coordinates=4096``, for large models) and one small broadcast.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import GramMonitor
from ..config import MonitorConfig

__all__ = ["DistributedGramMonitor"]


def _never(step: int) -> bool:
    return False


class DistributedGramMonitor:
    """A :class:`gramhook.GramMonitor` on every rank of a process group, measured together.

    Args:
        model: the module (a ``DistributedDataParallel`` wrapper is unwrapped).
        optimizer: the rank's optimizer.
        probe, n_train: as :class:`gramhook.GramMonitor`; the same on every rank (the probe is
            drawn with the same seed).
        every: the measurement schedule (int, callable or ``None``), as :class:`gramhook.MonitorConfig`.
        src: the rank that reads out and whose record every rank receives.
        group: the process group (default: the world).
        **options: other :class:`gramhook.GramMonitor` arguments.

    Attributes:
        monitor: this rank's :class:`gramhook.GramMonitor`; its ``history`` is the same on every rank.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, probe, n_train: Optional[int] = None,
                 every=None, src: int = 0, group=None, **options: Any):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedGramMonitor needs an initialized process group "
                               "(torch.distributed.init_process_group); use GramMonitor in one process.")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        MonitorConfig(every=every)    # the schedule is checked like a single monitor's
        self.every, self.src, self.group = every, src, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.monitor = GramMonitor(model, optimizer, probe=probe, n_train=n_train, every=_never, **options)
        if self.monitor._stepper is not None:
            self.monitor._stepper.world = self.world
        self._warned = False
        box = [self.monitor.history]         # every rank starts from src's first record
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        self.monitor.history = list(box[0])
        self._handle = optimizer.register_step_post_hook(self._on_step)   # after the monitor's own

    # -- schedule ------------------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        if self.every is None:
            mon = self.monitor
            flag = torch.zeros(1, device=mon.device)
            if self.rank == self.src:
                mon.config = dataclasses.replace(mon.config, every=None)     # the time budget's rule
                try:
                    flag[0] = float(mon._due(step))
                finally:
                    mon.config = dataclasses.replace(mon.config, every=_never)
            dist.broadcast(flag, self.src, group=self.group)
            return bool(flag.item())
        if callable(self.every):
            return bool(self.every(step))
        return step % self.every == 0

    def _on_step(self, optimizer, args, kwargs) -> None:
        if self._handle is not None and self._due(self.monitor.step):
            self.measure()

    # -- the collective measurement ------------------------------------------------------------
    def _consolidate(self) -> None:
        """Sum the ranks' perturbation states onto ``src``; the others restart from zero."""
        eng = self.monitor.perstep
        if eng is None:
            return
        ok = 1.0
        try:
            state = eng.stacked()                                          # (2, m + 1, D)
        except Exception as exc:
            ok, state = 0.0, torch.zeros((2,) + tuple(eng.y.shape), dtype=eng.y.dtype, device=eng.y.device)
            self.monitor._report("distributed step", exc)
        flags = torch.tensor([1.0 - ok], device=state.device)
        sentinel = state[:, eng.m].clone()   # each rank's stability sentinel stays its own
        dist.all_reduce(state, group=self.group)
        state[:, eng.m] = sentinel
        dist.all_reduce(flags, group=self.group)
        if self.rank == self.src:
            eng.y, eng.nu = state[0].clone(), state[1].clone()
        else:
            eng.y[: eng.m].zero_()
            eng.nu[: eng.m].zero_()
        if float(flags.item()) > 0 and self.rank == self.src and not self._warned:
            self._warned = True
            warnings.warn(f"gramhook: {int(flags.item())} rank(s) failed to contribute at step "
                          f"{self.monitor.step}; their share of the perturbations is missing.", RuntimeWarning)

    def measure(self) -> Optional[dict]:
        """Measure now, collectively: call it on every rank at the same step."""
        self._consolidate()
        record = self.monitor.measure() if self.rank == self.src else None
        box = [record]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        record = box[0]
        if self.rank != self.src and record is not None:
            self.monitor.history.append(record)
        return record

    # -- results and lifecycle -----------------------------------------------------------------
    def should_stop(self, patience: int = 5, min_delta: float = 0.0, metric: str = "predicted_test_loss") -> bool:
        """The same decision on every rank (the histories are identical)."""
        return self.monitor.should_stop(patience, min_delta, metric)

    @property
    def history(self):
        return self.monitor.history

    @property
    def predicted_test_loss(self) -> float:
        return self.monitor.predicted_test_loss

    def state_dict(self) -> dict:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Every rank loads the same (``src``'s) state; only ``src`` keeps the perturbations."""
        self.monitor.load_state_dict(state)
        if self.rank != self.src and self.monitor.perstep is not None:
            eng = self.monitor.perstep
            eng.y[: eng.m].zero_()
            eng.nu[: eng.m].zero_()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.monitor.close()
