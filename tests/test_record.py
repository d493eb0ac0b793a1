"""The run record (finetail.record), the one tracking-URI rule (finetail.tracking) and the
module boundaries they stand for. No torch, no MLflow store: fast."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetail import record as R
from finetail.layout import Layout
from finetail.provenance.files import open_store
from finetail.tracking import choose_tracking_uri, sqlite_uri

from conftest import ROOT

SRC = ROOT / "src" / "finetail"


# --------------------------------------------------------------------------- tags
def test_job_tags_read_back():
    inputs = {"manifest": "results/s/longtail/a_if10/manifest.parquet", "manifest_sha256": "a" * 64,
              "store.0": "results/s/datasets/a/images.npy", "store.0_sha256": "b" * 64}
    tags = R.job_tags("cbloss", {"loss": "softmax", "dataset": "a", "imbalance": 10}, git_commit="c" * 40,
                      git_dirty=False, config_digest="d" * 64, job_key="k" * 64, output_dir="/o", world_size=1,
                      inputs=inputs, parent_run="p" * 32)
    assert tags["finetail.rule"] == "cbloss" and tags["finetail.wildcard.imbalance"] == "10"
    assert tags["finetail.input.store.0.sha256"] == "b" * 64 and tags["finetail.git_dirty"] == "false"
    assert tags["mlflow.parentRunId"] == tags["finetail.parent_runs"] == "p" * 32
    assert R.wildcards_of(tags) == {"dataset": "a", "imbalance": "10", "loss": "softmax"}
    assert R.tagged_files(tags, R.INPUT) == [R.FileRef("manifest", inputs["manifest"], "a" * 64),
                                             R.FileRef("store.0", inputs["store.0"], "b" * 64)]
    assert R.flat_inputs(R.input_files(inputs)) == inputs
    assert R.tagged_files(tags, R.OUTPUT) == []
    out = R.output_tags([R.FileRef("metrics.json", "/o/metrics.json", "e" * 64)])
    assert out == {"finetail.output.metrics.json": "/o/metrics.json", "finetail.output.metrics.json.sha256": "e" * 64}
    assert R.tagged_files(out, R.OUTPUT) == [R.FileRef("metrics.json", "/o/metrics.json", "e" * 64)]
    assert R.parent_runs({"mlflow.parentRunId": "x", "finetail.parent_runs": "x, y"}) == ["x", "y"]
    with pytest.raises(ValueError):
        R.file_tag("inputs", "manifest")


def test_params_and_final_metrics():
    spec = {"recipe": {"lr": 0.1, "milestones": [2]}, "loss": {"type": "softmax"}}
    params, tag = R.job_params(spec)
    assert params == {"loss.type": "softmax", "recipe.lr": "0.1", "recipe.milestones": "[2]"}
    assert json.loads(tag[R.CONFIG_JSON]) == spec
    logged = R.final_metrics({"top1_error": 0.25, "num_test": 40, "per_class": [1.0]})
    assert logged == {"final_top1_error": 0.25}
    assert R.final_of({**logged, "train_loss": 1.0}) == {"top1_error": 0.25}


# --------------------------------------------------------------------------- files
def test_metrics_record_round_trip_and_older_files(tmp_path):
    rec = R.MetricsRecord(rule="cbloss", wildcards={"loss": "softmax"}, run_id="f" * 32, tracking_uri="sqlite:///x",
                          inputs={"manifest": "m", "manifest_sha256": "a" * 64}, final={"top1_error": 0.5},
                          wall_s=1.5)
    data = rec.to_json()
    assert "model_sha256" not in data and list(data)[:3] == ["rule", "wildcards", "run_id"]
    rec.model_sha256 = "b" * 64
    (tmp_path / "metrics.json").write_text(json.dumps(rec.to_json()))
    assert R.MetricsRecord.read(tmp_path / "metrics.json") == rec
    assert rec.input_files() == [R.FileRef("manifest", "m", "a" * 64)]

    # an older file: fewer keys read as None; a newer file: unknown keys kept
    old = R.MetricsRecord.from_json({"run_id": "1" * 32, "final": {"top1_error": 0.1}, "future_key": 3})
    assert old.tracking_uri is None and old.model_sha256 is None and old.inputs == {}
    assert old.to_json()["future_key"] == 3
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ValueError, match="not an object"):
        R.MetricsRecord.read(tmp_path / "bad.json")

    run = R.RunFile("r" * 32, "k" * 64, "sqlite:///db")
    (tmp_path / "run.json").write_text(json.dumps(run.to_json()))
    assert R.RunFile.read(tmp_path / "run.json") == run
    with pytest.raises(ValueError, match="run_id"):
        R.RunFile.from_json({"job_key": "k"})


# --------------------------------------------------------------------------- the tracking URI
def test_training_uri_precedence(tmp_path, monkeypatch):
    """finetail train: --tracking-uri, then MLFLOW_TRACKING_URI, then --config-tracking-uri
    (the config's tracking.uri), then results/<study>/mlflow.db (created on demand)."""
    flag, env, cfg = (sqlite_uri(tmp_path / f"{n}.db") for n in ("flag", "env", "config"))
    default = Layout.at(tmp_path / "results" / "s").mlflow_db()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert choose_tracking_uri(None, None, default) == sqlite_uri(default)
    assert (tmp_path / "results" / "s").is_dir()
    assert choose_tracking_uri(None, cfg, default) == cfg
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    assert choose_tracking_uri(None, cfg, default) == env
    assert choose_tracking_uri(flag, cfg, default) == flag


def test_lineage_uri_precedence(tmp_path, monkeypatch):
    """lineage/audit: the same order, with the recorded URI in the config's place, counted
    only when its store exists; a SQLite store inside the study re-roots with a moved study."""
    rd = tmp_path / "moved" / "results" / "s"
    rd.mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    other = tmp_path / "other.db"
    assert open_store(None, rd, [sqlite_uri(other)]).uri is None  # nothing exists
    (rd / "mlflow.db").write_bytes(b"")
    assert open_store(None, rd, [sqlite_uri(other)]).uri == sqlite_uri(rd / "mlflow.db")
    other.write_bytes(b"")
    assert open_store(None, rd, [None, sqlite_uri(other)]).uri == sqlite_uri(other)
    # recorded in the study's old place: re-rooted under the study folder given
    assert open_store(None, rd, [f"sqlite:///{tmp_path}/old/results/s/mlflow.db"]).uri == sqlite_uri(rd / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert open_store(None, rd, [sqlite_uri(other)]).uri == "sqlite:///env.db"
    assert open_store("sqlite:///flag.db", rd, [sqlite_uri(other)]).uri == "sqlite:///flag.db"
    assert not open_store("sqlite:///flag.db", rd).available  # a missing SQLite store reads as empty


def test_train_cli_has_both_tracking_options():
    from finetail.cli import build_parser
    from finetail.training.job import train_argv

    a = build_parser().parse_args(["train", "--manifest", "m", "--spec", "{}", "--out-dir", "o", "--checkpoint", "c",
                                   "--study-dir", "s", "--config-tracking-uri", "http://cfg", "--tracking-uri", "x"])
    assert a.config_tracking_uri == "http://cfg" and a.tracking_uri == "x"
    argv = train_argv(a)  # the torchrun relaunch keeps both
    assert argv[argv.index("--config-tracking-uri") + 1] == "http://cfg"


# --------------------------------------------------------------------------- module boundaries
def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for n in node.names:
                yield n.name, None
        elif isinstance(node, ast.ImportFrom):
            for n in node.names:
                yield node.module or "", n.name


def test_only_tracking_imports_mlflow_and_no_private_imports():
    mlflow_users, private = [], []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for module, name in _imports(path):
            if module.split(".")[0] == "mlflow":
                mlflow_users.append(rel)
            if name and name.startswith("_") and name != "__future__" and not name.startswith("__"):
                private.append(f"{rel}: from {module} import {name}")
    assert set(mlflow_users) == {"tracking.py"}
    assert private == []


def test_record_and_provenance_import_without_torch_or_mlflow():
    code = ("import sys, finetail.record, finetail.tracking, finetail.provenance, finetail.layout; "
            "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_provenance_functions_are_short():
    long = []
    for path in [SRC / "record.py", SRC / "tracking.py", *sorted((SRC / "provenance").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 100:
                long.append(f"{path.name}:{node.name}")
    assert long == []
