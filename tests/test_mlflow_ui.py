"""The MLflow UI on a study's store: experiments marked as model training (MLflow 3 opens others
on its GenAI overview), and a moved or copied study that keeps its artifacts (`finetail ui`,
and a training job that opens the copied store). The real UI in a browser:
tests/test_snakemake_report.py."""

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from finetail.cli import main
from finetail.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    Tracker,
    relocate_artifacts,
    sqlite_uri,
)


def _study(folder: Path, runs: int = 2) -> tuple[Path, list[str]]:
    """A study folder (results/<study>/) whose store finetail's Tracker made: ``runs`` finished
    runs, each with an artifact. Returns (results folder, run ids)."""
    res = folder / "results" / "s"
    res.mkdir(parents=True)
    t = Tracker(sqlite_uri(res / "mlflow.db"), "finetail-s", artifact_root=res / "mlartifacts")
    ids = []
    for i in range(runs):
        ids.append(t.start(f"cbloss:gen10/10/l{i}", {"recipe": {"lr": 0.1}}, {"finetail.rule": "cbloss"}))
        (folder / "per_class.csv").write_text(f"class,acc\n0,{i}\n")
        t.log_artifacts([folder / "per_class.csv"])
        t.end()
    return res, ids


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One study made once (creating an MLflow database takes seconds); tests copy it."""
    return _study(tmp_path_factory.mktemp("template"))


def _copy(template, dst: Path) -> tuple[Path, list[str]]:
    res, ids = template
    shutil.copytree(res, dst / "results" / "s")
    return dst / "results" / "s", ids


def _client(res: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(sqlite_uri(res / "mlflow.db"))


def test_finetail_experiments_are_marked_as_model_training(template):
    exp = _client(template[0]).get_experiment_by_name("finetail-s")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    assert EXPERIMENT_KIND_TAG == "mlflow.experimentKind"


def test_finetail_ui_points_a_copied_store_at_its_own_artifacts(template, tmp_path, capsys):
    original = template[0]
    res, ids = _copy(template, tmp_path / "copy")
    before = _client(res)
    assert before.get_experiment_by_name("finetail-s").artifact_location == (original / "mlartifacts").resolve().as_uri()

    main(["ui", "--results", str(res), "--port", "5123", "--no-serve"])
    out, err = capsys.readouterr()
    assert f"-> {(res / 'mlartifacts').resolve().as_uri()}, 2 run(s) moved" in err
    assert "http://127.0.0.1:5123/#/experiments/" in out and "/runs?workflowType=machine_learning" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{res.resolve()}/mlflow.db" in out

    client = _client(res)
    exp = client.get_experiment_by_name("finetail-s")
    assert exp.artifact_location == (res / "mlartifacts").resolve().as_uri()
    for run_id in ids:
        run = client.get_run(run_id)
        assert run.info.artifact_uri == f"{exp.artifact_location}/{run_id}/artifacts"
        assert [a.path for a in client.list_artifacts(run_id)] == ["per_class.csv"]
        local = Path(client.download_artifacts(run_id, "per_class.csv", str(tmp_path)))
        assert local.read_text().startswith("class,acc")
    # the original study is untouched, and a second call changes nothing
    assert _client(original).get_experiment_by_name("finetail-s").artifact_location == (original / "mlartifacts").resolve().as_uri()
    main(["ui", "--results", str(res), "--no-serve"])
    assert "moved" not in capsys.readouterr().err


def test_finetail_ui_marks_an_experiment_made_before_the_kind_tag(template, tmp_path, capsys):
    res, _ = _copy(template, tmp_path)
    client = _client(res)
    exp = client.get_experiment_by_name("finetail-s")
    client.delete_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG)
    main(["ui", "--results", str(res), "--no-serve"])
    assert "marked MLflow experiment" in capsys.readouterr().err
    assert _client(res).get_experiment(exp.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_a_job_in_a_moved_study_relocates_and_marks_its_experiment(template, tmp_path):
    """A rerun in a moved study must not write its artifacts into the old folder."""
    res, ids = _copy(template, tmp_path / "moved")
    client = _client(res)
    client.delete_experiment_tag(client.get_experiment_by_name("finetail-s").experiment_id, EXPERIMENT_KIND_TAG)
    t = Tracker(sqlite_uri(res / "mlflow.db"), "finetail-s", artifact_root=res / "mlartifacts")
    new = t.start("cbloss:gen10/10/again", {"recipe": {"lr": 0.1}}, {"finetail.rule": "cbloss"})
    (tmp_path / "history.csv").write_text("epoch\n0\n")
    t.log_artifacts([tmp_path / "history.csv"])
    t.end()
    assert (res / "mlartifacts" / new / "artifacts" / "history.csv").is_file()
    assert not (template[0] / "mlartifacts" / new).exists()
    exp = client.get_experiment_by_name("finetail-s")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    for run_id in ids:  # the old runs' artifacts are found in the moved folder
        assert client.get_run(run_id).info.artifact_uri.startswith((res / "mlartifacts").resolve().as_uri() + "/")
        assert client.list_artifacts(run_id)


def test_a_store_elsewhere_is_not_relocated_by_a_job(template, tmp_path):
    """tracking.uri on a SQLite file outside the study folder: its experiment keeps its location."""
    res, _ = _copy(template, tmp_path / "a")
    shutil.copy(res / "mlflow.db", tmp_path / "shared.db")
    Tracker(sqlite_uri(tmp_path / "shared.db"), "finetail-s", artifact_root=tmp_path / "other" / "mlartifacts")
    from mlflow.tracking import MlflowClient

    loc = MlflowClient(sqlite_uri(tmp_path / "shared.db")).get_experiment_by_name("finetail-s").artifact_location
    assert loc == (template[0] / "mlartifacts").resolve().as_uri()


def test_relocation_rewrites_only_what_lay_under_the_old_folder(template, tmp_path):
    res, ids = _copy(template, tmp_path)
    db = res / "mlflow.db"
    old = (template[0] / "mlartifacts").resolve().as_uri()
    con = sqlite3.connect(db)
    with con:  # a run logged elsewhere, and one under a folder whose name merely starts alike
        con.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", ("file:///data/elsewhere/x/artifacts", ids[0]))
        con.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", (old + "2/y/artifacts", ids[1]))
        default_loc = con.execute("SELECT artifact_location FROM experiments WHERE experiment_id = 0").fetchone()[0]
    con.close()
    [r] = relocate_artifacts(db, res / "mlartifacts")
    assert (r.name, r.old, r.new, r.runs) == ("finetail-s", old, (res / "mlartifacts").resolve().as_uri(), 0)
    con = sqlite3.connect(db)
    uris = dict(con.execute("SELECT run_uuid, artifact_uri FROM runs"))
    assert uris[ids[0]] == "file:///data/elsewhere/x/artifacts" and uris[ids[1]] == old + "2/y/artifacts"
    assert con.execute("SELECT artifact_location FROM experiments WHERE experiment_id = 0").fetchone()[0] == default_loc
    con.close()
    assert relocate_artifacts(db, res / "mlartifacts") == []


def test_relocation_refuses_a_file_that_is_not_an_mlflow_store(tmp_path):
    db = tmp_path / "mlflow.db"
    sqlite3.connect(db).close()
    with pytest.raises(ValueError, match="not an MLflow store"):
        relocate_artifacts(db, tmp_path / "mlartifacts")


def test_finetail_ui_names_a_missing_store(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit):
        main(["ui", "--results", str(tmp_path / "results" / "none")])
    assert "no MLflow store there (run the study first" in capsys.readouterr().err


def _session(sid: int) -> set[int]:
    """The running (not zombie) processes of session ``sid``, from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


@pytest.mark.slow  # a real MLflow server: 20-30 s on 2 cores
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the processes from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_finetail_ui_stops_every_process_of_its_mlflow_server(template, tmp_path, sig):
    """Issue 26: a process manager's SIGTERM (or a closed terminal's SIGHUP) to `finetail ui`
    left `mlflow ui`, its job runner and their workers running, holding the port. `finetail ui`
    starts in a session of its own here (as under a process manager): every process it starts
    is in that session, wherever it is reparented."""
    res, _ = _copy(template, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(tmp_path / "ui.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "finetail.cli", "ui", "--results", str(res), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the MLflow UI did not answer /health in 180 s"
                time.sleep(0.5)
        time.sleep(2)  # the server's workers and the job runner's consumers come up after /health
        assert len(_session(proc.pid) - {proc.pid}) >= 3  # mlflow ui, uvicorn and its workers at least

        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        left = _session(proc.pid)
        assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in left]
        assert code == 128 + sig  # stopped by that signal, as a shell reports it
        with socket.socket() as s:  # the port is free: nothing listens there any more
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        for pid in _session(proc.pid):  # what this test started, should anything be left
            os.kill(pid, signal.SIGKILL)
