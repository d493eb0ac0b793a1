"""Spread over replicates: mean, standard deviation and n per cell, paired comparisons,
the probability of improvement and Holm's correction.

Every number in the report is a mean over the replicates of its cell with its sample standard
deviation (``ddof=1``) and ``n``. A replicate (finetail.replicates) redraws every source of
variation the study lets vary (world, long-tailed subset, feature network, random draw,
training seed), so an interval over replicates predicts a rerun elsewhere; the report names
the sources each interval covers. A method is compared with its baseline *paired over
replicates*: replicate ``r`` of the method against replicate ``r`` of the baseline (same
world, subset and seeds), so the noise both share cancels.

- **Paired difference**: the mean of ``a - b`` with its 95% Student-t interval (``n - 1``
  degrees of freedom) and two-sided p-value; ``better`` / ``worse`` only when the interval
  excludes 0, else ``not clear`` (no threshold on the effect's size).
- **Probability of improvement** ``P(A > B)`` (Bouthillier et al. 2021; rliable): the share
  of replicates in which ``a`` beats ``b`` (a tie counts one half), with a 95% percentile
  bootstrap interval over replicates, computed exactly (the bootstrap distribution of a mean
  of ``n`` draws from ``n`` values is an ``n``-fold convolution; no random resampling, so the
  same inputs give the same interval on every machine).
- **Holm's step-down correction** for a claim that pools K comparisons ("some CB loss helps").

>>> summarize([10.0, 12.0, 14.0])
Summary(mean=12.0, std=2.0, n=3)
>>> d = paired_difference([30.0, 31.0, 29.0], [33.0, 33.5, 32.5])
>>> round(d.mean, 3), d.n, d.verdict(lower_is_better=True)
(-3.0, 3, 'better')
>>> prob_improvement([2.0, 3.0, 1.0], [1.0, 1.0, 2.0])
Improvement(p=0.6666666666666666, low=0.0, high=1.0, n=3)
>>> holm([0.01, 0.04, 0.03])
[0.03, 0.06, 0.06]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["NOT_CLEAR", "Improvement", "Paired", "Summary", "format_mean_std", "holm", "paired_difference",
           "mean_interval", "prob_improvement", "summarize", "t_interval"]

CONFIDENCE = 0.95
NOT_CLEAR = "not clear"  # the verdict of an interval that includes 0


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
    """Mean of the paired differences ``a - b`` with its 95% confidence interval and the
    two-sided p-value of the paired t-test (NaN for n < 2; 0 when every difference is the
    same non-zero value, 1 when all are 0)."""

    mean: float
    low: float
    high: float
    n: int
    p: float = math.nan

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def verdict(self, lower_is_better: bool) -> str:
        """``better`` / ``worse`` when the interval excludes 0 (``a`` against ``b``), else
        ``not clear``."""
        if not self.excludes_zero():
            return NOT_CLEAR
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
    return Paired(s.mean, *t_interval(s, CONFIDENCE), s.n, _t_pvalue(s))


def t_interval(s: Summary, confidence: float) -> tuple[float, float]:
    half = _t_quantile(0.5 + confidence / 2, s.n - 1) * s.std / math.sqrt(s.n)
    return s.mean - half, s.mean + half


def _t_pvalue(s: Summary) -> float:
    """Two-sided p-value of a one-sample t-test of mean 0."""
    from scipy import stats

    if s.std == 0:
        return 1.0 if s.mean == 0 else 0.0
    t = s.mean / (s.std / math.sqrt(s.n))
    return float(2 * stats.t.sf(abs(t), s.n - 1))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Paired:
    """The mean of ``values`` (one per replicate, e.g. a rank correlation) with its t-interval
    and the p-value against 0: :func:`paired_difference` of ``values`` against zeros."""
    v = _finite(values)
    return paired_difference(v, [0.0] * len(v))


@dataclass(frozen=True)
class Improvement:
    """``P(A > B)`` over paired replicates with its 95% bootstrap interval."""

    p: float
    low: float
    high: float
    n: int


def _wins(a: Sequence[float], b: Sequence[float]) -> list[float]:
    a, b = _finite(a), _finite(b)
    if len(a) != len(b):
        raise ValueError(f"P(A > B) needs the same replicates on both sides, got {len(a)} and {len(b)} values")
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def prob_improvement(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True) -> Improvement:
    """``P(A > B)``: the share of replicates in which ``a[i]`` beats ``b[i]`` (ties one half;
    with ``higher_is_better=False``, beats = lower), with the exact 95% percentile bootstrap
    interval over replicates (:func:`bootstrap_mean_interval`)."""
    w = _wins(a, b) if higher_is_better else _wins(b, a)
    if not w:
        return Improvement(math.nan, math.nan, math.nan, 0)
    low, high = bootstrap_mean_interval(w)
    return Improvement(sum(w) / len(w), low, high, len(w))


def bootstrap_mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact percentile bootstrap interval of the mean of ``values`` whose entries are
    multiples of 1/2 (win, tie, loss): the sum of ``n`` draws with replacement has the
    ``n``-fold convolution of the values' empirical distribution; the interval's ends are the
    smallest means whose cumulative probability reaches ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2``.

    >>> bootstrap_mean_interval([1.0, 1.0, 0.0])   # P(sum=0) = 1/27 > 2.5 %: the low end is 0
    (0.0, 1.0)
    """
    import numpy as np

    n = len(values)
    halves = [round(2 * v) for v in values]
    if any(abs(2 * v - h) > 1e-9 or h < 0 for v, h in zip(values, halves, strict=True)):
        raise ValueError(f"bootstrap_mean_interval takes wins, ties and losses (1, 0.5, 0), got {list(values)}")
    pmf = np.bincount(halves, minlength=max(halves) + 1).astype(float) / n
    dist = np.array([1.0])
    for _ in range(n):
        dist = np.convolve(dist, pmf)
    cdf = np.cumsum(dist)
    lo_q, hi_q = (1 - confidence) / 2, (1 + confidence) / 2
    eps = 1e-12  # the cumulative sum's rounding must not move an end across a step
    low = int(np.argmax(cdf >= lo_q - eps))
    high = int(np.argmax(cdf >= hi_q - eps))
    return low / (2 * n), high / (2 * n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input's order: sort ascending,
    ``p_adj(i) = max_{j <= i} min(1, (K - j + 1) p_(j))`` (1-based ranks). A comparison is
    significant at level alpha when its adjusted p is below alpha; the family-wise error rate
    of the K comparisons is then at most alpha. NaN p-values (no test) stay NaN and do not
    count towards K."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    k = len(order)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * pvalues[i]))
        out[i] = running
    return out


def format_mean_std(mean: float, std: float, digits: int = 2) -> str:
    """``"12.34 ± 0.56"``; the std as ``—`` when there is a single seed."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f} ± —"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
