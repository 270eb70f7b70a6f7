"""Empirical NTK, gradient Grams and per-sample Jacobians (docs/theory.md §1).

One module per job, in the order data flows through a call:

- :mod:`~gramhook.kernel.plan`: which trainable parameters a per-layer handler covers, in which
  form (ghost or materialized), in chunks of how many samples; out-of-memory retries.
- :mod:`~gramhook.kernel.per_sample`: forward hooks and one backward per chunk give each handled
  layer's per-sample pieces (input, output-gradient); handlers in :mod:`~gramhook.kernel.layers`.
- :mod:`~gramhook.kernel.gram`: NTK ``(m1, k, m2, k)`` and loss-gradient Gram ``(m, m)`` from them.
- :mod:`~gramhook.kernel.sketch`: count-sketched Jacobians ``(m, k, s)`` and their transpose.
- :mod:`~gramhook.kernel.jacobian`: flat Jacobians ``(m, k, P)`` and vector–Jacobian products.
- :mod:`~gramhook.kernel.torchfunc`: torch.func ``vmap``/``jacrev`` for any module, the path of
  parameters without a handler and the ground truth in tests.

``method="reference"`` contracts explicit torch.func Jacobians and works for any module; it is the
ground truth. ``"auto"`` uses the per-layer handlers and sends each parameter without a handler
through the torch.func path, parameter by parameter. ``"fast"`` is the same but raises if any
trainable parameter lacks a handler, naming them. One dispatcher (:func:`_dispatch`) serves every
public kernel. On CUDA, ``"auto"`` times the fast and the torch.func path on the first call of each
signature of :func:`empirical_ntk`, :func:`gradient_gram` and :func:`flat_jacobian` and keeps the
faster (see :data:`AUTOTUNE_DEVICES`); both are exact, so only the speed differs.
"""
from __future__ import annotations

import time
import weakref
from typing import Callable, Dict, Optional

import torch

from .torchfunc import (
    DEFAULT_MEMORY_BUDGET,
    eval_mode,
    gaussian_sketch_matrix,
    output_size,
    per_sample_gradients,
    per_sample_jacobians,
    trainable_parameters,
)
from . import gram as _gram, jacobian as _jacobian, sketch as _sketch
from . import torchfunc as _reference

METHODS = ("auto", "reference", "fast")

# Devices on which ``method="auto"`` times both paths on the first call of each (function, model,
# shapes, dtypes) and keeps the faster one. On an H200 the torch.func path was 3–9× slower than the
# fast path on an MLP and a small CNN, but 4–7× *faster* on a ResNet-18 layout and a transformer
# (benchmarks/kernels.py), so a fixed rule is wrong on GPUs. On CPU the fast path stays the rule:
# the torch.func path costs O(m·k·P) memory and one slow first call per shape.
AUTOTUNE_DEVICES = {"cuda"}
_choices: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[tuple, str]]" = weakref.WeakKeyDictionary()

__all__ = [
    "METHODS",
    "DEFAULT_MEMORY_BUDGET",
    "empirical_ntk",
    "gradient_gram",
    "eval_mode",
    "flat_jacobian",
    "gaussian_sketch_matrix",
    "output_size",
    "per_sample_gradients",
    "per_sample_jacobians",
    "sketched_jacobian",
    "trainable_parameters",
    "vjp_rows",
    "flat_vector",
    "tangent_outputs",
]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def _signature(*values) -> tuple:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append((tuple(v.shape), v.dtype, v.device))
        elif isinstance(v, dict):
            out.append(tuple(sorted(v)))
        else:
            out.append(v if isinstance(v, (int, float, str, tuple, type(None))) else type(v).__name__)
    return tuple(out)


def _timed(fn: Callable[[], torch.Tensor], device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def _dispatch(method: str, fast: Callable[[bool], torch.Tensor], exact: Callable[[], torch.Tensor], *,
              model=None, x: Optional[torch.Tensor] = None, key: Optional[tuple] = None) -> torch.Tensor:
    """Run one public kernel by ``method`` (module docstring).

    Args:
        fast: the per-layer path, called with ``strict`` (raise on parameters without a handler).
        exact: the torch.func path.
        model, x, key: for ``"auto"`` on :data:`AUTOTUNE_DEVICES`, the model, its input and the
            call's signature (the kernel's name first): the first call per signature times both
            paths and keeps the faster (both are exact). ``key=None``: ``"auto"`` is the fast path.
    """
    _check_method(method)
    if method == "reference":
        return exact()
    if method == "fast" or key is None or x.device.type not in AUTOTUNE_DEVICES:
        return fast(method == "fast")
    try:
        table = _choices.setdefault(model, {})
    except TypeError:  # pragma: no cover - a model that cannot be weakly referenced
        return fast(False)
    choice = table.get(key)
    if choice == "reference":
        return exact()
    if choice == "fast":
        return fast(False)
    out, t_fast = _timed(lambda: fast(False), x.device)
    try:
        exact_out, t_exact = _timed(exact, x.device)
    except Exception:  # the torch.func path failed (memory, an op without a batching rule): keep fast
        table[key] = "fast"
        return out
    table[key] = "reference" if t_exact < t_fast else "fast"
    return exact_out if t_exact < t_fast else out


@torch.enable_grad()
def empirical_ntk(model, x1, x2=None, *, preconditioner=None, method="auto", memory_budget=DEFAULT_MEMORY_BUDGET):
    """Empirical NTK in the optimizer metric.

    Args:
        model: any module; evaluated in eval mode, flags restored.
        x1: ``(m1, ...)``; x2: ``(m2, ...)`` or ``None`` for ``x1``.
        preconditioner: parameter name → diagonal of P (shaped like the parameter), ``None``: P = I.
        method: ``"auto"``, ``"fast"`` or ``"reference"`` (module docstring).
        memory_budget: bytes of extra memory the call may use; work is chunked over samples.

    Returns:
        ``Θ`` of shape ``(m1, k, m2, k)``, ``Θ[i, a, j, b] = ∂f_a(x1_i)/∂w · P · ∂f_b(x2_j)/∂w``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> empirical_ntk(net, torch.randn(5, 3)).shape
    torch.Size([5, 2, 5, 2])
    """
    opts = dict(preconditioner=preconditioner, memory_budget=memory_budget)
    return _dispatch(method, lambda strict: _gram.empirical_ntk(model, x1, x2, strict=strict, **opts),
                     lambda: _reference.empirical_ntk(model, x1, x2, **opts),
                     model=model, x=x1, key=("ntk",) + _signature(x1, x2, preconditioner, memory_budget))


@torch.enable_grad()
def gradient_gram(model, loss, x, y, *, preconditioner=None, method="auto", memory_budget=DEFAULT_MEMORY_BUDGET):
    """Per-sample loss-gradient Gram ``(m, m)``, ``G[i, j] = ⟨∇ℓ_i, P ∇ℓ_j⟩ = r_iᵀ Θ_ij r_j``.

    Args:
        loss: ``"mse"``, ``"cross_entropy"``, a per-sample callable or a :class:`gramhook.losses.Loss`.
        x: ``(m, ...)`` inputs; y: ``(m, ...)`` targets. Other arguments as :func:`empirical_ntk`.

    >>> import torch
    >>> net = torch.nn.Linear(3, 4)
    >>> gradient_gram(net, "cross_entropy", torch.randn(6, 3), torch.arange(6) % 4).shape
    torch.Size([6, 6])
    """
    opts = dict(preconditioner=preconditioner, memory_budget=memory_budget)
    return _dispatch(method, lambda strict: _gram.gradient_gram(model, loss, x, y, strict=strict, **opts),
                     lambda: _reference.gradient_gram(model, loss, x, y, **opts),
                     model=model, x=x, key=("gram",) + _signature(x, y, loss, preconditioner, memory_budget))


@torch.enable_grad()
def flat_jacobian(model, x, *, preconditioner=None, power=0.0, names=None, method="auto",
                  memory_budget=DEFAULT_MEMORY_BUDGET):
    """Per-sample Jacobians flattened over parameters, columns scaled by ``P**power``: ``(m, k, P)``.

    ``J[i, a, :]`` is ``∂f_a(x_i)/∂w`` over the parameters of ``names`` (default: every
    ``requires_grad`` parameter, in ``named_parameters()`` order; given ``names`` keep their order,
    as :func:`trainable_parameters` does), each column multiplied by ``P_p ** power`` when a
    ``preconditioner`` is given. The model runs in eval mode (flags restored); no ``.grad`` is
    touched and no hook is left behind.

    ``"auto"``/``"fast"`` materialize per-layer per-sample gradients from hooked activations and one
    batched backward of the ``k`` output cotangents, writing straight into the output; parameters
    without a handler go through the torch.func path (``"fast"`` raises instead). ``memory_budget``
    bounds the transient memory per chunk of samples (the output itself is not counted).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> flat_jacobian(net, torch.randn(5, 3)).shape
    torch.Size([5, 2, 26])
    """
    opts = dict(preconditioner=preconditioner, power=power, names=names, memory_budget=memory_budget)
    key = ("jacobian",) + _signature(x, preconditioner, power, tuple(names) if names is not None else None,
                                     memory_budget)
    return _dispatch(method, lambda strict: _jacobian.flat_jacobian(model, x, strict=strict, **opts),
                     lambda: _reference.flat_jacobian(model, x, **opts), model=model, x=x, key=key)


@torch.enable_grad()
def sketched_jacobian(model, x, s, *, seed=0, preconditioner=None, method="auto", memory_budget=DEFAULT_MEMORY_BUDGET,
                      cotangents=None):
    """Sketched per-sample Jacobians ``ĵ_i = Sᵀ P^{1/2} J_iᵀ`` (docs/theory.md §3(a)), shape ``(m, k, s)``.

    ``cotangents`` ``(m, q, k)`` returns ``(m, q, s)``, the combinations ``Σ_a cot[i, c, a] ĵ_i[a]``
    (sketched per-sample vector–Jacobian products), at about ``q/k`` of the cost.

    ``⟨ĵ_i[a], ĵ_j[b]⟩`` estimates ``Θ[i, a, j, b]`` without bias, relative error ≈ ``1/sqrt(s)``;
    a fixed ``seed`` gives the same ``S`` on every call. The fast paths (``"auto"``, ``"fast"``)
    use a per-parameter count-sketch that is never materialized; ``"reference"`` uses dense Gaussian
    blocks (:func:`gaussian_sketch_matrix`). The two are different sketches of the same Jacobian,
    so ``"auto"`` is never autotuned here.

    >>> import torch
    >>> net = torch.nn.Linear(3, 2)
    >>> sketched_jacobian(net, torch.randn(4, 3), 16).shape
    torch.Size([4, 2, 16])
    """
    opts = dict(seed=seed, preconditioner=preconditioner, memory_budget=memory_budget, cotangents=cotangents)
    return _dispatch(method, lambda strict: _sketch.sketched_jacobian(model, x, s, strict=strict, **opts),
                     lambda: _reference.sketched_jacobian(model, x, s, **opts))


@torch.enable_grad()
def vjp_rows(model, x, cotangents, *, s=None, seed=0, preconditioner=None, method="auto",
             memory_budget=DEFAULT_MEMORY_BUDGET, names=None):
    """Per-sample vector–Jacobian products ``P^{1/2} J_iᵀ c_{i,q}`` with ``cotangents`` ``(m, q, k)``.

    ``s=None``: flat over the trainable parameters (or over ``names``, in their order, frozen ones
    included), ``(m, q, P)``; an int ``s``: in the count-sketch of :func:`sketched_jacobian` (same
    ``seed``, same ``S``; ``names`` is ignored), ``(m, q, s)``. One backward per row ``q`` instead
    of one per output.

    >>> import torch
    >>> net = torch.nn.Linear(3, 2)
    >>> vjp_rows(net, torch.randn(4, 3), torch.randn(4, 1, 2)).shape
    torch.Size([4, 1, 8])
    """
    if s is not None:
        return sketched_jacobian(model, x, int(s), seed=seed, preconditioner=preconditioner, method=method,
                                 memory_budget=memory_budget, cotangents=cotangents)

    def exact():
        jac = _reference.flat_jacobian(model, x, preconditioner=preconditioner, power=0.5, names=names,
                                       memory_budget=memory_budget)
        return torch.einsum("mqk,mkd->mqd", cotangents.to(jac.dtype), jac)

    return _dispatch(method, lambda strict: _jacobian.flat_vjp(model, x, cotangents, preconditioner=preconditioner,
                                                               memory_budget=memory_budget, strict=strict, names=names),
                     exact)


def flat_vector(tensors, *, s=None, seed=0, preconditioner=None):
    """One vector per parameter name (``{name: (*shape)}``, e.g. gradients) scaled by ``P^{1/2}``,
    flat ``(P,)`` in the given order, or in the count-sketch of :func:`sketched_jacobian` ``(s,)``.

    >>> import torch
    >>> flat_vector({"w": torch.ones(2, 3), "b": torch.ones(2)}).shape
    torch.Size([8])
    """
    if s is not None:
        return _sketch.sketch_vectors(tensors, int(s), seed=seed, preconditioner=preconditioner)
    parts = []
    for name, t in tensors.items():
        t = (t.to_dense() if t.is_sparse else t).detach().reshape(-1)  # sparse gradients (Embedding(sparse=True))
        if preconditioner is not None and name in preconditioner:
            t = t * preconditioner[name].reshape(-1).to(t.dtype).sqrt()
        parts.append(t)
    return torch.cat(parts)


def tangent_outputs(model, x, vectors, *, s=None, seed=0, preconditioner=None, memory_budget=DEFAULT_MEMORY_BUDGET,
                    names=None):
    """``J_i P^{1/2} v_i`` for one vector per sample in engine coordinates, ``(m, k)``.

    ``vectors`` ``(m, D)``: flat over the trainable parameters (``s=None``; or over ``names``, in
    their order) or in the count-sketch of :func:`sketched_jacobian` (``D = s``; the tangent is
    then ``S v_i``). Equal to
    ``einsum("ikd,id->ik", J, vectors)`` with ``J`` from :func:`flat_jacobian` (power ½) or
    :func:`sketched_jacobian` (same ``seed``), at the cost of forward-mode passes over the samples
    instead of ``k`` backward passes.

    >>> import torch
    >>> net = torch.nn.Linear(3, 2)
    >>> tangent_outputs(net, torch.randn(4, 3), torch.randn(4, 8)).shape
    torch.Size([4, 2])
    """
    params = trainable_parameters(model, names if s is None else None)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    sizes = [p.numel() for p in params.values()]

    def tangent(lo, hi):
        v = vectors[lo:hi].to(next(iter(params.values())).dtype)
        if s is not None:
            parts = _sketch.unsketch(v, shapes, int(s), seed=seed)
        else:
            parts = {n: t.reshape(hi - lo, *shapes[n]) for n, t in zip(shapes, torch.split(v, sizes, dim=1))}
        if preconditioner is not None:
            parts = {n: t * preconditioner[n].to(t.dtype).sqrt() if n in preconditioner else t for n, t in parts.items()}
        return parts

    return _reference.per_sample_jvp(model, x, tangent, memory_budget=memory_budget)
