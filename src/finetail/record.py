"""The run record: what a training job writes about itself, in one typed definition.

A training job (:mod:`finetail.training.job`) leaves three records of itself:

- an MLflow run whose **tags** name the job (rule, wildcards, output folder, resume key),
  its code and config (git commit, config digest), its input and output files with their
  sha256, and its parent runs; its **params** are the job's spec, flattened;
- ``metrics.json`` in its output folder: :class:`MetricsRecord`;
- ``run.json`` beside its checkpoint, written before training: :class:`RunFile`.

This module is the one place that spells those names. The job writes through it; lineage,
audit and the report read through it. It imports only the standard library (no torch, no
mlflow).

Tags, at a glance::

    finetail.rule                      training rule (cbloss, pretrain, finetune, ...)
    finetail.wildcard.<name>           one per wildcard of the job
    finetail.input.<name>              an input file's path as given to the job
    finetail.input.<name>.sha256       ... and its digest when the job read it
    finetail.output.<name>             a result file's path (metrics.json, model.pt, ...)
    finetail.output.<name>.sha256      ... and its digest when the job wrote it
    finetail.output_dir                the job's output folder (absolute)
    finetail.job_key                   the resume key (recipe, data, init weights, code)
    finetail.config_digest             sha256 of the job's spec (canonical JSON)
    finetail.config_json               the spec itself (first 5000 characters)
    finetail.git_dirty                 "true" / "false"
    finetail.world_size                processes that trained together
    finetail.precision                 "bf16" (autocast on CUDA) or "fp32": what the job computes in
    finetail.parent_runs               comma-separated run ids (fine-tune -> pretrain)
    finetail.resumed                   "true" on a run that a rerun continued
    finetail.plugin.<field>            a plugin's kind, ref, distribution, version, digest (finetail.plugins)
    mlflow.parentRunId                 the first parent run
    mlflow.source.git.commit           the commit the job ran
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .fileio import read_json

__all__ = [
    "CONFIG_DIGEST",
    "CONFIG_JSON",
    "GIT_COMMIT",
    "GIT_DIRTY",
    "INPUT",
    "JOB_KEY",
    "METRICS_JSON",
    "MLFLOW_PARENT",
    "OUTPUT",
    "OUTPUT_DIR",
    "PARENT_RUNS",
    "PLUGIN",
    "PRECISION",
    "RESUMED",
    "RULE",
    "RUN_JSON",
    "WORLD_SIZE",
    "FileRef",
    "MetricsRecord",
    "RunFile",
    "file_tag",
    "final_metric",
    "final_metrics",
    "final_of",
    "flat_inputs",
    "flatten",
    "input_files",
    "job_params",
    "job_tags",
    "output_tags",
    "parent_runs",
    "plugin_tags",
    "sha_tag",
    "tagged_files",
    "wildcard_tag",
    "wildcards_of",
]

PREFIX = "finetail."
RULE = "finetail.rule"
OUTPUT_DIR = "finetail.output_dir"
JOB_KEY = "finetail.job_key"
CONFIG_DIGEST = "finetail.config_digest"
CONFIG_JSON = "finetail.config_json"
GIT_DIRTY = "finetail.git_dirty"
WORLD_SIZE = "finetail.world_size"
PRECISION = "finetail.precision"
PARENT_RUNS = "finetail.parent_runs"
RESUMED = "finetail.resumed"
PLUGIN = "finetail.plugin."
MLFLOW_PARENT = "mlflow.parentRunId"
GIT_COMMIT = "mlflow.source.git.commit"
_WILDCARD = "finetail.wildcard."
INPUT, OUTPUT = "input", "output"
_SHA = ".sha256"
_FLAT_SHA = "_sha256"  # metrics.json's flat inputs: {"manifest": path, "manifest_sha256": digest}

METRICS_JSON = "metrics.json"
RUN_JSON = "run.json"
CONFIG_JSON_MAX = 5000  # characters of the spec kept in the finetail.config_json tag
PARAM_MAX = 6000  # characters of one param value


# --------------------------------------------------------------------------- tag names
def wildcard_tag(name: str) -> str:
    """``finetail.wildcard.<name>``."""
    return f"{_WILDCARD}{name}"


def file_tag(kind: str, name: str) -> str:
    """``finetail.<kind>.<name>``: the path of a job's input or output file (``kind``:
    :data:`INPUT` or :data:`OUTPUT`)."""
    if kind not in (INPUT, OUTPUT):
        raise ValueError(f"file tags are {INPUT!r} or {OUTPUT!r}, not {kind!r}")
    return f"{PREFIX}{kind}.{name}"


def sha_tag(kind: str, name: str) -> str:
    """``finetail.<kind>.<name>.sha256``: the digest of that file."""
    return file_tag(kind, name) + _SHA


class FileRef(NamedTuple):
    """One file a run names: ``name`` (its role: manifest, store.0, init_model, model.pt, ...),
    ``path`` as recorded and ``sha256`` as recorded (None when not recorded)."""

    name: str
    path: str
    sha256: str | None


# --------------------------------------------------------------------------- inputs
def input_files(flat: Mapping[str, str | None]) -> list[FileRef]:
    """The files of a flat inputs mapping (``{"manifest": p, "manifest_sha256": d, ...}``, as
    the job keeps them and metrics.json records them), in the mapping's order."""
    return [FileRef(k, v, flat.get(k + _FLAT_SHA)) for k, v in flat.items() if not k.endswith(_FLAT_SHA)]


def flat_inputs(files: Iterable[FileRef]) -> dict[str, str | None]:
    """The inverse of :func:`input_files`."""
    out: dict[str, str | None] = {}
    for f in files:
        out[f.name] = f.path
        out[f.name + _FLAT_SHA] = f.sha256
    return out


# --------------------------------------------------------------------------- writing tags and params
def job_tags(rule: str, wildcards: Mapping[str, Any], *, git_commit: str, git_dirty: bool, config_digest: str,
             job_key: str, output_dir: str | os.PathLike, world_size: int, inputs: Mapping[str, str | None],
             parent_run: str | None = None, precision: str | None = None,
             plugin: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The tags a training job starts its run with.

    Parameters
    ----------
    rule, wildcards : the Snakemake rule and the job's wildcards.
    git_commit, git_dirty : the code the job ran (:func:`finetail.tracking.git_commit`).
    config_digest : sha256 of the job's spec.
    job_key : the resume key.
    output_dir : the job's output folder (recorded as given; pass it resolved).
    world_size : processes training together.
    inputs : flat inputs (see :func:`input_files`).
    parent_run : the run that made the init model, if any.
    precision : ``"bf16"`` or ``"fp32"`` (:func:`finetail.training.recipe.precision`), if known.
    plugin : the plugin the job runs (:meth:`finetail.plugins.Plugin.info`), if any.
    """
    tags = {
        RULE: rule,
        **{wildcard_tag(k): str(v) for k, v in wildcards.items()},
        GIT_COMMIT: git_commit,
        GIT_DIRTY: str(bool(git_dirty)).lower(),
        CONFIG_DIGEST: config_digest,
        JOB_KEY: job_key,
        OUTPUT_DIR: os.fspath(output_dir),
        WORLD_SIZE: str(world_size),
    }
    for f in input_files(inputs):
        tags[file_tag(INPUT, f.name)] = f.path
        tags[sha_tag(INPUT, f.name)] = f.sha256
    if precision:
        tags[PRECISION] = precision
    if parent_run:
        tags[MLFLOW_PARENT] = parent_run
        tags[PARENT_RUNS] = parent_run
    if plugin:
        tags.update(plugin_tags(plugin))
    return tags


def plugin_tags(plugin: Mapping[str, Any]) -> dict[str, str]:
    """``finetail.plugin.<field>`` for a plugin's kind, ref, module, callable, entry point,
    distribution, version and digest (fields it lacks are left out; its files are in
    ``metrics.json``)."""
    keys = ("kind", "ref", "module", "callable", "entry_point", "distribution", "version", "digest")
    return {f"{PLUGIN}{k}": str(plugin[k]) for k in keys if plugin.get(k)}


def output_tags(files: Iterable[FileRef]) -> dict[str, str]:
    """The tags naming a job's result files and their digests."""
    tags: dict[str, str] = {}
    for f in files:
        tags[file_tag(OUTPUT, f.name)] = str(f.path)
        tags[sha_tag(OUTPUT, f.name)] = f.sha256
    return tags


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Flatten nested config into MLflow params: ``{"recipe": {"lr": 0.1}} -> {"recipe.lr": "0.1"}``."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple | bool) or v is None else str(v)
    return out


def job_params(spec: Mapping) -> tuple[dict[str, str], dict[str, str]]:
    """A job's spec as MLflow ``(params, tags)``: the flattened spec (each value cut to
    :data:`PARAM_MAX` characters, sorted by name) and the :data:`CONFIG_JSON` tag."""
    params = {k: v[:PARAM_MAX] for k, v in sorted(flatten(spec).items())}
    return params, {CONFIG_JSON: json.dumps(spec)[:CONFIG_JSON_MAX]}


_FINAL = "final_"


def final_metric(name: str) -> str:
    """The MLflow metric a final number is logged as: ``final_<name>``."""
    return f"{_FINAL}{name}"


def final_metrics(final: Mapping[str, Any]) -> dict[str, float]:
    """A job's final numbers as the MLflow metrics it logs (floats only)."""
    return {final_metric(k): v for k, v in final.items() if isinstance(v, float)}


def final_of(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's final numbers from its logged metrics (the inverse of :func:`final_metrics`)."""
    return {k[len(_FINAL):]: v for k, v in metrics.items() if k.startswith(_FINAL)}


# --------------------------------------------------------------------------- reading tags
def wildcards_of(tags: Mapping[str, str]) -> dict[str, str]:
    """The job's wildcards from its run's tags (sorted by name: tags keep no order)."""
    return {k[len(_WILDCARD):]: v for k, v in sorted(tags.items()) if k.startswith(_WILDCARD)}


def tagged_files(tags: Mapping[str, str], kind: str) -> list[FileRef]:
    """Each ``finetail.<kind>.<name>`` file a run's tags name that has a digest tag, sorted
    by its digest tag's name (``kind``: :data:`INPUT` or :data:`OUTPUT`)."""
    head = file_tag(kind, "")
    out = []
    for key, sha in sorted(tags.items()):
        if key.startswith(head) and key.endswith(_SHA) and len(key) > len(head) + len(_SHA):
            name = key[len(head):-len(_SHA)]
            path = tags.get(file_tag(kind, name))
            if path:
                out.append(FileRef(name, path, sha))
    return out


def parent_runs(tags: Mapping[str, str]) -> list[str]:
    """Parent run ids a run's tags record (``mlflow.parentRunId``, then
    ``finetail.parent_runs``), without repeats."""
    out: list[str] = []
    for pid in (tags.get(MLFLOW_PARENT), *(tags.get(PARENT_RUNS) or "").split(",")):
        pid = (pid or "").strip()
        if pid and pid not in out:
            out.append(pid)
    return out


# --------------------------------------------------------------------------- files
def _known(cls, data: Mapping[str, Any]) -> tuple[dict, dict]:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


@dataclass
class MetricsRecord:
    """``metrics.json``: one training job's result and what it was made from.

    Every field may be missing from an older file (it then reads as None); keys this class
    does not know are kept in ``extra`` and written back.
    """

    rule: str | None = None
    wildcards: dict[str, str] | None = None
    run_id: str | None = None
    tracking_uri: str | None = None  # the store the run was logged to
    config: dict | None = None  # the job's spec
    config_digest: str | None = None  # sha256 of the spec's canonical JSON
    inputs: dict[str, str | None] = field(default_factory=dict)  # flat: see input_files()
    parent_run_id: str | None = None
    start_backbone_sha256: str | None = None  # the weights training started from
    git_commit: str | None = None
    num_classes: int | None = None
    num_train: int | None = None  # training images
    final: dict[str, Any] | None = None  # final metrics: top1_error, balanced_acc, ece, ...
    epochs: int | None = None
    device: str | None = None
    precision: str | None = None  # "bf16" (autocast on CUDA) or "fp32"
    world_size: int | None = None
    torch: str | None = None  # torch version
    wall_s: float | None = None  # seconds of training
    mean_images_per_s: float | None = None
    model_sha256: str | None = None  # only when the job saved a model
    extra: dict[str, Any] = field(default_factory=dict)

    def input_files(self) -> list[FileRef]:
        """The recorded input files."""
        return input_files(self.inputs or {})

    def to_json(self) -> dict[str, Any]:
        """The record as written (field order; ``model_sha256`` only when set)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if out["model_sha256"] is None:
            del out["model_sha256"]
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MetricsRecord:
        known, extra = _known(cls, data)
        if known.get("inputs") is None:
            known.pop("inputs", None)
        return cls(**known, extra=extra)

    @classmethod
    def read(cls, path: str | os.PathLike) -> MetricsRecord:
        """Read a ``metrics.json``. Raises FileNotFoundError, or ValueError when it is not a
        JSON object."""
        return cls.from_json(read_json(path))


@dataclass
class RunFile:
    """``run.json`` beside a job's checkpoint: the run a job started, written before training,
    so that a rerun of a killed job (same ``job_key``) continues that run."""

    run_id: str
    job_key: str | None = None
    tracking_uri: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunFile:
        known, _ = _known(cls, data)
        if not known.get("run_id"):
            raise ValueError("a run.json names no run_id")
        return cls(**known)

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunFile:
        """Read a ``run.json``. Raises FileNotFoundError, or ValueError when it is not valid."""
        return cls.from_json(read_json(path))
