"""Benchmark the similarity stage's two computations on random class means.

1. ``domain_similarity``: the full source-to-target EMD (Euclidean cost matrix + POT's exact
   network simplex), timed as a whole and split into cost matrix and solver.
2. ``class_to_domain_emd``: the point-mass EMD of every source class to the target domain
   (what greedy selection needs), no solver.

Default size is the paper's worst case: 6,000 source classes x 200 target classes x 2,048-d
(ResNet-101 pooled features). The source means alone take 6000 * 2048 * 8 B = 98 MB; pass
``--sources N --targets M --dim D`` for a smaller problem on a small machine.

Features are random non-negative (|N(0, 1)| per dimension, like post-ReLU pooled features);
counts are random in [200, 1000) so that no class is dropped by ``min_source_images=200``.

Usage::

    python bench/bench_similarity.py                       # 6000 x 200 x 2048
    python bench/bench_similarity.py --sources 1000 --targets 100 --dim 512 --repeat 5

Prints the figures and writes them to ``bench/out/similarity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from finetail import similarity as fs


def _timed(fn, repeat: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def _summary(times: list[float]) -> dict[str, float]:
    return {"min_s": min(times), "median_s": statistics.median(times), "max_s": max(times), "n": len(times)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", type=int, default=6000, help="source classes (default 6000)")
    p.add_argument("--targets", type=int, default=200, help="target classes (default 200)")
    p.add_argument("--dim", type=int, default=2048, help="feature dimension (default 2048)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "similarity.json")
    args = p.parse_args(argv)
    if min(args.sources, args.targets, args.dim, args.repeat) < 1:
        p.error("--sources, --targets, --dim and --repeat must be positive")

    rng = np.random.default_rng(args.seed)
    src = np.abs(rng.standard_normal((args.sources, args.dim)))
    tgt = np.abs(rng.standard_normal((args.targets, args.dim))) * 1.1
    src_n = rng.integers(200, 1000, size=args.sources)
    tgt_n = rng.integers(200, 1000, size=args.targets)
    a = src_n / src_n.sum()
    b = tgt_n / tgt_n.sum()

    fs._pot()  # import POT outside the timings

    t_cost, cost = _timed(lambda: fs.euclidean_distances(src, tgt), args.repeat)
    t_solve, emd_solver = _timed(lambda: fs._solve_emd(a, b, cost, fs.DEFAULT_NUM_ITER_MAX), args.repeat)
    t_full, (sim, emd) = _timed(
        lambda: fs.domain_similarity(src, src_n, tgt, tgt_n, min_source_images=200), args.repeat
    )
    t_point, point = _timed(lambda: fs.class_to_domain_emd(src, tgt, tgt_n), args.repeat)

    import ot  # already imported by fs._pot()

    result = {
        "problem": {"sources": args.sources, "targets": args.targets, "dim": args.dim, "seed": args.seed},
        "domain_similarity": {**_summary(t_full), "emd": emd, "similarity": sim},
        "cost_matrix": _summary(t_cost),
        "emd_solver": {**_summary(t_solve), "emd": emd_solver},
        "class_to_domain_emd": {
            **_summary(t_point),
            "per_class_us": 1e6 * min(t_point) / args.sources,
            "emd_min": float(point.min()),
            "emd_max": float(point.max()),
        },
        "environment": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "pot": ot.__version__,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    size = f"{args.sources} x {args.targets} x {args.dim}-d"
    print(f"similarity benchmark, {size}, {args.repeat} runs each (min / median seconds)")
    for key, label in [
        ("domain_similarity", "domain_similarity (full EMD)"),
        ("cost_matrix", "  of which cost matrix"),
        ("emd_solver", "  of which POT emd2 solver"),
        ("class_to_domain_emd", "class_to_domain_emd"),
    ]:
        r = result[key]
        print(f"{label:<32s} {r['min_s']:8.3f} / {r['median_s']:8.3f}")
    print(f"EMD = {emd:.4f}, similarity = {sim:.4f}; point-mass EMD range "
          f"[{point.min():.4f}, {point.max():.4f}]")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
