"""Domain similarity by the Earth Mover's Distance (Cui et al., CVPR 2018).

A *domain* is summarised by its classes: per class the mean feature vector of its training
images (from one fixed feature network) and its image count. The distance between two
domains is the Earth Mover's Distance between the two weighted point sets,

.. math::

    d(S, T) = \\min_{f \\ge 0} \\sum_{i,j} f_{ij} \\lVert s_i - t_j \\rVert_2
    \\quad\\text{s.t.}\\quad \\sum_j f_{ij} = w^S_i,\\; \\sum_i f_{ij} = w^T_j,

with weights proportional to image counts (each side normalised to sum 1), and the
domain similarity is ``exp(-gamma * d)`` with ``gamma = 0.01``. Source classes with fewer
than ``min_source_images`` images are dropped first (:data:`DEFAULT_MIN_SOURCE_IMAGES`, 200,
as in the reference notebook).

The full EMD is solved exactly with POT's network simplex (``ot.emd2``); a solver that stops
before optimality raises :class:`EMDNotConverged`. For a single source class (a point mass)
the EMD needs no solver: it is the count-weighted mean distance from that class mean to the
target's class means (:func:`point_mass_emd`, vectorised in :func:`class_to_domain_emd`).

This module imports only numpy and pandas at import time. POT is imported on first use by
:func:`_pot`, with its optional torch/JAX/CuPy/TensorFlow backends switched off unless the
process already imported them (``import ot`` would otherwise import torch, which costs
seconds and which this stage does not need). matplotlib is imported inside
:func:`plot_similarity_heatmap`.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .fileio import atomic_write

__all__ = [
    "DEFAULT_GAMMA",
    "DEFAULT_MIN_SOURCE_IMAGES",
    "DEFAULT_NUM_ITER_MAX",
    "ClassStats",
    "EMDNotConverged",
    "class_to_domain_emd",
    "domain_similarity",
    "check_gamma",
    "check_min_images",
    "euclidean_distances",
    "load_class_stats",
    "plot_similarity_heatmap",
    "point_mass_emd",
    "save_class_stats",
    "similarity_from_emd",
    "similarity_matrix",
    "write_similarity",
]

DEFAULT_GAMMA = 0.01
"""The paper's ``gamma`` in ``similarity = exp(-gamma * EMD)``."""

DEFAULT_MIN_SOURCE_IMAGES = 200
"""Source classes with fewer training images are dropped (the reference notebook's 200). The
one default of ``min_source_images``: the functions here, :func:`finetail.selection.greedy_select`
and ``finetail similarity`` / ``finetail select`` use it, and the config schema's
``transfer.similarity.min_source_images`` default equals it (a test checks)."""

DEFAULT_NUM_ITER_MAX = 100_000_000
"""Network-simplex iteration cap for :func:`domain_similarity` (POT's default is 1e5, too
small for thousands of source classes)."""

_NPZ_ARRAY_KEYS = ("means", "counts", "class_names")
_MAX_CHUNK_BYTES = 64 * 2**20  # working memory for one block of the distance matrix
_CANCELLATION_RTOL = 1e-5  # below this relative size, recompute ||a - b||^2 exactly

# POT's backend switches, read once when ``ot.backend`` is imported.
_POT_BACKEND_SWITCHES = {
    "torch": "POT_BACKEND_DISABLE_PYTORCH",
    "jax": "POT_BACKEND_DISABLE_JAX",
    "cupy": "POT_BACKEND_DISABLE_CUPY",
    "tensorflow": "POT_BACKEND_DISABLE_TENSORFLOW",
}

# POT network-simplex result codes (EMD_wrapper.h): INFEASIBLE, OPTIMAL, UNBOUNDED, MAX_ITER
_POT_OPTIMAL = 1


class EMDNotConverged(RuntimeError):
    """The exact EMD solver stopped before reaching an optimal transport plan.

    Raised instead of POT's ``UserWarning`` so that a non-optimal (too large) distance can
    never reach a similarity table unnoticed. ``result_code`` is POT's network-simplex code
    (0 infeasible, 2 unbounded, 3 iteration limit reached).
    """

    def __init__(self, message: str, result_code: int | None = None) -> None:
        super().__init__(message)
        self.result_code = result_code


# ----------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------


def _as_means(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a finite float64 array of shape (C, D), C, D >= 1."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array of shape (C, D): {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (C, D); got an array of shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one class and one feature; got shape {arr.shape}")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        kind = "NaN" if np.isnan(arr).any() else "infinite"
        raise ValueError(
            f"{name} contains {kind} features in {bad.size} of {arr.shape[0]} classes "
            f"(first rows: {bad[:5].tolist()})"
        )
    return arr


def _as_mean_vector(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a finite float64 vector of shape (D,)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must have shape (D,); got an array of shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite features")
    return arr


def _as_counts(x: Any, name: str, n: int) -> np.ndarray:
    """Return ``x`` as a non-negative int64 array of shape (n,)."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (C,); got an array of shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but the means have {n} classes")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must hold integer image counts; got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold whole-number image counts")
    if (arr < 0).any():
        bad = np.flatnonzero(arr < 0)
        raise ValueError(f"{name} must be non-negative; {bad.size} negative counts (first at index {bad[0]})")
    return arr.astype(np.int64)


def check_gamma(gamma: float) -> float:
    """``gamma`` as a float; ValueError unless finite and >= 0."""
    g = float(gamma)
    if not math.isfinite(g) or g < 0:
        raise ValueError(f"gamma must be a finite non-negative number; got {gamma!r}")
    return g


def check_min_images(min_source_images: int) -> int:
    """``min_source_images`` as an int; ValueError unless a non-negative integer."""
    if isinstance(min_source_images, bool) or int(min_source_images) != min_source_images:
        raise ValueError(f"min_source_images must be an integer; got {min_source_images!r}")
    if min_source_images < 0:
        raise ValueError(f"min_source_images must be >= 0; got {min_source_images}")
    return int(min_source_images)


def _weights(counts: np.ndarray, name: str) -> np.ndarray:
    total = counts.sum()
    if total <= 0:
        raise ValueError(f"{name} sum to 0 images: class weights cannot be normalised")
    return counts.astype(np.float64) / float(total)


# ----------------------------------------------------------------------------------------
# class statistics (the features stage's output)
# ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class ClassStats:
    """Per-class summary of one domain in one feature space.

    Parameters
    ----------
    means : array_like, shape (C, D)
        Mean feature vector of each class (converted to float64; must be finite).
    counts : array_like, shape (C,)
        Number of training images of each class (converted to int64; non-negative).
    class_names : sequence of str, length C
        Stable, unique class ids (the manifests' ``class_name``).
    meta : dict of str to str, optional
        Provenance such as ``model`` (feature network identity), ``dataset`` or ``digest``.
        By convention the key ``model`` names the feature network; statistics from different
        models are refused by :func:`similarity_matrix` and :func:`concat_class_stats`.

    Examples
    --------
    >>> s = ClassStats(means=[[0.0, 0.0], [3.0, 4.0]], counts=[10, 30], class_names=["a", "b"])
    >>> s.num_classes, s.dim
    (2, 2)
    """

    means: np.ndarray
    counts: np.ndarray
    class_names: list[str]
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.means = _as_means(self.means, "means")
        self.counts = _as_counts(self.counts, "counts", self.means.shape[0])
        if isinstance(self.class_names, str):
            raise ValueError("class_names must be a sequence of names, not a single string")
        names = [str(n) for n in self.class_names]
        if len(names) != self.means.shape[0]:
            raise ValueError(f"class_names has {len(names)} entries but means has {self.means.shape[0]} classes")
        dup = pd.Index(names)
        if dup.has_duplicates:
            raise ValueError(f"class_names must be unique; duplicated: {sorted(set(dup[dup.duplicated()]))[:5]}")
        self.class_names = names
        self.meta = {str(k): str(v) for k, v in dict(self.meta).items()}

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.means.shape[1])

    @property
    def num_images(self) -> int:
        """Total number of images over all classes."""
        return int(self.counts.sum())


def save_class_stats(path: str | os.PathLike[str], stats: ClassStats, **meta: Any) -> Path:
    """Write class statistics to an ``.npz`` file (atomically: temp file, then rename).

    Keys: ``means`` (C, D) float64, ``counts`` (C,) int64, ``class_names`` (C,) unicode, and one
    0-d string array per metadata entry (``stats.meta`` updated with ``**meta``; values are
    stored as ``str``). Loadable with ``np.load(path, allow_pickle=False)``.

    Parameters
    ----------
    path : path-like
        Destination file; parent folders are created.
    stats : ClassStats
    **meta
        Extra provenance, e.g. ``model="resnet101"``, ``digest="sha256:..."``.

    Returns
    -------
    pathlib.Path
        The written path.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "cub.npz"
    >>> s = ClassStats([[0.0, 1.0]], [5], ["c0"])
    >>> _ = save_class_stats(p, s, model="toy")
    >>> load_class_stats(p).meta["model"]
    'toy'
    """
    if not isinstance(stats, ClassStats):
        raise TypeError(f"stats must be a ClassStats; got {type(stats).__name__}")
    merged = {**stats.meta, **{str(k): str(v) for k, v in meta.items()}}
    clash = sorted(set(merged) & set(_NPZ_ARRAY_KEYS))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved for the arrays")
    arrays: dict[str, np.ndarray] = {
        "means": np.ascontiguousarray(stats.means, dtype=np.float64),
        "counts": np.ascontiguousarray(stats.counts, dtype=np.int64),
        "class_names": np.asarray(stats.class_names, dtype=np.str_).reshape(-1),
    }
    for key, value in merged.items():
        arrays[key] = np.asarray(value, dtype=np.str_)
    path = Path(path)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to the temp name
            np.savez(fh, **arrays)

    atomic_write(path, save)
    return path


def load_class_stats(path: str | os.PathLike[str]) -> ClassStats:
    """Read class statistics written by :func:`save_class_stats`.

    Parameters
    ----------
    path : path-like
        An ``.npz`` file with keys ``means``, ``counts``, ``class_names`` and optional 0-d
        string metadata arrays.

    Returns
    -------
    ClassStats
        With ``meta`` holding every non-array key as ``str``.
    """
    with np.load(Path(path), allow_pickle=False) as data:
        missing = [k for k in _NPZ_ARRAY_KEYS if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}; found {sorted(data.files)}")
        meta: dict[str, str] = {}
        for key in data.files:
            if key in _NPZ_ARRAY_KEYS:
                continue
            value = data[key]
            if value.ndim != 0:
                raise ValueError(f"{path}: metadata key {key!r} must be a scalar string; got shape {value.shape}")
            meta[key] = str(value.item())
        return ClassStats(
            means=data["means"],
            counts=data["counts"],
            class_names=[str(n) for n in data["class_names"].tolist()],
            meta=meta,
        )


# ----------------------------------------------------------------------------------------
# distances
# ----------------------------------------------------------------------------------------


def euclidean_distances(a: Any, b: Any, *, max_chunk_bytes: int = _MAX_CHUNK_BYTES) -> np.ndarray:
    """Pairwise Euclidean distances between the rows of ``a`` and ``b``, memory-bounded.

    Uses ``||a_i||^2 + ||b_j||^2 - 2 a_i . b_j`` (one BLAS product per block of rows of
    ``a``, each block at most ``max_chunk_bytes``), clipped at 0. Entries where that
    expression suffers cancellation (``d^2 < 1e-5 * (||a_i||^2 + ||b_j||^2)``, i.e. nearly
    coincident points) are recomputed exactly as ``||a_i - b_j||``, so identical points get
    distance exactly 0.

    Parameters
    ----------
    a : array_like, shape (N, D)
    b : array_like, shape (M, D)
    max_chunk_bytes : int
        Working-memory bound for one block of the (N, M) result and its temporaries.

    Returns
    -------
    ndarray, shape (N, M), float64

    Examples
    --------
    >>> euclidean_distances([[0.0, 0.0]], [[3.0, 4.0], [0.0, 0.0]])
    array([[5., 0.]])
    """
    a = _as_means(a, "a")
    b = _as_means(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    n, m = a.shape[0], b.shape[0]
    d = a.shape[1]
    out = np.empty((n, m), dtype=np.float64)
    a_sq = np.einsum("ij,ij->i", a, a)
    b_sq = np.einsum("ij,ij->i", b, b)
    rows = max(1, int(max_chunk_bytes) // (3 * 8 * m))
    pair_batch = max(1, int(max_chunk_bytes) // (8 * d))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = out[start:stop]
        np.matmul(a[start:stop], b.T, out=block)
        block *= -2.0
        scale = a_sq[start:stop, None] + b_sq[None, :]
        block += scale
        np.maximum(block, 0.0, out=block)
        ii, jj = np.nonzero(block < _CANCELLATION_RTOL * scale)
        for p in range(0, ii.size, pair_batch):
            bi, bj = ii[p : p + pair_batch], jj[p : p + pair_batch]
            diff = a[start + bi] - b[bj]
            block[bi, bj] = np.einsum("ij,ij->i", diff, diff)
        np.sqrt(block, out=block)
    return out


def similarity_from_emd(emd: Any, gamma: float = DEFAULT_GAMMA) -> Any:
    """``exp(-gamma * emd)``, elementwise. ``similarity_from_emd(0.0) == 1.0``."""
    return np.exp(-check_gamma(gamma) * np.asarray(emd, dtype=np.float64))


def point_mass_emd(source_mean: Any, target_means: Any, target_counts: Any) -> float:
    """EMD from one source class (a point mass at its mean) to a target domain.

    All of a point mass's unit of mass must go to every target class in proportion to its
    weight, so no solver is needed:

    .. math:: d(s, T) = \\sum_j w_j \\lVert s - t_j \\rVert_2, \\quad w_j = n_j / \\sum_k n_k.

    Parameters
    ----------
    source_mean : array_like, shape (D,)
    target_means : array_like, shape (C_t, D)
    target_counts : array_like of int, shape (C_t,)

    Returns
    -------
    float

    Examples
    --------
    >>> point_mass_emd([0.0], [[1.0], [5.0]], [3, 1])  # (3 * 1 + 1 * 5) / 4
    2.0
    """
    s = _as_mean_vector(source_mean, "source_mean")
    t = _as_means(target_means, "target_means")
    if t.shape[1] != s.shape[0]:
        raise ValueError(f"feature dimensions differ: source {s.shape[0]} vs target {t.shape[1]}")
    w = _weights(_as_counts(target_counts, "target_counts", t.shape[0]), "target_counts")
    return float(np.linalg.norm(t - s, axis=1) @ w)


def class_to_domain_emd(
    source_means: Any,
    target_means: Any,
    target_counts: Any,
    *,
    max_chunk_bytes: int = _MAX_CHUNK_BYTES,
) -> np.ndarray:
    """:func:`point_mass_emd` for many source classes at once.

    Parameters
    ----------
    source_means : array_like, shape (C_s, D)
    target_means : array_like, shape (C_t, D)
    target_counts : array_like of int, shape (C_t,)
    max_chunk_bytes : int
        Working-memory bound, see :func:`euclidean_distances`.

    Returns
    -------
    ndarray, shape (C_s,)
        ``emd[i] = sum_j w_j ||s_i - t_j||`` with ``w_j = n_j / sum(n)``.

    Examples
    --------
    >>> class_to_domain_emd([[0.0], [2.0]], [[1.0], [5.0]], [3, 1])
    array([2. , 1.5])
    """
    s = _as_means(source_means, "source_means")
    t = _as_means(target_means, "target_means")
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"feature dimensions differ: source {s.shape[1]} vs target {t.shape[1]}")
    w = _weights(_as_counts(target_counts, "target_counts", t.shape[0]), "target_counts")
    keep = w > 0
    t, w = t[keep], w[keep]
    # Stream over blocks of source rows so the (C_s, C_t) matrix never exists in full.
    rows = max(1, int(max_chunk_bytes) // (3 * 8 * t.shape[0]))
    out = np.empty(s.shape[0], dtype=np.float64)
    for start in range(0, s.shape[0], rows):
        stop = min(s.shape[0], start + rows)
        out[start:stop] = euclidean_distances(s[start:stop], t, max_chunk_bytes=max_chunk_bytes) @ w
    return out


# ----------------------------------------------------------------------------------------
# full EMD
# ----------------------------------------------------------------------------------------


def _pot() -> Any:
    """Import and return POT (``ot``) without importing frameworks the process lacks.

    POT's backend module imports torch, JAX, CuPy and TensorFlow when installed. For each
    one not already imported (and whose switch the user has not set), the matching
    ``POT_BACKEND_DISABLE_*`` variable is set for the duration of the import only. If the
    process already imported torch, POT keeps its torch backend.
    """
    if "ot" not in sys.modules:
        added = [
            key
            for module, key in _POT_BACKEND_SWITCHES.items()
            if module not in sys.modules and key not in os.environ
        ]
        for key in added:
            os.environ[key] = "1"
        try:
            importlib.import_module("ot")
        finally:
            for key in added:
                os.environ.pop(key, None)
    return importlib.import_module("ot")


def _solve_emd(a: np.ndarray, b: np.ndarray, cost: np.ndarray, num_iter_max: int) -> float:
    """Exact EMD cost with POT; raise EMDNotConverged unless the plan is optimal."""
    if isinstance(num_iter_max, bool) or int(num_iter_max) != num_iter_max or num_iter_max < 1:
        raise ValueError(f"num_iter_max must be a positive integer; got {num_iter_max!r}")
    # POT reports a non-optimal stop both as a UserWarning and in log["result_code"]; the
    # warning is recorded here and turned into an exception, other warnings are re-emitted.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value, log = _pot().emd2(
            np.ascontiguousarray(a, dtype=np.float64),
            np.ascontiguousarray(b, dtype=np.float64),
            np.ascontiguousarray(cost, dtype=np.float64),
            numItermax=int(num_iter_max),
            log=True,
        )
    code = int(log.get("result_code", -1))
    status = log.get("warning")
    if code != _POT_OPTIMAL or status is not None:
        raise EMDNotConverged(
            f"EMD solver did not reach an optimal plan (POT result_code={code}: "
            f"{status or 'unknown status'}); problem {cost.shape[0]} x {cost.shape[1]}, "
            f"num_iter_max={int(num_iter_max)}",
            result_code=code,
        )
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    value = float(value)
    if not math.isfinite(value):
        raise EMDNotConverged(f"EMD solver returned a non-finite cost {value!r}", result_code=code)
    return max(value, 0.0)


def domain_similarity(
    source_means: Any,
    source_counts: Any,
    target_means: Any,
    target_counts: Any,
    gamma: float = DEFAULT_GAMMA,
    min_source_images: int = DEFAULT_MIN_SOURCE_IMAGES,
    *,
    num_iter_max: int = DEFAULT_NUM_ITER_MAX,
) -> tuple[float, float]:
    """Domain similarity of Cui et al. (CVPR 2018) between a source and a target domain.

    Source classes with fewer than ``min_source_images`` images are dropped; each side's
    class weights are its image counts normalised to sum 1 (classes with 0 images carry no
    mass); the ground distance is Euclidean between class means; ``d`` is the exact EMD and

    .. math:: \\mathrm{similarity} = \\exp(-\\gamma\\, d).

    Parameters
    ----------
    source_means : array_like, shape (C_s, D)
    source_counts : array_like of int, shape (C_s,)
    target_means : array_like, shape (C_t, D)
    target_counts : array_like of int, shape (C_t,)
    gamma : float, default 0.01
    min_source_images : int, default DEFAULT_MIN_SOURCE_IMAGES (200)
        0 keeps every source class.
    num_iter_max : int, keyword-only
        Network-simplex iteration cap passed to ``ot.emd2``.

    Returns
    -------
    similarity : float
        In (0, 1]; 1 for identical domains.
    emd : float
        The EMD ``d`` in feature units.

    Raises
    ------
    ValueError
        Bad shapes, negative or fractional counts, non-finite features, differing feature
        dimensions, or no source class left after the ``min_source_images`` filter.
    EMDNotConverged
        The solver stopped before optimality.

    Examples
    --------
    >>> sim, d = domain_similarity([[0.0, 0.0]], [300], [[3.0, 4.0]], [50])
    >>> d, round(sim, 6)  # exp(-0.01 * 5)
    (5.0, 0.951229)
    """
    gamma = check_gamma(gamma)
    min_source_images = check_min_images(min_source_images)
    s = _as_means(source_means, "source_means")
    t = _as_means(target_means, "target_means")
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"feature dimensions differ: source {s.shape[1]} vs target {t.shape[1]}")
    sc = _as_counts(source_counts, "source_counts", s.shape[0])
    tc = _as_counts(target_counts, "target_counts", t.shape[0])

    eligible = sc >= min_source_images
    if not eligible.any():
        raise ValueError(
            f"no source class left: all {sc.size} source classes have fewer than "
            f"min_source_images={min_source_images} images (largest has {int(sc.max())})"
        )
    a = _weights(sc * eligible, "source_counts (after the min_source_images filter)")
    b = _weights(tc, "target_counts")
    # Classes without mass change nothing; drop them (copies only when there are any).
    if not (a > 0).all():
        s, a = s[a > 0], a[a > 0]
    if not (b > 0).all():
        t, b = t[b > 0], b[b > 0]

    cost = euclidean_distances(s, t)
    if s.shape[0] == 1 or t.shape[0] == 1:
        emd = float(a @ cost @ b)  # a single point on either side fixes the plan
    else:
        emd = _solve_emd(a, b, cost, num_iter_max)
    return float(np.exp(-gamma * emd)), emd


def _model_of(stats: Mapping[str, ClassStats]) -> set[str]:
    return {st.meta["model"] for st in stats.values() if st.meta.get("model")}


def similarity_matrix(
    sources: Mapping[str, ClassStats],
    targets: Mapping[str, ClassStats],
    gamma: float = DEFAULT_GAMMA,
    min_source_images: int = DEFAULT_MIN_SOURCE_IMAGES,
    *,
    num_iter_max: int = DEFAULT_NUM_ITER_MAX,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Domain similarity and EMD for every (source, target) pair.

    Parameters
    ----------
    sources, targets : mapping of str to ClassStats
        Domains by name, all in one feature space (same ``D``; if ``meta["model"]`` is set it
        must agree across all of them).
    gamma : float, default 0.01
    min_source_images : int, default DEFAULT_MIN_SOURCE_IMAGES (200)
        Applied to source domains only.
    num_iter_max : int, keyword-only
        See :func:`domain_similarity`.

    Returns
    -------
    similarity : DataFrame, shape (n_sources, n_targets)
        Index ``source`` (source names in the given order), columns ``target``.
    emd : DataFrame, same layout
        The EMDs behind the similarities.

    Examples
    --------
    >>> src = {"s": ClassStats([[0.0]], [1], ["a"])}
    >>> tgt = {"t": ClassStats([[10.0]], [1], ["b"])}
    >>> sim, emd = similarity_matrix(src, tgt, min_source_images=0)
    >>> float(emd.loc["s", "t"]), round(float(sim.loc["s", "t"]), 4)
    (10.0, 0.9048)
    """
    if not sources or not targets:
        raise ValueError("sources and targets must each name at least one domain")
    for kind, group in (("source", sources), ("target", targets)):
        for name, st in group.items():
            if not isinstance(st, ClassStats):
                raise TypeError(f"{kind} {name!r} must be a ClassStats; got {type(st).__name__}")
    dims = {name: st.dim for name, st in {**sources, **targets}.items()}
    if len(set(dims.values())) > 1:
        raise ValueError(f"feature dimensions differ between domains: {dims}")
    models = _model_of(sources) | _model_of(targets)
    if len(models) > 1:
        raise ValueError(f"class statistics come from different feature models: {sorted(models)}")

    src_names = [str(n) for n in sources]
    tgt_names = [str(n) for n in targets]
    sim = np.empty((len(src_names), len(tgt_names)))
    dist = np.empty_like(sim)
    for i, s in enumerate(sources.values()):
        for j, t in enumerate(targets.values()):
            sim[i, j], dist[i, j] = domain_similarity(
                s.means,
                s.counts,
                t.means,
                t.counts,
                gamma=gamma,
                min_source_images=min_source_images,
                num_iter_max=num_iter_max,
            )
    index = pd.Index(src_names, name="source")
    columns = pd.Index(tgt_names, name="target")
    return pd.DataFrame(sim, index=index, columns=columns), pd.DataFrame(dist, index=index, columns=columns)


# ----------------------------------------------------------------------------------------
# figure
# ----------------------------------------------------------------------------------------


def plot_similarity_heatmap(
    matrix: pd.DataFrame,
    path: str | os.PathLike[str],
    title: str = "Domain similarity exp(-0.01 EMD)",
    *,
    fmt: str = ".3f",
    cmap: str = "viridis",
    dpi: int = 150,
) -> Path:
    """Write an annotated heatmap (sources as rows, targets as columns) to a PNG.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).

    Parameters
    ----------
    matrix : DataFrame, shape (n_sources, n_targets)
        E.g. the first result of :func:`similarity_matrix`; NaN cells are left blank.
    path : path-like
        Output file (parent folders are created).
    title : str
    fmt : str
        Format spec of the value printed in each cell.
    cmap : str
    dpi : int

    Returns
    -------
    pathlib.Path
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(matrix, pd.DataFrame) or matrix.size == 0:
        raise ValueError("matrix must be a non-empty DataFrame")
    values = matrix.to_numpy(dtype=np.float64)
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * n_cols), max(3.0, 1.2 + 0.5 * n_rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(n_cols), [str(c) for c in matrix.columns], rotation=40, ha="right")
    ax.set_yticks(range(n_rows), [str(r) for r in matrix.index])
    ax.set_xlabel(str(matrix.columns.name or "target"))
    ax.set_ylabel(str(matrix.index.name or "source"))
    ax.set_title(title)
    mid = (vmin + vmax) / 2.0
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            if np.isfinite(v):
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                        color="black" if v > mid else "white")
    fig.colorbar(im, ax=ax, label="similarity")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def feature_file(features: Path | Mapping[str, Path], name: str) -> Path:
    """The class statistics of ``name``: ``features/<name>.npz`` when ``features`` is a folder,
    else ``features[name]`` (a job whose inputs lie in several replicate folders)."""
    if isinstance(features, Mapping):
        if name not in features:
            raise FileNotFoundError(f"no class statistics of {name!r} among the given files: {sorted(features)}")
        return Path(features[name])
    return Path(features) / f"{name}.npz"


def features_by_name(files: list[str]) -> dict[str, Path]:
    """``<name>.npz`` paths by name (the file's stem); two files of one name are an error."""
    out: dict[str, Path] = {}
    for f in files:
        p = Path(f)
        if p.stem in out:
            raise ValueError(f"two class-statistics files named {p.stem}: {out[p.stem]} and {p}")
        out[p.stem] = p
    return out


def write_similarity(features_dir: Path | Mapping[str, Path], spec: dict, out: Path) -> str:
    """``finetail similarity``: the source x target similarity matrix of the class statistics
    in ``features_dir/<name>.npz`` (or the files of ``features_dir``, a name -> path mapping;
    ``spec``: sources, targets, gamma, min_source_images) as
    ``out/matrix.csv``, ``out/emd.csv`` and ``out/heatmap.png``. Returns a log line."""
    sources = {s: load_class_stats(feature_file(features_dir, s)) for s in spec["sources"]}
    targets = {t: load_class_stats(feature_file(features_dir, t)) for t in spec["targets"]}
    gamma = spec.get("gamma", DEFAULT_GAMMA)
    sim, emd = similarity_matrix(sources, targets, gamma, spec.get("min_source_images", DEFAULT_MIN_SOURCE_IMAGES))
    out.mkdir(parents=True, exist_ok=True)
    sim.to_csv(out / "matrix.csv", float_format="%.6f")
    emd.to_csv(out / "emd.csv", float_format="%.6f")
    plot_similarity_heatmap(sim, out / "heatmap.png", title=f"domain similarity exp(-{gamma:g} EMD)")
    return f"similarity matrix {sim.shape[0]} sources x {sim.shape[1]} targets -> {out / 'matrix.csv'}"
