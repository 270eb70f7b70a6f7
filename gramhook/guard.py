"""Keeping the user's run safe from the monitor: quiet isolation, failure reports, fingerprints.

Everything the monitor does inside a hook runs under :func:`quiet`, and every failure is caught
and handed to :class:`Failures`, which reports it through :func:`emit`. So nothing raised inside a
hook reaches the user's loop: neither an exception nor a warning that ``python -W error`` would
turn into one.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import warnings
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

__all__ = ["quiet", "emit", "Failures", "nonfinite_cause", "digest", "fingerprint", "differences", "check_finite"]

logger = logging.getLogger("gramhook")


_depth = 0                      # nesting of quiet()
_held: List[Tuple[str, type]] = []  # reports made inside quiet(), emitted when it ends


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Where a warning filter turns warnings into errors (``-W error``), warnings raised by the
    monitor's own work (torch's deprecation notices, vmap fallback notices) are dropped here, so
    that they cannot become exceptions. The monitor's own reports (:func:`emit`) are held and
    emitted once the outermost block ends, under the user's warning filters."""
    global _depth
    _depth += 1
    try:
        if any(f[0] == "error" for f in warnings.filters):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        else:
            # Nothing can raise: leave the filters alone, since changing them (catch_warnings)
            # resets every module's once-per-location registry and would repeat the user's own
            # warnings at every step.
            yield
    finally:
        _depth -= 1
        if _depth == 0 and _held:
            held = list(_held)
            _held.clear()
            for message, category in held:
                _emit_now(message, category)


def _preload() -> None:
    """Import, once and quietly, the torch module whose import warns (``torch.jit.script`` is
    deprecated) the first time forward-mode AD runs: silence it at its source."""
    with warnings.catch_warnings():  # once, at import: whatever the filters are
        warnings.simplefilter("ignore")
        try:
            import torch._decomp.decompositions_for_jvp  # noqa: F401
        except Exception:  # pragma: no cover - other torch versions
            pass


_preload()


def emit(message: str, category: type = RuntimeWarning) -> None:
    """Report ``message`` as a warning; where warnings are errors (``-W error``), as a log record
    of the ``gramhook`` logger instead. Never raises. Inside :func:`quiet`, held until it ends."""
    if _depth > 0:
        _held.append((message, category))
        return
    _emit_now(message, category)


def _outside_level() -> int:
    """The ``stacklevel`` of the first caller outside gramhook, torch and the standard library
    (the user's ``optimizer.step()`` line), counted from :func:`_emit_now`'s ``warnings.warn``."""
    skip = tuple(os.path.dirname(m.__file__) for m in (sys.modules[__package__], torch, contextlib))
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def _emit_now(message: str, category: type) -> None:
    try:
        warnings.warn(message, category, stacklevel=_outside_level())
    except Exception:
        try:
            logger.warning(message)
        except Exception:  # pragma: no cover - a broken logging setup
            pass


class Failures:
    """Failure reports of one monitor, by place (``"measure"``, ``"step"``, ``"capture"``, ...).

    An *episode* is a run of failures at one place between two successes. In an episode each
    distinct failure (type and message) is reported once, at most ``limit`` of them; after
    ``pause_after`` failures in a row the place is *paused*: it is retried with growing gaps (2, 4,
    ... up to ``max_gap`` steps) and a success ends the episode with a report that it resumed.
    A later episode is reported afresh.
    """

    def __init__(self, *, pause_after: int = 3, max_gap: int = 64, limit: int = 5):
        self.pause_after, self.max_gap, self.limit = pause_after, max_gap, limit
        self.count: Dict[str, int] = {}          # failures in a row, by place
        self.since: Dict[str, int] = {}          # step of the episode's first failure
        self.seen: Dict[str, Set[Tuple[str, str]]] = {}
        self.retry_at: Dict[str, int] = {}
        self.messages: list = []                 # every report, for the TensorBoard sink and tests

    def failing(self, where: str) -> bool:
        return self.count.get(where, 0) > 0

    def paused(self, where: str) -> bool:
        return self.count.get(where, 0) >= self.pause_after

    def due(self, where: str, step: int) -> bool:
        """Whether a paused place should be retried at ``step`` (always when not paused)."""
        return not self.paused(where) or step >= self.retry_at.get(where, 0)

    def failed(self, where: str, exc: BaseException, step: int, what: str) -> Optional[str]:
        """Record a failure; return the report to emit, or ``None`` (already reported)."""
        n = self.count.get(where, 0) + 1
        self.count[where] = n
        if n == 1:
            self.since[where] = step
            self.seen[where] = set()
        cause = f"{type(exc).__name__}: {_first_line(exc)}"
        if n >= self.pause_after:
            self.retry_at[where] = step + min(self.max_gap, 2 ** (n - self.pause_after + 1))
        seen = self.seen[where]
        key = (type(exc).__name__, _first_line(exc))
        if n == self.pause_after:
            msg = (f"gramhook: {where} failed {n} times in a row since step {self.since[where]} ({cause}); "
                   f"training continues, measurements are paused and retried with growing gaps, and "
                   f"resume once the cause is gone.")
        elif key not in seen and len(seen) < self.limit:
            msg = (f"gramhook: {where} failed at step {step} ({cause}); training continues, this {what} "
                   f"is skipped.")
        else:
            return None
        seen.add(key)
        self.messages.append(msg)
        return msg

    def succeeded(self, where: str, step: int) -> Optional[str]:
        """Record a success; return a report when it ends an episode of failures."""
        n = self.count.pop(where, 0)
        self.retry_at.pop(where, None)
        if n == 0:
            return None
        msg = f"gramhook: {where} works again at step {step} after {n} failure(s) since step {self.since[where]}."
        self.messages.append(msg)
        return msg


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def nonfinite_cause(model: nn.Module, x: Optional[Tensor] = None) -> Optional[str]:
    """Name what is NaN/inf: a parameter, a gradient, or the inputs ``x``; ``None`` if all are finite."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                return f"the parameter {name!r} holds NaN/inf values"
        if x is not None and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            return "the training inputs hold NaN/inf values"
        for name, p in model.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return f"the gradient of {name!r} holds NaN/inf values (a diverging loss?)"
    return None


def check_finite(record: object, names: Sequence[str]) -> None:
    """Raise ``FloatingPointError`` naming the first tensor attribute of ``record`` in ``names``
    that holds NaN/inf (attributes that are absent or not tensors are skipped)."""
    for name in names:
        t = getattr(record, name, None)
        if isinstance(t, Tensor) and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"the model's {name.replace('_', ' ')} are not finite (NaN/inf)")


def digest(*tensors: Tensor) -> str:
    """A short content hash of tensors (shape, dtype and bytes), e.g. to recognise a probe."""
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module, trainable: Sequence[str], probe_x: Tensor, probe_y: Tensor,
                **settings: object) -> Dict[str, object]:
    """What a saved monitor state must match to be loaded: the trainable parameters' names and
    shapes, a digest of the probe, and ``settings`` (``m``, ``k``, ``n_train``, ``loss``, ...)."""
    names = set(trainable)
    return {"parameters": tuple((n, tuple(p.shape)) for n, p in model.named_parameters() if n in names),
            "probe": digest(probe_x, probe_y), **settings}


def differences(saved: Mapping[str, object], mine: Mapping[str, object]) -> list:
    """The keys where two fingerprints disagree, each as ``"key: saved … here …"``."""
    out = []
    for key, value in mine.items():
        if key in saved and saved[key] != value:
            out.append(f"{key}: saved {_short(saved[key])}, here {_short(value)}")
    return out


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
