"""The fixed probe set (docs/theory.md §1): m training samples, drawn once, as validated tensors.

What a user passes as ``probe=`` becomes a :class:`ProbeSet` here:

- ``(x, y)``: a tuple or list of tensors with one row per sample;
- a map-style ``torch.utils.data.Dataset`` whose ``__getitem__`` returns ``(x, y)``;
- a ``DataLoader``: its ``.dataset`` is used (its batching, shuffling and sampler are not).

Sampling draws ``size`` samples without replacement from a private ``torch.Generator`` seeded with
``seed``; the global torch, numpy and python RNGs are never touched, so adding a monitor does not
change the training run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from .kernel import eval_mode
from .losses import PerSampleLoss, Loss, per_sample_losses, resolve_loss

__all__ = ["ProbeSet", "make_probe", "check_probe_against_model", "check_targets", "default_probe_size", "rows_in",
           "Reservoir", "as_reference"]

Device = Union[None, str, torch.device]

_FIX_N_TRAIN = "pass n_train=len(train_set)"


@dataclasses.dataclass(frozen=True)
class ProbeSet:
    """A fixed probe of ``m`` samples.

    Attributes:
        x: inputs ``(m, ...)``.
        y: targets ``(m, ...)``: integer class labels or floating regression targets.
        indices: ``(m,)`` int64 indices of the samples in the source dataset when the probe was
            subsampled from it; ``None`` when the probe is the whole source, in its order.
    """

    x: Tensor
    y: Tensor
    indices: Optional[Tensor] = None

    def __post_init__(self):
        _check_pair(self.x, self.y)
        if self.x.shape[0] == 0:
            raise ValueError(_EMPTY)
        if self.indices is not None and tuple(self.indices.shape) != (self.x.shape[0],):
            raise ValueError(
                f"indices must have shape ({self.x.shape[0]},), one per probe sample, "
                f"got {tuple(self.indices.shape)}."
            )

    @property
    def m(self) -> int:
        """The number of probe samples."""
        return int(self.x.shape[0])

    def __len__(self) -> int:
        return self.m

    def to(self, device: Device) -> "ProbeSet":
        """The same probe with ``x`` and ``y`` on ``device`` (indices stay on the CPU)."""
        return ProbeSet(self.x.to(device), self.y.to(device), self.indices)


_EMPTY = (
    "The probe is empty (0 samples). Pass data with at least one sample and size >= 1 "
    "(a few hundred samples are typical; see default_probe_size)."
)


def default_probe_size(device: Device = None) -> int:
    """The probe size to use when the user gives none: 128 on CPU, 512 on CUDA.

    >>> default_probe_size("cpu"), default_probe_size("cuda:0")
    (128, 512)
    """
    kind = torch.device(device).type if device is not None else "cpu"
    return 512 if kind == "cuda" else 128


def make_probe(
    data: Any,
    *,
    size: Optional[int],
    n_train: Optional[int],
    seed: int = 0,
    device: Device = None,
) -> Tuple[ProbeSet, int]:
    """Turn ``(x, y)``, a Dataset or a DataLoader into a validated probe.

    Args:
        data: ``(x, y)`` tensors with one row per sample, a map-style ``Dataset`` returning
            ``(x, y)`` items, or a ``DataLoader`` (its ``.dataset`` is used).
        size: number of samples to draw without replacement; all of them when ``None`` or when
            ``size`` is at least the number available. Callers that receive a whole training
            set should pass :func:`default_probe_size`.
        n_train: the size of the training set the probe is drawn from. Inferred as
            ``len(dataset)`` for a Dataset or DataLoader; required for tensors.
        seed: seed of the private generator that draws the sample.
        device: where ``x`` and ``y`` go (``None``: leave them where they are).

    Returns:
        ``(probe, n_train)``.

    Raises:
        ValueError: for data of the wrong kind, non-tensor inputs or targets, mismatched first
            dimensions, an empty probe, or ``n_train`` smaller than the probe. Each message says
            how to fix the call.

    >>> x, y = torch.randn(10, 3), torch.arange(10) % 2
    >>> probe, n = make_probe((x, y), size=4, n_train=1000)
    >>> probe.x.shape, probe.indices.shape, n
    (torch.Size([4, 3]), torch.Size([4]), 1000)
    """
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"size must be an int or None, got {type(size).__name__}.")
        if size <= 0:
            raise ValueError(_EMPTY + f" Got size={size}.")
    if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int)):
        raise ValueError(f"n_train must be an int ({_FIX_N_TRAIN}), got {type(n_train).__name__}.")

    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        source: Union[Tuple[Tensor, Tensor], Dataset] = tuple(data.tensors)
        inferred: Optional[int] = len(data)
    elif isinstance(data, Dataset):
        source = data
        inferred = _dataset_len(data)
    elif isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(
                f"probe data must be a pair (x, y), got a {type(data).__name__} of length {len(data)}."
            )
        source, inferred = tuple(data), None
    else:
        raise ValueError(
            f"probe data must be (x, y) tensors, a torch Dataset or a DataLoader, got "
            f"{type(data).__name__}. For example: probe=(x_train[:256], y_train[:256])."
        )
    if isinstance(source, tuple):
        _check_pair(*source)
        n_avail = int(source[0].shape[0])
    else:
        n_avail = int(inferred)

    if n_avail == 0:
        raise ValueError(_EMPTY)
    if n_train is None:
        if inferred is None:
            raise ValueError(
                "n_train is unknown for a probe given as tensors: " + _FIX_N_TRAIN + " (the size of "
                "the whole training set the probe is drawn from)."
            )
        n_train = inferred

    indices = _draw(n_avail, size, seed)
    m = n_avail if indices is None else int(indices.shape[0])
    if n_train < m:
        raise ValueError(
            f"n_train={n_train} is smaller than the probe (m={m}); {_FIX_N_TRAIN} (the probe is "
            "a subset of the training set), or pass a smaller size."
        )
    if n_avail > n_train:
        raise ValueError(
            f"The probe data hold {n_avail} samples, more than n_train={n_train}: the probe is drawn from "
            f"the training set, so {_FIX_N_TRAIN} and pass training samples only (a subset such as "
            "(x_train[:256], y_train[:256]) is fine).")

    if isinstance(source, tuple):
        x, y = source if indices is None else (source[0][indices], source[1][indices])
    else:
        with _rng_untouched():  # random transforms in __getitem__ must not shift the training run
            x, y = _collate(source, range(n_avail) if indices is None else indices.tolist())
    if device is not None:
        x, y = x.to(device), y.to(device)
    return ProbeSet(x, y, indices), n_train


def _draw(n_avail: int, size: Optional[int], seed: int) -> Optional[Tensor]:
    """Sorted indices of ``size`` samples drawn without replacement, or ``None`` for all."""
    if size is None or size >= n_avail:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n_avail, generator=gen)[:size].sort().values


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Restore the global torch (CPU), python and numpy RNG states on exit."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _dataset_len(data: Dataset) -> int:
    if isinstance(data, IterableDataset):
        raise ValueError(
            "An IterableDataset cannot be sampled once for a fixed probe: pass a map-style Dataset, "
            "or draw the samples yourself and pass probe=(x, y) tensors with n_train."
        )
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"The dataset {type(data).__name__} has no __len__, so a probe cannot be drawn from it: "
            "give it a __len__, or pass probe=(x, y) tensors with n_train."
        ) from None


def _collate(data: Dataset, idx: Sequence[int]) -> Tuple[Tensor, Tensor]:
    xs, ys = [], []
    for i in idx:
        item = data[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            what = f"a {type(item).__name__}" + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            raise ValueError(
                f"Dataset items must be (x, y) pairs, but item {i} is {what}. Wrap the dataset so that "
                "__getitem__ returns (input_tensor, target)."
            )
        xi, yi = item
        if not isinstance(xi, Tensor):
            raise ValueError(
                f"Dataset item {i} has an input of type {type(xi).__name__}, not a tensor. Return "
                "tensors from __getitem__ (e.g. add torchvision.transforms.ToTensor())."
            )
        try:
            yi = torch.as_tensor(yi)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(
                f"Dataset item {i} has a target of type {type(yi).__name__} that is not a number or "
                f"tensor ({e}). Return class indices or regression targets."
            ) from e
        xs.append(xi)
        ys.append(yi)
    try:
        x, y = torch.stack(xs), torch.stack(ys)
    except RuntimeError as e:
        raise ValueError(
            f"Dataset items cannot be stacked into a probe batch ({e}). All inputs must share one "
            "shape, and all targets another."
        ) from e
    _check_pair(x, y)
    return x, y


def _check_pair(x: Any, y: Any) -> None:
    """Tensors, at least 1-D, the same number of rows, usable targets."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise ValueError(
                f"probe {name} must be a torch.Tensor, got {type(t).__name__}; convert it with "
                f"torch.as_tensor({name})."
            )
        if t.dim() == 0:
            raise ValueError(f"probe {name} is a scalar; it needs a leading sample dimension (m, ...).")
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(
            f"probe y has dtype {y.dtype}; targets must be integer class labels (torch.long) or "
            "floating regression targets. Convert with y.long() or y.float()."
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"probe x has {x.shape[0]} samples but y has {y.shape[0]}; pass x and y with one row per "
            "sample (the same first dimension)."
        )


def check_probe_against_model(model: nn.Module, probe: ProbeSet, loss: Union[str, PerSampleLoss, Loss]) -> int:
    """Run the model and the loss on two probe samples and return k, the outputs per sample.

    The model runs in eval mode under ``no_grad``; every submodule's train/eval flag is restored.
    Checks that the output is a tensor ``(batch, ...)`` with the probe's batch size and that the
    loss returns one value per sample.

    Raises:
        ValueError: the probe's inputs do not fit the model, the output is not ``(batch, ...)``,
            or the loss is not per-sample; the message says how to fix it.

    >>> net = nn.Linear(4, 3)
    >>> probe, _ = make_probe((torch.randn(5, 4), torch.arange(5) % 3), size=None, n_train=50)
    >>> check_probe_against_model(net, probe, "cross_entropy")
    3
    """
    loss = resolve_loss(loss)
    _check_finite_values(probe)
    b = min(2, probe.m)
    x, y = probe.x[:b], probe.y[:b]
    param = next(iter(model.parameters()), None)
    if param is not None and param.device != x.device:
        raise ValueError(
            f"The probe is on {x.device} but the model on {param.device}; build the probe with "
            f"device={str(param.device)!r}."
        )
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(x)
    except (RuntimeError, ValueError, IndexError) as e:
        raise ValueError(
            f"probe inputs of shape {tuple(probe.x.shape)} (dtype {probe.x.dtype}) don't fit the "
            f"model: {e}. Pass probe inputs shaped like one training batch, (m, ...)."
        ) from e
    if not isinstance(out, Tensor):
        raise ValueError(
            f"The model returned {type(out).__name__}, not a tensor. gramhook needs outputs of shape "
            "(batch, ...); wrap the model so that forward returns the prediction tensor (e.g. logits)."
        )
    if out.dim() < 2 or out.shape[0] != b:
        raise ValueError(
            f"On a batch of {b} probe samples the model returned shape {tuple(out.shape)}; gramhook "
            f"needs (batch, ...) with batch={b}, e.g. (batch, k). Keep the batch dimension and an "
            "output dimension (for one output use shape (batch, 1), not out.squeeze())."
        )
    k = math.prod(out.shape[1:])
    check_targets(probe, k, loss)
    flat = out.reshape(b, k)
    shaped = loss.with_out_shape(out.shape[1:])
    try:
        shaped(flat, y)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise ValueError(
            f"The loss {loss.name!r} failed on model outputs of shape {tuple(out.shape)} and probe "
            f"targets of shape {tuple(y.shape)} (dtype {y.dtype}): {e}. Check that the targets "
            "match the loss (class indices for cross_entropy, the outputs' shape for mse)."
        ) from e
    per_sample_losses(shaped, flat, y)  # one value per sample, or a ValueError saying how to fix it
    return int(k)


def _check_finite_values(probe: ProbeSet, what: str = "probe") -> None:
    for name, t in (("inputs", probe.x), ("targets", probe.y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            rows = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero().reshape(-1)
            shown = rows[:5].tolist()
            raise ValueError(
                f"The {what} {name} hold NaN/inf values (samples {shown}{', ...' if rows.numel() > 5 else ''}); "
                f"drop or fix those samples before attaching the monitor.")


def check_targets(probe: ProbeSet, k: int, loss: Loss, what: str = "probe") -> None:
    """Check every target against the loss and the model's ``k`` outputs, cheaply (no model run).

    For cross-entropy the targets must be class indices ``(m,)`` in ``[0, k)``.

    Raises:
        ValueError: one-hot or fractional targets for cross-entropy, or a label out of range;
            the message names the samples and the fix.
    """
    _check_finite_values(probe, what)
    if loss.name != "cross_entropy":
        return
    y = probe.y
    if y.is_floating_point() and y.dim() > 1:
        raise ValueError(
            f"cross_entropy needs class indices of shape (m,), but the {what} targets are floating "
            f"point of shape {tuple(y.shape)} (one-hot vectors or class probabilities?). Pass class "
            "indices, e.g. y.argmax(1), as torch.long.")
    if y.dim() != 1:
        return  # other layouts are checked by running the loss
    if y.is_floating_point() and bool((y != y.round()).any()):
        bad = (y != y.round()).nonzero().reshape(-1)[:5].tolist()
        raise ValueError(
            f"cross_entropy needs whole-number class indices, but the {what} targets {bad} are "
            "fractional. Pass class indices as torch.long.")
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        bad = ((y < 0) | (y >= k)).nonzero().reshape(-1)[:5].tolist()
        raise ValueError(
            f"The {what} labels must lie in [0, {k}) for a model with k={k} outputs, but range over "
            f"[{lo}, {hi}] (samples {bad}). Make the model's last layer output one logit per class, "
            "or remap the labels to 0..k-1.")


def rows_in(probe: ProbeSet, sample: ProbeSet) -> Tensor:
    """Row of each probe sample in a larger sample drawn from the same source, ``(m,)`` int64
    (``None`` indices: the whole source, in order)."""
    def ids(p: ProbeSet):
        return p.indices.tolist() if p.indices is not None else list(range(p.x.shape[0]))
    where = {i: r for r, i in enumerate(ids(sample))}
    return torch.tensor([where[i] for i in ids(probe)], dtype=torch.long)


class Reservoir:
    """A bounded uniform sample of the training inputs seen since the last :meth:`take`
    (reservoir sampling, algorithm R).

    Holds at most ``capacity`` rows, cloned and detached; the user's batch itself is never kept.
    Draws come from a private generator seeded with ``seed``.
    """

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: list = []
        self.seen = 0

    def add(self, x: Tensor) -> None:
        x = x.detach()
        for row in range(x.shape[0]):
            self.seen += 1
            if len(self.rows) < self.capacity:
                self.rows.append(x[row].clone())
            else:
                j = int(torch.randint(0, self.seen, (1,), generator=self.gen))
                if j < self.capacity:
                    self.rows[j] = x[row].clone()

    def take(self) -> Optional[Tensor]:
        """The sampled rows ``(≤ capacity, ...)``, emptying the reservoir; ``None`` when empty."""
        if not self.rows:
            return None
        out = torch.stack(self.rows)
        self.rows, self.seen = [], 0
        return out

    def state_dict(self) -> dict:
        return {"rows": [r.clone() for r in self.rows], "seen": self.seen, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [r.clone() for r in state["rows"]]
        self.seen = state["seen"]
        self.gen.set_state(state["gen"])


def as_reference(data: Any, device: Device) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """Reference training samples as ``(x, y)`` on ``device`` (``y`` ``None`` for inputs only).

    Args:
        data: ``None``, a tensor of inputs ``(N, ...)`` or a pair ``(x, y)`` with ``y`` ``(N, ...)``
            or ``None``.

    Raises:
        TypeError, ValueError: anything else, an empty batch, or mismatched lengths.
    """
    if data is None:
        return None
    if isinstance(data, Tensor):
        return data.to(device), None
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        if not isinstance(x, Tensor) or (y is not None and not isinstance(y, Tensor)):
            raise TypeError(f"`reference` must hold tensors, got ({type(x).__name__}, {type(y).__name__}).")
        if y is not None and x.shape[0] != y.shape[0]:
            raise ValueError(f"`reference` has {x.shape[0]} inputs but {y.shape[0]} targets.")
        if x.shape[0] == 0:
            raise ValueError("`reference` is empty.")
        return x.to(device), None if y is None else y.to(device)
    raise TypeError(f"`reference` must be a tensor of inputs or a pair (x, y), got {type(data).__name__}.")
