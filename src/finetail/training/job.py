"""The training job: what ``finetail train`` does once its arguments are parsed.

Spec -> recipe -> engine -> run record -> model file, in three steps: :func:`_load` (the
recipe, both splits, the initial weights, the resume key), :func:`_open_run` (the one MLflow
run of this job: continued or started, recorded in ``run.json`` before training) and
:func:`_write_results` (``per_class.csv``, ``history.csv``, ``model.pt``, then ``metrics.json``
last, with every file's sha256 in the run). Rank 0 tracks the job and writes every result;
other ranks (under torchrun) train alongside it. Rank 0's tracker lives in a child process
forked before torch is imported (:class:`~finetail.tracking.TrackerProcess`), so MLflow's
start-up overlaps torch's instead of following it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fileio import disk_full_is_one_line, file_sha256, log, write_json

__all__ = ["add_run_args", "add_train_args", "holdout_of", "launch", "load_splits", "per_class_table", "run_job", "run_name",
           "split_subset", "tracking_uri", "train_argv"]


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="manifest with train and test splits")
    p.add_argument("--spec", required=True, help='JSON: {"recipe": {...}, "loss": {...}, "shots": {...}}')
    p.add_argument("--out-dir", required=True, help="writes metrics.json, per_class.csv, history.csv")
    p.add_argument("--checkpoint", required=True, help="resume point, rewritten after every epoch")
    add_run_args(p, rule="manual")
    p.add_argument("--save-model", default=None, help="also write the final weights here")
    p.add_argument("--init-model", default=None, help="start the backbone from this model.pt (fine-tuning); new head")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default=os.environ.get("FINETAIL_DEVICE", "auto"), help="auto, cpu, cuda, cuda:1...")
    p.add_argument("--progress", action="store_true", help="show a progress bar instead of a line per epoch")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (one per GPU) training together under torchrun with DDP; the global batch is the recipe's")


def add_run_args(p: argparse.ArgumentParser, rule: str) -> None:
    """The options that place a job's one MLflow run (``finetail train`` and ``finetail posthoc``)."""
    p.add_argument("--study-dir", required=True, help="results/<study>: holds the default MLflow store")
    p.add_argument("--rule", default=rule, help="Snakemake rule name, for the run's tags")
    p.add_argument("--wildcards", default="{}", help="JSON of the job's wildcards, for the run's tags")
    p.add_argument("--experiment", default="finetail", help="MLflow experiment name")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow URI, overriding everything else (then MLFLOW_TRACKING_URI, then "
                        "--config-tracking-uri, then <study-dir>/mlflow.db)")
    p.add_argument("--config-tracking-uri", default=None,
                   help="the study config's tracking.uri (the rules pass it here); MLFLOW_TRACKING_URI wins over it")


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
    if a.nproc > 1 and not _under_torchrun():
        # One job, N processes: become torchrun (same pid, so Slurm's and Snakemake's signals
        # reach its agent, which forwards SIGTERM to every rank) and exit with its status.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
               "-m", "finetail.cli", *train_argv(a)]
        log(f"relaunching under torchrun with {a.nproc} processes")
        sys.stderr.flush()
        os.execv(sys.executable, cmd)
    # Rank 0 tracks the job. Its tracker is forked now, before anything imports torch: MLflow's
    # import, the server check and the experiment happen in the child, on another core, while
    # this process imports torch and loads the data (finetail.distributed imports torch).
    tracker = _start_tracker(a) if _tracks() else None
    try:
        from .. import distributed

        # A full device is one line naming the folder (the result folder, the checkpoint's or
        # the study's, whichever has the least room when the failed write named no file).
        with disk_full_is_one_line([a.out_dir, Path(a.checkpoint).parent, a.study_dir]):
            dev = distributed.init(a.device)
            try:
                run_job(a, dev, tracker)
            finally:
                distributed.teardown()
    finally:
        if tracker is not None:
            tracker.close()


def _under_torchrun() -> bool:
    """As ``distributed.launched()``, from the environment alone (that module imports torch)."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def _tracks() -> bool:
    """Whether this process tracks the job: rank 0 of ``torchrun`` (``RANK``), or a process on its own."""
    return os.environ.get("RANK", "0") == "0"


def tracking_uri(a: argparse.Namespace) -> str:
    """The job's tracking store: the flag, ``MLFLOW_TRACKING_URI``, the config's, else the study's SQLite file."""
    from ..layout import Layout
    from ..tracking import choose_tracking_uri

    return choose_tracking_uri(a.tracking_uri, a.config_tracking_uri, Layout.at(a.study_dir).mlflow_db())


def _start_tracker(a: argparse.Namespace):
    """The job's :class:`~finetail.tracking.TrackerProcess`, building its Tracker from now on."""
    from ..layout import Layout
    from ..tracking import TrackerProcess

    return TrackerProcess(tracking_uri(a), a.experiment, artifact_root=Layout.at(a.study_dir).artifacts())


@dataclass
class _Job:
    """What one training job trains on and is keyed by (the same on every rank)."""

    spec: dict  # {"recipe", "loss", "shots"} as the rule passed it
    cfg: Any  # recipe.TrainConfig
    inputs: dict[str, str]  # flat: name -> path, name_sha256 -> digest (manifest, store.N, init_model)
    train: Any  # the training split (array split or loader.ImageFiles split)
    test: Any
    num_classes: int
    init_backbone: dict | None  # fine-tuning: the pretrained backbone's state_dict
    normalisation: dict | None  # fine-tuning: the pretrained model's
    parent_run: str | None  # the run that wrote the init model
    data: str  # digest of both splits' bytes (manifest + verified stores)
    job_key: str  # the resume key's digest
    plugin: dict | None = None  # a plugin loss's record (finetail.plugins.Plugin.info)

    @property
    def init_digest(self) -> str | None:
        return self.inputs.get("init_model_sha256")


def run_name(rule: str, wildcards: dict) -> str:
    """The MLflow run name: the rule and its wildcards in the result folder's order, the seed
    as ``seed<S>`` (``pretrain:generic/seed0``); wildcards the rule's pattern lacks follow.

    >>> run_name("finetune", {"seed": "1", "source": "natural", "target": "cub200"})
    'finetune:natural/cub200/seed1'
    """
    from ..layout import TRAINING

    order = [n for n in re.findall(r"\{(\w+)\}", TRAINING.get(rule, "")) if n in wildcards]
    order += [k for k in wildcards if k not in order]
    return rule + ":" + "/".join(f"seed{wildcards[k]}" if k == "seed" else str(wildcards[k]) for k in order)


def _load(a: argparse.Namespace) -> _Job:
    """Recipe, splits, initial weights and resume key of the job ``a`` describes. Array stores
    are checked against the digests their manifest recorded before anything is trained."""
    import torch

    from ..tracking import config_digest
    from .checkpoint import job_key_digest
    from .recipe import TrainConfig

    spec = json.loads(a.spec)
    cfg = TrainConfig.from_spec(spec)
    plugin = None
    if cfg.loss == "plugin":
        spec, cfg, plugin = _plugin_loss(spec, cfg)
    tr, te, inputs = load_splits(Path(a.manifest))
    if cfg.holdout > 0:  # the held-out slice (for a post-hoc tau) is not trained on
        tr = split_subset(tr, ~holdout_of(tr.labels, cfg))
    init_backbone = normalisation = parent_run = None
    if a.init_model:
        init = torch.load(a.init_model, map_location="cpu", weights_only=True)
        init_backbone, normalisation = init["backbone"], json.loads(init["normalisation"])
        parent_run = init.get("run_id") or None
        inputs.update(init_model=str(a.init_model), init_model_sha256=file_sha256(a.init_model))
    # The resume key: recipe, both splits' bytes, initial weights, training code. The
    # manifest's sha256 covers every row (store index or file path, label, split) and the
    # per-file digests of a file manifest; the store digests, just verified, cover the pixels
    # of an array manifest. Together they name the bytes both splits are loaded from, so the
    # loaded arrays need no second hash.
    data = config_digest({k: v for k, v in inputs.items()
                          if k == "manifest_sha256" or (k.startswith("store.") and k.endswith("_sha256"))})
    num_classes = len(tr.class_names)
    key = job_key_digest(cfg, tr.labels, num_classes, inputs.get("init_model_sha256"), data)
    return _Job(spec, cfg, inputs, tr, te, num_classes, init_backbone, normalisation, parent_run, data, key, plugin)


def _plugin_loss(spec: dict, cfg):
    """A plugin loss, loaded and checked before any data is read (:mod:`finetail.plugins`: it
    imports, its callable exists, the study's params fit its signature). The head it asks for
    joins the spec (``loss.head``), so the model.pt's readers (post-hoc jobs) build the same
    network. Returns the spec, its recipe and the plugin's record."""
    from ..plugins import check_signature, load
    from .recipe import TrainConfig

    plugin = load("loss", cfg.plugin)
    check_signature(plugin, cfg.plugin_params or {})
    if plugin.head != cfg.plugin_head:
        spec = {**spec, "loss": {**spec["loss"], "head": plugin.head}}
        cfg = TrainConfig.from_spec(spec)
    return spec, cfg, plugin.info()


def load_splits(manifest: Path) -> tuple[Any, Any, dict[str, str]]:
    """Both splits of a manifest and the flat inputs that name their bytes (the manifest and,
    for array stores, each store with its sha256). Array stores are checked against the
    digests their manifest recorded: a changed pixel stops the job here, and audit re-checks
    them. File manifests go through the loader."""
    from ..manifest import load_array_split, read_manifest, verify_array_stores

    inputs = {"manifest": str(manifest), "manifest_sha256": file_sha256(manifest)}
    mdf = read_manifest(manifest)
    if "store" in mdf.columns:  # array stores (small images) live on the device
        load = load_array_split
        for i, (store, sha) in enumerate(verify_array_stores(manifest, mdf).items()):
            inputs.update({f"store.{i}": store, f"store.{i}_sha256": sha})
    else:
        from ..loader import load_file_split as load
    return load(manifest, "train"), load(manifest, "test"), inputs


def holdout_of(train_labels, cfg):
    """The recipe's held-out slice of a training split's labels (bool, True = held out):
    :func:`~.sampling.holdout_mask` with the recipe's ``holdout`` and ``seed``."""
    from .sampling import holdout_mask

    return holdout_mask(train_labels, cfg.holdout, cfg.seed)


def split_subset(split, keep):
    """The rows ``keep`` (bool mask) of an array split (``manifest.ArraySplit``) or a file split
    (``loader.FileSplit``), in order."""
    import dataclasses

    import numpy as np

    keep = np.asarray(keep, dtype=bool)
    if isinstance(split.images, np.ndarray):
        images = split.images[keep]
    else:
        images = dataclasses.replace(split.images, paths=[p for p, k in zip(split.images.paths, keep, strict=True) if k])
    return dataclasses.replace(split, images=images, labels=split.labels[keep])


def _train(a: argparse.Namespace, job: _Job, dev, say, on_epoch=None, extra_state=None):
    from .loop import train

    return train(
        job.cfg, job.train.images, job.train.labels, job.test.images, job.test.labels, job.num_classes, a.checkpoint,
        init_backbone=job.init_backbone, init_digest=job.init_digest, data_digest=job.data,
        normalisation=job.normalisation, device=str(dev), on_epoch=on_epoch, log=say, progress=a.progress,
        extra_state=extra_state or {},
    )


@dataclass
class _Run:
    """The job's MLflow run, open."""

    tracker: Any  # tracking.TrackerProcess
    run_id: str
    uri: str
    git_commit: str
    wildcards: dict


def _open_run(a: argparse.Namespace, job: _Job, say, tracker, dev) -> _Run:
    """The one MLflow run of this job, through ``tracker`` (the job's TrackerProcess): the
    checkpoint's run, else the run this job (same key) recorded in ``run.json`` before it was
    killed, else the store's run with this job's key and output folder, else a new one;
    recorded in ``run.json`` before training. ``dev``: the job's device (for the precision tag)."""
    from .. import distributed
    from ..record import RUN_JSON, RunFile, job_tags
    from ..tracking import config_digest, git_commit
    from .checkpoint import resume_extra
    from .recipe import precision

    uri = tracking_uri(a)
    tracker.ready()  # fails fast, before training, if the server is down
    prev = resume_extra(a.checkpoint, job.cfg, job.train.labels, job.num_classes, job.init_digest, job.data)
    commit, dirty = git_commit(Path(__file__).parent)
    wildcards = json.loads(a.wildcards)
    out_dir = str(Path(a.out_dir).resolve())
    tags = job_tags(a.rule, wildcards, git_commit=commit, git_dirty=dirty, config_digest=config_digest(job.spec),
                    job_key=job.job_key, output_dir=out_dir, world_size=distributed.world_size(),
                    inputs=job.inputs, parent_run=job.parent_run, precision=precision(job.cfg, dev.type),
                    plugin=job.plugin)
    run_file = Path(a.checkpoint).with_name(RUN_JSON)
    resume_id, why = (prev or {}).get("run_id"), "checkpoint"
    if resume_id is None:
        resume_id, why = _recorded_run(run_file, job.job_key), "run record"
    if resume_id is None:
        resume_id, why = tracker.find_run(job.job_key, out_dir), "tracking store"
    run_id = tracker.start(run_name(a.rule, wildcards), job.spec, tags, resume_run_id=resume_id)
    write_json(RunFile(run_id, job.job_key, uri).to_json(), run_file)
    if resume_id == run_id:
        where = f" at epoch {prev['epoch'] + 1}" if prev else " (no checkpoint yet: training from the start)"
        say(f"{why} found{where}: continuing MLflow run {run_id}")
    say(f"MLflow run {run_id} at {uri}; {len(job.train.labels)} train / {len(job.test.labels)} test images, "
        f"{job.num_classes} classes")
    return _Run(tracker, run_id, uri, commit, wildcards)


def per_class_table(counts, per_class_acc: list, class_names: list[str], test_labels, shots: dict):
    """``per_class.csv``: label, class name, training and test images, test accuracy and shot
    group of every class (``counts``: the training images each class was trained on)."""
    import numpy as np
    import pandas as pd

    from ..metrics import shot_groups
    from .recipe import FEW_SHOT, MANY_SHOT

    return pd.DataFrame(
        {
            "label": np.arange(len(counts)),
            "class_name": class_names,
            "train_count": counts,
            "test_count": np.bincount(test_labels, minlength=len(counts))[: len(counts)],
            "accuracy": per_class_acc,
            "shot": shot_groups(counts, shots.get("many", MANY_SHOT), shots.get("few", FEW_SHOT)),
        }
    )


def _write_results(a: argparse.Namespace, job: _Job, run: _Run, res, wall: float) -> dict:
    """per_class.csv, history.csv (and model.pt), then metrics.json, renamed into place last,
    after the run holds every file's sha256 and the final metrics. Returns the final metrics."""
    import numpy as np
    import pandas as pd
    import torch

    from ..record import METRICS_JSON, FileRef, MetricsRecord, final_metrics, output_tags
    from ..tracking import config_digest
    from .checkpoint import save_state

    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_class_table(res.train_counts, res.metrics["per_class_acc"], job.train.class_names, job.test.labels,
                    job.spec.get("shots", {})).to_csv(out / "per_class.csv", index=False)
    hist = [{k: v for k, v in row.items() if k != "eval"} for row in res.history]
    pd.DataFrame(hist).to_csv(out / "history.csv", index=False)
    final = {k: v for k, v in res.metrics.items() if k != "per_class_acc"}
    record = MetricsRecord(
        rule=a.rule, wildcards=run.wildcards, run_id=run.run_id, tracking_uri=run.uri, config=job.spec,
        config_digest=config_digest(job.spec), inputs=job.inputs, parent_run_id=job.parent_run,
        start_backbone_sha256=res.start_backbone_sha256, git_commit=run.git_commit, num_classes=job.num_classes,
        num_train=int(len(job.train.labels)), final=final, epochs=res.epochs, device=res.device,
        precision=res.precision,
        world_size=res.world_size, torch=torch.__version__, wall_s=round(wall, 2),
        mean_images_per_s=float(np.mean([h["images_per_s"] for h in hist])) if hist else None,
        extra={"plugin": job.plugin} if job.plugin else {},
    )
    partial = out / (METRICS_JSON + ".partial")
    written = {METRICS_JSON: partial, "per_class.csv": out / "per_class.csv", "history.csv": out / "history.csv"}
    if a.save_model:
        save_state(
            {"model": res.model.state_dict(), "backbone": res.model.backbone.state_dict(),
             "cfg": json.dumps(job.spec), "class_names": json.dumps(job.train.class_names), "run_id": run.run_id,
             "normalisation": json.dumps(res.normalisation)},
            Path(a.save_model),
        )
        record.model_sha256 = file_sha256(a.save_model)
        written["model.pt"] = Path(a.save_model)
    write_json(record.to_json(), partial)
    run.tracker.log_metrics(final_metrics(final), step=res.epochs)
    # The bytes of every result file, so audit catches an edited number (metrics.json is
    # renamed into place below, unchanged).
    run.tracker.log_tags(output_tags(FileRef(name, str(out / name if name != "model.pt" else path), file_sha256(path))
                                     for name, path in written.items()))
    run.tracker.log_artifacts([partial, out / "per_class.csv", out / "history.csv"])
    run.tracker.end("FINISHED")
    os.replace(partial, out / METRICS_JSON)
    return final


def run_job(a: argparse.Namespace, dev, tracker) -> None:
    """The body of ``finetail train``: spec -> recipe -> engine -> record -> model file.
    ``tracker``: rank 0's :class:`~finetail.tracking.TrackerProcess` (None on other ranks)."""
    import torch

    from .. import distributed
    from ..record import METRICS_JSON
    from .loop import Preempted

    world, rank = distributed.world_size(), distributed.rank()
    say = log if world == 1 else (lambda msg: log(f"rank {rank}/{world}: {msg}"))
    torch.set_num_threads(a.threads)
    job = _load(a)
    if world > 1:
        say(f"training on {dev} with {world} processes, global batch {job.cfg.batch_size}")
    if not distributed.is_main():  # train alongside rank 0, which tracks and writes every result
        try:
            _train(a, job, dev, say)
        except Preempted:
            raise SystemExit(143) from None
        return
    # A result of an earlier attempt must not outlive a failed one: the job writes it anew.
    (Path(a.out_dir) / METRICS_JSON).unlink(missing_ok=True)
    run = _open_run(a, job, say, tracker, dev)
    t0 = time.perf_counter()
    try:
        res = _train(a, job, dev, say, lambda e, m: run.tracker.log_metrics(m, step=e), {"run_id": run.run_id})
    except Preempted:
        run.tracker.end("KILLED")
        raise SystemExit(143) from None
    except BaseException:
        from ..errors import DiskFull

        # On a full device marking the run FAILED fails too: the error that stopped the job
        # is the one to report (the rerun continues this run and finishes it).
        with contextlib.suppress(DiskFull):
            run.tracker.end("FAILED")
        raise
    wall = time.perf_counter() - t0
    final = _write_results(a, job, run, res, wall)
    say(f"done: top-1 error {100 * final['top1_error']:.2f}% in {wall:.1f}s -> {Path(a.out_dir) / METRICS_JSON}")


def _recorded_run(run_file: Path, job_key: str) -> str | None:
    """The run id a killed attempt of this very job (same key) recorded before training."""
    from ..record import RunFile

    try:
        rec = RunFile.read(run_file)
    except (OSError, ValueError, TypeError):
        return None
    return rec.run_id if rec.job_key == job_key else None
