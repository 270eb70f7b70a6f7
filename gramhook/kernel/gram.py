"""Gram assembly from captured per-sample pieces: the empirical NTK ``(m1, k, m2, k)``, the
loss-gradient Gram ``(m, m)`` and cross-kernels between two captured sample sets.

Materialized gradients are stored scaled by ``P^{1/2}``, so every block is a plain inner product;
ghost-form weights (:func:`gramhook.kernel.plan.choose_forms`) are contracted from their factors
(:func:`_ghost_block`). A self-kernel contracts only the blocks on and above the diagonal.
Factors are computed in the accumulation dtype (float32 under autocast, see
:func:`gramhook.kernel.layers.acc_dtype`), so Grams are accumulated in at least float32.

Memory: when the stored factors of all samples fit half of ``memory_budget`` they are computed
once and reused across blocks (and across both sides of a cross-kernel), otherwise the inner side
is recomputed for each block.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..losses import resolve_loss, residual_and_hessian
from . import per_sample, torchfunc
from .layers import Outer, acc_dtype
from .per_sample import Preconditioner, fallback_jacobians, no_autocast, sqrt_preconditioner
from .plan import Plan, choose_forms, default_chunk, make_plan, per_sample_bytes, run_chunked

__all__ = ["Factors", "capture_factors", "cross_kernel", "empirical_ntk", "gradient_gram"]


@dataclasses.dataclass
class Factors:
    """Captured factors of a sample set, reusable across kernels (e.g. probe × reference batches).

    ``chunks[i]`` maps the full name of each ghost-form weight to its :class:`Outer` factors;
    every materialized parameter (and the torch.func ones) is concatenated, ``P^{1/2}``-scaled,
    into one ``(c, q, D_dense)`` tensor under ``"<dense>"``, so a block is one GEMM for them all.
    ``chunks[i]`` is ``None`` when the chunk is recomputed on demand.
    """

    model: nn.Module
    plan: Plan
    x: Tensor
    cot: Optional[Callable]
    preconditioner: Preconditioner
    forms: Dict[str, str]
    chunk: int
    memory_budget: int
    chunks: List[Optional[dict]]

    @property
    def num_samples(self) -> int:
        return self.x.shape[0]

    def get(self, i: int) -> dict:
        rep = self.chunks[i]
        if rep is None:
            with torchfunc.eval_mode(self.model):
                rep = _represent(self, i)
        return rep


_DENSE = "<dense>"


def _represent(f: Factors, i: int) -> dict:
    sl = slice(i * f.chunk, min((i + 1) * f.chunk, f.num_samples))
    xs = f.x[sl]
    cot = None if f.cot is None else (lambda out, _sl=sl: f.cot(out, _sl))
    rep: dict = {}
    dense: List[Tensor] = []  # every materialized parameter, concatenated: one GEMM per block
    if f.plan.layers:
        contribs = per_sample.chunk_contributions(f.model, f.plan, xs, cot)
        folded = _folded_biases(f)
        with no_autocast(xs.device):
            for name in f.forms:
                c = contribs[name]
                if name in folded.values():
                    continue
                if f.forms[name] == "ghost" and isinstance(c, Outer):
                    rep[name] = dataclasses.replace(c, with_bias=True) if name in folded else c
                else:
                    g = c.dense()
                    g = g.reshape(g.shape[0], g.shape[1], -1)
                    sp = sqrt_preconditioner(f.preconditioner, name, g)
                    dense.append(g if sp is None else g * sp)
    if f.plan.fallback:
        dense.append(_fallback_jacobian(f, xs, sl))
    if dense:
        rep[_DENSE] = dense[0] if len(dense) == 1 else torch.cat(dense, dim=2)
    return rep


def _folded_biases(f: Factors) -> Dict[str, str]:
    """weight name -> bias name, for ghost weights whose bias joins them as a constant-1 input."""
    out = {}
    for lp in f.plan.layers:
        names = dict(lp.params)
        w, b = names.get("weight"), names.get("bias")
        if (w and b and f.forms.get(w) == "ghost" and not f.plan.stats[w][4]
                and (f.preconditioner is None or b not in f.preconditioner)):
            out[w] = b
    return out


def _fallback_jacobian(f: Factors, xs: Tensor, sl: slice) -> Tensor:
    """Reference-path ``P^{1/2}``-scaled Jacobian (or loss gradient) of the fallback params."""
    r = None
    if f.cot is not None:
        with torch.no_grad(), torchfunc.eval_mode(f.model):
            out = f.model(xs).reshape(xs.shape[0], -1)
        r = f.cot(out, sl).transpose(0, 1)  # (c, q, k)
    cols = []
    for n, j in fallback_jacobians(f.model, xs, f.plan.fallback, f.memory_budget, r).items():  # (c, q, D)
        sp = sqrt_preconditioner(f.preconditioner, n, j)
        cols.append(j if sp is None else j * sp)
    return torch.cat(cols, dim=2)


def capture_factors(
    model: nn.Module,
    x: Tensor,
    *,
    plan: Optional[Plan] = None,
    preconditioner: Preconditioner = None,
    cot: Optional[Callable] = None,
    q: Optional[int] = None,
    other_size: Optional[int] = None,
    memory_budget: int = torchfunc.DEFAULT_MEMORY_BUDGET,
    chunk: Optional[int] = None,
    store: Optional[bool] = None,
) -> Factors:
    """Capture the factors of ``x`` ``(m, ...)`` for fast Grams (see :class:`Factors`).

    Args:
        cot: ``(out_flat (c, k), slice) -> (q, c, k)`` cotangents; ``None`` for the NTK's unit vectors.
        q: number of cotangents (``k`` if ``cot`` is None, else 1 unless told).
        other_size: the size of the sample set it will be paired with (for the form choice).
        chunk, store: override the chunk size / whether to keep every chunk (else from the budget).
    """
    with torchfunc.eval_mode(model):
        if plan is None:
            plan = make_plan(model, x)
        m = x.shape[0]
        k = plan.k
        q = q if q is not None else (k if cot is None else 1)
        forms = choose_forms(plan, m, other_size or m, q, preconditioner)
        if chunk is None:
            chunk = default_chunk(model, plan, x, q, forms, memory_budget)
        if store is None:
            store = 2 * m * per_sample_bytes(model, plan, forms, q)[1] <= memory_budget
        f = Factors(model, plan, x, cot, preconditioner, forms, chunk, memory_budget, [])
        n = -(-m // chunk)
        f.chunks = [_represent(f, i) if store else None for i in range(n)]
    return f


def _ghost_block(u: Outer, v: Outer, budget_elems: int) -> Tensor:
    """``Σ_{g,t,s} (A1[i,g,t]·A2[j,g,s]) (B1[i,a,g,t]·B2[j,b,g,s])`` → ``(c1, q, c2, q)``."""
    c1, q, G, T1, _ = u.b.shape
    c2, _, _, T2, _ = v.b.shape

    def ka_of(s0, s1, g):
        if u.is_index:
            return (u.a[s0:s1, 0, :, None, None] == v.a[None, None, :, 0, :]).to(u.b.dtype)  # (i,t,j,s)
        ka = torch.einsum("itd,jsd->itjs", u.a[s0:s1, g], v.a[:, g])
        return ka.add_(1) if u.with_bias else ka

    if G == 1 and T1 == 1 and T2 == 1:  # flat Linear: (A Aᵀ) ⊙ (B Bᵀ), in place
        kb = u.b.reshape(c1 * q, -1) @ v.b.reshape(c2 * q, -1).T
        return kb.view(c1, q, c2, q).mul_(ka_of(0, c1, 0).view(c1, 1, c2, 1))
    out = u.b.new_zeros(c1, q, c2, q)
    # Rows of i per piece so that the (i, a, t, j, b, s) intermediate stays within budget.
    step = max(1, min(c1, budget_elems // max(1, q * T1 * c2 * q * T2)))
    for s0 in range(0, c1, step):
        s1 = min(c1, s0 + step)
        n = s1 - s0
        for g in range(G):
            ka = ka_of(s0, s1, g)
            b1 = u.b[s0:s1, :, g]  # (i, a, t, o)
            b2 = v.b[:, :, g]  # (j, b, s, o)
            kb = (b1.reshape(-1, b1.shape[-1]) @ b2.reshape(-1, b2.shape[-1]).T).reshape(n, q, T1, c2, q, T2)
            out[s0:s1] += (kb * ka[:, None, :, :, None, :]).sum(dim=(2, 5))
    return out


def _block(r1: dict, r2: dict, budget_elems: int) -> Tensor:
    """Gram block ``(c1, q, c2, q)`` between two chunk representations, summed over parameters."""
    total = None
    for name, u in r1.items():
        v = r2[name]
        if isinstance(u, Outer):
            term = _ghost_block(u, v, budget_elems)
        else:
            c1, q, _ = u.shape
            c2 = v.shape[0]
            term = (u.reshape(c1 * q, -1) @ v.reshape(c2 * q, -1).T).reshape(c1, q, c2, q)
        total = term if total is None else total.add_(term)
    return total


def _slice_rep(rep: dict, a: int, b: int) -> dict:
    out = {}
    for name, u in rep.items():
        out[name] = dataclasses.replace(u, a=u.a[a:b], b=u.b[a:b]) if isinstance(u, Outer) else u[a:b]
    return out


def _symmetric_kernel(f: Factors, tiles_per_side: int = 4) -> Tensor:
    """Self-kernel from stored chunks: only the blocks on and above the diagonal are contracted."""
    m = f.num_samples
    tile = max(1, min(f.chunk, -(-m // tiles_per_side)))
    tiles = []
    for i, rep in enumerate(f.chunks):
        base = i * f.chunk
        c = min(f.chunk, m - base)
        for t0 in range(0, c, tile):
            tiles.append((base + t0, _slice_rep(rep, t0, min(c, t0 + tile))))
    budget_elems = max(1, f.memory_budget // 32)
    out = None
    for ia, (sa, ra) in enumerate(tiles):
        for sb, rb in tiles[ia:]:
            blk = _block(ra, rb, budget_elems)
            if out is None:
                out = blk.new_empty(m, blk.shape[1], m, blk.shape[3])
            ca, cb = blk.shape[0], blk.shape[2]
            out[sa : sa + ca, :, sb : sb + cb] = blk
            if sb != sa:
                out[sb : sb + cb, :, sa : sa + ca] = blk.permute(2, 3, 0, 1)
    return out


def cross_kernel(f1: Factors, f2: Optional[Factors] = None) -> Tensor:
    """Gram between two captured sample sets: ``(m1, q, m2, q)``; ``f2=None`` for ``f1`` itself.

    ``f1`` and ``f2`` must come from the same model, plan, preconditioner and forms. Capturing the
    probe once and pairing it with many batches reuses the probe's factors.

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> probe = capture_factors(net, torch.randn(5, 3), other_size=4)
    >>> batch = capture_factors(net, torch.randn(4, 3), plan=probe.plan, other_size=5)
    >>> cross_kernel(probe, batch).shape
    torch.Size([5, 2, 4, 2])
    """
    with no_autocast(f1.x.device):
        return _cross_kernel(f1, f2)


def _cross_kernel(f1: Factors, f2: Optional[Factors]) -> Tensor:
    same = f2 is None or f2 is f1
    f2 = f1 if f2 is None else f2
    if f1.forms != f2.forms or f1.plan.fallback != f2.plan.fallback:
        raise ValueError(
            "cross_kernel needs factors captured with the same plan and forms; pass plan=f1.plan and "
            "other_size so that m1·m2 and m1+m2 agree (capture_factors(..., other_size=m1))."
        )
    if same and f1.chunks and f1.chunks[0] is not None:
        return _symmetric_kernel(f1)
    blocks1 = [f1.get(i) for i in range(len(f1.chunks))] if f1.chunks[0] is not None else None
    rows = []
    itemsize = 8
    budget_elems = max(1, f1.memory_budget // (4 * itemsize))
    for i in range(len(f1.chunks)):
        r1 = blocks1[i] if blocks1 is not None else f1.get(i)
        row = []
        for j in range(len(f2.chunks)):
            r2 = r1 if (same and i == j) else f2.get(j)
            row.append(_block(r1, r2, budget_elems))
        rows.append(torch.cat(row, dim=2))
    return torch.cat(rows, dim=0)


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    preconditioner: Preconditioner = None,
    memory_budget: int = torchfunc.DEFAULT_MEMORY_BUDGET,
    strict: bool = False,
) -> Tensor:
    """Empirical NTK by per-layer handlers; same contract as :func:`gramhook.kernel.torchfunc.empirical_ntk`.

    Returns:
        ``(m1, k, m2, k)``, ``Θ[i, a, j, b] = ∂f_a(x1_i)/∂w · P · ∂f_b(x2_j)/∂w``.
    """
    with torchfunc.eval_mode(model):
        plan = make_plan(model, x1, strict=strict)
        if not plan.layers:
            return torchfunc.empirical_ntk(model, x1, x2, preconditioner=preconditioner, memory_budget=memory_budget)
        k = plan.k
        m1 = x1.shape[0]
        m2 = m1 if x2 is None else x2.shape[0]
        forms = choose_forms(plan, m1, m2, k, preconditioner)

        def chunk_of(c):
            return c if c is not None else default_chunk(model, plan, x1 if m1 >= m2 else x2, k, forms, memory_budget)

        def fn(chunk):
            f1 = capture_factors(model, x1, plan=plan, preconditioner=preconditioner, other_size=m2,
                                 memory_budget=memory_budget, chunk=chunk)
            f2 = None
            if x2 is not None:
                f2 = capture_factors(model, x2, plan=plan, preconditioner=preconditioner, other_size=m1,
                                     memory_budget=memory_budget, chunk=chunk)
            return cross_kernel(f1, f2)

        return run_chunked(fn, chunk_of)


def gradient_gram(
    model: nn.Module,
    loss,
    x: Tensor,
    y: Tensor,
    *,
    preconditioner: Preconditioner = None,
    memory_budget: int = torchfunc.DEFAULT_MEMORY_BUDGET,
    strict: bool = False,
) -> Tensor:
    """``G[i, j] = ⟨∇ℓ_i, P ∇ℓ_j⟩ = r_iᵀ Θ_ij r_j``, shape ``(m, m)``, with one backward per chunk.

    The residuals ``r = ∂ℓ/∂f`` (:func:`gramhook.losses.residual_and_hessian`) are the single
    cotangent, so no per-output Jacobian is formed.
    """
    loss = resolve_loss(loss)
    with torchfunc.eval_mode(model):
        plan = make_plan(model, x, strict=strict)
        if not plan.layers:
            return torchfunc.gradient_gram(model, loss, x, y, preconditioner=preconditioner, memory_budget=memory_budget)
        m = x.shape[0]

        def cot(out: Tensor, sl: slice) -> Tensor:
            r, _ = residual_and_hessian(loss, out.detach().to(acc_dtype(out.dtype)), y[sl])
            return r.unsqueeze(0)  # (1, c, k)

        forms = choose_forms(plan, m, m, 1, preconditioner)

        def chunk_of(c):
            return c if c is not None else default_chunk(model, plan, x, 1, forms, memory_budget)

        def fn(chunk):
            f = capture_factors(model, x, plan=plan, preconditioner=preconditioner, cot=cot, q=1,
                                memory_budget=memory_budget, chunk=chunk)
            return cross_kernel(f)[:, 0, :, 0]

        return run_chunked(fn, chunk_of)
