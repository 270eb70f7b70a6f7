"""Per-sample pieces of the handled layers: hooks record each layer's input and output, one
backward carries the output cotangents to them, and the handlers of :mod:`gramhook.kernel.layers`
turn ``(input, output-gradient)`` into per-parameter contributions.

Per chunk of ``c`` samples (:func:`chunk_contributions`):

1. One forward pass with forward hooks (inside :func:`capture`, always removed) records each
   handled layer's input ``a`` and output.
2. ONE batched backward, ``torch.autograd.grad(..., is_grads_batched=True)``, pushes the ``q``
   output cotangents (the ``k`` unit vectors for the NTK, the residual ``r`` for the loss-gradient
   Gram, then ``q = 1``) to every handled layer's output at once: ``b`` of shape
   ``(c, q, *out)``. If some op of the model has no vmap batching rule (PyTorch warns; e.g.
   CPU flash attention), the batch is instead replicated ``q`` times and one ordinary backward
   carries the ``q`` cotangents, one per replica (eval mode keeps samples independent).
3. The handlers turn ``(a, b)`` into per-parameter contributions, :class:`Dense` ``(c, q, *shape)``
   or :class:`Outer` (factors, never multiplied out).

Parameters without a handler (raw ``nn.Parameter`` s such as
``MultiheadAttention.in_proj_weight``, layers called more than once, tied weights, unsupported
configurations) take the torch.func path instead (:func:`fallback_jacobians`).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import torchfunc
from .layers import acc_dtype

if TYPE_CHECKING:  # pragma: no cover
    from .plan import LayerPlan, Plan

__all__ = ["Preconditioner", "CotangentFn", "capture", "chunk_contributions", "fallback_jacobians", "no_autocast",
           "sqrt_preconditioner"]

Preconditioner = Optional[Mapping[str, Tensor]]
# (out_flat (c, k), sample slice) -> cotangents (q, c, k), or None for the k unit vectors.
CotangentFn = Callable[[Tensor, slice], Optional[Tensor]]


def no_autocast(device: torch.device):
    """Handlers and contractions run outside autocast, in the accumulation dtype."""
    return torch.autocast(device_type=device.type, enabled=False)


@contextlib.contextmanager
def capture(layers: Sequence[LayerPlan]) -> Iterator[Dict[str, List[Tuple[Tensor, Tensor]]]]:
    """Forward hooks recording ``(input, output)`` of each layer; handles are always removed."""
    records: Dict[str, List[Tuple[Tensor, Tensor]]] = {lp.name: [] for lp in layers}

    def make(lp: LayerPlan):
        def hook(module, args, out):
            records[lp.name].append((args[0] if args else None, out))
            if lp.clone_output and isinstance(out, Tensor):
                return out.clone()
            return None

        return hook

    handles = [lp.module.register_forward_hook(make(lp)) for lp in layers]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def chunk_contributions(model: nn.Module, plan: Plan, x: Tensor, cot: Optional[Tensor], *, loop: bool = False):
    """Per-parameter contributions of handled layers on one chunk.

    Args:
        cot: cotangents ``(q, c, k)`` or ``None`` for the ``k`` unit vectors; or a callable
            ``out_flat -> cotangents``.
        loop: run one backward per cotangent (``retain_graph``), each written into a
            ``(c, q, *out)`` buffer, instead of the batched backward or the replicated batch. For
            models whose batched backward would loop op by op anyway (convolutions: the vmap of
            ``is_grads_batched`` has no batching rule for ``convolution_backward``), this skips
            its per-op slicing, cloning and concatenation and yields contiguous output-gradients.

    Returns:
        full name -> :class:`Dense` / :class:`Outer`.
    """
    c = x.shape[0]
    rep = not loop and plan.replicate and not callable(cot) and (cot is None or cot.shape[0] > 1)
    with capture(plan.layers) as rec, torch.enable_grad():
        if rep:
            q0 = plan.k if cot is None else cot.shape[0]
            out = model(x.repeat(q0, *([1] * (x.dim() - 1))))
        else:
            out = model(x)
    out = out.reshape(out.shape[0], -1)
    if callable(cot):
        cot = cot(out)
    outs = [rec[lp.name][0][1] for lp in plan.layers]
    if cot is None:
        k = out.shape[1]
        cot = torch.eye(k, dtype=out.dtype, device=out.device).unsqueeze(1).expand(k, c, k)
    cot = cot.to(out.dtype)
    if rep:
        q = cot.shape[0]
        grads = torch.autograd.grad(out, outs, cot.reshape(q * c, -1), allow_unused=True)
        grads = [None if g is None else g.reshape(q, c, *g.shape[1:]).transpose(0, 1) for g in grads]
        outs = [o[:c] for o in outs]
    elif cot.shape[0] == 1:
        grads = torch.autograd.grad(out, outs, cot[0], allow_unused=True)
        grads = [None if g is None else g.unsqueeze(1) for g in grads]
    elif loop:
        q = cot.shape[0]
        grads = [None] * len(outs)
        for i in range(q):
            gi = torch.autograd.grad(out, outs, cot[i], allow_unused=True, retain_graph=i < q - 1)
            for j, g in enumerate(gi):
                if g is None:
                    if grads[j] is not None:
                        grads[j][:, i].zero_()
                    continue
                if grads[j] is None:
                    grads[j] = g.new_zeros((c, q) + tuple(g.shape[1:])) if i else g.new_empty((c, q) + tuple(g.shape[1:]))
                grads[j][:, i].copy_(g)
    else:
        grads = torch.autograd.grad(out, outs, cot, allow_unused=True, is_grads_batched=True)
        grads = [None if g is None else g.transpose(0, 1) for g in grads]
    result = {}
    for lp, g, o in zip(plan.layers, grads, outs):
        a = rec[lp.name][0][0].detach()[:c]
        if g is None:  # the output does not reach f: zero contribution
            g = torch.zeros((c, cot.shape[0]) + tuple(o.shape[1:]), dtype=o.dtype, device=o.device)
        with no_autocast(o.device):
            parts = lp.handler.fn(lp.module, a, g)
        for local, full in lp.params:
            if local in parts:
                result[full] = parts[local]
    return result


def sqrt_preconditioner(preconditioner: Preconditioner, name: str, like: Tensor) -> Optional[Tensor]:
    if preconditioner is None or name not in preconditioner:
        return None
    return preconditioner[name].to(device=like.device, dtype=like.dtype).sqrt().reshape(-1)


def fallback_jacobians(model: nn.Module, xs: Tensor, names: Sequence[str], memory_budget: int,
                       cot: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Per-sample Jacobians of the parameters ``names`` by torch.func, for the parameters no handler
    covers: ``{name: (c, k, D)}`` flattened, in the accumulation dtype; with cotangents ``cot``
    ``(c, q, k)`` their combinations ``{name: (c, q, D)}``.

    Attention runs in its composite form (:func:`torchfunc.composite_attention`), and everything
    outside autocast: torch.func's batched backward can mix half and float grads under CUDA fp16
    autocast, so the few fallback parameters are computed in their own dtype instead.
    """
    with torchfunc.composite_attention(), no_autocast(xs.device):
        jac = torchfunc.per_sample_jacobians(model, xs, names=list(names), memory_budget=memory_budget)
        out = {}
        for n, j in jac.items():
            j = j.to(acc_dtype(j.dtype)).flatten(2)
            out[n] = j if cot is None else torch.einsum("cqk,ckd->cqd", cot.to(j.dtype), j)
    return out
