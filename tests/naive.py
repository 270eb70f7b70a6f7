"""Slow truths for the kernel tests: per-sample (and per-output) ``torch.autograd.grad`` loops.

The models they are run on live in :mod:`gramhook.zoo` (``make``, ``MODELS``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["naive_jacobian", "naive_gradients"]

def naive_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """``(m, k, P)``: one ``autograd.grad`` per sample and output, in eval mode.

    Columns are the trainable parameters (``requires_grad=True``) in ``named_parameters()`` order;
    outputs are flattened to ``k``. Leaves the model in eval mode.
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        per_out = []
        for a in range(out.shape[0]):
            g = torch.autograd.grad(out[a], params, retain_graph=True)
            per_out.append(torch.cat([t.reshape(-1) for t in g]))
        rows.append(torch.stack(per_out))
    return torch.stack(rows)


def naive_gradients(model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    """``(m, P)``: per-sample loss gradients ``∇_w loss(f(x_i), y_i)``, one sample at a time.

    ``loss(out, y)`` gets the flattened output ``(1, k)`` and ``y[i:i+1]`` and returns ``(1,)``.
    Leaves the model in eval mode.
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(1, -1)
        (value,) = loss(out, y[i : i + 1])
        g = torch.autograd.grad(value, params)
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(grads)
