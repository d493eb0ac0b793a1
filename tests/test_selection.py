"""Tests for finetail.selection (greedy source-class selection, Cui et al. CVPR 2018)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from finetail import selection
from finetail.selection import SELECTION_COLUMNS, concat_class_stats
from finetail.similarity import DEFAULT_MIN_SOURCE_IMAGES, ClassStats

# The toy world has 5-60 images per class: the min_source_images filter (default
# DEFAULT_MIN_SOURCE_IMAGES = 200) is off here unless a test sets it.
greedy_select = functools.partial(selection.greedy_select, min_source_images=0)

# 1-d toy world. Target T1: classes at 0 (3 images) and 4 (1 image), so a source class at x
# has point-mass EMD (3|x| + |x - 4|) / 4. Target T2: one class at 10, EMD |x - 10|.
#   class  x    EMD to T1            EMD to T2
#   a      0    (0 + 4)/4  = 1.0     10
#   b      1    (3 + 3)/4  = 1.5      9
#   c      2    (6 + 2)/4  = 2.0      8
#   d     -1    (3 + 5)/4  = 2.0     11   (ties with c on T1: c wins by name)
#   e     10    (30 + 6)/4 = 9.0      0
#   f      4    (12 + 0)/4 = 3.0      6
POS = {"a": 0.0, "b": 1.0, "c": 2.0, "d": -1.0, "e": 10.0, "f": 4.0}
EMD_T1 = {"a": 1.0, "b": 1.5, "c": 2.0, "d": 2.0, "e": 9.0, "f": 3.0}
EMD_T2 = {k: abs(x - 10.0) for k, x in POS.items()}


def sim(d, gamma=0.01):
    return math.exp(-gamma * d)


@pytest.fixture
def source():
    # listed out of name order, so that ordering is really the function's doing
    names = ["f", "d", "e", "c", "b", "a"]
    return ClassStats(
        means=[[POS[n]] for n in names],
        counts=[60, 40, 5, 30, 20, 10],
        class_names=names,
        meta={"model": "toy"},
    )


@pytest.fixture
def targets():
    return {
        "T1": ClassStats([[0.0], [4.0]], [3, 1], ["t1a", "t1b"]),
        "T2": ClassStats([[10.0]], [7], ["t2"]),
    }


def test_top_k_single_target(source, targets):
    out = greedy_select(source, {"T1": targets["T1"]}, top_k=3)
    assert list(out.columns) == list(SELECTION_COLUMNS)
    assert out["class_name"].tolist() == ["a", "b", "c"]  # c beats d on the tie by name
    np.testing.assert_allclose(out["score"], [sim(1.0), sim(1.5), sim(2.0)], rtol=1e-12)
    assert out["best_target"].tolist() == ["T1"] * 3
    assert out["targets"].tolist() == ["T1"] * 3
    assert out["count"].tolist() == [10, 20, 30]
    assert out.index.tolist() == [0, 1, 2]


def test_top_k_larger_than_pool_keeps_all(source, targets):
    out = greedy_select(source, {"T1": targets["T1"]}, top_k=100)
    assert out["class_name"].tolist() == ["a", "b", "c", "d", "f", "e"]


def test_threshold_single_target(source, targets):
    out = greedy_select(source, {"T1": targets["T1"]}, threshold=sim(2.0) - 1e-12)
    assert out["class_name"].tolist() == ["a", "b", "c", "d"]  # the c/d tie: both in, by name
    assert greedy_select(source, {"T1": targets["T1"]}, threshold=1.0).empty
    assert list(greedy_select(source, {"T1": targets["T1"]}, threshold=1.0).columns) == list(SELECTION_COLUMNS)


def test_union_over_two_targets(source, targets):
    out = greedy_select(source, targets, top_k=3).set_index("class_name")
    # T1 keeps a, b, c; T2 keeps e (0), f (6), c (8)
    assert sorted(out.index) == ["a", "b", "c", "e", "f"]
    assert out.loc["c", "targets"] == "T1;T2"
    assert out.loc["c", "best_target"] == "T1"
    assert out.loc["c", "score"] == pytest.approx(sim(2.0))
    assert out.loc["e", "targets"] == "T2" and out.loc["e", "score"] == pytest.approx(1.0)
    assert out.loc["f", "targets"] == "T2" and out.loc["f", "score"] == pytest.approx(sim(6.0))
    assert out.loc["a", "targets"] == "T1"
    # sorted by score descending
    assert out.index.tolist() == ["e", "a", "b", "c", "f"]
    # order of the targets mapping decides the join order
    rev = greedy_select(source, {"T2": targets["T2"], "T1": targets["T1"]}, top_k=3)
    assert rev.set_index("class_name").loc["c", "targets"] == "T2;T1"


def test_threshold_union_score_is_max_over_targets(source, targets):
    thr = sim(6.0) - 1e-12  # T1: a b c d f (EMD <= 3); T2: e f (0, 6)
    out = greedy_select(source, targets, threshold=thr).set_index("class_name")
    assert sorted(out.index) == ["a", "b", "c", "d", "e", "f"]
    assert out.loc["f", "targets"] == "T1;T2"
    assert out.loc["f", "best_target"] == "T1"
    assert out.loc["f", "score"] == pytest.approx(max(sim(EMD_T1["f"]), sim(EMD_T2["f"])))


def test_min_source_images_eligibility(source, targets):
    out = greedy_select(source, targets, top_k=2, min_source_images=10)
    # e (5 images) is not eligible: T2 keeps f and c instead; T1 keeps a and b
    assert sorted(out["class_name"]) == ["a", "b", "c", "f"]
    out = greedy_select(source, targets, top_k=2, min_source_images=25)
    # eligible: f (60), d (40), c (30); T1 -> c, d (EMD 2, 2); T2 -> f, c (EMD 6, 8)
    assert sorted(out["class_name"]) == ["c", "d", "f"]
    with pytest.raises(ValueError, match="no eligible source class"):
        greedy_select(source, targets, top_k=2, min_source_images=61)


def test_min_source_images_default_is_the_constant():
    src = ClassStats([[0.0], [1.0]], [DEFAULT_MIN_SOURCE_IMAGES - 1, DEFAULT_MIN_SOURCE_IMAGES], ["near", "far"])
    out = selection.greedy_select(src, {"T": ClassStats([[0.0]], [1], ["t"])}, top_k=2)
    assert out["class_name"].tolist() == ["far"]  # "near" is one image short


def test_gamma_changes_scores_not_ranking(source, targets):
    a = greedy_select(source, targets, top_k=2)
    b = greedy_select(source, targets, top_k=2, gamma=0.5)
    assert a["class_name"].tolist() == b["class_name"].tolist()
    assert b.set_index("class_name").loc["a", "score"] == pytest.approx(sim(1.0, 0.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one"),
        (dict(top_k=2, threshold=0.5), "exactly one"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(threshold=1.5), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(top_k=1, gamma=-0.1), "gamma"),
        (dict(top_k=1, min_source_images=-1), "min_source_images"),
    ],
)
def test_argument_errors(source, targets, kwargs, match):
    with pytest.raises(ValueError, match=match):
        greedy_select(source, targets, **kwargs)


def test_target_errors(source, targets):
    with pytest.raises(ValueError, match="at least one target"):
        greedy_select(source, {}, top_k=1)
    with pytest.raises(ValueError, match="must not contain"):
        greedy_select(source, {"a;b": targets["T1"]}, top_k=1)
    with pytest.raises(ValueError, match="dimensions differ"):
        greedy_select(source, {"T": ClassStats([[0.0, 1.0]], [1], ["t"])}, top_k=1)


def test_concat_class_stats(source):
    other = ClassStats([[7.0], [8.0]], [1, 2], ["g", "h"], meta={"model": "toy", "dataset": "inat"})
    both = concat_class_stats(source, other)
    assert both.class_names == ["f", "d", "e", "c", "b", "a", "g", "h"]
    assert both.counts.tolist() == [60, 40, 5, 30, 20, 10, 1, 2]
    np.testing.assert_array_equal(both.means[-2:], [[7.0], [8.0]])
    assert both.meta == {"model": "toy"}  # only agreeing entries survive
    out = greedy_select(both, {"T": ClassStats([[8.0]], [1], ["t"])}, top_k=1)
    assert out["class_name"].tolist() == ["h"]


def test_concat_class_stats_errors(source):
    with pytest.raises(ValueError, match="unique"):
        concat_class_stats(source, ClassStats([[0.0]], [1], ["a"]))
    with pytest.raises(ValueError, match="dimensions differ"):
        concat_class_stats(source, ClassStats([[0.0, 0.0]], [1], ["z"]))
    with pytest.raises(ValueError, match="different feature models"):
        concat_class_stats(source, ClassStats([[0.0]], [1], ["z"], meta={"model": "other"}))
    with pytest.raises(ValueError, match="at least one"):
        concat_class_stats()
