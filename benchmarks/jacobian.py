"""Speed of the flat per-sample Jacobian ``(m, k, P)``; prints a markdown table.

For each model (probe of ``m`` samples, ``k`` outputs, ``P`` parameters), timed in one process:

- ``limit``: the physical limit, one forward plus ``k`` backward passes (parameter gradients,
  summed over the probe) — the work the Jacobian needs, without writing ``m·k·P`` numbers;
- ``fast``: ``flat_jacobian(method="auto")``;
- ``reference``: ``flat_jacobian(method="reference")`` (torch.func ``vmap(jacrev)``);
- ``write``: allocating the ``(m, k, P)`` output the way the fast path does and filling it once,
  the floor for any method that returns it (it dominates when ``m·k·P`` is large, e.g. the MLP).

Times are the best of ``--repeat`` rounds after a warm-up; each round runs limit, fast and write
back to back, so that all three see the same machine load (the reference: best of two runs).

Usage::

    python benchmarks/jacobian.py                 # mlp and cnn, m=128, k=10
    python benchmarks/jacobian.py --m 64 --repeat 5
"""
from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable, Dict, Tuple

import torch
from torch import nn

from gramhook.zoo import mlp, small_cnn
from gramhook.kernel import flat_jacobian
from gramhook.kernel.jacobian import _empty_output


def build(name: str, m: int, k: int) -> Tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        return mlp(784, 256, k), torch.randn(m, 1, 28, 28, generator=g)
    if name == "cnn":
        return small_cnn(1, k), torch.randn(m, 1, 28, 28, generator=g)
    raise ValueError(f"unknown model {name!r}; choose from mlp, cnn")


def once(fn: Callable[[], object], cuda: bool = False) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del out
    return dt


def physical_limit(net: nn.Module, x: torch.Tensor, k: int):
    """One forward and ``k`` backward passes (parameter gradients) over ``x``."""
    params = [p for p in net.parameters() if p.requires_grad]
    out = net(x).reshape(x.shape[0], -1)
    grads = None
    for a in range(k):
        grads = torch.autograd.grad(out[:, a].sum(), params, retain_graph=a < k - 1)
    return grads


def run(name: str, m: int, k: int, repeat: int, skip_reference: bool, device: str = "cpu") -> Dict[str, object]:
    net, x = build(name, m, k)
    net, x = net.to(device), x.to(device)
    cuda = x.device.type == "cuda"
    net.eval()
    P = sum(p.numel() for p in net.parameters() if p.requires_grad)
    flat_jacobian(net, x[:2])  # warm-up
    flat_jacobian(net, x[:2], method="reference")
    physical_limit(net, x[:2], k)
    if cuda:
        flat_jacobian(net, x)
    fns = {
        "limit": lambda: physical_limit(net, x, k),
        "fast": lambda: flat_jacobian(net, x, method="auto"),
        "write": lambda: _empty_output((m, k, P), torch.float32, x.device).fill_(1.0),
    }
    r: Dict[str, object] = {"model": name, "m": m, "k": k, "P": P, **{n: float("inf") for n in fns}}
    for _ in range(repeat):
        for n, fn in fns.items():
            r[n] = min(r[n], once(fn, cuda))
    r["reference"] = float("nan") if skip_reference else min(
        once(lambda: flat_jacobian(net, x, method="reference"), cuda) for _ in range(2))
    return r


def table(rows) -> str:
    lines = ["| model | m | k | P | limit (s) | fast (s) | reference (s) | fast/limit | ref/fast | write (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['m']} | {r['k']} | {r['P']:,} | {r['limit']:.4f} | {r['fast']:.4f} "
            f"| {r['reference']:.3f} | {r['fast'] / r['limit']:.2f} | {r['reference'] / r['fast']:.1f} "
            f"| {r['write']:.4f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--m", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1: shared machines)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    rows = [run(name, args.m, args.k, args.repeat, args.skip_reference, args.device) for name in args.models]
    dev = (torch.cuda.get_device_name() if args.device.startswith("cuda")
           else f"cpu ({torch.get_num_threads()} thread)")
    print(f"\ntorch {torch.__version__}, {dev}, float32\n")
    print(table(rows))


if __name__ == "__main__":
    main()
