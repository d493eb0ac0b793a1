"""Does bf16 autocast move the result? Pairs the softmax cells of a study trained in bf16
(default ``results/cifar10lt_cpu``) with the same cells trained in fp32 (``results/
cifar10lt_cpu_fp32``, ``bench/cifar10lt_fp32.yaml``): same replicates, so the same
long-tailed subsets and seeds. For top-1 error, balanced and few-shot accuracy: the mean and
std of each side, the paired difference bf16 − fp32 with its 95% t-interval over replicates
and its verdict (``finetail.stats``: "not clear" when the interval holds 0).

    .venv/bin/python bench/precision_check.py [--bf16 results/cifar10lt_cpu] [--fp32 results/cifar10lt_cpu_fp32]

Writes ``bench/out/precision.csv`` with ``#`` header lines (publishable with
``python -m finetail.results_page publish ... --extra bench/out/precision.csv:precision.csv``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

METRICS = {"top1_error": ("top-1 error (%)", True), "balanced_acc": ("balanced accuracy (%)", False),
           "few_acc": ("few-shot accuracy (%)", False)}


def cells(study: Path, dataset: str, imbalance: str, loss: str) -> dict[int, dict]:
    """Replicate -> (final metrics, precision) of the study's ``loss`` cells."""
    out = {}
    for path in sorted((study / "cbloss" / dataset / f"if{imbalance}" / loss).glob("seed*/metrics.json")):
        m = json.loads(path.read_text())
        out[int(path.parent.name.removeprefix("seed"))] = {"final": m["final"], "precision": m.get("precision")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bf16", type=Path, default=ROOT / "results" / "cifar10lt_cpu")
    ap.add_argument("--fp32", type=Path, default=ROOT / "results" / "cifar10lt_cpu_fp32")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--imbalance", default="100")
    ap.add_argument("--loss", default="softmax")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "precision.csv")
    a = ap.parse_args(argv)

    import pandas as pd

    from finetail.results_page import cpu_model, git_commit
    from finetail.stats import paired_difference, summarize

    lo, hi = cells(a.bf16, a.dataset, a.imbalance, a.loss), cells(a.fp32, a.dataset, a.imbalance, a.loss)
    reps = sorted(set(lo) & set(hi))
    if len(reps) < 2:
        print(f"need at least 2 replicates on both sides; {a.bf16}: {sorted(lo)}, {a.fp32}: {sorted(hi)}", file=sys.stderr)
        return 1
    precisions = ({lo[r]["precision"] for r in reps}, {hi[r]["precision"] for r in reps})
    if precisions != ({"bf16"}, {"fp32"}):
        print(f"the runs' recorded precisions are {precisions}, not bf16 and fp32", file=sys.stderr)
        return 1
    rows = []
    for key, (label, lower_is_better) in METRICS.items():
        a16 = [100 * lo[r]["final"][key] for r in reps]
        a32 = [100 * hi[r]["final"][key] for r in reps]
        d = paired_difference(a16, a32)
        s16, s32 = summarize(a16), summarize(a32)
        verdict = d.verdict(lower_is_better=lower_is_better)
        verdict = {"better": "bf16 better", "worse": "bf16 worse"}.get(verdict, verdict)
        rows.append({"metric": label, "bf16_mean": s16.mean, "bf16_std": s16.std, "fp32_mean": s32.mean,
                     "fp32_std": s32.std, "difference": d.mean, "low": d.low, "high": d.high, "verdict": verdict})
        print(f"{label:24s} bf16 {s16.mean:6.2f} ± {s16.std:4.2f}   fp32 {s32.mean:6.2f} ± {s32.std:4.2f}   "
              f"bf16 − fp32 {d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]: {verdict}")
    header = [f"# commit: {git_commit()}", f"# cpu: {cpu_model()}", f"# replicates: {len(reps)}",
              f"# note: {a.loss} at IF {a.imbalance}, {a.bf16.name} (bf16) against {a.fp32.name} (fp32)"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(header) + "\n" + pd.DataFrame(rows).to_csv(index=False, float_format="%.6f"))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
