"""Count-sketches of per-sample Jacobians, ``ĵ_i = Sᵀ P^{1/2} J_iᵀ`` ``(m, k, s)``, and their
transpose.

A count-sketch per parameter with the composite hash ``h(o, i) = (h_row(o) + h_col(i)) mod s`` and
sign ``σ_row(o)·σ_col(i)`` over the parameter viewed as ``(shape[0], prod(shape[1:]))``. For a
factored weight without preconditioner this equals the TensorSketch of the factors, computed by
FFT without forming the gradient; otherwise the gradient is materialized per chunk, scaled by
``P^{1/2}`` (exact Adam metric) and hashed. Both routes give the same sketch. Inner products are
unbiased with relative error ≈ ``1/sqrt(s)``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from . import per_sample, torchfunc
from .layers import Outer, acc_dtype
from .per_sample import Preconditioner, fallback_jacobians, no_autocast, sqrt_preconditioner
from .plan import default_chunk, make_plan, run_chunked

__all__ = ["sketched_jacobian", "sketch_vectors", "unsketch"]


# Hashes are fixed by (kind, name, shape, s, seed, device); every training step sketches, and a
# readout unsketches every parameter, so both forms are kept.
_HASH_CACHE: Dict[tuple, tuple] = {}


def _cached(kind: str, name: str, shape: Tuple[int, ...], s: int, seed: int, device, make):
    key = (kind, name, tuple(shape), s, seed, str(device))
    if key not in _HASH_CACHE:
        if len(_HASH_CACHE) > 512:
            _HASH_CACHE.clear()
        _HASH_CACHE[key] = make()
    return _HASH_CACHE[key]


def _hashes(name: str, shape: Tuple[int, ...], s: int, seed: int, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row/column hashes and signs of one parameter viewed as ``(shape[0], prod(shape[1:]))`` (cached)."""
    return _cached("factors", name, shape, s, seed, device, lambda: _draw_hashes(name, shape, s, seed, device))


def _draw_hashes(name: str, shape: Tuple[int, ...], s: int, seed: int, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    h = seed
    for ch in name:
        h = (h * 131 + ord(ch)) % (2**61 - 1)
    gen = torch.Generator(device="cpu").manual_seed(h)
    rows = shape[0] if len(shape) else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    h_row = torch.randint(0, s, (rows,), generator=gen)
    s_row = torch.randint(0, 2, (rows,), generator=gen) * 2 - 1
    h_col = torch.randint(0, s, (cols,), generator=gen)
    s_col = torch.randint(0, 2, (cols,), generator=gen) * 2 - 1
    if cols == 1:  # plain count-sketch for vectors
        h_col.zero_()
        s_col.fill_(1)
    return tuple(t.to(device) for t in (h_row, s_row, h_col, s_col))


def _count_sketch_dense(
    g: Tensor, flat: Tuple[Tensor, Tensor], s: int, scale: Optional[Tensor] = None, *, signed: bool = False
) -> Tensor:
    """Count-sketch of ``(c, q, rows·cols)`` gradients (times ``scale``) with the composite hash → ``(c, q, s)``.

    ``flat``: the bucket and sign of every flat coordinate (:func:`_flat_hash`). ``signed``: the
    signs are already applied (:func:`_signed`).
    """
    idx, sign = flat
    out = g.new_zeros(g.shape[0], g.shape[1], s)
    if signed:
        return out.index_add_(2, idx, g)
    sign = sign.to(g.dtype)
    if scale is not None:
        sign = sign * scale
    return out.index_add_(2, idx, g * sign)


def _signed(o: Outer, hashes) -> Outer:
    """Fold the composite signs ``σ_row(o)·σ_col(i)`` into the factors of a Linear/Conv weight."""
    h_row, s_row, h_col, s_col = hashes
    G, d_out = o.groups, o.d_out
    a = o.a * s_col.to(o.a.dtype)
    b = o.b * s_row.reshape(G, d_out)[None, None, :, None, :].to(o.b.dtype)
    return dataclasses.replace(o, a=a, b=b)


def _tensor_sketch(o: Outer, hashes, s: int, *, spectrum: bool = False) -> Tensor:
    """Count-sketch of ``Σ_t B_t ⊗ A_t`` by FFT, without forming the gradient → ``(c, q, s)``.

    ``spectrum``: return its ``rfft`` instead, ``(c, q, s//2 + 1)`` complex (sketches add there too).
    """
    h_row, s_row, h_col, s_col = hashes
    c, q, G, T, d_out = o.b.shape
    dt = o.b.dtype
    # hash and sign of the A side and of the B side
    if o.a_is_row:
        ha, sa, hb, sb = h_row, s_row, h_col, s_col
    else:
        ha, sa, hb, sb = h_col, s_col, h_row, s_row
    if o.is_index:
        idx = o.a  # (c, 1, T)
        csa = o.b.new_zeros(c, 1, T, s).scatter_(3, ha[idx].unsqueeze(-1), sa[idx].unsqueeze(-1).to(dt))
    else:
        src = o.a * sa.to(dt)
        csa = o.a.new_zeros(c, G, T, s).scatter_add_(3, ha.expand(c, G, T, -1), src)
    hb = hb.reshape(G, d_out)
    srcb = o.b * sb.reshape(G, d_out)[None, None, :, None, :].to(dt)
    csb = o.b.new_zeros(c, q, G, T, s).scatter_add_(4, hb[None, None, :, None, :].expand(c, q, G, T, d_out), srcb)
    fa = torch.fft.rfft(csa, n=s, dim=-1)
    fb = torch.fft.rfft(csb, n=s, dim=-1)
    if G * T == 1:
        prod = fa[:, None, 0, 0] * fb[:, :, 0, 0]
    else:
        prod = torch.einsum("cgtf,cqgtf->cqf", fa, fb)
    return prod if spectrum else torch.fft.irfft(prod, n=s, dim=-1)


def _sketch_prefers_fft(st, D: int, q: int, s: int) -> bool:
    g, t, d_in, d_out, is_index = st
    fft = g * t * (q + 1) * s * max(1.0, math.log2(s)) * 2 + q * g * t * s
    dense = q * g * t * d_out * d_in + 2 * q * D
    return fft < dense


def sketched_jacobian(
    model: nn.Module,
    x: Tensor,
    s: int,
    *,
    seed: int = 0,
    preconditioner: Preconditioner = None,
    memory_budget: int = torchfunc.DEFAULT_MEMORY_BUDGET,
    strict: bool = False,
    cotangents: Optional[Tensor] = None,
) -> Tensor:
    """Sketched per-sample Jacobians ``ĵ_i = Sᵀ P^{1/2} J_iᵀ`` (docs/theory.md §3(a)), fast path.

    ``S`` is a count-sketch per parameter (module docstring); it is never materialized, and the
    same ``seed`` gives the same ``S`` on every call, whatever the chunking or route per layer.
    With ``cotangents`` ``(m, q, k)`` only the combinations ``Σ_a cot[i, c, a] ĵ_i[a]`` are formed,
    one backward per row ``c`` instead of one per output: ``q/k`` of the cost.

    Returns:
        ``(m, k, s)`` (``(m, q, s)`` with cotangents) with ``⟨ĵ_i[a], ĵ_j[b]⟩ ≈ Θ[i, a, j, b]``,
        relative error ≈ ``1/sqrt(s)``.
    """
    if s < 1:
        raise ValueError(f"Expected a sketch size s >= 1, got {s}.")
    with torchfunc.eval_mode(model):
        plan = make_plan(model, x, strict=strict)
        k = plan.k if cotangents is None else cotangents.shape[1]
        m = x.shape[0]
        p0 = next(iter(model.parameters()))
        device = p0.device
        hashes = {n: _hashes(n, shp, s, seed, device) for n, shp in plan.shapes.items()}
        flats = {n: _flat_hash(n, shp, s, seed, device) for n, shp in plan.shapes.items()}
        routes = {}
        for lp in plan.layers:
            for _, full in lp.params:
                st = plan.stats.get(full)
                has_p = preconditioner is not None and full in preconditioner
                routes[full] = (
                    "fft" if st is not None and not has_p and _sketch_prefers_fft(st, math.prod(plan.shapes[full]), k, s)
                    else "dense"
                )

        def chunk_of(c):
            if c is not None:
                return c
            return default_chunk(model, plan, x, k, {n: ("ghost" if r == "fft" else "dense") for n, r in routes.items()},
                                  memory_budget)

        def sketch_chunk(xs: Tensor, cot: Optional[Tensor]) -> Tensor:
            acc: List[Optional[Tensor]] = [None, None]  # (c, k, s) directly, and in frequency

            def add(t: Tensor, i: int = 0) -> None:
                acc[i] = t if acc[i] is None else acc[i].add_(t)

            if plan.layers:
                contribs = per_sample.chunk_contributions(model, plan, xs, None if cot is None else cot.transpose(0, 1))
                with no_autocast(device):
                    for name, c in contribs.items():
                        sp = sqrt_preconditioner(preconditioner, name, c.b if isinstance(c, Outer) else c.g)
                        if routes[name] == "fft" and isinstance(c, Outer):
                            add(_tensor_sketch(c, hashes[name], s, spectrum=True), 1)
                        elif isinstance(c, Outer) and not c.is_index and not c.a_is_row and sp is None:
                            add(_count_sketch_dense(_signed(c, hashes[name]).dense().flatten(2), flats[name], s,
                                                    signed=True))
                        else:
                            g = c.dense().flatten(2)
                            add(_count_sketch_dense(g, flats[name], s, sp))
            if plan.fallback:
                jac = fallback_jacobians(model, xs, plan.fallback, memory_budget, cot)  # (c, k or q, D)
                with no_autocast(device):
                    for name, j in jac.items():
                        add(_count_sketch_dense(j, flats[name], s, sqrt_preconditioner(preconditioner, name, j)))
            if acc[1] is not None:  # one inverse FFT for every factored layer
                add(torch.fft.irfft(acc[1], n=s, dim=-1))
            return acc[0]

        def fn(chunk):
            return torch.cat([sketch_chunk(x[s0 : s0 + chunk], None if cotangents is None else cotangents[s0 : s0 + chunk])
                              for s0 in range(0, m, chunk)], dim=0)

        return run_chunked(fn, chunk_of)


def sketch_vectors(tensors: Mapping[str, Tensor], s: int, *, seed: int = 0,
                   preconditioner: Preconditioner = None) -> Tensor:
    """The count-sketch of :func:`sketched_jacobian` (same ``seed``, same ``S``) applied to one
    ``P^{1/2}``-scaled vector per name, e.g. a gradient: ``{name: (*shape)}`` → ``(s,)``."""
    out = None
    for name, t in tensors.items():
        t = t.to_dense() if t.is_sparse else t  # sparse gradients (Embedding(sparse=True))
        g = t.detach().reshape(1, 1, -1).to(acc_dtype(t.dtype))
        part = _count_sketch_dense(g, _flat_hash(name, tuple(t.shape), s, seed, t.device), s,
                                   sqrt_preconditioner(preconditioner, name, g))[0, 0]
        out = part if out is None else out.add_(part)
    return out


def unsketch(y: Tensor, shapes: Mapping[str, Tuple[int, ...]], s: int, *, seed: int = 0) -> Dict[str, Tensor]:
    """``S y``: the transpose of the count-sketch of :func:`sketched_jacobian` (same ``seed``),
    ``y`` ``(c, s)`` → ``{name: (c, *shape)}``; ``⟨S y, v⟩ = ⟨y, Sᵀ v⟩`` for every ``v``."""
    out = {}
    for name, shape in shapes.items():
        idx, sign = _flat_hash(name, tuple(shape), s, seed, y.device)
        out[name] = torch.index_select(y, 1, idx).mul_(sign.to(y.dtype)).reshape(y.shape[0], *shape)
    return out


def _flat_hash(name: str, shape: Tuple[int, ...], s: int, seed: int, device) -> Tuple[Tensor, Tensor]:
    """Bucket and sign of every flat coordinate of one parameter under :func:`_hashes` (cached)."""
    def make():
        h_row, s_row, h_col, s_col = _hashes(name, shape, s, seed, device)
        idx = ((h_row[:, None] + h_col[None, :]) % s).reshape(-1)
        return idx, (s_row[:, None] * s_col[None, :]).reshape(-1).to(torch.int8)
    return _cached("flat", name, shape, s, seed, device, make)
