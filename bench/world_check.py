"""Is the generated world learnable, not saturated, and does transfer follow similarity?

Default check (about 35 s on one core): trains, on CPU with one thread, (a) logistic
regression on raw pixels and (b) a small 3-conv CNN from scratch, on ``gen10`` and on the
``cub200`` target at their default sizes, at 16 and 32 pixels, and prints test
accuracies with generation and training times.  Wanted: the CNN well between chance and
100% and clearly above the linear model.

``--transfer`` (about 5 min): pretrains the CNN on ``generic`` and on ``natural``, then
fine-tunes each on every target, beside a from-scratch run.  Wanted: both beat scratch,
and natural-like targets (birds, dogs, flowers) gain more from ``natural`` than
artifact-like ones (cars, aircraft, food).  One seed: differences of 2-3 points are noise.

Usage::

    python bench/world_check.py [--seed 0] [--sizes 16 32] [--datasets gen10 cub200]
                                [--world noise=0.1 clutter=0.5] [--transfer]
    python bench/world_check.py --sheet /tmp/world_sheet.png --datasets cub200
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from finetail.world import WorldConfig, dataset_defaults, generate

TARGETS = ("cub200", "nabirds", "stanford_dogs", "flowers102", "stanford_cars", "fgvc_aircraft", "food101")


@dataclass(frozen=True)
class CheckConfig:
    linear_epochs: int = 30
    cnn_epochs: int = 40  # targets hold ~500 training images: 40 passes = ~300 steps
    gen10_cnn_epochs: int = 8  # gen10 holds 5,000 training images: fewer passes suffice
    source_epochs: int = 10  # pretraining on generic / natural (--transfer)
    batch_size: int = 64
    lr: float = 2e-3  # Adam, one-cycle schedule, every model
    weight_decay: float = 5e-4


def tensors(ds, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of one split as float (N, 3, H, W) in [0, 1], and labels."""
    keep = ds.split == split
    x = torch.from_numpy(ds.images[keep]).permute(0, 3, 1, 2).float().div_(255.0)
    return x, torch.from_numpy(ds.labels[keep])


def small_cnn(n_classes: int) -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16), nn.MaxPool2d(2),
        *block(16, 32), nn.MaxPool2d(2),
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_classes),
    )


def fit_and_score(model: nn.Module, xtr, ytr, xte, yte, epochs: int, cfg: CheckConfig, seed: int) -> float:
    """Train with Adam + one-cycle, return test accuracy."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = epochs * ((len(xtr) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xte[i : i + 512]).argmax(1) for i in range(0, len(xte), 512)])
    return float((pred == yte).float().mean())


def check_learnability(args, cfg: CheckConfig, overrides: dict) -> None:
    print(f"{'dataset':8s} {'size':>4s} {'C':>3s} {'train':>6s} {'test':>5s} {'chance':>6s} "
          f"{'linear':>6s} {'cnn':>6s} {'gen_s':>5s} {'lin_s':>5s} {'cnn_s':>5s}")
    for name in args.datasets:
        for size in args.sizes:
            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            ds = generate(name, WorldConfig(seed=args.seed, image_size=size, **overrides), args.train)
            t_gen = time.perf_counter() - t0
            (xtr, ytr), (xte, yte) = tensors(ds, "train"), tensors(ds, "test")
            mean, std = xtr.mean(dim=(0, 2, 3), keepdim=True), xtr.std(dim=(0, 2, 3), keepdim=True)
            xtr, xte = (xtr - mean) / std, (xte - mean) / std
            n_cls = len(ds.class_names)
            t0 = time.perf_counter()
            lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, n_cls))
            acc_lin = fit_and_score(lin, xtr, ytr, xte, yte, cfg.linear_epochs, cfg, args.seed)
            t_lin = time.perf_counter() - t0
            t0 = time.perf_counter()
            epochs = cfg.gen10_cnn_epochs if name == "gen10" else cfg.cnn_epochs
            acc_cnn = fit_and_score(small_cnn(n_cls), xtr, ytr, xte, yte, epochs, cfg, args.seed)
            t_cnn = time.perf_counter() - t0
            print(f"{name:8s} {size:4d} {n_cls:3d} {len(xtr):6d} {len(xte):5d} {1 / n_cls:6.3f} "
                  f"{acc_lin:6.3f} {acc_cnn:6.3f} {t_gen:5.1f} {t_lin:5.1f} {t_cnn:5.1f}", flush=True)
    print(f"defaults: {', '.join(f'{n}={dataset_defaults(n)}' for n in args.datasets)}")


def check_transfer(args, cfg: CheckConfig, overrides: dict) -> None:
    size = max(args.sizes)
    world = WorldConfig(seed=args.seed, image_size=size, **overrides)

    def data(name: str):
        ds = generate(name, world)
        (xtr, ytr), (xte, yte) = tensors(ds, "train"), tensors(ds, "test")
        return (xtr - 0.5) / 0.25, ytr, (xte - 0.5) / 0.25, yte, len(ds.class_names)

    pretrained = {}
    for source in ("generic", "natural"):
        torch.manual_seed(args.seed)
        xtr, ytr, xte, yte, n_cls = data(source)
        model = small_cnn(n_cls)
        acc = fit_and_score(model, xtr, ytr, xte, yte, cfg.source_epochs, cfg, args.seed)
        pretrained[source] = model
        print(f"pretrained on {source} ({len(xtr)} images, {n_cls} classes): test {acc:.3f}", flush=True)
    print(f"{'target':14s} {'scratch':>7s} {'generic':>7s} {'natural':>7s} {'nat-gen':>7s}")
    for target in TARGETS:
        xtr, ytr, xte, yte, n_cls = data(target)
        torch.manual_seed(args.seed)
        accs = [fit_and_score(small_cnn(n_cls), xtr, ytr, xte, yte, cfg.cnn_epochs, cfg, args.seed)]
        for source in ("generic", "natural"):
            torch.manual_seed(args.seed)
            model = copy.deepcopy(pretrained[source])
            model[-1] = nn.Linear(model[-1].in_features, n_cls)
            accs.append(fit_and_score(model, xtr, ytr, xte, yte, cfg.cnn_epochs, cfg, args.seed))
        print(f"{target:14s} {accs[0]:7.3f} {accs[1]:7.3f} {accs[2]:7.3f} {accs[2] - accs[1]:+7.3f}", flush=True)


def save_sheet(path: str, name: str, size: int, seed: int, overrides: dict, per_class: int = 8) -> None:
    """Contact sheet of a data set: one row per class, ``per_class`` train images each."""
    from PIL import Image  # matplotlib's dependency; only needed here

    ds = generate(name, WorldConfig(seed=seed, image_size=size, **overrides), per_class, 0)
    rows = [np.concatenate(list(ds.images[ds.labels == c]), axis=1) for c in range(len(ds.class_names))]
    sheet = np.concatenate(rows, axis=0)
    zoom = max(1, 96 // size)
    Image.fromarray(sheet).resize((sheet.shape[1] * zoom, sheet.shape[0] * zoom), Image.NEAREST).save(path)
    print(f"wrote {path}: {name} at {size} px, rows = {', '.join(ds.class_names)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="world and training seed")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32], help="image sizes (--transfer: the largest)")
    ap.add_argument("--datasets", nargs="+", default=["gen10", "cub200"])
    ap.add_argument("--train", type=int, default=None, help="train images per class (default: the data set's)")
    ap.add_argument("--world", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="float WorldConfig overrides, e.g. noise=0.1 clutter=0.8")
    ap.add_argument("--transfer", action="store_true", help="run the transfer check instead (~5 min)")
    ap.add_argument("--sheet", metavar="PNG", help="only save a contact sheet of the first --datasets entry")
    args = ap.parse_args()
    overrides = {k: float(v) for k, v in (kv.split("=", 1) for kv in args.world)}
    torch.set_num_threads(1)
    cfg = CheckConfig()
    print(f"torch {torch.__version__}, numpy {np.__version__}, 1 thread, seed {args.seed}, "
          f"world {WorldConfig(seed=args.seed, **overrides)}")
    t0 = time.perf_counter()
    if args.sheet:
        save_sheet(args.sheet, args.datasets[0], max(args.sizes), args.seed, overrides)
    elif args.transfer:
        check_transfer(args, cfg, overrides)
    else:
        check_learnability(args, cfg, overrides)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
