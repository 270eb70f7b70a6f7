"""Models that are not ``model(x) -> Tensor``: keyword/dict inputs and structured outputs.

The kernels, engines and probes of gramhook work on one input tensor ``(batch, ...)`` and one
output tensor. A model called as ``model(input_ids=..., attention_mask=...)`` that returns a
``ModelOutput``, a dict or a tuple is brought to that form by :class:`Adapted`, a thin module
around it:

- the inputs of one sample (several tensors of fixed shapes and dtypes, positional or keyword)
  are *packed* into one flat row, ``(batch, D)`` with ``D = Σ numel``, in a float dtype that
  holds every value exactly (float32, or float64 for integers beyond 2²⁴);
  :meth:`InputSpec.unpack` restores shapes and dtypes inside the forward, so ``torch.func`` and
  the per-layer hooks see the model's own modules and calls;
- the output is selected (``output=``: a key, an index or a callable; by default the tensor
  itself, ``logits``, or the first tensor of a tuple).

The wrapped parameters are named ``model.<name>``; :class:`Adapted` is only ever called by
gramhook (the user's training forwards reach the hooks of the inner model, and
:meth:`InputSpec.pack_call` packs their arguments).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

__all__ = ["InputSpec", "Adapted", "prepare", "select_output", "split_item", "LABEL_KEYS"]

# Keys that hold the target in a dict sample, in the order they are looked for.
LABEL_KEYS = ("labels", "label", "label_ids", "targets", "target", "y")
OutputSelector = Union[None, str, int, Callable[[Any], Tensor]]
InputsAdapter = Union[None, Sequence[str], Callable[[Any], Tuple[Any, Any]]]


@dataclasses.dataclass(frozen=True)
class _Field:
    key: Union[int, str]          # position (int) or keyword (str)
    shape: Tuple[int, ...]        # per-sample shape
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How the inputs of one sample are laid out in a packed row.

    Attributes:
        fields: the positional (int key) and keyword (str key) tensors, in packing order.
        dtype: the packed row's dtype.
    """

    fields: Tuple[_Field, ...]
    dtype: torch.dtype

    @property
    def width(self) -> int:
        """D, the packed row's length."""
        return sum(math.prod(f.shape) for f in self.fields)

    @staticmethod
    def of(batch: Any) -> "InputSpec":
        """The spec of a batch: a tensor, a tuple/list of tensors (positional) or a dict (keywords),
        each ``(batch, ...)``."""
        items = _items(batch)
        if not items:
            raise ValueError("The model inputs hold no tensor; pass at least one (batch, ...) tensor.")
        fields, floats, big = [], [], False
        for key, t in items:
            if not isinstance(t, Tensor) or t.dim() == 0:
                raise ValueError(
                    f"Model input {key!r} is {type(t).__name__}" + ("" if not isinstance(t, Tensor) else " (a scalar)")
                    + "; gramhook needs (batch, ...) tensors for every model input. Drop it from the "
                    "probe (inputs=(...names...)) or convert it with torch.as_tensor.")
            fields.append(_Field(key, tuple(t.shape[1:]), t.dtype))
            if t.is_floating_point():
                floats.append(t.dtype)
            elif t.numel() and int(t.abs().max()) >= 2 ** 24:
                big = True
        dtype = torch.float64 if big or torch.float64 in floats else torch.float32
        return InputSpec(tuple(fields), dtype)

    def pack(self, batch: Any) -> Optional[Tensor]:
        """``(batch, D)`` from a batch laid out like the spec, or ``None`` if it does not fit
        (other keys, shapes or dtypes, e.g. a batch padded to another length)."""
        items = dict(_items(batch))
        parts, n = [], None
        for f in self.fields:
            t = items.get(f.key)
            if not isinstance(t, Tensor) or t.dim() == 0 or tuple(t.shape[1:]) != f.shape:
                return None
            if n is None:
                n = t.shape[0]
            elif t.shape[0] != n:
                return None
            parts.append(t.detach().reshape(n, -1).to(self.dtype))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def pack_call(self, args: tuple, kwargs: dict) -> Optional[Tensor]:
        """Pack the arguments of a call ``model(*args, **kwargs)`` (see :meth:`pack`)."""
        merged: Dict[Union[int, str], Any] = dict(enumerate(args))
        merged.update(kwargs)
        return self.pack(merged)

    def unpack(self, x: Tensor) -> Tuple[list, dict]:
        """Positional and keyword inputs from packed rows ``(batch, D)``."""
        args: List[Tensor] = []
        kwargs: Dict[str, Tensor] = {}
        lo = 0
        for f in self.fields:
            size = math.prod(f.shape)
            t = x[:, lo:lo + size].reshape(x.shape[0], *f.shape)
            if not f.dtype.is_floating_point:
                t = t.round()
            t = t.to(f.dtype)
            lo += size
            if isinstance(f.key, int):
                args.append(t)
            else:
                kwargs[f.key] = t
        return args, kwargs


def _items(batch: Any) -> List[Tuple[Union[int, str], Any]]:
    if isinstance(batch, Tensor):
        return [(0, batch)]
    if isinstance(batch, Mapping):
        return list(batch.items())
    if isinstance(batch, (tuple, list)):
        return list(enumerate(batch))
    raise ValueError(
        f"Model inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(batch).__name__}.")


def select_output(out: Any, output: OutputSelector = None) -> Tensor:
    """The prediction tensor of a model's output.

    ``output``: a key (dicts, ``ModelOutput``), an index (tuples) or a callable ``out -> Tensor``;
    ``None`` guesses: the output itself if it is a tensor, else ``logits``, else the only tensor
    value of a dict, else the first element of a tuple.
    """
    if callable(output):
        sel = output(out)
    elif output is not None:
        try:
            sel = out[output]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"output={output!r} does not select anything from the model's "
                             f"{type(out).__name__} output ({e}).") from e
    elif isinstance(out, Tensor):
        sel = out
    elif isinstance(out, Mapping):
        if "logits" in out:
            sel = out["logits"]
        else:
            tensors = [k for k, v in out.items() if isinstance(v, Tensor)]
            if len(tensors) != 1:
                raise ValueError(
                    f"The model returned a {type(out).__name__} with keys {list(out.keys())}; pass "
                    "output='<key>' (or a callable) to say which one is the prediction.")
            sel = out[tensors[0]]
    elif isinstance(out, (tuple, list)) and out:
        sel = out[0]
    else:
        sel = out
    if not isinstance(sel, Tensor):
        raise ValueError(f"The selected model output is {type(sel).__name__}, not a tensor; pass "
                         "output='<key>', an index or a callable returning the prediction tensor.")
    return sel


def split_item(item: Any, inputs: InputsAdapter = None) -> Tuple[Any, Any]:
    """``(model inputs, target)`` of one sample or batch.

    A dict is split into its label key (the first of :data:`LABEL_KEYS`) and the rest; ``inputs``
    names the keys that go to the model, or is a callable ``item -> (model_inputs, target)``.
    A pair ``(x, y)`` is returned as it is.
    """
    if callable(inputs):
        got = inputs(item)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise ValueError("The `inputs` callable must return (model_inputs, target), got "
                             f"{type(got).__name__}.")
        return got[0], got[1]
    if isinstance(item, Mapping):
        label = next((k for k in LABEL_KEYS if k in item), None)
        if label is None:
            raise ValueError(
                f"A dict sample with keys {list(item.keys())} has no target; gramhook looks for one of "
                f"{list(LABEL_KEYS)}. Pass inputs=lambda item: (model_inputs, target).")
        keys = list(inputs) if inputs is not None else [k for k in item if k != label]
        missing = [k for k in keys if k not in item]
        if missing:
            raise ValueError(f"inputs={list(keys)} names keys {missing} that the sample does not have "
                             f"(it has {list(item.keys())}).")
        return {k: item[k] for k in keys}, item[label]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise ValueError(f"A sample must be an (x, y) pair or a dict with a label key, got {type(item).__name__}.")


class Adapted(nn.Module):
    """``model`` as ``forward(packed (batch, D)) -> prediction tensor``.

    Args:
        model: the user's module (a child, so its parameters are ``model.<name>``).
        spec: the input layout.
        output: the output selector (see :func:`select_output`).
    """

    def __init__(self, model: nn.Module, spec: Optional[InputSpec], output: OutputSelector = None):
        super().__init__()
        self.model = model
        self.spec = spec        # None: one tensor input, passed through unpacked
        self.output = output

    def forward(self, x: Tensor) -> Tensor:
        if self.spec is None:
            return select_output(self.model(x), self.output)
        args, kwargs = self.spec.unpack(x)
        return select_output(self.model(*args, **kwargs), self.output)

    def convert(self, data: Any) -> Any:
        """A ``holdout``/``reference`` given like the probe (dict or tuple inputs) as packed tensors."""
        if data is None or self.spec is None:
            return data
        if isinstance(data, Mapping):
            data = split_item(data)
        if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], Tensor):
            packed = self.spec.pack(data[0])
            if packed is None:
                raise ValueError("The holdout/reference inputs are not laid out like the probe's "
                                 "(other keys or shapes).")
            return packed, data[1]
        return data


class _PackedDataset(Dataset):
    """A Dataset of dict (or ``(inputs, target)``) samples as ``(packed row, target)`` pairs."""

    def __init__(self, data, spec: Optional[InputSpec], inputs: InputsAdapter):
        self.data, self.spec, self.inputs = data, spec, inputs     # spec None: one tensor input

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = split_item(self.data[i], self.inputs)
        if self.spec is None:
            return x, torch.as_tensor(y)
        row = self.spec.pack(default_collate([x]))
        if row is None:
            raise ValueError(
                f"Sample {i} has model inputs of other keys or shapes than sample 0; a probe needs one "
                "layout for every sample: pad to a fixed length (e.g. padding='max_length').")
        return row[0], torch.as_tensor(y)


def _returns_tensor(model: nn.Module, x: Tensor) -> bool:
    flags = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return isinstance(model(x[:1]), Tensor)
    except Exception:
        return True          # let the usual probe check report the error
    finally:
        for mod, flag in flags:
            mod.training = flag


def prepare(model: nn.Module, probe: Any, *, output: OutputSelector = None,
            inputs: InputsAdapter = None) -> Tuple[Any, nn.Module]:
    """Bring a probe and a model to the ``model(x) -> Tensor`` form.

    Returns:
        ``(probe, model)``: the probe as :func:`gramhook.probe.make_probe` takes it (``(x, y)``
        tensors or a Dataset of ``(x, y)``) and the model to measure: the user's own when it
        already has that form, else an :class:`Adapted` around it.

    >>> net = nn.Linear(3, 2)
    >>> probe, model = prepare(net, {"input": torch.randn(4, 3), "labels": torch.arange(4) % 2})
    >>> probe[0].shape, type(model).__name__
    (torch.Size([4, 3]), 'Adapted')
    """
    data = probe.dataset if isinstance(probe, DataLoader) else probe
    # Several inputs: a dict, or a tuple of tensors (a nested list of numbers is no such thing:
    # make_probe says how to convert it).
    several = lambda x: isinstance(x, Mapping) or (
        isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x))
    if isinstance(data, Mapping) or (isinstance(data, (tuple, list)) and (callable(inputs) or (
            len(data) == 2 and several(data[0])))):
        x, y = split_item(data, inputs)
        if isinstance(x, Tensor):
            return (x, y), Adapted(model, None, output)
        spec = InputSpec.of(x)
        return (spec.pack(x), torch.as_tensor(y)), Adapted(model, spec, output)
    if isinstance(data, (tuple, list)):
        if len(data) == 2 and isinstance(data[0], Tensor) and output is None and _returns_tensor(model, data[0]):
            return probe, model
        return probe, Adapted(model, None, output)
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")) or len(data) == 0:
        return probe, model                    # make_probe says what is wrong
    from .probe import _rng_untouched

    with _rng_untouched():
        item = data[0]
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Tensor) and inputs is None:
        if output is None and _returns_tensor(model, item[0].unsqueeze(0)):
            return probe, model
        return probe, Adapted(model, None, output)
    x, _ = split_item(item, inputs)
    if isinstance(x, Tensor):
        return _PackedDataset(data, None, inputs), Adapted(model, None, output)
    spec = InputSpec.of(default_collate([x]))
    return _PackedDataset(data, spec, inputs), Adapted(model, spec, output)
