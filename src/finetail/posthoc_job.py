"""``finetail posthoc``: one post-hoc method on one trained cell, recorded as a run of its own.

Reads the cell's ``model.pt`` (``finetail train --save-model``), its ``metrics.json`` and its
manifest; checks that they belong together (the model's run is the record's run, the model's
and the manifest's sha256 are those the record holds); applies ``tau_norm`` or
``logit_adjust`` (:mod:`finetail.posthoc`) with a given tau or one chosen on the cell's
held-out training images (``--tau auto``; the cell's recipe must have ``holdout`` > 0); and
evaluates on the test split with the training jobs' metrics. It writes, in ``--out-dir``:

- ``per_class.csv`` (as a training job's),
- ``tau.csv`` with ``--tau auto``: every tau of the grid and its held-out balanced accuracy,
- ``metrics.json`` last (a :class:`~finetail.record.MetricsRecord`: ``final`` holds the
  metrics, ``parent_run_id`` the cell's run, ``posthoc`` the method and the tau with how it
  was chosen, ``inputs`` the model, the cell's record, the manifest and stores with sha256),

and logs one MLflow run, a child of the cell's run (``mlflow.parentRunId``), tagged like a
training job's. A rerun of the same job (same inputs, settings and code) continues its run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

from .fileio import disk_full_is_one_line, file_sha256, log, write_json
from .training.job import add_run_args

__all__ = ["add_posthoc_args", "evaluate_cell", "launch", "load_cell", "parse_tau_grid", "posthoc_spec"]


def add_posthoc_args(p: argparse.ArgumentParser) -> None:
    from .training.recipe import POSTHOC_METHODS as METHODS  # torch-free: the parser is built for every command

    p.add_argument("--manifest", required=True, help="the cell's manifest (train and test splits)")
    p.add_argument("--model", required=True, help="the cell's model.pt (finetail train --save-model)")
    p.add_argument("--cell-metrics", required=True, help="the cell's metrics.json (its run id, spec and inputs)")
    p.add_argument("--method", required=True, choices=[*METHODS, "plugin"],
                   help="plugin: your own correction (--plugin, finetail.plugins)")
    p.add_argument("--tau", default=None,
                   help="a number, or 'auto': the grid's best balanced accuracy on the cell's held-out training "
                        "images (recipe holdout > 0); not for --method plugin")
    p.add_argument("--plugin", default=None,
                   help="--method plugin: an entry point of finetail.posthoc or module:callable (found on PYTHONPATH, "
                        "then in FINETAIL_PLUGIN_PATH)")
    p.add_argument("--plugin-params", default="{}", help="--method plugin: JSON of its keyword arguments")
    p.add_argument("--tau-grid", default="0:2:0.1", help="--tau auto: start:stop:step, both ends included")
    p.add_argument("--out-dir", required=True, help="writes metrics.json, per_class.csv (and tau.csv)")
    add_run_args(p, rule="posthoc")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default=os.environ.get("FINETAIL_DEVICE", "auto"), help="auto, cpu, cuda, cuda:1...")


def parse_tau_grid(text: str) -> list[float]:
    """``"start:stop:step"`` as the list of taus it names, both ends included, each rounded to
    10 decimals (so 0.1 steps read 0.3, not 0.30000000000000004).

    >>> parse_tau_grid("0:1:0.25")
    [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"a tau grid is start:stop:step, e.g. 0:2:0.1; got {text!r}") from None
    if not (step > 0 and stop >= start and all(map(math.isfinite, (start, stop, step)))):
        raise ValueError(f"a tau grid needs step > 0 and stop >= start, got {text!r}")
    n = math.floor((stop - start) / step + 1e-9)
    return [round(start + i * step, 10) for i in range(n + 1)]



def posthoc_spec(a: argparse.Namespace) -> dict:
    """The job's settings, as its run's params and its config digest hold them."""
    plugin = getattr(a, "plugin", None)  # (a Namespace built by hand may lack the plugin options)
    if a.method == "plugin":
        if not plugin or a.tau is not None:
            raise ValueError("--method plugin takes --plugin (and --plugin-params), not --tau")
        params = json.loads(getattr(a, "plugin_params", "{}"))
        if not isinstance(params, dict):
            raise ValueError(f"--plugin-params must be a JSON object, got {a.plugin_params!r}")
        return {"method": "plugin", "plugin": plugin, "params": params}
    if plugin:
        raise ValueError(f"--plugin applies to --method plugin, not {a.method}")
    if a.tau is None:
        raise ValueError(f"--method {a.method} needs --tau (a number, or auto)")
    if a.tau == "auto":
        return {"method": a.method, "tau": "auto", "tau_grid": parse_tau_grid(a.tau_grid)}
    try:
        tau = float(a.tau)
    except ValueError:
        raise ValueError(f"--tau must be a number or 'auto', got {a.tau!r}") from None
    return {"method": a.method, "tau": tau}


def launch(a: argparse.Namespace) -> None:
    """``finetail posthoc``. The tracker is forked first, before torch is imported, as
    ``finetail train``'s is."""
    from .layout import Layout
    from .tracking import TrackerProcess
    from .training.job import tracking_uri

    spec = posthoc_spec(a)
    with disk_full_is_one_line([a.out_dir, a.study_dir]), \
            TrackerProcess(tracking_uri(a), a.experiment, artifact_root=Layout.at(a.study_dir).artifacts()) as tracker:
        _run(a, spec, tracker)


def load_cell(a: argparse.Namespace):
    """The cell's record, recipe, model and both splits, after checking that they belong together."""
    import torch

    from .errors import UserError
    from .models import build_model
    from .record import MetricsRecord
    from .training.job import load_splits
    from .training.recipe import TrainConfig

    record = MetricsRecord.read(a.cell_metrics)
    if not record.run_id or record.config is None:
        raise UserError(f"{a.cell_metrics} names no run or spec: not a training job's metrics.json")
    cfg = TrainConfig.from_spec(record.config)
    model_sha = file_sha256(a.model)
    if record.model_sha256 and record.model_sha256 != model_sha:
        raise UserError(f"{a.model} is not the model {a.cell_metrics} recorded (sha256 differs)")
    state = torch.load(a.model, map_location="cpu", weights_only=True)
    if state.get("run_id") and state["run_id"] != record.run_id:
        raise UserError(f"{a.model} was written by run {state['run_id']}, {a.cell_metrics} by run {record.run_id}")
    tr, te, inputs = load_splits(Path(a.manifest))
    if inputs["manifest_sha256"] != (record.inputs or {}).get("manifest_sha256"):
        raise UserError(f"{a.manifest} is not the manifest the cell trained on (sha256 differs from its record's)")
    num_classes = int(state["model"]["head.weight"].shape[0])
    model = build_model(cfg.model, num_classes, cfg.width, None, cfg.shortcut, cfg.init, cfg.head)
    model.load_state_dict(state["model"])
    inputs.update(model=str(a.model), model_sha256=model_sha, cell_metrics=str(a.cell_metrics),
                  cell_metrics_sha256=file_sha256(a.cell_metrics))
    return record, cfg, model, json.loads(state["normalisation"]), tr, te, inputs


def evaluate_cell(a: argparse.Namespace, spec: dict, dev) -> dict:
    """Features once, then the method at the chosen tau: the job's numbers and what they came from."""
    import numpy as np
    import torch

    from .errors import UserError
    from .features import state_digest
    from .posthoc import TauChoice, adjusted_logits, check_method, choose_tau, extract_features
    from .training.batches import normalisation_tensors, plain_batches
    from .training.job import holdout_of, split_subset
    from .training.loop import confidence, score
    from .training.recipe import precision

    plugin = declared = None
    if spec["method"] == "plugin":  # loaded and checked before any data is read
        from .plugins import check_signature, load

        plugin = load("posthoc", spec["plugin"])
        declared = check_signature(plugin, spec["params"])
    record, cfg, model, norm, tr, te, inputs = load_cell(a)
    check_method(a.method, cfg)
    model.to(dev)
    mean, std = normalisation_tensors(norm, dev)
    held = holdout_of(tr.labels, cfg)  # the slice the cell did not train on (none without holdout)
    trained = split_subset(tr, ~held)
    counts = np.bincount(trained.labels, minlength=len(tr.class_names))[: len(tr.class_names)]
    prior = np.maximum(counts, 1)
    if plugin is not None:
        return _evaluate_plugin(model, cfg, plugin, declared, spec, tr, te, held, counts, prior, mean, std, dev) | {
            "record": record, "cfg": cfg, "inputs": inputs, "class_names": tr.class_names,
            "num_train": len(trained.labels), "backbone": state_digest(model.backbone.state_dict()),
            "precision": precision(cfg, dev.type), "torch": torch.__version__}
    if spec["tau"] == "auto":
        if not held.any():
            raise UserError(f"--tau auto chooses tau on training images the cell never saw, and this cell trained "
                            f"on all of them (recipe holdout {cfg.holdout}); train it with holdout > 0, or give "
                            "--tau <number>")
        hold = split_subset(tr, held)
        hf, hy = extract_features(model.backbone, plain_batches(hold.images, hold.labels, cfg, dev), mean, std, cfg,
                                  dev)
        choice = choose_tau(lambda t: adjusted_logits(model, hf, a.method, t, prior, cfg), hy, counts,
                            spec["tau_grid"])
    else:
        choice = TauChoice(spec["tau"], "given")
    feats, labels = extract_features(model.backbone, plain_batches(te.images, te.labels, cfg, dev), mean, std, cfg,
                                     dev)
    logits = adjusted_logits(model, feats, a.method, choice.tau, prior, cfg)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    conf = confidence(logits, top[:, 0], cfg.loss).double().cpu().numpy()
    metrics = score(top.cpu().numpy(), conf, labels, counts, cfg)
    return {"record": record, "cfg": cfg, "choice": choice, "metrics": metrics, "inputs": inputs, "counts": counts,
            "class_names": tr.class_names, "test_labels": labels, "num_train": len(trained.labels),
            "backbone": state_digest(model.backbone.state_dict()), "precision": precision(cfg, dev.type),
            "torch": torch.__version__}


def _evaluate_plugin(model, cfg, plugin, declared: dict, spec: dict, tr, te, held, counts, prior, mean, std,
                     dev) -> dict:
    """A post-hoc plugin on the cell's test logits (and, if it asks, features, head and
    held-out training images): its metrics, scored as the built-in methods' are."""
    import torch

    from .errors import UserError
    from .plugins import Holdout
    from .posthoc import extract_features, plugin_correction
    from .training.batches import plain_batches
    from .training.job import split_subset
    from .training.loop import confidence, eval_logits, score

    head = model.head
    extras = {"weight": head.weight.detach().float(),
              "bias": None if getattr(head, "bias", None) is None else head.bias.detach().float()}
    with torch.no_grad():
        if declared.get("holdout"):
            if not held.any():
                raise UserError(f"post-hoc plugin {plugin.ref!r} asks for held-out training images, and this cell "
                                f"trained on all of them (recipe holdout {cfg.holdout}); train it with holdout > 0")
            hold = split_subset(tr, held)
            hf, hy = extract_features(model.backbone, plain_batches(hold.images, hold.labels, cfg, dev), mean, std,
                                      cfg, dev)
            extras["holdout"] = Holdout(eval_logits(head(hf).float(), cfg), torch.as_tensor(hy, device=dev), hf)
        feats, labels = extract_features(model.backbone, plain_batches(te.images, te.labels, cfg, dev), mean, std, cfg,
                                         dev)
        extras["features"] = feats
        logits = plugin_correction(plugin, declared, eval_logits(head(feats).float(), cfg), prior, spec["params"],
                                   extras)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    conf = confidence(logits, top[:, 0], cfg.loss).double().cpu().numpy()
    return {"choice": None, "metrics": score(top.cpu().numpy(), conf, labels, counts, cfg),
            "counts": counts, "test_labels": labels, "plugin": plugin.info()}


def _job_key(spec: dict, inputs: dict) -> str:
    """What makes two posthoc jobs the same job: settings, input bytes, code (a plugin's too)."""
    from .code import code_digest
    from .tracking import config_digest

    digests = {k: v for k, v in inputs.items() if k.endswith("_sha256")}
    key = {"spec": spec, "inputs": digests, "code": code_digest("posthoc")}
    if spec["method"] == "plugin":
        from .plugins import plugin_digest

        key["plugin"] = plugin_digest("posthoc", spec["plugin"])
    return config_digest(key)


def _run(a: argparse.Namespace, spec: dict, tracker) -> None:
    import torch

    from . import distributed
    from .record import METRICS_JSON, FileRef, MetricsRecord, final_metrics, job_tags, output_tags
    from .tracking import config_digest, git_commit
    from .training.job import per_class_table, run_name

    torch.set_num_threads(a.threads)
    out = Path(a.out_dir)
    (out / METRICS_JSON).unlink(missing_ok=True)  # no result of an earlier attempt outlives a failed one
    tracker.ready()  # fails fast, before any work, if the server is down
    dev = distributed.init(a.device)
    t0 = time.perf_counter()
    res = evaluate_cell(a, spec, dev)
    record, choice, final = res["record"], res["choice"], dict(res["metrics"])
    per_class = final.pop("per_class_acc")
    wildcards = json.loads(a.wildcards)
    commit, dirty = git_commit(Path(__file__).parent)
    key, out_dir = _job_key(spec, res["inputs"]), str(out.resolve())
    tags = job_tags(a.rule, wildcards, git_commit=commit, git_dirty=dirty, config_digest=config_digest(spec),
                    job_key=key, output_dir=out_dir, world_size=1, inputs=res["inputs"], parent_run=record.run_id,
                    precision=res["precision"], plugin=res.get("plugin"))
    run_id = tracker.start(run_name(a.rule, wildcards), spec, tags, resume_run_id=tracker.find_run(key, out_dir))
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = {"per_class.csv": out / "per_class.csv"}
        per_class_table(res["counts"], per_class, res["class_names"], res["test_labels"],
                        (record.config or {}).get("shots", {})).to_csv(written["per_class.csv"], index=False)
        if choice is not None and choice.source == "holdout":
            import pandas as pd

            written["tau.csv"] = out / "tau.csv"
            pd.DataFrame({"tau": choice.grid, "holdout_balanced_acc": choice.balanced_acc}).to_csv(
                written["tau.csv"], index=False)
        metrics = MetricsRecord(
            rule=a.rule, wildcards=wildcards, run_id=run_id, tracking_uri=tracker.uri, config=spec,
            config_digest=config_digest(spec), inputs=res["inputs"], parent_run_id=record.run_id,
            start_backbone_sha256=res["backbone"], git_commit=commit, num_classes=len(res["counts"]),
            num_train=res["num_train"], final=final, device=str(dev), precision=res["precision"], world_size=1,
            torch=res["torch"], wall_s=round(time.perf_counter() - t0, 2),
            extra=_extra(spec, choice, res.get("plugin")),
        )
        partial = out / (METRICS_JSON + ".partial")
        write_json(metrics.to_json(), partial)
        written = {METRICS_JSON: partial, **written}
        tracker.log_metrics({**final_metrics(final), **({"posthoc_tau": choice.tau} if choice else {})})
        tracker.log_tags({**({"finetail.posthoc.tau_source": choice.source} if choice else {}),
                          **output_tags(FileRef(n, str(out / n), file_sha256(p)) for n, p in written.items())})
        tracker.log_artifacts(list(written.values()))
        tracker.end("FINISHED")
    except BaseException:
        from .errors import DiskFull

        with contextlib.suppress(DiskFull):  # on a full device this fails too: report the first error
            tracker.end("FAILED")
        raise
    os.replace(partial, out / METRICS_JSON)
    how = f"plugin {spec['plugin']}" if choice is None else f"{a.method} at tau {choice.tau:g} ({choice.source})"
    log(f"{how}: top-1 error {100 * final['top1_error']:.2f}%, "
        f"balanced accuracy {100 * final['balanced_acc']:.2f}% -> {out / METRICS_JSON}")


def _extra(spec: dict, choice, plugin: dict | None) -> dict:
    """``metrics.json``'s ``posthoc`` (the method and its tau, or the plugin and its params) and
    ``plugin`` (the plugin's record: finetail.plugins.Plugin.info)."""
    if choice is None:
        return {"posthoc": {"method": "plugin", "plugin": spec["plugin"], "params": spec["params"]}, "plugin": plugin}
    return {"posthoc": {"method": spec["method"], **choice.to_json()}}
