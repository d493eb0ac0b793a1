"""Similarity from an independent network (issue 12, section 3): the world's feature network
trains on classes that no source, target or CIFAR-like set holds, is the default feature
model, is trained once and never ranked or fine-tuned; features read file manifests with the
paper's preprocessing; the report names the network and what it has seen."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from finetail.config import ConfigError, load_config
from finetail.features import Preprocess, class_mean_features, file_class_mean_features, load_feature_model
from finetail.loader import eval_transform, load_file_split
from finetail.report import similarity_network_label
from finetail.similarity import load_class_stats
from finetail.world import WORLD_DATASETS, dataset_classes, dataset_defaults, family_table

from conftest import ROOT, write_toy_file_manifest

SOURCES = ("generic", "natural")
TARGETS = ("cub200", "stanford_dogs", "flowers102", "stanford_cars", "fgvc_aircraft", "food101", "nabirds")


def _default():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def _load(tmp_path, cfg):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return load_config(p)


# --------------------------------------------------------------------------- the probe data set
def test_probe_classes_are_disjoint_from_every_source_target_and_cifar_like_set():
    probe = set(dataset_classes("probe"))
    for other in WORLD_DATASETS:
        if other != "probe":
            assert not probe & set(dataset_classes(other)), other
    assert {c.split(".s")[1] for c in probe} == {"04", "05"}  # its own species slots


def test_probe_is_broad_and_balanced():
    classes = dataset_classes("probe")
    assert 100 <= len(classes) <= 200
    assert {c[:3] for c in classes} == set(family_table().family)  # every family, as a generic data set
    assert len({c[:6] for c in classes}) == 28 * 4  # every genus
    assert dataset_defaults("probe") == dataset_defaults("generic")  # 100 / 20 per class, balanced


def _world_studies():
    """config.yaml and every study file with a transfer half on world data sets alone."""
    found = ["config.yaml"]
    for p in sorted((ROOT / "workflow" / "studies").glob("*.yaml")):
        cfg = yaml.safe_load(p.read_text())
        if (cfg.get("transfer") or {}).get("sources") and all(d.get("kind") == "world" for d in cfg["datasets"].values()):
            found.append(str(p.relative_to(ROOT)))
    return found


WORLD_STUDIES = _world_studies()


def test_the_world_studies_are_found():
    assert "config.yaml" in WORLD_STUDIES and "workflow/studies/world_full.yaml" in WORLD_STUDIES


@pytest.mark.parametrize("study", WORLD_STUDIES)
def test_world_feature_model_is_a_feature_network_not_a_ranked_source(tmp_path, study):
    cfg = _load(tmp_path, yaml.safe_load((ROOT / study).read_text()))
    tr = cfg["transfer"]
    model = tr["features"]["model"]
    ranked = set(tr["sources"]) | {tr["selection"]["name"]} | {(tr["selection"].get("random") or {}).get("name")}
    assert model in tr["features"]["networks"] and model not in ranked
    trained_on = tr["features"]["networks"][model]
    assert all(cfg["datasets"][d]["kind"] == "world" for d in trained_on)
    seen = {c for d in [p for parts in tr["sources"].values() for p in parts] + tr["targets"] for c in dataset_classes(d)}
    assert not seen & {c for d in trained_on for c in dataset_classes(d)}


# --------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda f, tr: f.update(model="jft"), r"transfer.features.model 'jft' is not a feature network .*probe"),
        (lambda f, tr: f["networks"].update(probe=["probe", "imagenet"]), r"trains on 'imagenet', which is not declared"),
        (lambda f, tr: f["networks"].update(probe=["probe", "generic"]), r"trains on 'generic', but source 'generic' pools it"),
        (lambda f, tr: f["networks"].update(probe=["cub200"]), r"trains on 'cub200', but it is a target"),
        (lambda f, tr: f["networks"].update({"generic": ["probe"]}), r"networks.generic: the name clashes with a source"),
        (lambda f, tr: f["networks"].update({"selected": ["probe"]}), r"networks.selected: the name clashes"),
        (lambda f, tr: f.update(recipe={"epochz": 1}), r"transfer.features.recipe"),
        (lambda f, tr: f.update(crop="squash"), r"transfer.features.crop"),
        (lambda f, tr: f.update(crop_fraction=1.5), r"transfer.features.crop_fraction"),
    ],
)
def test_feature_network_config_errors_are_clear(tmp_path, edit, message):
    cfg = _default()
    edit(cfg["transfer"]["features"], cfg["transfer"])
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, cfg)


def test_a_network_sharing_world_classes_with_a_target_is_refused(tmp_path):
    """nabirds, taken out of the targets here, shares 8 of its species with cub200."""
    cfg = _default()
    cfg["transfer"]["targets"] = [t for t in cfg["transfer"]["targets"] if t != "nabirds"]
    assert "cub200" in cfg["transfer"]["targets"]
    cfg["transfer"]["features"]["networks"]["probe"] = ["probe", "nabirds"]
    with pytest.raises(ConfigError, match=r"'nabirds' shares 8 classes \(f00.g0.s08.*with 'cub200' \(it is a target\)"):
        _load(tmp_path, cfg)


# --------------------------------------------------------------------------- the DAG
def _jobs(out: str) -> list[tuple[str, str]]:
    """(rule, job text) of every job a dry run lists."""
    return [(m.group(1), m.group(0)) for m in re.finditer(r"^rule (\w+):\n(?:    .*\n)+", out, flags=re.M)]


@pytest.mark.slow
def test_default_dag_trains_the_feature_network_once_and_never_ranks_or_finetunes_it(tmp_path):
    from helpers import planned, snakemake

    cfg = _default()
    r = snakemake(tmp_path, cfg, "-n", "-p")
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = _jobs(r.stdout)
    def pretrained(rule_name):
        return sorted(re.search(r"output: results/default/pretrain/([^/\s]+)/seed(\d+)/", t).groups()
                      for rule, t in jobs if rule == rule_name)

    seeds = [str(s) for s in range(cfg["replicates"]["count"])]
    ranked = [*cfg["transfer"]["sources"], cfg["transfer"]["selection"]["name"],
              cfg["transfer"]["selection"]["random"]["name"]]
    assert pretrained("pretrain") == sorted((s, k) for s in ranked for k in seeds)
    # the feature network: once per replicate (each reseeds it and its world), by its own rule
    # (ahead of the sources: it heads the critical path)
    assert pretrained("feature_network") == [("probe", k) for k in seeds]
    assert planned(r)["pretrain"] == len(ranked) * len(seeds) and planned(r)["feature_network"] == len(seeds)
    pool = sorted(t for rule, t in jobs if rule == "pool_source" and "sources/probe/" in t)
    assert len(pool) == len(seeds)
    assert all(f"results/default/datasets/probe/rep{k}/manifest.parquet" in t for k, t in zip(seeds, pool, strict=True))
    for rule, text in jobs:
        if rule == "finetune":
            assert "probe" not in text
        if rule == "features":  # replicate k's features from replicate k's feature network
            k = re.search(r"features/probe/rep(\d+)/", text).group(1)
            assert f"results/default/pretrain/probe/seed{k}/model.pt" in text
        if rule in ("similarity", "selection", "random_subset"):
            assert "features/probe/" in text and "features/generic+natural/" not in text
    words = shlex.split(re.search(r"finetail similarity .*", r.stdout).group(0))
    spec = json.loads(words[words.index("--spec") + 1])
    assert spec["sources"] == ranked  # the matrix's rows
    finetuned = set(re.findall(r"results/default/finetune/([^/\s]+)/[^/\s]+/seed\d+/metrics\.json", r.stdout))
    assert "probe" not in finetuned and "generic" in finetuned


# --------------------------------------------------------------------------- features on files
def test_features_of_a_file_manifest_equal_the_array_path_at_the_same_crop(tmp_path):
    """PNG files (lossless) and the same pixels in memory give the same class means through
    one preprocessing; the class means have the network's width."""
    manifest, images, labels = write_toy_file_manifest(tmp_path / "files", 5, 2)
    torch.manual_seed(0)
    fm = load_feature_model("tv:resnet18")  # random weights: no download here
    split = load_file_split(manifest, "train")
    for pre in (Preprocess(32, 0.875, "central"), Preprocess(24, 0.5, "short_side")):
        files, counts = file_class_mean_features(fm, split.images, split.labels, 3, batch=4, preprocess=pre, workers=0)
        order = np.argsort(split.labels, kind="stable")  # the manifest lists classes in turn
        arrays, counts2 = class_mean_features(fm, images[order], labels[order], 3, batch=4, preprocess=pre)
        assert files.shape == (3, 512) and counts.tolist() == counts2.tolist() == [5, 5, 5]
        np.testing.assert_allclose(files, arrays, rtol=1e-4, atol=1e-5)


def test_central_crop_is_the_reference_crop():
    """crop central keeps the central fraction of each side (tf.image.central_crop's bounds)
    and resizes it to a square; short_side resizes the short side to size / fraction."""
    img = torch.arange(3 * 40 * 48, dtype=torch.int32).reshape(3, 40, 48).to(torch.uint8)
    # 0.875 of 40 x 48: start int((40 - 35) / 2) = 2 rows, int((48 - 42) / 2) = 3 columns -> 36 x 42
    from torchvision.transforms.v2 import functional as TF

    want = TF.resize(img[:, 2:38, 3:45], [16, 16], antialias=True)
    assert torch.equal(eval_transform(img, 16, 0.875, "central"), want)
    sq = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    assert torch.equal(eval_transform(sq, 4, 0.5, "central"), sq[:, 2:6, 2:6])
    assert eval_transform(img, 299, 0.875, "central").shape == (3, 299, 299)
    # the brief's arithmetic for the paper's size: short side round(299 / 0.875) = 342, then 299
    assert round(299 / 0.875) == 342
    assert eval_transform(img, 299, 0.875, "short_side").shape == (3, 299, 299)
    with pytest.raises(ValueError, match="crop must be one of"):
        eval_transform(img, 16, 0.875, "squash")


@pytest.mark.slow
def test_features_cli_reads_a_file_manifest_and_records_the_preprocessing(tmp_path):
    manifest, _, _ = write_toy_file_manifest(tmp_path / "files", 4, 2, height=30, width=50)
    out = tmp_path / "f.npz"
    r = subprocess.run([sys.executable, "-m", "finetail.cli", "features", "--model", "tv:resnet18", "--model-name",
                        "tv:resnet18", "--manifest", str(manifest), "--image-size", "32", "--crop", "central",
                        "--crop-fraction", "0.875", "--workers", "0", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "files, 32 px, central crop 0.875" in r.stderr + r.stdout
    stats = load_class_stats(out)
    assert stats.means.shape == (3, 512) and stats.counts.tolist() == [4, 4, 4]
    assert stats.class_names == ["c0", "c1", "c2"]
    assert (stats.meta["input_size"], stats.meta["crop"], stats.meta["crop_fraction"]) == ("32", "central", "0.875")


# --------------------------------------------------------------------------- report labels
def test_similarity_table_names_its_network_and_what_it_has_seen(tmp_path):
    cfg = _load(tmp_path, _default())
    assert similarity_network_label(cfg["transfer"], cfg["datasets"]) == (
        "feature network `probe`: trained on world classes disjoint from every source and target")
    paper = load_config(ROOT / "workflow" / "studies" / "paper.yaml")
    label = similarity_network_label(paper["transfer"], paper["datasets"])
    assert "`tv:resnet101`" in label and "299 px, central crop 0.875" in label
    assert "has seen one of the ranked sources (`imagenet`, `imagenet+inat2017`, `selected`)" in label
    cfg["transfer"]["features"]["model"] = "generic"
    assert "a ranked source" in similarity_network_label(cfg["transfer"], cfg["datasets"])


def test_paper_study_uses_imagenet_resnet101_at_299_with_the_reference_crop():
    paper = load_config(ROOT / "workflow" / "studies" / "paper.yaml")
    f = paper["transfer"]["features"]
    assert (f["model"], f["weights"], f["image_size"], f["crop"], f["crop_fraction"]) == (
        "tv:resnet101", "IMAGENET1K_V2", 299, "central", 0.875)
    for stage in ("pretrain", "finetune"):  # Inception-v3 recipes at 299 px
        assert paper["transfer"][stage]["recipe"]["image_size"] == 299


# The feature network's real run (per replicate): tests/test_replicates.py
