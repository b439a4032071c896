"""Topology-aware segmentation: Dice alone against Dice + Betti matching (after Stucki et al., "Topologically
faithful image segmentation via induced matching of persistence barcodes", ICML 2023).

Synthetic curvilinear images (vessel/road-like): a few random smooth curves (3-pixel strokes), some closing
into loops, are the ground truth; the image shows them with varying contrast, with gaps (stretches of a
curve erased from the image but not from the label), background blobs and Gaussian noise. A small fully convolutional
network (dilated 3x3 convolutions) predicts foreground probabilities.

Both runs share a Dice-only warm-up and then continue from the same weights on the same batches, one with
Dice alone, one with lossforge.nn.DiceBettiMatchingLoss (Dice + alpha * the Betti matching loss on the
superlevel filtration of the probabilities). On held-out images the script reports Dice, the Betti
number errors |beta_0(pred) - beta_0(gt)| and |beta_1(pred) - beta_1(gt)| (lossforge.betti_number_error) and
the Betti matching error (lossforge.betti_matching_error, unmatched bars), all after thresholding at 0.5.
What to expect (the paper's headline): comparable Dice, fewer topological errors with the Betti matching term.

    PYTHONPATH=python python examples/betti_matching_segmentation.py [--quick] [--steps 500]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import lossforge

# examples/_report.py: examples/ is on sys.path when a script runs
from _report import Report, machine, pyplot, save


# ---- data -------------------------------------------------------------------------------------------


def curve_points(size: int, gen: torch.Generator) -> torch.Tensor:
    """A smooth random curve: a random walk of the heading; one in three closes into a loop."""
    n = 6 * size
    if torch.rand((), generator=gen) < 1 / 3:  # a wobbly closed loop around a random centre
        t = torch.linspace(0, 2 * math.pi, n)
        r = size * (0.12 + 0.12 * torch.rand((), generator=gen))
        k = torch.randn(3, generator=gen) * 0.15
        rad = r * (1 + k[0] * torch.sin(2 * t + k[1]) + k[2] * torch.cos(3 * t))
        c = size * (0.3 + 0.4 * torch.rand(2, generator=gen))
        return torch.stack([c[0] + rad * torch.cos(t), c[1] + rad * torch.sin(t)], 1)
    heading = 2 * math.pi * torch.rand((), generator=gen) + torch.cumsum(0.08 * torch.randn(n, generator=gen), 0)
    start = size * torch.rand(2, generator=gen)
    step = 0.5 * torch.stack([torch.cos(heading), torch.sin(heading)], 1)
    return start + torch.cumsum(step, 0)


def render(points: torch.Tensor, size: int) -> torch.Tensor:
    """The pixels of the curve samples (0.5 px apart), dilated to a 3-pixel-wide stroke."""
    ij = points.round().long()
    inside = ((ij >= 0) & (ij < size)).all(1)
    img = torch.zeros(size * size)
    img[ij[inside, 1] * size + ij[inside, 0]] = 1.0
    return F.max_pool2d(img.view(1, 1, size, size), 3, 1, 1)[0, 0]


def sample(size: int, gen: torch.Generator):
    label = torch.zeros(size, size)
    image = torch.zeros(size, size)
    for _ in range(int(torch.randint(3, 6, (), generator=gen))):
        pts = curve_points(size, gen)
        label = torch.maximum(label, render(pts, size))
        # the image: the same curve with gaps (1-3 erased stretches) and a random contrast
        keep = torch.ones(len(pts), dtype=torch.bool)
        for _ in range(int(torch.randint(1, 4, (), generator=gen))):
            a = int(torch.randint(0, len(pts), (), generator=gen))
            keep[a:a + int(torch.randint(size // 8, size // 3, (), generator=gen))] = False
        seen = render(pts[keep], size) if keep.any() else torch.zeros(size, size)
        image = torch.maximum(image, seen * (0.35 + 0.5 * float(torch.rand((), generator=gen))))
    # background: smooth blobs and pixel noise
    blobs = F.avg_pool2d(torch.randn(1, 1, size, size, generator=gen), 9, 1, 4)[0, 0] * 2.0
    image = image + 0.3 * blobs + 0.4 * torch.randn(size, size, generator=gen)
    return image, label


def batch(b: int, size: int, gen: torch.Generator):
    xs, ys = zip(*(sample(size, gen) for _ in range(b)))
    return torch.stack(xs)[:, None], torch.stack(ys)[:, None]


# ---- model and metrics --------------------------------------------------------------------------------


def network(width: int = 16) -> torch.nn.Module:
    layers, c = [], 1
    for dil in (1, 2, 4, 8, 1):
        layers += [torch.nn.Conv2d(c, width, 3, padding=dil, dilation=dil), torch.nn.ReLU()]
        c = width
    layers += [torch.nn.Conv2d(c, 1, 1), torch.nn.Sigmoid()]
    return torch.nn.Sequential(*layers)


def dice_loss(p, t, smooth=1e-5):
    inter = (p * t).sum((2, 3))
    return (1 - (2 * inter + smooth) / (p.sum((2, 3)) + t.sum((2, 3)) + smooth)).mean()


def evaluate(model, xs, ys):
    with torch.no_grad():
        p = model(xs)
    hard = (p >= 0.5).float()
    dice = (1 - dice_loss(hard, ys)).item()
    b0 = lossforge.betti_number_error(p, ys, dims=(1.0, 0.0)).mean().item()
    b1 = lossforge.betti_number_error(p, ys, dims=(0.0, 1.0)).mean().item()
    bm = lossforge.betti_matching_error(p, ys).mean().item()
    return dice, b0, b1, bm


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (32x32 images, a few steps) for the tests")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=300, help="shared Dice-only steps")
    ap.add_argument("--steps", type=int, default=500, help="steps after the warm-up, per run")
    ap.add_argument("--alpha", type=float, default=0.01, help="weight of the Betti matching term")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.warmup, args.steps, args.test = 32, 4, 5, 5, 8
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    report = Report("betti_matching_segmentation")
    say = report.say
    say(f"curvilinear segmentation: {args.size}x{args.size} images, batch {args.batch}, {args.warmup} shared "
        f"Dice steps then {args.steps} steps per run, Adam lr {args.lr}, alpha {args.alpha}")
    say(f"machine: {machine()}")

    xs_test, ys_test = batch(args.test, args.size, torch.Generator().manual_seed(10_000 + args.seed))
    torch.manual_seed(args.seed)
    model = network()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.warmup):
        x, y = batch(args.batch, args.size, gen)
        loss = dice_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    say("after the Dice warm-up: Dice {:.3f}  |b0 err| {:.2f}  |b1 err| {:.2f}  Betti matching error {:.2f}".format(
        *evaluate(model, xs_test, ys_test)))
    start_model, start_opt = model.state_dict(), opt.state_dict()
    data_state = gen.get_state()
    results, curves = {}, {}
    for name, fn in (("Dice", lambda p, t: dice_loss(p, t)),
                     ("Dice + Betti matching", lossforge.nn.DiceBettiMatchingLoss(alpha=args.alpha))):
        model = network()
        model.load_state_dict(start_model)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        opt.load_state_dict(start_opt)
        gen = torch.Generator()
        gen.set_state(data_state)
        curve, t0 = [], time.perf_counter()
        for step in range(args.steps):
            x, y = batch(args.batch, args.size, gen)
            loss = fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
                curve.append((args.warmup + step + 1, evaluate(model, xs_test[:16], ys_test[:16])))
        sec = time.perf_counter() - t0
        results[name] = evaluate(model, xs_test, ys_test)
        curves[name] = (curve, model)
        say("{:22s} Dice {:.3f}  |b0 err| {:.2f}  |b1 err| {:.2f}  Betti matching error {:.2f}  ({:.1f} s)".format(
            name, *results[name], sec))
    say(f"wall time {time.perf_counter() - t_start:.1f} s")
    a, b = results["Dice"], results["Dice + Betti matching"]
    say(f"SUMMARY betti_matching_segmentation: Dice {a[0]:.3f} -> {b[0]:.3f}, Betti number error (b0+b1) "
        f"{a[1] + a[2]:.2f} -> {b[1] + b[2]:.2f}, Betti matching error {a[3]:.2f} -> {b[3]:.2f} "
        f"(Dice alone -> Dice + Betti matching)")
    if not args.quick:
        report.write(argv)
        plot(curves, xs_test, ys_test, report.path(".png"))


def plot(curves, xs, ys, path):
    plt = pyplot()

    fig, axes = plt.subplots(2, 4, figsize=(13, 6.5))
    for name, (curve, _) in curves.items():
        steps = [s for s, _ in curve]
        axes[0, 0].plot(steps, [m[0] for _, m in curve], label=name)
        axes[0, 1].plot(steps, [m[1] + m[2] for _, m in curve], label=name)
    axes[0, 0].set(xlabel="step", ylabel="Dice (16 held-out images)")
    axes[0, 1].set(xlabel="step", ylabel="Betti number error b0 + b1")
    axes[0, 0].legend(fontsize=8)
    i = 0
    with torch.no_grad():
        preds = {name: m(xs[i:i + 1])[0, 0] for name, (_, m) in curves.items()}
    axes[0, 2].imshow(xs[i, 0], cmap="gray")
    axes[0, 2].set_title("image")
    axes[0, 3].imshow(ys[i, 0], cmap="gray")
    axes[0, 3].set_title("ground truth")
    for ax, (name, p) in zip(axes[1, :2], preds.items()):
        ax.imshow(p, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
    for ax, (name, p) in zip(axes[1, 2:], preds.items()):
        ax.imshow((p >= 0.5).float(), cmap="gray")
        ax.set_title(name + " (>= 0.5)")
    for ax in list(axes[0, 2:]) + list(axes[1]):
        ax.axis("off")
    save(fig, path, dpi=100)


if __name__ == "__main__":
    main()
