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
    from .manifest import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


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


# --------------------------------------------------------------------------- prepare
def cmd_prepare(a: argparse.Namespace) -> None:
    import warnings

    from .datasets import prepare, prepare_imagefolder

    spec = json.loads(a.spec)
    kind = spec.get("kind")
    out = Path(a.out_dir)
    short_side = spec.get("short_side")
    on_bad_image = spec.get("on_bad_image", "error")
    progress = sys.stderr.isatty()
    if short_side and spec.get("store") == "array":
        raise ValueError(f"datasets.{a.dataset}: short_side applies to file stores, not store: array")
    # With a pre-resize, the full-size manifest goes to original/ and the resized copies (and
    # the manifest the pipeline reads) to the dataset's folder.
    target = out / "original" if short_side else out
    with warnings.catch_warnings():
        # Warnings (a skipped bad image, a class without training images) as one log line each.
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_args, **_kw: _log(f"warning: {message}")
        if kind == "registry":
            path = prepare(spec.get("name", a.dataset), a.resources, target, base_url=spec.get("mirror"),
                           progress=progress, on_bad_image=on_bad_image)
        elif kind == "imagefolder":
            path = prepare_imagefolder(spec["source"], target, kind=spec.get("store", "files"),
                                       on_bad_image=on_bad_image, progress=progress)
        else:
            raise ValueError(f"finetail prepare handles kinds 'registry' and 'imagefolder', not {kind!r}")
        if short_side:
            import shutil

            from .datasets import pre_resize
            from .manifest import write_manifest

            resized = pre_resize(path, out / "resized", short_side, progress=progress)
            resized = resized.assign(path="resized/" + resized["path"])
            write_manifest(resized, out / "manifest.parquet")
            for name in ("classes.csv", "source.json"):
                shutil.copyfile(target / name, out / name)
            path = out / "manifest.parquet"
    _log(f"prepared {a.dataset} -> {path}")


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


def _train_argv(a: argparse.Namespace) -> list[str]:
    """``a`` as ``train`` arguments again, without ``--nproc`` (for the ``torchrun`` relaunch)."""
    p = argparse.ArgumentParser()
    _add_train_args(p)
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


def cmd_train(a: argparse.Namespace) -> None:
    from . import distributed
    from .training.job import run_job

    if a.nproc > 1 and not distributed.launched():
        # One job, N processes: become torchrun (same pid, so Slurm's and Snakemake's signals
        # reach its agent, which forwards SIGTERM to every rank) and exit with its status.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
               "-m", "finetail.cli", *_train_argv(a)]
        _log(f"relaunching under torchrun with {a.nproc} processes")
        sys.stderr.flush()
        os.execv(sys.executable, cmd)
    dev = distributed.init(a.device)
    try:
        run_job(a, dev)
    finally:
        distributed.teardown()


# --------------------------------------------------------------------------- transfer half
def cmd_pool(a: argparse.Namespace) -> None:
    """Concatenate source manifests (optionally only some classes) into one relabelled manifest."""
    import pandas as pd

    from .manifest import class_table, read_manifest, rebase_store, write_manifest

    out = Path(a.out_dir) / "manifest.parquet"
    parts = []
    for m in a.inputs:
        df = read_manifest(m)
        parts.append(rebase_store(df, m, out).assign(source=Path(m).parent.name))
    df = pd.concat(parts, ignore_index=True)
    dup = df.groupby("class_name")["source"].nunique()
    if (dup > 1).any():
        raise ValueError(f"class names shared between pooled sources: {sorted(dup[dup > 1].index)[:5]}")
    if a.classes:
        keep = pd.read_csv(a.classes)["class_name"]
        missing = sorted(set(keep) - set(df["class_name"]))
        if missing:
            raise ValueError(f"{a.classes} names classes that no input has: {missing[:5]}")
        df = df[df["class_name"].isin(set(keep))]
    order = df.drop_duplicates("class_name")[["source", "label", "class_name"]].sort_values(["source", "label"])
    relabel = {c: i for i, c in enumerate(order["class_name"])}
    df = df.assign(label=df["class_name"].map(relabel).astype("int64"))
    write_manifest(df, out)
    class_table(df).to_csv(Path(a.out_dir) / "classes.csv", index=False)
    _log(f"pooled {len(a.inputs)} manifest(s): {len(relabel)} classes, {int((df['split'] == 'train').sum())} training images")


def cmd_features(a: argparse.Namespace) -> None:
    import torch

    from .features import class_mean_features, load_feature_model
    from .manifest import file_sha256, load_array_split
    from .similarity import ClassStats, save_class_stats

    torch.set_num_threads(a.threads)
    fm = load_feature_model(a.model, a.weights)
    split = load_array_split(a.manifest, a.split)
    means, counts = class_mean_features(fm, split.images, split.labels, len(split.class_names), device=a.device)
    keep = counts > 0
    stats = ClassStats(means[keep], counts[keep], [n for n, k in zip(split.class_names, keep, strict=True) if k])
    ident = fm.identity
    save_class_stats(
        a.out, stats, model=a.model_name, model_kind=ident["kind"], model_run_id=ident.get("run_id", ""),
        model_weights=ident.get("weights", ""), model_sha256=ident["sha256"],
        manifest=str(a.manifest), manifest_sha256=file_sha256(a.manifest), split=a.split,
    )
    _log(f"features of {a.manifest} ({a.split}): {stats.means.shape[0]} classes x {stats.means.shape[1]} dims -> {a.out}")


def cmd_similarity(a: argparse.Namespace) -> None:
    from .similarity import (
        DEFAULT_MIN_SOURCE_IMAGES,
        load_class_stats,
        plot_similarity_heatmap,
        similarity_matrix,
    )

    spec = json.loads(a.spec)
    load = lambda name: load_class_stats(Path(a.features_dir) / f"{name}.npz")  # noqa: E731
    sources = {s: load(s) for s in spec["sources"]}
    targets = {t: load(t) for t in spec["targets"]}
    gamma = spec.get("gamma", 0.01)
    sim, emd = similarity_matrix(sources, targets, gamma, spec.get("min_source_images", DEFAULT_MIN_SOURCE_IMAGES))
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sim.to_csv(out / "matrix.csv", float_format="%.6f")
    emd.to_csv(out / "emd.csv", float_format="%.6f")
    plot_similarity_heatmap(sim, out / "heatmap.png", title=f"domain similarity exp(-{gamma:g} EMD)")
    _log(f"similarity matrix {sim.shape[0]} sources x {sim.shape[1]} targets -> {out / 'matrix.csv'}")


def cmd_select(a: argparse.Namespace) -> None:
    from .selection import concat_class_stats, greedy_select
    from .similarity import DEFAULT_MIN_SOURCE_IMAGES, load_class_stats

    spec = json.loads(a.spec)
    pool = concat_class_stats(*(load_class_stats(Path(a.features_dir) / f"{p}.npz") for p in spec["pool"]))
    targets = {t: load_class_stats(Path(a.features_dir) / f"{t}.npz") for t in spec["targets"]}
    chosen = greedy_select(
        pool, targets, top_k=spec.get("top_k"), threshold=spec.get("threshold"),
        gamma=spec.get("gamma", 0.01), min_source_images=spec.get("min_source_images", DEFAULT_MIN_SOURCE_IMAGES),
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    chosen.to_csv(a.out, index=False, float_format="%.6f")
    _log(f"selected {len(chosen)} of {len(pool.class_names)} source classes -> {a.out}")


# --------------------------------------------------------------------------- report
def cmd_report(a: argparse.Namespace) -> None:
    from .report import build_report

    written = build_report(Path(a.results), json.loads(a.spec), Path(a.out_dir))
    for p in written:
        _log(f"wrote {p}")


def cmd_lineage(a: argparse.Namespace) -> None:
    from .provenance import format_lineage, lineage

    chain = lineage(a.target, a.results, a.tracking_uri)
    print(json.dumps(chain, indent=2, default=str) if a.json else format_lineage(chain))


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


def _add_train_args(p: argparse.ArgumentParser) -> None:
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
    _add_train_args(t)
    t.set_defaults(func=cmd_train)

    po = sub.add_parser("pool", help="pool source manifests (optionally a class list) into one relabelled manifest")
    po.add_argument("--inputs", nargs="+", required=True, help="manifest.parquet files")
    po.add_argument("--classes", default=None, help="CSV with a class_name column: keep only these classes")
    po.add_argument("--out-dir", required=True, help="writes manifest.parquet and classes.csv")
    po.set_defaults(func=cmd_pool)

    fe = sub.add_parser("features", help="per-class mean penultimate features of a dataset split")
    fe.add_argument("--model", required=True, help="a pipeline model.pt, or tv:<torchvision name>")
    fe.add_argument("--weights", default=None, help="torchvision pretrained-weights enum name (tv: models)")
    fe.add_argument("--model-name", required=True, help="the feature model's name, stored with the features")
    fe.add_argument("--manifest", required=True)
    fe.add_argument("--split", default="train")
    fe.add_argument("--out", required=True, help=".npz with means, counts, class_names and the model's identity")
    fe.add_argument("--threads", type=int, default=1)
    fe.add_argument("--device", default=os.environ.get("FINETAIL_DEVICE", "cpu"))
    fe.set_defaults(func=cmd_features)

    si = sub.add_parser("similarity", help="source x target domain similarity exp(-gamma EMD), CSV + heatmap")
    si.add_argument("--features-dir", required=True, help="folder of <dataset>.npz class statistics")
    si.add_argument("--spec", required=True, help='JSON: {"sources": [...], "targets": [...], "gamma", "min_source_images"}')
    si.add_argument("--out-dir", required=True, help="writes matrix.csv, emd.csv, heatmap.png")
    si.set_defaults(func=cmd_similarity)

    se = sub.add_parser("select", help="greedy selection of the source classes most similar to the targets")
    se.add_argument("--features-dir", required=True)
    se.add_argument("--spec", required=True, help='JSON: {"pool": [...], "targets": [...], "top_k" or "threshold", ...}')
    se.add_argument("--out", required=True, help="classes.csv: class_name, score, best_target, targets, count")
    se.set_defaults(func=cmd_select)

    r = sub.add_parser("report", help="tables and figures from every metrics.json of a study")
    r.add_argument("--results", required=True, help="results/<study>")
    r.add_argument("--spec", required=True, help="JSON: the report's config subtree")
    r.add_argument("--out-dir", required=True)
    r.set_defaults(func=cmd_report)

    li = sub.add_parser("lineage", help="the chain behind a number: run, inputs with digests, parents, dataset sources")
    li.add_argument("target", help="a metrics.json (or its folder), an MLflow run id, a cell such as "
                    "finetune:natural:cub200 or cbloss:gen10:if10:cb_focal, or report/<table>.csv:<row>")
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

    c = sub.add_parser("check-config", help="validate a study file against the schema")
    c.add_argument("config")
    c.set_defaults(func=cmd_check_config)
    return p


def main(argv: list[str] | None = None) -> None:
    from .errors import UserError
    from .tracking import TrackingUnavailable

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, ValueError, FileNotFoundError, TrackingUnavailable) as e:
        if os.environ.get("FINETAIL_DEBUG"):
            raise
        _log(f"error: {e}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
