"""Spread over seeds: the mean/std/n and paired-CI arithmetic on hand-made numbers."""

import math

import pytest

from finetail.stats import format_mean_std, paired_difference, summarize


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
    assert d.verdict(lower_is_better=True) == "no clear difference"


def test_pairing_needs_the_same_seeds_and_one_seed_gives_no_interval():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])
    d = paired_difference([1.0], [3.0])
    assert d.mean == -2.0 and math.isnan(d.low) and d.verdict(lower_is_better=True) == "no clear difference"
