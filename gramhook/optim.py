"""Read the time step dt and the preconditioner P from a PyTorch optimizer (docs/theory.md §1).

Training is read as the flow ``ẇ = −P ∇L_S(w) − λ w``; every optimizer step advances time by
``dt``. The learning rate is read at every call, so schedulers are respected.

- SGD: ``dt = lr·(1−dampening)/(1−μ)`` (heavy-ball and Nesterov momentum μ), ``P = I``;
  coupled weight decay adds ``λ`` to the decay rate.
- Adam/AdamW: ``dt = lr``, ``P = diag(1/(sqrt(v̂)+eps))`` with the bias-corrected second moment
  ``v̂ = v/(1−β₂^t)`` (``max_exp_avg_sq`` with amsgrad). Decoupled decay (AdamW) has rate λ; coupled
  decay (Adam's ``weight_decay``) has rate ``λ·P``.

The other diagonal preconditioners, read from their state the same way (``t`` the step count,
``g`` the gradient, ``λ`` a coupled decay that joins the gradient):

- RMSprop: ``P = 1/(sqrt(v − ḡ²·[centered]) + eps)``; momentum μ is heavy-ball on ``P g``
  (``dt = lr/(1−μ)``).
- Adagrad: ``P = 1/(sqrt(Σ g²) + eps)``, ``dt = lr/(1 + (t−1)·lr_decay)``.
- Adadelta: ``P = sqrt(u + eps)/sqrt(v + eps)`` (u the running mean of squared updates).
- Adamax: ``P = 1/u`` with ``u = max(β₂ u, |g| + eps)``; Adam's bias-corrected first moment.
- NAdam: Adam's P; the step mixes the new first moment and the gradient (momentum decay ψ).
- RAdam: ``P = r_t·sqrt(1−β₂^t)/(sqrt(v)+eps)`` with the rectification r_t while ρ_t > 5, else
  ``P = 1`` (SGD with momentum).

The perturbation of P itself by a left-out sample is neglected, as for Adam. fused/foreach
variants keep the same state, so they are read the same way.

Parameter groups with different learning rates are folded into P: dt is the step of the first
group with a positive learning rate, and another group's P is scaled by its step over dt (a
group frozen by lr = 0 gets P = 0).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
from torch import Tensor, nn

__all__ = ["StepMetric", "read_optimizer", "check_optimizer", "check_trains", "step_dt", "SUPPORTED_OPTIMIZERS"]

SUPPORTED_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam")
# Optimizers whose P is read by _diag_precond (the others: SGD, P = I; Adam/AdamW, _adam_v).
_DIAGONAL = ("RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam")


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


def _diag_precond(kind: str, optimizer: torch.optim.Optimizer, group: dict, p: Tensor, ahead: bool) -> Optional[Tensor]:
    """P of RMSprop, Adagrad, Adadelta, Adamax, NAdam or RAdam for ``p`` (see the module docstring),
    or ``None`` before the first step (no statistics yet). ``ahead``: as the coming step will
    use it, from the state and the current gradient; else from the state as it is."""
    state = optimizer.state.get(p, {})
    eps = float(group["eps"])
    g = None
    if ahead:
        g = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
        wd = float(group.get("weight_decay", 0.0))
        if wd and not group.get("decoupled_weight_decay", False):
            g = g + wd * p.detach()
    t = int(float(state["step"])) if "step" in state else 0
    if kind == "RMSprop":
        alpha = float(group["alpha"])
        v, mean = state.get("square_avg"), state.get("grad_avg")
        if ahead:
            v = (1 - alpha) * g * g if v is None else alpha * v.detach() + (1 - alpha) * g * g
            if group.get("centered", False):
                mean = (1 - alpha) * g if mean is None else alpha * mean.detach() + (1 - alpha) * g
        if v is None:
            return None
        if group.get("centered", False) and mean is not None:
            v = v - mean * mean
        return 1.0 / (v.clamp(min=0).sqrt() + eps)
    if kind == "Adagrad":
        total = state.get("sum")
        if total is None:
            return None
        total = total.detach() + g * g if ahead else total.detach()
        return 1.0 / (total.sqrt() + eps)
    if kind == "Adadelta":
        rho = float(group["rho"])
        v, u = state.get("square_avg"), state.get("acc_delta")
        if ahead:
            v = (1 - rho) * g * g if v is None else rho * v.detach() + (1 - rho) * g * g
            u = torch.zeros_like(p) if u is None else u.detach()
        if v is None:
            return None
        return (u.detach() + eps).sqrt() / (v.detach() + eps).sqrt()
    if kind == "Adamax":
        beta2 = float(group["betas"][1])
        u = state.get("exp_inf")
        if ahead:
            cur = g.abs() + eps
            u = cur if u is None else torch.maximum(beta2 * u.detach(), cur)
        if u is None:
            return None
        return 1.0 / u.detach()
    # NAdam and RAdam keep Adam's second moment.
    beta2 = float(group["betas"][1])
    v = state.get("exp_avg_sq")
    if ahead:
        v = (1 - beta2) * g * g if v is None else beta2 * v.detach() + (1 - beta2) * g * g
        t += 1
    if v is None or t == 0:
        return None
    bc2 = 1.0 - beta2 ** t
    if kind == "NAdam":
        return 1.0 / ((v.detach() / bc2).sqrt() + eps)
    rect = _radam_rectification(beta2, t)
    if rect is None:
        return torch.ones_like(p)
    return rect * bc2 ** 0.5 / (v.detach().sqrt() + eps)


def _diag_response(kind: str, optimizer: torch.optim.Optimizer, group: dict, p: Tensor, ahead: bool) -> Optional[Tensor]:
    """The factor by which the second-moment statistics damp the response of the step to a slow
    perturbation of the gradient, as for Adam (see :func:`_whitening`): NAdam and RAdam
    ``1 − m̂²/(√v̂(√v̂ + ε))``, Adamax ``1 − |m̂|/u``. ``None``: no such factor (RMSprop, Adagrad,
    Adadelta keep no first moment; centered RMSprop's ``v − ḡ²`` does not move to first order)."""
    if kind not in ("NAdam", "RAdam", "Adamax"):
        return None
    state = optimizer.state.get(p, {})
    m = _adam_m(optimizer, group, p, ahead)
    t = (int(float(state["step"])) if "step" in state else 0) + (1 if ahead else 0)
    if m is None or t == 0:
        return None
    beta1, beta2, eps = float(group["betas"][0]), float(group["betas"][1]), float(group["eps"])
    mhat = m / (1.0 - beta1 ** t)
    if kind == "Adamax":
        u = state.get("exp_inf")
        if ahead:
            g = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
            wd = float(group.get("weight_decay", 0.0))
            g = g + wd * p.detach() if wd else g
            u = g.abs() + eps if u is None else torch.maximum(beta2 * u.detach(), g.abs() + eps)
        return (1.0 - mhat.abs() / u.clamp(min=torch.finfo(u.dtype).tiny)).clamp(0.0, 1.0)
    v = state.get("exp_avg_sq")
    if ahead:
        g = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
        wd = float(group.get("weight_decay", 0.0))
        if wd and not group.get("decoupled_weight_decay", False):
            g = g + wd * p.detach()
        v = (1 - beta2) * g * g if v is None else beta2 * v.detach() + (1 - beta2) * g * g
    bc2 = 1.0 - beta2 ** t
    if kind == "RAdam":
        if _radam_rectification(beta2, t) is None:
            return None              # the step is un-adapted: v does not enter
        eps = eps / bc2 ** 0.5       # RAdam adds ε to √v, not to √v̂
    rms = (v.detach() / bc2).sqrt()
    return (1.0 - mhat * mhat / (rms * (rms + eps)).clamp(min=torch.finfo(rms.dtype).tiny)).clamp(0.0, 1.0)


def _radam_rectification(beta2: float, t: int) -> Optional[float]:
    """RAdam's r_t at step t, or ``None`` while ρ_t ≤ 5 (the step is then un-adapted)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2 ** t / (1.0 - beta2 ** t)
    if rho_t <= 5.0:
        return None
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def _nadam_weights(group: dict, state: dict) -> tuple:
    """NAdam's step ``lr·(c_m·m + c_g·g)·P`` at the coming step: ``(c_m, c_g)``."""
    beta1 = float(group["betas"][0])
    psi = float(group.get("momentum_decay", 4e-3))
    t = (int(float(state["step"])) if "step" in state else 0) + 1
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    prod = float(state.get("mu_product", 1.0)) * mu
    return mu_next / (1.0 - prod * mu_next), (1.0 - mu) / (1.0 - prod)


def _group_step(kind: str, group: dict, steps_taken: Optional[int] = None) -> float:
    """Flow time of one step: the multiple of the gradient it moves the weights by.

    SGD with momentum μ and dampening d keeps a buffer ``b`` (in units of the gradient) that
    starts at 1 on the first step and tends to ``(1 − d)/(1 − μ)``; on its ``j``-th step from an
    empty buffer (``steps_taken = j``) ``b_j = μ^(j−1) + (1 − d)(1 − μ^(j−1))/(1 − μ)``. The step
    moves ``lr·b_j``, or ``lr·(1 + μ·b_j)`` with Nesterov. ``steps_taken=None``: the warm limit.
    """
    lr = float(group["lr"])
    if kind in ("SGD", "RMSprop"):
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
    by_id, groups, ref = _trained_groups(optimizer, model)
    dt = _group_step(kind, ref)
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
                if kind in _DIAGONAL:
                    pre = _diag_precond(kind, optimizer, group, p, ahead=False)
                    pre = (torch.ones_like(p) if pre is None else pre) * scale
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


def over_coordinates(metric: StepMetric, model: nn.Module, names: tuple) -> StepMetric:
    """``metric`` over the coordinates ``names`` (the parameters trainable when the monitor was
    attached): P = 0 on those the optimizer does not train now (outside it, or frozen since), so
    their coordinates stay and do not move."""
    names = tuple(names)
    if metric.names == names:
        return metric
    params = dict(model.named_parameters())
    trained = set(metric.names)
    pre = dict(metric.preconditioner) if metric.preconditioner is not None else {
        n: torch.ones_like(params[n]) for n in names if n in trained}
    pre.update({n: torch.zeros_like(params[n]) for n in names if n not in trained})
    return dataclasses.replace(metric, preconditioner=pre, names=names)


def step_dt(optimizer: torch.optim.Optimizer, steps_taken: Optional[int] = None) -> float:
    """dt of the step just taken, from the first parameter group (cheap: no state is read).

    ``steps_taken``: the number of steps since the momentum buffers were empty, this one included
    (momentum start-up); ``None`` for a warm optimizer.
    """
    return _group_step(type(optimizer).__name__, optimizer.param_groups[0], steps_taken)


def momentum_is_warm(optimizer: torch.optim.Optimizer) -> bool:
    """Whether an SGD (or RMSprop) optimizer already holds momentum buffers (a resumed or used optimizer)."""
    return any(state.get("momentum_buffer") is not None for state in optimizer.state.values())


def _trained_groups(optimizer: torch.optim.Optimizer, model: nn.Module):
    """The groups that train model parameters, and the reference group: the first with lr > 0
    (a group frozen by lr = 0 must not set the time step of the others)."""
    by_id = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    groups = [g for g in optimizer.param_groups if any(id(p) in by_id for p in g["params"])]
    if not groups:
        raise ValueError(
            "The optimizer trains none of the model's parameters: pass the optimizer built from "
            "model.parameters()."
        )
    ref = next((g for g in groups if float(g["lr"]) > 0), groups[0])
    return by_id, groups, ref


def _adam_gradient(optimizer, group, p: Tensor) -> Tensor:
    """The gradient the coming Adam step reads: ``.grad`` plus coupled weight decay."""
    g = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
    wd = float(group.get("weight_decay", 0.0))
    if wd and not (type(optimizer).__name__ == "AdamW" or group.get("decoupled_weight_decay", False)):
        g = g + wd * p.detach()
    return g


def _adam_m(optimizer, group, p: Tensor, ahead: bool) -> Optional[Tensor]:
    """Adam's first moment; ``ahead``: as the coming step will leave it."""
    state = optimizer.state.get(p, {})
    m = state.get("exp_avg")
    beta1 = float(group["betas"][0])
    if ahead:
        g = _adam_gradient(optimizer, group, p)
        m = g * (1 - beta1) if m is None else m.detach() * beta1 + (1 - beta1) * g
    return None if m is None else m.detach()


def _adam_v(optimizer, group, p: Tensor, ahead: bool) -> tuple:
    """Adam's second moment and its step count; ``ahead``: as the coming step will leave them."""
    state = optimizer.state.get(p, {})
    v = state.get("exp_avg_sq")
    t = int(float(state["step"])) if "step" in state else 0
    beta2 = float(group["betas"][1])
    if ahead:
        g = _adam_gradient(optimizer, group, p)
        v = g * g * (1 - beta2) if v is None else v.detach() * beta2 + (1 - beta2) * g * g
        if group.get("amsgrad", False) and state.get("max_exp_avg_sq") is not None:
            v = torch.maximum(state["max_exp_avg_sq"].detach(), v)
        t += 1
    elif group.get("amsgrad", False) and state.get("max_exp_avg_sq") is not None:
        v = state["max_exp_avg_sq"].detach()
    return v, t


def whitening(optimizer: torch.optim.Optimizer, model: nn.Module, *, ahead: bool = False, names=None, still=()):
    """P per trained parameter, relative to the reference group's learning rate η (the other
    groups' ``lr/η`` folded in), or ``None`` for the identity.

    ``ahead=True`` (in a step pre-hook, gradients set): Adam's P as the coming step will use it,
    from the current ``v`` and gradient; otherwise from the state as it is. ``names``: the
    coordinates (default: every ``requires_grad`` parameter); P = 0 on those not trained now.
    """
    check_optimizer(optimizer)
    return _held_fixed(_whitening(optimizer, *_trained_groups(optimizer, model), ahead), optimizer, model, names,
                       still)


def _held_fixed(pre: Optional[Dict[str, Tensor]], optimizer: torch.optim.Optimizer, model: nn.Module, names=None,
                still=()):
    """``pre`` with P = 0 on the coordinates ``names`` (default: the ``requires_grad``
    parameters) that the optimizer does not train now (outside it, or frozen since): they do not
    move, and the coordinates stay (so a later ``add_param_group`` only changes P). P is 0 on the
    parameters named in ``still`` too: the loss does not depend on them
    (:func:`gramhook.capture.cancelled_biases`), so their gradient is round-off, which Adam's
    1/√v̂ would amplify into a leave-one-out response the run never has."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    coords = [n for n, p in params.items() if p.requires_grad] if names is None else list(names)
    still = set(still)
    fixed = [n for n in coords if n in still or not (params[n].requires_grad and id(params[n]) in held)]
    if not fixed:
        return pre
    if pre is None:
        pre = {n: torch.ones_like(params[n]) for n in coords if n not in fixed}
    pre = dict(pre)
    pre.update({n: torch.zeros_like(params[n]) for n in fixed})
    return pre


def _whitening(optimizer, by_id, groups, ref, ahead: bool):
    kind = type(optimizer).__name__
    lr0 = float(ref["lr"])
    pre: Dict[str, Tensor] = {}
    identity = kind == "SGD"
    for group in groups:
        # Ratios to the reference group; when every group is at lr = 0 (the end of a cosine
        # schedule) nothing moves, and P keeps its shape rather than vanishing.
        scale = float(group["lr"]) / lr0 if lr0 > 0 else 1.0
        identity = identity and scale == 1.0
        for p in group["params"]:
            name = by_id.get(id(p))
            if name is None:
                continue
            if kind == "SGD":
                pre[name] = torch.full_like(p, scale)
                continue
            if kind in _DIAGONAL:
                d = _diag_precond(kind, optimizer, group, p, ahead)
                if d is None:
                    pre[name] = torch.full_like(p, scale)
                    continue
                r = _diag_response(kind, optimizer, group, p, ahead)
                pre[name] = scale * d if r is None else scale * d * r
                continue
            v, t = _adam_v(optimizer, group, p, ahead)
            if v is None or t == 0:
                pre[name] = torch.full_like(p, scale)
                continue
            vhat = v / (1.0 - float(group["betas"][1]) ** t)
            eps = float(group["eps"])
            rms = vhat.sqrt()
            # Adam's response 1/(√v̂ + ε) to a perturbed gradient is linear only for perturbations
            # small against √v̂ + ε. Coordinates whose gradient has stayed below ε (a bias before a
            # BatchNorm, a dead unit) are not moved by the loss; first-order leave-one-out leaves them.
            pre[name] = torch.where(rms > eps, scale / (rms + eps), torch.zeros_like(rms))
            m = _adam_m(optimizer, group, p, ahead)
            if m is not None:
                # A perturbation δg also moves v (δv = 2g·δg): to first order, for perturbations
                # slower than v's average and g's mean read as m̂, Adam's response shrinks by
                # 1 − m̂²/(√v̂(√v̂ + ε)) (docs/theory.md §9, Adam): coherent coordinates respond less.
                mhat = m / (1.0 - float(group["betas"][0]) ** t)
                live = rms > eps
                denom = torch.where(live, rms * (rms + eps), torch.ones_like(rms))
                pre[name] = torch.where(live, pre[name] * (1.0 - mhat * mhat / denom).clamp(0.0, 1.0), pre[name])
    return None if identity else pre


def step_rule(optimizer: torch.optim.Optimizer, model: nn.Module, names=None, still=()):
    """The :class:`gramhook.dynamics.perstep.StepRule` of the step about to be taken (call it in
    the optimizer's step pre-hook) and the P it uses (:func:`whitening` ahead, over ``names``)."""
    from .dynamics.perstep import StepRule

    kind = type(optimizer).__name__
    by_id, groups, ref = _trained_groups(optimizer, model)
    lr = float(ref["lr"])
    wd = float(ref.get("weight_decay", 0.0))
    trained = _whitening(optimizer, by_id, groups, ref, ahead=True)
    pre = _held_fixed(trained, optimizer, model, names, still)
    if kind == "SGD":
        mu = float(ref.get("momentum", 0.0))
        first = mu > 0 and not any(optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in ref["params"])
        # Coupled decay enters the gradient, so the buffer amplifies it like the gradient.
        amp = 1.0 if (mu <= 0 or first) else 1.0 / (1.0 - mu)
        rule = StepRule("sgd", lr=lr, momentum=mu, dampening=float(ref.get("dampening", 0.0)),
                        nesterov=bool(ref.get("nesterov", False)), first=first, shrink=1.0 - lr * wd * amp)
        return rule, pre
    if kind in _DIAGONAL:
        return _diagonal_rule(kind, optimizer, ref, by_id, pre, lr, wd), pre
    beta1 = float(ref["betas"][0])
    p0 = next(p for p in ref["params"] if id(p) in by_id)
    t = (int(float(optimizer.state[p0]["step"])) if "step" in optimizer.state.get(p0, {}) else 0) + 1
    decoupled = kind == "AdamW" or bool(ref.get("decoupled_weight_decay", False))
    if decoupled:
        shrink = 1.0 - lr * wd
    elif wd and trained is not None:
        mean_p = float(torch.cat([trained[n].reshape(-1) for n in trained]).mean())
        shrink = 1.0 - lr * wd * mean_p
    else:
        shrink = 1.0
    return StepRule("adam", lr=lr, momentum=beta1, bias_correction=1.0 / (1.0 - beta1 ** t), shrink=shrink), pre


def _diagonal_rule(kind: str, optimizer, ref: dict, by_id: dict, pre, lr: float, wd: float):
    """The :class:`gramhook.dynamics.perstep.StepRule` of RMSprop, Adagrad, Adadelta, Adamax,
    NAdam or RAdam for the coming step (P, ``pre``, is read separately)."""
    from .dynamics.perstep import StepRule

    p0 = next(p for p in ref["params"] if id(p) in by_id)
    state = optimizer.state.get(p0, {})
    t = (int(float(state["step"])) if "step" in state else 0) + 1
    decoupled = bool(ref.get("decoupled_weight_decay", False))
    mean_p = float(torch.cat([pre[n].reshape(-1) for n in pre]).mean()) if pre is not None else 1.0

    def shrink(step: float, amp: float = 1.0) -> float:
        # Decoupled decay shrinks by the step; coupled decay joins the gradient, so it is weighted
        # by P (its mean) and amplified by the momentum buffer like the gradient.
        if not wd:
            return 1.0
        return 1.0 - step * wd if decoupled else 1.0 - step * wd * mean_p * amp

    if kind == "RMSprop":
        mu = float(ref.get("momentum", 0.0))
        first = mu > 0 and not any(optimizer.state.get(p, {}).get("momentum_buffer") is not None
                                   for p in ref["params"])
        amp = 1.0 if (mu <= 0 or first) else 1.0 / (1.0 - mu)
        return StepRule("sgd", lr=lr, momentum=mu, first=first, shrink=shrink(lr, amp))
    if kind == "Adagrad":
        clr = lr / (1.0 + (t - 1) * float(ref.get("lr_decay", 0.0)))
        return StepRule("sgd", lr=clr, shrink=shrink(clr))
    if kind == "Adadelta":
        return StepRule("sgd", lr=lr, shrink=shrink(lr))
    beta1 = float(ref["betas"][0])
    if kind == "NAdam":
        c_m, c_g = _nadam_weights(ref, state)
        return StepRule("nadam", lr=lr, momentum=beta1, bias_correction=c_m, grad_weight=c_g, shrink=shrink(lr))
    # Adamax and RAdam: Adam's bias-corrected first moment.
    return StepRule("adam", lr=lr, momentum=beta1, bias_correction=1.0 / (1.0 - beta1 ** t), shrink=shrink(lr))


def check_trains(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer must train some of the model; trainable parameters outside it are held
    fixed (P = 0), which is said once here (a ``UserWarning``).

    Raises:
        ValueError: the optimizer trains none of the model's parameters.
    """
    from .guard import emit

    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if not any(id(p) in held for p in model.parameters()):
        raise ValueError(
            "The optimizer trains none of the model's parameters: pass the optimizer built from "
            "this model's parameters (torch.optim.SGD(model.parameters(), ...)).")
    if outside:
        shown = ", ".join(outside[:4]) + (", ..." if len(outside) > 4 else "")
        emit(
            f"gramhook: {len(outside)} trainable parameter(s) are not in the optimizer ({shown}); the "
            "prediction holds them fixed. If another optimizer trains them, their motion is left "
            "out: attach the monitor to the optimizer that trains most of the model, or set "
            "requires_grad=False on parameters that stay frozen.", UserWarning)
