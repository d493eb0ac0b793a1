"""Greedy source-class selection by domain similarity (Cui et al., CVPR 2018, §4).

Each source class is scored against each target domain as a point mass at its class mean:

.. math:: \\mathrm{sim}(s, T) = \\exp\\big(-\\gamma \\sum_j w_j \\lVert s - t_j \\rVert_2\\big),
          \\quad w_j = n_j / \\sum_k n_k,

which is the domain similarity of :mod:`finetail.similarity` for a one-class source (no
solver needed). Per target the top ``k`` classes (or all with similarity at least a
threshold) are kept, and the selection is the union over targets. The paper's 585-class
subset of ImageNet + iNaturalist was made this way.

Is the greedy choice worth it? :func:`random_subset` draws the ablation's source: as many
classes as the selection, uniformly at random (seeded) from the same eligible pool classes,
with as many training images in all (a class's share proportional to its size), so that the
two sources differ only in *which* classes they hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from finetail.similarity import (
    DEFAULT_GAMMA,
    DEFAULT_MIN_SOURCE_IMAGES,
    ClassStats,
    check_gamma,
    check_min_images,
    class_to_domain_emd,
    load_class_stats,
    feature_file,
)

__all__ = [
    "RANDOM_COLUMNS",
    "SELECTION_COLUMNS",
    "concat_class_stats",
    "greedy_select",
    "random_subset",
    "write_random_subset",
    "write_selection",
]

SELECTION_COLUMNS = ("class_name", "score", "best_target", "targets", "count")
"""Columns of :func:`greedy_select`'s result, in order."""

_TARGET_SEP = ";"


def concat_class_stats(*stats: ClassStats) -> ClassStats:
    """Stack the classes of several domains into one source pool.

    Parameters
    ----------
    *stats : ClassStats
        At least one; all with the same feature dimension. Class names must be unique across
        all of them (prefix them, e.g. ``"inat/Aves/123"``, if two domains share ids).

    Returns
    -------
    ClassStats
        Rows in argument order. ``meta`` keeps the entries on which all inputs agree.

    Raises
    ------
    ValueError
        No input, differing feature dimensions, duplicated class names, or conflicting
        ``meta["model"]`` (features from different networks are not comparable).

    Examples
    --------
    >>> a = ClassStats([[0.0]], [3], ["a0"])
    >>> b = ClassStats([[1.0], [2.0]], [4, 5], ["b0", "b1"])
    >>> concat_class_stats(a, b).class_names
    ['a0', 'b0', 'b1']
    """
    if not stats:
        raise ValueError("concat_class_stats needs at least one ClassStats")
    for i, st in enumerate(stats):
        if not isinstance(st, ClassStats):
            raise TypeError(f"argument {i} must be a ClassStats; got {type(st).__name__}")
    dims = [st.dim for st in stats]
    if len(set(dims)) > 1:
        raise ValueError(f"feature dimensions differ: {dims}")
    models = {st.meta["model"] for st in stats if st.meta.get("model")}
    if len(models) > 1:
        raise ValueError(f"class statistics come from different feature models: {sorted(models)}")
    names = [n for st in stats for n in st.class_names]
    index = pd.Index(names)
    if index.has_duplicates:
        dup = sorted(set(index[index.duplicated()]))
        raise ValueError(f"class names must be unique across sources; {len(dup)} duplicated, e.g. {dup[:5]}")
    meta = dict(stats[0].meta)
    for st in stats[1:]:
        meta = {k: v for k, v in meta.items() if st.meta.get(k) == v}
    return ClassStats(
        means=np.concatenate([st.means for st in stats], axis=0),
        counts=np.concatenate([st.counts for st in stats], axis=0),
        class_names=names,
        meta=meta,
    )


def greedy_select(
    source: ClassStats,
    targets: Mapping[str, ClassStats],
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    gamma: float = DEFAULT_GAMMA,
    min_source_images: int = DEFAULT_MIN_SOURCE_IMAGES,
) -> pd.DataFrame:
    """Select the source classes most similar to any of the target domains.

    For each target ``T``, every eligible source class ``s`` (``count >= min_source_images``)
    gets ``sim(s, T) = exp(-gamma * point_mass_emd(s, T))``; the target keeps its ``top_k``
    classes (ranked by similarity, ties broken by class name) or those with
    ``sim >= threshold``. The result is the union over targets.

    Parameters
    ----------
    source : ClassStats
        The source pool (see :func:`concat_class_stats` for several source domains).
    targets : mapping of str to ClassStats
        Target domains by name (names must not contain ``";"``).
    top_k : int, optional
        Classes kept per target (all eligible ones if fewer). Exactly one of ``top_k`` and
        ``threshold`` must be given.
    threshold : float, optional
        Minimum similarity, in [0, 1].
    gamma : float, default 0.01
    min_source_images : int, default DEFAULT_MIN_SOURCE_IMAGES (200)
        0 keeps every source class.

    Returns
    -------
    DataFrame
        One row per selected class with columns ``class_name``, ``score`` (the highest
        similarity among the targets that selected it), ``best_target`` (that target),
        ``targets`` (``";"``-joined names of the targets that selected it, in the order of
        ``targets``) and ``count`` (images of the class); sorted by ``score`` descending then
        ``class_name``; a fresh 0..n-1 index. Empty (same columns) if nothing passes the
        threshold.

        With ``threshold`` the selecting targets include the most similar one, so ``score``
        is the maximum over all targets; with ``top_k`` a class may be more similar to a
        target whose top k it did not make, and that target is not counted.

    Raises
    ------
    ValueError
        Not exactly one of ``top_k`` / ``threshold``, bad values, no targets, differing
        feature dimensions, or no eligible source class.

    Examples
    --------
    >>> src = ClassStats([[0.0], [4.0], [9.0]], [10, 10, 10], ["a", "b", "c"])
    >>> tgt = {"t": ClassStats([[1.0]], [5], ["x"])}
    >>> greedy_select(src, tgt, top_k=2, min_source_images=0)["class_name"].tolist()
    ['a', 'b']
    """
    top_k, threshold = _check_rule(top_k, threshold)
    gamma = check_gamma(gamma)
    min_source_images = check_min_images(min_source_images)
    _check_domains(source, targets)

    eligible = _eligible(source, min_source_images)
    names = np.asarray(source.class_names, dtype=object)[eligible]
    counts = source.counts[eligible]
    means = source.means[eligible]
    # Rank order is fixed by (similarity desc, class name asc); sort names once.
    name_rank = np.argsort(np.argsort(names.astype(str), kind="stable"), kind="stable")

    best_score = np.full(eligible.size, -np.inf)
    best_target = np.empty(eligible.size, dtype=object)
    chosen_by: list[list[str]] = [[] for _ in range(eligible.size)]
    for tname, tst in targets.items():
        sim = np.exp(-gamma * class_to_domain_emd(means, tst.means, tst.counts))
        if top_k is not None:
            order = np.lexsort((name_rank, -sim))
            picked = order[:top_k]
        else:
            picked = np.flatnonzero(sim >= threshold)
        for i in picked:
            chosen_by[i].append(str(tname))
            if sim[i] > best_score[i]:
                best_score[i], best_target[i] = sim[i], str(tname)
    return _selection_frame(names, counts, best_score, best_target, chosen_by)


def _check_rule(top_k, threshold) -> tuple[int | None, float | None]:
    """Exactly one of ``top_k`` (a positive int) and ``threshold`` (a similarity in [0, 1])."""
    if (top_k is None) == (threshold is None):
        raise ValueError("give exactly one of top_k and threshold")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer; got {top_k!r}")
        top_k = int(top_k)
    if threshold is not None:
        threshold = float(threshold)
        if not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a similarity in [0, 1]; got {threshold!r}")
    return top_k, threshold


def _check_domains(source: ClassStats, targets: Mapping[str, ClassStats]) -> None:
    """ClassStats on both sides, at least one target, names free of the separator, one ``D``."""
    if not isinstance(source, ClassStats):
        raise TypeError(f"source must be a ClassStats; got {type(source).__name__}")
    if not targets:
        raise ValueError("targets must name at least one target domain")
    for name, st in targets.items():
        if not isinstance(st, ClassStats):
            raise TypeError(f"target {name!r} must be a ClassStats; got {type(st).__name__}")
        if _TARGET_SEP in str(name):
            raise ValueError(f"target name {name!r} must not contain {_TARGET_SEP!r}")
        if st.dim != source.dim:
            raise ValueError(f"feature dimensions differ: source {source.dim} vs target {name!r} {st.dim}")


def _eligible(source: ClassStats, min_source_images: int) -> np.ndarray:
    """Indices of the source classes with at least ``min_source_images`` images; none is an error."""
    eligible = np.flatnonzero(source.counts >= min_source_images)
    if eligible.size == 0:
        raise ValueError(
            f"no eligible source class: all {source.num_classes} have fewer than "
            f"min_source_images={min_source_images} images"
        )
    return eligible


def _selection_frame(names, counts, best_score, best_target, chosen_by) -> pd.DataFrame:
    """The selected classes (those some target chose) as :data:`SELECTION_COLUMNS`, sorted by
    score descending then class name, with a fresh index."""
    sel = np.array([i for i in range(len(names)) if chosen_by[i]], dtype=np.int64)
    result = pd.DataFrame(
        {
            "class_name": pd.Series(names[sel], dtype=object),
            "score": pd.Series(best_score[sel], dtype=np.float64),
            "best_target": pd.Series(best_target[sel], dtype=object),
            "targets": pd.Series([_TARGET_SEP.join(chosen_by[i]) for i in sel], dtype=object),
            "count": pd.Series(counts[sel], dtype=np.int64),
        },
        columns=list(SELECTION_COLUMNS),
    )
    return result.sort_values(["score", "class_name"], ascending=[False, True], kind="stable").reset_index(drop=True)


def write_selection(features_dir: Path | Mapping[str, Path], spec: dict, out: Path) -> str:
    """``finetail select``: the greedy selection of the pool's source classes most similar to
    the targets (``spec``: pool, targets, top_k or threshold, gamma, min_source_images) as a
    CSV of :data:`SELECTION_COLUMNS`. Returns a log line."""
    pool = concat_class_stats(*(load_class_stats(feature_file(features_dir, p)) for p in spec["pool"]))
    targets = {t: load_class_stats(feature_file(features_dir, t)) for t in spec["targets"]}
    chosen = greedy_select(
        pool, targets, top_k=spec.get("top_k"), threshold=spec.get("threshold"),
        gamma=spec.get("gamma", DEFAULT_GAMMA), min_source_images=spec.get("min_source_images", DEFAULT_MIN_SOURCE_IMAGES),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen.to_csv(out, index=False, float_format="%.6f")
    return f"selected {len(chosen)} of {len(pool.class_names)} source classes -> {out}"


RANDOM_DRAWS = 1000
"""Draws :func:`random_subset` tries for classes that hold the selection's image count."""

RANDOM_COLUMNS = ("class_name", "count", "images")
"""Columns of :func:`random_subset`'s result: the class, its training images in the pool, and
how many of them the random source keeps (``finetail pool`` draws them, seeded)."""


def _quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """Images to keep per class: ``total`` split in proportion to ``counts`` (largest
    remainder), at least one per class and at most its count. ``total`` must lie in
    ``[len(counts), counts.sum()]``."""
    share = total * counts / counts.sum()
    keep = np.clip(np.floor(share).astype(np.int64), 1, counts)
    rest = total - int(keep.sum())
    order = np.lexsort((np.arange(len(counts)), -(share - np.floor(share))))  # largest remainder first
    while rest != 0:
        for i in order if rest > 0 else order[::-1]:
            if rest > 0 and keep[i] < counts[i]:
                keep[i] += 1
                rest -= 1
            elif rest < 0 and keep[i] > 1:
                keep[i] -= 1
                rest += 1
            if rest == 0:
                break
    return keep


def random_subset(pool: ClassStats, selected: pd.DataFrame, seed: int, min_source_images: int = DEFAULT_MIN_SOURCE_IMAGES) -> pd.DataFrame:
    """The greedy selection's random counterpart: as many classes, drawn uniformly without
    replacement (``numpy.random.default_rng(seed)``) from the pool's classes with at least
    ``min_source_images`` images (the classes greedy selection could choose), and the
    selection's number of training images split over them in proportion to their sizes.

    Same compute needs as many images: a draw whose classes hold fewer images in all than the
    selection is redrawn (the first of up to :data:`RANDOM_DRAWS` draws that holds enough is
    kept), so the draw is uniform among the class sets large enough to match. In a long-tailed
    pool this favours its larger classes a little, as the selection's own size does.

    Parameters
    ----------
    pool : ClassStats of the pool (its ``counts`` are training images per class).
    selected : the greedy selection (:data:`SELECTION_COLUMNS`; ``count`` per class).
    seed : the draw's seed.

    Returns
    -------
    DataFrame of :data:`RANDOM_COLUMNS`, sorted by class name. ``images`` sums to the
    selection's image count, unless no draw held that many (then the largest draw, every
    image kept: ``images == count``, and the caller reports the shortfall).

    Examples
    --------
    >>> pool = ClassStats(np.zeros((4, 1)), [10, 20, 30, 40], ["a", "b", "c", "d"])
    >>> sel = pd.DataFrame({"class_name": ["a", "d"], "count": [10, 40]})
    >>> r = random_subset(pool, sel, seed=0, min_source_images=0)
    >>> len(r), int(r["images"].sum())
    (2, 50)
    """
    min_source_images = check_min_images(min_source_images)
    eligible = _eligible(pool, min_source_images)
    k, want = len(selected), int(selected["count"].sum())
    if k == 0:
        raise ValueError("the selection is empty: nothing to match at random")
    if k > eligible.size:
        raise ValueError(f"cannot draw {k} random classes: the pool has {eligible.size} with at least "
                         f"min_source_images={min_source_images} images")
    names = np.asarray(pool.class_names, dtype=object)[eligible]
    counts = pool.counts[eligible].astype(np.int64)
    order = np.argsort(names.astype(str), kind="stable")  # the draw does not depend on the pool's row order
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(RANDOM_DRAWS):  # the first draw whose classes hold enough images (else the largest)
        drawn = np.sort(rng.choice(order, size=k, replace=False))
        if best is None or counts[drawn].sum() > counts[best].sum():
            best = drawn
        if counts[drawn].sum() >= want:
            best = drawn
            break
    drawn = best
    c = counts[drawn]
    images = _quotas(c, want) if c.sum() >= want else c.copy()
    out = pd.DataFrame({"class_name": names[drawn], "count": c, "images": images}, columns=list(RANDOM_COLUMNS))
    return out.sort_values("class_name", kind="stable").reset_index(drop=True)


def write_random_subset(features_dir: Path | Mapping[str, Path], spec: dict, selection: Path, out: Path) -> str:
    """``finetail random-subset``: :func:`random_subset` of the pool's classes (``spec``: pool,
    seed, min_source_images) matched to the selection CSV ``selection``. Returns a log line."""
    pool = concat_class_stats(*(load_class_stats(feature_file(features_dir, p)) for p in spec["pool"]))
    chosen = pd.read_csv(selection)
    drawn = random_subset(pool, chosen, int(spec.get("seed", 0)), spec.get("min_source_images", DEFAULT_MIN_SOURCE_IMAGES))
    out.parent.mkdir(parents=True, exist_ok=True)
    drawn.to_csv(out, index=False)
    want, got = int(chosen["count"].sum()), int(drawn["images"].sum())
    short = "" if got == want else f" (SHORT of the selection's {want}: the drawn classes hold only {got})"
    return (f"drew {len(drawn)} of {len(pool.class_names)} pool classes at random (seed {spec.get('seed', 0)}), "
            f"{got} training images{short} -> {out}")
