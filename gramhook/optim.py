"""Read the time step dt and the preconditioner P from a PyTorch optimizer (THEORY §1).

Training is read as the flow ``ẇ = −P ∇L_S(w) − λ w``; every optimizer step advances time by
``dt``. The learning rate is read at every call, so schedulers are respected.

- SGD: ``dt = lr·(1−dampening)/(1−μ)`` (heavy-ball and Nesterov momentum μ), ``P = I``;
  coupled weight decay adds ``λ`` to the decay rate.
- Adam/AdamW: ``dt = lr``, ``P = diag(1/(sqrt(v̂)+eps))`` with the bias-corrected second moment
  ``v̂ = v/(1−β₂^t)`` (``max_exp_avg_sq`` with amsgrad). Decoupled decay (AdamW) has rate λ; coupled
  decay (Adam's ``weight_decay``) has rate ``λ·P``.

Parameter groups with different learning rates are folded into P: dt is the first group's
step, and another group's P is scaled by its step over dt.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
from torch import Tensor, nn

__all__ = ["StepMetric", "read_optimizer", "check_optimizer", "step_dt", "SUPPORTED_OPTIMIZERS"]

SUPPORTED_OPTIMIZERS = ("SGD", "Adam", "AdamW")


@dataclasses.dataclass(frozen=True)
class StepMetric:
    """What one optimizer step means in the flow's time.

    Attributes:
        dt: time advanced by one step.
        preconditioner: parameter name → diagonal of P (shape of the parameter), or ``None`` for
            P = I on every parameter.
        decay: parameter name → weight-decay rate per unit time (float or tensor), or ``None``.
        names: names of the parameters the optimizer trains.
    """

    dt: float
    preconditioner: Optional[Dict[str, Tensor]]
    decay: Optional[Dict[str, object]]
    names: tuple


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise a clear error for optimizers whose dynamics gramhook does not model."""
    kind = type(optimizer).__name__
    if kind not in SUPPORTED_OPTIMIZERS:
        raise TypeError(
            f"gramhook does not support the optimizer {kind}; supported: "
            f"{', '.join(SUPPORTED_OPTIMIZERS)}. To proceed, use one of those, or wrap your "
            "optimizer's dynamics in a subclass named like the closest supported one only if its "
            "update has the same form (SGD: lr·grad with momentum; Adam: lr·m̂/(sqrt(v̂)+eps))."
        )
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise ValueError("gramhook does not support maximize=True: the gap engine assumes descent.")


def _group_step(kind: str, group: dict, steps_taken: Optional[int] = None) -> float:
    """Flow time of one step: the multiple of the gradient it moves the weights by.

    SGD with momentum μ and dampening d keeps a buffer ``b`` (in units of the gradient) that
    starts at 1 on the first step and tends to ``(1 − d)/(1 − μ)``; on its ``j``-th step from an
    empty buffer (``steps_taken = j``) ``b_j = μ^(j−1) + (1 − d)(1 − μ^(j−1))/(1 − μ)``. The step
    moves ``lr·b_j``, or ``lr·(1 + μ·b_j)`` with Nesterov. ``steps_taken=None``: the warm limit.
    """
    lr = float(group["lr"])
    if kind == "SGD":
        mu = float(group.get("momentum", 0.0))
        damp = float(group.get("dampening", 0.0))
        if mu <= 0:
            return lr
        if steps_taken is None:
            buf = (1.0 - damp) / (1.0 - mu)
        else:
            warm = mu ** (max(int(steps_taken), 1) - 1)
            buf = warm + (1.0 - damp) * (1.0 - warm) / (1.0 - mu)
        return lr * (1.0 + mu * buf) if group.get("nesterov", False) else lr * buf
    return lr


def _adam_precond(optimizer: torch.optim.Optimizer, group: dict, p: Tensor) -> Tensor:
    state = optimizer.state.get(p, {})
    v = state.get("max_exp_avg_sq") if group.get("amsgrad", False) else None
    if v is None:
        v = state.get("exp_avg_sq")
    if v is None:  # before the first step: no second moment yet
        return torch.ones_like(p)
    step = float(state["step"]) if "step" in state else 1.0
    beta2 = float(group["betas"][1])
    vhat = v.detach() / (1.0 - beta2**step)
    return 1.0 / (vhat.sqrt() + float(group["eps"]))


def read_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> StepMetric:
    """Read dt, P and the decay rates for the model's trainable parameters now.

    >>> m = nn.Linear(2, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5)
    >>> round(read_optimizer(opt, m).dt, 6)
    0.2
    """
    check_optimizer(optimizer)
    kind = type(optimizer).__name__
    by_id = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    groups = [g for g in optimizer.param_groups if any(id(p) in by_id for p in g["params"])]
    if not groups:
        raise ValueError(
            "The optimizer trains none of the model's parameters: pass the optimizer built from "
            "model.parameters()."
        )
    dt = _group_step(kind, groups[0])
    precond: Dict[str, Tensor] = {}
    decay: Dict[str, object] = {}
    names = []
    identity = kind == "SGD"
    for group in groups:
        scale = _group_step(kind, group) / dt if dt > 0 else 1.0
        identity = identity and scale == 1.0
        wd = float(group.get("weight_decay", 0.0))
        decoupled = kind == "AdamW" or bool(group.get("decoupled_weight_decay", False))
        for p in group["params"]:
            name = by_id.get(id(p))
            if name is None:
                continue
            names.append(name)
            if kind == "SGD":
                precond[name] = torch.full_like(p, scale)
                if wd:
                    decay[name] = wd * scale
            else:
                pre = _adam_precond(optimizer, group, p) * scale
                precond[name] = pre
                if wd:
                    # AdamW: w ← w − lr·λ·w, i.e. rate λ·(group lr / dt); Adam: λ w joins the gradient.
                    decay[name] = wd * scale if decoupled else wd * pre
    return StepMetric(
        dt=dt,
        preconditioner=None if identity else precond,
        decay=decay or None,
        names=tuple(names),
    )


def step_dt(optimizer: torch.optim.Optimizer, steps_taken: Optional[int] = None) -> float:
    """dt of the step just taken, from the first parameter group (cheap: no state is read).

    ``steps_taken``: the number of steps since the momentum buffers were empty, this one included
    (momentum start-up); ``None`` for a warm optimizer.
    """
    return _group_step(type(optimizer).__name__, optimizer.param_groups[0], steps_taken)


def momentum_is_warm(optimizer: torch.optim.Optimizer) -> bool:
    """Whether an SGD optimizer already holds momentum buffers (a resumed or used optimizer)."""
    return any(state.get("momentum_buffer") is not None for state in optimizer.state.values())
