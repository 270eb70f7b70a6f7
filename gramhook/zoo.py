"""Model factories shared by the ``gramhook demo`` CLI, the benchmarks and the tests (plain torch).

Three groups:

- **classifiers for the bundled data** (:mod:`gramhook.data`): :func:`small_cnn` (the demo's CNN),
  :func:`bn_cnn`, :func:`mid_cnn`, :func:`mlp` on ``(B, 1, 28, 28)`` images (the MLP flattens any
  input) and :func:`cnn1d` on MNIST-1D's ``(B, 1, 40)`` sequences; each maps to ``(B, classes)``;
- **building blocks** of larger test and benchmark models: :class:`BasicBlock`,
  :class:`TinyResNet`, :func:`resnet18` and the token classifier :class:`TokenEncoder`;
- **tiny test problems** keyed by readable ids, :data:`MODELS` and :func:`make`: each returns
  ``(model, x_fn)`` where ``x_fn(m, generator)`` draws ``m`` inputs from a private
  ``torch.Generator``.

Factories draw their weights from the global RNG, as ``nn.Module`` constructors do, in the order
the layers are listed; :func:`make` forks the RNG and seeds it, so it is deterministic and leaves
the caller's RNG state alone.

Tiny problem ids and input shapes (every model maps its inputs to ``(m, k)``):

- ``"mlp"``: Linear-Tanh-Linear on ``(m, 4)``.
- ``"cnn"``: Conv2d (stride 2) - ReLU - Conv2d (groups=2) - ReLU - Flatten - Linear on ``(m, 1, 8, 8)``.
- ``"resnet_bn"``: :class:`TinyResNet` with one basic block, on ``(m, 3, 8, 8)``; BatchNorm affine
  parameters are randomized and running statistics are made non-trivial.
- ``"transformer"``: :class:`TokenEncoder` (d_model 16, nhead 2, dim_feedforward 32, 2 layers,
  dropout 0.1) on integer token sequences ``(m, 6)`` with vocabulary 11.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "small_cnn", "bn_cnn", "mid_cnn", "mlp", "cnn1d",
    "BasicBlock", "TinyResNet", "resnet18", "TokenEncoder",
    "MODELS", "make", "VOCAB", "SEQ_LEN",
]

InputFn = Callable[[int, torch.Generator], Tensor]


# -- classifiers for the bundled data --------------------------------------------------------------
def small_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """A tiny CNN for 28x28 inputs (~18k parameters with defaults), fast on CPU; the demo's model.

    Shapes: 28x28 -> conv5/s2 -> 12x12 -> conv5/s2 -> 4x4 -> linear.

    Args:
        in_channels: Number of input channels.
        num_classes: Number of output logits.

    Returns:
        An ``nn.Sequential`` mapping ``(B, in_channels, 28, 28)`` to ``(B, num_classes)``.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, kernel_size=5, stride=2), nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=5, stride=2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, num_classes),
    )


def bn_cnn(num_classes: int = 10) -> nn.Sequential:
    """28x28 -> [conv3-BN-ReLU-maxpool] 16, 32 -> conv3-BN-ReLU 32 -> linear (30k parameters).

    Returns:
        An ``nn.Sequential`` mapping ``(B, 1, 28, 28)`` to ``(B, num_classes)``.
    """
    def block(i, o, pool):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()] + ([nn.MaxPool2d(2)] if pool else [])
    return nn.Sequential(*block(1, 16, True), *block(16, 32, True), *block(32, 32, False),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, num_classes))


def mid_cnn(num_classes: int = 10) -> nn.Sequential:
    """conv3 32, conv3 64 (ReLU, maxpool each), linear 3136-96-10: 0.32M parameters.

    Returns:
        An ``nn.Sequential`` mapping ``(B, 1, 28, 28)`` to ``(B, num_classes)``.
    """
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 7 * 7, 96), nn.ReLU(), nn.Linear(96, num_classes))


def mlp(in_features: int, hidden: int = 256, num_classes: int = 10) -> nn.Sequential:
    """A one-hidden-layer ReLU MLP; inputs are flattened first (images work as-is).

    Args:
        in_features: Number of input features after flattening (e.g. 64 or 784).
        hidden: Hidden width.
        num_classes: Number of output logits.

    Returns:
        An ``nn.Sequential`` mapping ``(B, ...)`` to ``(B, num_classes)``.
    """
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def cnn1d(in_length: int = 40, num_classes: int = 10) -> nn.Sequential:
    """A small 1-D CNN for MNIST-1D (12,746 parameters with defaults), fast on CPU.

    Shapes: (1, L) -> conv5/pad2, 32 ch -> (32, L) -> conv5/s2 -> conv5/s2 -> linear; for L = 40
    the lengths are 40 -> 18 -> 7.

    Args:
        in_length: Length L of the input sequences.
        num_classes: Number of output logits.

    Returns:
        An ``nn.Sequential`` mapping ``(B, 1, in_length)`` to ``(B, num_classes)``.

    Raises:
        ValueError: If ``in_length`` is below 13 (nothing left after the strided convolutions).
    """
    out = in_length
    for _ in range(2):
        out = (out - 5) // 2 + 1
    if out < 1:
        raise ValueError(f"in_length must be at least 13, got {in_length}")
    return nn.Sequential(
        nn.Conv1d(1, 32, kernel_size=5, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, kernel_size=5, stride=2), nn.ReLU(),
        nn.Conv1d(32, 32, kernel_size=5, stride=2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * out, num_classes),
    )


# -- building blocks -------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block: conv3-BN-ReLU-conv3-BN, plus the skip (a 1x1 conv-BN when the shape
    changes), then ReLU. ``(B, cin, H, W)`` -> ``(B, cout, H / stride, W / stride)``.

    The skip is added in place on the second BatchNorm's output, which the kernels must handle.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.down is None else self.down(x)
        return torch.relu(out)


class TinyResNet(nn.Module):
    """conv3-BN-ReLU stem of ``widths[0]`` channels, one :class:`BasicBlock` per width (stride 2
    after the first), global average pool, Linear head: ``(B, 3, H, W)`` -> ``(B, k)``."""

    def __init__(self, k: int = 3, widths: Sequence[int] = (4, 8)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        cins = (widths[0],) + tuple(widths[:-1])
        self.blocks = nn.Sequential(*(BasicBlock(c, w, 1 if i == 0 else 2)
                                      for i, (c, w) in enumerate(zip(cins, widths))))
        self.head = nn.Linear(widths[-1], k)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))   # (B, c, H', W') -> (B, k)


def resnet18(width: int = 16, k: int = 10) -> nn.Sequential:
    """ResNet-18 layout for 32x32 inputs (3x3 stem, 4 stages of 2 BasicBlocks), base ``width``.

    Returns:
        An ``nn.Sequential`` mapping ``(B, 3, 32, 32)`` to ``(B, k)``.
    """
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    cin = width
    for i, w in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, k)]
    return nn.Sequential(*layers)


class TokenEncoder(nn.Module):
    """Embedding, ``nn.TransformerEncoder`` (batch first), mean over tokens, Linear head:
    integer tokens ``(B, T)`` -> ``(B, k)``."""

    def __init__(self, vocab: int = 1000, d: int = 64, layers: int = 4, k: int = 10, *, heads: int = 4,
                 ff: Optional[int] = None, dropout: float = 0.0, padding_idx: Optional[int] = None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d if ff is None else ff, dropout=dropout, batch_first=True)
        self.enc = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, k)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.enc(self.emb(tokens)).mean(dim=1))      # (B, T, d) -> (B, k)


# -- tiny test problems ----------------------------------------------------------------------------
VOCAB = 11
SEQ_LEN = 6


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
    model = TinyResNet(k, widths=(4,))
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.2)
    return model, lambda m, g: torch.randn(m, 3, 8, 8, generator=g, dtype=dtype)


def _transformer(k: int, dtype: torch.dtype) -> Tuple[nn.Module, InputFn]:
    model = TokenEncoder(VOCAB, 16, 2, k, heads=2, ff=32, dropout=0.1)
    return model, lambda m, g: torch.randint(0, VOCAB, (m, SEQ_LEN), generator=g)


MODELS: Dict[str, Callable[[int, torch.dtype], Tuple[nn.Module, InputFn]]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet_bn": _resnet_bn,
    "transformer": _transformer,
}


def make(name: str, k: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tuple[nn.Module, InputFn]:
    """Build the tiny problem ``name`` with ``k`` outputs in ``dtype``, in train mode.

    Weights are drawn inside ``torch.random.fork_rng`` seeded with ``seed``. Models with BatchNorm
    get non-trivial running statistics from three train-mode forwards on shifted inputs.

    Returns:
        ``(model, x_fn)``; ``x_fn(m, generator)`` returns ``m`` inputs (see the module docstring).

    Raises:
        KeyError: If ``name`` is not in :data:`MODELS`.
    """
    if name not in MODELS:
        raise KeyError(f"Unknown test model {name!r}; choose from {sorted(MODELS)}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, x_fn = MODELS[name](k, dtype)
        model = model.to(dtype)
        if any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules()):
            gen = torch.Generator().manual_seed(seed + 1)
            model.train()
            with torch.no_grad():
                for step in range(3):
                    model(1.5 * x_fn(16, gen) + 0.3 * step)
    model.train()
    return model, x_fn
