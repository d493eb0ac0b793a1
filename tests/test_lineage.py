"""Lineage and audit on a real (reduced) study run through Snakemake, and on a registry stamp."""

import copy
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from finetail.provenance import audit, audit_exit_code, format_audit, format_lineage, lineage
from finetail.fileio import file_sha256

from helpers import TINY, snakemake

# The workflow test's study, trimmed to what lineage needs (about 50 s on 2 cores): one
# CB-loss imbalance, two sources (one pooled from two world datasets), one target, no
# selection, no scratch baseline, no cbloss_natural.
SMALL = copy.deepcopy(TINY)
SMALL.pop("cbloss_natural", None)
SMALL["datasets"].pop("stanford_cars", None)
SMALL["cbloss"]["imbalance"] = [10]
SMALL["transfer"]["sources"] = {"generic": ["generic"], "generic+natural": ["generic", "natural"]}
SMALL["transfer"].pop("selection", None)
SMALL["transfer"]["targets"] = ["cub200"]
SMALL["transfer"]["finetune"]["scratch"] = False
SMALL["replicates"] = {"count": 1}  # one replicate: its stages under rep0/, its training runs seed0/


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("lineage_study")
    r = snakemake(work, SMALL)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work


@pytest.fixture
def study_copy(study, tmp_path):
    """A copy of the whole study in another place (the tracking store comes along): tamper
    with it without touching the module's study; recorded paths must re-root under it."""
    dst = tmp_path / "moved"
    shutil.copytree(study, dst)
    return dst / "results" / "tiny"


def _datasets(node):
    return {d["name"]: d for inp in node["inputs"] for d in inp.get("sources", [])}


@pytest.mark.slow
def test_finetune_lineage_reaches_pretrain_pooled_source_and_world_seed(study):
    res = study / "results" / "tiny"
    mpath = res / "finetune" / "generic+natural" / "cub200" / "seed0" / "metrics.json"
    record = json.loads(mpath.read_text())
    chain = lineage(mpath)

    assert chain["run_id"] == record["run_id"] and chain["rule"] == "finetune"
    assert chain["wildcards"] == {"source": "generic+natural", "target": "cub200", "seed": "0"}
    assert chain["status"] == "FINISHED"
    assert chain["config_digest"] == record["config_digest"] and chain["git_commit"] == record["git_commit"]
    assert chain["final"]["top1_error"] == record["final"]["top1_error"]
    inputs = {i["role"]: i for i in chain["inputs"]}
    assert inputs["manifest"]["status"] == "ok" and inputs["init_model"]["status"] == "ok"
    assert inputs["init_model"]["sha256"] == file_sha256(res / "pretrain" / "generic+natural" / "seed0" / "model.pt")
    assert set(_datasets(chain)) == {"cub200"}
    assert chain["warnings"] == []

    [parent] = chain["parents"]
    pre = json.loads((res / "pretrain" / "generic+natural" / "seed0" / "metrics.json").read_text())
    assert parent["run_id"] == pre["run_id"] == record["parent_run_id"]
    assert parent["rule"] == "pretrain" and parent["status"] == "FINISHED" and parent["parents"] == []
    assert parent["model"]["status"] == "ok"
    by_role = {i["role"]: i for i in parent["inputs"]}
    pooled = by_role.pop("manifest")
    assert pooled["kind"] == "sources" and pooled["status"] == "ok"
    # the pooled manifest points into two array stores: both recorded with their sha256
    assert {i["resolved"] for i in by_role.values()} == {str(res / "datasets" / d / "rep0" / "images.npy")
                                                          for d in ("generic", "natural")}
    assert all(i["status"] == "ok" for i in by_role.values())
    assert pooled["resolved"] == str(res / "sources" / "generic+natural" / "rep0" / "manifest.parquet")
    world = _datasets(parent)
    assert set(world) == {"generic", "natural"}
    for name, ds in world.items():
        assert ds["origin"] == "finetail.world" and ds["seed"] == SMALL["world"]["seed"] == 0
        assert ds["world"]["image_size"] == 16 and ds["sizes"]["train_per_class"] == 12
        assert ds["folder"] == str(res / "datasets" / name / "rep0") and ds["replicate_key"] == 0

    text = format_lineage(chain)
    assert record["run_id"] in text and pre["run_id"] in text
    assert "sources/generic+natural/rep0/manifest.parquet" in text and "seed=0" in text
    assert text.index(record["run_id"]) < text.index(pre["run_id"])  # child above its parent


@pytest.mark.slow
def test_lineage_by_run_id_folder_and_cell_equal_lineage_by_path(study):
    res = study / "results" / "tiny"
    folder = res / "finetune" / "generic" / "cub200" / "seed0"
    by_path = lineage(folder / "metrics.json")
    assert lineage(by_path["run_id"], results_dir=res) == by_path
    assert lineage(folder) == by_path
    assert lineage("finetune:generic:cub200:0", results_dir=res) == by_path
    cells = pd.read_csv(res / "report" / "transfer_cells.csv")
    row = int(np.flatnonzero(cells["run_id"] == by_path["run_id"])[0])
    assert lineage(f"report/transfer_cells.csv:{row}", results_dir=res) == by_path

    cb = lineage("cbloss:gen10:if10:cb_focal:seed0", results_dir=res)
    assert cb["wildcards"] == {"dataset": "gen10", "imbalance": "10", "loss": "cb_focal", "seed": "0"}
    assert cb["inputs"][0]["kind"] == "longtail" and set(_datasets(cb)) == {"gen10"}
    assert lineage("cbloss:gen10:10:cb_focal:0", results_dir=res) == cb

    with pytest.raises(ValueError, match="unknown run id"):
        lineage("0" * 32, results_dir=res)
    with pytest.raises(FileNotFoundError, match="cub200"):
        lineage("finetune:nosuch:cub200:0", results_dir=res)
    with pytest.raises(FileNotFoundError):
        lineage(res / "finetune" / "nosuch" / "metrics.json")


@pytest.mark.slow
def test_audit_of_an_untouched_study_is_all_ok(study):
    res = study / "results" / "tiny"
    rows = audit(res)
    assert rows and {r["status"] for r in rows} == {"ok"} and all(r["current"] for r in rows)
    assert audit_exit_code(rows) == 0
    named = {r["resolved"] for r in rows}
    assert str(res / "longtail" / "gen10_if10" / "rep0" / "manifest.parquet") in named
    assert str(res / "sources" / "generic+natural" / "rep0" / "manifest.parquet") in named
    assert str(res / "pretrain" / "generic" / "seed0" / "model.pt") in named
    assert str(res / "datasets" / "gen10" / "rep0" / "images.npy") in named  # the pixels, not only their index
    assert {r["role"] for r in rows} == {"input.manifest", "input.init_model", "model", "input.store.0",
                                         "input.store.1", "data", "metrics.final", "output.metrics.json",
                                         "output.per_class.csv", "output.history.csv", "output.model.pt"}
    assert format_audit(rows).splitlines()[-1].endswith("ok, 0 changed, 0 missing")


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_audit_and_lineage_flag_a_changed_manifest(study_copy):
    res = study_copy
    for rel in ("longtail/gen10_if10/rep0/manifest.parquet", "sources/generic+natural/rep0/manifest.parquet"):
        _flip_byte(res / rel)
    rows = audit(res)
    assert all(r["resolved"].startswith(str(res)) for r in rows)  # the copy, not the original
    bad = {r["resolved"] for r in rows if r["status"] == "changed"}
    assert bad == {str(res / "longtail" / "gen10_if10" / "rep0" / "manifest.parquet"),
                   str(res / "sources" / "generic+natural" / "rep0" / "manifest.parquet")}
    changed = [r for r in rows if r["status"] == "changed"]
    assert {r["rule"] for r in changed} == {"cbloss", "pretrain"} and len(changed) == 2 + 1  # 2 losses, 1 pretrain
    assert {r["role"] for r in changed} == {"input.manifest"}
    assert all(r["actual"] != r["expected"] for r in changed)
    assert audit_exit_code(rows) != 0
    assert format_audit(rows).splitlines()[0].startswith("changed")

    chain = lineage(res / "finetune" / "generic+natural" / "cub200" / "seed0" / "metrics.json")
    assert chain["inputs"][0]["status"] == "ok"
    assert chain["parents"][0]["inputs"][0]["status"] == "changed"
    assert "changed" in format_lineage(chain)


@pytest.mark.slow
def test_audit_flags_a_deleted_model_as_missing(study_copy):
    res = study_copy
    model = res / "pretrain" / "generic" / "seed0" / "model.pt"
    model.unlink()
    rows = audit(res)
    missing = [r for r in rows if r["status"] == "missing"]
    assert {r["resolved"] for r in missing} == {str(model)}
    # pretrain's output (recorded in its metrics.json and as its run's output digest), fine-tune's input
    assert {r["role"] for r in missing} == {"model", "output.model.pt", "input.init_model"}
    assert all(r["actual"] is None for r in missing)
    assert audit_exit_code(rows) != 0
    chain = lineage("finetune:generic:cub200:0", results_dir=res)
    assert {i["role"]: i["status"] for i in chain["inputs"]}["init_model"] == "missing"
    assert chain["parents"][0]["model"]["status"] == "missing"


def test_registry_dataset_source_and_errors(tmp_path):
    """A registry stamp (no MLflow store): the raw file's checksum and URL, through a
    file-store manifest whose paths point into resources/."""
    res = tmp_path / "results" / "real"
    raw = tmp_path / "resources" / "cifar10" / "imgs" / "cat"
    raw.mkdir(parents=True)
    (raw / "a.png").write_bytes(b"x")
    ds = res / "datasets" / "cifar10"
    ds.mkdir(parents=True)
    (ds / "source.json").write_text(json.dumps(
        {"dataset": "cifar10", "kind": "array", "splits": "official", "homepage": "h", "license": "l",
         "files": {"cifar-10-python.tar.gz": "ab" * 32}}))
    man = pd.DataFrame({"path": ["../../../../resources/cifar10/imgs/cat/a.png"] * 2, "label": [0, 0],
                        "class_name": ["cat", "cat"], "split": ["train", "test"]})
    man.to_parquet(ds / "manifest.parquet", index=False)
    lt = res / "longtail" / "cifar10_if10"
    lt.mkdir(parents=True)
    man.assign(path="../../../../resources/cifar10/imgs/cat/a.png").to_parquet(lt / "manifest.parquet", index=False)
    out = res / "cbloss" / "cifar10" / "if10" / "softmax" / "seed0"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({
        "rule": "cbloss", "wildcards": {"dataset": "cifar10", "imbalance": "10", "loss": "softmax", "seed": "0"},
        "run_id": "f" * 32, "tracking_uri": f"sqlite:///{tmp_path / 'gone.db'}", "config_digest": "c" * 64,
        "inputs": {"manifest": "results/real/longtail/cifar10_if10/manifest.parquet",
                   "manifest_sha256": file_sha256(lt / "manifest.parquet")},
        "parent_run_id": None, "git_commit": "unknown", "final": {"top1_error": 0.5}}))

    chain = lineage("cbloss:cifar10:if10:softmax:0", results_dir=res)
    assert chain["status"] == "unknown" and chain["inputs"][0]["status"] == "ok"
    [src] = chain["inputs"][0]["sources"]
    assert src["origin"] == "registry" and src["name"] == "cifar10"
    assert src["files"] == [{"filename": "cifar-10-python.tar.gz", "sha256": "ab" * 32,
                             "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"}]
    assert "cifar-10-python.tar.gz" in format_lineage(chain)
    assert lineage(out / "metrics.json") == chain  # results_dir guessed from the file's place
    assert lineage("f" * 32, results_dir=res) == chain  # found by scanning metrics.json files

    with pytest.raises(FileNotFoundError, match="mlflow.db"):
        audit(res)
    with pytest.raises(ValueError):
        lineage("not-a-target")
    with pytest.raises(ValueError, match="results_dir"):
        lineage("cbloss:cifar10:if10:softmax")


@pytest.mark.slow
def test_lineage_and_audit_commands(study_copy):
    import subprocess
    import sys

    res = study_copy
    run = lambda *a: subprocess.run([sys.executable, "-m", "finetail.cli", *a], capture_output=True, text=True)  # noqa: E731
    r = run("lineage", "finetune:generic+natural:cub200:0", "--results", str(res))
    assert r.returncode == 0, r.stderr
    pre = json.loads((res / "pretrain" / "generic+natural" / "seed0" / "metrics.json").read_text())
    assert pre["run_id"] in r.stdout and "seed" in r.stdout
    r = run("lineage", str(res / "finetune" / "generic+natural" / "cub200" / "seed0" / "metrics.json"), "--json")
    assert json.loads(r.stdout)["parents"][0]["run_id"] == pre["run_id"]
    r = run("audit", "--results", str(res))
    assert r.returncode == 0, r.stdout + r.stderr
    _flip_byte(res / "longtail" / "gen10_if10" / "rep0" / "manifest.parquet")
    r = run("audit", "--results", str(res))
    assert r.returncode == 1 and "changed" in r.stdout


@pytest.mark.slow
def test_rerun_after_a_data_change_trains_again_and_audit_stays_clean(study_copy):
    """Issue 10.1 through the DAG: after a finished study, more test images for gen10 rerun
    its jobs; every rerun job trains from scratch (its finished checkpoint is for other
    data), evaluates on the new test set, and the study audits clean."""
    res = study_copy
    work = res.parents[1]
    cfg = copy.deepcopy(SMALL)
    cfg["datasets"]["gen10"]["test_per_class"] = 20
    r = snakemake(work, cfg)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    logs = sorted((work / "logs" / "tiny" / "cbloss").rglob("*.log"))
    assert logs
    for log in logs:
        text = log.read_text()
        assert "resuming" not in text and "starting afresh" in text, log
    manifest = pd.read_parquet(res / "longtail" / "gen10_if10" / "rep0" / "manifest.parquet")
    for cell in (res / "cbloss" / "gen10" / "if10").glob("*/seed*"):
        record = json.loads((cell / "metrics.json").read_text())
        assert record["final"]["num_test"] == (manifest["split"] == "test").sum() == 10 * 20
    rows = audit(res)
    assert audit_exit_code(rows) == 0, format_audit(rows)
