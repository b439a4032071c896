"""Point-cloud autoencoders trained with sliced Wasserstein distances (after Nguyen et al., "Point-set
distances for learning representations of 3D point clouds", ICCV 2021).

Synthetic shapes (sphere, torus and cube surfaces, randomly scaled and rotated about the z axis, N points
each; N = 2,048 in full mode) are encoded by a PointNet (shared per-point MLP + max pool) into a 128-d code and decoded
by an MLP into N points. Three autoencoders start from the same weights and are trained with Adam on
the same batches, with the reconstruction loss

  * SW     : lossforge.sliced_wasserstein (L = 100 random directions, SW_2),
  * Max-SW : lossforge.max_sliced_wasserstein (one direction found by projected Adam ascent),
  * v-DSW  : lossforge.distributional_sliced_wasserstein (vMF directions around an ascended location).

Evaluation on held-out shapes: Chamfer distance (mean squared nearest-neighbour distance, both ways) and
an EMD-style distance, the exact W_2 between random subsamples of 256 points of the reconstruction and
the input (POT's ot.emd2; skipped if POT is not installed). Timing: forward + backward of the SW_2 loss
on one training batch, lossforge against the plain eager torch recipe (project, sort, compare).

    PYTHONPATH=python python examples/sliced_wasserstein_autoencoder.py [--quick] [--steps 300]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import lossforge

# examples/_report.py: examples/ is on sys.path when a script runs
from _report import Report, machine, pyplot, save

SHAPES = ("sphere", "torus", "cube")


# ---- data -------------------------------------------------------------------------------------------


def z_rotation(gen: torch.Generator) -> torch.Tensor:
    a = 2 * math.pi * float(torch.rand((), generator=gen))
    return torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def shape_cloud(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "sphere":
        x = torch.randn(n, 3, generator=gen)
        x = x / x.norm(dim=1, keepdim=True)
    elif kind == "torus":  # major radius 0.7, minor 0.3; area-uniform by rejection on the minor angle
        u = 2 * math.pi * torch.rand(4 * n, generator=gen)
        v = 2 * math.pi * torch.rand(4 * n, generator=gen)
        keep = torch.rand(4 * n, generator=gen) < (0.7 + 0.3 * torch.cos(v)) / 1.0
        u, v = u[keep][:n], v[keep][:n]
        x = torch.stack([(0.7 + 0.3 * torch.cos(v)) * torch.cos(u), (0.7 + 0.3 * torch.cos(v)) * torch.sin(u),
                         0.3 * torch.sin(v)], 1)
    else:  # cube surface: a random face, a uniform point on it
        x = 2 * torch.rand(n, 3, generator=gen) - 1
        axis = torch.randint(0, 3, (n,), generator=gen)
        side = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
        x[torch.arange(n), axis] = side
        x = x * 0.6
    # a random size and a random rotation about the z axis (full 3D rotations need far more training)
    scale = 0.7 + 0.6 * torch.rand((), generator=gen)
    return scale * x @ z_rotation(gen).T


def batch(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    kinds = torch.randint(0, len(SHAPES), (b,), generator=gen)
    return torch.stack([shape_cloud(SHAPES[k], n, gen) for k in kinds.tolist()])


# ---- model ------------------------------------------------------------------------------------------


class AutoEncoder(torch.nn.Module):
    def __init__(self, n_points: int, code: int = 128, width: int = 256):
        super().__init__()
        self.n = n_points
        self.enc = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.ReLU(), torch.nn.Linear(64, 128),
                                       torch.nn.ReLU(), torch.nn.Linear(128, code))
        self.dec = torch.nn.Sequential(torch.nn.Linear(code, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                       torch.nn.ReLU(), torch.nn.Linear(width, 3 * n_points))

    def forward(self, x):  # [B, N, 3] -> [B, N, 3]
        z = self.enc(x).max(dim=1).values
        return self.dec(z).view(x.shape[0], self.n, 3)


# ---- losses and metrics ------------------------------------------------------------------------------


def torch_sw2(x, y, n_projections, gen):
    """The eager torch recipe of SW_2 (equal sizes, uniform weights): project, sort, compare."""
    theta = torch.randn(x.shape[-1], n_projections, generator=gen)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=1)
    py, _ = torch.sort(y @ theta, dim=1)
    return (px - py).square().mean(dim=(1, 2)).sqrt().mean()


def chamfer(x, y):
    d = torch.cdist(x, y).square()
    return (d.min(2).values.mean(1) + d.min(1).values.mean(1)).mean().item()


def emd(x, y, k, gen):
    try:
        import ot
    except ImportError:  # POT not installed: Chamfer only
        return None
    vals = []
    for a, b in zip(x, y):
        a = a[torch.randperm(a.shape[0], generator=gen)[:k]].double().numpy()
        b = b[torch.randperm(b.shape[0], generator=gen)[:k]].double().numpy()
        w = ot.unif(k)
        vals.append(math.sqrt(ot.emd2(w, w, ot.dist(a, b))))
    return sum(vals) / len(vals)


def fmt(value) -> str:
    return "n/a (no POT)" if value is None else f"{value:.4f}"


def make_loss(kind: str, gen: torch.Generator, iters: int):
    if kind == "SW":
        return lambda r, x: lossforge.sliced_wasserstein(r, x, n_projections=100, generator=gen)
    if kind == "Max-SW":
        return lambda r, x: lossforge.max_sliced_wasserstein(r, x, n_iters=iters, generator=gen)
    return lambda r, x: lossforge.distributional_sliced_wasserstein(r, x, kappa=10.0, n_projections=20,
                                                                    n_iters=iters, generator=gen)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (256 points, 8 steps) for the tests")
    ap.add_argument("--points", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ascent-iters", type=int, default=10, help="n_iters of Max-SW's and v-DSW's ascent")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test", type=int, default=30, help="held-out shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.points, args.batch, args.steps, args.test = 256, 4, 8, 6
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    report = Report("sliced_wasserstein_autoencoder")
    say = report.say
    say(f"autoencoder: {args.points} points per shape ({', '.join(SHAPES)}), batch {args.batch}, "
        f"{args.steps} Adam steps (lr {args.lr}), ascent iterations {args.ascent_iters}")
    say(f"machine: {machine()}")

    test = batch(args.test, args.points, torch.Generator().manual_seed(10_000 + args.seed))
    torch.manual_seed(args.seed)
    init = AutoEncoder(args.points).state_dict()
    # the subsampling noise of the EMD estimate: two disjoint 256-point subsamples of the same input
    floor = emd(test[:, ::2], test[:, 1::2], min(256, args.points // 2), torch.Generator().manual_seed(3))
    say(f"EMD(256-pt W2) between two halves of the same input cloud (the estimate's floor): {fmt(floor)}")
    results, curves = {}, {}
    for kind in ("SW", "Max-SW", "v-DSW"):
        model = AutoEncoder(args.points)
        model.load_state_dict(init)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        data_gen = torch.Generator().manual_seed(args.seed)  # the same batches for every loss
        loss_fn = make_loss(kind, torch.Generator().manual_seed(args.seed + 1), args.ascent_iters)
        curve, times = [], []
        for step in range(args.steps):
            x = batch(args.batch, args.points, data_gen)
            t0 = time.perf_counter()
            loss = loss_fn(model(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            if step % max(1, args.steps // 30) == 0 or step == args.steps - 1:
                with torch.no_grad():
                    curve.append((step, chamfer(model(test[:8]), test[:8])))
        with torch.no_grad():
            rec = model(test)
        results[kind] = (chamfer(rec, test), emd(rec, test, min(256, args.points), torch.Generator().manual_seed(3)),
                         sorted(times)[len(times) // 2])
        curves[kind] = curve
        say(f"{kind:7s} held-out Chamfer {results[kind][0]:.4f}  EMD(256-pt W2) {fmt(results[kind][1])}  "
            f"median train step {results[kind][2] * 1e3:7.1f} ms")

    # SW_2 loss alone, forward + backward: lossforge against the eager torch recipe
    x = batch(args.batch, args.points, torch.Generator().manual_seed(5))
    y = batch(args.batch, args.points, torch.Generator().manual_seed(6))
    timing = {}
    for name, fn in (("lossforge.sliced_wasserstein", lambda a, b, g: lossforge.sliced_wasserstein(
            a, b, n_projections=100, generator=g)), ("torch recipe (project, sort, compare)",
                                                     lambda a, b, g: torch_sw2(a, b, 100, g))):
        ts = []
        for _ in range(3 if args.quick else 15):
            a = x.clone().requires_grad_(True)
            t0 = time.perf_counter()
            fn(a, y, torch.Generator().manual_seed(7)).backward()
            ts.append(time.perf_counter() - t0)
        timing[name] = sorted(ts)[len(ts) // 2]
        say(f"SW_2 loss forward+backward, [{args.batch}, {args.points}, 3], L=100: {name:38s} "
            f"{timing[name] * 1e3:7.2f} ms")
    # the two agree on the same directions (a sanity check of the comparison)
    th = lossforge.random_projections(3, 100, generator=torch.Generator().manual_seed(7))
    ours = lossforge.sliced_wasserstein(x, y, projections=th, reduction="none")
    px, py = torch.sort(x @ th, dim=1)[0], torch.sort(y @ th, dim=1)[0]
    ref = (px - py).square().mean(dim=(1, 2)).sqrt()
    say(f"same directions: max |lossforge - torch recipe| = {(ours - ref).abs().max().item():.2e}")
    say(f"wall time {time.perf_counter() - t_start:.1f} s")
    speed = timing["torch recipe (project, sort, compare)"] / timing["lossforge.sliced_wasserstein"]
    say("SUMMARY sliced_wasserstein_autoencoder: held-out Chamfer / EMD: " +
        "; ".join(f"{k} {v[0]:.4f} / {fmt(v[1])}" for k, v in results.items()) +
        f"; SW_2 loss step {speed:.2f}x the torch recipe's speed")
    if not args.quick:
        report.write(argv)
        plot(curves, model, args.points, report.path(".png"))


def plot(curves, model, n_points, path):
    plt = pyplot()

    fig = plt.figure(figsize=(14, 6))
    ax = fig.add_subplot(1, 4, 1)
    for kind, curve in curves.items():
        ax.plot(*zip(*curve), label=kind)
    ax.set(xlabel="step", ylabel="held-out Chamfer", yscale="log", title="reconstruction")
    ax.legend()
    gen = torch.Generator().manual_seed(123)
    clouds = torch.stack([shape_cloud(kind, n_points, gen) for kind in SHAPES])
    with torch.no_grad():
        recs = model(clouds)
    for i, kind in enumerate(SHAPES):
        for row, (pts, title) in enumerate(((clouds[i], f"new {kind}"), (recs[i], "v-DSW autoencoder"))):
            ax = fig.add_subplot(2, 4, 2 + i + 4 * row, projection="3d")
            ax.scatter(*pts.T.numpy(), s=0.5)
            ax.set_title(title, fontsize=9)
            ax.set_box_aspect((1, 1, 1))
            for lim in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
                lim(-1.3, 1.3)
    save(fig, path, dpi=110)


if __name__ == "__main__":
    main()
