"""Planning: which parameters go through per-layer handlers, in which form, in chunks of how many
samples.

:func:`make_plan` runs the model once on one sample to assign each trainable parameter to a
handler of :mod:`gramhook.kernel.layers` or to the torch.func path (:class:`Plan`).

Choosing the form of a factored weight (``G`` groups, ``T`` positions, widths ``d_in``/``d_out``,
``D = G·d_out·d_in`` entries, ``q`` cotangents, ``m1 × m2`` sample pairs), by multiply-adds
(:func:`choose_forms`):

- ghost: ``m1·m2 · G·T² · (d_in + q²·d_out + 16·q²·[T > 1])``, the last term for the
  memory-bound Hadamard product and sum over position pairs, and counted 4x when ``T > 1``
  (its GEMMs have the skinny inner size ``d_out``); the factors are never multiplied out, so no
  ``(m, q, D)`` tensor exists. ``d_in = 1`` for an Embedding (its input is an index).
- materialized per-sample gradients: ``(m1 + m2)·q·G·T·d_out·d_in`` to form them plus
  ``m1·m2 · q²·D`` to contract them.

The cheaper one is used; the ghost form also needs ``P = I`` on that parameter (a diagonal ``P``
does not factor over the outer product), so a preconditioned parameter is always materialized.
In practice: Linear layers on flat inputs go ghost, convolutions and long sequences materialize.

Memory: the chunk size comes from a per-sample estimate measured on one sample
(:func:`default_chunk`); an out-of-memory error (``torch.OutOfMemoryError`` or a ``RuntimeError``
saying "out of memory") restarts the computation with half the chunk (:func:`run_chunked`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import weakref
from collections import Counter
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from . import torchfunc
from .layers import LayerHandler, Outer, acc_dtype, handler_for
from .per_sample import Preconditioner, capture

__all__ = ["LayerPlan", "Plan", "make_plan", "restrict_plan", "choose_forms", "default_chunk", "run_chunked",
           "report_vmap_fallbacks"]


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
    """Which parameters go through handlers and which through the torch.func path."""

    layers: Tuple[LayerPlan, ...]
    fallback: Tuple[str, ...]
    shapes: Dict[str, Tuple[int, ...]]  # full name -> parameter shape, for every trainable param
    stats: Dict[str, Tuple[int, int, int, int, bool]]  # full name -> (G, T, d_in, d_out, is_index)
    act_elems: int  # per-sample elements of handled inputs + outputs
    out_elems: int  # per-sample elements of handled outputs
    k: int  # outputs per sample
    replicate: bool = False  # batched backward lacks vmap rules: replicate the batch q times instead


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
    """Assign each trainable parameter to a handler or to the torch.func path.

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

    with torchfunc.eval_mode(model):
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
                # position ids shaped (1, T), broadcast later) is left to the torch.func path.
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
    fallback = _uncovered(layers, trainable, strict, "trainable")
    shapes = {n: tuple(p.shape) for n, p in trainable.items()}
    return Plan(tuple(layers), fallback, shapes, stats, act, outn, k, replicate)


def _uncovered(layers, names, strict: bool, which: str) -> Tuple[str, ...]:
    """The ``names`` no layer of ``layers`` covers, in order: they take the torch.func path.

    Raises:
        ValueError: if ``strict`` and there are any, naming them.
    """
    covered = {full for lp in layers for _, full in lp.params}
    fallback = tuple(n for n in names if n not in covered)
    if strict and fallback:
        raise ValueError(
            f"method='fast' needs a handler for every {which} parameter, but {list(fallback)} have "
            "none (raw nn.Parameters, layers called more than once, tied weights, requires_grad=False, "
            "or unsupported layer types/configurations). Use method='auto' to send them through the "
            "torch.func path, or register a handler with gramhook.kernel.layers.register."
        )
    return fallback


@contextlib.contextmanager
def report_vmap_fallbacks() -> Iterator[None]:
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


def restrict_plan(plan: Plan, params: Mapping[str, Tensor], strict: bool) -> Plan:
    """Keep the hooked layers (and their parameters) among ``params``; the rest of them falls back."""
    names = list(params)
    wanted = set(names)
    layers = []
    for lp in plan.layers:
        kept = tuple(p for p in lp.params if p[1] in wanted)
        if kept:
            layers.append(dataclasses.replace(lp, params=kept))
    fallback = _uncovered(layers, names, strict, "requested")
    shapes = {**plan.shapes, **{n: tuple(p.shape) for n, p in params.items()}}  # names may be frozen
    return dataclasses.replace(plan, layers=tuple(layers), fallback=fallback, shapes=shapes)


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


def per_sample_bytes(model: nn.Module, plan: Plan, forms: Dict[str, str], q: int) -> Tuple[int, int]:
    """(transient, stored) bytes per sample of one chunk with ``q`` cotangents, in the
    accumulation dtype of the model's parameters."""
    itemsize = torch.empty((), dtype=acc_dtype(next(iter(model.parameters())).dtype)).element_size()
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


def run_chunked(fn: Callable[[int], Tensor], chunk_of: Callable[[Optional[int]], int]):
    """Call ``fn(chunk)`` and halve the chunk on out-of-memory errors."""
    chunk = None
    while True:
        c = chunk_of(chunk)
        try:
            return fn(c)
        except Exception as err:  # noqa: BLE001 - only OOM is retried
            if not torchfunc.is_oom(err) or c <= 1:
                raise
            chunk = max(1, c // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def default_chunk(model: nn.Module, plan: Plan, x: Tensor, q: int, forms: Dict[str, str], budget: int) -> int:
    """Samples of ``x`` per chunk so that a chunk's transient and stored bytes fit half of ``budget``."""
    transient, stored = per_sample_bytes(model, plan, forms, q)
    return max(1, min(x.shape[0], int(budget // max(1, 2 * (transient + stored)))))
