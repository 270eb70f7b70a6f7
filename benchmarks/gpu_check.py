"""Correctness of the kernels and the monitor on a CUDA device; prints a table, exits 1 on a failure.

The test suite runs on CPU (CI has no GPU). This script repeats its GPU-relevant checks on
``--device`` (default ``cuda``; ``cpu`` works too, for a dry run):

- fast against reference (float64): the NTK, a cross-kernel, the NTK with an Adam-style diagonal
  preconditioner, the cross-entropy gradient Gram and the flat Jacobian, for the benchmark models
  of ``benchmarks/kernels.py`` (MLP, small CNN, ResNet-18 layout, 4-layer transformer encoder);
  tolerance 1e-6 relative (Frobenius);
- sketched Jacobians: ``‖ĴĴᵀ − Θ‖_F`` over its Johnson–Lindenstrauss scale; sketched
  vector–Jacobian products (``cotangents``) against the contracted full sketch
  ``sqrt((‖Θ‖²_F + tr(Θ)²)/s)`` (≈ 1 for an unbiased sketch; bound 3);
- autocast (bf16 and fp16) against float32: relative error of the NTK (bound 5e-2);
- the monitor on the device: 40 SGD steps of the demo CNN with a GramMonitor (every=5) against the
  same run without it, under ``torch.use_deterministic_algorithms``: parameters bitwise equal,
  finite history, the probe on the device.

Usage::

    python benchmarks/gpu_check.py                 # on cuda
    python benchmarks/gpu_check.py --device cpu    # dry run
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import build  # noqa: E402

from gramhook import GramMonitor  # noqa: E402
from gramhook.data import mnist_tensors  # noqa: E402
from gramhook.training import train as train_loop  # noqa: E402
from gramhook.zoo import small_cnn  # noqa: E402
from gramhook.kernel import empirical_ntk, flat_jacobian, gradient_gram, sketched_jacobian  # noqa: E402

TOL = 1e-6
AMP_TOL = 5e-2


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def kernel_rows(device: str, m: int, s: int):
    args = argparse.Namespace(width=8, seq=16)
    rows = []
    for name in ("mlp", "cnn", "resnet18", "transformer"):
        net, x = build(name, m, 10, args)
        net = net.to(device=device, dtype=torch.float64).eval()
        x = x.to(device) if not x.is_floating_point() else x.to(device, torch.float64)
        x1, x2 = x[: m // 2], x[m // 2:]
        y = torch.randint(0, 10, (m,), generator=torch.Generator().manual_seed(1)).to(device)
        g = torch.Generator().manual_seed(2)
        pre = {n: (torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5).to(device)
               for n, p in net.named_parameters()}
        checks = {
            "ntk": lambda method: empirical_ntk(net, x, method=method),
            "cross": lambda method: empirical_ntk(net, x1, x2, method=method),
            "ntk+adam": lambda method: empirical_ntk(net, x, preconditioner=pre, method=method),
            "gram ce": lambda method: gradient_gram(net, "cross_entropy", x, y, method=method),
            "jacobian": lambda method: flat_jacobian(net, x, method=method),
        }
        for what, fn in checks.items():
            err = rel(fn("auto"), fn("reference"))
            rows.append((name, what, err, err < TOL))
        theta = empirical_ntk(net, x, method="reference").reshape(m * 10, m * 10)
        j = sketched_jacobian(net, x, s, seed=3, method="auto").reshape(m * 10, s)
        # A JL sketch has E‖ĴĴᵀ − Θ‖²_F ≈ (‖Θ‖²_F + tr(Θ)²)/s: this ratio is ≈ 1 when unbiased.
        scale = math.sqrt((float(theta.norm()) ** 2 + float(theta.trace()) ** 2) / s)
        z = float((j @ j.T - theta).norm()) / scale
        rows.append((name, f"sketch s={s}: err / JL scale", z, z < 3.0))
        # Sketched vector–Jacobian products (the monitor's reference rows) against the full sketch.
        cot = torch.randn(m, 2, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
        full = sketched_jacobian(net, x, s, seed=3, method="auto")
        vjp = sketched_jacobian(net, x, s, seed=3, method="auto", cotangents=cot)
        err = rel(vjp, torch.einsum("mqk,mks->mqs", cot, full))
        rows.append((name, "sketch cotangents = contracted sketch", err, err < TOL))
        net32 = net.float()
        x32 = x.float() if x.is_floating_point() else x
        want = empirical_ntk(net32, x32)
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(torch.device(device).type, dtype=dtype):
                got = empirical_ntk(net32, x32)
            err = rel(got.float(), want)
            rows.append((name, f"autocast {str(dtype)[6:]}", err, got.dtype == torch.float32 and err < AMP_TOL))
    return rows


def train(device: str, monitored: bool, steps: int = 40):
    torch.manual_seed(0)
    x, y, _, _ = mnist_tensors(n_train=256, seed=0)
    x, y = x.to(device), y.to(device)
    model = small_cnn().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = GramMonitor(model, opt, probe=(x, y), n_train=256, loss="cross_entropy", every=5,
                          probe_size=64) if monitored else None
    gen = torch.Generator().manual_seed(1)
    batches = (torch.randint(0, 256, (32,), generator=gen).to(device) for _ in range(steps))
    train_loop(model, opt, x, y, loss=F.cross_entropy, batches=batches)
    if monitor is not None:
        monitor.close()
    return model, monitor


def monitor_rows(device: str):
    # cuDNN's default convolution backward is not deterministic (two unmonitored runs differed by
    # 2e-5 after 40 steps on an H200), so compare under deterministic algorithms.
    if torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    plain, _ = train(device, False)
    watched, monitor = train(device, True)
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(plain.parameters(), watched.parameters()))
    hist = monitor.history
    finite = all(math.isfinite(r.predicted_test_loss) for r in hist)
    on_device = monitor.probe.x.device.type == torch.device(device).type
    return [
        ("demo cnn", "params vs unmonitored (max abs)", diff, diff < 1e-5),
        ("demo cnn", f"{len(hist)} measurements finite", float(finite), finite and len(hist) == 9),
        ("demo cnn", "probe on device", float(on_device), on_device),
        ("demo cnn", "s / measurement (median)", sorted(r["monitor_seconds"] for r in hist)[len(hist) // 2], True),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--s", type=int, default=4096)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    rows = kernel_rows(args.device, args.m, args.s) + monitor_rows(args.device)
    dev = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"\ntorch {torch.__version__}, {dev}\n")
    print("| model | check | value | ok |\n|---|---|---|---|")
    for model, what, value, ok in rows:
        print(f"| {model} | {what} | {value:.3g} | {'yes' if ok else 'NO'} |")
    failed = [r for r in rows if not r[3]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
