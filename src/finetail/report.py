"""The study's report: tables and figures from every ``metrics.json``, the papers' numbers beside ours.

Everything here reads result files only (never the tracking store), so a report can be
rebuilt from ``results/`` alone.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import atomic_write
from .layout import Layout
from .record import MetricsRecord

__all__ = ["build_report", "cbloss_frame", "paper_table", "similarity_network_label", "to_markdown"]

PAPER_CIFAR = {"cifar10", "cifar100"}


def paper_table(name: str) -> pd.DataFrame:
    """A reference table shipped with the package (``finetail/reference/<name>.csv``)."""
    with resources.files("finetail").joinpath("reference", f"{name}.csv").open() as f:
        return pd.read_csv(f, comment="#")


def to_markdown(df: pd.DataFrame, floatfmt: str = "{:.2f}") -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    cols = list(df.columns)

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "—"
        if isinstance(v, float | np.floating):
            return floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _loss_label(spec: dict) -> str:
    t, beta, gamma = spec["type"], spec.get("beta", 0.0), spec.get("gamma", 0.0)
    s = t if t != "focal" else f"focal γ={gamma:g}"
    return s if not beta else f"CB {s} β={beta:g}"


def _paper_row(spec: dict) -> str:
    if spec.get("beta", 0.0):
        return "class_balanced_best"
    if spec["type"] == "focal":
        return f"focal_g{spec.get('gamma', 0.0):.1f}"
    return spec["type"]


def cbloss_frame(results: Path, cb: dict) -> pd.DataFrame:
    """One row per CB-loss cell: settings and final metrics (percentages)."""
    rows = []
    for ds in cb["datasets"]:
        for imb in cb["imbalance"]:
            for name, spec in cb["losses"].items():
                path = Path(Layout.at(results).train("cbloss", dataset=ds, imbalance=imb, loss=name))
                if not path.exists():
                    raise FileNotFoundError(f"{path} is missing: run the cbloss job for this cell first")
                m = MetricsRecord.read(path)
                f = m.final
                pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
                rows.append(
                    {
                        "dataset": ds, "imbalance": float(imb), "loss": name, "setting": _loss_label(spec),
                        "type": spec["type"], "beta": spec.get("beta", 0.0), "gamma": spec.get("gamma", 0.0),
                        "top1_error": pct(f["top1_error"]), "balanced_acc": pct(f["balanced_acc"]),
                        "many_acc": pct(f["many_acc"]), "medium_acc": pct(f["medium_acc"]),
                        "few_acc": pct(f["few_acc"]), "run_id": m.run_id, "wall_s": m.wall_s,
                    }
                )
    return pd.DataFrame(rows)


def _error_table(df: pd.DataFrame) -> pd.DataFrame:
    """Paper's Table 2 shape: rows = loss settings, columns = imbalance factors, top-1 error (%)."""
    wide = df.pivot_table(index=["dataset", "loss", "setting"], columns="imbalance", values="top1_error", sort=False)
    wide.columns = [f"if{c:g}" for c in wide.columns]
    return wide.reset_index()


def _with_paper(table: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    paper = paper_table("cbloss_cifar_table2")
    specs = df.drop_duplicates("loss").set_index("loss")
    out = table.copy()
    for col in [c for c in table.columns if c.startswith("if")]:
        vals = []
        for _, r in table.iterrows():
            hit = pd.DataFrame()
            if r["dataset"] in PAPER_CIFAR and col in paper.columns:
                key = _paper_row(specs.loc[r["loss"]].to_dict())
                hit = paper[(paper["dataset"] == r["dataset"]) & (paper["loss"] == key)]
            vals.append(float(hit[col].iloc[0]) if len(hit) else np.nan)
        out[f"paper_{col}"] = vals
    return out


def _plot_error_vs_if(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(df["dataset"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], sets, strict=True):
        part = df[df["dataset"] == ds]
        for (loss, setting), g in part.groupby(["loss", "setting"], sort=False):
            g = g.sort_values("imbalance")
            ax.plot(g["imbalance"], g["top1_error"], marker="o", label=setting)
        ax.set_xscale("log")
        ax.set_xticks(sorted(part["imbalance"].unique()))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("imbalance factor")
        ax.set_ylabel("top-1 error (%)")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_per_class(results: Path, df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(df["dataset"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], sets, strict=True):
        part = df[df["dataset"] == ds]
        imb = part["imbalance"].max()
        for _, r in part[part["imbalance"] == imb].iterrows():
            pc = pd.read_csv(Layout.at(results).train("cbloss", "per_class.csv", dataset=ds, imbalance=imb, loss=r["loss"]))
            pc = pc.sort_values("train_count")
            if len(pc) <= 20:
                ax.plot(pc["train_count"], 100 * pc["accuracy"], marker=".", ls="-", alpha=0.8, label=r["setting"])
                continue
            # Many classes: each class a faint dot, and the mean over log-spaced count bins.
            line = ax.plot([], [], marker="o", ls="-", label=r["setting"] + " (bin mean)")[0]
            ax.scatter(pc["train_count"], 100 * pc["accuracy"], s=6, alpha=0.25, color=line.get_color())
            edges = np.unique(np.geomspace(pc["train_count"].min(), pc["train_count"].max() + 1, 8).astype(int))
            bins = pd.cut(pc["train_count"], edges, include_lowest=True, right=False)
            means = pc.groupby(bins, observed=True).agg(n=("train_count", "mean"), acc=("accuracy", "mean"))
            line.set_data(means["n"], 100 * means["acc"])
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{ds}, imbalance {imb:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _natural_section(results: Path, nat: dict, out: Path) -> tuple[list[str], list[Path]]:
    """Paper's Table 3 shape: rows = model x loss, columns = dataset top-1 / top-5 error (%)."""
    rows = []
    for model in nat["models"]:
        tag = model.replace(":", "_")
        for name, spec in nat["losses"].items():
            row = {"model": model, "loss": name, "setting": _loss_label(spec)}
            for ds in nat["datasets"]:
                path = Path(Layout.at(results).train("cbloss_natural", dataset=ds, model=tag, loss=name))
                if not path.exists():
                    raise FileNotFoundError(f"{path} is missing: run that cbloss_natural job first")
                f = MetricsRecord.read(path).final
                row[f"{ds}_top1"] = 100.0 * f["top1_error"]
                row[f"{ds}_top5"] = None if f.get("top5_error") is None else 100.0 * f["top5_error"]
            rows.append(row)
    table = pd.DataFrame(rows)
    paper = paper_table("cbloss_large_table3")
    for ds in nat["datasets"]:
        for k in ("top1", "top5"):
            col = f"{ds}_{k}"
            if col not in paper.columns:
                continue
            vals = []
            for _, r in table.iterrows():
                key = "cb_focal" if nat["losses"][r["loss"]].get("beta", 0) else "softmax"
                hit = paper[(paper["model"] == r["model"].removeprefix("tv:")) & (paper["loss"] == key) & (paper["input"] == 224)]
                vals.append(float(hit[col].iloc[0]) if len(hit) else np.nan)
            table[f"paper_{col}"] = vals
    table.to_csv(out / "cbloss_natural_table.csv", index=False)
    md = to_markdown(table)
    lines = ["\n## Class-balanced loss on naturally long-tailed data: top-1 / top-5 error (%)\n",
             "Rows: model x loss (Cui et al. 2019, Table 3 shape; `paper_*` at 224 px).\n", md]
    return lines, [out / "cbloss_natural_table.csv"]


# Our world's sources play the paper's: rows of the paper's tables beside ours.
PAPER_SOURCE = {"generic": "imagenet", "natural": "inat2017", "generic+natural": "imagenet+inat2017"}
PAPER_SIMILARITY_NETWORK = "Cui et al. 2018: ResNet-101 trained on JFT"


def similarity_network_label(transfer: dict, datasets: dict) -> str:
    """The similarity table's heading: the feature network, and whether it has seen a ranked
    source (the paper's JFT network had not).

    >>> similarity_network_label({"features": {"model": "probe", "networks": {"probe": ["probe"]}},
    ...                           "sources": {"generic": ["generic"]}}, {"probe": {"kind": "world"}})
    'feature network `probe`: trained on world classes disjoint from every source and target'
    """
    feats, sources = transfer.get("features", {}), transfer.get("sources", {})
    model, networks = feats.get("model", ""), feats.get("networks", {})
    if model in networks:
        parts = networks[model]
        if all(datasets.get(d, {}).get("kind") == "world" for d in parts):
            return f"feature network `{model}`: trained on world classes disjoint from every source and target"
        return (f"feature network `{model}`: trained on {', '.join(f'`{d}`' for d in parts)}, "
                "datasets that no source pools and no target is")
    if model in sources:
        return f"feature network: the one pretrained on `{model}`, a ranked source, so it has seen that source's classes"
    weights = feats.get("weights")
    size = f", {feats['image_size']} px, {feats.get('crop', 'short_side')} crop {feats.get('crop_fraction', 0.875):g}" \
        if feats.get("image_size") else ""
    if not weights:
        return f"feature network `{model}` with random weights{size}"
    head = f"feature network `{model}` (torchvision `{weights}` weights{size})"
    if "IMAGENET" not in weights.upper() and weights.upper() != "DEFAULT":
        return head
    name = lambda d: datasets.get(d, {}).get("name", d) if datasets.get(d, {}).get("kind") == "registry" else None  # noqa: E731
    seen = [s for s, parts in sources.items() if any(name(d) == "imagenet" for d in parts)]
    sel = transfer.get("selection") or {}
    if seen and set(sel.get("pool", [])) & set(seen):
        seen.append(sel.get("name", "selected"))
    if not seen:
        return f"{head}: trained on ImageNet, which no ranked source here holds"
    return (f"{head}: trained on ImageNet, so this network has seen one of the ranked sources "
            f"({', '.join(f'`{s}`' for s in seen)}); the paper's network (JFT) had seen none")


def transfer_frame(results: Path, sources: list[str], targets: list[str]) -> pd.DataFrame:
    """One row per fine-tune: source, target, top-1 accuracy (%), run ids."""
    rows = []
    for s in sources:
        for t in targets:
            path = Path(Layout.at(results).train("finetune", source=s, target=t))
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: run the finetune job for {s} -> {t} first")
            m = MetricsRecord.read(path)
            rows.append({"source": s, "target": t, "top1_acc": 100.0 * m.final["top1_acc"],
                         "run_id": m.run_id, "parent_run_id": m.parent_run_id})
    return pd.DataFrame(rows)


def correlations(x: np.ndarray, y: np.ndarray) -> dict:
    """Spearman's rho and Kendall's tau (with p-values) of paired samples."""
    from scipy import stats

    rho = stats.spearmanr(x, y)
    tau = stats.kendalltau(x, y)
    return {"n": int(len(x)), "spearman": float(rho.statistic), "spearman_p": float(rho.pvalue),
            "kendall": float(tau.statistic), "kendall_p": float(tau.pvalue)}


def _plot_similarity_vs_accuracy(pairs: pd.DataFrame, corr: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = dict(zip(sorted(pairs["source"].unique()), "osD^vP*X", strict=False))
    for t, g in pairs.groupby("target"):
        for _, r in g.iterrows():
            ax.scatter(r["similarity"], r["gain"], marker=markers[r["source"]], color=f"C{sorted(pairs['target'].unique()).index(t)}",
                       s=40, label=t if r["source"] == g["source"].iloc[0] else None)
    for s, m in markers.items():
        ax.scatter([], [], marker=m, color="grey", label=s)
    ax.set_xlabel("domain similarity exp(-γ EMD)")
    ax.set_ylabel("fine-tune accuracy minus target mean (points)")
    ax.set_title(f"Spearman ρ={corr['spearman']:.2f}, Kendall τ={corr['kendall']:.2f} (n={corr['n']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _transfer_section(results: Path, spec: dict, out: Path) -> tuple[list[str], list[Path]]:
    tr = spec["transfer"]
    targets = tr["targets"]
    rows = list(spec["sources"]) + (["scratch"] if tr["finetune"].get("scratch", True) else [])
    df = transfer_frame(results, rows, targets)
    df.to_csv(out / "transfer_cells.csv", index=False)
    table = df.pivot(index="source", columns="target", values="top1_acc").reindex(index=rows, columns=targets)
    table["mean"] = table.mean(axis=1)
    table = table.reset_index()
    table.to_csv(out / "transfer_table.csv", index=False)
    paper = paper_table("transfer_table")
    sim = pd.read_csv(Layout.at(results).similarity(spec["feature_model"]), index_col=0)
    layout = Layout.at(results)
    heatmap = os.path.relpath(layout.similarity(spec["feature_model"], "heatmap.png"), os.path.dirname(layout.report()))
    paper_sim = paper_table("domain_similarity")

    # Pairs (source, target) with a similarity and an accuracy. Accuracy differs by target far
    # more than by source, so the scatter and the correlation use the accuracy minus the
    # target's mean over sources ("gain"), as well as the raw accuracy.
    pairs = df[df["source"].isin(sim.index)].copy()
    pairs["similarity"] = [float(sim.loc[s, t]) for s, t in zip(pairs["source"], pairs["target"], strict=True)]
    pairs["gain"] = pairs["top1_acc"] - pairs.groupby("target")["top1_acc"].transform("mean")
    scratch = df[df["source"] == "scratch"].set_index("target")["top1_acc"]
    if len(scratch):
        pairs["gain_over_scratch"] = pairs["top1_acc"] - pairs["target"].map(scratch)
    pairs.to_csv(out / "similarity_vs_accuracy.csv", index=False)
    corr_gain = correlations(pairs["similarity"].to_numpy(), pairs["gain"].to_numpy())
    corr_raw = correlations(pairs["similarity"].to_numpy(), pairs["top1_acc"].to_numpy())
    per_target = [correlations(g["similarity"].to_numpy(), g["top1_acc"].to_numpy())["kendall"]
                  for _, g in pairs.groupby("target") if len(g) > 2]
    corr = {"vs_gain": corr_gain, "vs_accuracy": corr_raw,
            "mean_within_target_kendall": float(np.nanmean(per_target)) if per_target else None}
    (out / "transfer_correlation.json").write_text(json.dumps(corr, indent=2) + "\n")
    _plot_similarity_vs_accuracy(pairs, corr_gain, out / "similarity_vs_accuracy.png")

    best = table.set_index("source").drop(index="scratch", errors="ignore")[targets].idxmax()
    lines = [
        "## Transfer: fine-tune top-1 accuracy (%)\n",
        "Rows: pretraining source (`scratch` = random weights), columns: targets (Cui et al. 2018 table shape).\n",
        to_markdown(table),
        "\nBest source per target: " + ", ".join(f"{t}: **{s}**" for t, s in best.items()) + "\n",
        "\nThe paper's table (Inception-v3, real data; our sources play: "
        + ", ".join(f"{k} = {v}" for k, v in PAPER_SOURCE.items()) + ", selected = selected_585):\n",
        to_markdown(paper),
        f"\n## Domain similarity ({similarity_network_label(tr, spec.get('datasets', {}))})\n",
        to_markdown(sim.reset_index().rename(columns={"index": "source"}), "{:.3f}"),
        f"\nThe paper's ({PAPER_SIMILARITY_NETWORK}):\n",
        to_markdown(paper_sim, "{:.3f}"),
        f"\n![similarity]({heatmap})\n",
        "\n## Similarity vs fine-tune accuracy\n",
        f"Over {corr_gain['n']} (source, target) pairs, similarity vs accuracy relative to the target's mean: "
        f"Spearman ρ = {corr_gain['spearman']:.3f} (p = {corr_gain['spearman_p']:.3g}), "
        f"Kendall τ = {corr_gain['kendall']:.3f} (p = {corr_gain['kendall_p']:.3g}). "
        f"Raw accuracy: Spearman ρ = {corr_raw['spearman']:.3f}, Kendall τ = {corr_raw['kendall']:.3f}. "
        + (f"Mean within-target Kendall τ: {corr['mean_within_target_kendall']:.3f}.\n"
           if corr["mean_within_target_kendall"] is not None else "\n"),
        "\n![similarity vs accuracy](similarity_vs_accuracy.png)\n",
    ]
    sel = spec.get("selected")
    if sel:
        chosen_csv = Layout.at(results).selection(sel)
        chosen = pd.read_csv(chosen_csv)
        lines.append(f"\nSelected source `{sel}`: {len(chosen)} classes (greedy, union over targets); "
                     f"list with scores in `{Path(chosen_csv).relative_to(results)}`.\n")
    files = [out / n for n in ("transfer_cells.csv", "transfer_table.csv", "transfer_correlation.json",
                               "similarity_vs_accuracy.csv", "similarity_vs_accuracy.png")]
    return lines, files


def build_report(results: Path, spec: dict, out: Path) -> list[Path]:
    """Write the report files under ``out`` and return their paths (summary.md last)."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sections = [f"# finetail report: study `{spec.get('study', results.name)}`\n"]
    cb = spec.get("cbloss")
    if cb:
        df = cbloss_frame(results, cb)
        df.to_csv(out / "cbloss_cells.csv", index=False)
        table = _with_paper(_error_table(df), df)
        table.to_csv(out / "cbloss_table.csv", index=False)
        md = to_markdown(table.drop(columns=[c for c in table.columns if table[c].isna().all()]))
        (out / "cbloss_table.md").write_text(md)
        shots = df[["dataset", "imbalance", "setting", "top1_error", "balanced_acc", "many_acc", "medium_acc", "few_acc"]]
        (out / "cbloss_shots.md").write_text(to_markdown(shots))
        _plot_error_vs_if(df, out / "cbloss_error_vs_if.png")
        _plot_per_class(results, df, out / "cbloss_per_class.png")
        written += [out / n for n in ("cbloss_cells.csv", "cbloss_table.csv", "cbloss_table.md", "cbloss_shots.md",
                                      "cbloss_error_vs_if.png", "cbloss_per_class.png")]
        has_paper = bool(table.filter(like="paper_").notna().any().any())
        sections += [
            "## Class-balanced loss: top-1 error (%)\n",
            "Rows: loss settings; columns: imbalance factor (Cui et al. 2019, Table 2 shape)."
            + (" `paper_*`: the paper's numbers (CB rows: its best class-balanced setting)." if has_paper else
               " The paper's numbers are printed for CIFAR datasets only; see `cbloss_table.csv`.") + "\n",
            md,
            "\n## Many / medium / few-shot accuracy (%)\n",
            to_markdown(shots),
            "\n![error vs imbalance](cbloss_error_vs_if.png)\n\n![per-class accuracy](cbloss_per_class.png)\n",
        ]
    if spec.get("cbloss_natural"):
        lines, files = _natural_section(results, spec["cbloss_natural"], out)
        sections += lines
        written += files
    if spec.get("transfer"):
        lines, files = _transfer_section(results, spec, out)
        sections += lines
        written += files
    summary = out / "summary.md"
    atomic_write(summary, lambda tmp: tmp.write_text("\n".join(sections)))
    written.append(summary)
    return written
