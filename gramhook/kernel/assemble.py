"""Fast kernels: capture layer factors with hooks, choose a form per layer, chunk, sum.

Pipeline, per chunk of ``c`` samples:

1. One forward pass with forward hooks (inside :func:`capture`, always removed) records each
   handled layer's input ``a`` and output.
2. ONE batched backward, ``torch.autograd.grad(..., is_grads_batched=True)``, pushes the ``q``
   output cotangents (the ``k`` unit vectors for the NTK, the residual ``r`` for the loss-gradient
   Gram, then ``q = 1``) to every handled layer's output at once: ``b`` of shape
   ``(c, q, *out)``. If some op of the model has no vmap batching rule (PyTorch warns; e.g.
   CPU flash attention), the batch is instead replicated ``q`` times and one ordinary backward
   carries the ``q`` cotangents, one per replica (eval mode keeps samples independent).
3. The handlers of :mod:`gramhook.kernel.layers` turn ``(a, b)`` into per-parameter
   contributions, kept in one of two forms (:func:`choose_forms`).
4. Gram blocks between chunks are summed over parameters. Parameters without a handler (raw
   ``nn.Parameter`` s such as ``MultiheadAttention.in_proj_weight``, layers called more than once,
   tied weights, unsupported configurations) take the reference path: torch.func Jacobians of just
   those parameters (:func:`gramhook.kernel.reference.per_sample_jacobians` with ``names``).

Choosing the form of a factored weight (``G`` groups, ``T`` positions, widths ``d_in``/``d_out``,
``D = G·d_out·d_in`` entries, ``q`` cotangents, ``m1 × m2`` sample pairs), by multiply-adds:

- ghost: ``m1·m2 · G·T² · (d_in + q²·d_out + 16·q²·[T > 1])``, the last term for the
  memory-bound Hadamard product and sum over position pairs, and counted 4x when ``T > 1``
  (its GEMMs have the skinny inner size ``d_out``); the factors are never multiplied out, so no
  ``(m, q, D)`` tensor exists. ``d_in = 1`` for an Embedding (its input is an index).
- materialized per-sample gradients: ``(m1 + m2)·q·G·T·d_out·d_in`` to form them plus
  ``m1·m2 · q²·D`` to contract them.

The cheaper one is used; the ghost form also needs ``P = I`` on that parameter (a diagonal ``P``
does not factor over the outer product), so a preconditioned parameter is always materialized.
In practice: Linear layers on flat inputs go ghost, convolutions and long sequences materialize.

Materialized gradients are stored scaled by ``P^{1/2}``, so every block is a plain inner product;
a self-kernel contracts only the blocks on and above the diagonal.
Factors are computed in the accumulation dtype (float32 under autocast, see
:func:`gramhook.kernel.layers.acc_dtype`), so Grams are accumulated in at least float32.

Memory: the chunk size comes from a per-sample estimate measured on one sample; when the stored
factors of all samples fit half of ``memory_budget`` they are computed once and reused across
blocks (and across both sides of a cross-kernel), otherwise the inner side is recomputed for each
block. An out-of-memory error (``torch.OutOfMemoryError`` or a ``RuntimeError`` saying "out of
memory") restarts the computation with half the chunk.

The flat Jacobian (:func:`flat_jacobian`, ``(m, k, P)``) materializes every handled parameter's
per-sample gradients from the same captured factors, written straight into its columns of one
preallocated output (no Gram, no form choice).

Sketches (:func:`sketched_jacobian`) use a count-sketch per parameter with the composite hash
``h(o, i) = (h_row(o) + h_col(i)) mod s`` and sign ``σ_row(o)·σ_col(i)`` over the parameter viewed
as ``(shape[0], prod(shape[1:]))``. For a factored weight without preconditioner this equals the
TensorSketch of the factors, computed by FFT without forming the gradient; otherwise the
gradient is materialized per chunk, scaled by ``P^{1/2}`` (exact Adam metric) and hashed. Both
routes give the same sketch. Inner products are unbiased with relative error ≈ ``1/sqrt(s)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import weakref
from collections import Counter
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..losses import resolve_loss, residual_and_hessian
from . import reference as _ref
from .layers import Dense, LayerHandler, Outer, acc_dtype, handler_for

__all__ = [
    "LayerPlan",
    "Plan",
    "make_plan",
    "capture",
    "Factors",
    "capture_factors",
    "cross_kernel",
    "empirical_ntk",
    "gradient_gram",
    "sketched_jacobian",
    "flat_jacobian",
    "choose_forms",
]

Preconditioner = Optional[Mapping[str, Tensor]]
# (out_flat (c, k), sample slice) -> cotangents (q, c, k), or None for the k unit vectors.
CotangentFn = Callable[[Tensor, slice], Optional[Tensor]]

_OOM_ERRORS = tuple(
    e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if e
)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One hooked layer: ``params`` are ``(local name, full name)`` pairs it covers."""

    name: str
    module: nn.Module
    handler: LayerHandler
    params: Tuple[Tuple[str, str], ...]
    clone_output: bool  # the output is modified in place later: hand a copy downstream


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which parameters go through handlers and which through the reference path."""

    layers: Tuple[LayerPlan, ...]
    fallback: Tuple[str, ...]
    shapes: Dict[str, Tuple[int, ...]]  # full name -> parameter shape, for every trainable param
    stats: Dict[str, Tuple[int, int, int, int, bool]]  # full name -> (G, T, d_in, d_out, is_index)
    act_elems: int  # per-sample elements of handled inputs + outputs
    out_elems: int  # per-sample elements of handled outputs
    k: int  # outputs per sample
    replicate: bool = False  # batched backward lacks vmap rules: replicate the batch q times instead


def _no_autocast(device: torch.device):
    """Handlers and contractions run outside autocast, in the accumulation dtype."""
    return torch.autocast(device_type=device.type, enabled=False)


def _is_oom(err: BaseException) -> bool:
    if _OOM_ERRORS and isinstance(err, _OOM_ERRORS):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


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


_plans: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, Plan]]" = weakref.WeakKeyDictionary()


def make_plan(model: nn.Module, x: Tensor, *, strict: bool = False) -> Plan:
    """:func:`_plan_for`, remembered per model and signature (input shape past the batch, dtype,
    device, the trainable parameters and their identities, the module tree), so that a call per
    training step does not rerun the model to plan."""
    key = (tuple(x.shape[1:]), x.dtype, str(x.device), strict,
           tuple((n, id(p), p.requires_grad) for n, p in model.named_parameters()),
           tuple(id(mod) for mod in model.modules()))
    try:
        cache = _plans.setdefault(model, {})
    except TypeError:  # not weak-referenceable
        return _plan_for(model, x, strict=strict)
    plan = cache.get(key)
    if plan is None:
        plan = cache[key] = _plan_for(model, x, strict=strict)
        if len(cache) > 16:
            cache.pop(next(iter(cache)))
    return plan


def _plan_for(model: nn.Module, x: Tensor, *, strict: bool = False) -> Plan:
    """Assign each trainable parameter to a handler or to the reference path.

    Runs the model on ``x[:1]`` (in eval mode, with grad enabled so that modules take their
    differentiable code paths) to check that each candidate layer is called exactly once with a
    tensor input and output, and whether its output is later modified in place.

    Raises:
        ValueError: if ``strict`` and some trainable parameter has no handler.
    """
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("The model has no trainable parameters (all have requires_grad=False).")
    owners = Counter(id(p) for mod in model.modules() for p in mod._parameters.values() if p is not None)
    candidates = []
    for mname, mod in model.named_modules():
        h = handler_for(mod)
        if h is None:
            continue
        params = []
        for local, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{local}" if mname else local
            if full in trainable and owners[id(p)] == 1:
                params.append((local, full))
        if params:
            candidates.append(LayerPlan(mname, mod, h, tuple(params), False))

    with _ref.eval_mode(model):
        return _make_plan(model, x, trainable, candidates, strict)


def _parameter_uses(out: Tensor) -> Counter:
    """How many autograd edges reach each leaf tensor (by ``id``) in the graph of ``out``: 1 for
    a parameter used once, more for one used again elsewhere (weight tying)."""
    uses: Counter = Counter()
    seen = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            leaf = getattr(nxt, "variable", None)
            if leaf is not None:
                uses[id(leaf)] += 1
            else:
                stack.append(nxt)
    return uses


def _make_plan(model, x, trainable, candidates, strict) -> Plan:
    versions: Dict[str, list] = {lp.name: [] for lp in candidates}
    replicate = False
    with capture(candidates) as rec:
        hooks = []
        for lp in candidates:
            def post(module, args, out, _n=lp.name):
                versions[_n].append(out._version if isinstance(out, Tensor) else None)
            hooks.append(lp.module.register_forward_hook(post))
        try:
            with torch.enable_grad():
                # Two samples: a layer whose input does not carry the batch (an embedding of
                # position ids shaped (1, T), broadcast later) is left to the reference path.
                out = model(torch.cat([x[:1], x[:1]]))[:1].reshape(1, -1)
        finally:
            for hd in hooks:
                hd.remove()
    k = out.shape[1]
    uses = _parameter_uses(out)
    layers = []
    for lp in candidates:
        calls = rec[lp.name]
        if len(calls) != 1:
            continue
        a, o = calls[0]
        if not isinstance(a, Tensor) or not isinstance(o, Tensor) or not o.requires_grad:
            continue
        if a.dim() == 0 or a.shape[0] != 2 or o.dim() == 0 or o.shape[0] != 2:
            continue
        # A parameter that also enters the graph outside its layer's own call (a tied output
        # projection ``h @ emb.weight.T``) gets gradient the layer's hooks never see.
        params = tuple((loc, full) for loc, full in lp.params if uses[id(trainable[full])] <= 1)
        if not params:
            continue
        clone = o._version != versions[lp.name][0]
        layers.append(dataclasses.replace(lp, params=params, clone_output=clone))
    stats: Dict[str, Tuple[int, int, int, int, bool]] = {}
    act = outn = 0
    kept = []
    if layers and k > 1:
        # is_grads_batched runs vmap over the backward graph; an op without a batching rule makes
        # it loop over cotangents op by op. Replicating the batch is then the faster single pass.
        # (Only the warnings matter here, not the values.)
        outs = [rec[lp.name][0][1] for lp in layers]
        cot = torch.eye(k, dtype=out.dtype, device=out.device)[:2].unsqueeze(1)  # 2 cotangents do
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.autograd.grad(out, outs, cot, allow_unused=True, is_grads_batched=True)
        replicate = any("batching rule" in str(w.message) for w in caught)
    for lp in layers:
        a, o = rec[lp.name][0]
        act += a[:1].numel() + o[:1].numel()
        outn += o[:1].numel()
        # Shapes only: the handler on a zero output-gradient.
        parts = lp.handler.fn(lp.module, a[:1].detach(), torch.zeros((1, 1) + tuple(o.shape[1:]), dtype=o.dtype, device=o.device))
        params = tuple((loc, full) for loc, full in lp.params if loc in parts)
        if params:
            kept.append(dataclasses.replace(lp, params=params))
        for loc, full in params:
            c = parts[loc]
            if isinstance(c, Outer):
                stats[full] = (c.groups, c.positions, c.d_in, c.d_out, c.is_index)
    layers = kept
    covered = {full for lp in layers for _, full in lp.params}
    fallback = tuple(n for n in trainable if n not in covered)
    if strict and fallback:
        raise ValueError(
            f"method='fast' needs a handler for every trainable parameter, but {list(fallback)} have "
            "none (raw nn.Parameters, layers called more than once, tied weights, or unsupported "
            "layer types/configurations). Use method='auto' to send them through the reference path, "
            "or register a handler with gramhook.kernel.layers.register."
        )
    shapes = {n: tuple(p.shape) for n, p in trainable.items()}
    return Plan(tuple(layers), fallback, shapes, stats, act, outn, k, replicate)


def _chunk_contributions(model: nn.Module, plan: Plan, x: Tensor, cot: Optional[Tensor], *, loop: bool = False):
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
        with _no_autocast(o.device):
            parts = lp.handler.fn(lp.module, a, g)
        for local, full in lp.params:
            if local in parts:
                result[full] = parts[local]
    return result


_ELEMENTWISE = 16  # a memory-bound Hadamard-and-sum costs about this many GEMM multiply-adds


def choose_forms(plan: Plan, m1: int, m2: int, q: int, preconditioner: Preconditioner) -> Dict[str, str]:
    """``"ghost"`` or ``"dense"`` per handled parameter (cost model in the module docstring)."""
    forms = {}
    for lp in plan.layers:
        for _, full in lp.params:
            st = plan.stats.get(full)
            if st is None or (preconditioner is not None and full in preconditioner):
                forms[full] = "dense"
                continue
            g, t, d_in, d_out, is_index = st
            D = math.prod(plan.shapes[full])
            ghost = m1 * m2 * g * t * t * ((1 if is_index else d_in) + q * q * d_out + _ELEMENTWISE * q * q * (t > 1))
            if t > 1:  # position pairs make skinny GEMMs (inner size d_out): count them 4x
                ghost *= 4
            dense = (m1 + m2) * q * g * t * d_out * d_in + m1 * m2 * q * q * D
            forms[full] = "ghost" if ghost < dense else "dense"
    return forms


def _sqrt_p(preconditioner: Preconditioner, name: str, like: Tensor) -> Optional[Tensor]:
    if preconditioner is None or name not in preconditioner:
        return None
    return preconditioner[name].to(device=like.device, dtype=like.dtype).sqrt().reshape(-1)


@dataclasses.dataclass
class Factors:
    """Captured factors of a sample set, reusable across kernels (e.g. probe × reference batches).

    ``chunks[i]`` maps full parameter names to either ``(c, q, D)`` materialized
    an :class:`Outer` (ghost form); every materialized parameter (and the reference-path ones) is
    concatenated, ``P^{1/2}``-scaled, into one ``(c, q, D_dense)`` tensor under ``"<dense>"``.
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
            with _ref.eval_mode(self.model):
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
        contribs = _chunk_contributions(f.model, f.plan, xs, cot)
        folded = _folded_biases(f)
        with _no_autocast(xs.device):
            for name in f.forms:
                c = contribs[name]
                if name in folded.values():
                    continue
                if f.forms[name] == "ghost" and isinstance(c, Outer):
                    rep[name] = dataclasses.replace(c, with_bias=True) if name in folded else c
                else:
                    g = c.dense()
                    g = g.reshape(g.shape[0], g.shape[1], -1)
                    sp = _sqrt_p(f.preconditioner, name, g)
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


def _reference_jacobians(model: nn.Module, xs: Tensor, names: Sequence[str], memory_budget: int) -> Dict[str, Tensor]:
    """:func:`reference.per_sample_jacobians` of ``names``, with attention in its composite form
    (:func:`reference.composite_attention`)."""
    ctx = _ref.composite_attention()
    # Outside autocast: torch.func's batched backward can mix half and float grads under CUDA
    # fp16 autocast; the few fallback parameters are computed in their own dtype instead.
    with ctx, _no_autocast(xs.device):
        return _ref.per_sample_jacobians(model, xs, names=list(names), memory_budget=memory_budget)


def _fallback_jacobian(f: Factors, xs: Tensor, sl: slice) -> Tensor:
    """Reference-path ``P^{1/2}``-scaled Jacobian (or loss gradient) of the fallback params."""
    jac = _reference_jacobians(f.model, xs, f.plan.fallback, f.memory_budget)
    cols = []
    r = None
    if f.cot is not None:
        with torch.no_grad(), _ref.eval_mode(f.model):
            out = f.model(xs).reshape(xs.shape[0], -1)
        r = f.cot(out, sl)  # (q, c, k)
    for n, j in jac.items():
        j = j.to(acc_dtype(j.dtype)).flatten(2)  # (c, k, D)
        if r is not None:
            j = torch.einsum("qck,ckd->cqd", r.to(j.dtype), j)
        sp = _sqrt_p(f.preconditioner, n, j)
        cols.append(j if sp is None else j * sp)
    return torch.cat(cols, dim=2)


def _per_sample_bytes(plan: Plan, forms: Dict[str, str], q: int, itemsize: int) -> Tuple[int, int]:
    """(transient, stored) bytes per sample of one chunk."""
    stored = 0
    factors = 0
    for lp in plan.layers:
        for _, full in lp.params:
            D = math.prod(plan.shapes[full])
            st = plan.stats.get(full)
            if st is not None:
                g, t, d_in, d_out, is_index = st
                f = g * t * ((1 if is_index else d_in) + q * d_out)
                factors += f
                stored += f if forms.get(full) == "ghost" else q * D
            else:
                stored += q * D
    fb = sum(math.prod(plan.shapes[n]) for n in plan.fallback)
    stored += q * fb
    transient = 4 * plan.act_elems + 2 * q * plan.out_elems + factors + 3 * max(1, q) * fb
    return transient * itemsize, stored * itemsize


def capture_factors(
    model: nn.Module,
    x: Tensor,
    *,
    plan: Optional[Plan] = None,
    preconditioner: Preconditioner = None,
    cot: Optional[Callable] = None,
    q: Optional[int] = None,
    other_size: Optional[int] = None,
    memory_budget: int = _ref.DEFAULT_MEMORY_BUDGET,
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
    with _ref.eval_mode(model):
        if plan is None:
            plan = make_plan(model, x)
        m = x.shape[0]
        k = plan.k
        q = q if q is not None else (k if cot is None else 1)
        forms = choose_forms(plan, m, other_size or m, q, preconditioner)
        p0 = next(iter(model.parameters()))
        itemsize = torch.empty((), dtype=acc_dtype(p0.dtype)).element_size()
        transient, stored = _per_sample_bytes(plan, forms, q, itemsize)
        if chunk is None:
            chunk = max(1, min(m, int(memory_budget // max(1, 2 * (transient + stored)))))
        if store is None:
            store = 2 * m * stored <= memory_budget
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
    with _no_autocast(f1.x.device):
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


def _run(fn: Callable[[int], Tensor], chunk_of: Callable[[Optional[int]], int]):
    """Call ``fn(chunk)`` and halve the chunk on out-of-memory errors."""
    chunk = None
    while True:
        c = chunk_of(chunk)
        try:
            return fn(c)
        except Exception as err:  # noqa: BLE001 - only OOM is retried
            if not _is_oom(err) or c <= 1:
                raise
            chunk = max(1, c // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _default_chunk(model, plan, x, q, forms, budget) -> int:
    p0 = next(iter(model.parameters()))
    itemsize = torch.empty((), dtype=acc_dtype(p0.dtype)).element_size()
    transient, stored = _per_sample_bytes(plan, forms, q, itemsize)
    return max(1, min(x.shape[0], int(budget // max(1, 2 * (transient + stored)))))


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    preconditioner: Preconditioner = None,
    memory_budget: int = _ref.DEFAULT_MEMORY_BUDGET,
    strict: bool = False,
) -> Tensor:
    """Empirical NTK by per-layer handlers; same contract as the reference.

    Returns:
        ``(m1, k, m2, k)``, ``Θ[i, a, j, b] = ∂f_a(x1_i)/∂w · P · ∂f_b(x2_j)/∂w``.
    """
    with _ref.eval_mode(model):
        plan = make_plan(model, x1, strict=strict)
        if not plan.layers:
            return _ref.empirical_ntk(model, x1, x2, preconditioner=preconditioner, memory_budget=memory_budget)
        k = plan.k
        m1 = x1.shape[0]
        m2 = m1 if x2 is None else x2.shape[0]
        forms = choose_forms(plan, m1, m2, k, preconditioner)

        def chunk_of(c):
            return c if c is not None else _default_chunk(model, plan, x1 if m1 >= m2 else x2, k, forms, memory_budget)

        def fn(chunk):
            f1 = capture_factors(model, x1, plan=plan, preconditioner=preconditioner, other_size=m2,
                                 memory_budget=memory_budget, chunk=chunk)
            f2 = None
            if x2 is not None:
                f2 = capture_factors(model, x2, plan=plan, preconditioner=preconditioner, other_size=m1,
                                     memory_budget=memory_budget, chunk=chunk)
            return cross_kernel(f1, f2)

        return _run(fn, chunk_of)


def gradient_gram(
    model: nn.Module,
    loss,
    x: Tensor,
    y: Tensor,
    *,
    preconditioner: Preconditioner = None,
    memory_budget: int = _ref.DEFAULT_MEMORY_BUDGET,
    strict: bool = False,
) -> Tensor:
    """``G[i, j] = ⟨∇ℓ_i, P ∇ℓ_j⟩ = r_iᵀ Θ_ij r_j``, shape ``(m, m)``, with one backward per chunk.

    The residuals ``r = ∂ℓ/∂f`` (:func:`gramhook.losses.residual_and_hessian`) are the single
    cotangent, so no per-output Jacobian is formed.
    """
    loss = resolve_loss(loss)
    with _ref.eval_mode(model):
        plan = make_plan(model, x, strict=strict)
        if not plan.layers:
            return _ref.gradient_gram(model, loss, x, y, preconditioner=preconditioner, memory_budget=memory_budget)
        m = x.shape[0]

        def cot(out: Tensor, sl: slice) -> Tensor:
            r, _ = residual_and_hessian(loss, out.detach().to(acc_dtype(out.dtype)), y[sl])
            return r.unsqueeze(0)  # (1, c, k)

        forms = choose_forms(plan, m, m, 1, preconditioner)

        def chunk_of(c):
            return c if c is not None else _default_chunk(model, plan, x, 1, forms, memory_budget)

        def fn(chunk):
            f = capture_factors(model, x, plan=plan, preconditioner=preconditioner, cot=cot, q=1,
                                memory_budget=memory_budget, chunk=chunk)
            return cross_kernel(f)[:, 0, :, 0]

        return _run(fn, chunk_of)


# ----------------------------------------------------------------------------------------------
# Sketches


def _hashes(name: str, shape: Tuple[int, ...], s: int, seed: int, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row/column hashes and signs of one parameter viewed as ``(shape[0], prod(shape[1:]))``."""
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
    g: Tensor, hashes, s: int, scale: Optional[Tensor] = None, *, signed: bool = False
) -> Tensor:
    """Count-sketch of ``(c, q, rows·cols)`` gradients (times ``scale``) with the composite hash → ``(c, q, s)``.

    ``signed``: the signs are already applied (:func:`_signed`).
    """
    h_row, s_row, h_col, s_col = hashes
    idx = ((h_row[:, None] + h_col[None, :]) % s).reshape(-1)
    out = g.new_zeros(g.shape[0], g.shape[1], s)
    if signed:
        return out.index_add_(2, idx, g)
    sign = (s_row[:, None] * s_col[None, :]).reshape(-1).to(g.dtype)
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
    memory_budget: int = _ref.DEFAULT_MEMORY_BUDGET,
    strict: bool = False,
    cotangents: Optional[Tensor] = None,
) -> Tensor:
    """Sketched per-sample Jacobians ``ĵ_i = Sᵀ P^{1/2} J_iᵀ`` (THEORY §3(a)), fast path.

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
    with _ref.eval_mode(model):
        plan = make_plan(model, x, strict=strict)
        k = plan.k if cotangents is None else cotangents.shape[1]
        m = x.shape[0]
        p0 = next(iter(model.parameters()))
        device = p0.device
        hashes = {n: _hashes(n, shp, s, seed, device) for n, shp in plan.shapes.items()}
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
            return _default_chunk(model, plan, x, k, {n: ("ghost" if r == "fft" else "dense") for n, r in routes.items()},
                                  memory_budget)

        def sketch_chunk(xs: Tensor, cot: Optional[Tensor]) -> Tensor:
            acc: List[Optional[Tensor]] = [None, None]  # (c, k, s) directly, and in frequency

            def add(t: Tensor, i: int = 0) -> None:
                acc[i] = t if acc[i] is None else acc[i].add_(t)

            if plan.layers:
                contribs = _chunk_contributions(model, plan, xs, None if cot is None else cot.transpose(0, 1))
                with _no_autocast(device):
                    for name, c in contribs.items():
                        sp = _sqrt_p(preconditioner, name, c.b if isinstance(c, Outer) else c.g)
                        if routes[name] == "fft" and isinstance(c, Outer):
                            add(_tensor_sketch(c, hashes[name], s, spectrum=True), 1)
                        elif isinstance(c, Outer) and not c.is_index and not c.a_is_row and sp is None:
                            add(_count_sketch_dense(_signed(c, hashes[name]).dense().flatten(2), hashes[name], s,
                                                    signed=True))
                        else:
                            g = c.dense().flatten(2)
                            add(_count_sketch_dense(g, hashes[name], s, sp))
            if plan.fallback:
                jac = _reference_jacobians(model, xs, plan.fallback, memory_budget)
                with _no_autocast(device):
                    for name, j in jac.items():
                        j = j.to(acc_dtype(j.dtype)).flatten(2)
                        if cot is not None:
                            j = torch.einsum("cqk,ckp->cqp", cot.to(j.dtype), j)
                        add(_count_sketch_dense(j, hashes[name], s, _sqrt_p(preconditioner, name, j)))
            if acc[1] is not None:  # one inverse FFT for every factored layer
                add(torch.fft.irfft(acc[1], n=s, dim=-1))
            return acc[0]

        def fn(chunk):
            return torch.cat([sketch_chunk(x[s0 : s0 + chunk], None if cotangents is None else cotangents[s0 : s0 + chunk])
                              for s0 in range(0, m, chunk)], dim=0)

        return _run(fn, chunk_of)


# ----------------------------------------------------------------------------------------------
# Flat Jacobian

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


@contextlib.contextmanager
def _report_vmap_fallbacks() -> Iterator[None]:
    """Let the (legacy) vmap behind ``is_grads_batched`` warn when an op has no batching rule.

    Off by default in PyTorch; :func:`make_plan` looks for these warnings to learn whether the
    batched backward would loop over cotangents op by op. The global flag is restored on exit.
    """
    get = getattr(torch._C, "_debug_only_are_vmap_fallback_warnings_enabled", None)
    put = getattr(torch._C, "_debug_only_display_vmap_fallback_warnings", None)
    if get is None or put is None:  # pragma: no cover - other torch versions
        yield
        return
    old = get()
    put(True)
    try:
        yield
    finally:
        put(old)


def _restrict_plan(plan: Plan, params: Mapping[str, Tensor], strict: bool) -> Plan:
    """Keep the hooked layers (and their parameters) among ``params``; the rest of them falls back."""
    names = list(params)
    wanted = set(names)
    layers = []
    for lp in plan.layers:
        kept = tuple(p for p in lp.params if p[1] in wanted)
        if kept:
            layers.append(dataclasses.replace(lp, params=kept))
    covered = {full for lp in layers for _, full in lp.params}
    fallback = tuple(n for n in names if n not in covered)
    if strict and fallback:
        raise ValueError(
            f"method='fast' needs a handler for every requested parameter, but {list(fallback)} have "
            "none (raw nn.Parameters, layers called more than once, tied weights, requires_grad=False, "
            "or unsupported layer types/configurations). Use method='auto' to send them through the "
            "reference path, or register a handler with gramhook.kernel.layers.register."
        )
    shapes = {**plan.shapes, **{n: tuple(p.shape) for n, p in params.items()}}  # names may be frozen
    return dataclasses.replace(plan, layers=tuple(layers), fallback=fallback, shapes=shapes)


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
    memory_budget: int = _ref.DEFAULT_MEMORY_BUDGET,
    strict: bool = False,
) -> Tensor:
    """Per-sample Jacobians flattened over parameters, columns scaled by ``P**power``; fast path.

    Same contract as :func:`gramhook.kernel.reference.flat_jacobian`: shape ``(m, k, P)``, the
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
    Parameters without a handler (and ``names`` that are not ``requires_grad``) take the reference
    torch.func path for their own columns only. Large CPU outputs use transparent huge pages
    (:data:`USE_HUGE_PAGES`).

    ``memory_budget`` bounds the transient memory per chunk (captured activations, output
    gradients, unfolded inputs, reference-path Jacobians); the output itself is not counted.
    Out-of-memory errors retry with half the chunk.

    Raises:
        ValueError: if ``strict`` and some requested parameter has no handler.
    """
    params = _ref.trainable_parameters(model, names)
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
    with _ref.eval_mode(model):
        with _report_vmap_fallbacks():
            plan = make_plan(model, x)
        # The batched backward would loop over the k cotangents op by op (e.g. convolutions):
        # loop over them ourselves, without vmap's slicing and concatenation.
        loop = plan.replicate
        plan = _restrict_plan(dataclasses.replace(plan, replicate=False), params, strict)
        k = plan.k
        out = _empty_output((m, k, total), dtype, device)
        forms = {full: "ghost" for lp in plan.layers for _, full in lp.params}

        def fill(xs: Tensor, dst: Tensor) -> None:
            if plan.layers:
                contribs = _chunk_contributions(model, plan, xs, None, loop=loop)
                with _no_autocast(device), torch.no_grad():
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
                jac = _reference_jacobians(model, xs, plan.fallback, memory_budget)
                for name, j in jac.items():
                    lo, hi = offsets[name]
                    d = dst[:, :, lo:hi]
                    d.copy_(j.reshape(d.shape))
                    if name in scales:
                        d.mul_(scales[name])

        def chunk_of(c):
            return c if c is not None else _default_chunk(model, plan, x, k, forms, memory_budget)

        def fn(chunk):
            for s0 in range(0, m, chunk):
                fill(x[s0 : s0 + chunk], out[s0 : s0 + chunk])
            return out

        return _run(fn, chunk_of)


# ----------------------------------------------------------------------------------------------
# Per-sample vector–Jacobian products, flat


def flat_vjp(
    model: nn.Module,
    x: Tensor,
    cotangents: Tensor,
    *,
    preconditioner: Preconditioner = None,
    names: Optional[Sequence[str]] = None,
    memory_budget: int = _ref.DEFAULT_MEMORY_BUDGET,
    strict: bool = False,
) -> Tensor:
    """Per-sample vector–Jacobian products ``P^{1/2} J_iᵀ c_{i,q}``, flattened; fast path.

    One forward with hooks and one backward per cotangent row; handled parameters are formed
    from their layer's factors, the others through the reference path.

    Args:
        cotangents: ``(m, q, k)``.

    Returns:
        ``(m, q, P)``, columns in the order of :func:`flat_jacobian`.
    """
    params = _ref.trainable_parameters(model, names)
    with _ref.eval_mode(model):
        plan = _restrict_plan(make_plan(model, x, strict=strict), params, strict)
        cot = cotangents.to(next(iter(params.values())).dtype)
        contribs = _chunk_contributions(model, plan, x, cot.transpose(0, 1)) if plan.layers else {}
        fallback = {}
        if plan.fallback:
            jac = _reference_jacobians(model, x, plan.fallback, memory_budget)
            fallback = {n: torch.einsum("mqk,mkd->mqd", cot.to(j.dtype), j.flatten(2)) for n, j in jac.items()}
        cols = []
        for n in params:
            g = contribs[n].dense().flatten(2) if n in contribs else fallback[n]
            sp = _sqrt_p(preconditioner, n, g)
            cols.append(g if sp is None else g * sp)
    return torch.cat(cols, dim=2)


def sketch_vectors(tensors: Mapping[str, Tensor], s: int, *, seed: int = 0,
                   preconditioner: Preconditioner = None) -> Tensor:
    """The count-sketch of :func:`sketched_jacobian` (same ``seed``, same ``S``) applied to one
    ``P^{1/2}``-scaled vector per name, e.g. a gradient: ``{name: (*shape)}`` → ``(s,)``."""
    out = None
    for name, t in tensors.items():
        t = t.to_dense() if t.is_sparse else t  # sparse gradients (Embedding(sparse=True))
        g = t.detach().reshape(1, 1, -1).to(acc_dtype(t.dtype))
        part = _count_sketch_dense(g, _hashes(name, tuple(t.shape), s, seed, t.device), s,
                                   _sqrt_p(preconditioner, name, g))[0, 0]
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


_FLAT_HASHES: Dict[tuple, Tuple[Tensor, Tensor]] = {}


def _flat_hash(name: str, shape: Tuple[int, ...], s: int, seed: int, device) -> Tuple[Tensor, Tensor]:
    """Bucket and sign of every flat coordinate of one parameter under :func:`_hashes` (cached:
    a readout unsketches every parameter, and the hashes are fixed by name, shape, s and seed)."""
    key = (name, shape, s, seed, str(device))
    if key not in _FLAT_HASHES:
        if len(_FLAT_HASHES) > 256:
            _FLAT_HASHES.clear()
        h_row, s_row, h_col, s_col = _hashes(name, shape, s, seed, device)
        idx = ((h_row[:, None] + h_col[None, :]) % s).reshape(-1)
        sign = (s_row[:, None] * s_col[None, :]).reshape(-1).to(torch.int8)
        _FLAT_HASHES[key] = (idx, sign)
    return _FLAT_HASHES[key]
