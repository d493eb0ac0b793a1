"""``finetail <stage>``: the one command line that every Snakemake rule calls.

Each subcommand takes explicit arguments (the config subtree as ``--spec JSON``), writes its
outputs atomically and exits non-zero with a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _log(msg: str) -> None:
    print(f"[finetail {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- generate
def cmd_generate(a: argparse.Namespace) -> None:
    from .manifest import class_table, write_array_dataset
    from .world import WorldConfig, generate

    spec = json.loads(a.spec)
    world = WorldConfig(**spec.get("world", {}))
    ds = {k: v for k, v in spec.get("dataset", {}).items() if k != "kind"}
    t0 = time.perf_counter()
    g = generate(a.dataset, world, ds.get("train_per_class"), ds.get("test_per_class"))
    out = Path(a.out_dir)
    df = write_array_dataset(out, g.images, g.labels, g.class_names, g.split)
    info = g.class_info.merge(class_table(df)[["label"]], on="label")
    info.to_csv(out / "classes.csv", index=False)
    _write_json(
        {"dataset": a.dataset, "source": "finetail.world", "world": spec.get("world", {}), "sizes": ds,
         "images": int(len(df)), "classes": len(g.class_names), "shape": list(g.images.shape[1:])},
        out / "source.json",
    )
    _log(f"generated {a.dataset}: {len(df)} images, {len(g.class_names)} classes in {time.perf_counter() - t0:.1f}s")


# --------------------------------------------------------------------------- longtail
def cmd_longtail(a: argparse.Namespace) -> None:
    from .longtail import longtail_subset
    from .manifest import class_table, read_manifest, rebase_store, write_manifest

    src = read_manifest(a.input)
    sub = longtail_subset(src, a.imbalance, a.profile, a.seed, a.n_max)
    out = Path(a.out_dir)
    sub = rebase_store(sub, a.input, out / "manifest.parquet")
    write_manifest(sub, out / "manifest.parquet")
    counts = class_table(sub)
    counts.to_csv(out / "counts.csv", index=False)
    _log(f"long-tailed {a.input} at IF {a.imbalance:g}: {int(counts['train_count'].sum())} training images")


# --------------------------------------------------------------------------- train
def _per_class_table(res: dict, class_names: list[str], test_labels, shots: dict):
    import numpy as np
    import pandas as pd

    from .metrics import shot_groups

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


def cmd_train(a: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from .engine import Preempted, TrainConfig, resume_extra, train
    from .manifest import file_sha256, load_array_split
    from .tracking import Tracker, config_digest, git_commit, resolve_tracking_uri

    torch.set_num_threads(a.threads)
    spec = json.loads(a.spec)
    shots = spec.get("shots", {})
    loss = spec.get("loss", {"type": "softmax"})
    cfg = TrainConfig.from_dict(
        {**spec.get("recipe", {}), "loss": loss["type"], "beta": loss.get("beta", 0.0),
         "gamma": loss.get("gamma", 0.0), "many_shot": shots.get("many", 100), "few_shot": shots.get("few", 20)}
    )
    manifest = Path(a.manifest)
    tr = load_array_split(manifest, "train")
    te = load_array_split(manifest, "test")
    num_classes = len(tr.class_names)
    digest = config_digest(spec)
    inputs = {"manifest": str(manifest), "manifest_sha256": file_sha256(manifest)}

    uri = resolve_tracking_uri(a.tracking_uri, Path(a.study_dir) / "mlflow.db")
    tracker = Tracker(uri, a.experiment, artifact_root=Path(a.study_dir) / "mlartifacts")  # fails fast if down
    prev = resume_extra(a.checkpoint, cfg, tr.labels, num_classes, None)
    commit, dirty = git_commit(Path(__file__).parent)
    wildcards = json.loads(a.wildcards)
    tags = {
        "finetail.rule": a.rule,
        **{f"finetail.wildcard.{k}": str(v) for k, v in wildcards.items()},
        "mlflow.source.git.commit": commit,
        "finetail.git_dirty": str(dirty).lower(),
        "finetail.config_digest": digest,
        "finetail.input.manifest": inputs["manifest"],
        "finetail.input.manifest.sha256": inputs["manifest_sha256"],
        "finetail.output_dir": str(Path(a.out_dir).resolve()),
    }
    run_name = a.rule + ":" + "/".join(str(v) for v in wildcards.values())
    run_id = tracker.start(run_name, spec, tags, resume_run_id=(prev or {}).get("run_id"))
    if prev:
        _log(f"checkpoint found at epoch {prev['epoch'] + 1}: continuing MLflow run {run_id}")
    _log(f"MLflow run {run_id} at {uri}; {len(tr.labels)} train / {len(te.labels)} test images, {num_classes} classes")

    t0 = time.perf_counter()
    try:
        res = train(
            cfg, tr.images, tr.labels, te.images, te.labels, num_classes, a.checkpoint,
            device=a.device, on_epoch=lambda e, m: tracker.log_metrics(m, step=e), log=_log,
            progress=a.progress, extra_state={"run_id": run_id},
        )
    except Preempted:
        tracker.end("KILLED")
        raise SystemExit(143) from None
    except BaseException:
        tracker.end("FAILED")
        raise
    wall = time.perf_counter() - t0
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_class = _per_class_table(res, tr.class_names, te.labels, shots)
    per_class.to_csv(out / "per_class.csv", index=False)
    hist = [{k: v for k, v in row.items() if k != "eval"} for row in res["history"]]
    import pandas as pd

    pd.DataFrame(hist).to_csv(out / "history.csv", index=False)
    final = {k: v for k, v in res["metrics"].items() if k != "per_class_acc"}
    record = {
        "rule": a.rule,
        "wildcards": wildcards,
        "run_id": run_id,
        "tracking_uri": uri,
        "config": spec,
        "config_digest": digest,
        "inputs": inputs,
        "git_commit": commit,
        "num_classes": num_classes,
        "num_train": int(len(tr.labels)),
        "final": final,
        "epochs": cfg.epochs,
        "device": res["device"],
        "torch": torch.__version__,
        "wall_s": round(wall, 2),
        "mean_images_per_s": float(np.mean([h["images_per_s"] for h in hist])) if hist else None,
    }
    if a.save_model:
        from .engine import _save_atomic  # same atomic writer as the checkpoints

        _save_atomic(
            {"model": res["model"].state_dict(), "backbone": res["model"].backbone.state_dict(),
             "cfg": json.dumps(spec), "class_names": json.dumps(tr.class_names), "run_id": run_id,
             "normalisation": json.dumps(res["normalisation"])},
            Path(a.save_model),
        )
        record["model_sha256"] = file_sha256(a.save_model)
    _write_json(record, out / "metrics.json.partial")
    tracker.log_metrics({f"final_{k}": v for k, v in final.items() if isinstance(v, float)}, step=cfg.epochs)
    tracker.log_artifacts([out / "metrics.json.partial", out / "per_class.csv", out / "history.csv"])
    tracker.end("FINISHED")
    os.replace(out / "metrics.json.partial", out / "metrics.json")
    _log(f"done: top-1 error {100 * final['top1_error']:.2f}% in {wall:.1f}s -> {out / 'metrics.json'}")


# --------------------------------------------------------------------------- report
def cmd_report(a: argparse.Namespace) -> None:
    from .report import build_report

    written = build_report(Path(a.results), json.loads(a.spec), Path(a.out_dir))
    for p in written:
        _log(f"wrote {p}")


def cmd_check_config(a: argparse.Namespace) -> None:
    from .config import load_config

    cfg = load_config(a.config)
    print(f"{a.config}: valid (study {cfg['study']!r}, {len(cfg['datasets'])} datasets)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetail",
        description="Stages of the finetail study. Snakemake calls these; you can too, one stage at a time.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="<stage>")

    g = sub.add_parser("generate", help="render one dataset of the generated world")
    g.add_argument("--dataset", required=True, help="world dataset name, e.g. gen10, cub200")
    g.add_argument("--spec", required=True, help='JSON: {"world": {...}, "dataset": {...}}')
    g.add_argument("--out-dir", required=True, help="writes images.npy, manifest.parquet, classes.csv, source.json")
    g.set_defaults(func=cmd_generate)

    lt = sub.add_parser("longtail", help="long-tailed subset of a balanced manifest")
    lt.add_argument("--input", required=True, help="balanced manifest.parquet")
    lt.add_argument("--imbalance", type=float, required=True, help="imbalance factor n_max / n_min")
    lt.add_argument("--profile", default="exp", choices=["exp", "step"])
    lt.add_argument("--seed", type=int, default=0, help="seed of the per-class shuffle")
    lt.add_argument("--n-max", type=int, default=None, help="head-class count (default: the balanced count)")
    lt.add_argument("--out-dir", required=True, help="writes manifest.parquet and counts.csv")
    lt.set_defaults(func=cmd_longtail)

    t = sub.add_parser("train", help="train one model (pretrain, fine-tune or a CB-loss cell), tracked in MLflow")
    t.add_argument("--manifest", required=True, help="manifest with train and test splits")
    t.add_argument("--spec", required=True, help='JSON: {"recipe": {...}, "loss": {...}, "shots": {...}}')
    t.add_argument("--out-dir", required=True, help="writes metrics.json, per_class.csv, history.csv")
    t.add_argument("--checkpoint", required=True, help="resume point, rewritten after every epoch")
    t.add_argument("--study-dir", required=True, help="results/<study>: holds the default MLflow store")
    t.add_argument("--rule", default="manual", help="Snakemake rule name, for the run's tags")
    t.add_argument("--wildcards", default="{}", help="JSON of the job's wildcards, for the run's tags")
    t.add_argument("--experiment", default="finetail", help="MLflow experiment name")
    t.add_argument("--tracking-uri", default=None, help="MLflow URI (MLFLOW_TRACKING_URI wins)")
    t.add_argument("--save-model", default=None, help="also write the final weights here")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    t.add_argument("--device", default=os.environ.get("FINETAIL_DEVICE", "auto"), help="auto, cpu, cuda, cuda:1...")
    t.add_argument("--progress", action="store_true", help="show a progress bar instead of a line per epoch")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("report", help="tables and figures from every metrics.json of a study")
    r.add_argument("--results", required=True, help="results/<study>")
    r.add_argument("--spec", required=True, help="JSON: the report's config subtree")
    r.add_argument("--out-dir", required=True)
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("check-config", help="validate a study file against the schema")
    c.add_argument("config")
    c.set_defaults(func=cmd_check_config)
    return p


def main(argv: list[str] | None = None) -> None:
    from .tracking import TrackingUnavailable

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, TrackingUnavailable) as e:
        if os.environ.get("FINETAIL_DEBUG"):
            raise
        _log(f"error: {e}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
