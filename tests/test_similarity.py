"""Tests for finetail.similarity (domain similarity by EMD, Cui et al. CVPR 2018)."""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import linprog

from finetail import similarity as fs
from finetail.similarity import (
    DEFAULT_MIN_SOURCE_IMAGES,
    ClassStats,
    EMDNotConverged,
    class_to_domain_emd,
    euclidean_distances,
    load_class_stats,
    plot_similarity_heatmap,
    point_mass_emd,
    save_class_stats,
    similarity_from_emd,
    similarity_matrix,
)

# The EMD tests use toy counts (a few images per class): they turn the min_source_images
# filter (default DEFAULT_MIN_SOURCE_IMAGES = 200) off; the filter has tests of its own.
domain_similarity = functools.partial(fs.domain_similarity, min_source_images=0)


def lp_emd(xs, ws, xt, wt):
    """Independent EMD: the transport LP solved by scipy's HiGHS."""
    ws = np.asarray(ws, float) / np.sum(ws)
    wt = np.asarray(wt, float) / np.sum(wt)
    cost = np.linalg.norm(xs[:, None, :] - xt[None, :, :], axis=2)
    n, m = cost.shape
    a_eq = np.zeros((n + m, n * m))
    for i in range(n):
        a_eq[i, i * m : (i + 1) * m] = 1.0  # row sums = source weights
    for j in range(m):
        a_eq[n + j, j::m] = 1.0  # column sums = target weights
    res = linprog(cost.ravel(), A_eq=a_eq, b_eq=np.concatenate([ws, wt]), bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return res.fun


def test_two_point_masses():
    sim, d = domain_similarity([[1.0, 2.0, 3.0]], [7], [[4.0, 6.0, 3.0]], [2])
    assert d == pytest.approx(5.0, abs=1e-12)
    assert sim == pytest.approx(math.exp(-0.01 * 5.0), rel=1e-12)


def test_gamma_is_used():
    sim, d = domain_similarity([[0.0]], [1], [[10.0]], [1], gamma=0.1)
    assert sim == pytest.approx(math.exp(-1.0))
    assert similarity_from_emd(d, 0.1) == pytest.approx(sim)


def test_identical_sets_have_zero_distance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)) * 50
    counts = rng.integers(1, 100, size=6)
    sim, d = domain_similarity(x, counts, x.copy(), counts.copy())
    assert d == pytest.approx(0.0, abs=1e-9)
    assert sim == pytest.approx(1.0, abs=1e-11)


def test_weights_follow_counts():
    # point-mass source, two target classes with counts 3:1 -> weighted mean distance
    sim, d = domain_similarity([[0.0, 0.0]], [5], [[3.0, 4.0], [0.0, 10.0]], [3, 1])
    assert d == pytest.approx((3 * 5.0 + 1 * 10.0) / 4)
    # two-class source with counts 1:3 against two far-apart point masses
    _, d2 = domain_similarity([[0.0], [10.0]], [1, 3], [[0.0], [10.0]], [1, 1])
    assert d2 == pytest.approx(0.25 * 10.0)  # a quarter of the mass must cross


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_case_matches_linprog(seed):
    rng = np.random.default_rng(seed)
    xs, xt = rng.normal(size=(4, 3)), rng.normal(size=(5, 3)) + 0.5
    ws, wt = rng.integers(1, 50, size=4), rng.integers(1, 50, size=5)
    sim, d = domain_similarity(xs, ws, xt, wt)
    expected = lp_emd(xs, ws, xt, wt)
    assert d == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert sim == pytest.approx(math.exp(-0.01 * expected), rel=1e-9)


def test_point_mass_emd_equals_full_emd_for_one_class():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(1, 8))
    t = rng.normal(size=(7, 8))
    tc = rng.integers(1, 30, size=7)
    _, d = domain_similarity(s, [12], t, tc)
    assert point_mass_emd(s[0], t, tc) == pytest.approx(d, rel=1e-12)
    assert point_mass_emd(s[0], t, tc) == pytest.approx(lp_emd(s, [1], t, tc), rel=1e-9)


def test_class_to_domain_emd_matches_point_mass():
    rng = np.random.default_rng(4)
    s = rng.normal(size=(300, 16)) * 10
    t = rng.normal(size=(9, 16)) * 10
    tc = rng.integers(0, 40, size=9)
    tc[0] = 5
    fast = class_to_domain_emd(s, t, tc, max_chunk_bytes=8 * 9 * 3 * 7)  # forces many chunks
    slow = np.array([point_mass_emd(row, t, tc) for row in s])
    np.testing.assert_allclose(fast, slow, rtol=1e-12)


def test_euclidean_distances_exact_for_coincident_points():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(5, 64)) * 1e3 + 1e4  # large norms: the GEMM trick alone cancels badly
    d = euclidean_distances(a, a)
    np.testing.assert_array_equal(np.diag(d), 0.0)
    ref = np.linalg.norm(a[:, None] - a[None], axis=2)
    np.testing.assert_allclose(d, ref, rtol=1e-10, atol=0)


def test_min_source_images_default_is_the_constant():
    assert DEFAULT_MIN_SOURCE_IMAGES == 200
    src = np.array([[0.0], [100.0]])
    _, d = fs.domain_similarity(src, [DEFAULT_MIN_SOURCE_IMAGES, DEFAULT_MIN_SOURCE_IMAGES - 1], [[0.0]], [1])
    assert d == 0.0  # the class one image short is dropped
    a = ClassStats(src, [DEFAULT_MIN_SOURCE_IMAGES, DEFAULT_MIN_SOURCE_IMAGES - 1], ["a0", "a1"])
    _, emd = similarity_matrix({"A": a}, {"T": ClassStats([[0.0]], [1], ["t"])})
    assert emd.loc["A", "T"] == 0.0


def test_min_source_images_filter():
    # the far class (count 5) is dropped with min 10 -> distance 0
    src = np.array([[0.0], [100.0]])
    _, d_all = domain_similarity(src, [10, 5], [[0.0]], [1])
    _, d_filt = domain_similarity(src, [10, 5], [[0.0]], [1], min_source_images=10)
    assert d_all == pytest.approx(100.0 * 5 / 15)
    assert d_filt == 0.0
    with pytest.raises(ValueError, match=r"all 2 source classes have fewer than min_source_images=11"):
        domain_similarity(src, [10, 5], [[0.0]], [1], min_source_images=11)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source_means=np.zeros(3)), "shape"),
        (dict(source_counts=[1, 2, 3]), "3 entries"),
        (dict(target_means=np.zeros((2, 4))), "dimensions differ"),
        (dict(source_counts=[1, -1]), "non-negative"),
        (dict(source_counts=[1.5, 2]), "whole-number"),
        (dict(target_counts=[0, 0]), "sum to 0"),
        (dict(source_means=[[np.nan, 0, 0], [0, 0, 0]]), "NaN"),
        (dict(target_means=np.zeros((0, 3)), target_counts=[]), "at least one class"),
        (dict(gamma=-1.0), "gamma"),
        (dict(min_source_images=-2), "min_source_images"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, match):
    args = dict(
        source_means=np.zeros((2, 3)),
        source_counts=[1, 2],
        target_means=np.ones((2, 3)),
        target_counts=[3, 4],
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        domain_similarity(**args)


def test_non_convergence_raises():
    rng = np.random.default_rng(6)
    xs, xt = rng.normal(size=(40, 5)), rng.normal(size=(30, 5))
    ws, wt = rng.integers(1, 9, size=40), rng.integers(1, 9, size=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # POT's warning must not leak: it becomes the exception
        with pytest.raises(EMDNotConverged, match="numItermax|num_iter_max") as info:
            domain_similarity(xs, ws, xt, wt, num_iter_max=3)
    assert info.value.result_code == 3
    _, d = domain_similarity(xs, ws, xt, wt)  # the default cap is generous
    assert d > 0


def test_class_stats_validation():
    with pytest.raises(ValueError, match="unique"):
        ClassStats(np.zeros((2, 2)), [1, 1], ["a", "a"])
    with pytest.raises(ValueError, match="class_names has 1"):
        ClassStats(np.zeros((2, 2)), [1, 1], ["a"])


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    stats = ClassStats(rng.normal(size=(3, 4)), [3, 0, 9], ["sp/a", "sp/b", "ünï"], meta={"dataset": "cub"})
    path = save_class_stats(tmp_path / "sub" / "cub.npz", stats, model="resnet101", digest="sha256:abc")
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    back = load_class_stats(path)
    np.testing.assert_array_equal(back.means, stats.means)
    assert back.means.dtype == np.float64 and back.counts.dtype == np.int64
    np.testing.assert_array_equal(back.counts, [3, 0, 9])
    assert back.class_names == ["sp/a", "sp/b", "ünï"]
    assert back.meta == {"dataset": "cub", "model": "resnet101", "digest": "sha256:abc"}
    with np.load(path, allow_pickle=False) as raw:
        assert {"means", "counts", "class_names"} <= set(raw.files)
    with pytest.raises(ValueError, match="reserved"):
        save_class_stats(tmp_path / "x.npz", stats, means="no")


def test_similarity_matrix_layout_and_values():
    a = ClassStats([[0.0, 0.0], [1.0, 0.0]], [300, 100], ["a0", "a1"])
    b = ClassStats([[0.0, 50.0]], [250], ["b0"])
    t1 = ClassStats([[0.0, 0.0]], [10], ["t"])
    t2 = ClassStats([[0.0, 40.0], [0.0, 60.0]], [5, 5], ["u", "v"])
    sim, emd = similarity_matrix({"A": a, "B": b}, {"T1": t1, "T2": t2}, min_source_images=200)
    assert list(sim.index) == ["A", "B"] and list(sim.columns) == ["T1", "T2"]
    assert emd.loc["A", "T1"] == pytest.approx(0.0)  # a1 (100 images) dropped
    assert emd.loc["B", "T1"] == pytest.approx(50.0)
    assert emd.loc["B", "T2"] == pytest.approx(10.0)
    np.testing.assert_allclose(sim.to_numpy(), np.exp(-0.01 * emd.to_numpy()))
    with pytest.raises(ValueError, match="different feature models"):
        similarity_matrix(
            {"A": ClassStats([[0.0]], [1], ["a"], meta={"model": "m1"})},
            {"T": ClassStats([[0.0]], [1], ["t"], meta={"model": "m2"})},
        )


def test_heatmap_writes_png(tmp_path):
    m = pd.DataFrame([[0.56, 0.61], [0.65, np.nan]], index=["imagenet", "inat"], columns=["cub", "dogs"])
    out = plot_similarity_heatmap(m, tmp_path / "fig" / "heat.png", title="test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_no_heavy_imports():
    code = (
        "import sys, numpy as np, finetail.similarity as fs, finetail.selection; "
        "fs.domain_similarity(np.eye(3), [1, 2, 3], np.ones((2, 3)), [1, 1], min_source_images=0); "
        "print(','.join(m for m in ('snakemake', 'mlflow', 'torch', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
