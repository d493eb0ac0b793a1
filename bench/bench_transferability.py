"""Benchmark the transferability scores (``finetail.transferability``) on random data.

Times each score of ``finetail.transferability.SCORES`` once, through ``all_scores``: LogME,
H-score and leave-one-out k-NN accuracy on a feature matrix, LEEP and NCE on source-model
probabilities.

Default size is the paper's worst case: 50,000 target images with 2,048-d features
(ResNet-101 pooled features) in 200 target classes, and a source model with 1,000 classes.
The features alone take 50,000 * 2,048 * 4 B = 410 MB (float32, as a feature network writes
them); the probabilities 200 MB. Pass ``--n``, ``--dim``, ``--classes``, ``--source-classes``
for a smaller problem.

Data: labels uniform over the target classes; features ``|N(0, 1)|`` per dimension (like
post-ReLU pooled features) plus a class signal ``0.15 * |N(0, 1)|`` per class and dimension
(weak, so that the scores are not at their ceilings); source probabilities the softmax of
``N(0, 1)`` logits over the source classes, plus 2 on one source class drawn for each
target class (so that LEEP and NCE see some dependence).

Usage::

    python bench/bench_transferability.py                      # 50,000 x 2,048, 200 / 1,000 classes
    python bench/bench_transferability.py --n 5000 --dim 512 --classes 50 --source-classes 100

Prints each score's seconds and value and writes ``bench/out/transferability.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from finetail import transferability as ft

_BLOCK = 4096  # rows generated at a time


def make_data(n: int, dim: int, classes: int, source_classes: int, seed: int):
    """Labels (n,), float32 features (n, dim) and float32 source probabilities (n, source_classes)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    signal = 0.15 * np.abs(rng.standard_normal((classes, dim), dtype=np.float32))
    favourite = rng.integers(0, source_classes, size=classes)
    features = np.empty((n, dim), dtype=np.float32)
    probs = np.empty((n, source_classes), dtype=np.float32)
    for start in range(0, n, _BLOCK):
        rows = slice(start, min(n, start + _BLOCK))
        y = labels[rows]
        features[rows] = np.abs(rng.standard_normal((y.size, dim), dtype=np.float32)) + signal[y]
        logits = rng.standard_normal((y.size, source_classes))
        logits[np.arange(y.size), favourite[y]] += 2.0
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        probs[rows] = p / p.sum(axis=1, keepdims=True)
    return labels, features, probs


def _blas() -> str:
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # informational only
        return f"unknown ({type(exc).__name__})"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000, help="target images (default 50000)")
    p.add_argument("--dim", type=int, default=2048, help="feature dimension (default 2048)")
    p.add_argument("--classes", type=int, default=200, help="target classes (default 200)")
    p.add_argument("--source-classes", type=int, default=1000, help="source model classes (default 1000)")
    p.add_argument("--k", type=int, default=ft.DEFAULT_KNN_K, help=f"k-NN neighbours (default {ft.DEFAULT_KNN_K})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "transferability.json")
    args = p.parse_args(argv)
    if min(args.n, args.dim, args.source_classes) < 1 or args.classes < 2:
        p.error("--n, --dim and --source-classes must be positive, --classes at least 2")
    if not 1 <= args.k < args.n:
        p.error("--k must be between 1 and --n minus 1")

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    labels, features, probs = make_data(args.n, args.dim, args.classes, args.source_classes, args.seed)
    t_data = time.perf_counter() - t0

    scores = ft.all_scores(features, probs, labels, k=args.k)
    load_after = os.getloadavg()

    result = {
        "problem": {
            "n": args.n, "dim": args.dim, "classes": args.classes, "source_classes": args.source_classes,
            "k": args.k, "seed": args.seed, "features_dtype": str(features.dtype), "probs_dtype": str(probs.dtype),
            "present_classes": int(np.unique(labels).size),
        },
        "data_s": t_data,
        "scores": {name: {"value": value, "seconds": seconds} for name, (value, seconds) in scores.items()},
        "total_s": sum(seconds for _, seconds in scores.values()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "environment": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "blas": _blas(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "loadavg_1min_before_after": [load_before[0], load_after[0]],
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    print(f"transferability benchmark: {args.n} images x {args.dim}-d, {args.classes} target classes, "
          f"{args.source_classes} source classes, k = {args.k} (data made in {t_data:.1f} s)")
    for name, (value, seconds) in scores.items():
        print(f"{name:<8s} {seconds:9.2f} s   value {value:.6g}")
    print(f"total    {result['total_s']:9.2f} s   peak RSS {result['peak_rss_mb']:.0f} MB")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
