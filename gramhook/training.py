"""The plain minibatch training loop that the ``gramhook demo`` CLI and the benchmarks share.

A monitor attached to ``optimizer`` sees this loop as any user loop: it measures inside
``optimizer.step()``. The loop draws nothing from the global RNG: the batch order comes from
``generator`` (or is given as ``batches``).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

__all__ = ["train", "shuffled_batches"]

StepHook = Callable[[int, Tensor, Tensor], Optional[bool]]
EpochHook = Callable[[int], Optional[bool]]


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterable[Tensor]:
    """One epoch: ``torch.randperm(n, generator=generator)`` cut in order into batches of indices
    (the last one shorter when ``batch_size`` does not divide ``n``)."""
    perm = torch.randperm(n, generator=generator)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
          loss: Callable[[Tensor, Tensor], Tensor], batch_size: int = 64, epochs: Optional[int] = None,
          steps: Optional[int] = None, batches: Optional[Iterable[Tensor]] = None,
          generator: Optional[torch.Generator] = None, scheduler=None, scheduler_per_batch: bool = False,
          on_step: Optional[StepHook] = None, on_epoch: Optional[EpochHook] = None) -> int:
    """Trains ``model`` in train mode: per batch ``zero_grad``, ``loss(model(x[idx]), y[idx]).backward()``,
    ``optimizer.step()``.

    The batches are, in order of precedence, ``batches`` (index tensors, one pass), or one
    :func:`shuffled_batches` epoch after another from ``generator`` for ``epochs`` epochs or until
    ``steps`` steps (mid-epoch if need be), whichever comes first.

    Args:
        model: The module; put in train mode first.
        optimizer: Its optimizer.
        x: Inputs ``(n, ...)``.
        y: Targets ``(n, ...)``, indexed with the same rows as ``x``.
        loss: ``loss(output, target)`` returning the scalar batch loss.
        batch_size: Rows per batch of a shuffled epoch.
        epochs: Number of shuffled epochs.
        steps: Number of optimizer steps at most.
        batches: Index tensors to train on instead of shuffled epochs.
        generator: The private generator of the batch order (needed unless ``batches`` is given).
        scheduler: A learning-rate scheduler, stepped after every batch when
            ``scheduler_per_batch`` is true, else after every epoch.
        scheduler_per_batch: See ``scheduler``.
        on_step: ``on_step(step, idx, output)`` after every optimizer step (``step`` counts from 1,
            ``output`` is the batch's detached model output); a true return value stops training.
        on_epoch: ``on_epoch(step)`` after every shuffled epoch (after the epoch's scheduler step);
            a true return value stops training.

    Returns:
        The number of optimizer steps taken.

    Raises:
        ValueError: If neither ``batches``, nor ``generator`` with ``epochs`` or ``steps``, is given.
    """
    if batches is None and (generator is None or (epochs is None and steps is None)):
        raise ValueError("train needs batches=, or generator= with epochs= or steps=")
    if batches is not None:
        epochs, plan = 1, lambda: batches
    else:
        epochs = math.inf if epochs is None else epochs
        plan = lambda: shuffled_batches(x.shape[0], batch_size, generator)  # noqa: E731
    steps = math.inf if steps is None else steps
    model.train()
    step, epoch = 0, 0
    while epoch < epochs and step < steps:
        for idx in plan():
            optimizer.zero_grad(set_to_none=True)
            out = model(x[idx])
            loss(out, y[idx]).backward()
            optimizer.step()
            if scheduler is not None and scheduler_per_batch:
                scheduler.step()
            step += 1
            if (on_step is not None and on_step(step, idx, out.detach())) or step >= steps:
                return step
        epoch += 1
        if batches is not None:
            break
        if scheduler is not None and not scheduler_per_batch:
            scheduler.step()
        if on_epoch is not None and on_epoch(step):
            break
    return step
