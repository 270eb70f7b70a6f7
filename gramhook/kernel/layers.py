"""Per-layer handlers: a layer's captured input and output-gradients → its parameters' gradients.

A handler is a small pure function ``handler(layer, a, b) -> {local_name: Contribution}``:

- ``a``: the layer's input as seen by its forward hook, ``(c, ...)`` with ``c`` samples;
- ``b``: gradients of ``q`` output cotangents w.r.t. the layer's output, ``(c, q, *out.shape[1:])``
  (``q = k`` for the NTK, ``q = 1`` for the loss-gradient Gram);
- a :class:`Contribution` stands for the per-sample gradients ``(c, q, *param.shape)``, either
  materialized (:class:`Dense`) or as the two factors whose outer product sums to them
  (:class:`Outer`, the "ghost" form, ``grad = Σ_{g, t} B[g, t] ⊗ A[g, t]``).

Handlers are registered by exact module type in :data:`REGISTRY` (a subclass may override
``forward``, so it is not assumed to behave like its base). A parameter without a handler takes the
torch.func path (see :mod:`gramhook.kernel.per_sample`). Nothing is stored on modules.

Every handler works in the accumulation dtype (:func:`acc_dtype`): float32 for half/bfloat16
inputs (autocast), the input dtype otherwise.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Dense",
    "Outer",
    "Contribution",
    "LayerHandler",
    "REGISTRY",
    "register",
    "handler_for",
    "acc_dtype",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for 16-bit floats (autocast), else unchanged."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclasses.dataclass(frozen=True)
class Dense:
    """Materialized per-sample gradients ``g`` of shape ``(c, q, *param.shape)``."""

    g: Tensor

    def dense(self) -> Tensor:
        return self.g


@dataclasses.dataclass(frozen=True)
class Outer:
    """Factored per-sample gradients of a weight, ``grad[c, q] = Σ_{g, t} B[c, q, g, t] ⊗ A[c, g, t]``.

    Attributes:
        a: ``(c, G, T, d_in)`` floating inputs, or ``(c, 1, T)`` integer indices into ``d_in``
            rows (an implicit one-hot, for Embedding).
        b: ``(c, q, G, T, d_out)`` output gradients of group ``g`` at position ``t``.
        d_in: input width (the number of rows for an index ``a``).
        shape: the parameter's shape.
        with_bias: the layer's bias (``Σ_t B[g, t]``) is folded in as a constant-1 input column;
            only the ghost form reads this.
        a_is_row: whether the ``a`` index is the parameter's first dimension (Embedding:
            ``(num_embeddings, dim)``) rather than its trailing dimensions (Linear, Conv:
            ``(G·d_out, d_in...)``).
    """

    a: Tensor
    b: Tensor
    d_in: int
    shape: Tuple[int, ...]
    a_is_row: bool = False
    with_bias: bool = False  # also stands for the bias, the weight of a constant input 1 (ghost only)

    @property
    def is_index(self) -> bool:
        return not self.a.is_floating_point()

    @property
    def groups(self) -> int:
        return self.b.shape[2]

    @property
    def positions(self) -> int:
        return self.b.shape[3]

    @property
    def d_out(self) -> int:
        return self.b.shape[4]

    def dense(self) -> Tensor:
        """Per-sample gradients ``(c, q, *shape)``."""
        c, q = self.b.shape[:2]
        if self.is_index:
            idx = self.a[:, 0]  # (c, T)
            g = self.b.new_zeros(c, q, self.d_in, self.d_out)
            src = self.b[:, :, 0]  # (c, q, T, d_out)
            g.scatter_add_(2, idx[:, None, :, None].expand_as(src), src)
            return g.reshape(c, q, *self.shape)
        g = torch.einsum("cgti,cqgto->cqgoi", self.a, self.b)
        return g.reshape(c, q, *self.shape)


Contribution = Union[Dense, Outer]
HandlerFn = Callable[[nn.Module, Tensor, Tensor], Dict[str, Contribution]]


@dataclasses.dataclass(frozen=True)
class LayerHandler:
    """A registered handler.

    Attributes:
        fn: ``(layer, a, b) -> {local parameter name: Contribution}``.
        supports: ``layer -> bool``; configurations it cannot handle (the layer then falls back).
    """

    fn: HandlerFn
    supports: Callable[[nn.Module], bool] = lambda layer: True


REGISTRY: Dict[Type[nn.Module], LayerHandler] = {}


def register(*types: Type[nn.Module], supports: Optional[Callable[[nn.Module], bool]] = None):
    """Decorator: register ``fn(layer, a, b)`` as the handler of the exact module ``types``."""

    def deco(fn: HandlerFn) -> HandlerFn:
        for t in types:
            REGISTRY[t] = LayerHandler(fn, supports or (lambda layer: True))
        return fn

    return deco


# Handlers of layer types from optional packages, keyed by ``module.qualname`` so that the
# package is never imported here.
REGISTRY_BY_NAME: Dict[str, LayerHandler] = {}


def handler_for(layer: nn.Module) -> Optional[LayerHandler]:
    """The handler of ``layer``'s exact type if it supports this configuration, else ``None``."""
    h = REGISTRY.get(type(layer))
    if h is None:
        h = REGISTRY_BY_NAME.get(f"{type(layer).__module__}.{type(layer).__qualname__}")
    return h if h is not None and h.supports(layer) else None


def _bias(b: Tensor, channel_dim: int) -> Tensor:
    """Sum output gradients ``(c, q, ...)`` over every dim except ``channel_dim`` → ``(c, q, C)``."""
    dims = [d for d in range(2, b.dim()) if d != channel_dim]
    return b.sum(dim=dims) if dims else b


@register(nn.Linear)
def linear(layer: nn.Linear, a: Tensor, b: Tensor) -> Dict[str, Contribution]:
    """Linear on ``(c, *, d_in)``: extra dims (sequence positions) are the ``T`` of :class:`Outer`."""
    dt = acc_dtype(b.dtype)
    c, q = b.shape[:2]
    bb = b.to(dt).reshape(c, q, 1, -1, layer.out_features)  # (c, q, 1, T, d_out)
    out: Dict[str, Contribution] = {
        "weight": Outer(a.to(dt).reshape(c, 1, -1, layer.in_features), bb, layer.in_features,
                        tuple(layer.weight.shape))
    }
    if layer.bias is not None:
        out["bias"] = Dense(bb.sum(dim=(2, 3)))
    return out


def _conv_supported(layer: nn.Module) -> bool:
    return isinstance(layer.padding, str) or layer.padding_mode in ("zeros", "reflect", "replicate", "circular")


@register(nn.Conv1d, nn.Conv2d, supports=_conv_supported)
def conv(layer: nn.Module, a: Tensor, b: Tensor) -> Dict[str, Contribution]:
    """Conv1d/Conv2d via unfold: ``T`` = output positions, ``d_in = C_in/G · prod(kernel)``."""
    dt = acc_dtype(b.dtype)
    c, q = b.shape[:2]
    a = a.to(dt)
    nd = a.dim() - 2
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        a = F.pad(a, layer._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * nd
    else:
        padding = layer.padding
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    if nd == 1:
        a = a.unsqueeze(2)
        kernel, stride, dilation = ((1,) + tuple(v) for v in (kernel, stride, dilation))
        padding = (0,) + tuple(padding)
    cols = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)  # (c, C_in·K, L)
    g = layer.groups
    d_in = cols.shape[1] // g
    aa = cols.reshape(c, g, d_in, -1).transpose(2, 3)  # (c, G, L, d_in)
    d_out = layer.out_channels // g
    bb = b.to(dt).reshape(c, q, g, d_out, -1).transpose(3, 4)  # (c, q, G, L, d_out)
    out: Dict[str, Contribution] = {"weight": Outer(aa, bb, d_in, tuple(layer.weight.shape))}
    if layer.bias is not None:
        out["bias"] = Dense(_bias(b.to(dt), 2))
    return out


def _embedding_supported(layer: nn.Embedding) -> bool:
    return layer.max_norm is None and not layer.scale_grad_by_freq


@register(nn.Embedding, supports=_embedding_supported)
def embedding(layer: nn.Embedding, a: Tensor, b: Tensor) -> Dict[str, Contribution]:
    """Embedding: an implicit one-hot input; the ``padding_idx`` row gets no gradient."""
    dt = acc_dtype(b.dtype)
    c, q = b.shape[:2]
    idx = a.reshape(c, 1, -1)
    bb = b.to(dt).reshape(c, q, 1, -1, layer.embedding_dim)
    if layer.padding_idx is not None:
        bb = bb * (idx != layer.padding_idx)[:, None, :, :, None].to(dt)
    return {"weight": Outer(idx, bb, layer.num_embeddings, tuple(layer.weight.shape), a_is_row=True)}


def _affine(b: Tensor, xhat: Tensor, channel_dims: Tuple[int, ...], has_weight: bool, has_bias: bool):
    """Affine params of a norm layer: ``∂/∂γ = Σ b ⊙ x̂``, ``∂/∂β = Σ b`` over the other dims."""
    sum_dims = [d for d in range(2, b.dim()) if d not in channel_dims]
    out: Dict[str, Contribution] = {}
    if has_weight:
        gx = b * xhat.unsqueeze(1)
        out["weight"] = Dense(gx.sum(dim=sum_dims) if sum_dims else gx)
    if has_bias:
        out["bias"] = Dense(b.sum(dim=sum_dims) if sum_dims else b)
    return out


def _batchnorm_supported(layer: nn.Module) -> bool:
    # Without running statistics eval mode normalizes by batch statistics: samples are coupled.
    return layer.track_running_stats and layer.running_mean is not None


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, supports=_batchnorm_supported)
def batchnorm(layer: nn.Module, a: Tensor, b: Tensor) -> Dict[str, Contribution]:
    """BatchNorm in eval mode: ``x̂ = (a − running_mean) / sqrt(running_var + eps)``, channel dim 1."""
    dt = acc_dtype(b.dtype)
    shape = (1, -1) + (1,) * (a.dim() - 2)
    mean = layer.running_mean.to(dt).reshape(shape)
    var = layer.running_var.to(dt).reshape(shape)
    xhat = (a.to(dt) - mean) / torch.sqrt(var + layer.eps)
    return _affine(b.to(dt), xhat, (2,), layer.weight is not None, layer.bias is not None)


@register(nn.LayerNorm)
def layernorm(layer: nn.LayerNorm, a: Tensor, b: Tensor) -> Dict[str, Contribution]:
    """LayerNorm over the trailing ``normalized_shape``."""
    dt = acc_dtype(b.dtype)
    xhat = F.layer_norm(a.to(dt), layer.normalized_shape, eps=layer.eps)
    nd = len(layer.normalized_shape)
    channel_dims = tuple(range(b.dim() - nd, b.dim()))
    return _affine(b.to(dt), xhat, channel_dims, layer.weight is not None,
                   getattr(layer, "bias", None) is not None)


@register(nn.GroupNorm)
def groupnorm(layer: nn.GroupNorm, a: Tensor, b: Tensor) -> Dict[str, Contribution]:
    """GroupNorm: per-channel affine on dim 1."""
    dt = acc_dtype(b.dtype)
    xhat = F.group_norm(a.to(dt), layer.num_groups, eps=layer.eps)
    return _affine(b.to(dt), xhat, (2,), layer.weight is not None, layer.bias is not None)


def hf_conv1d(layer: nn.Module, a: Tensor, b: Tensor) -> Dict[str, Contribution]:
    """Hugging Face ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` of shape ``(d_in, d_out)``, the
    transpose of Linear's, on ``(c, *, d_in)``; per-sample ``∂/∂W = Σ_t a_t b_tᵀ`` ``(c, q, d_in, d_out)``."""
    dt = acc_dtype(b.dtype)
    c, q = b.shape[:2]
    d_in, d_out = layer.weight.shape
    aa = a.to(dt).reshape(c, -1, d_in)                       # (c, T, d_in)
    bb = b.to(dt).reshape(c, q, -1, d_out)                   # (c, q, T, d_out)
    out: Dict[str, Contribution] = {"weight": Dense(torch.einsum("cti,cqto->cqio", aa, bb))}
    if getattr(layer, "bias", None) is not None:
        out["bias"] = Dense(bb.sum(dim=2))
    return out


REGISTRY_BY_NAME["transformers.pytorch_utils.Conv1D"] = LayerHandler(hf_conv1d)
