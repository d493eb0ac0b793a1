"""The paths a user takes through ``finetail <stage>`` by hand, in-process (``finetail.cli.main``):
each gives its documented output, or one error line and exit status 2 (argparse's usage errors
also exit 2). No training, no Snakemake: the tracking store is made once with finetail's Tracker."""

import argparse
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetail.cli import build_parser, main
from finetail.fileio import file_sha256
from finetail.layout import Layout
from finetail.similarity import ClassStats, save_class_stats

WORLD = {"world": {"seed": 1, "image_size": 16}, "dataset": {"kind": "world", "train_per_class": 5, "test_per_class": 2}}


def run(capsys, *argv) -> tuple[int, str, str]:
    """``finetail *argv`` in this process: (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(err: str) -> str:
    """The single error line of a failed command (no traceback, nothing else on stderr)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.match(r"\[finetail \d\d:\d\d:\d\d\] error: ", lines[0]), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- --help
def test_every_command_has_a_help_page(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and out.startswith("usage: finetail")
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"generate", "longtail", "similarity", "select", "report", "ui", "lineage", "audit", "check-config",
            "compare-claims"} <= set(commands)
    for name in commands:
        code, out, _ = run(capsys, name, "--help")
        assert code == 0 and out.startswith(f"usage: finetail {name}"), name


# --------------------------------------------------------------------------- generate, longtail
@pytest.fixture(scope="module")
def gen10(tmp_path_factory):
    """gen10 of a 16-px world, 5 training and 2 test images per class, from ``finetail generate``."""
    out = tmp_path_factory.mktemp("gen") / "gen10"
    main(["generate", "--dataset", "gen10", "--spec", json.dumps(WORLD), "--out-dir", str(out)])
    return out


def test_generate_writes_the_world_dataset(gen10, tmp_path, capsys):
    assert sorted(p.name for p in gen10.iterdir()) == ["classes.csv", "images.npy", "manifest.parquet", "source.json"]
    src = json.loads((gen10 / "source.json").read_text())
    assert src == {"dataset": "gen10", "source": "finetail.world", "world": WORLD["world"],
                   "sizes": {"train_per_class": 5, "test_per_class": 2}, "images": 70, "classes": 10,
                   "shape": [16, 16, 3]}
    classes = pd.read_csv(gen10 / "classes.csv")
    assert len(classes) == 10 and (classes["train_count"] == 5).all() and (classes["test_count"] == 2).all()
    assert np.load(gen10 / "images.npy").shape == (70, 16, 16, 3)
    # the same spec renders the same pixels; another world seed, others
    code, _, err = run(capsys, "generate", "--dataset", "gen10", "--spec", json.dumps(WORLD), "--out-dir", tmp_path / "again")
    assert code == 0 and "generated gen10: 70 images, 10 classes" in err
    assert np.array_equal(np.load(tmp_path / "again" / "images.npy"), np.load(gen10 / "images.npy"))
    other = {**WORLD, "world": {"seed": 2, "image_size": 16}}
    run(capsys, "generate", "--dataset", "gen10", "--spec", json.dumps(other), "--out-dir", tmp_path / "other")
    assert not np.array_equal(np.load(tmp_path / "other" / "images.npy"), np.load(gen10 / "images.npy"))


@pytest.mark.parametrize("dataset,spec,says", [
    ("gen11", WORLD, "unknown world data set 'gen11'; valid names: gen10, gen100"),
    ("gen10", {"world": {"sed": 1}}, "unknown world setting(s) ['sed']; valid: seed, image_size"),
    ("gen10", {"world": {"image_size": 4}}, "image_size must be in 8..256"),
    ("gen10", {"dataset": {"train_per_class": -1}}, "sizes must be >= 0"),
    ("gen10", "{seed: 1}", "--spec is not JSON"),
    ("gen10", [1], "--spec must be a JSON object, got list"),
])
def test_generate_refuses_bad_input_in_one_line(tmp_path, capsys, dataset, spec, says):
    text = spec if isinstance(spec, str) else json.dumps(spec)
    code, _, err = run(capsys, "generate", "--dataset", dataset, "--spec", text, "--out-dir", tmp_path / "x")
    assert code == 2 and says in one_error(err)
    assert not (tmp_path / "x" / "manifest.parquet").exists()


def test_longtail_step_profile(gen10, tmp_path, capsys):
    # step profile, IF 5, n_max 5 (the balanced count): the first 5 of 10 classes keep 5 images, the rest 5 / 5 = 1
    code, _, err = run(capsys, "longtail", "--input", gen10 / "manifest.parquet", "--imbalance", 5, "--profile", "step",
                       "--out-dir", tmp_path / "lt")
    assert code == 0 and "at IF 5: 30 training images" in err
    counts = pd.read_csv(tmp_path / "lt" / "counts.csv")
    assert counts["train_count"].tolist() == [5] * 5 + [1] * 5 and (counts["test_count"] == 2).all()
    sub = pd.read_parquet(tmp_path / "lt" / "manifest.parquet")
    stores = {(tmp_path / "lt" / s).resolve() for s in sub["store"]}  # rows point into the balanced set's store
    assert stores == {(gen10 / "images.npy").resolve()}
    # exp, the default, differs: 5 * (1/5)^(i/9)
    run(capsys, "longtail", "--input", gen10 / "manifest.parquet", "--imbalance", 5, "--out-dir", tmp_path / "exp")
    assert pd.read_csv(tmp_path / "exp" / "counts.csv")["train_count"].tolist() == [5, 4, 3, 2, 2, 2, 1, 1, 1, 1]


def test_longtail_refuses_bad_input(gen10, tmp_path, capsys):
    code, _, err = run(capsys, "longtail", "--input", gen10 / "manifest.parquet", "--imbalance", 5, "--profile",
                       "linear", "--out-dir", tmp_path / "x")
    assert code == 2 and "invalid choice: 'linear' (choose from 'exp', 'step')" in err
    code, _, err = run(capsys, "longtail", "--input", gen10 / "manifest.parquet", "--imbalance", 5, "--profile", "step",
                       "--n-max", 6, "--out-dir", tmp_path / "x")
    assert code == 2 and "fewer training images than the profile asks" in one_error(err)
    code, _, err = run(capsys, "longtail", "--input", gen10 / "manifest.parquet", "--imbalance", 0.5, "--out-dir",
                       tmp_path / "x")
    assert code == 2 and "imbalance factor must be >= 1, got 0.5" in one_error(err)
    code, _, err = run(capsys, "longtail", "--input", tmp_path / "none.parquet", "--imbalance", 5, "--out-dir",
                       tmp_path / "x")
    assert code == 2 and "none.parquet" in one_error(err)


# --------------------------------------------------------------------------- similarity, select
@pytest.fixture
def features(tmp_path):
    """Class statistics by hand: source classes a at (0, 0) and b at (9, 12), 300 images each (b: 100
    in ``few``); the target one class at (3, 4). Distances to it: a 5, b 10."""
    d = tmp_path / "features"
    save_class_stats(d / "src.npz", ClassStats([[0.0, 0.0], [9.0, 12.0]], [300, 300], ["a", "b"]), model="toy")
    save_class_stats(d / "few.npz", ClassStats([[0.0, 0.0], [9.0, 12.0]], [300, 100], ["a", "b"]), model="toy")
    save_class_stats(d / "tgt.npz", ClassStats([[3.0, 4.0]], [50], ["x"]), model="toy")
    return d


def test_similarity_matrix_by_hand(features, tmp_path, capsys):
    # src: half the mass at distance 5, half at distance 10: EMD 7.5, similarity exp(-0.01 * 7.5) = 0.927743;
    # few: b has 100 < 200 images (the default min_source_images), so only a: EMD 5, exp(-0.05) = 0.951229
    spec = {"sources": ["src", "few"], "targets": ["tgt"]}
    code, _, err = run(capsys, "similarity", "--features-dir", features, "--spec", json.dumps(spec), "--out-dir",
                       tmp_path / "sim")
    assert code == 0 and "similarity matrix 2 sources x 1 targets" in err
    sim = pd.read_csv(tmp_path / "sim" / "matrix.csv", index_col=0)
    emd = pd.read_csv(tmp_path / "sim" / "emd.csv", index_col=0)
    assert sim.loc["src", "tgt"] == pytest.approx(math.exp(-0.075), abs=1e-6) and emd.loc["src", "tgt"] == 7.5
    assert sim.loc["few", "tgt"] == pytest.approx(math.exp(-0.05), abs=1e-6) and emd.loc["few", "tgt"] == 5.0
    assert (tmp_path / "sim" / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --features (files named by their stem), gamma 0.1, every class kept: src exp(-0.1 * 7.5) = 0.472367;
    # few: weights 3/4 and 1/4, EMD 0.75 * 5 + 0.25 * 10 = 6.25, exp(-0.625) = 0.535261
    spec = {**spec, "gamma": 0.1, "min_source_images": 0}
    code, _, _ = run(capsys, "similarity", "--features", features / "src.npz", features / "few.npz",
                     features / "tgt.npz", "--spec", json.dumps(spec), "--out-dir", tmp_path / "sim2")
    sim = pd.read_csv(tmp_path / "sim2" / "matrix.csv", index_col=0)
    assert code == 0 and sim["tgt"].tolist() == pytest.approx([math.exp(-0.75), math.exp(-0.625)], abs=1e-6)


@pytest.mark.parametrize("spec,says", [
    ({"sources": ["nope"], "targets": ["tgt"]}, "nope.npz"),
    ({"targets": ["tgt"]}, "--spec lacks the key(s) ['sources']; it has ['targets']"),
    ({"sources": ["src"], "targets": ["tgt"], "gamma": -1}, "gamma"),
    ({"sources": ["few"], "targets": ["tgt"], "min_source_images": 400}, "no source class left"),
])
def test_similarity_refuses_bad_input_in_one_line(features, tmp_path, capsys, spec, says):
    code, _, err = run(capsys, "similarity", "--features-dir", features, "--spec", json.dumps(spec), "--out-dir",
                       tmp_path / "sim")
    assert code == 2 and says in one_error(err)
    assert not (tmp_path / "sim" / "matrix.csv").exists()


def test_select_top_k_and_threshold(features, tmp_path, capsys):
    # a is 5 from the target (similarity exp(-0.05) = 0.951229), b 10 (exp(-0.1) = 0.904837)
    spec = {"pool": ["src"], "targets": ["tgt"], "top_k": 1, "min_source_images": 0}
    code, _, err = run(capsys, "select", "--features-dir", features, "--spec", json.dumps(spec),
                       "--out", tmp_path / "sel" / "classes.csv")
    assert code == 0 and "selected 1 of 2 source classes" in err
    sel = pd.read_csv(tmp_path / "sel" / "classes.csv")
    assert sel.to_dict("records") == [{"class_name": "a", "score": pytest.approx(0.951229, abs=1e-6),
                                       "best_target": "tgt", "targets": "tgt", "count": 300}]
    spec = {"pool": ["src"], "targets": ["tgt"], "threshold": 0.9, "min_source_images": 0}
    run(capsys, "select", "--features-dir", features, "--spec", json.dumps(spec), "--out", tmp_path / "t.csv")
    assert pd.read_csv(tmp_path / "t.csv")["class_name"].tolist() == ["a", "b"]
    spec["threshold"] = 0.95
    run(capsys, "select", "--features-dir", features, "--spec", json.dumps(spec), "--out", tmp_path / "t.csv")
    assert pd.read_csv(tmp_path / "t.csv")["class_name"].tolist() == ["a"]
    spec["threshold"] = 0.99  # nothing that similar: an empty table with its header, not an error
    code, _, err = run(capsys, "select", "--features-dir", features, "--spec", json.dumps(spec), "--out",
                       tmp_path / "none.csv")
    assert code == 0 and "selected 0 of 2" in err and pd.read_csv(tmp_path / "none.csv").empty


@pytest.mark.parametrize("spec,says", [
    ({"pool": ["src"], "targets": ["tgt"]}, "give exactly one of top_k and threshold"),
    ({"pool": ["src"], "targets": ["tgt"], "top_k": 1, "threshold": 0.5}, "give exactly one of top_k and threshold"),
    ({"targets": ["tgt"], "top_k": 1}, "--spec lacks the key(s) ['pool']"),
    ({"pool": ["src"], "targets": ["gone"], "top_k": 1}, "gone.npz"),
])
def test_select_refuses_bad_input_in_one_line(features, tmp_path, capsys, spec, says):
    code, _, err = run(capsys, "select", "--features-dir", features, "--spec", json.dumps(spec), "--out",
                       tmp_path / "sel.csv")
    assert code == 2 and says in one_error(err)
    assert not (tmp_path / "sel.csv").exists()


# --------------------------------------------------------------------------- report --metrics
LOSSES = {"softmax": {"type": "softmax"}, "cb_focal": {"type": "focal", "beta": 0.9999, "gamma": 1.0}}
REPORT_SPEC = {"study": "s", "replicates": {"count": 3}, "datasets": {"gen10": {"kind": "world"}},
               "world": {"seed": 0, "image_size": 16},
               "cbloss": {"datasets": ["gen10"], "imbalance": [10], "losses": LOSSES, "recipe": {"epochs": 2}}}


def _cbloss_runs(res: Path) -> list[str]:
    """metrics.json (and per_class.csv) of a gen10 IF 10 cell: softmax errors 30, 31, 32 %, CB focal 20 %."""
    paths = []
    for loss, errors in (("softmax", [0.30, 0.31, 0.32]), ("cb_focal", [0.20, 0.20, 0.20])):
        for seed, e in enumerate(errors):
            p = Path(Layout.at(res).train("cbloss", dataset="gen10", imbalance=10, loss=loss, seed=seed))
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({
                "rule": "cbloss", "wildcards": {"dataset": "gen10", "imbalance": "10", "loss": loss, "seed": str(seed)},
                "run_id": f"{loss}{seed}", "git_commit": "abc123",
                "final": {"top1_error": e, "balanced_acc": 1 - e, "many_acc": 0.9, "medium_acc": None, "few_acc": 0.5,
                          "ece": 0.05}}))
            pd.DataFrame({"class_name": ["a", "b"], "train_count": [10, 1], "accuracy": [0.9, 0.5]}).to_csv(
                p.parent / "per_class.csv", index=False)
            paths.append(str(p))
    return paths


def test_report_with_metrics_names_exactly_those_runs(tmp_path, capsys):
    res = tmp_path / "results" / "s"
    paths = _cbloss_runs(res)
    out = res / "report"
    code, _, err = run(capsys, "report", "--results", res, "--spec", json.dumps(REPORT_SPEC), "--out-dir", out,
                       "--metrics", paths[4], paths[0], "--experiment", "finetail-s")
    assert code == 0 and f"wrote {out / 'summary.md'}" in err
    prov = pd.read_csv(out / "provenance.csv")
    assert prov["metrics_json"].tolist() == [paths[4], paths[0]]  # as given, in that order
    assert prov["run_id"].tolist() == ["cb_focal1", "softmax0"] and (prov["experiment"] == "finetail-s").all()
    commits = pd.read_csv(out / "commits.csv")
    assert commits.to_dict("records") == [{"commit": "abc123", "runs": 2, "rules": "cbloss"}]
    # the numbers still come from every replicate: the CB claim of the summary (differences -10, -11, -12;
    # one CB loss, so Holm's level is the plain 95%: -11 +- 4.302653 / sqrt 3 = -11 +- 2.484138)
    summary = (out / "summary.md").read_text()
    assert ("- **gen10, imbalance 10: class-balanced weighting lowers top-1 error — holds**: -11.0 [-13.5, -8.5] "
            "(1 CB loss(es), Holm-corrected; deciding loss cb_focal; points); holds in 3 of 3 replicates") in summary
    assert pd.read_csv(out / "claims.csv").set_index("claim").loc["cb_helps:gen10:if10:top1_error", "verdict"] == "holds"
    # without --metrics: every training run under --results
    code, _, _ = run(capsys, "report", "--results", res, "--spec", json.dumps(REPORT_SPEC), "--out-dir", tmp_path / "all")
    assert code == 0 and sorted(pd.read_csv(tmp_path / "all" / "provenance.csv")["metrics_json"]) == sorted(paths)


def test_report_refuses_a_missing_run_and_a_bad_spec(tmp_path, capsys):
    res = tmp_path / "results" / "s"
    paths = _cbloss_runs(res)
    code, _, err = run(capsys, "report", "--results", res, "--spec", json.dumps(REPORT_SPEC), "--out-dir",
                       tmp_path / "r", "--metrics", paths[0], tmp_path / "gone" / "metrics.json")
    assert code == 2 and "gone/metrics.json" in one_error(err)
    Path(paths[5]).unlink()
    code, _, err = run(capsys, "report", "--results", res, "--spec", json.dumps(REPORT_SPEC), "--out-dir", tmp_path / "r")
    assert code == 2 and "cb_focal/seed2/metrics.json is missing: run the cbloss job" in one_error(err)
    code, _, err = run(capsys, "report", "--results", res, "--spec", "{", "--out-dir", tmp_path / "r")
    assert code == 2 and "--spec is not JSON" in one_error(err)


# --------------------------------------------------------------------------- check-config
def test_check_config_valid_missing_unparsable_and_not_a_mapping(tmp_path, capsys):
    from conftest import ROOT

    code, out, _ = run(capsys, "check-config", ROOT / "config.yaml")
    assert code == 0 and re.fullmatch(r".*config\.yaml: valid \(study '[\w.+-]+', \d+ datasets\)\n", out)
    code, out, err = run(capsys, "check-config", tmp_path / "none.yaml")
    assert code == 2 and out == "" and one_error(err).endswith(f"config file {tmp_path / 'none.yaml'} does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: tiny\ndatasets:\n  gen10: {kind: world\n")  # an unclosed flow mapping
    code, out, err = run(capsys, "check-config", bad)
    assert code == 2 and out == "" and f"config file {bad} is not valid YAML (line " in one_error(err)
    bad.write_text("- study\n- datasets\n")
    code, _, err = run(capsys, "check-config", bad)
    assert code == 2 and "a study is a mapping of keys (study, datasets, ...), not a list" in one_error(err)
    code, _, err = run(capsys, "check-config", tmp_path)
    assert code == 2 and "is not a file" in one_error(err)
    bad.write_bytes(b"study: \xff\xfe\n")
    code, _, err = run(capsys, "check-config", bad)
    assert code == 2 and f"config file {bad} is not a text file (byte 7 is not UTF-8)" in one_error(err)
    bad.write_text("study: tiny\n")
    code, _, err = run(capsys, "check-config", bad)
    assert code == 2 and "invalid study configuration" in err and "'datasets' is a required property" in err


# --------------------------------------------------------------------------- ui, audit, lineage
CELL = {"dataset": "gen10", "imbalance": "10", "loss": "softmax", "seed": "0"}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A study folder whose runs went to a store elsewhere (``--tracking-uri``, not recorded in
    metrics.json): one cell run twice, its init model changed in between, so the first run is
    stale (superseded) with a changed input and the second, current, is clean.
    Returns (results folder, store file, [stale run id, current run id])."""
    from finetail.record import FileRef, final_metrics, job_tags, output_tags
    from finetail.tracking import Tracker, sqlite_uri

    root = tmp_path_factory.mktemp("tracked")
    res = root / "results" / "s"
    cell = Path(Layout.at(res).train_dir("cbloss", **CELL))
    cell.mkdir(parents=True)
    init = res / "inputs" / "init.pt"
    init.parent.mkdir(parents=True)
    store = root / "elsewhere" / "store.db"
    t = Tracker(sqlite_uri(store), "finetail-s", artifact_root=root / "elsewhere" / "mlartifacts")
    ids = []
    for content in (b"first weights", b"second weights"):
        init.write_bytes(content)
        inputs = {"init_model": str(init), "init_model_sha256": file_sha256(init)}
        tags = job_tags("cbloss", CELL, git_commit="abc123", git_dirty=False, config_digest="c" * 64, job_key="k",
                        output_dir=cell, world_size=1, inputs=inputs)
        ids.append(t.start("cbloss:gen10/10/softmax/0", {"recipe": {"lr": 0.1}}, tags))
        t.log_metrics(final_metrics({"top1_error": 0.3}))
        (cell / "metrics.json").write_text(json.dumps({"rule": "cbloss", "wildcards": CELL, "run_id": ids[-1],
                                                       "final": {"top1_error": 0.3}, "inputs": inputs}))
        t.log_tags(output_tags([FileRef("metrics", str(cell / "metrics.json"), file_sha256(cell / "metrics.json"))]))
        t.end()
    return res, store, ids


def file_sha256_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_audit_include_stale_fails_only_on_the_superseded_run(tracked, capsys, no_env_store):
    res, store, _ = tracked
    uri = f"sqlite:///{store}"
    code, out, _ = run(capsys, "audit", "--results", res, "--tracking-uri", uri)
    changed = f"changed  {res / 'inputs' / 'init.pt'}  sha256 {file_sha256_of(b'first weights')[:12]} now " \
              f"{file_sha256_of(b'second weights')[:12]}  [cbloss:gen10/10/softmax/0] (stale runs only)"
    assert code == 0 and out.splitlines()[0] == changed  # a stale run's input may change: not a failure
    assert "4 files: 3 ok, 1 changed, 0 missing" in out
    code, out2, _ = run(capsys, "audit", "--results", res, "--tracking-uri", uri, "--include-stale")
    assert code == 1 and out2 == out  # the same findings; only the exit status differs
    code, out, _ = run(capsys, "audit", "--results", res, "--tracking-uri", uri, "--include-stale", "-v")
    assert code == 1 and out.count("\nok ") == 3


def test_audit_and_lineage_read_the_store_given_by_tracking_uri(tracked, capsys, monkeypatch, no_env_store):
    res, store, (_, current) = tracked
    metrics = res / "cbloss" / "gen10" / "if10" / "softmax" / "seed0" / "metrics.json"
    # the study has no mlflow.db and its metrics.json recorded no store: audit cannot guess one
    code, _, err = run(capsys, "audit", "--results", res)
    assert code == 2 and one_error(err).endswith(f"no tracking store: {res / 'mlflow.db'} does not exist (give "
                                                 "--tracking-uri, or set MLFLOW_TRACKING_URI)")
    code, out, _ = run(capsys, "lineage", metrics)
    assert code == 0 and f"run {current}" in out and "[unknown]" in out and "no tracking store" in out
    # --tracking-uri: the run is found, with its config digest and commit, its input checked
    code, out, _ = run(capsys, "lineage", metrics, "--tracking-uri", f"sqlite:///{store}")
    assert code == 0 and out.splitlines()[0] == f"run {current}  cbloss dataset=gen10 imbalance=10 loss=softmax " \
                                                "seed=0  [FINISHED]"
    assert "config cccccccccccc  git abc123  top1_error 0.3000" in out and "no tracking store" not in out
    assert f"input init_model {res / 'inputs' / 'init.pt'} sha256 " in out and out.rstrip().endswith("ok")
    code, out, _ = run(capsys, "lineage", metrics, "--tracking-uri", f"sqlite:///{store}", "--json")
    chain = json.loads(out)
    assert chain["run_id"] == current and chain["status"] == "FINISHED"
    # --tracking-uri wins over MLFLOW_TRACKING_URI; a store that is not there is one error line
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{res / 'nowhere.db'}")
    code, _, _ = run(capsys, "audit", "--results", res, "--tracking-uri", f"sqlite:///{store}")
    assert code == 0
    code, _, err = run(capsys, "audit", "--results", res)
    assert code == 2 and f"tracking store sqlite:///{res / 'nowhere.db'} does not exist" in one_error(err)
    code, _, err = run(capsys, "audit", "--results", res.parent / "none")
    assert code == 2 and "does not exist" in one_error(err)


def test_ui_study_points_at_results_of_that_study(tracked, tmp_path, capsys, monkeypatch, no_env_store):
    res, store, _ = tracked
    work = tmp_path / "work"
    (work / "results" / "s").mkdir(parents=True)
    shutil.copy(store, work / "results" / "s" / "mlflow.db")
    monkeypatch.chdir(work)
    code, out, err = run(capsys, "ui", "--study", "s", "--no-serve", "--port", 5123)
    assert code == 0, err
    lines = out.splitlines()
    assert re.fullmatch(r"finetail-s: http://127\.0\.0\.1:5123/#/experiments/\d+/runs\?workflowType=machine_learning",
                        lines[0])
    cmd = lines[-1]
    assert f"--backend-store-uri sqlite:///{work / 'results' / 's' / 'mlflow.db'}" in cmd
    assert f"--artifacts-destination {work / 'results' / 's' / 'mlartifacts'}" in cmd and "--port 5123" in cmd
    # another study's name: its store is not there, and the error says where it looked
    code, _, err = run(capsys, "ui", "--study", "other", "--no-serve")
    assert code == 2 and "results/other/mlflow.db: no MLflow store there (run the study first, or give --results)" \
        in one_error(err)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    code, _, err = run(capsys, "ui", "--study", "other", "--no-serve")
    assert code == 2 and "the runs went to MLFLOW_TRACKING_URI=http://127.0.0.1:1" in one_error(err)
    code, _, err = run(capsys, "ui", "--study", "s", "--results", res, "--no-serve")
    assert code == 2 and "not allowed with argument" in err
    code, _, err = run(capsys, "ui", "--no-serve")
    assert code == 2 and "one of the arguments --study --results is required" in err
