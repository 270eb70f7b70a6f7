"""Per-sample losses, their residual r = ∂ℓ/∂f and output Hessian Λ = ∂²ℓ/∂f² (docs/theory.md §1).

Residuals and Hessians of a callable loss come from autograd on the loss exactly as the user
defines it, so any reduction scaling inside it is respected. The built-in losses use their closed
forms (the training step's hot path needs Λ at every step), equal to the autograd ones to
rounding (tested).

Shapes: model outputs are handled flattened to ``(batch, k)``, ``k = prod(output.shape[1:])``.
Built-in losses see that flattened output; a callable loss sees the output reshaped back to the
model's own per-sample shape ``(batch, *out_shape)``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, hessian, vmap

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]

__all__ = ["Loss", "resolve_loss", "per_sample_losses", "residual_and_hessian", "output_hessian"]


def _mse(out: Tensor, y: Tensor) -> Tensor:
    y = y.reshape(out.shape).to(out.dtype)
    return F.mse_loss(out, y, reduction="none").mean(dim=1)


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y.long(), reduction="none")


@dataclasses.dataclass(frozen=True)
class Loss:
    """A per-sample loss ``fn(output, target) -> (batch,)``.

    Attributes:
        name: ``"mse"``, ``"cross_entropy"`` or the callable's name.
        fn: the per-sample loss.
        hessian_needs_target: whether Λ depends on the target. False for MSE and CE, so the
            contraction of the gap engine can be computed from unlabeled training inputs.
        out_shape: per-sample output shape the callable expects (``None``: flattened ``(k,)``).
    """

    name: str
    fn: PerSampleLoss
    hessian_needs_target: bool
    out_shape: Optional[Sequence[int]] = None

    def __call__(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-sample losses for flattened outputs ``out`` of shape ``(batch, k)`` → ``(batch,)``."""
        if self.out_shape is not None:
            out = out.reshape(out.shape[0], *self.out_shape)
        return self.fn(out, y)

    def with_out_shape(self, out_shape: Sequence[int]) -> "Loss":
        if self.name in ("mse", "cross_entropy"):
            return self
        return dataclasses.replace(self, out_shape=tuple(out_shape))


def resolve_loss(loss: Union[str, PerSampleLoss, Loss]) -> Loss:
    """Turn ``"mse"``, ``"cross_entropy"`` or a callable into a :class:`Loss`.

    A callable must map ``(output, target)`` to per-sample losses of shape ``(batch,)`` (use
    ``reduction="none"``). It is assumed to have a target-dependent Hessian unless it carries an
    attribute ``hessian_needs_target = False``.

    >>> resolve_loss("cross_entropy").hessian_needs_target
    False
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        key = loss.lower().replace("-", "_")
        if key in ("mse", "squared", "l2"):
            return Loss("mse", _mse, hessian_needs_target=False)
        if key in ("cross_entropy", "ce", "crossentropy"):
            return Loss("cross_entropy", _cross_entropy, hessian_needs_target=False)
        raise ValueError(
            f"Unknown loss {loss!r}. Use 'mse', 'cross_entropy', or pass a callable "
            "(output, target) -> per-sample loss of shape (batch,), e.g. "
            "lambda out, y: torch.nn.functional.huber_loss(out, y, reduction='none').mean(1)."
        )
    if callable(loss):
        name = getattr(loss, "__name__", type(loss).__name__)
        needs = bool(getattr(loss, "hessian_needs_target", True))
        return Loss(name, loss, hessian_needs_target=needs)
    raise TypeError(f"`loss` must be a string or a callable, got {type(loss).__name__}.")


def per_sample_losses(loss: Loss, out: Tensor, y: Tensor) -> Tensor:
    """Evaluate ``loss`` on flattened outputs ``(batch, k)`` and check it is per-sample: ``(batch,)``."""
    values = loss(out, y)
    if not isinstance(values, Tensor) or values.shape != (out.shape[0],):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(
            f"The loss {loss.name!r} must return one value per sample, shape ({out.shape[0]},), but "
            f"returned {shape}. Pass a per-sample loss, e.g. reduction='none' and a mean over "
            "the non-batch dimensions."
        )
    return values


def _cross_entropy_derivatives(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """CE on logits: r = softmax − onehot(y), Λ = diag(p) − ppᵀ (independent of y)."""
    p = torch.softmax(out, dim=1)
    r = p - F.one_hot(y.long(), out.shape[1]).to(p.dtype)
    return r, torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


def _mse_derivatives(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """MSE averaged over k outputs: r = 2(f − y)/k, Λ = (2/k) I."""
    k = out.shape[1]
    r = 2.0 * (out - y.reshape(out.shape).to(out.dtype)) / k
    eye = torch.eye(k, dtype=out.dtype, device=out.device) * (2.0 / k)
    return r, eye.expand(out.shape[0], k, k).clone()


_CLOSED_FORMS = {"cross_entropy": _cross_entropy_derivatives, "mse": _mse_derivatives}


def _single(loss: Loss) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda o, t: loss(o.unsqueeze(0), t.unsqueeze(0))[0]


def residual_and_hessian(loss: Loss, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Residual and output Hessian per sample, by autograd.

    Args:
        loss: the per-sample loss.
        out: flattened model outputs, ``(m, k)``.
        y: targets, ``(m, ...)``.

    Returns:
        ``r`` of shape ``(m, k)`` with ``r[i] = ∂ℓ_i/∂f_i``, and ``Λ`` of shape ``(m, k, k)``.
    """
    per_sample_losses(loss, out[:1].detach(), y[:1])
    out = out.detach()
    if loss.name in _CLOSED_FORMS and loss.fn in (_mse, _cross_entropy):
        return _CLOSED_FORMS[loss.name](out, y)
    one = _single(loss)
    r = vmap(grad(one))(out, y)
    lam = vmap(hessian(one))(out, y)
    return r, lam


def output_hessian(loss: Loss, out: Tensor, y: Optional[Tensor] = None, *, target_like: Optional[Tensor] = None) -> Tensor:
    """Λ ``(m, k, k)`` at outputs ``out`` ``(m, k)``; targets are only needed when the loss says so.

    For a loss whose Hessian does not depend on the target, ``y`` may be ``None``: built-in losses
    use a placeholder target, a callable uses ``target_like`` (one valid target, e.g. a probe
    label) for every sample.
    """
    out = out.detach()
    if y is None:
        if loss.hessian_needs_target:
            raise ValueError(
                f"The Hessian of loss {loss.name!r} may depend on the target, so contraction needs "
                "labelled reference batches: pass reference=(x, y) to GramMonitor, or mark the loss "
                "with `loss.hessian_needs_target = False` if its Hessian does not depend on y."
            )
        if loss.name == "cross_entropy":
            y = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
        elif loss.name == "mse":
            y = torch.zeros_like(out)
        elif target_like is not None:
            y = target_like.unsqueeze(0).expand(out.shape[0], *target_like.shape)
        else:
            raise ValueError(f"output_hessian needs `target_like` for the callable loss {loss.name!r}.")
    if loss.name in _CLOSED_FORMS and loss.fn in (_mse, _cross_entropy):
        return _CLOSED_FORMS[loss.name](out, y)[1]
    return vmap(hessian(_single(loss)))(out, y)
