"""Flat per-sample Jacobians ``(m, k, P)`` and flat per-sample vector–Jacobian products
``(m, q, P)`` from the captured per-sample pieces, written straight into one preallocated output.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import per_sample, torchfunc
from .layers import Outer
from .per_sample import Preconditioner, fallback_jacobians, no_autocast, sqrt_preconditioner
from .plan import default_chunk, make_plan, report_vmap_fallbacks, restrict_plan, run_chunked

__all__ = ["flat_jacobian", "flat_vjp", "USE_HUGE_PAGES"]

# The (m, k, P) output of :func:`flat_jacobian` is written once and is usually the largest thing
# the call touches; on Linux, fresh anonymous memory is faulted in 4 KiB pages, which costs more
# than writing it (measured ~7x slower first touch on CPU for 0.1-1 GB). Large CPU outputs are
# therefore advised as transparent huge pages (``MADV_HUGEPAGE``, what PyTorch's own
# ``THP_MEM_ALLOC_ENABLE`` does). Best effort: a no-op where unsupported or disabled.
USE_HUGE_PAGES = True
_HUGE_PAGE_MIN_BYTES = 32 << 20  # glibc serves these with a fresh mmap of their own
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_libc = None


def _madvise_huge(t: Tensor) -> None:
    global _libc
    if _libc is None:
        _libc = False
        try:
            import ctypes
            import ctypes.util
            import sys

            if sys.platform.startswith("linux"):
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                lib.madvise.restype = ctypes.c_int
                _libc = lib
        except (OSError, AttributeError):  # pragma: no cover - no libc
            _libc = False
    if not _libc:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo = (start + _HUGE - 1) & ~(_HUGE - 1)  # only whole huge pages inside the tensor's memory
    hi = end & ~(_HUGE - 1)
    if hi > lo:
        _libc.madvise(lo, hi - lo, _MADV_HUGEPAGE)  # failure only means small pages


def _empty_output(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if USE_HUGE_PAGES and out.device.type == "cpu" and out.numel() * out.element_size() >= _HUGE_PAGE_MIN_BYTES:
        _madvise_huge(out)
    return out


def _write_outer(c: Outer, dst: Tensor) -> None:
    """Per-sample gradients ``Σ_{g,t} B ⊗ A`` of a weight straight into ``dst`` ``(n, q, D)``."""
    n, q, G, T, d_out = c.b.shape
    if c.is_index:  # Embedding: scatter the output gradients into the rows of the used indices
        g = dst.view(n, q, c.d_in, d_out).zero_()
        src = c.b[:, :, 0].to(dst.dtype)  # (n, q, T, d_out)
        g.scatter_add_(2, c.a[:, 0][:, None, :, None].expand_as(src), src)
        return
    d_in = c.d_in
    if c.a_is_row:  # pragma: no cover - no float-input row-indexed layer is registered
        dst.copy_(c.dense().reshape(n, q, -1))
        return
    view = dst.view(n, q, G, d_out, d_in)
    same = c.a.dtype == dst.dtype
    if T == 1:  # outer products, memory bound: one broadcast multiply into the output
        b, a = c.b[:, :, :, 0, :, None], c.a[:, None, :, 0, None, :]
        if same:
            torch.mul(b, a, out=view)
        else:
            view.copy_(b * a)
        return
    # Σ_t over positions: per sample one GEMM (q·d_out × T) @ (T × d_in) per group. The q output
    # rows of a sample are P apart in ``dst``, so a few samples at a time are gathered (their
    # output-gradients made contiguous) and multiplied into a small cache-resident buffer, then
    # copied out; CPU bmm loops over its batch anyway, and M = q·d_out beats q GEMMs of d_out rows.
    per_sample = q * d_out * d_in
    if per_sample > _WRITE_BLOCK_ELEMS or not same:
        for g in range(G):
            a_g = c.a[:, g]  # (n, T, d_in)
            for i in range(q):
                b_gi = c.b[:, i, g].transpose(1, 2)  # (n, d_out, T)
                if same:
                    torch.bmm(b_gi, a_g, out=view[:, i, g])
                else:
                    view[:, i, g].copy_(torch.bmm(b_gi, a_g))
        return
    step = max(1, min(n, _WRITE_BLOCK_ELEMS // per_sample, _WRITE_BLOCK_ELEMS // max(1, q * d_out * T)))
    # Narrow inputs (first convolutions: d_in = C_in·kernel) make GEMMs with few columns; there the
    # transposed product (d_in × T) @ (T × q·d_out) is faster even with its transposing copy-out.
    transposed = d_in < 128 and d_in < q * d_out and T >= 32
    buf = c.b.new_empty((step, d_in, q * d_out) if transposed else (step, q * d_out, d_in))
    for s0 in range(0, n, step):
        s1 = min(n, s0 + step)
        for g in range(G):
            bb = c.b[s0:s1, :, g].transpose(2, 3).reshape(s1 - s0, q * d_out, T)
            if transposed:
                tmp = torch.bmm(c.a[s0:s1, g].transpose(1, 2), bb.transpose(1, 2), out=buf[: s1 - s0])
                view[s0:s1, :, g].copy_(tmp.view(s1 - s0, d_in, q, d_out).permute(0, 2, 3, 1))
            else:
                tmp = torch.bmm(bb, c.a[s0:s1, g], out=buf[: s1 - s0])
                view[s0:s1, :, g].copy_(tmp.view(s1 - s0, q, d_out, d_in))


_WRITE_BLOCK_ELEMS = 1 << 19  # elements of the per-block GEMM buffer (2 MiB in float32)


def flat_jacobian(
    model: nn.Module,
    x: Tensor,
    *,
    preconditioner: Preconditioner = None,
    power: float = 0.0,
    names: Optional[Sequence[str]] = None,
    memory_budget: int = torchfunc.DEFAULT_MEMORY_BUDGET,
    strict: bool = False,
) -> Tensor:
    """Per-sample Jacobians flattened over parameters, columns scaled by ``P**power``; fast path.

    Same contract as :func:`gramhook.kernel.torchfunc.flat_jacobian`: shape ``(m, k, P)``, the
    parameters of ``names`` (default: every ``requires_grad`` parameter, in ``named_parameters()``
    order) in that order, eval mode, flags restored, no ``.grad`` touched, no hook left behind.

    Per chunk of samples: one forward with hooks, one batched backward of the ``k`` unit cotangents
    to the handled layers' outputs (or, when that batched backward would loop over the cotangents op
    by op anyway — convolutions have no batching rule there — ``k`` plain backward passes on the
    retained graph, which skips vmap's slicing, cloning and concatenation), then each handled
    parameter's per-sample gradients are formed from its layer's input and output-gradients
    directly in their columns of the preallocated output: a broadcast outer product for flat
    Linear layers, blocked GEMMs over positions for convolutions and sequences
    (:func:`_write_outer`), a copy for biases and norm affines, a scatter for Embedding.
    Parameters without a handler (and ``names`` that are not ``requires_grad``) take the
    torch.func path for their own columns only. Large CPU outputs use transparent huge pages
    (:data:`USE_HUGE_PAGES`).

    ``memory_budget`` bounds the transient memory per chunk (captured activations, output
    gradients, unfolded inputs, torch.func Jacobians); the output itself is not counted.
    Out-of-memory errors retry with half the chunk.

    Raises:
        ValueError: if ``strict`` and some requested parameter has no handler.
    """
    params = torchfunc.trainable_parameters(model, names)
    names = list(params)
    offsets: Dict[str, Tuple[int, int]] = {}
    total = 0
    for n, p in params.items():
        offsets[n] = (total, total + p.numel())
        total += p.numel()
    dtype = params[names[0]].dtype
    for p in params.values():
        dtype = torch.promote_types(dtype, p.dtype)
    device = params[names[0]].device
    scales: Dict[str, Tensor] = {}
    if preconditioner is not None and power != 0.0:
        for n in names:
            if n in preconditioner:
                scales[n] = preconditioner[n].reshape(-1).to(device=device, dtype=dtype) ** power
    m = x.shape[0]
    with torchfunc.eval_mode(model):
        with report_vmap_fallbacks():
            plan = make_plan(model, x)
        # The batched backward would loop over the k cotangents op by op (e.g. convolutions):
        # loop over them ourselves, without vmap's slicing and concatenation.
        loop = plan.replicate
        plan = restrict_plan(dataclasses.replace(plan, replicate=False), params, strict)
        k = plan.k
        out = _empty_output((m, k, total), dtype, device)
        forms = {full: "ghost" for lp in plan.layers for _, full in lp.params}

        def fill(xs: Tensor, dst: Tensor) -> None:
            if plan.layers:
                contribs = per_sample.chunk_contributions(model, plan, xs, None, loop=loop)
                with no_autocast(device), torch.no_grad():
                    for name, c in contribs.items():
                        lo, hi = offsets[name]
                        d = dst[:, :, lo:hi]
                        if isinstance(c, Outer):
                            _write_outer(c, d)
                        else:
                            d.copy_(c.g.reshape(d.shape))
                        if name in scales:
                            d.mul_(scales[name])
                del contribs
            if plan.fallback:
                for name, j in fallback_jacobians(model, xs, plan.fallback, memory_budget).items():
                    lo, hi = offsets[name]
                    d = dst[:, :, lo:hi]
                    d.copy_(j.reshape(d.shape))
                    if name in scales:
                        d.mul_(scales[name])

        def chunk_of(c):
            return c if c is not None else default_chunk(model, plan, x, k, forms, memory_budget)

        def fn(chunk):
            for s0 in range(0, m, chunk):
                fill(x[s0 : s0 + chunk], out[s0 : s0 + chunk])
            return out

        return run_chunked(fn, chunk_of)


# ----------------------------------------------------------------------------------------------
# Per-sample vector–Jacobian products, flat


def flat_vjp(
    model: nn.Module,
    x: Tensor,
    cotangents: Tensor,
    *,
    preconditioner: Preconditioner = None,
    names: Optional[Sequence[str]] = None,
    memory_budget: int = torchfunc.DEFAULT_MEMORY_BUDGET,
    strict: bool = False,
) -> Tensor:
    """Per-sample vector–Jacobian products ``P^{1/2} J_iᵀ c_{i,q}``, flattened; fast path.

    One forward with hooks and one backward per cotangent row; handled parameters are formed
    from their layer's factors, the others through the torch.func path.

    Args:
        cotangents: ``(m, q, k)``.

    Returns:
        ``(m, q, P)``, columns in the order of :func:`flat_jacobian`.
    """
    params = torchfunc.trainable_parameters(model, names)
    with torchfunc.eval_mode(model):
        plan = restrict_plan(make_plan(model, x, strict=strict), params, strict)
        cot = cotangents.to(next(iter(params.values())).dtype)
        contribs = per_sample.chunk_contributions(model, plan, x, cot.transpose(0, 1)) if plan.layers else {}
        fallback = {}
        if plan.fallback:
            fallback = fallback_jacobians(model, x, plan.fallback, memory_budget, cot)
        cols = []
        for n in params:
            g = contribs[n].dense().flatten(2) if n in contribs else fallback[n]
            sp = sqrt_preconditioner(preconditioner, n, g)
            cols.append(g if sp is None else g * sp)
    return torch.cat(cols, dim=2)
