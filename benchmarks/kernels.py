"""Speed and memory of the kernel paths; prints a markdown table.

For each model (probe of ``m`` samples, ``k`` outputs):

- ``fast/ref``: ``empirical_ntk(method="auto")`` time over ``method="reference"`` time;
- ``fast/limit``: fast NTK time over the physical limit, one forward plus ``k`` backward passes
  (parameter gradients) over the probe, timed in the same process;
- ``gram/limit``: fast ``gradient_gram`` (cross-entropy) over the same limit;
- ``sketch/limit``: fast ``sketched_jacobian`` (``s`` columns) of one reference batch of ``m``
  samples over the same limit;
- peak extra memory of each path: the peak resident set size above the level just before the
  call, sampled every millisecond from ``/proc/self/statm`` by a thread, after ``malloc_trim``
  hands freed heap back to the OS (CPU). On CUDA it is ``torch.cuda.max_memory_allocated`` above
  the level before the call.

Usage::

    python benchmarks/kernels.py            # m=256, k=10 (smaller m for ResNet and transformer)
    python benchmarks/kernels.py --quick    # small m, a few seconds per model
    python benchmarks/kernels.py --models cnn mlp --m 128 --skip-reference
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import threading
import time
import warnings
from typing import Callable, Dict, Tuple

import torch
from torch import nn

from gramhook.kernel import empirical_ntk, gradient_gram, sketched_jacobian
from gramhook.zoo import TokenEncoder, mlp, resnet18, small_cnn


def build(name: str, m: int, k: int, args) -> Tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        return mlp(784, 256, k), torch.randn(m, 1, 28, 28, generator=g)
    if name == "cnn":
        return small_cnn(1, k), torch.randn(m, 1, 28, 28, generator=g)
    if name == "resnet18":
        return resnet18(args.width, k), torch.randn(m, 3, 32, 32, generator=g)
    if name == "transformer":
        return TokenEncoder(k=k), torch.randint(0, 1000, (m, args.seq), generator=g)
    raise ValueError(f"unknown model {name!r}; choose from mlp, cnn, resnet18, transformer")


# ---------------------------------------------------------------------------------------------
# Measurement


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], object], repeat: int = 1, cuda: bool = False) -> Tuple[float, int]:
    """(best wall time in s, peak extra memory in bytes) of ``fn()``."""
    best = float("inf")
    peak_extra = 0
    for _ in range(repeat):
        _trim()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        base = _rss()
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.001)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
        peak[0] = max(peak[0], _rss())
        extra = peak[0] - base
        if cuda:
            extra = torch.cuda.max_memory_allocated() - base_cuda
        del out
        best = min(best, dt)
        peak_extra = max(peak_extra, extra)
    return best, peak_extra


def physical_limit(net: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """One forward and ``k`` backward passes (parameter gradients) over ``x``."""
    params = [p for p in net.parameters() if p.requires_grad]
    out = net(x).reshape(x.shape[0], -1)
    grads = None
    for a in range(k):
        grads = torch.autograd.grad(out[:, a].sum(), params, retain_graph=a < k - 1)
    return grads[0]


def run(name: str, m: int, args) -> Dict[str, object]:
    torch.manual_seed(0)
    net, x = build(name, m, args.k, args)
    net, x = net.to(args.device), x.to(args.device)
    net.eval()
    y = torch.randint(0, args.k, (m,)).to(args.device)
    cuda = x.device.type == "cuda"
    nparams = sum(p.numel() for p in net.parameters())
    # warm up every path once (thread pools, allocator)
    empirical_ntk(net, x[:2])
    physical_limit(net, x[:2], args.k)
    r = {"model": name, "m": m, "k": args.k, "params": nparams}
    if cuda:  # warm the full-size kernels too (cuDNN/cuBLAS plans, allocator)
        t0 = time.perf_counter()
        empirical_ntk(net, x, method="auto")
        sketched_jacobian(net, x, args.s, method="auto")
        print(f"  {name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    r["limit_s"], r["limit_mem"] = measure(lambda: physical_limit(net, x, args.k), args.repeat, cuda)
    r["fast_s"], r["fast_mem"] = measure(lambda: empirical_ntk(net, x, method="auto"), args.repeat, cuda)
    r["gram_s"], _ = measure(lambda: gradient_gram(net, "cross_entropy", x, y, method="auto"), args.repeat, cuda)
    r["sketch_s"], r["sketch_mem"] = measure(lambda: sketched_jacobian(net, x, args.s, method="auto"), args.repeat, cuda)
    print(f"  {name}: limit {r['limit_s']:.4f} s, fast {r['fast_s']:.4f} s, sketch {r['sketch_s']:.4f} s", flush=True)
    if args.skip_reference:
        r["ref_s"], r["ref_mem"] = float("nan"), 0
    else:
        r["ref_s"], r["ref_mem"] = measure(lambda: empirical_ntk(net, x, method="reference"), 1, cuda)
    return r


def _mb(b: int) -> str:
    return f"{b / 2**20:.0f}"


def table(rows) -> str:
    head = ("| model | m | k | params | limit (s) | fast NTK (s) | ref NTK (s) | fast/ref | fast/limit "
            "| grad-Gram/limit | sketch/limit | mem limit (MB) | mem fast (MB) | mem sketch (MB) | mem ref (MB) |")
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['m']} | {r['k']} | {r['params']:,} | {r['limit_s']:.3f} | {r['fast_s']:.3f} "
            f"| {r['ref_s']:.3f} | {r['fast_s'] / r['ref_s']:.3f} | {r['fast_s'] / r['limit_s']:.2f} "
            f"| {r['gram_s'] / r['limit_s']:.2f} | {r['sketch_s'] / r['limit_s']:.2f} | {_mb(r['limit_mem'])} "
            f"| {_mb(r['fast_mem'])} | {_mb(r['sketch_mem'])} | {_mb(r['ref_mem'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet18", "transformer"])
    p.add_argument("--m", type=int, default=256, help="probe size for mlp and cnn")
    p.add_argument("--m-big", type=int, default=32, help="probe size for resnet18 and transformer")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--s", type=int, default=1024, help="sketch size")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base width (64 is the original)")
    p.add_argument("--seq", type=int, default=64, help="transformer sequence length")
    p.add_argument("--repeat", type=int, default=2, help="timing repeats (best of) for the fast paths")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--quick", action="store_true", help="m=32, m-big=8, one repeat")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    if args.quick:
        args.m, args.m_big, args.repeat = 32, 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    rows = []
    for name in args.models:
        m = args.m if name in ("mlp", "cnn") else args.m_big
        rows.append(run(name, m, args))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    dev = (torch.cuda.get_device_name() if args.device.startswith("cuda")
           else f"cpu ({torch.get_num_threads()} threads)")
    print(f"\ntorch {torch.__version__}, {dev}, float32, sketch s={args.s}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
