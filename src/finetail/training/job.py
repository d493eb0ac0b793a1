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

__all__ = ["run_job"]


def _log(msg: str) -> None:
    print(f"[finetail {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _write_json(obj: dict, path: Path) -> None:
    from ..manifest import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def _per_class_table(res, class_names: list[str], test_labels, shots: dict):
    import numpy as np
    import pandas as pd

    from ..metrics import FEW_SHOT, MANY_SHOT, shot_groups

    counts = res.train_counts
    return pd.DataFrame(
        {
            "label": np.arange(len(counts)),
            "class_name": class_names,
            "train_count": counts,
            "test_count": np.bincount(test_labels, minlength=len(counts))[: len(counts)],
            "accuracy": res.metrics["per_class_acc"],
            "shot": shot_groups(counts, shots.get("many", MANY_SHOT), shots.get("few", FEW_SHOT)),
        }
    )


def run_job(a: argparse.Namespace, dev) -> None:
    """The body of ``finetail train``: spec -> recipe -> engine -> record -> model file."""
    import numpy as np
    import torch

    from .. import distributed
    from ..manifest import file_sha256, load_array_split, read_manifest, verify_array_stores
    from ..tracking import Tracker, config_digest, git_commit, resolve_tracking_uri
    from .checkpoint import job_key_digest, resume_extra
    from .loop import Preempted, train
    from .recipe import FEW_SHOT, MANY_SHOT, TrainConfig

    world, rank = distributed.world_size(), distributed.rank()
    log = _log if world == 1 else (lambda msg: _log(f"rank {rank}/{world}: {msg}"))
    torch.set_num_threads(a.threads)
    spec = json.loads(a.spec)
    shots = spec.get("shots", {})
    loss = spec.get("loss", {"type": "softmax"})
    cfg = TrainConfig.from_dict(
        {**spec.get("recipe", {}), "loss": loss["type"], "beta": loss.get("beta", 0.0),
         "gamma": loss.get("gamma", 0.0), "many_shot": shots.get("many", MANY_SHOT), "few_shot": shots.get("few", FEW_SHOT)}
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
    uri = resolve_tracking_uri(a.tracking_uri, Path(a.study_dir) / "mlflow.db")
    tracker = Tracker(uri, a.experiment, artifact_root=Path(a.study_dir) / "mlartifacts")  # fails fast if down
    prev = resume_extra(a.checkpoint, cfg, tr.labels, num_classes, inputs.get("init_model_sha256"), data)
    commit, dirty = git_commit(Path(__file__).parent)
    wildcards = json.loads(a.wildcards)
    tags = {
        "finetail.rule": a.rule,
        **{f"finetail.wildcard.{k}": str(v) for k, v in wildcards.items()},
        "mlflow.source.git.commit": commit,
        "finetail.git_dirty": str(dirty).lower(),
        "finetail.config_digest": digest,
        "finetail.job_key": job_key,
        "finetail.output_dir": str(Path(a.out_dir).resolve()),
        "finetail.world_size": str(world),
    }
    for name, value in inputs.items():
        if not name.endswith("_sha256"):
            tags[f"finetail.input.{name}"] = value
            tags[f"finetail.input.{name}.sha256"] = inputs[f"{name}_sha256"]
    if parent_run:
        tags["mlflow.parentRunId"] = parent_run
        tags["finetail.parent_runs"] = parent_run
    run_name = a.rule + ":" + "/".join(str(v) for v in wildcards.values())
    # One MLflow run per job, always: continue the checkpoint's run, else the run this job
    # (same key) created before it was killed, else start one and record it before training.
    run_file = Path(a.checkpoint).with_name("run.json")
    resume_id, why = (prev or {}).get("run_id"), "checkpoint"
    if resume_id is None:
        resume_id, why = _recorded_run(run_file, job_key), "run record"
    if resume_id is None:
        resume_id, why = tracker.find_run(job_key, tags["finetail.output_dir"]), "tracking store"
    run_id = tracker.start(run_name, spec, tags, resume_run_id=resume_id)
    _write_json({"run_id": run_id, "job_key": job_key, "tracking_uri": uri}, run_file)
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
    hist = [{k: v for k, v in row.items() if k != "eval"} for row in res.history]
    import pandas as pd

    pd.DataFrame(hist).to_csv(out / "history.csv", index=False)
    final = {k: v for k, v in res.metrics.items() if k != "per_class_acc"}
    record = {
        "rule": a.rule,
        "wildcards": wildcards,
        "run_id": run_id,
        "tracking_uri": uri,
        "config": spec,
        "config_digest": digest,
        "inputs": inputs,
        "parent_run_id": parent_run,
        "start_backbone_sha256": res.start_backbone_sha256,
        "git_commit": commit,
        "num_classes": num_classes,
        "num_train": int(len(tr.labels)),
        "final": final,
        "epochs": res.epochs,
        "device": res.device,
        "world_size": res.world_size,
        "torch": torch.__version__,
        "wall_s": round(wall, 2),
        "mean_images_per_s": float(np.mean([h["images_per_s"] for h in hist])) if hist else None,
    }
    if a.save_model:
        from .checkpoint import save_state

        save_state(
            {"model": res.model.state_dict(), "backbone": res.model.backbone.state_dict(),
             "cfg": json.dumps(spec), "class_names": json.dumps(tr.class_names), "run_id": run_id,
             "normalisation": json.dumps(res.normalisation)},
            Path(a.save_model),
        )
        record["model_sha256"] = file_sha256(a.save_model)
    _write_json(record, out / "metrics.json.partial")
    tracker.log_metrics({f"final_{k}": v for k, v in final.items() if isinstance(v, float)}, step=res.epochs)
    # The bytes of every result file, so audit catches an edited number (metrics.json is
    # renamed into place below, unchanged).
    written = {"metrics.json": out / "metrics.json.partial", "per_class.csv": out / "per_class.csv",
               "history.csv": out / "history.csv"}
    if a.save_model:
        written["model.pt"] = Path(a.save_model)
    out_tags = {}
    for name, path in written.items():
        final_path = out / name if name != "model.pt" else path
        out_tags[f"finetail.output.{name}"] = str(final_path)
        out_tags[f"finetail.output.{name}.sha256"] = file_sha256(path)
    tracker.set_tags(out_tags)
    tracker.log_artifacts([out / "metrics.json.partial", out / "per_class.csv", out / "history.csv"])
    tracker.end("FINISHED")
    os.replace(out / "metrics.json.partial", out / "metrics.json")
    log(f"done: top-1 error {100 * final['top1_error']:.2f}% in {wall:.1f}s -> {out / 'metrics.json'}")


def _recorded_run(run_file: Path, job_key: str) -> str | None:
    """The run id a killed attempt of this very job (same key) recorded before training."""
    try:
        rec = json.loads(run_file.read_text())
    except (OSError, ValueError):
        return None
    return rec.get("run_id") if rec.get("job_key") == job_key else None
