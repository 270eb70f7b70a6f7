"""How far first-order coupled leave-one-out can follow Adam, with every approximation of the
engine removed: float64, exact coordinates, every sample tracked, the whole batch's curvature.

sklearn digits (n = 400, 8×8 images), CE, Adam lr 2e-3, batch 32, 25 epochs; brute-force coupled
leave-one-out on the first K samples. The recursion of docs/theory.md §9 is run with Adam's
second moment treated four ways:

- ``frozen``: P = 1/(√v̂ + ε) read at each step, v unperturbed;
- ``fold``: P shrunk by 1 − m̂²/(√v̂(√v̂ + ε)), the engine's default (``gramhook.optim``);
- ``dv``: both moments linearized, δv ← β₂ δv + (1 − β₂)·2g⊙δg;
- ``nonlinear``: both moments followed exactly, v + δv = EMA of (g + δg)²;

and, with ``--hessian``, the batch's full Hessian in place of its Gauss–Newton matrix (with ``dv``).
``--optimizer sgd`` (momentum 0.9, lr 0.05) runs the same comparison without Adam.

    python benchmarks/research/adam_first_order.py --model gncnn     # GroupNorm CNN
    python benchmarks/research/adam_first_order.py --model cnn       # the same CNN, no normalisation
    python benchmarks/research/adam_first_order.py --model gncnn --hessian
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, jvp, vmap

B1, B2, EPS = 0.9, 0.999, 1e-8


def data(n: int):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))[:n]
    return x[perm].reshape(-1, 1, 8, 8), torch.tensor(y)[perm]


def make(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    norm = (lambda c: nn.GroupNorm(4, c)) if kind == "gncnn" else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), norm(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), norm(16), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 16, 10))


class Problem:
    def __init__(self, args):
        self.x, self.y = data(args.n)
        self.args = args
        torch.manual_seed(0)
        self.init = copy.deepcopy(make(args.model).state_dict())
        g = torch.Generator().manual_seed(0)
        self.batches = [p[b:b + args.batch] for p in [torch.randperm(args.n, generator=g) for _ in range(args.epochs)]
                        for b in range(0, args.n, args.batch)]

    def fresh(self) -> nn.Module:
        m = make(self.args.model)
        m.load_state_dict(self.init)
        return m

    def optimizer(self, m: nn.Module):
        if self.args.optimizer == "sgd":
            return torch.optim.SGD(m.parameters(), lr=self.args.lr, momentum=0.9)
        return torch.optim.Adam(m.parameters(), lr=self.args.lr, betas=(B1, B2), eps=EPS)

    def train(self, drop=None) -> nn.Module:
        m = self.fresh()
        opt = self.optimizer(m)
        for idx in self.batches:
            if drop is not None:
                idx = idx[idx != drop]
            opt.zero_grad()
            F.cross_entropy(m(self.x[idx]), self.y[idx]).backward()
            opt.step()
        return m


def flat_jacobian(model: nn.Module, xb):
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = vmap(jacrev(lambda p, x: functional_call(model, p, (x[None],))[0]), in_dims=(None, 0))(params, xb)
    return torch.cat([jac[k].reshape(xb.shape[0], 10, -1) for k in params], -1)


def hessian_products(model: nn.Module, xb, yb, vectors):
    """``∇²L_B v`` for each row of ``vectors`` (the batch's mean CE, full Hessian)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    sizes = [v.numel() for v in params.values()]
    g = grad(lambda p: F.cross_entropy(functional_call(model, p, (xb,)), yb))

    def one(v):
        tangent = {k: t.reshape(params[k].shape) for k, t in zip(params, v.split(sizes))}
        return torch.cat([h.reshape(-1) for h in jvp(g, (params,), (tangent,))[1].values()])
    return vmap(one)(vectors)


def adam_response(moments: str, t: int, M, V, dM, dV):
    """The change of Adam's step ``m̂/(√v̂ + ε)`` caused by the moment perturbations ``dM``, ``dV``."""
    c1, c2 = 1 - B1 ** t, 1 - B2 ** t
    mh, vh = M / c1, V / c2
    den = vh.sqrt() + EPS
    if moments == "nonlinear":
        return ((M + dM) / c1) / (((V + dV) / c2).clamp(min=0).sqrt() + EPS) - mh / den
    step = (dM / c1) / den
    if moments == "dv":
        return step - mh * (dV / c2) / (2 * vh.sqrt().clamp(min=1e-30) * den ** 2)
    if moments == "fold":
        return step * (1 - (mh * mh / (vh.sqrt() * den).clamp(min=1e-30)).clamp(0, 1))
    return step


def recursion(pb: Problem, moments: str, hessian: bool):
    n, lr = pb.args.n, pb.args.lr
    m = pb.fresh()
    opt = pb.optimizer(m)
    P = sum(v.numel() for v in m.parameters())
    D, dM, dV = torch.zeros(n, P), torch.zeros(n, P), torch.zeros(n, P)
    M, V = torch.zeros(P), torch.zeros(P)
    for t, idx in enumerate(pb.batches, start=1):
        B, xb, yb = len(idx), pb.x[idx], pb.y[idx]
        jb = flat_jacobian(m, xb)
        with torch.no_grad():
            pr = m(xb).softmax(-1)
        grads = torch.einsum("bk,bkp->bp", pr - F.one_hot(yb, 10), jb)
        if hessian:
            dG = hessian_products(m, xb, yb, D)
            for a, i in enumerate(idx.tolist()):
                dG[i] -= hessian_products(m, xb[a:a + 1], yb[a:a + 1], D[i:i + 1])[0] / B
        else:
            lam = torch.diag_embed(pr) - pr[:, :, None] * pr[:, None, :]
            dG = torch.einsum("bkp,bkl,nbl->np", jb, lam, torch.einsum("bkp,np->nbk", jb, D)) / B
            for a, i in enumerate(idx.tolist()):
                dG[i] -= jb[a].T @ (lam[a] @ (jb[a] @ D[i])) / B
        total = grads.sum(0)
        for a, i in enumerate(idx.tolist()):
            dG[i] += ((total - grads[a]) / (B - 1) - grads[a]) / B
        if pb.args.optimizer == "sgd":   # heavy-ball momentum 0.9; torch's first buffer is the gradient
            dM = dG if t == 1 else 0.9 * dM + dG
            D = D - lr * dM
        else:
            gb = grads.mean(0)
            M, V = B1 * M + (1 - B1) * gb, B2 * V + (1 - B2) * gb * gb
            dM = B1 * dM + (1 - B1) * dG
            dV = B2 * dV + (1 - B2) * (2 * gb * dG + (dG * dG if moments == "nonlinear" else 0))
            D = D - lr * adam_response(moments, t, M, V, dM, dV)
        opt.zero_grad()
        F.cross_entropy(m(xb), yb).backward()
        opt.step()
    with torch.no_grad():
        f = m(pb.x)
    u = torch.einsum("nkp,np->nk", flat_jacobian(m, pb.x), D)
    return F.cross_entropy(f + u, pb.y, reduction="none") - F.cross_entropy(f, pb.y, reduction="none")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gncnn", choices=["mlp", "cnn", "gncnn"])
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--k", type=int, default=64, help="samples retrained by brute force")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="sgd: momentum 0.9")
    p.add_argument("--lr", type=float, default=None, help="default 2e-3 (Adam), 0.05 (SGD)")
    p.add_argument("--hessian", action="store_true", help="the full batch Hessian (with dv) instead")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 0.05 if args.optimizer == "sgd" else 2e-3
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pb = Problem(args)
    start = time.time()
    full = pb.train()
    base = F.cross_entropy(full(pb.x), pb.y, reduction="none").detach()
    loo = torch.tensor([float((F.cross_entropy(pb.train(i)(pb.x[i:i + 1]), pb.y[i:i + 1]) - base[i]).detach())
                        for i in range(args.k)])
    print(f"{args.model}, {args.optimizer} lr {args.lr}: brute-force LOO {loo.mean():.4f} ± {loo.std() / args.k ** .5:.4f} "
          f"({time.time() - start:.0f} s)")
    treatments = ["dv"] if args.hessian else ["frozen", "fold", "dv", "nonlinear"]
    for moments in (["sgd"] if args.optimizer == "sgd" else treatments):
        start = time.time()
        gaps = recursion(pb, moments, args.hessian)[: args.k]
        corr = float(torch.corrcoef(torch.stack([gaps, loo]))[0, 1])
        label = f"{moments}{' (full Hessian)' if args.hessian else ''}"
        print(f"  {label}: gap {gaps.mean():.4f}, ratio {gaps.mean() / loo.mean():.2f}, corr {corr:.2f} "
              f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
