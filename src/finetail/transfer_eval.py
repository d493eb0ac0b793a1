"""Which score predicts transfer, and is greedy selection worth it? (the report's transfer extras)

**Scores against the real outcome.** Every ranked source was pretrained and fine-tuned on
every target under one recipe, so each transferability score (:mod:`finetail.transferability`,
computed by :mod:`finetail.scoring`) and domain similarity (``exp(-γ EMD)``, one value per
pair from the feature network) can be checked against the accuracy the fine-tuning actually
reached. Per target, over the sources:

- Kendall's τ between the score and the fine-tuned top-1 accuracy (both the mean over replicates:
  the headline), and the weighted τ of the LogME paper's protocol (``scipy.stats.weightedtau``,
  hyperbolic weights, so the top of the ranking counts most);
- the same Kendall τ per replicate (replicate ``R``'s score of its pretrained network against
  its fine-tuned accuracy), averaged over targets: its spread over replicates says whether one
  score's lead over another is beyond replicate noise (paired over replicates, Holm-corrected
  over the rivals of the best score).

A constant score on a target (it ranks nothing) has no τ there: ``—``, left out of the means.
Seconds: each score's mean time per (source network, target) pair; the forward pass that
feeds the five scores is timed apart; the EMD's time is re-measured here from the stored
class means (and the value checked against the similarity matrix, so a stale matrix fails).

**Greedy vs random.** The ``selected`` source (greedy, by similarity) against a source of as
many pool classes and training images drawn at random (``selection.random``), same recipe,
same compute; and the whole pool where a source pools exactly the pool's datasets. Paired
over replicates per target and on the mean over targets: each replicate has its own world,
feature network, greedy selection and random draw, so the comparison is with a distribution
of draws, not one.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .claims import Claim, comparison, pooled_claim
from .layout import Layout
from .replicates import Replicates
from .stats import Summary, format_mean_std, holm, summarize

__all__ = [
    "EMD",
    "SCORE_LABELS",
    "plugin_labels",
    "rank_agreement",
    "score_pairs",
    "scores_frame",
    "selection_ablation",
    "transferability_section",
]

EMD = "emd"
SCORE_LABELS = {EMD: "domain similarity exp(−γ EMD)", "logme": "LogME", "leep": "LEEP", "nce": "NCE",
                "hscore": "H-score", "regularized_hscore": "H-score, Ledoit-Wolf regularised", "knn": "k-NN accuracy"}


def scores_frame(results: Path, sources: list[str], targets: list[str], seeds: list[int], scores: list[str],
                 rep: Replicates | None = None) -> pd.DataFrame:
    """Long frame of every pair's scores: source, target, replicate (``seed``), score, value,
    seconds (and the run id of the network scored), from each replicate's ``scores.csv`` (one
    file per replicate with ``rep``; without it, one file per pair holding every seed's row).
    A missing file, replicate or score, or a non-finite value fails naming the file; so do
    stale scores: of another network than the source's pretraining run of that replicate (its
    ``metrics.json``), or of another version of the target's manifest."""
    from .fileio import file_sha256
    from .record import MetricsRecord

    layout, rows = Layout.at(results), []
    run_ids: dict[tuple[str, int], str | None] = {}  # (source, seed) -> its pretraining run, read once

    def pretrained(source: str, seed: int) -> str | None:
        if (source, seed) not in run_ids:
            m = Path(layout.train("pretrain", source=source, seed=seed))
            if not m.exists():
                raise FileNotFoundError(f"{m} is missing: the pretraining run of {source}, seed {seed}, "
                                        "whose network was scored")
            run_ids[(source, seed)] = MetricsRecord.read(m).run_id
        return run_ids[(source, seed)]

    files = [(s, t, [r], layout.scores(s, t, rep=r), layout.dataset(t, rep=rep.dataset_key(t, r)))
             for s in sources for t in targets for r in seeds] if rep else \
        [(s, t, list(seeds), layout.scores(s, t), layout.dataset(t)) for s in sources for t in targets]
    manifests: dict[str, str] = {}
    for s, t, want_seeds, score_file, manifest in files:
        if manifest not in manifests:
            manifests[manifest] = file_sha256(manifest)
        path = Path(score_file)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the transferability job for {s} -> {t} first")
        df = pd.read_csv(path)
        missing = sorted(set(want_seeds) - set(df["seed"].astype(int)))
        if missing:
            raise ValueError(f"{path} has no row for seed(s) {missing}: stale scores, rerun the job")
        for score in scores:
            if score not in df.columns:
                raise ValueError(f"{path} has no {score!r} column: rerun the transferability job")
        for _, r in df[df["seed"].astype(int).isin(want_seeds)].iterrows():
            want = pretrained(s, int(r["seed"]))
            if str(r["model_run_id"]) != str(want):
                raise ValueError(f"{path}: seed {int(r['seed'])} scored the network of run {r['model_run_id']}, "
                                 f"but {s}'s pretraining run is {want}: stale scores, rerun the job")
            if r["manifest_sha256"] != manifests[manifest]:
                raise ValueError(f"{path}: scored another version of {t}'s manifest: stale scores, rerun the job")
            for score in scores:
                v = float(r[score])
                if not math.isfinite(v):
                    raise ValueError(f"{path}: {score} of seed {int(r['seed'])} is {v}")
                rows.append({"source": s, "target": t, "seed": int(r["seed"]), "score": score, "value": v,
                             "seconds": float(r[f"{score}_s"]), "extract_s": float(r["extract_s"]),
                             "model_run_id": r.get("model_run_id", ""), "n_le_d": _n_le_d(r),
                             "plugin": r.get(f"{score}_plugin")})
    return pd.DataFrame(rows)


def _n_le_d(row: pd.Series) -> bool | None:
    """Whether a scores.csv row was computed with no more images than feature dimensions (its
    ``n_le_d`` column, or from ``n_images`` and ``feature_dim`` in files written before it);
    None where the row says neither."""
    if "n_le_d" in row.index and pd.notna(row["n_le_d"]):
        return str(row["n_le_d"]).lower() in ("true", "1", "1.0")
    if {"n_images", "feature_dim"} <= set(row.index) and pd.notna(row["n_images"]) and pd.notna(row["feature_dim"]):
        return bool(int(row["n_images"]) <= int(row["feature_dim"]))
    return None


def _n_le_d_line(long: pd.DataFrame) -> str:
    """One line naming the targets scored with N <= D, or nothing."""
    if "n_le_d" not in long.columns:
        return ""
    small = sorted(set(long.loc[long["n_le_d"].eq(True), "target"]))
    if not small:
        return ""
    return (f"\nScored with no more training images than feature dimensions (N ≤ D) on: {', '.join(small)}. There "
            "the sample covariance is singular and the plain H-score is C − 1 for every network, so its τ says "
            "nothing; the Ledoit-Wolf regularised H-score (`regularized_hscore`) does not have this problem.\n")


def emd_frame(results: Path, spec: dict, sources: list[str], targets: list[str], seeds: list[int]) -> pd.DataFrame:
    """Domain similarity of each pair in each replicate as a score (from that replicate's
    feature network and world), its EMD re-timed from the stored class means, and checked
    against that replicate's similarity matrix."""
    from .similarity import (
        DEFAULT_GAMMA,
        DEFAULT_MIN_SOURCE_IMAGES,
        domain_similarity,
        load_class_stats,
    )

    layout, fm, rep = Layout.at(results), spec["feature_model"], Replicates.of(spec)
    cfg = spec["transfer"].get("similarity", {})
    gamma, min_images = cfg.get("gamma", DEFAULT_GAMMA), cfg.get("min_source_images", DEFAULT_MIN_SOURCE_IMAGES)
    rows, warm = [], False
    for seed in seeds:
        matrix = layout.similarity(fm, rep=rep.similarity_key([*sources, *targets], seed))
        sim = pd.read_csv(matrix, index_col=0)
        stats = {d: load_class_stats(layout.features(fm, d, rep=rep.features_key(d, seed))) for d in [*sources, *targets]}
        if not warm:  # untimed first call: POT's import is not the EMD's cost
            s0, t0_ = sources[0], targets[0]
            domain_similarity(stats[s0].means, stats[s0].counts, stats[t0_].means, stats[t0_].counts, gamma=gamma,
                              min_source_images=min_images)
            warm = True
        for s in sources:
            for t in targets:
                t0 = time.perf_counter()
                value, _ = domain_similarity(stats[s].means, stats[s].counts, stats[t].means, stats[t].counts,
                                             gamma=gamma, min_source_images=min_images)
                secs = time.perf_counter() - t0
                if abs(value - float(sim.loc[s, t])) > 1e-5:
                    raise ValueError(f"{matrix}: {s} -> {t} is {float(sim.loc[s, t]):.6f}, but the class "
                                     f"means give {value:.6f}: a stale similarity matrix, rerun the similarity job")
                rows.append({"source": s, "target": t, "seed": int(seed), "score": EMD, "value": value, "seconds": secs,
                             "extract_s": math.nan, "model_run_id": ""})
    return pd.DataFrame(rows)


def score_pairs(scores: pd.DataFrame, acc: pd.DataFrame) -> pd.DataFrame:
    """Each score row joined with the fine-tuned accuracy of the same (source, target, seed)
    and that fine-tune's run id (``run_id``: ``finetail lineage report/transferability_pairs.csv:<row>``
    walks from it to the pretraining run that was scored)."""
    a = acc[["source", "target", "seed", "top1_acc", *(["run_id"] if "run_id" in acc else [])]]
    out = scores.merge(a, on=["source", "target", "seed"], how="left", validate="many_to_one")
    lost = out[out["top1_acc"].isna()]
    if len(lost):
        r = lost.iloc[0]
        raise ValueError(f"no fine-tune accuracy for {r['source']} -> {r['target']}, seed {r['seed']}")
    return out


def _tau(x: np.ndarray, y: np.ndarray, weighted: bool = False) -> float:
    """Kendall's τ (or scipy's weighted τ) of ``x`` against ``y``; NaN when either is constant
    (nothing is ranked) or there are fewer than two points."""
    from scipy import stats

    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float((stats.weightedtau if weighted else stats.kendalltau)(x, y).statistic)


def _nanmean(values) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def plugin_labels(long: pd.DataFrame, plugins: dict[str, str]) -> dict[str, str]:
    """Each score plugin's row label, ``<name> [plugin <ref>, <distribution> <version>]`` (or
    ``code <digest>``), from its ``scores.csv`` column ``<name>_plugin``. Pairs scored by
    different code of one plugin raise, naming the score: they cannot be ranked together."""
    out = {}
    for name in plugins:
        seen = sorted({str(v) for v in long.loc[long["score"] == name, "plugin"].dropna()})
        if len(seen) != 1:
            raise ValueError(f"score plugin {name!r}: its scores.csv files record "
                             + (f"different code ({'; '.join(seen)})" if seen else "no plugin")
                             + ": rerun the stale transferability jobs")
        out[name] = f"{name} [{seen[0]}]"
    return out


def rank_agreement(pairs: pd.DataFrame, targets: list[str], order: list[str],
                   labels: dict[str, str] | None = None) -> tuple[pd.DataFrame, dict]:
    """Per score (rows in ``order``): Kendall τ per target on the seed means, its mean over
    targets, the mean weighted τ, the per-seed mean τ (mean ± std over seeds) and seconds per
    pair. Also returns score -> {seed: mean τ over targets} for paired comparisons.
    ``labels``: row labels over :data:`SCORE_LABELS` (score plugins')."""
    labels = {**SCORE_LABELS, **(labels or {})}
    rows, per_seed_all = [], {}
    for score in order:
        g = pairs[pairs["score"] == score]
        means = g.groupby(["target", "source"], sort=False)[["value", "top1_acc"]].mean().reset_index()
        row: dict = {"score": score, "label": labels.get(score, score)}
        taus, wtaus = [], []
        for t in targets:
            m = means[means["target"] == t]
            taus.append(_tau(m["value"].to_numpy(), m["top1_acc"].to_numpy()))
            wtaus.append(_tau(m["value"].to_numpy(), m["top1_acc"].to_numpy(), weighted=True))
            row[f"{t}_tau"] = taus[-1]
        per_seed = {}
        for seed, gs in g.groupby("seed"):
            per_seed[int(seed)] = _nanmean([_tau(gt["value"].to_numpy(), gt["top1_acc"].to_numpy())
                                            for _, gt in gs.groupby("target")])
        per_seed_all[score] = per_seed
        ranked = [v for v in per_seed.values() if not math.isnan(v)]  # a seed whose score ranks nothing: left out
        spread = summarize(ranked) if ranked else Summary(math.nan, math.nan, 0)
        row.update({"mean_tau": _nanmean(taus), "mean_weighted_tau": _nanmean(wtaus),
                    "seed_tau_mean": spread.mean, "seed_tau_std": spread.std, "seeds": len(per_seed),
                    "seconds_per_pair": float(g.drop_duplicates(["source", "target", "seed"])["seconds"].mean()),
                    "pairs": len(g)})
        rows.append(row)
    return pd.DataFrame(rows), per_seed_all


def best_score_claim(table: pd.DataFrame, per_seed: dict, sources: str = "training seed") -> tuple[str, list[Claim]]:
    """Which score ranked the sources best on this study (mean τ over targets), and whether
    its lead over each other score is beyond replicate noise: per-replicate τ paired over
    replicates, Holm-corrected over the K rivals (the best was chosen after looking, so its
    comparisons are a family). Returns the summary line and one ``claims.csv`` row per rival."""
    ranked = table.dropna(subset=["mean_tau"]).sort_values(["mean_tau", "mean_weighted_tau"], ascending=False)
    if ranked.empty:
        return "- **Which score predicts transfer**: no score ranks the sources on any target (too few sources).\n", []
    best = ranked.iloc[0]
    head = (f"- **Which score predicts transfer**: {best['label']} ranked the sources best on this study "
            f"(mean within-target Kendall τ {best['mean_tau']:.2f} on the replicate means, weighted τ "
            f"{best['mean_weighted_tau']:.2f}; each replicate alone "
            f"{format_mean_std(best['seed_tau_mean'], best['seed_tau_std'])})")
    unranked = table.loc[table["mean_tau"].isna(), "label"].tolist()
    if unranked:
        head += f" ({', '.join(unranked)}: constant over the sources, no ranking)"
    if len(per_seed[best["score"]]) < 2:
        return head + "; one replicate, so whether its lead is beyond replicate noise cannot be told.\n", []
    members, labels = {}, {}
    for _, r in ranked.iloc[1:].iterrows():
        a, b = per_seed[best["score"]], per_seed[r["score"]]
        seeds = sorted(s for s in set(a) & set(b) if not (math.isnan(a[s]) or math.isnan(b[s])))
        if len(seeds) >= 2:  # fewer than two replicates where both rank: no spread to judge by
            members[r["score"]] = ([a[s] for s in seeds], [b[s] for s in seeds])
            labels[r["score"]] = r["label"]
    if ranked.iloc[1:].empty:
        return head + "; no other score ranks the sources here.\n", []
    rows = [comparison(f"transfer:score:{best['score']}-vs-{name}:tau",
                       f"{best['label']} vs {labels[name]}: within-target Kendall tau, mean over targets",
                       *members[name], higher_is_better=True, sources=sources) for name in members]
    # the rivals are one family (the best was chosen after looking): Holm-adjusted p per comparison
    rows = [replace(r, p_holm=p) for r, p in zip(rows, holm([r.p_holm for r in rows]), strict=True)]
    beaten = [labels[n] for n, r in zip(members, rows, strict=True) if r.p_holm < 0.05 and r.estimate > 0]
    if members:
        pooled, _ = pooled_claim(f"transfer:best_score:{best['score']}", f"{best['label']} ranks sources better than "
                                 f"every other score (Holm over {len(members)})", members, True, sources)
        rows.append(pooled)
    tied = [r["label"] for _, r in ranked.iloc[1:].iterrows() if r["label"] not in beaten]
    if not tied:
        return head + ", ahead of every other score beyond replicate noise (per-replicate τ, paired, Holm).\n", rows
    if not beaten:
        return (head + "; but **no score beats the others** beyond replicate noise here: its lead over "
                + ", ".join(tied) + " is within the spread over replicates (per-replicate τ, paired, Holm).\n"), rows
    return (head + f"; ahead of {', '.join(beaten)} beyond replicate noise, not of {', '.join(tied)} "
            "(per-replicate τ, paired over replicates, Holm).\n"), rows


def rank_markdown(table: pd.DataFrame, targets: list[str]) -> str:
    from .report import to_markdown

    md = pd.DataFrame({"score": table["label"]})
    for t in targets:
        md[t] = table[f"{t}_tau"]
    md["mean τ"] = table["mean_tau"]
    md["mean weighted τ"] = table["mean_weighted_tau"]
    md["τ per replicate"] = [format_mean_std(m, s) for m, s in zip(table["seed_tau_mean"], table["seed_tau_std"], strict=True)]
    return to_markdown(md, "{:.2f}")


def plot_scores_vs_accuracy(pairs: pd.DataFrame, table: pd.DataFrame, path: Path) -> None:
    """One panel per score: the score (standardised within each target) against the fine-tuned
    accuracy minus the target's mean, seed means, one colour per target, one marker per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(table["score"])
    cols = min(3, len(order))
    rows_n = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    sources = sorted(pairs["source"].unique())
    targets = list(dict.fromkeys(pairs["target"]))
    markers = dict(zip(sources, "osD^vP*X", strict=False))
    for ax, score in zip(axes.flat, order, strict=False):
        g = pairs[pairs["score"] == score].groupby(["target", "source"], sort=False)[["value", "top1_acc"]].mean()
        g = g.reset_index()
        for i, t in enumerate(targets):
            m = g[g["target"] == t].sort_values("value")
            sd = m["value"].std(ddof=0)
            x = (m["value"] - m["value"].mean()) / (sd if sd > 0 else 1.0)
            y = m["top1_acc"] - m["top1_acc"].mean()
            ax.plot(x, y, color=f"C{i}", alpha=0.5, lw=1, label=t)
            for xi, yi, s in zip(x, y, m["source"], strict=True):
                ax.scatter(xi, yi, color=f"C{i}", marker=markers[s], s=28)
        r = table.set_index("score").loc[score]
        ax.set_title(f"{r['label']}: τ={r['mean_tau']:.2f}, wτ={r['mean_weighted_tau']:.2f}", fontsize=9)
        ax.set_xlabel("score, standardised within target", fontsize=8)
        ax.set_ylabel("accuracy − target mean (points)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(order):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=f"C{i}", label=t) for i, t in enumerate(targets)]
    handles += [plt.Line2D([], [], color="grey", marker=m, ls="", label=s) for s, m in markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pool_source(tr: dict) -> str | None:
    """The source that pools exactly the selection pool's datasets (the whole pool), if any."""
    sel = tr.get("selection") or {}
    want = sorted(d for p in sel.get("pool", []) for d in tr["sources"].get(p, []))
    for name, parts in tr["sources"].items():
        if sorted(parts) == want:
            return name
    return None


def selection_ablation(acc: pd.DataFrame, selected: str, random: str, pool: str | None,
                       targets: list[str]) -> pd.DataFrame:
    """Per target and on the mean over targets: selected, random (and whole pool) top-1
    accuracy, mean ± std over replicates, and selected − random paired over replicates with its
    95% CI and P(selected > random)."""
    rows = []
    per_seed = acc.pivot_table(index=["target", "seed"], columns="source", values="top1_acc")
    mean_over_targets = per_seed.groupby("seed").mean()
    for t in [*targets, "mean"]:
        g = mean_over_targets if t == "mean" else per_seed.loc[t]
        row: dict = {"target": t}
        for name, src in (("selected", selected), ("random", random), ("pool", pool)):
            if src is None:
                continue
            st = summarize(g[src].tolist())
            row.update({f"{name}_mean": st.mean, f"{name}_std": st.std})
        c = comparison("", "", g[selected].tolist(), g[random].tolist(), higher_is_better=True, sources="")
        row.update({"selected_minus_random": c.estimate, "ci_low": c.low, "ci_high": c.high, "n": c.replicates,
                    "verdict": c.verdict, "p_improve": c.p_improve, "p_improve_low": c.p_improve_low,
                    "p_improve_high": c.p_improve_high})
        rows.append(row)
    return pd.DataFrame(rows)


def selection_sizes(results: Path, spec: dict, name: str) -> list[tuple[int, int]]:
    """(classes, training images) of the pooled source ``name`` in each replicate."""
    rep, layout = Replicates.of(spec), Layout.at(results)
    out = []
    for r in rep.ids:
        c = pd.read_csv(layout.source(name, "classes.csv", rep=rep.source_key(name, r)))
        out.append((len(c), int(c["train_count"].sum())))
    return out


def _size_words(sizes: list[tuple[int, int]]) -> str:
    """Classes and training images of a source over the replicates (a range where they differ)."""
    def span(values: list[int]) -> str:
        lo, hi = min(values), max(values)
        return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"

    return f"{span([c for c, _ in sizes])} classes, {span([n for _, n in sizes])} training images"


def _ablation_markdown(ab: pd.DataFrame, names: dict[str, str]) -> str:
    from .report import to_markdown

    md = pd.DataFrame({"target": ab["target"]})
    for key, label in names.items():
        if f"{key}_mean" in ab:
            md[label] = [format_mean_std(m, s, 1) for m, s in zip(ab[f"{key}_mean"], ab[f"{key}_std"], strict=True)]
    md["selected − random [95% CI]"] = [f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" if n > 1 else f"{d:+.1f} (one replicate)"
                                       for d, lo, hi, n in zip(ab["selected_minus_random"], ab["ci_low"], ab["ci_high"],
                                                               ab["n"], strict=True)]
    md["P(selected better)"] = [f"{p:.2f} [{lo:.2f}, {hi:.2f}]" for p, lo, hi in
                                zip(ab["p_improve"], ab["p_improve_low"], ab["p_improve_high"], strict=True)]
    md["verdict"] = ab["verdict"]
    return to_markdown(md, "{:.1f}")


def transferability_section(results: Path, spec: dict, out: Path,
                            acc: pd.DataFrame) -> tuple[list[str], list[Path], list[str], list[Claim]]:
    """The report's lines, files, claims and ``claims.csv`` rows on transferability scores and
    greedy vs random. ``acc``: the fine-tune runs (finetail.report.transfer_frame)."""
    from .report import transfer_sources

    tr = spec["transfer"]
    rep = Replicates.of(spec)
    targets, seeds = tr["targets"], list(rep.ids)
    sources = list(spec["sources"])
    plugins = (tr.get("transferability") or {}).get("plugins") or {}  # score plugins, ranked like the built-ins
    scores = [*(tr.get("transferability") or {}).get("scores", []), *plugins]
    lines: list[str] = []
    files: list[Path] = []
    claims: list[str] = []
    rows: list[Claim] = []
    if scores:
        long = pd.concat([emd_frame(results, spec, sources, targets, seeds),
                          scores_frame(results, sources, targets, seeds, scores, rep)], ignore_index=True)
        pairs = score_pairs(long, acc[acc["source"].isin(sources)])
        pairs.to_csv(out / "transferability_pairs.csv", index=False)
        table, per_seed = rank_agreement(pairs, targets, [EMD, *scores], plugin_labels(long, plugins))
        table.to_csv(out / "transferability.csv", index=False)
        plot_scores_vs_accuracy(pairs, table, out / "transferability_vs_accuracy.png")
        files += [out / "transferability.csv", out / "transferability_pairs.csv", out / "transferability_vs_accuracy.png"]
        claim, found = best_score_claim(table, per_seed, transfer_sources(spec, random_source=bool(spec.get("random"))))
        claims.append(claim)
        rows += found
        k = (tr.get("transferability") or {}).get("knn_k", 10)
        lines += [
            "\n## Which score predicts transfer?\n",
            f"Each score of the {len(sources)} sources' networks on each target's training images (no fine-tuning, "
            f"no test image), against the fine-tuned top-1 accuracy over the sources: Kendall τ per target and its "
            f"mean (score and accuracy as means over the {len(seeds)} replicates), the mean weighted τ (scipy "
            f"`weightedtau`, the LogME paper's protocol), the mean τ of each replicate on its own (mean ± std over "
            f"replicates). Domain similarity uses the feature network's class means; the others the source "
            f"network's own features (LogME, H-score, k-NN with k={k}, cosine, leave-one-out) or its softmax over the "
            f"source classes (LEEP; NCE on its argmax). Each score's seconds per (network, target) pair, and the "
            f"forward pass's, are in `transferability.csv` and `transferability_pairs.csv` (measured times: this "
            f"page stays byte-identical between reruns).\n",
            rank_markdown(table, targets),
            _n_le_d_line(long),
            "\n" + claim,
            "\n![scores vs accuracy](transferability_vs_accuracy.png)\n",
        ]
    sel, rnd = spec.get("selected"), spec.get("random")
    if sel and rnd:
        more_lines, more_files, claim, found = _selection_part(results, spec, out, acc, sel, rnd)
        lines, files, rows = lines + more_lines, files + more_files, rows + found
        claims.append(claim)
    return lines, files, claims, rows


def _selection_part(results: Path, spec: dict, out: Path, acc: pd.DataFrame, sel: str,
                    rnd: str) -> tuple[list[str], list[Path], str, list[Claim]]:
    """Greedy vs random: the table (``selection_vs_random.csv``), the claim line and its
    ``claims.csv`` rows."""
    from .report import transfer_sources

    tr = spec["transfer"]
    targets = tr["targets"]
    covered = transfer_sources(spec, random_source=True)
    pool = _pool_source(tr)
    ab = selection_ablation(acc, sel, rnd, pool, targets)
    ab.to_csv(out / "selection_vs_random.csv", index=False)
    names = {"selected": f"`{sel}` (greedy)", "random": f"`{rnd}` (random)"}
    if pool:
        names["pool"] = f"`{pool}` (whole pool)"
    per_rep = acc.pivot_table(index=["target", "seed"], columns="source", values="top1_acc")
    rows = []
    for t in [*targets, "mean"]:
        g = per_rep.groupby("seed").mean() if t == "mean" else per_rep.loc[t]
        what = "mean over targets" if t == "mean" else t
        rows.append(comparison(f"transfer:{sel}-vs-{rnd}:{t}", f"greedy selection vs random classes, fine-tuned "
                               f"top-1 accuracy (points), {what}", g[sel].tolist(), g[rnd].tolist(),
                               higher_is_better=True, sources=covered))
    m = rows[-1]
    verdict = {"better": "greedy selection beats random classes", "worse": "random classes beat greedy selection",
               "not clear": "not clear whether greedy selection beats random classes"}[m.verdict]
    sizes = {n: selection_sizes(results, spec, n) for n in (sel, rnd)}
    same = ("same number of classes and images in every replicate" if sizes[sel] == sizes[rnd] else
            f"NOT the same size: {_size_words(sizes[sel])} vs {_size_words(sizes[rnd])}")
    claim = (f"- **Is greedy selection worth it? — {m.verdict}**: {verdict}: `{sel}` − `{rnd}` = {m.interval()} "
             f"points on the mean over targets (95% CI, paired over {m.replicates} replicates, each with its own "
             f"selection and random draw); holds in {m.holds_in} of {m.replicates} replicates; {m.improvement()}; "
             f"same recipe, {same}; interval covering {covered}.\n")
    lines = [
        "\n## Is greedy selection worth it? Selected vs random classes\n",
        f"`{sel}`: {_size_words(sizes[sel])}, chosen greedily by domain similarity; `{rnd}`: "
        f"{_size_words(sizes[rnd])}, drawn at random from the same pool (one draw per replicate, seed "
        f"{(tr.get('selection') or {}).get('random', {}).get('seed', 0)} + replicate where the draw varies); "
        "pretrained and fine-tuned with the same recipe. Fine-tune top-1 accuracy (%), mean ± std over replicates; "
        "the difference is paired over replicates."
        + ("" if pool else " No source of this study pools the whole selection pool (world_full.yaml has one).")
        + "\n",
        _ablation_markdown(ab, names),
        "\n" + claim,
    ]
    return lines, [out / "selection_vs_random.csv"], claim, rows
