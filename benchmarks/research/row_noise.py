"""Does the noise of the sampled contraction rows bias the per-step engine? Against brute force.

For one ``benchmarks/fidelity.py`` case, two GramMonitors follow the same training run with
independent row and direction draws (A and B). At the end, against brute-force coupled
leave-one-out (float64) on the first K probe samples, it prints the engine/LOO ratio and the
per-sample correlation of

- ``A`` and ``B``: each engine's own gaps ``ℓ(f + u) − ℓ(f)``;
- ``cross``: ``ℓ(f + (u_A + u_B)/2) − ℓ(f) − ⅛ (u_A − u_B)ᵀ Λ (u_A − u_B)``, which removes the
  quadratic bias that the draws' noise adds to a convex loss (E of the subtracted term equals the
  noise's contribution to the first term).

When ``cross`` is much closer to 1 than ``A`` and ``B``, the engine's error is the rows' noise.

Usage::

    python benchmarks/research/row_noise.py digits-mlp-mse-sgdm                      # default rows
    python benchmarks/research/row_noise.py digits-mlp-mse-sgdm --rows 8 none --directions eigen
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

import torch

from gramhook import GramMonitor, MonitorConfig, kernel
from gramhook.losses import output_hessian
from gramhook.optim import whitening


def _fidelity():
    spec = importlib.util.spec_from_file_location("gramhook_bench_fidelity", Path(__file__).resolve().parents[1] / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> None:
    fid = _fidelity()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("case", choices=[c.name for c in fid.CASES])
    p.add_argument("--rows", nargs="+", default=["none"], help="contraction rows per step ('none': half the batch)")
    p.add_argument("--directions", default="signs", choices=["signs", "eigen"])
    p.add_argument("--k", type=int, default=64, help="probe samples retrained")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = next(c for c in fid.CASES if c.name == args.case)
    x, t, classes = fid.load_data(case)
    init = fid.initial_state(case, x, classes)
    batches = fid.epoch_batches(case.n, case.batch, case.epochs, case.seed + 1)
    results = {}
    for rows in [None if r == "none" else int(r) for r in args.rows]:
        model, opt, sched = fid.fresh(case, x, classes, init)
        kw = dict(probe=(x, t), n_train=x.shape[0], loss=case.loss_name, every=10**9, seed=case.seed,
                  config=MonitorConfig(rows=rows, directions=args.directions))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, b = GramMonitor(model, opt, **kw), GramMonitor(model, opt, **kw)
            b._stepper.gen.manual_seed(987654)          # independent draws, same probe and sketch
            fid.train_loop(case, model, opt, sched, x, t, batches)
        pre = whitening(opt, model)
        sketch = None if a.coordinates == "exact" else int(a.coordinates)
        xp, yp = a.probe.x, a.probe.y
        ua, ub = (kernel.tangent_outputs(model, xp, mon.perstep.delta(), s=sketch, seed=case.seed, preconditioner=pre)
                  for mon in (a, b))
        with torch.no_grad(), kernel.eval_mode(model):
            f = model(xp).reshape(xp.shape[0], -1)
        lam = output_hessian(a.loss, f, None, target_like=yp[0])
        loss = lambda o: a.loss(o, yp)
        d = ua - ub
        results[rows] = dict(
            indices=a.probe.indices, A=loss(f + ua) - loss(f), B=loss(f + ub) - loss(f),
            cross=loss(f + (ua + ub) / 2) - loss(f) - torch.einsum("ik,ikl,il->i", d, lam, d) / 8)
        a.close()
        b.close()
    drops = next(iter(results.values()))["indices"][: args.k]
    model = fid.build_model(case, x, classes)
    model.load_state_dict(init)
    loo = fid.coupled_loo(model, fid.per_sample_loss(case), lambda ps: fid.make_optimizer(case, ps), x, t, batches,
                          drops, [len(batches)], make_sched=lambda o: fid.make_scheduler(case, o))
    truth = loo["gaps"][len(batches)]
    print(f"{case.name}: brute-force LOO mean {float(truth.mean()):.4g} (K={drops.numel()}), directions={args.directions}")
    for rows, r in results.items():
        pos = {int(i): j for j, i in enumerate(r["indices"].tolist())}
        sel = torch.tensor([pos[int(i)] for i in drops])
        parts = []
        for key in ("A", "B", "cross"):
            g = r[key][sel].detach().double()
            parts.append(f"{key} {float(g.mean() / truth.mean()):.3f} (corr {fid.pearson(g, truth):.2f})")
        print(f"  rows={'half' if rows is None else rows}: " + "  ".join(parts))


if __name__ == "__main__":
    main()
