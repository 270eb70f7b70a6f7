"""Where the engine's error comes from: its parameter perturbation or its readout.

For the first K probe samples, trains the coupled leave-one-out runs of ``loo_check.py`` and keeps
their weights, so that the true perturbation ``δ_i = w^(i) − w`` can be set beside the engine's
(exact parameter coordinates). At every measurement it prints, averaged over the K samples:

- ``LOO``: the true gap ``ℓ(w^(i); z_i) − ℓ(w; z_i)``;
- ``LOO lin``: the same gap read out linearly, ``ℓ(f_i + J_i δ_i) − ℓ(f_i)`` with the true δ_i
  (the engine's readout applied to the true perturbation);
- ``engine``: the engine's gap (its δ, its readout);
- ``|δ| ratio``: median over samples of ‖δ_engine‖ / ‖δ_LOO‖, and ``cos`` their median cosine;
- ``|Jδ| ratio``: median of ‖J_i δ_engine‖ / ‖J_i δ_LOO‖ (the own-output perturbation).

If ``LOO lin`` ≈ ``LOO`` and ``engine`` ≫ ``LOO``, the dynamics of δ are at fault; if
``LOO lin`` ≫ ``LOO`` the linear readout is.

    python benchmarks/research/loo_delta.py --config mnist-n500-cnn-ce-sgd --k 32
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from gramhook import GramMonitor, MonitorConfig
from gramhook.kernel import flat_jacobian
from gramhook.losses import resolve_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import accuracy as acc  # noqa: E402
import loo_check as lc  # noqa: E402


def flat(state: Dict[str, torch.Tensor], names: List[str]) -> torch.Tensor:
    return torch.cat([state[n].reshape(-1).double() for n in names])


def _start(cfg, data, args, init_state):
    """Training tensors, and the model and optimizer every run here starts from."""
    xtr, ytr, _, _, feat = data
    model = acc.make_model(cfg, feat)
    model.load_state_dict(init_state)
    return xtr, acc.targets(cfg, ytr), xtr.shape[0], model, acc.make_opt(cfg, model, args.lr)


def _weights(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def monitored(cfg, data, args, init_state, total: int):
    """The monitored run in exact coordinates; weights and engine δ at each measurement."""
    xtr, ttr, n, model, opt = _start(cfg, data, args, init_state)
    every = args.every or max(1, round(total / acc.TARGET_MEASUREMENTS))
    monitor = GramMonitor(model, opt, probe=(xtr, ttr), n_train=n, every=every, probe_size=args.probe_size,
                          seed=args.seed,
                          loss="mse" if cfg.loss == "mse" else "cross_entropy",
                          config=MonitorConfig(engine="periodic", coordinates=args.coordinates, **args.extra))
    snaps = {}

    def snap():
        step = monitor.history[-1].step
        snaps[step] = dict(state=_weights(model),
                           delta=monitor.engine.delta[: args.k].detach().double().clone(),
                           u=monitor.engine._own_outputs(monitor.engine._pending)[: args.k].detach().double().clone(),
                           gaps=monitor.per_sample_gap()[: args.k].double().clone(),
                           time=monitor.history[-1].time)

    seen = len(monitor.history)
    if seen:
        snap()
    gen = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    for idx in acc.minibatches(n, args.batch_size, total, gen):
        opt.zero_grad(set_to_none=True)
        acc.batch_loss(cfg, model(xtr[idx]), ttr[idx]).backward()
        opt.step()
        if len(monitor.history) > seen:
            snap()
            seen = len(monitor.history)
    monitor.close()
    return snaps, monitor.probe.indices[: args.k].tolist()


def loo_states(cfg, data, args, init_state, total: int, drop: int, steps: List[int]):
    """Coupled LOO run without ``drop``; its weights at ``steps``."""
    xtr, ttr, n, model, opt = _start(cfg, data, args, init_state)
    gen = torch.Generator().manual_seed(args.seed + 1)
    want, out, step = set(steps), {}, 0
    if 0 in want:
        out[0] = _weights(model)
    model.train()
    for idx in acc.minibatches(n, args.batch_size, total, gen):
        opt.zero_grad(set_to_none=True)
        keep = idx[idx != drop]
        acc.batch_loss(cfg, model(xtr[keep]), ttr[keep]).backward()
        opt.step()
        step += 1
        if step in want:
            out[step] = _weights(model)
    return out


def median(v: torch.Tensor) -> float:
    v = v[torch.isfinite(v)]
    return float(v.median()) if v.numel() else math.nan


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--probe-size", type=int, default=64)
    p.add_argument("--every", type=int, default=None)
    p.add_argument("--coordinates", default="exact", help="monitor coordinates: exact or a sketch size (δ columns need exact)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: accuracy.py's 0.9)")
    p.add_argument("--set", nargs="*", default=[], help="extra MonitorConfig settings, key=value")
    args = p.parse_args(argv)
    args.coordinates = args.coordinates if args.coordinates == "exact" else int(args.coordinates)
    args.extra = {kv.split("=")[0]: eval(kv.split("=", 1)[1]) for kv in args.set}  # noqa: S307 (bench flag)
    torch.set_num_threads(args.threads)
    if args.momentum is not None:
        make_opt = acc.make_opt
        acc.make_opt = lambda cfg, model, lr: (torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
                                               if cfg.opt == "sgd" else make_opt(cfg, model, lr))
    cfg = lc.config_by_name(args.config, args.epochs)
    data = lc.load(cfg, args.seed)
    xtr, ytr = data[0], data[1]
    ttr = acc.targets(cfg, ytr)
    torch.manual_seed(args.seed)
    model = acc.make_model(cfg, data[4])
    init_state = _weights(model)
    total = cfg.epochs * math.ceil(xtr.shape[0] / args.batch_size)
    snaps, probe_idx = monitored(cfg, data, args, init_state, total)
    steps = sorted(snaps)
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    per_sample = resolve_loss("mse" if cfg.loss == "mse" else "cross_entropy")
    loo = [loo_states(cfg, data, args, init_state, total, j, steps) for j in probe_idx]
    xk, tk = xtr[probe_idx], ttr[probe_idx]
    print(f"# {cfg.name}: K={len(probe_idx)}, coordinates {args.coordinates}, steps {steps[-1]}, every {steps[1] - steps[0]}")
    print("| step | t | LOO | LOO lin | engine | engine/LOO | lin/LOO | |δ| ratio | cos | |Jδ| ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    extra = ["", "first-order rᵀu and second-order ½uᵀΛu of the own-output perturbation (mean over K)", "",
             "| step | LOO rᵀu | LOO ½uᵀΛu | engine rᵀu | engine ½uᵀΛu |", "|---|---|---|---|---|"]
    for s in steps:
        sn = snaps[s]
        model.load_state_dict(sn["state"])
        model.eval()
        jac = flat_jacobian(model, xk, names=names).double()              # (K, k, P)
        with torch.no_grad():
            f = model(xk).reshape(len(probe_idx), -1).double()
            base = per_sample(f, tk)
            w = flat(sn["state"], names)
            g_true, g_lin, nr, cs, jr, parts = [], [], [], [], [], []
            fr = f.clone().requires_grad_(True)
            with torch.enable_grad():
                (res,) = torch.autograd.grad(per_sample(fr, tk).sum(), fr)
            p_soft = torch.softmax(f, 1)
            lam = torch.diag_embed(p_soft) - p_soft[:, :, None] * p_soft[:, None, :] if cfg.loss != "mse" else None
            for i, j in enumerate(probe_idx):
                model.load_state_dict(loo[i][s])
                fi = model(xk[i:i + 1]).reshape(1, -1).double()
                model.load_state_dict(sn["state"])
                d_true = flat(loo[i][s], names) - w
                d_eng = sn["delta"][i]
                g_true.append(float(per_sample(fi, tk[i:i + 1]) - base[i]))
                u = jac[i] @ d_true
                g_lin.append(float(per_sample(f[i:i + 1] + u, tk[i:i + 1]) - base[i]))
                nt = float(d_true.norm())
                exact = d_eng.numel() == d_true.numel()   # δ comparable only in exact coordinates
                nr.append(float(d_eng.norm()) / nt if nt > 0 and exact else math.nan)
                cs.append(float(d_eng @ d_true) / (float(d_eng.norm()) * nt) if exact and nt > 0 and d_eng.norm() > 0 else math.nan)
                ue = sn["u"][i]                            # the engine's own-output perturbation

                def split(v):
                    quad = float(v @ (lam[i] @ v)) / 2 if lam is not None else float(v @ v) / 2
                    return float(res[i] @ v), quad
                parts.append(split(u) + split(ue))
                ju = float(u.norm())
                jr.append(float(ue.norm()) / ju if ju > 0 else math.nan)
        lt, ll, le = sum(g_true) / len(g_true), sum(g_lin) / len(g_lin), float(sn["gaps"].mean())
        pm = torch.tensor(parts).mean(0).tolist() if parts else [math.nan] * 4
        extra.append(f"| {s} | {pm[0]:.4f} | {pm[1]:.4f} | {pm[2]:.4f} | {pm[3]:.4f} |")
        print(f"| {s} | {sn['time']:.1f} | {lt:.4f} | {ll:.4f} | {le:.4f} | {le / lt if lt else math.nan:.2f} | "
              f"{ll / lt if lt else math.nan:.2f} | {median(torch.tensor(nr)):.2f} | {median(torch.tensor(cs)):.2f} | "
              f"{median(torch.tensor(jr)):.2f} |", flush=True)
    print("\n".join(extra))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
