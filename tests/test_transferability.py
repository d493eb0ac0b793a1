"""Tests for finetail.transferability (LogME, LEEP, NCE, H-score and its regularised form, leave-one-out k-NN).

Expected values are computed here from the formulas directly (hand-worked tables, loops,
dense linear algebra), never by calling the module.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import minimize

from finetail import transferability as tr
from finetail.transferability import (
    SCORES,
    all_scores,
    hscore,
    knn_accuracy,
    knn_predictions,
    leep,
    logme,
    logme_fit,
    ledoit_wolf,
    nce,
    regularized_hscore,
)

# ----------------------------------------------------------------------------------------
# NCE and LEEP on a hand-worked 3 x 2 table
# ----------------------------------------------------------------------------------------

# counts n(y, z): target label y (rows 0..2) x source label z (columns 0..1); N = 10
TABLE = np.array([[3, 1], [1, 2], [0, 3]])


def table_pairs(table=TABLE, z_values=(0, 1), y_values=(0, 1, 2)):
    y, z = [], []
    for i, yv in enumerate(y_values):
        for j, zv in enumerate(z_values):
            y += [yv] * int(table[i, j])
            z += [zv] * int(table[i, j])
    return np.array(y), np.array(z)


# -H(Y|Z) = sum n(y,z)/N log(n(y,z)/n(z)), n(z=0) = 4, n(z=1) = 6, written out term by term
EXPECTED_NCE = (3 * math.log(3 / 4) + 1 * math.log(1 / 4) + 1 * math.log(1 / 6) + 2 * math.log(2 / 6)
                + 3 * math.log(3 / 6)) / 10


def test_nce_hand_worked_table():
    y, z = table_pairs()
    assert nce(z, y) == pytest.approx(EXPECTED_NCE, rel=1e-12)
    assert EXPECTED_NCE < 0


def test_nce_any_integer_labels_and_deterministic_case():
    y, z = table_pairs()
    # relabelling both sides (negative, gaps, source classes 0..9 mostly absent) changes nothing
    assert nce(np.array([7, 9])[z], np.array([-5, 0, 12])[y]) == pytest.approx(EXPECTED_NCE, rel=1e-12)
    # a prediction that determines the label: H(Y|Z) = 0
    assert nce(np.array([4, 4, 1, 1, 2]), np.array([0, 0, 1, 1, 1])) == 0.0
    # independent prediction: -H(Y|Z) = -H(Y) = -log 2 for balanced binary labels
    assert nce(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])) == pytest.approx(-math.log(2), rel=1e-12)


def test_leep_one_hot_equals_nce():
    y, z = table_pairs()
    theta = np.zeros((10, 3))  # a third source class that never gets mass: P(z) = 0
    theta[np.arange(10), z] = 1.0
    assert leep(theta, y) == pytest.approx(EXPECTED_NCE, rel=1e-12)
    assert leep(theta, y) == pytest.approx(nce(theta.argmax(1), y), rel=1e-12)


def direct_leep(theta, y):
    """LEEP by its definition, with plain loops."""
    n, cs = theta.shape
    ys = sorted(set(y.tolist()))
    joint = {(a, z): sum(theta[i, z] for i in range(n) if y[i] == a) / n for a in ys for z in range(cs)}
    pz = [sum(joint[a, z] for a in ys) for z in range(cs)]
    total = 0.0
    for i in range(n):
        eep = sum(joint[y[i], z] / pz[z] * theta[i, z] for z in range(cs) if pz[z] > 0)
        total += math.log(eep)
    return total / n


def test_leep_soft_probs_against_double_loop():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    theta = rng.dirichlet(np.ones(5), size=40)
    theta[:, 4] = 0.0  # a dead source class
    theta /= theta.sum(1, keepdims=True)
    theta[y == 0, 0] += 2.0  # some dependence between y and z
    theta /= theta.sum(1, keepdims=True)
    expected = direct_leep(theta, y)
    assert leep(theta, y) == pytest.approx(expected, rel=1e-12)
    assert leep(theta.astype(np.float32), y) == pytest.approx(expected, rel=1e-5)
    assert expected < 0


def test_leep_rejects_non_probabilities():
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="sum to 1"):
        leep(np.full((4, 2), 0.6), y)
    with pytest.raises(ValueError, match="negative"):
        leep(np.array([[1.5, -0.5]] * 4), y)


# ----------------------------------------------------------------------------------------
# H-score
# ----------------------------------------------------------------------------------------


def test_hscore_1d_is_the_correlation_ratio():
    x = np.array([1.0, 2.0, 6.0, 4.0, 5.0, 9.0, 3.0])
    y = np.array([0, 0, 0, 1, 1, 1, 2])
    # mean 30/7; class means 3, 6, 3 with counts 3, 3, 1
    mean = 30 / 7
    between = (3 * (3 - mean) ** 2 + 3 * (6 - mean) ** 2 + 1 * (3 - mean) ** 2) / 7
    total = sum((v - mean) ** 2 for v in x) / 7
    assert hscore(x[:, None], y) == pytest.approx(between / total, rel=1e-12)


def test_hscore_of_a_deterministic_embedding_is_c_minus_1():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 200)
    onehot = np.eye(5)[y]
    assert hscore(onehot, y) == pytest.approx(4.0, rel=1e-9)
    vectors = rng.standard_normal((5, 12))  # random class vectors, no noise
    assert hscore(vectors[y], y) == pytest.approx(4.0, rel=1e-9)


def test_hscore_invariant_to_invertible_linear_maps_and_dead_directions():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 300)
    f = rng.standard_normal((300, 6)) + 0.8 * rng.standard_normal((4, 6))[y]
    h = hscore(f, y)
    assert 0 < h < 3
    m = rng.standard_normal((6, 6)) + 3 * np.eye(6)
    assert np.linalg.cond(m) < 100
    assert hscore(f @ m, y) == pytest.approx(h, rel=1e-8)
    # a constant column and a column that is a sum of two others add no information
    g = np.column_stack([f, np.full(300, 7.0), f[:, 0] + f[:, 1]])
    assert hscore(g, y) == pytest.approx(h, rel=1e-8)


# ----------------------------------------------------------------------------------------
# regularised H-score (Ledoit-Wolf shrinkage), worked by hand
# ----------------------------------------------------------------------------------------

# Four centred 2-d points; classes {x1, x3} and {x2, x4}.
LW_X = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
LW_Y = np.array([0, 1, 0, 1])


def test_ledoit_wolf_shrinkage_by_hand():
    # S = X^T X / 4 = diag(8/4, 2/4) = diag(2, 0.5); mu = tr S / 2 = 1.25
    # delta = ||S - mu I||_F^2 / 2 = (0.75^2 + 0.75^2) / 2 = 0.5625 = 18/32
    # ||x_k||^4 = 16, 16, 1, 1: sum / N = 34 / 4 = 8.5; ||S||_F^2 = 4 + 0.25 = 4.25
    # beta = (8.5 - 4.25) / (D N) = 4.25 / 8 = 0.53125 = 17/32 < delta, so alpha = 17/18
    # cov_alpha = (1/18) S + (17/18) 1.25 I = diag(2 + 21.25, 0.5 + 21.25) / 18
    cov, alpha = ledoit_wolf(LW_X)
    assert alpha == pytest.approx(17 / 18, rel=1e-12)
    assert cov == pytest.approx(np.diag([23.25 / 18, 21.75 / 18]), rel=1e-12)


def test_regularized_hscore_by_hand():
    # class means (1, 0.5) and (-1, -0.5), two images each: cov(E[f|y]) = [[1, 0.5], [0.5, 0.25]]
    # H_alpha = (1 - alpha) tr(cov_alpha^-1 B) = (1/18) (18/23.25 * 1 + 18/21.75 * 0.25)
    #         = 4/93 + 1/87 = 441/8091 = 49/899
    assert regularized_hscore(LW_X, LW_Y) == pytest.approx(49 / 899, rel=1e-12)
    # the plain H-score of the same points: tr(S^-1 B) = 1/2 + 0.25/0.5 = 1 = C - 1
    assert hscore(LW_X, LW_Y) == pytest.approx(1.0, rel=1e-12)


def test_regularized_hscore_without_shrinkage_is_the_plain_one():
    # 1-d features: S is a multiple of the identity (delta = 0), alpha = 0, H_alpha = H = 16/20
    x, y = [[0.0], [2.0], [4.0], [6.0]], [0, 0, 1, 1]
    assert ledoit_wolf(x)[1] == 0.0
    assert regularized_hscore(x, y) == pytest.approx(0.8, rel=1e-12)


def test_regularized_hscore_is_finite_and_informative_where_n_le_d():
    # 12 images, 40-d features, 3 classes: the plain H-score is C - 1 = 2 for any features,
    # even pure noise; the regularised one is finite and ranks separable features above noise.
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 4)
    noise = rng.standard_normal((12, 40))
    separable = noise + 4.0 * rng.standard_normal((3, 40))[y]
    assert hscore(noise, y) == pytest.approx(2.0, rel=1e-6) and hscore(separable, y) == pytest.approx(2.0, rel=1e-6)
    r_noise, r_sep = regularized_hscore(noise, y), regularized_hscore(separable, y)
    assert math.isfinite(r_noise) and math.isfinite(r_sep)
    assert 0.0 <= r_noise < r_sep < 2.0
    assert regularized_hscore(np.zeros((5, 8)), [0, 1, 0, 1, 0]) == 0.0  # constant features: no shrinkage target


# ----------------------------------------------------------------------------------------
# LogME
# ----------------------------------------------------------------------------------------


def brute_log_evidence(f, y, alpha, beta):
    """log N(y; 0, beta^-1 I + alpha^-1 F F^T) with dense linear algebra."""
    n = y.size
    cov = np.eye(n) / beta + f @ f.T / alpha
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    return -0.5 * (n * math.log(2 * math.pi) + logdet + y @ np.linalg.solve(cov, y))


def signal_features(n, d, classes, seed, strength=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    f = rng.standard_normal((n, d)) + strength * rng.standard_normal((classes, d))[y]
    return f, y


@pytest.mark.parametrize("n, d", [(80, 6), (30, 50), (25, 25)])
def test_logme_evidence_equals_brute_force_marginal_likelihood(n, d):
    f, y = signal_features(n, d, 3, seed=n + d)
    fits = logme_fit(f, y)
    assert [fit.label for fit in fits] == [0, 1, 2]
    for fit in fits:
        indicator = (y == fit.label).astype(float)
        expected = brute_log_evidence(f, indicator, fit.alpha, fit.beta) / n
        assert fit.evidence == pytest.approx(expected, rel=1e-8)
        assert 1 <= fit.updates <= tr.LOGME_MAX_UPDATES
    assert logme(f, y) == pytest.approx(np.mean([fit.evidence for fit in fits]), rel=1e-12)


def test_logme_nearly_fitted_labels_against_brute_force():
    # N > D, features = class indicators + 1e-5 noise: ||y - U U^T y||^2 is about 4e-10 of
    # ||y||^2, where ||y||^2 - sum w_i^2 cancels (its relative error here is about 1e-5);
    # the module recomputes it as ||y - F F^+ y||^2. Without that the evidence is off by 1e-7.
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(4), 50)
    f = np.eye(16)[y] + 1e-5 * rng.standard_normal((200, 16))
    for fit in logme_fit(f, y):
        expected = brute_log_evidence(f, (y == fit.label).astype(float), fit.alpha, fit.beta) / 200
        assert fit.evidence == pytest.approx(expected, rel=3e-8)
        assert fit.beta > 1e9  # the labels are (nearly) fitted


def test_logme_stops_near_the_maximum_of_the_evidence():
    f, y = signal_features(150, 8, 3, seed=5, strength=0.7)
    lam, u = np.linalg.eigh(f @ f.T)  # cov = U (1/beta + lam/alpha) U^T: cheap to evaluate often
    lam = np.clip(lam, 0, None)
    for fit in logme_fit(f, y):
        assert fit.converged  # otherwise this test would not say much
        indicator = (y == fit.label).astype(float)
        proj2 = (u.T @ indicator) ** 2

        def neg(p, proj2=proj2):
            var = math.exp(-p[1]) + lam * math.exp(-p[0])
            return 0.5 * (150 * math.log(2 * math.pi) + np.log(var).sum() + (proj2 / var).sum()) / 150

        start = [math.log(fit.alpha), math.log(fit.beta)]
        here = -neg(start)
        assert here == pytest.approx(brute_log_evidence(f, indicator, fit.alpha, fit.beta) / 150, rel=1e-9)
        assert here == pytest.approx(fit.evidence, rel=1e-9)
        for da, db in [(0.1, 0), (-0.1, 0), (0, 0.1), (0, -0.1), (0.1, 0.1), (-0.1, -0.1)]:
            assert -neg([start[0] + da, start[1] + db]) <= here + 1e-6
        best = minimize(neg, start, method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-13})
        assert -best.fun >= here - 1e-12
        assert -best.fun - here < 1e-5


def test_logme_more_updates_change_little(monkeypatch):
    f, y = signal_features(40, 60, 3, seed=6)  # N < D: the fixed point is slow here
    before = logme(f, y)
    monkeypatch.setattr(tr, "LOGME_MAX_UPDATES", 200)
    monkeypatch.setattr(tr, "LOGME_TOL", 1e-10)
    after = logme(f, y)
    assert after >= before - 1e-12  # the evidence only grows along the updates here
    assert after - before < 0.02 * abs(before)


def test_logme_prefers_separating_features():
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(4), 50)
    separable = np.zeros((200, 16))
    separable[np.arange(200), y] = 1.0
    separable += 1e-3 * rng.standard_normal((200, 16))
    noise = rng.standard_normal((200, 16))
    good, bad = logme(separable, y), logme(noise, y)
    assert good > bad + 1.0
    assert math.isfinite(good) and math.isfinite(bad)


def test_logme_finite_for_zero_features_and_fitted_labels():
    y = np.array([0, 1, 1, 2, 2, 2, 0, 1])
    zero = logme(np.zeros((8, 3)), y)
    # no features: y ~ N(0, beta^-1 I), beta = N / ||y||^2 maximises it
    expected = np.mean([0.5 * math.log(8 / c) - 0.5 - 0.5 * math.log(2 * math.pi) for c in (2, 3, 3)])
    assert zero == pytest.approx(expected, rel=1e-12)
    rng = np.random.default_rng(8)
    wide = rng.standard_normal((8, 40))  # N < D: every label vector lies in F's column space
    exact = np.eye(3)[y]  # the features are the labels
    for f in (wide, exact, np.zeros((8, 40))):
        value = logme(f, y)
        assert isinstance(value, float) and math.isfinite(value)
        assert all(math.isfinite(v) for fit in logme_fit(f, y) for v in (fit.alpha, fit.beta))


def test_logme_float32_features_match_float64():
    f, y = signal_features(120, 10, 3, seed=9)
    f32 = f.astype(np.float32)
    assert logme(f32, y) == pytest.approx(logme(f32.astype(np.float64), y), rel=1e-10)


# ----------------------------------------------------------------------------------------
# k-NN
# ----------------------------------------------------------------------------------------


def test_knn_hand_made_points():
    f = np.array([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 2.0], [1.0, 0.9]])
    y = np.array([0, 0, 1, 1, 1])
    # cosines of the last point: 0.743 with [1, 0], 0.776 with [2, .1], 0.669 with [0, 1] and
    # 0.706 with [.1, 2]: its nearest is [2, .1] (class 0), wrong; the other four find their
    # own class's twin (cosine > 0.99). Leave-one-out 1-NN accuracy 4/5.
    assert knn_accuracy(f, y, k=1) == pytest.approx(4 / 5)
    assert knn_predictions(f, y, k=1).tolist() == [0, 0, 1, 1, 0]


def test_knn_ties():
    # votes 1-1 for the first point; class 2's voter is more similar, so 2 wins over class 1
    f = np.array([[1.0, 0.0], [1.0, 0.2], [1.0, -0.5]])
    assert knn_predictions(f, np.array([0, 2, 1]), k=2)[0] == 2
    assert knn_predictions(f, np.array([0, 1, 2]), k=2)[0] == 1
    # votes 1-1 and the same similarity (cos 45 degrees both): the smaller label wins
    f = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, -1.0]])
    assert knn_predictions(f, np.array([0, 3, 1]), k=2)[0] == 1
    assert knn_predictions(f, np.array([0, 1, 3]), k=2)[0] == 1
    # three equally similar candidates for one place: the smaller row index is taken
    f = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.5, 0.0]])
    assert knn_predictions(f, np.array([0, 2, 1, 1]), k=1)[0] == 2
    assert knn_predictions(f, np.array([0, 1, 2, 2]), k=1)[0] == 1
    # a zero row has cosine 0 with everything: row 0 ties with all three (takes row 1), and
    # rows 1..3 rank it (0) level with or above everything else (takes row 0)
    f = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    for dtype in (np.float32, np.float64):
        assert knn_predictions(f, np.array([5, 2, 1, 1]), k=1, dtype=dtype).tolist() == [2, 5, 5, 5]


def direct_knn(f, y, k):
    """Unchunked leave-one-out k-NN with the same rules, in float64 and plain loops."""
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    pred = []
    for i in range(len(y)):
        neigh = np.argsort(-sim[i], kind="stable")[:k]
        votes, sims = {}, {}
        for j in neigh:
            votes[y[j]] = votes.get(y[j], 0) + 1
            sims[y[j]] = sims.get(y[j], 0.0) + sim[i, j]
        pred.append(min(votes, key=lambda c: (-votes[c], -sims[c], c)))
    return np.array(pred)


def test_knn_chunked_equals_direct():
    rng = np.random.default_rng(10)
    y = rng.integers(0, 4, 103) * 3 - 2  # labels -2, 1, 4, 7
    f = rng.standard_normal((103, 8)) + 0.7 * rng.standard_normal((12, 8))[(y + 2) // 3]
    for k in (1, 4, 7):
        expected = direct_knn(f, y, k)
        for chunk in (2, 7, 50, 103, 500) if k > 1 else (1, 50):
            got = knn_predictions(f, y, k, chunk_size=chunk, dtype=np.float64)
            np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(knn_predictions(f, y, k), expected)  # float32, default chunks
        assert knn_accuracy(f, y, k, chunk_size=7) == pytest.approx(np.mean(expected == y))
    assert 0.4 < knn_accuracy(f, y, 4) < 1.0  # the data is neither hopeless nor trivial


def test_knn_rejects_bad_k():
    f = np.eye(3)
    y = np.array([0, 1, 1])
    for k in (0, 3, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must"):
            knn_accuracy(f, y, k=k)
    assert knn_accuracy(f, y, k=2) == pytest.approx(0.0)  # N - 1 is allowed


# ----------------------------------------------------------------------------------------
# validation, registry, types
# ----------------------------------------------------------------------------------------

def _call(name, x, y):
    fn = SCORES[name].function
    return fn(x, y, k=2) if name == "knn" else fn(x, y)


def _inputs(name, n=6):
    needs = SCORES[name].needs
    if needs == "features":
        return np.arange(n * 2, dtype=float).reshape(n, 2) % 5
    if needs == "probs":
        return np.full((n, 3), 1 / 3)
    return np.arange(n) % 2


@pytest.mark.parametrize("name", list(SCORES))
def test_validation(name):
    y = np.array([0, 1, 0, 1, 2, 2])
    x = _inputs(name)
    assert isinstance(_call(name, x, y), float)
    arg = "source_predictions" if SCORES[name].needs == "predictions" else (
        "source_probs" if SCORES[name].needs == "probs" else "features")
    with pytest.raises(ValueError, match=f"{arg} has 5 .*labels has 6"):
        _call(name, x[:5], y)
    with pytest.raises(ValueError, match="single class"):
        _call(name, x, np.full(6, 3))
    with pytest.raises(ValueError, match="labels is empty"):
        _call(name, x[:0], y[:0])
    with pytest.raises(ValueError, match="fractional"):
        _call(name, x, y + 0.5)
    assert _call(name, x, y.astype(float)) == _call(name, x, y)  # whole-number floats are fine
    assert _call(name, x, y.astype(np.int8) - 5) == _call(name, x, y)  # any integers
    if SCORES[name].needs != "predictions":
        bad = np.array(x, dtype=float)
        bad[2, 1] = np.nan
        with pytest.raises(ValueError, match=f"{arg} .*NaN"):
            _call(name, bad, y)
        bad[2, 1] = np.inf
        with pytest.raises(ValueError, match=f"{arg} .*infinite"):
            _call(name, bad, y)
        with pytest.raises(ValueError, match=f"{arg} must have shape"):
            _call(name, x[:, 0], y)
        with pytest.raises(ValueError, match=f"{arg} is empty"):
            _call(name, x[:, :0], y)
    else:
        with pytest.raises(ValueError, match="source_predictions must hold integer"):
            _call(name, x + 0.5, y)
    with pytest.raises(ValueError, match="labels must have shape"):
        _call(name, x, y[:, None])
    with pytest.raises(ValueError, match="labels contains NaN"):
        _call(name, x, np.array([0, 1, np.nan, 1, 0, 0]))


def test_all_scores_values_and_times():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 3, 90)
    f = rng.standard_normal((90, 5)) + 2 * rng.standard_normal((3, 5))[y]
    logits = rng.standard_normal((90, 7)) + 3 * np.eye(7)[y * 2]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = all_scores(f, probs, y, k=5)
    assert list(out) == ["logme", "leep", "nce", "hscore", "regularized_hscore", "knn"]
    for name, (value, seconds) in out.items():
        assert isinstance(value, float) and math.isfinite(value), name
        assert seconds >= 0
    assert out["logme"][0] == logme(f, y)
    assert out["leep"][0] == leep(probs, y)
    assert out["nce"][0] == nce(probs.argmax(1), y)
    assert out["hscore"][0] == hscore(f, y)
    assert out["knn"][0] == knn_accuracy(f, y, 5)
    assert out["regularized_hscore"][0] == regularized_hscore(f, y)
    assert set(all_scores(f, None, y)) == {"logme", "hscore", "regularized_hscore", "knn"}
    assert set(all_scores(None, probs, y)) == {"leep", "nce"}


def test_module_imports_only_numpy():
    code = ("import sys, finetail.transferability; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'scipy', 'pandas', 'torch', 'ot', 'sklearn'}))")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(tr.__file__))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
