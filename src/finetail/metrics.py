"""Pure classification metrics for long-tailed evaluation."""

from __future__ import annotations

import numpy as np

from .training.recipe import FEW_SHOT, MANY_SHOT

__all__ = ["ECE_BINS", "FEW_SHOT", "MANY_SHOT", "classification_metrics", "expected_calibration_error", "shot_groups"]

ECE_BINS = 15  # Guo et al. 2017's number of equal-width confidence bins


def shot_groups(train_counts: np.ndarray, many: int = MANY_SHOT, few: int = FEW_SHOT) -> np.ndarray:
    """Label each class "many" (> many images), "few" (< few) or "medium" (the rest).

    Examples
    --------
    >>> shot_groups(np.array([500, 100, 20, 19])).tolist()
    ['many', 'medium', 'medium', 'few']
    """
    if few > many:
        raise ValueError(f"few-shot threshold {few} exceeds many-shot threshold {many}")
    n = np.asarray(train_counts)
    return np.where(n > many, "many", np.where(n < few, "few", "medium")).astype(object)


def classification_metrics(
    pred: np.ndarray, labels: np.ndarray, train_counts: np.ndarray, many: int = MANY_SHOT, few: int = FEW_SHOT
) -> dict:
    """Top-1 error, balanced accuracy, per-class and many/medium/few-shot accuracy.

    Parameters
    ----------
    pred, labels : (N,) predicted and true labels.
    train_counts : (C,) training images per class (defines C and the shot groups).

    Returns
    -------
    dict with fractions in [0, 1]: ``top1_acc``, ``top1_error``, ``balanced_acc`` (mean of
    per-class accuracies over classes present in the test set), ``many_acc``/``medium_acc``/
    ``few_acc`` (mean per-class accuracy within the group, ``None`` if the group is empty),
    ``per_class_acc`` (list, ``None`` for classes absent from the test set), group sizes.
    """
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    if pred.shape != labels.shape or pred.ndim != 1:
        raise ValueError(f"pred and labels must be equal-length vectors, got {pred.shape} and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("no test samples to evaluate")
    counts = np.asarray(train_counts)
    c = len(counts)
    correct = pred == labels
    hits = np.bincount(labels, weights=correct, minlength=c)[:c]
    seen = np.bincount(labels, minlength=c)[:c]
    present = seen > 0
    per_class = np.full(c, np.nan)
    per_class[present] = hits[present] / seen[present]
    groups = shot_groups(counts, many, few)
    out: dict = {
        "top1_acc": float(correct.mean()),
        "top1_error": float(1.0 - correct.mean()),
        "balanced_acc": float(np.nanmean(per_class)),
        "num_test": int(len(labels)),
    }
    for g in ("many", "medium", "few"):
        sel = (groups == g) & present
        out[f"{g}_acc"] = float(per_class[sel].mean()) if sel.any() else None
        out[f"{g}_classes"] = int((groups == g).sum())
    out["per_class_acc"] = [None if np.isnan(a) else float(a) for a in per_class]
    return out


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``n_bins`` equal-width confidence bins.

    ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` (Naeini et al., AAAI 2015; Guo et al., "On
    Calibration of Modern Neural Networks", ICML 2017, with 15 bins): bin ``b`` holds the
    predictions whose confidence lies in ``((b - 1) / n_bins, b / n_bins]`` (a confidence of
    exactly 0 goes to the first bin), ``acc_b`` is the fraction of them that are correct and
    ``conf_b`` their mean confidence; empty bins add nothing.

    Parameters
    ----------
    confidence : (N,) the model's probability of the class it predicts, in [0, 1].
    correct : (N,) whether that prediction is right.
    n_bins : number of bins over (0, 1].

    Returns
    -------
    float in [0, 1].

    Examples
    --------
    Two predictions at 0.85, both right (|1 - 0.85| = 0.15), two at 0.55, one right
    (|0.5 - 0.55| = 0.05): ECE = 2/4 * 0.15 + 2/4 * 0.05 = 0.1.

    >>> round(expected_calibration_error(np.array([0.85, 0.85, 0.55, 0.55]), np.array([1, 1, 1, 0])), 12)
    0.1
    """
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.shape != hit.shape or conf.ndim != 1:
        raise ValueError(f"confidence and correct must be equal-length vectors, got {conf.shape} and {hit.shape}")
    if len(conf) == 0:
        raise ValueError("no predictions to calibrate")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if not np.all((conf >= 0) & (conf <= 1)):
        raise ValueError("confidences must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left": a confidence equal to an edge belongs to the bin that edge closes.
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    n = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, weights=hit, minlength=n_bins) - np.bincount(bins, weights=conf, minlength=n_bins))
    # sum_b (n_b / N) |acc_b - conf_b| = sum_b |hits_b - sum of conf_b| / N
    return float(gap[n > 0].sum() / len(conf))
