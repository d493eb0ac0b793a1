"""The report's claims as evidence another machine can check: ``report/claims.csv``.

One row per claim and per comparison, each stated over replicates (finetail.replicates):

- ``claim``: a stable id (``cbloss:gen10:if50:cb_focal-vs-softmax:few_acc``), the same on
  every machine, so two runs' tables can be joined;
- ``statement``: the claim in words;
- ``estimate``, ``low``, ``high``: the effect and its interval (95%, or Holm's level for a
  pooled claim, ``level``);
- ``verdict``: ``better`` / ``worse`` / ``not clear`` for a comparison, ``holds`` /
  ``does not hold`` / ``not clear`` for a claim: ``not clear`` whenever the interval includes 0,
  no other threshold;
- ``holds_in``: in how many of the ``replicates`` the effect has the claimed sign;
- ``p_improve`` with ``p_improve_low``/``p_improve_high``: ``P(A > B)`` over replicates and its
  bootstrap interval (finetail.stats.prob_improvement);
- ``p_holm``: the Holm-adjusted p-value where the claim pools several comparisons (else the
  comparison's own p-value);
- ``sources``: the sources of variation the interval covers (``world + long-tailed subset +
  training seed``).

:func:`compare_claims` checks a run's table against a committed one (``finetail
compare-claims``): no verdict may flip between ``better`` and ``worse`` (or ``holds`` and
``does not hold``), and each interval must overlap the committed one.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd

from .stats import (
    CONFIDENCE,
    NOT_CLEAR,
    Summary,
    t_interval,
    holm,
    paired_difference,
    prob_improvement,
    summarize,
)

__all__ = ["CLAIM_COLUMNS", "Claim", "compare_claims", "comparison", "mean_claim", "pooled_claim", "read_claims",
           "write_claims"]

HOLDS, DOES_NOT_HOLD = "holds", "does not hold"
OPPOSITE = {"better": "worse", "worse": "better", HOLDS: DOES_NOT_HOLD, DOES_NOT_HOLD: HOLDS}
ALPHA = 1 - CONFIDENCE


@dataclass(frozen=True)
class Claim:
    """One row of ``claims.csv``."""

    claim: str
    statement: str
    estimate: float
    low: float
    high: float
    level: float
    verdict: str
    holds_in: int
    replicates: int
    p_improve: float
    p_improve_low: float
    p_improve_high: float
    p_holm: float
    sources: str

    def interval(self, digits: int = 1) -> str:
        if math.isnan(self.low):
            return f"{self.estimate:+.{digits}f} (one replicate: no interval)"
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    def improvement(self) -> str:
        if math.isnan(self.p_improve):
            return ""
        return f"P(better) = {self.p_improve:.2f} [{self.p_improve_low:.2f}, {self.p_improve_high:.2f}]"


CLAIM_COLUMNS = [f.name for f in fields(Claim)]


def _holds_in(diffs: Sequence[float], higher_is_better: bool) -> int:
    return sum(1 for d in diffs if (d > 0 if higher_is_better else d < 0))


def comparison(claim: str, statement: str, a: Sequence[float], b: Sequence[float], higher_is_better: bool,
               sources: str) -> Claim:
    """``a`` against ``b`` paired over replicates: the mean difference ``a - b`` with its 95%
    t-interval, ``better``/``worse`` only when the interval excludes 0, and ``P(A better)``."""
    d = paired_difference(a, b)
    imp = prob_improvement(a, b, higher_is_better=higher_is_better)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return Claim(claim, statement, d.mean, d.low, d.high, CONFIDENCE, d.verdict(lower_is_better=not higher_is_better),
                 _holds_in(diffs, higher_is_better), d.n, imp.p, imp.low, imp.high, d.p, sources)


def mean_claim(claim: str, statement: str, values: Sequence[float], sources: str) -> Claim:
    """A claim that a per-replicate quantity (e.g. a rank correlation) is above 0: its mean over
    replicates with the t-interval; ``holds`` when the interval is above 0, ``does not hold``
    when below, else ``not clear``; ``P(above 0)`` over replicates."""
    zeros = [0.0] * len(values)
    d = paired_difference(values, zeros)
    imp = prob_improvement(values, zeros)
    verdict = {"better": HOLDS, "worse": DOES_NOT_HOLD}.get(d.verdict(lower_is_better=False), NOT_CLEAR)
    return Claim(claim, statement, d.mean, d.low, d.high, CONFIDENCE, verdict, _holds_in(values, True), d.n,
                 imp.p, imp.low, imp.high, d.p, sources)


def pooled_claim(claim: str, statement: str, members: dict[str, tuple[Sequence[float], Sequence[float]]],
                 higher_is_better: bool, sources: str) -> tuple[Claim, str | None]:
    """A claim that pools K comparisons ("some CB loss helps the few-shot classes"), corrected
    for multiplicity with Holm's step-down method: it ``holds`` when some member is better
    with a Holm-adjusted p below 0.05, ``does not hold`` when none is and some member is worse
    so, else ``not clear``. The row reports the deciding member (else the one with the
    smallest p) with its interval at Holm's level for its rank, ``1 - 0.05 / (K - rank + 1)``,
    which excludes 0 exactly when its own step of Holm's procedure rejects. Returns the row
    and the member's name."""
    names = list(members)
    tests = {n: paired_difference(*members[n]) for n in names}
    adjusted = dict(zip(names, holm([tests[n].p for n in names]), strict=True))
    k = sum(1 for n in names if not math.isnan(tests[n].p))

    def direction(n: str) -> str:
        return "better" if (tests[n].mean > 0) == higher_is_better else "worse"

    significant = [n for n in names if adjusted[n] < ALPHA]
    better = [n for n in significant if direction(n) == "better"]
    worse = [n for n in significant if direction(n) == "worse"]
    if better:
        pick, verdict = min(better, key=lambda n: adjusted[n]), HOLDS
    elif worse:
        pick, verdict = min(worse, key=lambda n: adjusted[n]), DOES_NOT_HOLD
    else:
        tested = [n for n in names if not math.isnan(tests[n].p)]
        if not tested:
            return Claim(claim, statement, tests[names[0]].mean, math.nan, math.nan, CONFIDENCE, NOT_CLEAR, 0,
                         tests[names[0]].n, math.nan, math.nan, math.nan, math.nan, sources), None
        pick, verdict = min(tested, key=lambda n: (tests[n].p, n)), NOT_CLEAR
    rank = sorted((tests[n].p, n) for n in names if not math.isnan(tests[n].p)).index((tests[pick].p, pick))
    level = 1 - ALPHA / (k - rank)
    t = tests[pick]
    low, high = t_interval(_diff_summary(*members[pick]), level)
    a, b = members[pick]
    imp = prob_improvement(a, b, higher_is_better=higher_is_better)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return Claim(claim, statement, t.mean, low, high, level, verdict, _holds_in(diffs, higher_is_better), t.n,
                 imp.p, imp.low, imp.high, adjusted[pick], sources), pick


def _diff_summary(a: Sequence[float], b: Sequence[float]) -> Summary:
    return summarize([x - y for x, y in zip(a, b, strict=True)])


def write_claims(rows: list[Claim], path: Path) -> Path:
    """``claims.csv`` (floats with 6 decimals: byte-identical for identical results)."""
    df = pd.DataFrame([asdict(r) for r in rows], columns=CLAIM_COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, float_format="%.6f")
    return path


def read_claims(path: Path | str) -> pd.DataFrame:
    """A claims table; ``#`` lines at its top (the committed copy's commit, date and CPU) skipped."""
    text = Path(path).read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    df = pd.read_csv(io.StringIO(body))
    missing = sorted(set(CLAIM_COLUMNS) - set(df.columns))
    if missing:
        raise ValueError(f"{path}: not a claims table (no column(s) {missing})")
    return df


def compare_claims(mine: pd.DataFrame, ref: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Every claim of ``ref`` (the committed table) against the same claim of ``mine``: a row
    per claim with both verdicts and intervals, and the problems: a claim missing from
    ``mine``, a verdict flipped between opposites, or intervals that do not overlap."""
    mine_by = mine.set_index("claim")
    rows, problems = [], []
    for r in ref.itertuples(index=False):
        if r.claim not in mine_by.index:
            problems.append(f"{r.claim}: missing from this run's claims")
            continue
        m = mine_by.loc[r.claim]
        flipped = OPPOSITE.get(str(r.verdict)) == str(m["verdict"])
        both = not any(math.isnan(float(x)) for x in (r.low, r.high, m["low"], m["high"]))
        overlap = (not both) or (float(m["low"]) <= float(r.high) and float(r.low) <= float(m["high"]))
        if flipped:
            problems.append(f"{r.claim}: verdict flipped from {r.verdict!r} to {m['verdict']!r}")
        if not overlap:
            problems.append(f"{r.claim}: interval [{m['low']:+.3f}, {m['high']:+.3f}] does not overlap the committed "
                            f"[{r.low:+.3f}, {r.high:+.3f}]")
        rows.append({"claim": r.claim, "committed": f"{r.verdict} [{r.low:+.2f}, {r.high:+.2f}]",
                     "this run": f"{m['verdict']} [{m['low']:+.2f}, {m['high']:+.2f}]",
                     "agrees": "yes" if not flipped and overlap else "NO"})
    return pd.DataFrame(rows, columns=["claim", "committed", "this run", "agrees"]), problems

