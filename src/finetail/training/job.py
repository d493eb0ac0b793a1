"""The training job: what ``finetail train`` does once its arguments are parsed.

Spec -> recipe -> engine -> run record -> model file. Rank 0 tracks the job in MLflow and
writes every result; other ranks (under torchrun) train alongside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["add_train_args", "launch", "run_job", "train_argv"]


def _log(msg: str) -> None:
    print(f"[finetail {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _write_json(obj: dict, path: Path) -> None:
    from ..manifest import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="manifest with train and test splits")
    p.add_argument("--spec", required=True, help='JSON: {"recipe": {...}, "loss": {...}, "shots": {...}}')
    p.add_argument("--out-dir", required=True, help="writes metrics.json, per_class.csv, history.csv")
    p.add_argument("--checkpoint", required=True, help="resume point, rewritten after every epoch")
    p.add_argument("--study-dir", required=True, help="results/<study>: holds the default MLflow store")
    p.add_argument("--rule", default="manual", help="Snakemake rule name, for the run's tags")
    p.add_argument("--wildcards", default="{}", help="JSON of the job's wildcards, for the run's tags")
    p.add_argument("--experiment", default="finetail", help="MLflow experiment name")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow URI, overriding everything else (then MLFLOW_TRACKING_URI, then "
                        "--config-tracking-uri, then <study-dir>/mlflow.db)")
    p.add_argument("--config-tracking-uri", default=None,
                   help="the study config's tracking.uri (the rules pass it here); MLFLOW_TRACKING_URI wins over it")
    p.add_argument("--save-model", default=None, help="also write the final weights here")
    p.add_argument("--init-model", default=None, help="start the backbone from this model.pt (fine-tuning); new head")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default=os.environ.get("FINETAIL_DEVICE", "auto"), help="auto, cpu, cuda, cuda:1...")
    p.add_argument("--progress", action="store_true", help="show a progress bar instead of a line per epoch")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (one per GPU) training together under torchrun with DDP; the global batch is the recipe's")


def train_argv(a: argparse.Namespace) -> list[str]:
    """``a`` as ``train`` arguments again, without ``--nproc`` (for the ``torchrun`` relaunch)."""
    p = argparse.ArgumentParser()
    add_train_args(p)
    out = ["train"]
    for act in p._actions:
        if not act.option_strings or act.dest in ("help", "nproc"):
            continue
        value = getattr(a, act.dest)
        if isinstance(act, argparse._StoreTrueAction):
            out += [act.option_strings[0]] if value else []
        elif value is not None:
            out += [act.option_strings[0], str(value)]
    return out


def launch(a: argparse.Namespace) -> None:
    """``finetail train``: run the job here, or (``--nproc`` N > 1) become ``torchrun`` with N
    processes that each run it."""
    from .. import distributed

    if a.nproc > 1 and not distributed.launched():
        # One job, N processes: become torchrun (same pid, so Slurm's and Snakemake's signals
        # reach its agent, which forwards SIGTERM to every rank) and exit with its status.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
               "-m", "finetail.cli", *train_argv(a)]
        _log(f"relaunching under torchrun with {a.nproc} processes")
        sys.stderr.flush()
        os.execv(sys.executable, cmd)
    dev = distributed.init(a.device)
    try:
        run_job(a, dev)
    finally:
        distributed.teardown()


def _per_class_table(res: dict, class_names: list[str], test_labels, shots: dict):
    import numpy as np
    import pandas as pd

    from ..metrics import shot_groups

    counts = res["train_counts"]
    return pd.DataFrame(
        {
            "label": np.arange(len(counts)),
            "class_name": class_names,
            "train_count": counts,
            "test_count": np.bincount(test_labels, minlength=len(counts))[: len(counts)],
            "accuracy": res["metrics"]["per_class_acc"],
            "shot": shot_groups(counts, shots.get("many", 100), shots.get("few", 20)),
        }
    )


def run_job(a: argparse.Namespace, dev) -> None:
    """The body of ``finetail train``: spec -> recipe -> engine -> record -> model file."""
    import numpy as np
    import torch

    from .. import distributed
    from ..engine import Preempted, TrainConfig, job_key_digest, resume_extra, train
    from ..layout import Layout
    from ..manifest import file_sha256, load_array_split, read_manifest, verify_array_stores
    from ..record import RUN_JSON, FileRef, MetricsRecord, RunFile, job_tags, output_tags
    from ..tracking import Tracker, choose_tracking_uri, config_digest, git_commit

    world, rank = distributed.world_size(), distributed.rank()
    log = _log if world == 1 else (lambda msg: _log(f"rank {rank}/{world}: {msg}"))
    torch.set_num_threads(a.threads)
    spec = json.loads(a.spec)
    shots = spec.get("shots", {})
    loss = spec.get("loss", {"type": "softmax"})
    cfg = TrainConfig.from_dict(
        {**spec.get("recipe", {}), "loss": loss["type"], "beta": loss.get("beta", 0.0),
         "gamma": loss.get("gamma", 0.0), "many_shot": shots.get("many", 100), "few_shot": shots.get("few", 20)}
    )
    manifest = Path(a.manifest)
    inputs = {"manifest": str(manifest), "manifest_sha256": file_sha256(manifest)}
    # Array stores (small images) live on the device; file manifests go through the loader.
    mdf = read_manifest(manifest)
    if "store" in mdf.columns:
        load = load_array_split
        # The stores' bytes, checked against the digests the manifest recorded when the
        # dataset was written: a changed pixel stops the job here, and audit re-checks them.
        for i, (store, sha) in enumerate(verify_array_stores(manifest, mdf).items()):
            inputs.update({f"store.{i}": store, f"store.{i}_sha256": sha})
    else:
        from ..loader import load_file_split as load
    tr = load(manifest, "train")
    te = load(manifest, "test")
    num_classes = len(tr.class_names)
    digest = config_digest(spec)
    init_backbone = normalisation = parent_run = None
    if a.init_model:
        init = torch.load(a.init_model, map_location="cpu", weights_only=True)
        init_backbone = init["backbone"]
        normalisation = json.loads(init["normalisation"])
        parent_run = init.get("run_id") or None
        inputs.update(init_model=str(a.init_model), init_model_sha256=file_sha256(a.init_model))

    # The resume key: recipe, both splits' bytes, initial weights, training code.
    # The manifest's sha256 covers every row (store index or file path, label, split) and the
    # per-file digests of a file manifest; the store digests, just verified, cover the pixels
    # of an array manifest. Together they name the bytes both splits are loaded from, so the
    # loaded arrays need no second hash.
    data = config_digest({k: v for k, v in inputs.items()
                          if k == "manifest_sha256" or (k.startswith("store.") and k.endswith("_sha256"))})
    job_key = job_key_digest(cfg, tr.labels, num_classes, inputs.get("init_model_sha256"), data)

    def run_train(on_epoch, extra_state):
        return train(
            cfg, tr.images, tr.labels, te.images, te.labels, num_classes, a.checkpoint,
            init_backbone=init_backbone, init_digest=inputs.get("init_model_sha256"), data_digest=data,
            normalisation=normalisation,
            device=str(dev), on_epoch=on_epoch, log=log, progress=a.progress, extra_state=extra_state,
        )

    if world > 1:
        log(f"training on {dev} with {world} processes, global batch {cfg.batch_size}")
    if not distributed.is_main():  # train alongside rank 0, which tracks and writes every result
        try:
            run_train(None, {})
        except Preempted:
            raise SystemExit(143) from None
        return

    out = Path(a.out_dir)
    # A result of an earlier attempt must not outlive a failed one: the job writes it anew.
    (out / "metrics.json").unlink(missing_ok=True)
    study = Layout.at(a.study_dir)
    uri = choose_tracking_uri(a.tracking_uri, a.config_tracking_uri, study.mlflow_db())
    tracker = Tracker(uri, a.experiment, artifact_root=study.artifacts())  # fails fast if down
    prev = resume_extra(a.checkpoint, cfg, tr.labels, num_classes, inputs.get("init_model_sha256"), data)
    commit, dirty = git_commit(Path(__file__).parent)
    wildcards = json.loads(a.wildcards)
    out_dir = str(Path(a.out_dir).resolve())
    tags = job_tags(a.rule, wildcards, git_commit=commit, git_dirty=dirty, config_digest=digest, job_key=job_key,
                    output_dir=out_dir, world_size=world, inputs=inputs, parent_run=parent_run)
    run_name = a.rule + ":" + "/".join(str(v) for v in wildcards.values())
    # One MLflow run per job, always: continue the checkpoint's run, else the run this job
    # (same key) created before it was killed, else start one and record it before training.
    run_file = Path(a.checkpoint).with_name(RUN_JSON)
    resume_id, why = (prev or {}).get("run_id"), "checkpoint"
    if resume_id is None:
        resume_id, why = _recorded_run(run_file, job_key), "run record"
    if resume_id is None:
        resume_id, why = tracker.find_run(job_key, out_dir), "tracking store"
    run_id = tracker.start(run_name, spec, tags, resume_run_id=resume_id)
    _write_json(RunFile(run_id, job_key, uri).to_json(), run_file)
    if resume_id == run_id:
        where = f" at epoch {prev['epoch'] + 1}" if prev else " (no checkpoint yet: training from the start)"
        log(f"{why} found{where}: continuing MLflow run {run_id}")
    log(f"MLflow run {run_id} at {uri}; {len(tr.labels)} train / {len(te.labels)} test images, {num_classes} classes")

    t0 = time.perf_counter()
    try:
        res = run_train(lambda e, m: tracker.log_metrics(m, step=e), {"run_id": run_id})
    except Preempted:
        tracker.end("KILLED")
        raise SystemExit(143) from None
    except BaseException:
        tracker.end("FAILED")
        raise
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    per_class = _per_class_table(res, tr.class_names, te.labels, shots)
    per_class.to_csv(out / "per_class.csv", index=False)
    hist = [{k: v for k, v in row.items() if k != "eval"} for row in res["history"]]
    import pandas as pd

    pd.DataFrame(hist).to_csv(out / "history.csv", index=False)
    final = {k: v for k, v in res["metrics"].items() if k != "per_class_acc"}
    record = MetricsRecord(**{
        "rule": a.rule,
        "wildcards": wildcards,
        "run_id": run_id,
        "tracking_uri": uri,
        "config": spec,
        "config_digest": digest,
        "inputs": inputs,
        "parent_run_id": parent_run,
        "start_backbone_sha256": res["start_backbone_sha256"],
        "git_commit": commit,
        "num_classes": num_classes,
        "num_train": int(len(tr.labels)),
        "final": final,
        "epochs": res["epochs"],
        "device": res["device"],
        "world_size": res["world_size"],
        "torch": torch.__version__,
        "wall_s": round(wall, 2),
        "mean_images_per_s": float(np.mean([h["images_per_s"] for h in hist])) if hist else None,
    })
    if a.save_model:
        from ..engine import save_state

        save_state(
            {"model": res["model"].state_dict(), "backbone": res["model"].backbone.state_dict(),
             "cfg": json.dumps(spec), "class_names": json.dumps(tr.class_names), "run_id": run_id,
             "normalisation": json.dumps(res["normalisation"])},
            Path(a.save_model),
        )
        record.model_sha256 = file_sha256(a.save_model)
    _write_json(record.to_json(), out / "metrics.json.partial")
    tracker.log_metrics({f"final_{k}": v for k, v in final.items() if isinstance(v, float)}, step=res["epochs"])
    # The bytes of every result file, so audit catches an edited number (metrics.json is
    # renamed into place below, unchanged).
    written = {"metrics.json": out / "metrics.json.partial", "per_class.csv": out / "per_class.csv",
               "history.csv": out / "history.csv"}
    if a.save_model:
        written["model.pt"] = Path(a.save_model)
    tracker.log_tags(output_tags(FileRef(name, str(out / name if name != "model.pt" else path), file_sha256(path))
                                 for name, path in written.items()))
    tracker.log_artifacts([out / "metrics.json.partial", out / "per_class.csv", out / "history.csv"])
    tracker.end("FINISHED")
    os.replace(out / "metrics.json.partial", out / "metrics.json")
    log(f"done: top-1 error {100 * final['top1_error']:.2f}% in {wall:.1f}s -> {out / 'metrics.json'}")


def _recorded_run(run_file: Path, job_key: str) -> str | None:
    """The run id a killed attempt of this very job (same key) recorded before training."""
    from ..record import RunFile

    try:
        rec = RunFile.read(run_file)
    except (OSError, ValueError, TypeError):
        return None
    return rec.run_id if rec.job_key == job_key else None
