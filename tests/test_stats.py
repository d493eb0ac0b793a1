"""Spread over replicates: the mean/std/n, paired-CI, P(A > B) and Holm arithmetic on hand-made numbers."""

import math

import pytest

from finetail.stats import (
    bootstrap_mean_interval,
    format_mean_std,
    holm,
    mean_interval,
    paired_difference,
    prob_improvement,
    summarize,
)


def test_summary_is_mean_sample_std_and_n():
    s = summarize([10.0, 12.0, 17.0])
    # mean 13; deviations -3, -1, 4; squares 9 + 1 + 16 = 26; / (3 - 1) = 13; sqrt = 3.6056
    assert s.n == 3 and s.mean == pytest.approx(13.0) and s.std == pytest.approx(math.sqrt(13.0))


def test_one_seed_has_no_spread_and_says_so():
    s = summarize([42.0])
    assert (s.mean, s.n) == (42.0, 1) and math.isnan(s.std)
    assert format_mean_std(s.mean, s.std) == "42.00 ± —"
    assert format_mean_std(13.0, math.sqrt(13.0)) == "13.00 ± 3.61"


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nan_result_is_never_averaged(bad):
    with pytest.raises(ValueError, match="non-finite"):
        summarize([1.0, bad, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        paired_difference([1.0, 2.0], [bad, 2.0])


def test_paired_interval_by_hand():
    # differences a - b: -3, -2.5, -3.5: mean -3, sample std 0.5, n 3.
    # t(0.975, df=2) = 4.302652729911275; half width = 4.3027 * 0.5 / sqrt(3) = 1.24207
    d = paired_difference([30.0, 31.0, 29.0], [33.0, 33.5, 32.5])
    assert d.n == 3 and d.mean == pytest.approx(-3.0)
    assert d.low == pytest.approx(-3.0 - 1.242069, abs=1e-5) and d.high == pytest.approx(-3.0 + 1.242069, abs=1e-5)
    assert d.excludes_zero()
    assert d.verdict(lower_is_better=True) == "better"  # a lower error
    assert d.verdict(lower_is_better=False) == "worse"  # a lower accuracy


def test_an_interval_that_covers_zero_is_no_clear_difference():
    # differences +1, -1, +3: mean 1, std 2, half width 4.3027 * 2 / sqrt(3) = 4.968 > 1
    d = paired_difference([11.0, 9.0, 13.0], [10.0, 10.0, 10.0])
    assert d.low < 0 < d.high and not d.excludes_zero()
    assert d.verdict(lower_is_better=True) == "not clear"


def test_pairing_needs_the_same_seeds_and_one_seed_gives_no_interval():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])
    d = paired_difference([1.0], [3.0])
    assert d.mean == -2.0 and math.isnan(d.low) and d.verdict(lower_is_better=True) == "not clear"


def test_paired_p_value_by_hand():
    # differences -3, -2.5, -3.5: t = -3 / (0.5 / sqrt 3) = -10.392; two-sided p with 2 df:
    # p = 1 - |t| / sqrt(t^2 + 2) (the t(2) distribution's closed form) = 1 - 10.392 / 10.488 = 0.009133
    d = paired_difference([30.0, 31.0, 29.0], [33.0, 33.5, 32.5])
    assert d.p == pytest.approx(1 - 10.392305 / math.sqrt(10.392305**2 + 2), abs=1e-5)
    # an interval that covers 0 has p above 0.05; one that excludes it, below
    wide = paired_difference([11.0, 9.0, 13.0], [10.0, 10.0, 10.0])
    assert wide.p > 0.05 and d.p < 0.05


def test_mean_interval_is_the_one_sample_t_interval():
    # values 0.2, 0.4, 0.6: mean 0.4, std 0.2, half width 4.3027 * 0.2 / sqrt 3 = 0.49683
    m = mean_interval([0.2, 0.4, 0.6])
    assert m.mean == pytest.approx(0.4) and m.low == pytest.approx(0.4 - 0.496827, abs=1e-5)
    assert m.verdict(lower_is_better=False) == "not clear"


def test_probability_of_improvement_by_hand():
    # replicate 0: 2 > 1 (win), 1: 3 > 1 (win), 2: 1 < 2 (loss): P = 2/3.
    # Bootstrap of the mean of 3 draws from {1, 1, 0}: wins ~ Binomial(3, 2/3):
    # P(0 wins) = 1/27 = 0.037 >= 0.025, so the low end is 0/3; P(<= 2 wins) = 19/27 = 0.70 < 0.975,
    # so the high end is 3/3.
    imp = prob_improvement([2.0, 3.0, 1.0], [1.0, 1.0, 2.0])
    assert (imp.p, imp.low, imp.high, imp.n) == (pytest.approx(2 / 3), 0.0, 1.0, 3)
    # lower is better (an error): the same numbers read the other way round
    assert prob_improvement([2.0, 3.0, 1.0], [1.0, 1.0, 2.0], higher_is_better=False).p == pytest.approx(1 / 3)
    # a tie counts one half
    assert prob_improvement([1.0, 2.0], [1.0, 1.0]).p == pytest.approx(0.75)


def test_bootstrap_interval_of_many_replicates_by_hand():
    # 10 replicates, 9 wins and 1 loss: the number of losses among 10 draws ~ Binomial(10, 0.1);
    # P(0 losses) = 0.9^10 = 0.3487 >= 0.025: the high end is 10/10;
    # P(losses >= 3) = 1 - (0.3487 + 0.3874 + 0.1937) = 0.0702 and P(losses >= 4) = 0.0128:
    # the 2.5 % quantile of the wins is 10 - 3 = 7, i.e. 0.7.
    assert bootstrap_mean_interval([1.0] * 9 + [0.0]) == (0.7, 1.0)
    assert bootstrap_mean_interval([1.0] * 5) == (1.0, 1.0)
    with pytest.raises(ValueError, match="wins, ties and losses"):
        bootstrap_mean_interval([0.3, 1.0])


def test_holm_by_hand():
    # p = 0.01, 0.04, 0.03 (K = 3): sorted 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # at alpha 0.05 only the first is significant, although 0.03 and 0.04 are each below 0.05
    assert [p < 0.05 for p in holm([0.01, 0.04, 0.03])] == [True, False, False]
    # capped at 1; a NaN (no test) stays NaN and does not count in K
    out = holm([0.6, math.nan, 0.4])
    assert out[0] == pytest.approx(0.8) and math.isnan(out[1]) and out[2] == pytest.approx(0.8)
