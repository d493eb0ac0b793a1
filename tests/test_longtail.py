"""Long-tail construction: reference formula, CIFAR shapes, seeded subsets."""

import csv
from importlib import resources

import numpy as np
import pandas as pd
import pytest

from finetail.longtail import class_counts, longtail_subset
from finetail.manifest import class_table


def _reference_rows():
    with resources.files("finetail").joinpath("reference", "cifar_lt_sizes.csv").open() as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_cifar10_if100_counts_match_the_reference_list():
    assert class_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize("row", _reference_rows(), ids=lambda r: f"{r['dataset']}-if{r['imbalance']}")
def test_cifar_totals_match_reference_table(row):
    counts = class_counts(int(row["n_max"]), int(row["num_classes"]), float(row["imbalance"]))
    assert len(counts) == int(row["num_classes"])
    assert sum(counts) == int(row["total_train"])
    assert min(counts) == int(row["smallest_class"])
    assert counts == sorted(counts, reverse=True)


def test_step_profile_and_errors():
    assert class_counts(100, 4, 10, "step") == [100, 100, 10, 10]
    with pytest.raises(ValueError, match="profile"):
        class_counts(100, 4, 10, "linear")
    with pytest.raises(ValueError, match="imbalance"):
        class_counts(100, 4, 0.5)


def _balanced(num_classes=5, per_class=20):
    labels = np.repeat(np.arange(num_classes), per_class)
    train = pd.DataFrame({"store": "images.npy", "index": np.arange(len(labels)), "label": labels,
                          "class_name": [f"c{i}" for i in labels], "split": "train"})
    test = train.assign(split="test", index=train["index"] + len(labels))
    return pd.concat([train, test], ignore_index=True)


def test_subset_counts_seed_and_balanced_test():
    m = _balanced()
    sub = longtail_subset(m, imbalance=10, seed=0)
    table = class_table(sub)
    assert table["train_count"].tolist() == class_counts(20, 5, 10)
    assert table["test_count"].tolist() == [20] * 5
    # every kept row is a row of the parent, and the shuffle is seeded
    assert set(sub["index"]) <= set(m["index"])
    again = longtail_subset(m, imbalance=10, seed=0)
    assert again["index"].tolist() == sub["index"].tolist()
    other = longtail_subset(m, imbalance=10, seed=1)
    assert other["index"].tolist() != sub["index"].tolist()


def test_subset_refuses_classes_that_are_too_small():
    m = _balanced()
    with pytest.raises(ValueError, match="fewer training images"):
        longtail_subset(m, imbalance=10, n_max=50)
