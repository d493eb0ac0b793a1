import numpy as np
import pytest

from finetail.metrics import classification_metrics, shot_groups


def test_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 1, 1, 1, 0, 2, 2, 2])
    m = classification_metrics(pred, labels, train_counts=np.array([500, 50, 5]))
    assert m["top1_acc"] == pytest.approx(6 / 8)
    assert m["top1_error"] == pytest.approx(2 / 8)
    assert m["per_class_acc"] == pytest.approx([0.5, 1.0, 0.75])
    assert m["balanced_acc"] == pytest.approx((0.5 + 1.0 + 0.75) / 3)
    assert (m["many_acc"], m["medium_acc"], m["few_acc"]) == pytest.approx((0.5, 1.0, 0.75))


def test_shot_groups_thresholds_and_empty_groups():
    assert shot_groups(np.array([101, 100, 20, 19]), many=100, few=20).tolist() == ["many", "medium", "medium", "few"]
    m = classification_metrics(np.array([0, 1]), np.array([0, 1]), np.array([50, 40]))
    assert m["many_acc"] is None and m["few_acc"] is None and m["medium_acc"] == 1.0
    with pytest.raises(ValueError):
        shot_groups(np.array([1]), many=10, few=20)
