"""Shared test model zoo: small float64-friendly models keyed by readable ids.

Each builder returns ``(model, x_fn)`` where ``x_fn(m, generator)`` draws ``m`` inputs for the
model from a private ``torch.Generator``. Building never touches the global RNG: weights are
drawn inside ``torch.random.fork_rng`` seeded with ``seed``, so ``make(name, seed=s)`` is
deterministic and leaves the caller's RNG state alone.

Ids and input shapes:

- ``"mlp"``: Linear-Tanh-Linear on ``(m, 4)``.
- ``"cnn"``: Conv2d (stride 2) - ReLU - Conv2d (groups=2) - ReLU - Flatten - Linear on ``(m, 1, 8, 8)``.
- ``"resnet_bn"``: conv stem + BatchNorm, one ResNet basic block (two convs, two BatchNorms,
  skip connection), global average pool, Linear head, on ``(m, 3, 8, 8)``. BatchNorm affine
  parameters are randomized and running statistics are made non-trivial.
- ``"transformer"``: Embedding + 2-layer ``nn.TransformerEncoder`` (d_model 16, nhead 2,
  dim_feedforward 32, batch_first, dropout 0.1) + mean pool + Linear head, on integer token
  sequences ``(m, 6)`` with vocabulary 11.

Every model maps its inputs to ``(m, k)`` and is returned in train mode.

The slow truths shared by the tests live here too: :func:`naive_jacobian` and
:func:`naive_gradients` loop over samples (and outputs) with ``torch.autograd.grad``.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor, nn

__all__ = ["MODELS", "make", "naive_jacobian", "naive_gradients", "VOCAB", "SEQ_LEN"]

InputFn = Callable[[int, torch.Generator], Tensor]

VOCAB = 11
SEQ_LEN = 6


class _BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn, plus identity skip, then relu."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


class _TinyResNet(nn.Module):
    def __init__(self, k: int, channels: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.block = _BasicBlock(channels)
        self.head = nn.Linear(channels, k)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.stem(x)))          # (m, c, 8, 8)
        h = self.block(h)                               # (m, c, 8, 8)
        return self.head(h.mean(dim=(2, 3)))            # (m, k)


class _TinyTransformer(nn.Module):
    def __init__(self, k: int, d_model: int = 16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, k)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.encoder(self.embed(tokens))            # (m, T, d)
        return self.head(h.mean(dim=1))                 # (m, k)


def _mlp(k: int, dtype: torch.dtype) -> Tuple[nn.Module, InputFn]:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, k))
    return model, lambda m, g: torch.randn(m, 4, generator=g, dtype=dtype)


def _cnn(k: int, dtype: torch.dtype) -> Tuple[nn.Module, InputFn]:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),        # (m, 4, 4, 4)
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),        # (m, 4, 4, 4)
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, k),
    )
    return model, lambda m, g: torch.randn(m, 1, 8, 8, generator=g, dtype=dtype)


def _resnet_bn(k: int, dtype: torch.dtype) -> Tuple[nn.Module, InputFn]:
    model = _TinyResNet(k)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.2)
    return model, lambda m, g: torch.randn(m, 3, 8, 8, generator=g, dtype=dtype)


def _transformer(k: int, dtype: torch.dtype) -> Tuple[nn.Module, InputFn]:
    model = _TinyTransformer(k)
    return model, lambda m, g: torch.randint(0, VOCAB, (m, SEQ_LEN), generator=g)


MODELS: Dict[str, Callable[[int, torch.dtype], Tuple[nn.Module, InputFn]]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet_bn": _resnet_bn,
    "transformer": _transformer,
}


def make(name: str, k: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tuple[nn.Module, InputFn]:
    """Build the model ``name`` with ``k`` outputs in ``dtype``; see the module docstring.

    Returns:
        ``(model, x_fn)``; ``x_fn(m, generator)`` returns ``m`` inputs.
    """
    if name not in MODELS:
        raise KeyError(f"Unknown test model {name!r}; choose from {sorted(MODELS)}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, x_fn = MODELS[name](k, dtype)
        model = model.to(dtype)
        if any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules()):
            # Non-trivial running statistics: a few train-mode forwards on shifted inputs.
            gen = torch.Generator().manual_seed(seed + 1)
            model.train()
            with torch.no_grad():
                for step in range(3):
                    model(1.5 * x_fn(16, gen) + 0.3 * step)
    model.train()
    return model, x_fn


# -- slow truths ---------------------------------------------------------------------------------
def naive_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """``(m, k, P)``: one ``autograd.grad`` per sample and output, in eval mode.

    Columns are the trainable parameters (``requires_grad=True``) in ``named_parameters()`` order;
    outputs are flattened to ``k``. Leaves the model in eval mode.
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        per_out = []
        for a in range(out.shape[0]):
            g = torch.autograd.grad(out[a], params, retain_graph=True)
            per_out.append(torch.cat([t.reshape(-1) for t in g]))
        rows.append(torch.stack(per_out))
    return torch.stack(rows)


def naive_gradients(model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    """``(m, P)``: per-sample loss gradients ``∇_w loss(f(x_i), y_i)``, one sample at a time.

    ``loss(out, y)`` gets the flattened output ``(1, k)`` and ``y[i:i+1]`` and returns ``(1,)``.
    Leaves the model in eval mode.
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(1, -1)
        (value,) = loss(out, y[i : i + 1])
        g = torch.autograd.grad(value, params)
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(grads)
