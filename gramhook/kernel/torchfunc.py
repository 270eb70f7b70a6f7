"""Kernels by torch.func (vmap/jacrev): work for any ``nn.Module``; the ground truth in tests.

Conventions (docs/theory.md §1):

- ``k`` is the number of outputs per sample: outputs of shape ``(batch, *out)`` are flattened to
  ``(batch, k)`` with ``k = prod(out)``.
- Only parameters with ``requires_grad=True`` enter the kernels; buffers are passed unchanged.
- The model runs in eval mode during every kernel computation (BatchNorm uses its running
  statistics, dropout is off), so each sample's Jacobian depends on that sample alone. The
  model's train/eval flags are restored afterwards, module by module.
- ``preconditioner`` maps parameter names to the diagonal of the optimizer metric P (same shape
  as the parameter); ``None`` means P = I. Then
  ``Θ[(i,a),(j,b)] = Σ_p ∂f_ia/∂w_p · P_p · ∂f_jb/∂w_p``.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from ..losses import per_sample_losses, resolve_loss

Preconditioner = Optional[Mapping[str, Tensor]]

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "eval_mode",
    "trainable_parameters",
    "per_sample_jacobians",
    "flat_jacobian",
    "empirical_ntk",
    "gradient_gram",
    "per_sample_gradients",
    "output_size",
    "sketched_jacobian",
    "gaussian_sketch_matrix",
]

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of extra memory a kernel call may allocate


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each module's own flag on exit."""
    flags = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for mod, flag in flags:
            mod.training = flag


def trainable_parameters(model: nn.Module, names: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
    """Detached trainable parameters, by name (``requires_grad=True`` only, or the given names)."""
    params = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in params.items() if p.requires_grad]
    if not names:
        raise ValueError("The model has no trainable parameters (all have requires_grad=False).")
    return {n: params[n].detach() for n in names}


def _frozen_state(model: nn.Module, trainable: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    state = {n: b.detach() for n, b in model.named_buffers()}
    state.update({n: p.detach() for n, p in model.named_parameters() if n not in trainable})
    return state


def _single_output_fn(model: nn.Module, frozen: Mapping[str, Tensor]):
    def f(params: Dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **params}, (x.unsqueeze(0),))
        return out.reshape(-1)

    return f


# Models whose forward cannot run under vmap over samples (e.g. GRU/LSTM: their hidden-state
# initialisation writes a (1, ...) tensor in place). They loop over samples instead.
_looped: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
# Models with an op that has no forward-mode AD: their tangent outputs come from reverse mode.
_reverse_only: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


_OOM_ERRORS = tuple(
    e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if e
)


def is_oom(err: BaseException) -> bool:
    """An out-of-memory error: ``torch.OutOfMemoryError`` or a ``RuntimeError`` that says so."""
    if _OOM_ERRORS and isinstance(err, _OOM_ERRORS):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def _per_sample(model: nn.Module, fn: Callable, batched: Sequence, shared: Sequence = ()) -> object:
    """``vmap(fn)`` over the leading dimension of ``batched`` (``shared`` passed unbatched);
    where the model cannot run under vmap, the same function sample by sample, stacked.

    ``fn(*shared, *batched_row)`` returns a tensor or a dict of tensors (one sample's result).
    """
    if not _looped.get(model, False):
        try:
            return vmap(fn, in_dims=(None,) * len(shared) + (0,) * len(batched), randomness="same")(*shared, *batched)
        except RuntimeError as err:
            if is_oom(err):
                raise
            try:
                _looped[model] = True
            except TypeError:  # pragma: no cover - not weak-referenceable
                pass
    n = _rows(batched[0])
    outs = [fn(*shared, *(_row(b, i) for b in batched)) for i in range(n)]
    if isinstance(outs[0], dict):
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    return torch.stack(outs)


def _rows(b) -> int:
    return next(iter(b.values())).shape[0] if isinstance(b, dict) else b.shape[0]


def _row(b, i: int):
    return {k: v[i] for k, v in b.items()} if isinstance(b, dict) else b[i]


def output_size(model: nn.Module, x: Tensor) -> int:
    """k: the number of outputs per sample of ``model`` on inputs ``x`` ``(batch, ...)``."""
    with torch.no_grad(), eval_mode(model):
        return int(model(x[:1]).reshape(1, -1).shape[1])


def _chunk_size(rows_per_sample: int, numel: int, itemsize: int, budget: int) -> int:
    return max(1, int(budget // max(1, 3 * rows_per_sample * numel * itemsize)))


def per_sample_jacobians(
    model: nn.Module,
    x: Tensor,
    *,
    names: Optional[Sequence[str]] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Dict[str, Tensor]:
    """Per-sample Jacobians ∂f(x_i)/∂w.

    Returns:
        parameter name → tensor of shape ``(m, k, *param.shape)``.
    """
    params = trainable_parameters(model, names)
    numel = sum(p.numel() for p in params.values())
    with eval_mode(model):
        f = _single_output_fn(model, _frozen_state(model, params))
        k = output_size(model, x)
        chunk = _chunk_size(k, numel, x.element_size() if x.is_floating_point() else 4, memory_budget)
        jac = jacrev(f)
        parts = [_per_sample(model, jac, (x[s : s + chunk],), (params,)) for s in range(0, x.shape[0], chunk)]
    return {n: torch.cat([p[n] for p in parts]) for n in params}


def flat_jacobian(
    model: nn.Module,
    x: Tensor,
    *,
    preconditioner: Preconditioner = None,
    power: float = 0.0,
    names: Optional[Sequence[str]] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """Per-sample Jacobians flattened over parameters, columns scaled by ``P**power``.

    Returns:
        ``(m, k, P)``, parameters in ``named_parameters()`` order.
    """
    jac = per_sample_jacobians(model, x, names=names, memory_budget=memory_budget)
    m, k = x.shape[0], next(iter(jac.values())).shape[1]
    cols = []
    for n, j in jac.items():
        j = j.reshape(m, k, -1)
        if preconditioner is not None and power != 0.0:
            j = j * preconditioner[n].reshape(1, 1, -1).to(j.dtype) ** power
        cols.append(j)
    return torch.cat(cols, dim=2)


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    preconditioner: Preconditioner = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """Empirical NTK in the optimizer metric, by explicit Jacobian contraction.

    Args:
        model: any module; evaluated in eval mode, flags restored.
        x1: ``(m1, ...)``; x2: ``(m2, ...)`` or ``None`` for ``x1``.
        preconditioner: parameter name → diagonal of P, or ``None`` for P = I.

    Returns:
        ``Θ`` of shape ``(m1, k, m2, k)``, ``Θ[i, a, j, b] = ∂f_a(x1_i)/∂w · P · ∂f_b(x2_j)/∂w``.
    """
    j1 = per_sample_jacobians(model, x1, memory_budget=memory_budget)
    j2 = j1 if x2 is None else per_sample_jacobians(model, x2, memory_budget=memory_budget)
    out = None
    for n in j1:
        a = j1[n].flatten(2)
        b = j2[n].flatten(2)
        if preconditioner is not None:
            a = a * preconditioner[n].reshape(1, 1, -1).to(a.dtype)
        term = torch.einsum("iap,jbp->iajb", a, b)
        out = term if out is None else out + term
    return out


def per_sample_gradients(
    model: nn.Module, loss, x: Tensor, y: Tensor, *, memory_budget: int = DEFAULT_MEMORY_BUDGET
) -> Dict[str, Tensor]:
    """∇_w ℓ(w; z_i) for each sample. Returns name → ``(m, *param.shape)``."""
    loss = resolve_loss(loss)
    params = trainable_parameters(model)
    numel = sum(p.numel() for p in params.values())
    with eval_mode(model):
        f = _single_output_fn(model, _frozen_state(model, params))
        with torch.no_grad():
            per_sample_losses(loss, f(params, x[0]).unsqueeze(0), y[:1])

        def one(p, xi, yi):
            return loss(f(p, xi).unsqueeze(0), yi.unsqueeze(0))[0]

        chunk = _chunk_size(1, numel, x.element_size() if x.is_floating_point() else 4, memory_budget)
        g = grad(one)
        parts = [_per_sample(model, g, (x[s : s + chunk], y[s : s + chunk]), (params,))
                 for s in range(0, x.shape[0], chunk)]
    return {n: torch.cat([p[n] for p in parts]) for n in params}


def gradient_gram(
    model: nn.Module,
    loss,
    x: Tensor,
    y: Tensor,
    *,
    preconditioner: Preconditioner = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """Per-sample loss-gradient Gram ``G[i, j] = ⟨∇ℓ_i, P ∇ℓ_j⟩``, shape ``(m, m)``."""
    grads = per_sample_gradients(model, loss, x, y, memory_budget=memory_budget)
    out = None
    for n, g in grads.items():
        g = g.flatten(1)
        gp = g if preconditioner is None else g * preconditioner[n].reshape(1, -1).to(g.dtype)
        term = gp @ g.T
        out = term if out is None else out + term
    return out


def gaussian_sketch_matrix(name: str, numel: int, s: int, seed: int, dtype, device) -> Tensor:
    """The dense Gaussian sketch block of ``method="reference"`` for one parameter: ``(numel, s)`` with N(0, 1/s) entries.

    Seeded from ``seed`` and the parameter name, so every call returns the same block.
    """
    h = seed
    for ch in name:
        h = (h * 131 + ord(ch)) % (2**61 - 1)
    gen = torch.Generator(device="cpu").manual_seed(h)
    return (torch.randn(numel, s, generator=gen, dtype=torch.float64) / math.sqrt(s)).to(dtype=dtype, device=device)


def sketched_jacobian(
    model: nn.Module,
    x: Tensor,
    s: int,
    *,
    seed: int = 0,
    preconditioner: Preconditioner = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    cotangents: Optional[Tensor] = None,
) -> Tensor:
    """Sketched per-sample Jacobians ``ĵ_i = Sᵀ P^{1/2} J_iᵀ`` (docs/theory.md §3(a)), torch.func path.

    ``S`` is a Gaussian Johnson–Lindenstrauss matrix, one ``(numel, s)`` block per parameter
    (:func:`gaussian_sketch_matrix`), so ``⟨ĵ_i a, ĵ_j b⟩ ≈ Θ[i, a, j, b]`` with relative error
    ≈ 1/sqrt(s). This path materializes each block; it is the ground truth for fast sketches.
    ``cotangents`` ``(m, q, k)``: return the combinations ``Σ_a cot[i, c, a] ĵ_i[a]`` instead.

    Returns:
        ``(m, k, s)``, or ``(m, q, s)`` with cotangents.
    """
    jac = per_sample_jacobians(model, x, memory_budget=memory_budget)
    out = None
    for n, j in jac.items():
        j = j.flatten(2)
        if cotangents is not None:
            j = torch.einsum("mqk,mkp->mqp", cotangents.to(j.dtype), j)
        if preconditioner is not None:
            j = j * preconditioner[n].reshape(1, 1, -1).to(j.dtype).sqrt()
        block = gaussian_sketch_matrix(n, j.shape[2], s, seed, j.dtype, j.device)
        term = j @ block
        out = term if out is None else out + term
    return out


@contextlib.contextmanager
def composite_attention() -> Iterator[None]:
    """Attention in its composite ("math") form, encoder layers off their fused fast path.

    The fused CPU/GPU attention kernels have no vmap batching rule (under vmap they run one
    sample and one output at a time) and no forward-mode AD; the composite form is made of
    batchable, differentiable ops and computes the same values up to rounding.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa = sdpa_kernel([SDPBackend.MATH])
    except ImportError:  # pragma: no cover - older torch
        sdpa = contextlib.nullcontext()
    mha = getattr(torch.backends, "mha", None)
    toggle = mha is not None and hasattr(mha, "get_fastpath_enabled")
    was = mha.get_fastpath_enabled() if toggle else None
    if toggle:
        mha.set_fastpath_enabled(False)
    try:
        with sdpa:
            yield
    finally:
        if toggle:
            mha.set_fastpath_enabled(was)


def per_sample_jvp(
    model: nn.Module,
    x: Tensor,
    tangent,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """``J_i t_i`` for one parameter tangent per sample, ``(m, k)`` (forward mode, eval mode).

    Args:
        tangent: a callable ``(lo, hi) -> {name: (hi − lo, *shape)}`` giving the tangents of
            samples ``lo:hi`` (built chunk by chunk, so that ``m × P`` floats never coexist).
    """
    with eval_mode(model), composite_attention():
        first = tangent(0, 1)
        params = {n: p.detach() for n, p in model.named_parameters() if n in first}
        frozen = _frozen_state(model, params)
        f = _single_output_fn(model, frozen)
        numel = sum(p.numel() for p in params.values())
        chunk = _chunk_size(1, numel, next(iter(params.values())).element_size(), memory_budget)

        def one(t, xi):
            return torch.func.jvp(lambda p: f(p, xi), (params,), (t,))[1]

        def by_jacobians(t, xi):  # reverse mode, for ops without forward AD (CPU mkldnn LSTM)
            jac = jacrev(f)(params, xi)                                   # {name: (k, *shape)}
            return sum(torch.einsum("kp,p->k", jac[n].flatten(1), t[n].reshape(-1)) for n in params)

        outs = []
        for lo in range(0, x.shape[0], chunk):
            hi = min(lo + chunk, x.shape[0])
            t, xs = tangent(lo, hi), x[lo:hi]
            if not _reverse_only.get(model, False):
                try:
                    outs.append(_per_sample(model, one, (t, xs)))
                    continue
                except NotImplementedError:
                    try:
                        _reverse_only[model] = True
                    except TypeError:  # pragma: no cover - not weak-referenceable
                        pass
            outs.append(_per_sample(model, by_jacobians, (t, xs)))
        return torch.cat(outs)
