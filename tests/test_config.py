"""Config validation: the schema rejects unknown keys (naming them) and fills defaults."""

import re
import subprocess
import sys

import pytest
import yaml

from finetail.config import ConfigError, load_config

from conftest import ROOT


def _write(tmp_path, cfg):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _default():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_default_config_is_valid_and_defaults_are_filled(tmp_path):
    cfg = _default()
    del cfg["shots"]
    out = load_config(_write(tmp_path, cfg))
    assert out["shots"] == {"many": 100, "few": 20}
    assert out["cbloss"]["recipe"]["nesterov"] is False  # default from the schema


@pytest.mark.parametrize(
    "path,key",
    [((), "studdy"), (("cbloss", "recipe"), "epochz"), (("world",), "imagesize"), (("cbloss", "losses", "cb_focal"), "gama")],
)
def test_misspelt_key_fails_and_is_named(tmp_path, path, key):
    cfg = _default()
    node = cfg
    for p in path:
        node = node[p]
    node[key] = 1
    with pytest.raises(ConfigError, match=key):
        load_config(_write(tmp_path, cfg))


def test_cross_checks(tmp_path):
    cfg = _default()
    cfg["cbloss"]["datasets"].append("gen1000")
    with pytest.raises(ConfigError, match="gen1000"):
        load_config(_write(tmp_path, cfg))
    cfg = _default()
    cfg["cbloss"]["losses"]["softmax"]["gamma"] = 1.0
    with pytest.raises(ConfigError, match="focal"):
        load_config(_write(tmp_path, cfg))
    cfg = _default()
    cfg["cbloss"]["losses"]["cb_focal"]["beta"] = 1.0
    with pytest.raises(ConfigError, match="beta"):
        load_config(_write(tmp_path, cfg))


@pytest.mark.slow
def test_snakemake_names_the_misspelt_key(tmp_path):
    cfg = _default()
    cfg["cbloss"]["recipe"]["epochz"] = 3
    p = _write(tmp_path, cfg)
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(p)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert r.returncode != 0
    assert "epochz" in r.stdout + r.stderr


def test_check_config_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "finetail.cli", "check-config", str(ROOT / "config.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # the whole line: "valid" alone would also match "invalid"
    datasets = len(yaml.safe_load((ROOT / "config.yaml").read_text())["datasets"])
    assert r.stdout == f"{ROOT / 'config.yaml'}: valid (study 'default', {datasets} datasets)\n"


def test_random_source_name_must_not_clash(tmp_path):
    for name in ("generic", "selected", "scratch"):
        cfg = _default()
        cfg["transfer"]["selection"]["random"] = {"name": name, "seed": 0}
        with pytest.raises(ConfigError, match="selection.random.name"):
            load_config(_write(tmp_path, cfg))
    cfg = _default()
    cfg["transfer"]["transferability"]["scores"] = ["logme", "logmee"]
    with pytest.raises(ConfigError, match="logmee"):
        load_config(_write(tmp_path, cfg))


@pytest.mark.slow
def test_paper_grid_study_plans_the_full_grid():
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "workflow/studies/cbloss_paper_grid.yaml"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # A study without a transfer half plans no path of its disabled stages (issue 26: Snakemake
    # warned about results/<study>/features//{fdataset,^$}.npz, similarity//matrix.csv, ...).
    assert "//" not in r.stdout + r.stderr, r.stderr[-2000:]
    assert "transfer" not in yaml.safe_load((ROOT / "workflow/studies/cbloss_paper_grid.yaml").read_text())
    # 5 plain losses + 4 betas x (softmax, sigmoid, 3 focal gammas) = 25 losses; x 6 IFs x 2 sets
    assert re.search(r"^cbloss\s+300$", r.stdout, flags=re.M)
    assert re.search(r"^longtail\s+12$", r.stdout, flags=re.M)


@pytest.mark.slow
def test_paper_study_plans_the_whole_dag_without_data(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(ROOT / "Snakefile"), "--directory",
         str(tmp_path), "--configfile", str(ROOT / "workflow" / "studies" / "paper.yaml")],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", r.stdout.split("Job stats:", 1)[1].split("\n\n", 1)[0], flags=re.M))
    assert counts["prepare_dataset"] == "11"  # CIFAR-10/100, ImageNet, iNat 2017, seven targets
    assert counts["cbloss"] == "300"  # the CIFAR-LT grid
    assert counts["cbloss_natural"] == "12"  # iNat/ImageNet x ResNet-50/101/152 x softmax/CB focal
    # the paper's 4 sources and the random-classes ablation (5) x 7 targets
    assert counts["pretrain"] == "5" and counts["finetune"] == "35"
    assert counts["random_subset"] == "1"
    assert counts["transferability"] == "35"  # every (source, target) pair's scores
    for target in ("cub200", "stanford_dogs", "flowers102", "stanford_cars", "fgvc_aircraft", "food101", "nabirds"):
        for source in ("selected", "random"):
            assert f"results/paper/finetune/{source}/{target}/seed0/metrics.json" in r.stdout
        for source in ("imagenet", "inat2017", "imagenet+inat2017", "selected", "random"):
            assert f"results/paper/transferability/{source}/{target}/rep0/scores.csv" in r.stdout


def test_registry_and_imagefolder_kinds_are_checked(tmp_path):
    cfg = _default()
    cfg["datasets"]["cifar11"] = {"kind": "registry"}
    with pytest.raises(ConfigError, match="cifar11"):
        load_config(_write(tmp_path, cfg))
    cfg = _default()
    cfg["datasets"]["mine"] = {"kind": "imagefolder"}
    with pytest.raises(ConfigError, match="source"):
        load_config(_write(tmp_path, cfg))


@pytest.mark.slow
def test_default_study_is_found_from_another_working_directory(tmp_path):
    """Without --configfile the checkout's config.yaml is the study, wherever --directory points."""
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-s", str(ROOT / "Snakefile"), "--directory",
         str(tmp_path)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "results/default/report/summary.md" in r.stdout


def test_schema_min_source_images_default_is_the_library_default():
    from finetail.config import SCHEMA
    from finetail.similarity import DEFAULT_MIN_SOURCE_IMAGES

    schema = yaml.safe_load(SCHEMA.read_text())
    prop = schema["properties"]["transfer"]["properties"]["similarity"]["properties"]["min_source_images"]
    assert prop["default"] == DEFAULT_MIN_SOURCE_IMAGES
