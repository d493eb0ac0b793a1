"""``finetail <stage>``: the one command line that every Snakemake rule calls.

Each subcommand takes explicit arguments (the config subtree as ``--spec JSON``), writes its
outputs atomically and exits non-zero with a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .fileio import log

__all__ = ["main"]


def _spec(a: argparse.Namespace, *required: str) -> dict:
    """``--spec``: a JSON object holding at least the keys ``required`` (else one clear error)."""
    try:
        spec = json.loads(a.spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"--spec is not JSON ({e}): {a.spec[:200]}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"--spec must be a JSON object, got {type(spec).__name__}: {a.spec[:200]}")
    missing = [k for k in required if k not in spec]
    if missing:
        raise ValueError(f"--spec lacks the key(s) {missing}; it has {sorted(spec)}")
    return spec


# --------------------------------------------------------------------------- generate
def cmd_generate(a: argparse.Namespace) -> None:
    from .world import write_world_dataset

    log(write_world_dataset(a.dataset, _spec(a), Path(a.out_dir)))


# --------------------------------------------------------------------------- prepare
def cmd_prepare(a: argparse.Namespace) -> None:
    from .datasets.pipeline import prepare_from_spec

    path = prepare_from_spec(a.dataset, _spec(a), a.resources, Path(a.out_dir), log=log,
                             progress=sys.stderr.isatty())
    log(f"prepared {a.dataset} -> {path}")


# --------------------------------------------------------------------------- longtail
def cmd_longtail(a: argparse.Namespace) -> None:
    from .longtail import write_longtail

    log(write_longtail(a.input, a.imbalance, a.profile, a.seed, a.n_max, Path(a.out_dir)))


# --------------------------------------------------------------------------- train
def cmd_train(a: argparse.Namespace) -> None:
    from .training.job import launch

    launch(a)


# --------------------------------------------------------------------------- posthoc
def cmd_posthoc(a: argparse.Namespace) -> None:
    from .posthoc_job import launch

    launch(a)


# --------------------------------------------------------------------------- transfer half
def cmd_pool(a: argparse.Namespace) -> None:
    from .transfer import pool_sources

    log(pool_sources(a.inputs, a.classes, Path(a.out_dir), a.seed))


def cmd_features(a: argparse.Namespace) -> None:
    from .features import Preprocess, write_class_features

    pre = Preprocess(a.image_size, a.crop_fraction, a.crop)
    log(write_class_features(a.model, a.weights, a.model_name, a.manifest, a.split, a.out, a.threads, a.device,
                             pre, a.workers))


def _features_arg(a: argparse.Namespace):
    """--features-dir (a folder of <name>.npz) or --features (the files, each named by its stem)."""
    from .similarity import features_by_name

    return features_by_name(a.features) if a.features else Path(a.features_dir)


def cmd_similarity(a: argparse.Namespace) -> None:
    from .similarity import write_similarity

    log(write_similarity(_features_arg(a), _spec(a, "sources", "targets"), Path(a.out_dir)))


def cmd_select(a: argparse.Namespace) -> None:
    from .selection import write_selection

    log(write_selection(_features_arg(a), _spec(a, "pool", "targets"), Path(a.out)))


def cmd_random_subset(a: argparse.Namespace) -> None:
    from .selection import write_random_subset

    log(write_random_subset(_features_arg(a), _spec(a, "pool"), Path(a.selection), Path(a.out)))


def cmd_transferability(a: argparse.Namespace) -> None:
    from .scoring import write_scores

    log(write_scores(a.models, a.seeds, a.manifest, a.out, _spec(a), threads=a.threads, device=a.device,
                     workers=a.workers))


def _add_features_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--features-dir", help="folder of <dataset>.npz class statistics")
    g.add_argument("--features", nargs="+", help="<dataset>.npz class-statistics files (each named by its file name)")


# --------------------------------------------------------------------------- report
def cmd_report(a: argparse.Namespace) -> None:
    from .report import build_report
    from .report_files import finish_report

    spec = _spec(a)
    written = build_report(Path(a.results), spec, Path(a.out_dir))
    # provenance.csv, commits.csv and the HTML views that `snakemake --report` embeds
    written += finish_report(Path(a.out_dir), spec, Path(a.results), a.metrics, a.experiment)
    for p in written:
        log(f"wrote {p}")


def cmd_ui(a: argparse.Namespace) -> None:
    import shlex

    from .layout import Layout
    from .tracking import (
        mark_experiments,
        relocate_artifacts,
        serve_ui,
        sqlite_uri,
        study_experiments,
        ui_command,
        ui_url,
    )

    layout = Layout.at(a.results) if a.results else Layout.of_study(a.study)
    db, artifacts = Path(layout.mlflow_db()), Path(layout.artifacts())
    if not db.is_file():
        hint = (f"; the runs went to MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']}: open that server's UI"
                if os.environ.get("MLFLOW_TRACKING_URI") else " (run the study first, or give --results)")
        raise FileNotFoundError(f"{db}: no MLflow store there{hint}")
    for r in relocate_artifacts(db, artifacts):
        log(r.describe())
    experiments = study_experiments(sqlite_uri(db), artifacts)
    for eid in mark_experiments(sqlite_uri(db), [e for e, _ in experiments]):
        log(f"marked MLflow experiment {eid} as model training (mlflow.experimentKind = custom_model_development)")
    cmd = ui_command(db, artifacts, a.host, a.port)
    for eid, name in experiments:
        print(f"{name}: {ui_url(a.host, a.port, eid)}", flush=True)
    if a.no_serve:
        print(shlex.join(cmd))
        return
    log(f"starting the MLflow UI on http://{a.host}:{a.port} (Ctrl-C or SIGTERM stops it and all its processes)")
    raise SystemExit(serve_ui(cmd))


def cmd_lineage(a: argparse.Namespace) -> None:
    from .provenance import format_lineage, lineage

    chain = lineage(a.target, a.results, a.tracking_uri)
    print(json.dumps(chain, indent=2, default=str) if a.json else format_lineage(chain))


def cmd_compare_claims(a: argparse.Namespace) -> None:
    from .claims import compare_claims, read_claims
    from .report import to_markdown

    ref_path = Path(a.against)
    if not ref_path.is_file():
        raise FileNotFoundError(f"{ref_path}: no committed claims table there (give --against)")
    for line in ref_path.read_text().splitlines():
        if line.startswith("#"):
            print(line)
    table, problems = compare_claims(read_claims(a.claims), read_claims(ref_path))
    print(to_markdown(table))
    for p in problems:
        log(f"DIFFERS: {p}")
    agree = len(table) - sum(table["agrees"] == "NO")
    log(f"{agree} of {len(table)} committed claims agree with {a.claims}"
        + (f"; {len(problems)} problem(s)" if problems else ""))
    raise SystemExit(1 if problems else 0)


def cmd_audit(a: argparse.Namespace) -> None:
    from .provenance import audit, audit_exit_code, format_audit

    rows = audit(a.results, a.tracking_uri, pixels=not a.skip_pixels)
    print(format_audit(rows, verbose=a.verbose))
    if a.skip_pixels:
        print("image files not re-hashed (--skip-pixels): a changed pixel of a file dataset would not show")
    raise SystemExit(audit_exit_code(rows, include_stale=a.include_stale))


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

    pr = sub.add_parser("prepare", help="download, verify, extract and parse a real dataset (or your imagefolder)")
    pr.add_argument("--dataset", required=True, help="the dataset's key in the config")
    pr.add_argument("--spec", required=True, help='JSON: the dataset\'s config, e.g. {"kind": "registry"}')
    pr.add_argument("--resources", default="resources", help="raw downloads go to <resources>/<name>/")
    pr.add_argument("--out-dir", required=True, help="writes manifest.parquet (+ images.npy), classes.csv, source.json")
    pr.set_defaults(func=cmd_prepare)

    lt = sub.add_parser("longtail", help="long-tailed subset of a balanced manifest")
    lt.add_argument("--input", required=True, help="balanced manifest.parquet")
    lt.add_argument("--imbalance", type=float, required=True, help="imbalance factor n_max / n_min")
    lt.add_argument("--profile", default="exp", choices=["exp", "step"])
    lt.add_argument("--seed", type=int, default=0, help="seed of the per-class shuffle")
    lt.add_argument("--n-max", type=int, default=None, help="head-class count (default: the balanced count)")
    lt.add_argument("--out-dir", required=True, help="writes manifest.parquet and counts.csv")
    lt.set_defaults(func=cmd_longtail)

    t = sub.add_parser("train", help="train one model (pretrain, fine-tune or a CB-loss cell), tracked in MLflow")
    from .training.job import add_train_args

    add_train_args(t)
    t.set_defaults(func=cmd_train)

    ph = sub.add_parser("posthoc", help="tau-normalisation, logit adjustment or a plugin's correction of a trained "
                                         "cell, tracked in MLflow as a child of the cell's run")
    from .posthoc_job import add_posthoc_args

    add_posthoc_args(ph)
    ph.set_defaults(func=cmd_posthoc)

    po = sub.add_parser("pool", help="pool source manifests (optionally a class list) into one relabelled manifest")
    po.add_argument("--inputs", nargs="+", required=True, help="manifest.parquet files")
    po.add_argument("--classes", default=None, help="CSV with a class_name column: keep only these classes")
    po.add_argument("--seed", type=int, default=0,
                    help="seed of the training images kept when --classes has an images column (a random source)")
    po.add_argument("--out-dir", required=True, help="writes manifest.parquet and classes.csv")
    po.set_defaults(func=cmd_pool)

    fe = sub.add_parser("features", help="per-class mean penultimate features of a dataset split")
    fe.add_argument("--model", required=True, help="a pipeline model.pt, or tv:<torchvision name>")
    fe.add_argument("--weights", default=None, help="torchvision pretrained-weights enum name (tv: models)")
    fe.add_argument("--model-name", required=True, help="the feature model's name, stored with the features")
    fe.add_argument("--manifest", required=True, help="an array-store or a file manifest")
    fe.add_argument("--split", default="train")
    fe.add_argument("--image-size", type=int, default=None,
                    help="input side, pixels (default: tv: models 224; a pipeline network: arrays as stored, "
                         "files at its recipe's image_size)")
    fe.add_argument("--crop", default="short_side", choices=["short_side", "central"],
                    help="short_side: resize the short side to size / fraction, centre square (torchvision); "
                         "central: central fraction of each side, resized to a square (Cui et al.'s TF-slim code)")
    fe.add_argument("--crop-fraction", type=float, default=0.875, help="fraction the centre crop keeps")
    fe.add_argument("--workers", type=int, default=None, help="file manifests: loader processes (default: per CPUs)")
    fe.add_argument("--out", required=True, help=".npz with means, counts, class_names and the model's identity")
    fe.add_argument("--threads", type=int, default=1)
    fe.add_argument("--device", default=os.environ.get("FINETAIL_DEVICE", "cpu"))
    fe.set_defaults(func=cmd_features)

    si = sub.add_parser("similarity", help="source x target domain similarity exp(-gamma EMD), CSV + heatmap")
    _add_features_args(si)
    si.add_argument("--spec", required=True, help='JSON: {"sources": [...], "targets": [...], "gamma", "min_source_images"}')
    si.add_argument("--out-dir", required=True, help="writes matrix.csv, emd.csv, heatmap.png")
    si.set_defaults(func=cmd_similarity)

    se = sub.add_parser("select", help="greedy selection of the source classes most similar to the targets")
    _add_features_args(se)
    se.add_argument("--spec", required=True, help='JSON: {"pool": [...], "targets": [...], "top_k" or "threshold", ...}')
    se.add_argument("--out", required=True, help="classes.csv: class_name, score, best_target, targets, count")
    se.set_defaults(func=cmd_select)

    rs = sub.add_parser("random-subset", help="the selection's random counterpart: as many pool classes and "
                        "training images, drawn at random (seeded)")
    _add_features_args(rs)
    rs.add_argument("--spec", required=True, help='JSON: {"pool": [...], "seed": S, "min_source_images": N}')
    rs.add_argument("--selection", required=True, help="the greedy selection's classes.csv (its class and image counts)")
    rs.add_argument("--out", required=True, help="classes.csv: class_name, count, images (kept)")
    rs.set_defaults(func=cmd_random_subset)

    ts = sub.add_parser("transferability", help="transferability scores (LogME, LEEP, NCE, H-score, k-NN) of "
                        "source models on a target's training images")
    ts.add_argument("--models", nargs="+", required=True, help="the source's pretrained model.pt files, one per seed")
    ts.add_argument("--seeds", nargs="+", type=int, required=True, help="their pretraining seeds, in the same order")
    ts.add_argument("--manifest", required=True, help="the target's manifest (array store or image files)")
    ts.add_argument("--spec", required=True, help='JSON: {"scores": [...], "knn_k": K, "source": name, "target": name, '
                    '"plugins": {name: entry point or module:callable}}')
    ts.add_argument("--out", required=True, help="scores.csv: one row per source model (seed), each score and its seconds")
    ts.add_argument("--workers", type=int, default=None, help="file manifests: loader processes (default: per CPUs)")
    ts.add_argument("--threads", type=int, default=1)
    ts.add_argument("--device", default=os.environ.get("FINETAIL_DEVICE", "auto"), help="auto, cpu, cuda, cuda:1...")
    ts.set_defaults(func=cmd_transferability)

    r = sub.add_parser("report", help="tables and figures from every metrics.json of a study")
    r.add_argument("--results", required=True, help="results/<study>")
    r.add_argument("--spec", required=True, help="JSON: the report's config subtree")
    r.add_argument("--out-dir", required=True)
    r.add_argument("--metrics", nargs="*", default=None,
                   help="the metrics.json of every training run behind the report, for its provenance table "
                        "(default: every one under --results)")
    r.add_argument("--experiment", default=None, help="the MLflow experiment the runs were logged to")
    r.set_defaults(func=cmd_report)

    ui = sub.add_parser("ui", help="the MLflow UI on a study's store, on the runs table (artifacts found after a move)")
    where = ui.add_mutually_exclusive_group(required=True)
    where.add_argument("--study", help="the study's name: its store is results/<study>/mlflow.db")
    where.add_argument("--results", help="the study's results folder (results/<study>), wherever it lies now")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--no-serve", action="store_true",
                    help="relocate and mark the store, print the experiments' URLs and the mlflow command; start nothing")
    ui.set_defaults(func=cmd_ui)

    li = sub.add_parser("lineage", help="the chain behind a number: run, inputs with digests, parents, dataset sources")
    li.add_argument("target", help="a metrics.json (or its folder), an MLflow run id, a cell such as "
                    "finetune:natural:cub200:0 or cbloss:gen10:if10:cb_focal:seed0 (the seed last), or report/<table>.csv:<row>")
    li.add_argument("--results", default=None, help="results/<study> (needed for run ids and cells)")
    li.add_argument("--tracking-uri", default=None,
                    help="MLflow URI (default: MLFLOW_TRACKING_URI, then the store the run recorded, "
                         "then <results>/mlflow.db)")
    li.add_argument("--json", action="store_true", help="print the chain as JSON")
    li.set_defaults(func=cmd_lineage)

    au = sub.add_parser("audit", help="re-hash every file the tracking store names; exit 1 if any changed or is missing")
    au.add_argument("--results", required=True, help="results/<study>")
    au.add_argument("--tracking-uri", default=None,
                    help="MLflow URI (default: MLFLOW_TRACKING_URI, then the store the runs recorded, "
                         "then <results>/mlflow.db)")
    au.add_argument("--include-stale", action="store_true", help="also fail on runs superseded by a rerun")
    au.add_argument("--skip-pixels", action="store_true",
                    help="do not re-hash the image files behind each manifest (quick audit of real data)")
    au.add_argument("-v", "--verbose", action="store_true", help="list every file, not only problems")
    au.set_defaults(func=cmd_audit)

    cc = sub.add_parser("compare-claims", help="check a run's report/claims.csv against a committed one: no verdict "
                        "flipped between better and worse, every interval overlapping; exit 1 otherwise")
    cc.add_argument("claims", help="this run's claims.csv (the report folder's)")
    cc.add_argument("--against", default="docs/results/default_claims.csv",
                    help="the committed claims table (default: docs/results/default_claims.csv)")
    cc.set_defaults(func=cmd_compare_claims)

    c = sub.add_parser("check-config", help="validate a study file against the schema")
    c.add_argument("config")
    c.set_defaults(func=cmd_check_config)
    return p


def main(argv: list[str] | None = None) -> None:
    """Run ``finetail <argv>`` (default: the command line). From the command line, with
    ``FINETAIL_WORKER`` naming a live worker (``finetail.worker``), the command runs there,
    forked from a process that has imported torch & co. already, and this process ends as
    the job ends; otherwise (no worker, dead, refused) here."""
    if argv is None and os.environ.get("FINETAIL_WORKER"):
        from .worker import run_in_worker

        code = run_in_worker()
        if code is not None:
            raise SystemExit(code)
    from .errors import UserError
    from .fileio import disk_full_is_one_line
    from .tracking import TrackingUnavailable

    args = build_parser().parse_args(argv)
    try:
        with disk_full_is_one_line():  # a full device, wherever it surfaced: one line, not a traceback
            args.func(args)
    except (UserError, ValueError, FileNotFoundError, TrackingUnavailable) as e:
        if os.environ.get("FINETAIL_DEBUG"):
            raise
        log(f"error: {e}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
