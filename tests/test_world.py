"""Tests of the generated world (finetail.world): fast, small sizes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from finetail.world import (
    WORLD_DATASETS,
    WorldConfig,
    class_spec,
    dataset_classes,
    dataset_defaults,
    family_table,
    generate,
    render_class,
)

SOURCES = ("generic", "natural")
FEATURES = ("probe",)  # the feature network's data (plays JFT): neither a source nor a target
CIFAR_LIKE = ("gen10", "gen100")
TARGETS = ("cub200", "stanford_dogs", "flowers102", "stanford_cars", "fgvc_aircraft", "food101", "nabirds")
W16 = WorldConfig(seed=0, image_size=16)


def digest(ds) -> str:
    h = hashlib.sha256()
    for a in (ds.images, ds.labels, ds.split.astype(str)):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update("|".join(ds.class_names).encode())
    return h.hexdigest()


def test_dataset_names():
    assert WORLD_DATASETS == (
        "gen10", "gen100", "generic", "natural", "cub200", "stanford_dogs", "flowers102",
        "stanford_cars", "fgvc_aircraft", "food101", "nabirds", "probe",
    )
    assert set(WORLD_DATASETS) == set(CIFAR_LIKE + SOURCES + TARGETS + FEATURES)


@pytest.mark.parametrize("name", WORLD_DATASETS)
def test_shapes_dtypes_labels(name):
    ds = generate(name, W16, train_per_class=2, test_per_class=1)
    c = len(ds.class_names)
    n_train = int(ds.class_info.train_count.sum())
    n = n_train + c
    assert ds.images.shape == (n, 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (n,) and ds.labels.dtype == np.int64
    assert ds.labels.min() == 0 and ds.labels.max() == c - 1
    assert set(ds.split) == {"train", "test"}
    assert (ds.split[:n_train] == "train").all() and (ds.split[n_train:] == "test").all()
    assert len(set(ds.class_names)) == c == len(ds.class_info)
    assert ds.class_names == dataset_classes(name)
    info = ds.class_info
    assert list(info.columns[:7]) == [
        "label", "class_name", "family", "genus", "species", "train_count", "test_count"
    ]
    assert list(info.label) == list(range(c)) and list(info.class_name) == ds.class_names
    for row in info.itertuples():
        assert row.species == row.class_name and row.class_name.startswith(row.genus)
        assert row.genus.startswith(row.family)
        assert ((ds.labels == row.label) & (ds.split == "train")).sum() == row.train_count
        assert ((ds.labels == row.label) & (ds.split == "test")).sum() == row.test_count
    # images are structured, not blank: real contrast within each image
    assert ds.images.reshape(n, -1).std(axis=1).min() > 5


def test_deterministic_and_seeded():
    a = generate("cub200", W16, 2, 1)
    b = generate("cub200", W16, 2, 1)
    assert digest(a) == digest(b)
    c = generate("cub200", WorldConfig(seed=1, image_size=16), 2, 1)
    assert not np.array_equal(a.images, c.images)
    d = generate("cub200", WorldConfig(seed=0, image_size=16, noise=0.0), 2, 1)
    assert not np.array_equal(a.images, d.images)


def test_independent_of_python_hash_seed():
    code = (
        "import hashlib; from finetail.world import generate, WorldConfig;"
        "ds = generate('food101', WorldConfig(image_size=16), 1, 1);"
        "print(hashlib.sha256(ds.images.tobytes()).hexdigest())"
    )
    here = hashlib.sha256(generate("food101", W16, 1, 1).images.tobytes()).hexdigest()
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_defaults():
    assert dataset_defaults("gen10") == {"train_per_class": 500, "test_per_class": 100}
    assert dataset_defaults("gen100") == {"train_per_class": 100, "test_per_class": 20}
    for name in TARGETS:
        assert dataset_defaults(name) == {"train_per_class": 30, "test_per_class": 30}
    assert dataset_defaults("generic") == {"train_per_class": 100, "test_per_class": 20}
    # natural's train_per_class is the head; the mean over its long tail is ~98
    assert dataset_defaults("natural") == {"train_per_class": 250, "test_per_class": 20}
    assert dataset_defaults("probe") == {"train_per_class": 100, "test_per_class": 20}
    for name in SOURCES:
        assert 60 <= len(dataset_classes(name)) <= 120
    for name in TARGETS:
        assert 10 <= len(dataset_classes(name)) <= 20


@pytest.mark.parametrize("name,n_classes", [("gen10", 10), ("gen100", 100)])
def test_balanced(name, n_classes):
    ds = generate(name, W16, 3, 2)
    assert len(ds.class_names) == n_classes
    assert (ds.class_info.train_count == 3).all() and (ds.class_info.test_count == 2).all()
    fams = ds.class_info.family
    if name == "gen10":
        assert fams.nunique() == 10  # one species from each of 10 families
    else:
        assert fams.nunique() == 20 and (fams.value_counts() == 5).all()


def test_natural_long_tailed():
    ds = generate("natural", W16, train_per_class=40, test_per_class=1)
    counts = ds.class_info.train_count.to_numpy()
    # 96 classes, class of rank r gets int(40 * 0.1 ** (r / 95)) images, worked out by hand:
    # >= 20 while 0.1 ** (r / 95) >= 1/2, r <= 95 log10(2) = 28.6: 29 classes; >= 10 while
    # r <= 95 log10(4) = 57.2: 58 classes; >= 5 while r <= 95 log10(8) = 85.8: 86 classes.
    assert len(counts) == 96 and counts.max() == 40 and counts.min() == 4
    assert [(counts >= n).sum() for n in (20, 10, 5)] == [29, 58, 86]
    assert np.all(np.diff(np.sort(counts)) >= 0) and np.median(counts) == 12  # rank 47.5: 40 * 10 ** -0.5 = 12.6
    assert (ds.class_info.test_count == 1).all()
    # the head is not one family: ranks are shuffled across classes
    head = ds.class_info.nlargest(10, "train_count")
    assert head.family.nunique() > 1
    assert set(ds.class_info.realm) == {"natural"}


def test_species_disjoint_between_sources_and_targets():
    cls = {n: set(dataset_classes(n)) for n in WORLD_DATASETS}
    source_like = SOURCES + CIFAR_LIKE + FEATURES
    for s in source_like:
        for t in TARGETS:
            assert not cls[s] & cls[t], (s, t)
    for i, a in enumerate(source_like):
        for b in source_like[i + 1 :]:
            assert not cls[a] & cls[b], (a, b)
    for i, a in enumerate(TARGETS):
        for b in TARGETS[i + 1 :]:
            shared = cls[a] & cls[b]
            if {a, b} == {"cub200", "nabirds"}:
                assert len(shared) == 8  # documented overlap, as CUB and NA-Birds
            else:
                assert not shared, (a, b)


def test_targets_come_from_families_the_sources_cover():
    fam = lambda n: {c[:3] for c in dataset_classes(n)}  # noqa: E731
    generic, natural = fam("generic"), fam("natural")
    assert len(generic) == len(family_table()) == 28
    for t in TARGETS:
        assert fam(t) <= generic
    for t in ("cub200", "nabirds", "stanford_dogs", "flowers102"):
        assert fam(t) <= natural
    for t in ("stanford_cars", "fgvc_aircraft", "food101"):
        assert not fam(t) & natural
    realms = dict(zip(family_table().family, family_table().realm))
    assert {realms[f] for f in natural} == {"natural"}


def test_class_renders_the_same_everywhere():
    shared = sorted(set(dataset_classes("cub200")) & set(dataset_classes("nabirds")))[0]
    spec = class_spec(shared, 0, 1.0)
    a = generate("cub200", W16, 3, 1)
    b = generate("nabirds", W16, 3, 1)
    # a pure function of (seed, detail, class): the same after both sets drew their images, and
    # another seed or another species of the genus looks different
    assert class_spec(shared, 0, 1.0) == spec
    assert class_spec(shared, 1, 1.0) != spec
    assert class_spec(shared[:-2] + f"{(int(shared[-2:]) + 1) % 16:02d}", 0, 1.0) != spec
    ia = a.images[(a.labels == a.class_names.index(shared)) & (a.split == "train")]
    ib = b.images[(b.labels == b.class_names.index(shared)) & (b.split == "train")]
    # each data set holds its own photographs of the species ...
    assert not np.array_equal(ia, ib)
    # ... rendered from the same class appearance, whatever else is in the set
    np.testing.assert_array_equal(ia, render_class(shared, 3, W16, stream="cub200/train"))
    np.testing.assert_array_equal(ib, render_class(shared, 3, W16, stream="nabirds/train"))


def test_render_class_deterministic_and_prefix_stable():
    c = "f07.g2.s13"
    full = render_class(c, 5, W16, stream="x")
    np.testing.assert_array_equal(full, render_class(c, 5, W16, stream="x"))
    np.testing.assert_array_equal(full[:3], render_class(c, 3, W16, stream="x"))
    assert not np.array_equal(full, render_class(c, 5, W16, stream="y"))
    w32 = WorldConfig(image_size=32)  # 64 images per batch: cross a batch boundary
    np.testing.assert_array_equal(render_class(c, 70, w32, "x"), render_class(c, 130, w32, "x")[:70])
    small = generate("flowers102", W16, 2, 1)
    big = generate("flowers102", W16, 4, 1)
    for label in range(len(small.class_names)):
        s = small.images[(small.labels == label) & (small.split == "train")]
        b = big.images[(big.labels == label) & (big.split == "train")]
        np.testing.assert_array_equal(s, b[:2])
    np.testing.assert_array_equal(small.images[small.split == "test"], big.images[big.split == "test"])


def test_siblings_differ_only_in_details():
    a, b = class_spec("f00.g1.s08"), class_spec("f00.g1.s09")
    assert (a.shape, a.pattern, a.part_mirror) == (b.shape, b.pattern, b.part_mirror)
    assert a != b
    hue_gap = abs((a.body_hsv[0] - b.body_hsv[0] + 0.5) % 1.0 - 0.5)
    assert hue_gap < 0.15
    assert 0.5 < a.pattern_freq / b.pattern_freq < 2.0


@pytest.mark.parametrize("size", [16, 32, 64])
def test_image_sizes(size):
    ds = generate("gen10", WorldConfig(image_size=size), 1, 1)
    assert ds.images.shape == (20, size, size, 3)


def test_plain_world_and_zero_sizes():
    ds = generate("food101", WorldConfig(image_size=16, noise=0.0, clutter=0.0), 1, 0)
    assert len(ds.labels) == len(ds.class_names) and set(ds.split) == {"train"}
    empty = generate("food101", W16, 0, 0)
    assert empty.images.shape == (0, 16, 16, 3) and (empty.class_info.train_count == 0).all()


def test_errors():
    with pytest.raises(ValueError, match="gen10.*nabirds"):
        generate("imagenet", W16)
    with pytest.raises(ValueError, match="valid names"):
        dataset_defaults("cifar10")
    with pytest.raises(ValueError):
        generate("gen10", W16, train_per_class=-1)
    with pytest.raises(ValueError):
        class_spec("f99.g0.s00")
    with pytest.raises(ValueError):
        class_spec("bird")
    with pytest.raises(ValueError, match="noise"):
        WorldConfig(noise=-0.1)
    with pytest.raises(ValueError, match="image_size"):
        WorldConfig(image_size=4)
