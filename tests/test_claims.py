"""The rules that decide the summary's sentences, on hand-made cells: each claim and comparison
holds ("better"), does not hold ("worse"), is "not clear", and refuses a NaN.

Expected numbers are worked by hand in the comments, with Student-t quantiles from a table:
t(0.975, 2) = 4.302653, t(0.975, 3) = 3.182446, t(0.9875, 2) = 6.205347 (Holm's 97.5% level,
two-sided). With 2 degrees of freedom the two-sided p-value of a t statistic has the closed form
p = 1 - t / sqrt(t^2 + 2); a paired t over three differences with mean m and std s is
t = m / (s / sqrt(3)).
"""

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetail.claims import (
    Claim,
    compare_claims,
    comparison,
    mean_claim,
    pooled_claim,
    read_claims,
    write_claims,
)
from finetail.cli import main
from finetail.stats import (
    bootstrap_mean_interval,
    holm,
    paired_difference,
    prob_improvement,
)

T975_2, T975_3, T9875_2 = 4.302653, 3.182446, 6.205347


def p_df2(t: float) -> float:
    """Two-sided p of a t statistic with 2 degrees of freedom (closed form)."""
    return 1 - abs(t) / math.sqrt(t * t + 2)


# --------------------------------------------------------------------------- comparison
def test_comparison_better_by_hand():
    # differences 10, 11, 12: mean 11, std 1; half width 4.302653 / sqrt 3 = 2.484138
    c = comparison("x", "a vs b", [60.0, 61.0, 62.0], [50.0, 50.0, 50.0], higher_is_better=True, sources="world")
    assert c.verdict == "better" and (c.holds_in, c.replicates) == (3, 3)
    assert c.estimate == pytest.approx(11.0)
    assert (c.low, c.high) == (pytest.approx(8.515862, abs=1e-5), pytest.approx(13.484138, abs=1e-5))
    # t = 11 sqrt 3 = 19.0526: p = 1 - 19.0526 / sqrt(363 + 2) = 0.0027435
    assert c.p_holm == pytest.approx(p_df2(11 * math.sqrt(3)), rel=1e-6) and c.p_holm == pytest.approx(0.0027435, abs=1e-6)
    assert (c.p_improve, c.p_improve_low, c.p_improve_high) == (1.0, 1.0, 1.0)
    assert c.level == 0.95 and c.sources == "world"
    assert c.interval() == "+11.0 [+8.5, +13.5]" and c.improvement() == "P(better) = 1.00 [1.00, 1.00]"


def test_comparison_worse_when_lower_is_better():
    # the same numbers as an error: a is 11 points *higher*, so worse; it beats b in no replicate
    c = comparison("x", "", [60.0, 61.0, 62.0], [50.0, 50.0, 50.0], higher_is_better=False, sources="")
    assert c.verdict == "worse" and c.holds_in == 0 and c.estimate == pytest.approx(11.0)
    assert (c.p_improve, c.p_improve_low, c.p_improve_high) == (0.0, 0.0, 0.0)


def test_comparison_not_clear_when_the_interval_covers_zero():
    # differences 1, -1, 3: mean 1, std 2, half width 4.302653 * 2 / sqrt 3 = 4.968275
    c = comparison("x", "", [11.0, 9.0, 13.0], [10.0, 10.0, 10.0], higher_is_better=True, sources="")
    assert c.verdict == "not clear"
    assert (c.low, c.high) == (pytest.approx(-3.968275, abs=1e-5), pytest.approx(5.968275, abs=1e-5))
    # it holds in 2 of 3 replicates, and P(better) = 2/3: neither makes it a verdict
    assert c.holds_in == 2 and c.p_improve == pytest.approx(2 / 3)
    # t = 1 / (2 / sqrt 3) = 0.866: p = 1 - 0.866 / sqrt(0.75 + 2) = 0.4778
    assert c.p_holm == pytest.approx(p_df2(math.sqrt(3) / 2), rel=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_comparison_refuses_a_non_finite_result(bad):
    with pytest.raises(ValueError, match="non-finite"):
        comparison("x", "", [1.0, bad, 3.0], [0.0, 0.0, 0.0], higher_is_better=True, sources="")
    with pytest.raises(ValueError, match="non-finite"):
        comparison("x", "", [1.0, 2.0, 3.0], [0.0, bad, 0.0], higher_is_better=False, sources="")


def test_comparison_needs_the_same_replicates_and_one_replicate_has_no_verdict():
    with pytest.raises(ValueError, match="same seeds"):
        comparison("x", "", [1.0, 2.0, 3.0], [0.0, 0.0], higher_is_better=True, sources="")
    c = comparison("x", "", [5.0], [1.0], higher_is_better=True, sources="")
    assert c.verdict == "not clear" and math.isnan(c.low) and math.isnan(c.high) and math.isnan(c.p_holm)
    assert c.interval() == "+4.0 (one replicate: no interval)" and c.holds_in == 1


# --------------------------------------------------------------------------- mean_claim
def test_mean_claim_holds_above_zero():
    # 0.5, 0.6, 0.7: mean 0.6, std 0.1, half width 4.302653 * 0.1 / sqrt 3 = 0.248414
    c = mean_claim("m", "tau above 0", [0.5, 0.6, 0.7], "world")
    assert c.verdict == "holds" and c.holds_in == 3 and c.replicates == 3
    assert (c.low, c.high) == (pytest.approx(0.351586, abs=1e-6), pytest.approx(0.848414, abs=1e-6))
    assert c.p_improve == 1.0


def test_mean_claim_does_not_hold_below_zero():
    c = mean_claim("m", "", [-0.5, -0.6, -0.7], "")
    assert c.verdict == "does not hold" and c.holds_in == 0 and c.high == pytest.approx(-0.351586, abs=1e-6)
    assert c.p_improve == 0.0


def test_mean_claim_is_not_clear_although_every_replicate_is_above_zero():
    # 0.2, 0.4, 0.6: mean 0.4, std 0.2, half width 0.496827 > 0.4
    c = mean_claim("m", "", [0.2, 0.4, 0.6], "")
    assert c.verdict == "not clear" and c.holds_in == 3
    assert c.low == pytest.approx(0.4 - 0.496827, abs=1e-6)
    # all zero: no spread, no effect: not clear, p = 1, each replicate a tie (P = 1/2)
    z = mean_claim("m", "", [0.0, 0.0, 0.0], "")
    assert (z.verdict, z.holds_in, z.p_holm, z.p_improve) == ("not clear", 0, 1.0, 0.5)


def test_mean_claim_refuses_nan():
    with pytest.raises(ValueError, match="non-finite"):
        mean_claim("m", "", [0.5, math.nan, 0.7], "")


# --------------------------------------------------------------------------- pooled_claim (Holm)
BASE = [50.0, 50.0, 50.0]


def _plus(diffs):
    return ([50.0 + d for d in diffs], BASE)


def test_holm_turns_two_comparisons_that_each_hold_into_a_pooled_not_clear():
    # a: differences 2.5, 3.5, 4.5 (t = 3.5 sqrt 3, t^2 = 36.75): p = 1 - sqrt(36.75 / 38.75) = 0.026148
    # b: differences 2, 3, 4 (t = 3 sqrt 3, t^2 = 27):          p = 1 - sqrt(27 / 29)       = 0.035099
    pa, pb = 1 - math.sqrt(36.75 / 38.75), 1 - math.sqrt(27 / 29)
    members = {"a": _plus([2.5, 3.5, 4.5]), "b": _plus([2.0, 3.0, 4.0])}
    # alone, each is better at 95%
    assert [comparison(n, "", *m, True, "").verdict for n, m in members.items()] == ["better", "better"]
    # pooled (K = 2): Holm p of a = 2 x 0.026148 = 0.052297 >= 0.05; of b = max(0.052297, 0.035099)
    assert holm([pa, pb]) == pytest.approx([2 * pa, 2 * pa])
    claim, pick = pooled_claim("c", "some loss helps", members, higher_is_better=True, sources="s")
    assert (claim.verdict, pick) == ("not clear", "a")  # the one with the smallest p is reported
    assert claim.p_holm == pytest.approx(0.052297, abs=1e-6)
    # a's interval at Holm's level for rank 1 of 2 (97.5%): 3.5 +- 6.205347 / sqrt 3 = 3.5 +- 3.582660
    assert claim.level == pytest.approx(0.975)
    assert claim.low == pytest.approx(3.5 - 3.582660, abs=1e-5) and claim.low < 0 < claim.high


def test_pooled_claim_holds_when_one_member_is_better_beyond_holm():
    # a: 10, 11, 12 (p = 0.0027435, Holm x 2 = 0.005487); b: 1, -1, 3 (p = 0.4778)
    members = {"b": _plus([1.0, -1.0, 3.0]), "a": _plus([10.0, 11.0, 12.0])}
    claim, pick = pooled_claim("c", "", members, higher_is_better=True, sources="")
    assert (claim.verdict, pick) == ("holds", "a") and claim.p_holm == pytest.approx(2 * 0.0027435, abs=1e-6)
    assert claim.estimate == pytest.approx(11.0) and claim.holds_in == 3
    # a member better and another worse, both beyond noise: the claim ("some member helps") holds
    members = {"worse": _plus([-10.0, -11.0, -12.0]), "better": _plus([10.0, 11.0, 12.0])}
    claim, pick = pooled_claim("c", "", members, higher_is_better=True, sources="")
    assert (claim.verdict, pick) == ("holds", "better")


def test_pooled_claim_does_not_hold_when_only_worse_members_are_beyond_holm():
    # errors: lower is better; a raises the error by 10-12 points, b is noise
    members = {"a": _plus([10.0, 11.0, 12.0]), "b": _plus([1.0, -1.0, 3.0])}
    claim, pick = pooled_claim("c", "", members, higher_is_better=False, sources="")
    assert (claim.verdict, pick) == ("does not hold", "a") and claim.holds_in == 0
    assert claim.low == pytest.approx(11 - 6.205347 / math.sqrt(3), abs=1e-5)  # 97.5%: rank 1 of 2


def test_pooled_claim_of_single_replicates_is_not_clear_with_no_interval():
    claim, pick = pooled_claim("c", "", {"a": ([3.0], [1.0]), "b": ([0.0], [1.0])}, True, "")
    assert pick is None and claim.verdict == "not clear" and math.isnan(claim.low) and math.isnan(claim.p_holm)


def test_pooled_claim_refuses_nan():
    with pytest.raises(ValueError, match="non-finite"):
        pooled_claim("c", "", {"a": _plus([10.0, math.nan, 12.0])}, True, "")


# --------------------------------------------------------------------------- stats
def test_paired_interval_of_four_replicates_by_hand():
    # differences 1, 2, 3, 4: mean 2.5, std sqrt(5/3) = 1.290994; half 3.182446 * 1.290994 / 2 = 2.054260
    d = paired_difference([11.0, 12.0, 13.0, 14.0], [10.0, 10.0, 10.0, 10.0])
    assert (d.low, d.high) == (pytest.approx(0.445740, abs=1e-5), pytest.approx(4.554260, abs=1e-5))
    assert d.verdict(lower_is_better=False) == "better" and d.verdict(lower_is_better=True) == "worse"


def _brute_force_bootstrap(wins, confidence=0.95):
    """Every one of the n^n resamples of ``wins``, each equally likely: the percentile interval of
    their means (the smallest mean whose cumulative share reaches 2.5 % and 97.5 %)."""
    n = len(wins)
    means = Counter(sum(s) / n for s in itertools.product(wins, repeat=n))
    total, cum, lo, hi = n ** n, 0, None, None
    for m in sorted(means):
        cum += means[m]
        if lo is None and cum / total >= (1 - confidence) / 2 - 1e-12:
            lo = m
        if hi is None and cum / total >= (1 + confidence) / 2 - 1e-12:
            hi = m
    return lo, hi


@pytest.mark.parametrize("wins", [[1.0, 1.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0, 0.5], [1.0, 1.0, 1.0, 1.0, 0.0],
                                  [0.5, 0.5, 0.5], [1.0, 0.0]])
def test_exact_bootstrap_interval_equals_every_resample_enumerated(wins):
    assert bootstrap_mean_interval(wins) == pytest.approx(_brute_force_bootstrap(wins))


def test_prob_improvement_counts_a_tie_as_half_and_refuses_nan():
    # wins 1, 1, 0.5, 0 over 4 replicates: P = 2.5 / 4
    imp = prob_improvement([3.0, 4.0, 5.0, 1.0], [1.0, 1.0, 5.0, 2.0])
    assert imp.p == pytest.approx(0.625) and (imp.low, imp.high) == pytest.approx(_brute_force_bootstrap([1, 1, 0.5, 0]))
    with pytest.raises(ValueError, match="non-finite"):
        prob_improvement([1.0, math.nan], [0.0, 0.0], higher_is_better=False)


def test_holm_of_four_by_hand():
    # sorted 0.01 x 4 = 0.04, 0.02 x 3 = 0.06, 0.04 x 2 = 0.08, 0.5 x 1 = 0.5 (each at least the one before)
    assert holm([0.04, 0.01, 0.02, 0.5]) == pytest.approx([0.08, 0.04, 0.06, 0.5])
    assert holm([0.03]) == [0.03]  # one comparison: nothing to correct
    assert all(math.isnan(p) for p in holm([math.nan, math.nan]))


# --------------------------------------------------------------------------- claims.csv and compare-claims
def _row(name, est, lo, hi, verdict):
    return Claim(name, "", est, lo, hi, 0.95, verdict, 3, 3, 1.0, 0.5, 1.0, 0.01, "world")


def test_claims_table_round_trips_with_six_decimals_and_nan(tmp_path):
    rows = [_row("a", 1 / 3, -0.1, 2 / 3, "not clear"), _row("b", 4.0, math.nan, math.nan, "not clear")]
    write_claims(rows, tmp_path / "c.csv")
    first = (tmp_path / "c.csv").read_bytes()
    assert b"0.333333," in first and b"0.666667," in first
    write_claims(rows, tmp_path / "c.csv")
    assert (tmp_path / "c.csv").read_bytes() == first  # byte-identical for identical results
    back = read_claims(tmp_path / "c.csv")
    assert back["claim"].tolist() == ["a", "b"] and math.isnan(back.loc[1, "low"])


def test_compare_claims_rules(tmp_path):
    ref = pd.DataFrame([_row("flip", 1.0, 0.5, 1.5, "holds").__dict__,
                        _row("weaker", 1.0, 0.5, 1.5, "holds").__dict__,
                        _row("touch", 1.0, 0.5, 1.5, "better").__dict__,
                        _row("single", 1.0, math.nan, math.nan, "not clear").__dict__])
    mine = pd.DataFrame([_row("flip", -1.0, -1.5, 0.5, "does not hold").__dict__,  # overlaps at 0.5 but flips
                         _row("weaker", 0.2, -0.3, 0.7, "not clear").__dict__,  # holds -> not clear: no flip
                         _row("touch", 2.0, 1.5, 2.5, "better").__dict__,  # [1.5, 2.5] touches [0.5, 1.5]
                         _row("single", 9.0, 8.0, 10.0, "better").__dict__])  # no committed interval to miss
    table, problems = compare_claims(mine, ref)
    assert table.set_index("claim")["agrees"].to_dict() == {"flip": "NO", "weaker": "yes", "touch": "yes",
                                                            "single": "yes"}
    assert problems == ["flip: verdict flipped from 'holds' to 'does not hold'"]
    far = mine.assign(low=mine["low"] + 5.0, high=mine["high"] + 5.0)
    _, problems = compare_claims(far[far["claim"] == "touch"], ref[ref["claim"] == "touch"])
    assert problems == ["touch: interval [+6.500, +7.500] does not overlap the committed [+0.500, +1.500]"]


def test_compare_claims_cli_exit_codes(tmp_path, capsys):
    write_claims([_row("x", 1.0, 0.5, 1.5, "better")], tmp_path / "ref.csv")
    write_claims([_row("x", 0.2, -0.3, 0.7, "not clear")], tmp_path / "weaker.csv")
    write_claims([_row("x", -1.0, -1.5, -0.5, "worse")], tmp_path / "flip.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")

    def run(*argv):
        with pytest.raises(SystemExit) as e:
            main(["compare-claims", *argv])
        out = capsys.readouterr()
        return e.value.code, out.out, out.err

    code, out, err = run(str(tmp_path / "weaker.csv"), "--against", str(tmp_path / "ref.csv"))
    assert code == 0 and "| x | better [+0.50, +1.50] | not clear [-0.30, +0.70] | yes |" in out
    assert "1 of 1 committed claims agree" in err
    code, _, err = run(str(tmp_path / "flip.csv"), "--against", str(tmp_path / "ref.csv"))
    assert code == 1 and "DIFFERS: x: verdict flipped from 'better' to 'worse'" in err
    assert "DIFFERS: x: interval [-1.500, -0.500] does not overlap" in err and "2 problem(s)" in err
    code, _, err = run(str(tmp_path / "flip.csv"), "--against", str(tmp_path / "none.csv"))
    assert code == 2 and err.count("\n") == 1 and "none.csv: no committed claims table there" in err
    code, _, err = run(str(tmp_path / "other.csv"), "--against", str(tmp_path / "ref.csv"))
    assert code == 2 and "not a claims table" in err and "Traceback" not in err


# --------------------------------------------------------------------------- the CB claim (report.cb_claims)
CB = {"losses": {"softmax": {"type": "softmax"},
                 "cb_focal": {"type": "focal", "beta": 0.9999, "gamma": 1.0},
                 "cb_softmax": {"type": "softmax", "beta": 0.9999},
                 "ldam_drw": {"type": "ldam", "beta": 0.9999, "drw_epoch": 8}}}  # not a CB loss: not pooled
SRC = {"gen10": "world + training seed"}


def _cb_cells(top1_if100: dict[str, list[float]], few=50.0) -> pd.DataFrame:
    """gen10 at IF 10 (every CB loss far worse: the claim must not read it) and IF 100."""
    rows = []
    for imb, errors in ((10.0, {"softmax": [20.0] * 3, "cb_focal": [40.0] * 3, "cb_softmax": [40.0] * 3,
                                "ldam_drw": [5.0] * 3}), (100.0, top1_if100)):
        for loss, vals in errors.items():
            for seed, v in enumerate(vals):
                rows.append({"dataset": "gen10", "imbalance": imb, "loss": loss, "setting": loss, "seed": seed,
                             "top1_error": v, "few_acc": few, "balanced_acc": 100.0 - v})
    return pd.DataFrame(rows)


def _cb(cells):
    from finetail.report import cb_claims

    lines, rows = cb_claims(cells, CB, "softmax", SRC)
    return lines, {r.claim: r for r in rows}


def test_cb_claim_holds_at_the_highest_imbalance():
    # IF 100, errors minus softmax: cb_focal -10, -11, -12 (p = 0.0027435); cb_softmax -1, +1, -1 (noise);
    # ldam_drw far better, but it is not a class-balanced loss, so it is not among the K = 2 pooled
    lines, rows = _cb(_cb_cells({"softmax": [30.0, 31.0, 32.0], "cb_focal": [20.0, 20.0, 20.0],
                                 "cb_softmax": [29.0, 32.0, 31.0], "ldam_drw": [1.0, 1.0, 1.0]}))
    assert set(rows) == {"cb_helps:gen10:if100:top1_error", "cb_helps:gen10:if100:few_acc"}
    top1 = rows["cb_helps:gen10:if100:top1_error"]
    assert top1.verdict == "holds" and top1.p_holm == pytest.approx(2 * 0.0027435, abs=1e-6)
    assert "(Holm over 2)" in top1.statement
    # the deciding loss at 97.5%: -11 +- 6.205347 / sqrt 3 = -11 +- 3.582660
    assert lines[1] == ("- **gen10, imbalance 100: class-balanced weighting lowers top-1 error — holds**: "
                        "-11.0 [-14.6, -7.4] at Holm's 97.5% level (2 CB loss(es), Holm-corrected; deciding loss "
                        "cb_focal; points); holds in 3 of 3 replicates; P(better) = 1.00 [1.00, 1.00]; interval over "
                        "replicates covering world + training seed.\n")
    # few-shot accuracy equal everywhere: no effect, not clear
    assert rows["cb_helps:gen10:if100:few_acc"].verdict == "not clear"
    assert "raises few-shot accuracy — not clear" in lines[0]


def test_cb_claim_does_not_hold_when_a_cb_loss_is_worse_beyond_noise():
    _, rows = _cb(_cb_cells({"softmax": [30.0, 31.0, 32.0], "cb_focal": [40.0, 42.0, 44.0],
                             "cb_softmax": [31.0, 30.0, 33.0], "ldam_drw": [1.0, 1.0, 1.0]}))
    top1 = rows["cb_helps:gen10:if100:top1_error"]
    assert top1.verdict == "does not hold" and top1.holds_in == 0 and top1.estimate == pytest.approx(11.0)


def test_cb_claim_is_not_clear_when_each_cb_loss_alone_would_be_better():
    # errors minus softmax: cb_focal -2.5, -3.5, -4.5 (p 0.026148), cb_softmax -2, -3, -4 (p 0.035099):
    # each "better" in the paired table, the pooled claim Holm-corrected not clear (Holm p 0.052297)
    from finetail.report import paired_table

    cells = _cb_cells({"softmax": [30.0, 30.0, 30.0], "cb_focal": [27.5, 26.5, 25.5], "cb_softmax": [28.0, 27.0, 26.0],
                       "ldam_drw": [30.0, 30.0, 30.0]})
    p = paired_table(cells, "softmax")
    alone = p[(p["imbalance"] == 100.0) & (p["metric"] == "top1_error")].set_index("loss")["verdict"]
    assert alone.to_dict() == {"cb_focal": "better", "cb_softmax": "better", "ldam_drw": "not clear"}
    lines, rows = _cb(cells)
    top1 = rows["cb_helps:gen10:if100:top1_error"]
    assert top1.verdict == "not clear" and top1.p_holm == pytest.approx(0.052297, abs=1e-6)
    assert "lowers top-1 error — not clear" in lines[1]


def test_cb_claim_refuses_a_nan_and_replicates_that_differ():
    cells = _cb_cells({"softmax": [30.0, 31.0, 32.0], "cb_focal": [20.0, 21.0, np.nan],
                       "cb_softmax": [29.0, 32.0, 31.0], "ldam_drw": [1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match=r"top1_error of cb_focal is absent from replicate\(s\) \[2\] of its 3"):
        _cb(cells)
    from finetail.report import comparison_claims, paired_table

    with pytest.raises(ValueError, match="absent from replicate"):  # the paired table and its claims.csv rows too
        paired_table(cells, "softmax")
    with pytest.raises(ValueError, match="absent from replicate"):
        comparison_claims(cells, "softmax", "world")
    cells = _cb_cells({"softmax": [30.0, 31.0, 32.0], "cb_focal": [20.0, 21.0],
                       "cb_softmax": [29.0, 32.0, 31.0], "ldam_drw": [1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match=r"cb_focal and softmax ran different replicates \(\[0, 1\] vs \[0, 1, 2\]\)"):
        _cb(cells)


def test_every_paired_comparison_is_a_claims_row_with_a_stable_id():
    from finetail.report import comparison_claims

    cells = _cb_cells({"softmax": [30.0, 31.0, 32.0], "cb_focal": [20.0, 20.0, 20.0],
                       "cb_softmax": [29.0, 32.0, 31.0], "ldam_drw": [40.0, 42.0, 44.0]})
    rows = {r.claim: r for r in comparison_claims(cells, "softmax", "world")}
    # 3 losses x 2 imbalance factors x 3 metrics (top-1 error, few-shot and balanced accuracy)
    assert len(rows) == 18
    assert rows["cbloss:gen10:if100:cb_focal-vs-softmax:top1_error"].verdict == "better"  # lower error
    assert rows["cbloss:gen10:if100:cb_focal-vs-softmax:balanced_acc"].verdict == "better"  # higher accuracy
    assert rows["cbloss:gen10:if100:ldam_drw-vs-softmax:top1_error"].verdict == "worse"  # +10, +11, +12
    assert rows["cbloss:gen10:if100:cb_softmax-vs-softmax:top1_error"].verdict == "not clear"
    assert rows["cbloss:gen10:if10:cb_focal-vs-softmax:top1_error"].verdict == "worse"  # 40 vs 20, no spread
    assert rows["cbloss:gen10:if100:cb_focal-vs-softmax:few_acc"].verdict == "not clear"
    assert rows["cbloss:gen10:if100:cb_focal-vs-softmax:top1_error"].statement == (
        "cb_focal vs softmax, top-1 error (points), gen10 IF 100")


def test_cb_claim_without_a_metric_anywhere_or_without_a_baseline():
    from finetail.report import cb_claims

    # few-shot accuracy absent from every run (no few-shot class): no few-shot claim, no error
    lines, rows = _cb(_cb_cells({"softmax": [30.0, 31.0, 32.0], "cb_focal": [20.0, 20.0, 20.0],
                                 "cb_softmax": [29.0, 32.0, 31.0], "ldam_drw": [1.0, 1.0, 1.0]}, few=np.nan))
    assert list(rows) == ["cb_helps:gen10:if100:top1_error"] and len(lines) == 1
    cells = _cb_cells({"softmax": [30.0] * 3, "cb_focal": [20.0] * 3, "cb_softmax": [29.0] * 3, "ldam_drw": [1.0] * 3})
    assert cb_claims(cells, CB, None, SRC) == (
        ["- Class-balanced weighting vs softmax: no paired comparison (no unweighted softmax baseline).\n"], [])
    only = {"losses": {"softmax": {"type": "softmax"}, "ldam_drw": CB["losses"]["ldam_drw"]}}
    assert cb_claims(cells, only, "softmax", SRC)[0] == [
        "- Class-balanced weighting vs softmax: no paired comparison (no class-balanced loss in the grid).\n"]


# --------------------------------------------------------------------------- similarity claim
SOURCES, TARGETS = ["A", "B", "C"], ["t1", "t2"]
SIM = pd.DataFrame({"t1": [0.9, 0.6, 0.3], "t2": [0.8, 0.5, 0.2]}, index=SOURCES)  # A most similar, then B, C
# accuracies of (A, B, C) giving each within-target Kendall tau against the similarity order A > B > C:
ACC_FOR_TAU = {1.0: (60.0, 50.0, 40.0), 1 / 3: (60.0, 40.0, 50.0), -1 / 3: (50.0, 40.0, 60.0),
               -1.0: (40.0, 50.0, 60.0)}


def _transfer(taus: list[tuple[float, float]], sources=SOURCES):
    """Fine-tune rows and similarity matrices of replicates whose (t1, t2) taus are ``taus``."""
    rows = []
    for r, per_target in enumerate(taus):
        for t, tau in zip(TARGETS, per_target, strict=True):
            for s, acc in zip(SOURCES, ACC_FOR_TAU[tau], strict=True):
                if s in sources:
                    rows.append({"source": s, "target": t, "seed": r, "top1_acc": acc})
    sims = {r: SIM.loc[sources] for r in range(len(taus))}
    return pd.DataFrame(rows), sims


def _similarity_claim(taus, sources=SOURCES):
    from finetail.report import (
        similarity_claim,
        similarity_correlation,
        similarity_pairs,
    )

    df, sims = _transfer(taus, sources)
    corr = similarity_correlation(df, sims, similarity_pairs(df, sims))
    return corr, *similarity_claim(corr, "world + training seed")


def test_similarity_claim_holds():
    # per replicate, the mean over targets of tau: (1 + 1) / 2, (1 + 1/3) / 2, 1 = 1, 2/3, 1: mean 8/9,
    # std sqrt(3) / 9, half width 4.302653 * (sqrt 3 / 9) / sqrt 3 = 4.302653 / 9 = 0.478073
    corr, line, claim = _similarity_claim([(1.0, 1.0), (1.0, 1 / 3), (1.0, 1.0)])
    assert corr["within_target_kendall_per_replicate"] == {0: pytest.approx(1.0), 1: pytest.approx(2 / 3),
                                                           2: pytest.approx(1.0)}
    assert claim.verdict == "holds" and claim.estimate == pytest.approx(8 / 9)
    assert (claim.low, claim.high) == (pytest.approx(8 / 9 - 0.478073, abs=1e-5), pytest.approx(8 / 9 + 0.478073, abs=1e-5))
    assert line.startswith("- **Domain similarity predicts which source transfers best — holds**: +0.9 [+0.4, +1.4]")
    assert "Kendall τ per replicate: 1.00, 0.67, 1.00" in line and "holds in 3 of 3 replicates" in line
    # replicate means: A best on both targets, and A is the most similar to both
    assert corr["most_similar_is_best"] == {"t1": True, "t2": True}
    assert line.endswith("The most similar source is the best one on 2 of 2 targets (replicate means).\n")


def test_similarity_claim_does_not_hold():
    corr, line, claim = _similarity_claim([(-1.0, -1.0), (-1.0, -1 / 3), (-1.0, -1.0)])
    assert claim.verdict == "does not hold" and claim.high == pytest.approx(-8 / 9 + 0.478073, abs=1e-5)
    assert corr["most_similar_is_best"] == {"t1": False, "t2": False} and "best one on 0 of 2 targets" in line


def test_similarity_claim_not_clear():
    # 1, -1/3, 1/3: mean 1/3, std 2/3, half width 4.302653 * (2/3) / sqrt 3 = 1.656092
    _, line, claim = _similarity_claim([(1.0, 1.0), (-1.0, 1 / 3), (1 / 3, 1 / 3)])
    assert claim.verdict == "not clear" and claim.low == pytest.approx(1 / 3 - 1.656092, abs=1e-5)
    assert "— not clear**" in line


def test_similarity_claim_of_one_replicate_has_no_verdict():
    # tau 1 on both targets, but one replicate: no spread to judge by, so not clear, and said so
    _, line, claim = _similarity_claim([(1.0, 1.0)])
    assert claim.verdict == "not clear" and claim.replicates == 1 and math.isnan(claim.low)
    assert "— not clear**: +1.0 (one replicate: no interval)" in line


def test_similarity_claim_with_too_few_sources_to_rank():
    _, line, claim = _similarity_claim([(1.0, 1.0), (1.0, 1.0)], sources=["A", "B"])
    assert claim is None and line == "- Similarity vs fine-tune accuracy: too few sources per target to rank.\n"


def test_similarity_claim_refuses_a_nan_similarity_or_accuracy():
    from finetail.report import similarity_pairs

    df, sims = _transfer([(1.0, 1.0), (1.0, 1.0)])
    sims[1] = sims[1].copy()
    sims[1].loc["B", "t2"] = np.nan
    with pytest.raises(ValueError, match=r"similarity of B -> t2 in replicate 1 is nan"):
        similarity_pairs(df, sims)
    df, sims = _transfer([(1.0, 1.0), (1.0, 1.0)])
    df.loc[3, "top1_acc"] = np.nan
    from finetail.report import similarity_correlation

    with pytest.raises(ValueError, match="non-finite"):
        similarity_correlation(df, sims, similarity_pairs(df, sims))


def test_correlations_by_hand_and_nan_refused():
    from finetail.report import correlations

    # y = 1, 3, 2, 4 against x = 1, 2, 3, 4: rank differences 0, 1, -1, 0, sum of squares 2:
    # Spearman rho = 1 - 6 * 2 / (4 * 15) = 0.8; t = 0.8 sqrt(2 / 0.36), t^2 / (t^2 + 2) = 0.64: p = 0.2.
    # Kendall: 5 concordant pairs, 1 discordant: tau = 4/6; exactly, 4 of the 24 orders have at most one
    # inversion (and 4 at least five): two-sided p = 8/24.
    c = correlations(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0]))
    assert c == {"n": 4, "spearman": pytest.approx(0.8), "spearman_p": pytest.approx(0.2),
                 "kendall": pytest.approx(2 / 3), "kendall_p": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="non-finite"):
        correlations(np.array([1.0, 2.0, np.nan, 4.0]), np.array([1.0, 2.0, 3.0, 4.0]))


# --------------------------------------------------------------------------- best score claim
def _score_table(per_seed: dict[str, dict[int, float]]):
    rows = []
    for score, taus in per_seed.items():
        m = float(np.nanmean(list(taus.values())))
        rows.append({"score": score, "label": score.upper(), "mean_tau": m, "mean_weighted_tau": m,
                     "seed_tau_mean": m, "seed_tau_std": 0.1})
    return pd.DataFrame(rows)


def test_best_score_claim_ahead_of_every_other_score():
    from finetail.transfer_eval import best_score_claim

    # a minus b: 0.8, 0.75, 0.85 (mean 0.8, std 0.05, t = 27.7); a minus c: 0.6, 0.7, 0.65 (t = 22.5):
    # both Holm-adjusted p far below 0.05
    per_seed = {"a": {0: 0.9, 1: 0.8, 2: 0.85}, "b": {0: 0.1, 1: 0.05, 2: 0.0}, "c": {0: 0.3, 1: 0.1, 2: 0.2}}
    line, rows = best_score_claim(_score_table(per_seed), per_seed, "world")
    assert line.startswith("- **Which score predicts transfer**: A ranked the sources best")
    assert line.endswith(", ahead of every other score beyond replicate noise (per-replicate τ, paired, Holm).\n")
    assert [r.claim for r in rows] == ["transfer:score:a-vs-c:tau", "transfer:score:a-vs-b:tau", "transfer:best_score:a"]
    assert [r.verdict for r in rows] == ["better", "better", "holds"]
    # Holm over the two rivals: the smaller p doubled, the larger kept (at least the one before)
    pc, pb = p_df2(0.65 / (0.05 / math.sqrt(3))), p_df2(0.8 / (0.05 / math.sqrt(3)))
    assert rows[0].p_holm == pytest.approx(max(2 * pb, pc)) and rows[1].p_holm == pytest.approx(2 * pb)


def test_best_score_claim_ahead_of_some_but_not_all():
    from finetail.transfer_eval import best_score_claim

    # a minus c: 0.05, -0.1, 0.15: not clear
    per_seed = {"a": {0: 0.9, 1: 0.8, 2: 0.85}, "c": {0: 0.85, 1: 0.9, 2: 0.7}, "b": {0: 0.1, 1: 0.05, 2: 0.0}}
    line, rows = best_score_claim(_score_table(per_seed), per_seed)
    assert "; ahead of B beyond replicate noise, not of C (per-replicate τ, paired over replicates, Holm).\n" in line
    assert rows[-1].verdict == "holds"  # the pooled row: some rival beaten


def test_best_score_claim_with_one_replicate_or_a_score_that_ranks_in_too_few():
    from finetail.transfer_eval import best_score_claim

    one = {"a": {0: 0.9}, "b": {0: 0.1}}
    line, rows = best_score_claim(_score_table(one), one)
    assert line.endswith("; one replicate, so whether its lead is beyond replicate noise cannot be told.\n")
    assert rows == []
    # b ranks nothing (NaN) in two of three replicates: fewer than two shared replicates, no comparison row
    nan_b = {"a": {0: 0.9, 1: 0.8, 2: 0.85}, "b": {0: 0.1, 1: math.nan, 2: math.nan}}
    line, rows = best_score_claim(_score_table(nan_b), nan_b)
    assert rows == [] and "no score beats the others" in line
    empty = pd.DataFrame([{"score": "a", "label": "A", "mean_tau": math.nan, "mean_weighted_tau": math.nan,
                           "seed_tau_mean": math.nan, "seed_tau_std": math.nan}])
    assert best_score_claim(empty, {"a": {0: math.nan}})[0] == (
        "- **Which score predicts transfer**: no score ranks the sources on any target (too few sources).\n")


# --------------------------------------------------------------------------- greedy vs random claim
SEL_SPEC = {
    "transfer": {"targets": TARGETS, "sources": {"generic": ["generic"]},
                 "selection": {"name": "selected", "pool": ["generic"], "random": {"name": "random", "seed": 0}}},
    "datasets": {"generic": {"kind": "world"}, "t1": {"kind": "world"}, "t2": {"kind": "world"}},
    "replicates": {"count": 3}, "selected": "selected", "random": "random",
}


def _selection(tmp_path, diffs, random_counts=(100, 100, 100)):
    """Greedy vs random over 3 replicates: selected minus random = ``diffs`` on both targets; the
    random source holds ``random_counts`` training images per replicate (the selection 100)."""
    from finetail.layout import Layout
    from finetail.replicates import Replicates
    from finetail.transfer_eval import _selection_part

    layout, rep = Layout.at(tmp_path), Replicates.of(SEL_SPEC)
    for name, counts in (("selected", (100, 100, 100)), ("random", random_counts)):
        for r, n in enumerate(counts):
            path = Path(layout.source(name, "classes.csv", rep=rep.source_key(name, r)))
            path.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"class_name": ["x", "y"], "train_count": [n // 2, n - n // 2]}).to_csv(path, index=False)
    rows = []
    for r, d in enumerate(diffs):
        for t, base in (("t1", 50.0), ("t2", 30.0)):
            rows += [{"source": "selected", "target": t, "seed": r, "top1_acc": base + d},
                     {"source": "random", "target": t, "seed": r, "top1_acc": base},
                     {"source": "generic", "target": t, "seed": r, "top1_acc": base + 10.0}]  # the whole pool
    out = tmp_path / "report"
    out.mkdir()
    return _selection_part(tmp_path, SEL_SPEC, out, pd.DataFrame(rows), "selected", "random")


def test_greedy_vs_random_better(tmp_path):
    # differences 5, 6, 4.5: mean 5.1667, std 0.7638, half width 4.302653 * 0.7638 / sqrt 3 = 1.897
    _, _, claim, rows = _selection(tmp_path, [5.0, 6.0, 4.5])
    assert [r.claim for r in rows] == ["transfer:selected-vs-random:t1", "transfer:selected-vs-random:t2",
                                       "transfer:selected-vs-random:mean"]
    m = rows[-1]
    assert m.verdict == "better" and m.estimate == pytest.approx(31 / 6)
    assert m.low == pytest.approx(31 / 6 - T975_2 * math.sqrt(7 / 12) / math.sqrt(3), abs=1e-5)
    assert claim.startswith("- **Is greedy selection worth it? — better**: greedy selection beats random classes: "
                            "`selected` − `random` = +5.2 [+3.3, +7.1] points on the mean over targets")
    assert "same number of classes and images in every replicate" in claim
    table = pd.read_csv(tmp_path / "report" / "selection_vs_random.csv").set_index("target")
    assert table.loc["mean", "pool_mean"] == pytest.approx(50.0)  # (60 + 40) / 2, the whole pool beside them


def test_greedy_vs_random_worse_and_not_clear(tmp_path):
    _, _, claim, rows = _selection(tmp_path / "w", [-5.0, -6.0, -4.5])
    assert rows[-1].verdict == "worse" and "random classes beat greedy selection" in claim
    _, _, claim, rows = _selection(tmp_path / "n", [1.0, -1.0, 3.0], random_counts=(100, 90, 100))
    assert rows[-1].verdict == "not clear" and "not clear whether greedy selection beats random classes" in claim
    assert "NOT the same size: 2 classes, 100 training images vs 2 classes, 90–100 training images" in claim


def test_greedy_vs_random_refuses_a_missing_replicate(tmp_path):
    from finetail.transfer_eval import selection_ablation

    rows = [{"source": s, "target": "t1", "seed": r, "top1_acc": 50.0 + r} for s in ("selected", "random")
            for r in range(3)]
    acc = pd.DataFrame(rows[:-1])  # random lacks replicate 2
    with pytest.raises(ValueError, match="non-finite"):
        selection_ablation(acc, "selected", "random", None, ["t1"])


# --------------------------------------------------------------------------- report tables
def test_paper_table_reads_the_shipped_reference_numbers():
    from finetail.report import paper_table

    t2 = paper_table("cbloss_cifar_table2").set_index(["dataset", "loss"])
    assert t2.loc[("cifar10", "softmax"), "if100"] == pytest.approx(29.64)  # Cui et al. 2019, Table 2
    assert t2.loc[("cifar100", "class_balanced_best"), "if10"] == pytest.approx(42.01)
    sim = paper_table("domain_similarity").set_index("source")
    assert sim.shape == (3, 7) and sim.loc["inat2017", "nabirds"] == pytest.approx(0.686)
    with pytest.raises(FileNotFoundError):
        paper_table("no_such_table")


def _finetune(results, rows: dict[tuple[str, str, int], float | None]):
    from finetail.layout import Layout

    for (s, t, seed), acc in rows.items():
        path = Path(Layout.at(results).train("finetune", source=s, target=t, seed=seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rule": "finetune", "run_id": f"{s}{t}{seed}", "parent_run_id": f"p{s}{seed}",
                                    "final": {"top1_acc": acc, "ece": 0.05}}))


def test_transfer_frame_and_table_by_hand(tmp_path):
    from finetail.report import transfer_frame, transfer_table

    _finetune(tmp_path, {("A", "t1", 0): 0.5, ("A", "t1", 1): 0.6, ("A", "t2", 0): 0.3, ("A", "t2", 1): 0.3,
                         ("B", "t1", 0): 0.4, ("B", "t1", 1): 0.4, ("B", "t2", 0): 0.2, ("B", "t2", 1): 0.1})
    df = transfer_frame(tmp_path, ["A", "B"], ["t1", "t2"], [0, 1])
    assert len(df) == 8 and df.loc[0, "top1_acc"] == pytest.approx(50.0) and df.loc[0, "ece"] == pytest.approx(5.0)
    assert df.loc[0, ["run_id", "parent_run_id"]].tolist() == ["At10", "pA0"]
    t = transfer_table(df, ["A", "B"], ["t1", "t2"]).set_index("source")
    # A on t1: 50, 60: mean 55, std sqrt(50) = 7.0711; mean over targets (55 + 30) / 2 = 42.5
    assert t.loc["A", "t1_mean"] == pytest.approx(55.0) and t.loc["A", "t1_std"] == pytest.approx(math.sqrt(50))
    assert t.loc["A", "t1_n"] == 2 and t.loc["A", "mean"] == pytest.approx(42.5)
    assert t.loc["B", "t2_mean"] == pytest.approx(15.0) and t.loc["B", "mean"] == pytest.approx(27.5)


def test_transfer_frame_refuses_a_nan_or_absent_accuracy_and_a_missing_run(tmp_path):
    from finetail.report import transfer_frame

    _finetune(tmp_path, {("A", "t1", 0): 0.5, ("A", "t1", 1): float("nan")})
    with pytest.raises(ValueError, match=r"seed1/metrics.json: top1_acc is nan"):
        transfer_frame(tmp_path, ["A"], ["t1"], [0, 1])
    _finetune(tmp_path, {("A", "t1", 1): None})  # absent: NaN in the frame, which may not be averaged
    with pytest.raises(ValueError, match="non-finite"):
        transfer_frame(tmp_path, ["A"], ["t1"], [0, 1])
    with pytest.raises(FileNotFoundError, match="run the finetune job for A -> t1, replicate 2 first"):
        transfer_frame(tmp_path, ["A"], ["t1"], [0, 1, 2])


def test_cell_statistics_count_only_complete_cells():
    from finetail.report import _cell_stats

    df = pd.DataFrame({"cell": ["x", "x", "x", "y", "y", "z", "z"],
                       "v": [1.0, 2.0, 6.0, np.nan, np.nan, 1.0, np.nan]})
    with pytest.raises(ValueError, match=r"v of \{'cell': 'z'\} is absent from 1 of its 2 runs"):
        _cell_stats(df, ["cell"], "v")
    st = _cell_stats(df[df["cell"] != "z"], ["cell"], "v").set_index("cell")
    # x: 1, 2, 6: mean 3, deviations -2, -1, 3, squares 14 / 2 = 7; y: absent everywhere, n 0
    assert st.loc["x"].tolist() == [pytest.approx(3.0), pytest.approx(math.sqrt(7)), 3]
    assert math.isnan(st.loc["y", "mean"]) and st.loc["y", "n"] == 0

