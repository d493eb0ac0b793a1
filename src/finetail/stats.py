"""Spread over training seeds: mean, standard deviation and n per cell, and paired comparisons.

Every number in the report is a mean over the seeds of its cell with its sample standard
deviation (``ddof=1``) and ``n``. A method is compared with its baseline *paired over seeds*:
seed ``s`` of the method against seed ``s`` of the baseline (same data, same initial
weights' seed, same batch order), so the seed-to-seed noise both share cancels. The 95%
confidence interval of the mean paired difference uses Student's t with ``n - 1`` degrees of
freedom; a difference is called an improvement (or a loss) only when the interval excludes 0.

>>> summarize([10.0, 12.0, 14.0])
Summary(mean=12.0, std=2.0, n=3)
>>> d = paired_difference([30.0, 31.0, 29.0], [33.0, 33.5, 32.5])
>>> round(d.mean, 3), d.n, d.verdict(lower_is_better=True)
(-3.0, 3, 'better')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Paired", "Summary", "format_mean_std", "paired_difference", "summarize"]

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (NaN for n < 2) and count of one cell's seeds."""

    mean: float
    std: float
    n: int


def _finite(values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite value(s) {bad} among {out}: a NaN or inf result must not be averaged")
    return out


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample std (``ddof=1``) and n of ``values``; a NaN or inf raises ValueError."""
    v = _finite(values)
    if not v:
        return Summary(math.nan, math.nan, 0)
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return Summary(mean, std, len(v))


def _t_quantile(p: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df))


@dataclass(frozen=True)
class Paired:
    """Mean of the paired differences ``a - b`` with its 95% confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def verdict(self, lower_is_better: bool) -> str:
        """``better`` / ``worse`` when the interval excludes 0 (``a`` against ``b``), else
        ``no clear difference``."""
        if not self.excludes_zero():
            return "no clear difference"
        a_lower = self.high < 0
        return "better" if a_lower == lower_is_better else "worse"


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Paired:
    """``a[i] - b[i]`` over paired seeds: mean and 95% t-interval (NaN bounds for n < 2)."""
    a, b = _finite(a), _finite(b)
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same seeds on both sides, got {len(a)} and {len(b)} values")
    d = [x - y for x, y in zip(a, b, strict=True)]
    s = summarize(d)
    if s.n < 2:
        return Paired(s.mean, math.nan, math.nan, s.n)
    half = _t_quantile(0.5 + CONFIDENCE / 2, s.n - 1) * s.std / math.sqrt(s.n)
    return Paired(s.mean, s.mean - half, s.mean + half, s.n)


def format_mean_std(mean: float, std: float, digits: int = 2) -> str:
    """``"12.34 ± 0.56"``; the std as ``—`` when there is a single seed."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f} ± —"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
