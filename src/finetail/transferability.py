r"""Transferability scores: how well a pre-trained network suits a target task, without fine-tuning.

Each score looks at the target task's *N* training images through a source network once,
either at its penultimate-layer features ``features`` (N, D) or at its softmax over its own
``C_s`` source classes ``source_probs`` (N, C_s), together with the target labels
``labels`` (N,), and returns one number. **Higher is better for every score here**: a larger
value predicts a better fine-tuned accuracy. Scores of different kinds are not comparable
with each other, only the same score across source networks (or source data sets).

``logme`` (features)
    LogME, You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for
    Transfer Learning", ICML 2021. The log marginal likelihood (evidence) per image of a
    Bayesian linear regression of each class's indicator on the features, maximised over its
    two precisions, averaged over classes. See :func:`logme`.
``leep`` (source probabilities)
    LEEP, Nguyen, Hassner, Seeger and Archambeau, "LEEP: A New Measure to Evaluate
    Transferability of Learned Representations", ICML 2020. The mean log-likelihood of the
    target labels under the "expected empirical predictor" that maps the source model's soft
    prediction through the empirical conditional P(y | z). See :func:`leep`.
``nce`` (source predictions)
    Negative conditional entropy, Tran, Nguyen and Hassner, "Transferability and Hardness of
    Supervised Classification Tasks", ICCV 2019: ``-H(Y | Z)`` of the target label given the
    source model's hard (argmax) prediction. See :func:`nce`.
``hscore`` (features)
    H-score, Bao, Li, Huang, Zhang, Zheng, Zamir and Guibas, "An Information-Theoretic
    Approach to Transferability in Task Transfer Learning", ICIP 2019:
    ``tr(cov(f)^+ cov(E[f | y]))``. See :func:`hscore`. With N <= D images it is C - 1 for
    every network (the sample covariance is singular); scoring jobs mark such pairs.
``regularized_hscore`` (features)
    Shrinkage-regularised H-score, Ibrahim, Ponomareva and Mazumder, "Newer is not always
    better", ECML PKDD 2022: ``tr(cov_alpha(f)^+ (1 - alpha) cov(E[f | y]))`` with the
    Ledoit-Wolf covariance ``cov_alpha`` and its shrinkage ``alpha``. See
    :func:`regularized_hscore`.
``knn`` (features)
    Leave-one-out k-nearest-neighbour accuracy under cosine similarity, a classifier-free
    probe of how well the feature space already separates the target classes. See
    :func:`knn_accuracy`.

:data:`SCORES` maps each name to its function and the input it needs; :func:`all_scores`
computes (and times) all of them.

Inputs are checked in one place (:func:`_check_inputs`): a ``ValueError`` naming the argument
and its shape is raised for empty input, wrong dimensionality, mismatched lengths, NaN or
infinite values, non-integer labels, and for fewer than two distinct target labels. Labels
may be any integers (negative, with gaps): they are mapped to 0..C-1 by ``np.unique``.

Precision and memory: arithmetic is float64. Float32 feature matrices are not copied to
float64 as a whole; row blocks are converted as they are used (a 50,000 x 2,048 float32
matrix is 410 MB, its float64 copy would be 820 MB). The one exception is the k-NN
similarity matrix, computed in float32 by default (see :func:`knn_accuracy`).

This module imports only numpy and the standard library.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_KNN_K",
    "HSCORE_RTOL",
    "LOGME_MAX_UPDATES",
    "LOGME_TOL",
    "SCORES",
    "LogMEFit",
    "ScoreSpec",
    "all_scores",
    "hscore",
    "knn_accuracy",
    "knn_predictions",
    "ledoit_wolf",
    "leep",
    "logme",
    "logme_fit",
    "nce",
    "regularized_hscore",
]

DEFAULT_KNN_K = 10
"""Default number of neighbours of :func:`knn_accuracy`."""

LOGME_MAX_UPDATES = 11
"""At most this many fixed-point updates of (alpha, beta) per class (as the LogME authors' code)."""

LOGME_TOL = 0.01
"""LogME's fixed point stops once ``lambda = alpha / beta`` changes by less than this, relatively."""

HSCORE_RTOL = 1e-10
"""Eigenvalues of the feature covariance below ``HSCORE_RTOL`` times the largest one are treated
as zero by the pseudo-inverse of :func:`hscore` (``np.linalg.pinv(..., rtol=HSCORE_RTOL,
hermitian=True)``)."""

PROB_ROW_ATOL = 1e-3
"""Rows of ``source_probs`` must sum to 1 within this."""

_ROW_BLOCK = 4096  # rows of features converted to float64 at a time
_KNN_BLOCK_BYTES = 64 * 2**20  # one (rows, rows) block of the k-NN similarity matrix
_GUARD = 1e-12  # relative floor of LogME's divisions
_RES_RECOMPUTE = 1e-6  # LogME: below this fraction of ||y||^2, recompute the residual directly
_LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------


class _Inputs(NamedTuple):
    """Checked inputs. ``y`` holds the labels mapped to 0..C-1, ``classes`` the original labels."""

    y: np.ndarray  # (N,) int64 in 0..C-1
    classes: np.ndarray  # (C,) the distinct labels, sorted
    counts: np.ndarray  # (C,) images per class
    features: np.ndarray | None  # (N, D) float32 or float64
    probs: np.ndarray | None  # (N, C_s) float32 or float64
    predictions: np.ndarray | None  # (N,) int64


def _integer_vector(x: Any, name: str) -> np.ndarray:
    """``x`` as an int64 vector; floats are accepted only when they are whole numbers."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (N,); got an array of shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}): a score needs at least one image")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64, copy=False)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            kind = "NaN" if np.isnan(arr).any() else "infinite"
            raise ValueError(f"{name} contains {kind} values")
        if not np.all(arr == np.round(arr)):
            bad = np.flatnonzero(arr != np.round(arr))
            raise ValueError(
                f"{name} must hold integer labels; {bad.size} of {arr.size} have a fractional part "
                f"(first {arr[bad[0]]!r} at index {bad[0]})"
            )
        return arr.astype(np.int64)
    raise ValueError(f"{name} must hold integer labels; got dtype {arr.dtype}")


def _float_matrix(x: Any, name: str, n: int, shape_name: str) -> np.ndarray:
    """``x`` as a finite 2-D float32/float64 array with ``n`` rows (other dtypes become float64)."""
    arr = np.asarray(x)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be a real numeric array of shape {shape_name}; got dtype {arr.dtype}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape {shape_name}; got an array of shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}): need at least one image and one column")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} rows (shape {arr.shape}) but labels has {n} entries")
    for start in range(0, n, _ROW_BLOCK):
        block = arr[start : start + _ROW_BLOCK]
        finite = np.isfinite(block)
        if not finite.all():
            rows = start + np.flatnonzero(~finite.all(axis=1))
            kind = "NaN" if np.isnan(block).any() else "infinite"
            raise ValueError(f"{name} (shape {arr.shape}) contains {kind} values (first in row {rows[0]})")
    return arr


def _check_inputs(
    labels: Any,
    *,
    features: Any = None,
    source_probs: Any = None,
    source_predictions: Any = None,
) -> _Inputs:
    """Check and convert the inputs of a score; ValueError naming the argument otherwise."""
    raw = _integer_vector(labels, "labels")
    n = raw.shape[0]
    classes, y, counts = np.unique(raw, return_inverse=True, return_counts=True)
    if classes.size < 2:
        raise ValueError(
            f"labels has a single class ({classes[0]}) in its {n} entries: a transferability score "
            "needs at least 2 distinct labels"
        )
    feats = probs = preds = None
    if features is not None:
        feats = _float_matrix(features, "features", n, "(N, D)")
    if source_probs is not None:
        probs = _float_matrix(source_probs, "source_probs", n, "(N, C_s)")
        for start in range(0, n, _ROW_BLOCK):
            block = probs[start : start + _ROW_BLOCK]
            if (block < 0).any():
                row = start + int(np.flatnonzero((block < 0).any(axis=1))[0])
                raise ValueError(f"source_probs (shape {probs.shape}) has negative entries (first in row {row})")
            sums = block.sum(axis=1, dtype=np.float64)
            off = np.abs(sums - 1.0) > PROB_ROW_ATOL
            if off.any():
                row = int(np.flatnonzero(off)[0])
                raise ValueError(
                    f"source_probs (shape {probs.shape}) rows must sum to 1 within {PROB_ROW_ATOL}; "
                    f"row {start + row} sums to {sums[row]!r}"
                )
    if source_predictions is not None:
        preds = _integer_vector(source_predictions, "source_predictions")
        if preds.shape[0] != n:
            raise ValueError(
                f"source_predictions has {preds.shape[0]} entries (shape {preds.shape}) "
                f"but labels has {n}"
            )
    return _Inputs(y=y.astype(np.int64, copy=False), classes=classes, counts=counts,
                   features=feats, probs=probs, predictions=preds)


# ----------------------------------------------------------------------------------------
# helpers: per-class row groups, float64 sums and Gram matrices in row blocks
# ----------------------------------------------------------------------------------------


def _class_rows(y: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Row indices of each class, in class order (indices ascending within a class)."""
    order = np.argsort(y, kind="stable")
    return np.split(order, np.cumsum(counts)[:-1])


def _class_sums(x: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """(C, D) float64: the sum of the rows of ``x`` in each group."""
    out = np.empty((len(groups), x.shape[1]), dtype=np.float64)
    for c, rows in enumerate(groups):
        out[c] = x[rows].sum(axis=0, dtype=np.float64)
    return out


def _gram(x: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """``(x - center)^T (x - center)`` in float64, converting ``_ROW_BLOCK`` rows at a time."""
    d = x.shape[1]
    g = np.zeros((d, d), dtype=np.float64)
    for start in range(0, x.shape[0], _ROW_BLOCK):
        block = np.array(x[start : start + _ROW_BLOCK], dtype=np.float64)
        if center is not None:
            block -= center
        g += block.T @ block  # numpy calls BLAS syrk for a.T @ a
    return g


# ----------------------------------------------------------------------------------------
# LogME
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogMEFit:
    """LogME's fit for one target class (one indicator vector ``y``).

    Attributes
    ----------
    label : int
        The class (as given in ``labels``).
    evidence : float
        ``L(alpha, beta) / N``: the log evidence per image at the returned precisions.
    alpha, beta : float
        Prior precision of the weights and noise precision, after the last update.
    updates : int
        Fixed-point updates made (1..:data:`LOGME_MAX_UPDATES`).
    converged : bool
        Whether the last update changed ``alpha / beta`` by less than :data:`LOGME_TOL`
        (False: stopped at the update limit).
    """

    label: int
    evidence: float
    alpha: float
    beta: float
    updates: int
    converged: bool


class _Spectrum(NamedTuple):
    """Everything LogME needs about F and the class indicators, in F's singular basis."""

    n: int
    s: np.ndarray  # (r,) non-zero eigenvalues of F^T F (squared singular values)
    w2: np.ndarray  # (C, r) squared coordinates (u_i^T y_c)^2 along the left singular vectors
    res0: np.ndarray  # (C,) ||y_c - U U^T y_c||^2, the part of y_c outside F's column space
    y2: np.ndarray  # (C,) ||y_c||^2 = class counts


def _nonzero(s: np.ndarray, n: int, d: int) -> np.ndarray:
    """Eigenvalues of a Gram matrix that are not rounding noise: ``s > s_max * max(n, d) * eps``."""
    s_max = s.max(initial=0.0)
    return s > s_max * max(n, d) * np.finfo(np.float64).eps


def _logme_spectrum(f: np.ndarray, y: np.ndarray, counts: np.ndarray) -> _Spectrum:
    """One eigendecomposition of F^T F (N >= D) or of F F^T (N < D), shared by all classes."""
    n, d = f.shape
    groups = _class_rows(y, counts)
    y2 = counts.astype(np.float64)
    if n >= d:
        s, v = np.linalg.eigh(_gram(f))
        s = np.clip(s, 0.0, None)
        keep = _nonzero(s, n, d)
        s, v = s[keep], v[:, keep]
        z = _class_sums(f, groups) @ v  # (C, r): v_i^T F^T y_c = sqrt(s_i) u_i^T y_c
        w2 = z**2 / s
        res0 = y2 - w2.sum(axis=1)
        # ||y||^2 - ||U U^T y||^2 cancels when y nearly lies in F's column space: recompute
        # those classes' residual as ||y - F F^+ y||^2 (one pass over F for all of them).
        near = np.flatnonzero(res0 < _RES_RECOMPUTE * y2)
        if near.size:
            coef = v @ (z[near] / s).T  # (D, m): F^+ y_c = V S^-1 V^T F^T y_c
            acc = np.zeros(near.size)
            for start in range(0, n, _ROW_BLOCK):
                block = np.asarray(f[start : start + _ROW_BLOCK], dtype=np.float64)
                r = (y[start : start + _ROW_BLOCK, None] == near[None, :]).astype(np.float64)
                r -= block @ coef
                acc += np.einsum("ij,ij->j", r, r)
            res0[near] = acc
        res0 = np.clip(res0, 0.0, None)
    else:
        f64 = np.asarray(f, dtype=np.float64)
        s, u = np.linalg.eigh(f64 @ f64.T)
        s = np.clip(s, 0.0, None)
        keep = _nonzero(s, n, d)
        uty = _class_sums(u, groups)  # (C, N): u_i^T y_c for all N eigenvectors
        w2 = uty[:, keep] ** 2
        res0 = (uty[:, ~keep] ** 2).sum(axis=1)  # directly, no cancellation
        s = s[keep]
    return _Spectrum(n=n, s=s, w2=w2, res0=res0, y2=y2)


def _evidence(alpha: float, beta: float, s: np.ndarray, w2: np.ndarray, res0: float, n: int) -> float:
    """Log evidence ``L(alpha, beta)`` of one class, in the singular basis.

    With ``t_i = beta s_i / (alpha + beta s_i)`` and ``q_i = alpha / (alpha + beta s_i) = 1 - t_i``:
    ``m^T m = sum t_i^2 w_i^2 / s_i``, ``||F m - y||^2 = res0 + sum q_i^2 w_i^2`` and
    ``D log alpha - log|A| = -sum log(1 + beta s_i / alpha)`` (zero eigenvalues contribute
    ``log alpha - log alpha``).
    """
    denom = alpha + beta * s
    t = beta * s / denom
    q = alpha / denom
    m2 = float(np.sum(t * t * w2 / s))
    res = res0 + float(np.sum(q * q * w2))
    return (
        -0.5 * float(np.sum(np.log1p(beta * s / alpha)))
        + 0.5 * n * math.log(beta)
        - 0.5 * beta * res
        - 0.5 * alpha * m2
        - 0.5 * n * _LOG_2PI
    )


def _fit_class(s: np.ndarray, w2: np.ndarray, res0: float, y2: float, n: int) -> tuple[float, float, int, bool]:
    """MacKay's fixed point for (alpha, beta) of one class, as LogME runs it.

    Each update, at the current (alpha, beta): ``gamma = sum t_i``, then
    ``alpha <- gamma / m^T m`` and ``beta <- (N - gamma) / ||F m - y||^2``, where
    ``N - gamma = (N - r) + sum q_i`` is summed without cancellation. Guards (relative, so the
    result stays finite for zero features or labels the features fit exactly): ``m^T m`` is
    floored at ``1e-12 ||y||^2 / s_max``, the residual at ``1e-12 ||y||^2``; with no
    effective parameters (``gamma == 0``, e.g. all-zero features) alpha does not enter the
    evidence and is left unchanged.
    """
    r = s.size
    alpha = beta = 1.0
    lam = 1.0
    m2_floor = _GUARD * y2 / s.max() if r else 0.0
    res_floor = _GUARD * y2
    updates, converged = 0, False
    while updates < LOGME_MAX_UPDATES:
        denom = alpha + beta * s
        t = beta * s / denom
        q = alpha / denom
        gamma = float(t.sum())
        m2 = float(np.sum(t * t * w2 / s))
        res = res0 + float(np.sum(q * q * w2))
        if gamma > 0.0:
            alpha = gamma / max(m2, m2_floor)
        beta = ((n - r) + float(q.sum())) / max(res, res_floor)
        updates += 1
        new_lam = alpha / beta
        if abs(new_lam - lam) / lam < LOGME_TOL:
            converged = True
            break
        lam = new_lam
    return alpha, beta, updates, converged


def logme_fit(features: Any, labels: Any) -> list[LogMEFit]:
    r"""LogME's per-class fits: evidence per image, alpha, beta and the number of updates.

    See :func:`logme` for the model; ``logme(F, y)`` is the mean of the ``evidence`` fields.

    Parameters
    ----------
    features : array_like, shape (N, D)
    labels : array_like of int, shape (N,)

    Returns
    -------
    list of LogMEFit
        One per distinct label, in ascending label order.
    """
    checked = _check_inputs(labels, features=features)
    spec = _logme_spectrum(checked.features, checked.y, checked.counts)
    fits = []
    for c, label in enumerate(checked.classes):
        alpha, beta, updates, converged = _fit_class(spec.s, spec.w2[c], float(spec.res0[c]), float(spec.y2[c]), spec.n)
        evidence = _evidence(alpha, beta, spec.s, spec.w2[c], float(spec.res0[c]), spec.n) / spec.n
        if not all(math.isfinite(v) for v in (alpha, beta, evidence)):
            raise FloatingPointError(f"LogME of class {label}: non-finite alpha={alpha}, beta={beta}, evidence={evidence}")
        fits.append(LogMEFit(label=int(label), evidence=evidence, alpha=alpha, beta=beta,
                             updates=updates, converged=converged))
    return fits


def logme(features: Any, labels: Any) -> float:
    r"""LogME (You et al., ICML 2021): mean over classes of the maximised log evidence per image.

    For each target class c, ``y`` is its indicator (1.0 where ``labels == c``, else 0.0) and
    the features ``F`` (N, D; not centred, no bias) explain it by Bayesian linear regression,
    ``y ~ N(F w, beta^-1 I)`` with prior ``w ~ N(0, alpha^-1 I)``. The evidence is

    .. math::

        L(\alpha, \beta) = \tfrac{D}{2}\log\alpha + \tfrac{N}{2}\log\beta
            - \tfrac12\log|A| - \tfrac{\beta}{2}\lVert F m - y\rVert^2
            - \tfrac{\alpha}{2} m^\top m - \tfrac{N}{2}\log 2\pi,
        \quad A = \alpha I + \beta F^\top F,\; m = \beta A^{-1} F^\top y,

    i.e. ``log N(y; 0, beta^-1 I + alpha^-1 F F^T)``. It is maximised over (alpha, beta) by
    MacKay's fixed-point updates from ``alpha = beta = 1``: with ``s_i`` the eigenvalues of
    ``F^T F`` and ``gamma = sum_i beta s_i / (alpha + beta s_i)`` at the current values,
    ``alpha <- gamma / m^T m`` and ``beta <- (N - gamma) / ||F m - y||^2``, stopping after
    the update that changes ``lambda = alpha / beta`` by less than 1% relatively
    (:data:`LOGME_TOL`), or after :data:`LOGME_MAX_UPDATES` (11) updates. L is then
    evaluated exactly at the final (alpha, beta) and divided by N; the score is the mean
    over classes.

    All classes share one eigendecomposition: of ``F^T F`` (D x D) when N >= D, of
    ``F F^T`` (N x N) when N < D. In that basis each evaluation is O(min(N, D)): with ``u_i``
    the left singular vectors and ``w_i = u_i^T y``,
    ``m^T m = sum beta^2 s_i w_i^2 / (alpha + beta s_i)^2`` and
    ``||F m - y||^2 = ||y - U U^T y||^2 + sum alpha^2 w_i^2 / (alpha + beta s_i)^2``.
    Eigenvalues below ``s_max * max(N, D) * eps`` count as zero. See :func:`_fit_class` for
    the guards that keep the result finite (all-zero features, labels fitted exactly).

    Parameters
    ----------
    features : array_like, shape (N, D)
    labels : array_like of int, shape (N,)
        At least two distinct values.

    Returns
    -------
    float
        Higher is better. Typically negative (a log density per image).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat([0, 1], 50)
    >>> good = np.eye(2)[y] + 0.1 * rng.standard_normal((100, 2))
    >>> bad = rng.standard_normal((100, 2))
    >>> logme(good, y) > logme(bad, y)
    True
    """
    return float(np.mean([fit.evidence for fit in logme_fit(features, labels)]))


# ----------------------------------------------------------------------------------------
# LEEP and NCE
# ----------------------------------------------------------------------------------------


def leep(source_probs: Any, labels: Any) -> float:
    r"""LEEP (Nguyen et al., ICML 2020): log-likelihood of the expected empirical predictor.

    With ``theta_i`` the source model's softmax over its own C_s classes on target image i,
    the empirical joint and conditional of target label y and source label z are

    .. math::

        \hat P(y, z) = \frac1N \sum_{i:\, y_i = y} \theta_{iz},\qquad
        \hat P(z) = \sum_y \hat P(y, z),\qquad
        \hat P(y \mid z) = \hat P(y, z) / \hat P(z),

    and the score is :math:`\frac1N \sum_i \log \sum_z \hat P(y_i \mid z)\, \theta_{iz}`.
    A source class that gets no mass (``P(z) = 0``) contributes nothing. With one-hot
    ``theta`` (at the argmax) LEEP equals :func:`nce`.

    Parameters
    ----------
    source_probs : array_like, shape (N, C_s)
        Non-negative, rows summing to 1 within :data:`PROB_ROW_ATOL` (1e-3).
    labels : array_like of int, shape (N,)

    Returns
    -------
    float
        Higher is better; always <= 0 (a mean log-probability).

    Examples
    --------
    >>> leep([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0, 0, 1])
    0.0
    """
    checked = _check_inputs(labels, source_probs=source_probs)
    theta = checked.probs
    groups = _class_rows(checked.y, checked.counts)
    joint = _class_sums(theta, groups)  # N * P(y, z), (C, C_s)
    pz = joint.sum(axis=0)
    cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)
    total = 0.0
    for c, rows in enumerate(groups):
        for start in range(0, rows.size, _ROW_BLOCK):
            block = np.asarray(theta[rows[start : start + _ROW_BLOCK]], dtype=np.float64)
            total += float(np.log(block @ cond[c]).sum())
    return total / theta.shape[0]


def nce(source_predictions: Any, labels: Any) -> float:
    r"""NCE (Tran et al., ICCV 2019): negative conditional entropy of the target label given
    the source model's prediction.

    With ``z_i`` the source model's hard prediction (argmax label) on target image i and
    :math:`\hat P` the empirical joint distribution of the pairs ``(y_i, z_i)``,

    .. math::

        \mathrm{NCE} = -H(Y \mid Z) = \sum_{y, z} \hat P(y, z) \log \hat P(y \mid z),
        \qquad \hat P(y \mid z) = \hat P(y, z) / \hat P(z),

    summed over the pairs that occur. Zero when the prediction determines the label.

    Parameters
    ----------
    source_predictions : array_like of int, shape (N,)
        Source labels, any integers (e.g. 0..C_s-1, not all of them present).
    labels : array_like of int, shape (N,)

    Returns
    -------
    float
        Higher is better; always <= 0.

    Examples
    --------
    >>> nce([0, 0, 1, 1], [5, 5, 7, 7])
    0.0
    >>> round(nce([0, 0, 0, 0], [5, 5, 7, 7]), 6)  # -log 2
    -0.693147
    """
    checked = _check_inputs(labels, source_predictions=source_predictions)
    _, z = np.unique(checked.predictions, return_inverse=True)
    n_z = int(z.max()) + 1
    n_y = checked.classes.size
    counts = np.bincount(checked.y * n_z + z, minlength=n_y * n_z).reshape(n_y, n_z).astype(np.float64)
    per_z = counts.sum(axis=0)
    yy, zz = np.nonzero(counts)
    joint = counts[yy, zz]
    return float(np.sum(joint * np.log(joint / per_z[zz])) / checked.y.size)


# ----------------------------------------------------------------------------------------
# H-score
# ----------------------------------------------------------------------------------------


def hscore(features: Any, labels: Any) -> float:
    r"""H-score (Bao et al., ICIP 2019): ``tr(cov(f)^+ cov(E[f | y]))``.

    With ``f`` the features centred on their overall mean, ``cov(f) = f^T f / N``; ``E[f | y]``
    replaces each row by its class's mean of the centred features, so
    ``cov(E[f | y]) = sum_c n_c mu_c mu_c^T / N``. Then

    .. math:: H = \operatorname{tr}\big(\operatorname{cov}(f)^{+}\,
              \operatorname{cov}(\mathbb E[f \mid y])\big)
              = \frac1N \sum_c n_c\, \mu_c^\top \operatorname{cov}(f)^{+} \mu_c .

    The pseudo-inverse is ``np.linalg.pinv(cov, rtol=1e-10, hermitian=True)``
    (:data:`HSCORE_RTOL`): eigenvalues below 1e-10 of the largest count as zero, so that
    directions without variance (a constant column, a column that is a sum of others) are
    ignored rather than amplifying rounding noise. H is invariant to an invertible linear map
    of the features; for 1-D features it is the correlation ratio (between-class over total
    variance); its maximum, reached when the features determine the class, is the rank of the
    class-mean matrix (C - 1 when the centred class means are linearly independent).

    Parameters
    ----------
    features : array_like, shape (N, D)
    labels : array_like of int, shape (N,)

    Returns
    -------
    float
        Higher is better; between 0 and min(D, C - 1).

    Examples
    --------
    >>> round(hscore([[0.0], [2.0], [4.0], [6.0]], [0, 0, 1, 1]), 6)  # 16 / 20
    0.8
    """
    checked = _check_inputs(labels, features=features)
    f = checked.features
    n = f.shape[0]
    mean = f.sum(axis=0, dtype=np.float64) / n
    cov = _gram(f, center=mean) / n
    groups = _class_rows(checked.y, checked.counts)
    mu = _class_sums(f, groups) / checked.counts[:, None] - mean  # centred class means (C, D)
    pinv = np.linalg.pinv(cov, rtol=HSCORE_RTOL, hermitian=True)
    return float(np.einsum("cd,cd,c->", mu @ pinv, mu, checked.counts.astype(np.float64)) / n)


def ledoit_wolf(features: Any) -> tuple[np.ndarray, float]:
    r"""Ledoit-Wolf shrinkage of the covariance of ``features`` (Ledoit and Wolf, "A
    well-conditioned estimator for large-dimensional covariance matrices", J. Multivariate
    Analysis 2004), as scikit-learn's ``LedoitWolf`` computes it, in numpy.

    With ``x_k`` the N rows centred on their mean, ``S = X^T X / N`` (D x D) and
    ``mu = tr(S) / D``:

    .. math::
        \delta = \lVert S - \mu I \rVert_F^2 / D, \qquad
        \beta = \frac{1}{D N} \Big(\frac1N \sum_k \lVert x_k \rVert^4 - \lVert S \rVert_F^2\Big),

    shrinkage ``alpha = min(beta, delta) / delta`` (0 when ``delta`` is 0: S is already a
    multiple of the identity) and the shrunk covariance
    ``cov_alpha = (1 - alpha) S + alpha mu I``.

    Parameters
    ----------
    features : array_like, shape (N, D)

    Returns
    -------
    (cov_alpha, alpha) : ndarray (D, D) float64, float in [0, 1]

    Examples
    --------
    >>> cov, alpha = ledoit_wolf([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    >>> round(alpha * 18, 9), np.round(cov * 18, 9).tolist()  # alpha = 17/18; diag 23.25, 21.75 over 18
    (17.0, [[23.25, 0.0], [0.0, 21.75]])
    """
    arr = np.asarray(features)
    f = _float_matrix(arr, "features", arr.shape[0] if arr.ndim else 0, "(N, D)")  # finite, 2-d, not empty
    n, d = f.shape
    mean = f.sum(axis=0, dtype=np.float64) / n
    s = _gram(f, center=mean) / n
    fourth = 0.0  # sum_k ||x_k||^4, in row blocks
    for start in range(0, n, _ROW_BLOCK):
        block = np.array(f[start : start + _ROW_BLOCK], dtype=np.float64) - mean
        fourth += float(np.sum(np.einsum("kd,kd->k", block, block) ** 2))
    mu = float(np.trace(s)) / d
    s_fro2 = float(np.sum(s * s))
    delta = (s_fro2 - 2.0 * mu * float(np.trace(s)) + d * mu * mu) / d  # ||S - mu I||_F^2 / D
    beta = (fourth / n - s_fro2) / (d * n)
    alpha = 0.0 if delta <= 0.0 else min(max(beta, 0.0), delta) / delta
    cov = (1.0 - alpha) * s
    cov[np.diag_indices(d)] += alpha * mu
    return cov, float(alpha)


def regularized_hscore(features: Any, labels: Any) -> float:
    r"""Shrinkage-regularised H-score (Ibrahim, Ponomareva and Mazumder, "Newer is not always
    better: Rethinking transferability metrics, their peculiarities, stability and
    performance", ECML PKDD 2022; TLlib's ``regularized_h_score``):

    .. math:: H_\alpha = \operatorname{tr}\big(\operatorname{cov}_\alpha(f)^{+}\,
              (1 - \alpha)\,\operatorname{cov}(\mathbb E[f \mid y])\big)
              = \frac{1 - \alpha}{N} \sum_c n_c\, \mu_c^\top \operatorname{cov}_\alpha(f)^{+} \mu_c ,

    with ``cov_alpha(f)`` the Ledoit-Wolf covariance of the centred features and ``alpha`` its
    shrinkage (:func:`ledoit_wolf`), ``mu_c`` the centred class means, ``n_c`` their counts.
    The plain H-score (:func:`hscore`) inverts the sample covariance, which with N <= D images
    has rank below D: every class mean then lies in its span and the score is C - 1 for every
    network, whatever its features. The shrunk covariance is full rank, so the score stays
    informative (and finite) there.

    Both covariances divide by N; TLlib's ``np.cov(g)`` divides the between-class one by N - 1,
    so its value is N / (N - 1) times this one (the same ranking of networks on one target).

    Parameters
    ----------
    features : array_like, shape (N, D)
    labels : array_like of int, shape (N,)

    Returns
    -------
    float
        Higher is better; at least 0.

    Examples
    --------
    >>> x = [[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]]
    >>> round(regularized_hscore(x, [0, 1, 0, 1]) * 899, 9)  # 49 / 899, worked in tests/test_transferability.py
    49.0
    """
    checked = _check_inputs(labels, features=features)
    f = checked.features
    n = f.shape[0]
    cov, alpha = ledoit_wolf(f)
    mean = f.sum(axis=0, dtype=np.float64) / n
    groups = _class_rows(checked.y, checked.counts)
    mu = _class_sums(f, groups) / checked.counts[:, None] - mean  # centred class means (C, D)
    pinv = np.linalg.pinv(cov, rtol=HSCORE_RTOL, hermitian=True)
    between = np.einsum("cd,cd,c->", mu @ pinv, mu, checked.counts.astype(np.float64)) / n
    return float((1.0 - alpha) * between)


# ----------------------------------------------------------------------------------------
# k-nearest-neighbour accuracy
# ----------------------------------------------------------------------------------------


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer; got {k!r}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be between 1 and N - 1 = {n - 1} (N = {n} images); got {k}")
    return int(k)


def _unit_rows(f: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Rows scaled to unit L2 norm (norms in float64), zero rows left at zero; in ``dtype``."""
    out = np.empty(f.shape, dtype=dtype)
    for start in range(0, f.shape[0], _ROW_BLOCK):
        block = np.array(f[start : start + _ROW_BLOCK], dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        block /= np.where(norms > 0, norms, 1.0)[:, None]
        out[start : start + _ROW_BLOCK] = block
    return out


def _top_k(sim: np.ndarray, k: int) -> np.ndarray:
    """Column indices (rows, k) of the k largest entries per row; equal values: smaller index first."""
    m, n = sim.shape
    kth = np.partition(sim, n - k, axis=1)[:, n - k]  # the k-th largest value of each row
    chosen = sim >= kth[:, None]
    extra = np.flatnonzero(chosen.sum(axis=1) > k)  # rows with ties straddling the k-th place
    for i in extra:
        tied = np.flatnonzero(sim[i] == kth[i])
        need = k - int(np.count_nonzero(sim[i] > kth[i]))
        chosen[i, tied[need:]] = False
    return np.nonzero(chosen)[1].reshape(m, k)


def _vote(neigh_labels: np.ndarray, neigh_sims: np.ndarray, n_classes: int) -> np.ndarray:
    """Majority class per row; ties: larger summed similarity of the voters, then smaller class."""
    m = neigh_labels.shape[0]
    flat = (np.arange(m)[:, None] * n_classes + neigh_labels).ravel()
    votes = np.bincount(flat, minlength=m * n_classes).reshape(m, n_classes)
    sims = np.bincount(flat, weights=neigh_sims.ravel().astype(np.float64), minlength=m * n_classes)
    sims = sims.reshape(m, n_classes)
    best = votes == votes.max(axis=1, keepdims=True)
    tied_sims = np.where(best, sims, -np.inf)
    best &= tied_sims == tied_sims.max(axis=1, keepdims=True)
    return best.argmax(axis=1)  # first True: the smallest class among the remaining ties


def _merge_top_k(
    best_sim: np.ndarray, best_idx: np.ndarray, sim: np.ndarray, col_offset: int, k: int
) -> None:
    """Merge a block's candidates into the running top-k of its rows (in place).

    ``best_sim`` / ``best_idx`` (m, k) are the rows' best so far, ordered by similarity
    (descending) then index (ascending); ``sim`` (m, w) is the block of the same rows against
    columns ``col_offset .. col_offset + w``.
    """
    kk = min(k, sim.shape[1])
    top = _top_k(sim, kk)
    rows = np.arange(sim.shape[0])[:, None]
    cand_sim = np.concatenate([best_sim, sim[rows, top].astype(np.float64)], axis=1)
    cand_idx = np.concatenate([best_idx, top + col_offset], axis=1)
    order = np.lexsort((cand_idx, -cand_sim), axis=1)[:, :k]
    best_sim[...] = np.take_along_axis(cand_sim, order, axis=1)
    best_idx[...] = np.take_along_axis(cand_idx, order, axis=1)


def _knn_vote(
    features: Any, labels: Any, k: Any, chunk_size: Any, dtype: Any
) -> tuple[np.ndarray, _Inputs]:
    """Predicted class indices (0..C-1) of every image, and the checked inputs.

    The similarity matrix is symmetric, so only its blocks (I, J) with J >= I are computed
    (half the products); each block serves the rows of I directly and the rows of J
    transposed. Row block I is final, and voted on, after its pass of the outer loop.
    """
    checked = _check_inputs(labels, features=features)
    f = checked.features
    n = f.shape[0]
    k = _check_k(k, n)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {dtype}")
    if chunk_size is None:
        chunk_size = max(1, min(n, math.isqrt(_KNN_BLOCK_BYTES // dtype.itemsize)))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    step = int(chunk_size)
    x = _unit_rows(f, dtype)
    best_sim = np.full((n, k), -np.inf)
    best_idx = np.full((n, k), n, dtype=np.int64)  # n: no candidate yet (sorts last)
    pred = np.empty(n, dtype=np.int64)
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        for j0 in range(i0, n, step):
            j1 = min(n, j0 + step)
            sim = x[i0:i1] @ x[j0:j1].T
            if j0 == i0:
                np.fill_diagonal(sim, -np.inf)  # leave the image itself out
            _merge_top_k(best_sim[i0:i1], best_idx[i0:i1], sim, j0, k)
            if j0 != i0:
                _merge_top_k(best_sim[j0:j1], best_idx[j0:j1], np.ascontiguousarray(sim.T), i0, k)
        pred[i0:i1] = _vote(checked.y[best_idx[i0:i1]], best_sim[i0:i1], checked.classes.size)
    return pred, checked


def knn_predictions(
    features: Any,
    labels: Any,
    k: int = DEFAULT_KNN_K,
    *,
    chunk_size: int | None = None,
    dtype: Any = np.float32,
) -> np.ndarray:
    """Leave-one-out k-NN prediction of every image's label (cosine similarity, majority vote).

    See :func:`knn_accuracy` for the rules and parameters. Returns an array of shape (N,)
    holding labels as given in ``labels`` (as int64).
    """
    pred, checked = _knn_vote(features, labels, k, chunk_size, dtype)
    return checked.classes[pred]


def knn_accuracy(
    features: Any,
    labels: Any,
    k: int = DEFAULT_KNN_K,
    *,
    chunk_size: int | None = None,
    dtype: Any = np.float32,
) -> float:
    r"""Leave-one-out k-nearest-neighbour accuracy under cosine similarity.

    Rows are scaled to unit L2 norm (a zero row stays zero: cosine 0 with everything), so the
    similarity of images i and j is :math:`\cos(f_i, f_j) = \hat f_i^\top \hat f_j`. Each
    image is classified by a majority vote of its k most similar *other* images (itself left
    out; duplicates of it count); the score is the fraction classified correctly.

    Deterministic rules for ties: among equally similar candidates for the k-th place, the
    image with the smaller row index is taken; between classes with equally many votes, the
    one whose voters have the larger summed similarity wins, then the smaller label.

    Cost and memory: N^2 D / 2 multiply-adds in BLAS matrix products over square blocks of
    ``chunk_size`` rows (default: 4,096 in float32, 2,896 in float64, so that one block
    takes 64 MiB); the similarity matrix is symmetric, so only the blocks on and above the
    diagonal are computed, each serving both its rows and, transposed, its columns. Each
    row keeps a running top-k (``np.partition`` within a block, then a merge); the working
    memory is a few blocks plus the unit-norm copy of the features, never the N x N matrix.

    Precision: the unit rows and the similarity blocks are ``dtype``, float32 by default
    (twice as fast as float64 on a CPU; similarities carry rounding of about 1e-7, so
    neighbours whose similarities differ by less may be ordered either way). Pass
    ``dtype=np.float64`` for exact-to-float64 similarities.

    Parameters
    ----------
    features : array_like, shape (N, D)
    labels : array_like of int, shape (N,)
    k : int
        Neighbours per vote, 1 <= k <= N - 1; default :data:`DEFAULT_KNN_K` (10).
    chunk_size : int, optional
        Rows of the similarity matrix computed at a time.
    dtype : float32 or float64

    Returns
    -------
    float
        Higher is better; in [0, 1].

    Examples
    --------
    >>> knn_accuracy([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 2.0]], [0, 0, 1, 1], k=1)
    1.0
    """
    pred, checked = _knn_vote(features, labels, k, chunk_size, dtype)
    return float(np.mean(pred == checked.y))


# ----------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------


class ScoreSpec(NamedTuple):
    """A score's function and the input it takes before ``labels``: ``"features"`` (N, D),
    ``"probs"`` (source softmax, N x C_s) or ``"predictions"`` (source argmax labels, N)."""

    function: Callable[..., float]
    needs: str


SCORES: dict[str, ScoreSpec] = {
    "logme": ScoreSpec(logme, "features"),
    "leep": ScoreSpec(leep, "probs"),
    "nce": ScoreSpec(nce, "predictions"),
    "hscore": ScoreSpec(hscore, "features"),
    "regularized_hscore": ScoreSpec(regularized_hscore, "features"),
    "knn": ScoreSpec(knn_accuracy, "features"),
}
"""Every score by name. Higher is better for all of them."""


def all_scores(
    features: Any,
    probs: Any,
    labels: Any,
    k: int = DEFAULT_KNN_K,
    names: Sequence[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Every score of :data:`SCORES` (or those in ``names``), each with its wall time.

    Parameters
    ----------
    features : array_like, shape (N, D), or None
        Target images' features; None skips the scores that need them.
    probs : array_like, shape (N, C_s), or None
        The source model's softmax on the target images; None skips LEEP and NCE. NCE's
        predictions are ``probs.argmax(1)`` (computed inside NCE's timing).
    labels : array_like of int, shape (N,)
    k : int
        Neighbours of the k-NN score.
    names : sequence of str, optional
        Only these scores (each a key of :data:`SCORES`; an unknown name is a ValueError).

    Returns
    -------
    dict
        ``name -> (value, seconds)`` in :data:`SCORES` order (``time.perf_counter``).
    """
    unknown = sorted(set(names or ()) - set(SCORES))
    if unknown:
        raise ValueError(f"unknown transferability score(s) {unknown}; expected some of {list(SCORES)}")
    out: dict[str, tuple[float, float]] = {}
    for name, spec in SCORES.items():
        if names is not None and name not in names:
            continue
        if (features if spec.needs == "features" else probs) is None:
            continue
        t0 = time.perf_counter()
        if spec.needs == "features":
            value = spec.function(features, labels, k) if name == "knn" else spec.function(features, labels)
        elif spec.needs == "probs":
            value = spec.function(probs, labels)
        else:
            value = spec.function(np.asarray(probs).argmax(axis=1), labels)
        out[name] = (float(value), time.perf_counter() - t0)
    return out
