"""Pure classification metrics for long-tailed evaluation."""

from __future__ import annotations

import numpy as np

from .training.recipe import FEW_SHOT, MANY_SHOT

__all__ = ["FEW_SHOT", "MANY_SHOT", "classification_metrics", "shot_groups"]


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
