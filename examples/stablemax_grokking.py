"""Grokking without weight decay: StableMax CE and ⊥Grad against Softmax Collapse (Prieto et al., ICLR 2025).

Modular addition (a + b) mod p, p = 113, 40% of the p² pairs for training, float32, full batch, no
weight decay. The model is the paper's MLP: the one-hot codes of a and b, concatenated (equivalently a
learned embedding of each operand, summed), two ReLU hidden layers of width 200, and a linear readout
of p logits. Four runs from the same initial weights, AdamW (lr 0.01, weight_decay 0):

  * AdamW + softmax CE            : the baseline. It memorises the training set and then scales its
                                    logits (naive loss minimisation) until float32 rounds the loss of
                                    the training rows to exactly 0 (Softmax Collapse, tracked with
                                    lossforge.collapse_fraction): test accuracy stays low.
  * AdamW + StableMax CE          : lossforge.stablemax_cross_entropy; the logits grow slowly (s(x) is
                                    linear, not exponential), no collapse.
  * ⊥Grad(AdamW) + softmax CE      : lossforge.optim.OrthoGrad removes the gradient's component along the
  * ⊥Grad(AdamW) + StableMax CE    : weights (the NLM direction): the models generalise quickly.

The summary line gives the epoch at which each run first reaches 90% test accuracy (or "never").

    PYTHONPATH=python python examples/stablemax_grokking.py [--quick] [--epochs 600] [--p 113]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import lossforge

# examples/_report.py: examples/ is on sys.path when a script runs
from _report import Report, machine, pyplot, save


def dataset(p: int, train_fraction: float, seed: int):
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], 1).float()
    y = (a + b) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = int(train_fraction * p * p)
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


def mlp(p: int, width: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2 * p, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, p))


def run(loss_name: str, ortho: bool, init: dict, data, p: int, width: int, epochs: int, lr: float, every: int):
    xtr, ytr, xte, yte = data
    model = mlp(p, width)
    model.load_state_dict(init)
    if ortho:
        opt = lossforge.optim.OrthoGrad(model.parameters(), torch.optim.AdamW, lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss_fn = lossforge.stablemax_cross_entropy if loss_name == "stablemax" else F.cross_entropy
    hist = {"epoch": [], "train_acc": [], "test_acc": [], "collapse": [], "loss": []}
    grokked = None
    for epoch in range(1, epochs + 1):
        logits = model(xtr)
        loss = loss_fn(logits, ytr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if epoch % every == 0 or epoch == epochs:
            with torch.no_grad():
                logits = model(xtr)
                train_acc = (logits.argmax(1) == ytr).float().mean().item()
                test_acc = (model(xte).argmax(1) == yte).float().mean().item()
                collapse = lossforge.collapse_fraction(logits, ytr, loss=loss_name).item()
            for key, val in zip(hist, (epoch, train_acc, test_acc, collapse, loss.item())):
                hist[key].append(val)
            if grokked is None and test_acc >= 0.9:
                grokked = epoch
    return hist, grokked


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (p=23, 60 epochs) for the tests")
    ap.add_argument("--p", type=int, default=113)
    ap.add_argument("--train-fraction", type=float, default=0.4)
    ap.add_argument("--width", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=600)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.p, args.epochs, args.width = 23, 60, 64
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = dataset(args.p, args.train_fraction, args.seed)
    torch.manual_seed(args.seed)
    init = {k: v.clone() for k, v in mlp(args.p, args.width).state_dict().items()}
    every = max(1, args.epochs // 150)
    report = Report("stablemax_grokking")
    say = report.say
    say(f"modular addition mod {args.p}: {len(data[1])} train / {len(data[3])} test pairs, MLP width "
        f"{args.width}, full batch, float32, AdamW lr {args.lr}, weight decay 0, {args.epochs} epochs")
    say(f"machine: {machine()}")
    runs = {}
    for loss_name, ortho in (("softmax", False), ("stablemax", False), ("softmax", True), ("stablemax", True)):
        name = f"{'⊥Grad(AdamW)' if ortho else 'AdamW'} + {'StableMax' if loss_name == 'stablemax' else 'softmax'} CE"
        t0 = time.perf_counter()
        hist, grokked = run(loss_name, ortho, init, data, args.p, args.width, args.epochs, args.lr, every)
        sec = time.perf_counter() - t0
        runs[name] = (hist, grokked)
        line = (f"{name:28s} final train acc {hist['train_acc'][-1]:6.1%}  test acc {hist['test_acc'][-1]:6.1%}  "
                f"train loss {hist['loss'][-1]:.1e}  max collapse fraction {max(hist['collapse']):6.1%}  "
                f"test >= 90% at epoch "
                f"{grokked if grokked else 'never':>5}  ({sec:.1f} s)")
        say(line)
    wall = time.perf_counter() - t_start
    say(f"wall time {wall:.1f} s")
    g = {name: (grok if grok else "never") for name, (_, grok) in runs.items()}
    summary = ("SUMMARY stablemax_grokking: epoch of >= 90% test accuracy: " +
               "; ".join(f"{name} {val}" for name, val in g.items()) +
               "; max collapse_fraction " + ", ".join(f"{max(h['collapse']):.1%}" for h, _ in runs.values()))
    say(summary)
    if not args.quick:
        report.write(argv)
        plot(runs, report.path(".png"), args)


def plot(runs, path, args):
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, (hist, _)), c in zip(runs.items(), ("C3", "C0", "C1", "C2")):
        ax1.plot(hist["epoch"], hist["test_acc"], color=c, label=name + " (test)")
        ax1.plot(hist["epoch"], hist["train_acc"], color=c, ls=":", lw=1)
        ax2.plot(hist["epoch"], hist["loss"], color=c, label=f"{name} (max collapse_fraction "
                 f"{max(hist['collapse']):.1%})")
    ax1.set(xlabel="epoch", ylabel="accuracy (dotted: train)", title=f"(a + b) mod {args.p}, no weight decay")
    ax1.legend(fontsize=8)
    # a row's softmax loss is exactly 0 in float32 once 1 - p_y < 2^-24 (Softmax Collapse)
    ax2.axhline(2.0 ** -24, color="gray", ls=":", label="float32 collapse level (2^-24)")
    ax2.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss and Softmax Collapse")
    ax2.legend(fontsize=7)
    save(fig, path, dpi=120)


if __name__ == "__main__":
    main()
