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


def test_expected_calibration_error_by_hand_15_bins():
    from finetail.metrics import ECE_BINS, expected_calibration_error

    assert ECE_BINS == 15
    conf = np.array([0.95, 0.95, 0.95, 0.95, 0.70, 0.68, 0.30, 0.30])
    hit = np.array([1, 1, 1, 0, 1, 0, 1, 0])
    # 15 bins of width 1/15 = 0.0667: 0.95 falls in (14/15, 1], 0.70 and 0.68 in
    # (10/15, 11/15] = (0.667, 0.733], 0.30 in (4/15, 5/15] = (0.267, 0.333].
    #   (14/15, 1]: n 4, accuracy 3/4 = 0.75, mean confidence 0.95 -> 4/8 * |0.75 - 0.95| = 0.1
    #   (10/15, 11/15]: n 2, accuracy 1/2, mean confidence (0.70 + 0.68)/2 = 0.69
    #                                                    -> 2/8 * |0.5 - 0.69| = 0.0475
    #   (4/15, 5/15]: n 2, accuracy 1/2, mean confidence 0.30 -> 2/8 * |0.5 - 0.3| = 0.05
    # ECE = 0.1 + 0.0475 + 0.05 = 0.1975. One bin for all would give
    # |5/8 - 5.78/8| = 0.0975: the bins matter.
    assert expected_calibration_error(conf, hit) == pytest.approx(0.1975, abs=1e-12)
    assert expected_calibration_error(conf, hit, n_bins=1) == pytest.approx(0.0975, abs=1e-12)


def test_expected_calibration_error_bin_edges_and_limits():
    from finetail.metrics import expected_calibration_error

    # 4 bins (0, 1/4], (1/4, 1/2], (1/2, 3/4], (3/4, 1]: 0.5 closes the second bin, so it is
    # binned with 0.4: (2/3) * |1/2 - 0.45| + (1/3) * |1 - 0.6| = 0.1/3 + 0.4/3 = 1/6.
    # (Binned with 0.6 instead it would be 0.4/3 + (2/3) * 0.45 = 0.4333.)
    assert expected_calibration_error(np.array([0.5, 0.4, 0.6]), np.array([1, 0, 1]), n_bins=4) == pytest.approx(1 / 6)
    # a confidence of 0 goes to the first bin, 1 to the last
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0
    # calibrated within each bin: 0
    assert expected_calibration_error(np.array([0.75] * 4), np.array([1, 1, 1, 0])) == 0.0
    # always confident, always wrong: 1
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([False, False])) == 1.0
    for conf, hit in (([1.5], [1]), ([-0.1], [0]), ([], []), ([0.5, 0.5], [1])):
        with pytest.raises(ValueError):
            expected_calibration_error(np.array(conf), np.array(hit))
