"""No wrong number reaches a result (issue 10, parts 1, 2, 4 and 5, at the `finetail train` level):

- a checkpoint is resumed only by the same job on the same bytes: changed pixels, a changed
  test set or changed training code train again from scratch and evaluate again;
- a diverged run (NaN loss) fails with one line naming the epoch and step, its MLflow run is
  FAILED and no metrics.json is left;
- a job SIGKILLed after its MLflow run was created but before its first checkpoint continues
  that run when rerun (one run per job, always), even if the kill came before the run id was
  recorded beside the checkpoint;
- audit sees the pixels (array stores and image files) and an edited metrics.json.
"""

import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from finetail.provenance import audit, audit_exit_code, format_audit
from finetail.fileio import file_sha256
from finetail.manifest import write_array_dataset

from conftest import ROOT, assert_same_weights, toy_images, write_toy_manifest

pytestmark = pytest.mark.slow  # starts training subprocesses

RECIPE = {"model": "resnet8", "width": 4, "epochs": 3, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1,
          "milestones": [2], "lr_factors": [0.1], "eval_every": 1, "crop_pad": 2, "deterministic": True}
SPEC = {"recipe": RECIPE, "loss": {"type": "softmax"}, "shots": {"many": 100, "few": 20}}


def _train(manifest, job, study, spec=SPEC, name="job", extra=()):
    cmd = [sys.executable, "-m", "finetail.cli", "train", "--manifest", str(manifest), "--spec", json.dumps(spec),
           "--out-dir", str(job / "out"), "--checkpoint", str(job / "ck" / "last.pt"), "--study-dir", str(study),
           "--rule", "test", "--wildcards", json.dumps({"name": name}), "--save-model", str(job / "out" / "model.pt"),
           "--device", "cpu", *extra]
    return cmd


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _runs(study):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, run_view_type=ViewType.ALL)


def _weights(job):
    return torch.load(job / "out" / "model.pt", weights_only=True)["model"]


# --------------------------------------------------------------------------- 1. stale checkpoints
@pytest.fixture(scope="module")
def finished_once(tmp_path_factory):
    """A job trained to completion on the toy data (its checkpoint is at the last epoch)."""
    base = tmp_path_factory.mktemp("finished")
    man = write_toy_manifest(base / "data", 40, 10)
    r = _run(_train(man, base / "job", base / "study"))
    assert r.returncode == 0, r.stderr
    return base


@pytest.fixture
def finished(finished_once, tmp_path):
    """A private copy of the finished job: data, checkpoint, outputs and tracking store."""
    import shutil

    shutil.copytree(finished_once, tmp_path / "w")
    w = tmp_path / "w"
    return w / "data" / "manifest.parquet", w / "job", w / "study"


def test_changed_pixels_train_again_from_scratch(finished, tmp_path):
    """Same counts, same labels, same recipe, other pixels (as after a change of world.seed):
    the finished checkpoint must not be resumed; the result equals a fresh run on the new data."""
    man, job, study = finished
    old = json.loads((job / "out" / "metrics.json").read_text())
    xtr, ytr = toy_images(40, seed=7)
    xte, yte = toy_images(10, seed=8)
    split = np.array(["train"] * len(ytr) + ["test"] * len(yte), dtype=object)
    write_array_dataset(man.parent, np.concatenate([xtr, xte]), np.concatenate([ytr, yte]), ["c0", "c1", "c2"], split)

    r = _run(_train(man, job, study))
    assert r.returncode == 0, r.stderr
    assert "resuming" not in r.stderr and "continuing MLflow run" not in r.stderr
    assert "written for other settings or data: starting afresh" in r.stderr
    new = json.loads((job / "out" / "metrics.json").read_text())
    assert new["run_id"] != old["run_id"]  # a new job: the old run stays, superseded

    fresh = tmp_path / "fresh"
    r = _run(_train(man, fresh, tmp_path / "study2"))
    assert r.returncode == 0, r.stderr
    assert_same_weights(_weights(job), _weights(fresh))
    assert new["final"] == json.loads((fresh / "out" / "metrics.json").read_text())["final"]


def test_changed_test_set_evaluates_again(finished):
    """More test images (as after a change of test_per_class): trained again and evaluated
    on the new test set, so metrics.json counts the manifest's test images."""
    man, job, study = finished
    write_toy_manifest(man.parent, 40, 20)
    r = _run(_train(man, job, study))
    assert r.returncode == 0, r.stderr
    assert "resuming" not in r.stderr
    record = json.loads((job / "out" / "metrics.json").read_text())
    assert record["final"]["num_test"] == 3 * 20 == (pd.read_parquet(man)["split"] == "test").sum()


def test_changed_training_code_is_not_resumed(finished, tmp_path, monkeypatch):
    """The resume key holds the digest of the training code: a checkpoint written by other
    code starts afresh (here the library is a copy whose losses.py gained a comment)."""
    import shutil

    man, job, study = finished
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "finetail", src / "finetail")
    with open(src / "finetail" / "losses.py", "a") as f:
        f.write("\n# an edit\n")
    env = {"PYTHONPATH": str(src)}
    r = subprocess.run(_train(man, job, study), capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, **env})
    assert r.returncode == 0, r.stderr
    assert "resuming" not in r.stderr and "starting afresh" in r.stderr
    r = _run(_train(man, job, study))  # the same code again: its finished checkpoint is now the edited code's
    assert r.returncode == 0, r.stderr
    assert "starting afresh" in r.stderr


def test_unchanged_job_still_resumes(finished):
    """The control: nothing changed, the finished checkpoint is resumed (no retraining)."""
    man, job, study = finished
    run_id = json.loads((job / "out" / "metrics.json").read_text())["run_id"]
    r = _run(_train(man, job, study))
    assert r.returncode == 0, r.stderr
    assert f"at epoch {RECIPE['epochs']} of {RECIPE['epochs']} epochs" in r.stderr
    assert json.loads((job / "out" / "metrics.json").read_text())["run_id"] == run_id
    assert len(_runs(study)) == 1


def test_changed_store_bytes_behind_an_unchanged_manifest_stop_the_job(finished):
    """The manifest records its store's sha256: pixels edited in place fail the job, naming the store."""
    man, job, study = finished
    store = man.parent / "images.npy"
    arr = np.load(store)
    arr[0, 0, 0, 0] ^= 0xFF
    np.save(store, arr)
    r = _run(_train(man, job, study))
    assert r.returncode == 2
    assert "images.npy" in r.stderr and "differs" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- 2. NaN
def test_diverged_training_fails_and_writes_no_result(tmp_path):
    man = write_toy_manifest(tmp_path / "data", 40, 10)
    job, study = tmp_path / "job", tmp_path / "study"
    spec = {**SPEC, "recipe": {**RECIPE, "lr": 1000000.0}}
    r = _run(_train(man, job, study, spec))
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert "non-finite" in errors[0] and "epoch 1, step" in errors[0]
    assert not (job / "out" / "metrics.json").exists() and not (job / "out" / "model.pt").exists()
    [run] = _runs(study)
    assert run.info.status == "FAILED"
    # nothing of the diverged epoch was checkpointed: no NaN weights to resume from
    assert not (job / "ck" / "last.pt").exists()


def test_nan_is_caught_before_a_checkpoint_in_the_engine(tmp_path):
    from finetail.training.loop import train
    from finetail.training.recipe import TrainConfig
    from finetail.errors import NonFiniteError

    x, y = toy_images(20)
    cfg = TrainConfig(model="resnet8", width=4, epochs=2, batch_size=16, lr=0.05, warmup_epochs=0, milestones=[],
                      lr_factors=[], eval_every=1)
    train(cfg, x, y, x, y, 3, tmp_path / "ck.pt", device="cpu", log=lambda m: None)
    bad = x.copy()
    cfg2 = TrainConfig(**{**cfg.__dict__, "epochs": 3, "lr": 1e12})
    with pytest.raises(NonFiniteError, match=r"epoch \d+, step \d+ of \d+"):
        train(cfg2, bad, y, x, y, 3, tmp_path / "ck2.pt", device="cpu", log=lambda m: None)
    assert not (tmp_path / "ck2.pt").exists()


# --------------------------------------------------------------------------- 4. orphan runs
def _kill_before_first_checkpoint(cmd, job, timeout=180):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not (job / "ck" / "run.json").exists():
        if proc.poll() is not None:
            pytest.fail("training ended before it could be killed:\n" + proc.stdout.read())
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("no run.json appeared")
        time.sleep(0.01)
    proc.kill()
    proc.communicate(timeout=60)
    assert not (job / "ck" / "last.pt").exists(), "killed too late: a checkpoint was already written"


@pytest.mark.parametrize("lose_record", [False, True], ids=["run-record", "store-lookup"])
def test_kill_before_the_first_checkpoint_continues_the_same_run(tmp_path, lose_record):
    """SIGKILL right after the run was created (first epoch still running): the rerun continues
    that run. With the run record deleted too (a kill between creating the run and recording
    it), the run is found in the tracking store by the job's key."""
    man = write_toy_manifest(tmp_path / "data", 400, 10)  # a first epoch long enough to kill in
    job, study = tmp_path / "job", tmp_path / "study"
    spec = {**SPEC, "recipe": {**RECIPE, "epochs": 2, "width": 8}}
    _kill_before_first_checkpoint(_train(man, job, study, spec), job)
    [orphan] = _runs(study)
    assert orphan.info.status == "RUNNING"
    if lose_record:
        (job / "ck" / "run.json").unlink()

    r = _run(_train(man, job, study, spec))
    assert r.returncode == 0, r.stderr
    assert "continuing MLflow run" in r.stderr
    [run] = _runs(study)  # one run per job, always
    assert run.info.run_id == orphan.info.run_id and run.info.status == "FINISHED"
    assert json.loads((job / "out" / "metrics.json").read_text())["run_id"] == run.info.run_id


# --------------------------------------------------------------------------- 5. audit
def test_audit_sees_pixels_of_an_array_store_and_an_edited_metrics_json(tmp_path):
    man = write_toy_manifest(tmp_path / "data", 20, 5)
    job, study = tmp_path / "job", tmp_path / "study"
    r = _run(_train(man, job, study, {**SPEC, "recipe": {**RECIPE, "epochs": 1}}))
    assert r.returncode == 0, r.stderr
    rows = audit(study)
    assert audit_exit_code(rows) == 0, format_audit(rows)
    roles = {r["role"] for r in rows}
    assert {"input.manifest", "input.store.0", "data", "output.metrics.json", "metrics.final"} <= roles

    store = man.parent / "images.npy"
    arr = np.load(store)
    np.save(store, np.zeros_like(arr))  # every pixel zeroed, manifest untouched
    rows = audit(study)
    assert audit_exit_code(rows) == 1
    bad = {(r["role"], r["resolved"]) for r in rows if r["status"] == "changed"}
    assert ("input.store.0", str(store)) in bad and ("data", str(store)) in bad
    # the command: exit 1; --skip-pixels still checks the store recorded as the run's input,
    # and says that image files behind the manifests were not re-hashed
    full = _run([sys.executable, "-m", "finetail.cli", "audit", "--results", str(study)])
    quick = _run([sys.executable, "-m", "finetail.cli", "audit", "--results", str(study), "--skip-pixels"])
    assert full.returncode == 1 and quick.returncode == 1, full.stdout + quick.stdout
    assert "changed" in full.stdout and "images.npy" in full.stdout
    assert "not re-hashed" in quick.stdout and "not re-hashed" not in full.stdout

    np.save(store, arr)  # restored: clean again
    assert audit_exit_code(audit(study)) == 0
    mpath = job / "out" / "metrics.json"
    record = json.loads(mpath.read_text())
    record["final"]["top1_error"] = 0.01
    mpath.write_text(json.dumps(record, indent=2) + "\n")
    rows = audit(study)
    assert audit_exit_code(rows) == 1
    changed = {r["role"] for r in rows if r["status"] == "changed"}
    assert changed == {"output.metrics.json", "metrics.final"}
    assert "value" in format_audit(rows)


def test_audit_sees_a_changed_pixel_in_an_image_file(tmp_path):
    """A file manifest carries each image's sha256 (hashed once at prepare time); audit
    re-hashes the files and names the one whose pixel changed."""
    root = tmp_path / "data"
    rows = []
    x, y = toy_images(6, size=24)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        for split in ("train", "test"):
            p = root / split / f"c{label}" / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(p)
            rows.append({"path": str(p.relative_to(root)), "label": int(label), "class_name": f"c{label}",
                         "split": split, "sha256": file_sha256(p)})
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet", index=False)
    job, study = tmp_path / "job", tmp_path / "study"
    spec = {**SPEC, "recipe": {**RECIPE, "epochs": 1, "image_size": 16, "num_workers": 0}}
    r = _run(_train(root / "manifest.parquet", job, study, spec))
    assert r.returncode == 0, r.stderr
    assert audit_exit_code(audit(study)) == 0

    victim = root / "train" / "c1" / "7.png"
    img = np.asarray(Image.open(victim)).copy()
    img[3, 3, 0] ^= 0x01  # one bit of one pixel
    Image.fromarray(img).save(victim)
    rows = audit(study)
    assert audit_exit_code(rows) == 1
    assert {r["resolved"] for r in rows if r["status"] == "changed"} == {str(victim)}



def test_audit_names_runs_left_running(tmp_path):
    """A killed job that was never rerun leaves its run RUNNING: audit says so (it may also be
    a job in progress, so this is reported, not an audit failure)."""
    man = write_toy_manifest(tmp_path / "data", 400, 10)
    job, study = tmp_path / "job", tmp_path / "study"
    _kill_before_first_checkpoint(_train(man, job, study, {**SPEC, "recipe": {**RECIPE, "width": 8}}), job)
    text = format_audit(audit(study))
    assert "1 run(s) still RUNNING" in text and "test:job" in text
