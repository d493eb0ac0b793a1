"""Greedy vs random sources and the ranking of transferability scores against fine-tuned accuracy
(finetail.selection.random_subset, finetail.transfer.pool_sources with image quotas,
finetail.transfer_eval)."""

import json
import math
from pathlib import Path
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import toy_images
from scipy import stats

from finetail.manifest import load_array_split, read_manifest, write_array_dataset
from finetail.selection import _quotas, random_subset
from finetail.similarity import ClassStats
from finetail.transfer import pool_sources
from finetail.transfer_eval import (
    _pool_source,
    best_score_claim,
    rank_agreement,
    score_pairs,
    selection_ablation,
)


def _pool(counts):
    names = [f"c{i:02d}" for i in range(len(counts))]
    return ClassStats(np.zeros((len(counts), 2)), counts, names)


def test_quotas_split_the_total_in_proportion_and_respect_bounds():
    q = _quotas(np.array([10, 20, 30, 40]), 50)
    assert q.tolist() == [5, 10, 15, 20]
    q = _quotas(np.array([1, 3, 100]), 10)  # a proportional share under 1 still keeps one image
    assert q.sum() == 10 and q.min() >= 1 and (q <= [1, 3, 100]).all()
    q = _quotas(np.array([7, 7, 7]), 10)  # largest remainder, ties by position
    assert q.tolist() == [4, 3, 3]


def test_random_subset_matches_the_selection_in_classes_and_images():
    pool = _pool([50, 40, 30, 20, 10, 5, 60, 70])
    sel = pd.DataFrame({"class_name": ["c04", "c03", "c02"], "count": [10, 20, 30]})  # any 3 eligible hold >= 60
    a = random_subset(pool, sel, seed=0, min_source_images=10)
    assert len(a) == 3 and int(a["images"].sum()) == 60
    assert (a["images"] <= a["count"]).all() and (a["images"] >= 1).all()
    assert "c05" not in set(a["class_name"])  # below min_source_images: greedy could not choose it either
    assert a.equals(random_subset(pool, sel, seed=0, min_source_images=10))  # seeded
    draws = {tuple(random_subset(pool, sel, seed=s, min_source_images=10)["class_name"]) for s in range(20)}
    assert len(draws) > 5  # the seed changes the draw
    # the draw does not depend on the order of the pool's rows
    perm = [7, 3, 1, 0, 6, 2, 5, 4]
    shuffled = ClassStats(pool.means[perm], pool.counts[perm], [pool.class_names[i] for i in perm])
    assert random_subset(shuffled, sel, seed=3, min_source_images=10).equals(random_subset(pool, sel, seed=3, min_source_images=10))


def test_random_subset_redraws_until_the_classes_hold_enough_images():
    pool = _pool([100, 100, 2, 2, 2, 2])
    sel = pd.DataFrame({"class_name": ["c00", "c01"], "count": [100, 100]})
    for seed in range(10):  # only {c00, c01} holds 200 images: every seed ends there
        r = random_subset(pool, sel, seed=seed, min_source_images=0)
        assert r["class_name"].tolist() == ["c00", "c01"] and int(r["images"].sum()) == 200
    # no draw can hold 300 images: the largest draw, every image kept (the job reports the shortfall)
    r = random_subset(_pool([100, 50, 2, 2]), pd.DataFrame({"class_name": ["a", "b"], "count": [150, 150]}), 0,
                      min_source_images=0)
    assert r["class_name"].tolist() == ["c00", "c01"] and (r["images"] == r["count"]).all()


def test_random_subset_refuses_too_few_classes():
    with pytest.raises(ValueError, match="cannot draw 3 random classes"):
        random_subset(_pool([5, 50, 50]), pd.DataFrame({"class_name": list("abc"), "count": [1, 1, 1]}), 0,
                      min_source_images=10)


def _dataset(folder, num_classes, prefix, n=12):
    xtr, ytr = toy_images(n, num_classes, seed=0)
    xte, yte = toy_images(4, num_classes, seed=1)
    split = np.array(["train"] * len(ytr) + ["test"] * len(yte), dtype=object)
    write_array_dataset(folder, np.concatenate([xtr, xte]), np.concatenate([ytr, yte]),
                        [f"{prefix}{i}" for i in range(num_classes)], split)
    return str(folder / "manifest.parquet")


def test_pool_keeps_the_drawn_number_of_training_images(tmp_path):
    a, b = _dataset(tmp_path / "a", 3, "a"), _dataset(tmp_path / "b", 2, "b")
    pd.DataFrame({"class_name": ["a1", "b0"], "count": [12, 12], "images": [5, 12]}).to_csv(tmp_path / "r.csv", index=False)
    pool_sources([a, b], str(tmp_path / "r.csv"), tmp_path / "r1", seed=0)
    pool_sources([a, b], str(tmp_path / "r.csv"), tmp_path / "r2", seed=0)
    pool_sources([a, b], str(tmp_path / "r.csv"), tmp_path / "r3", seed=1)
    m = read_manifest(tmp_path / "r1" / "manifest.parquet")
    counts = m.groupby(["class_name", "split"]).size().to_dict()
    assert counts == {("a1", "train"): 5, ("a1", "test"): 4, ("b0", "train"): 12, ("b0", "test"): 4}
    assert m.equals(read_manifest(tmp_path / "r2" / "manifest.parquet"))  # seeded
    assert not m.equals(read_manifest(tmp_path / "r3" / "manifest.parquet"))
    split = load_array_split(tmp_path / "r1" / "manifest.parquet", "train")  # the kept images still resolve
    assert split.images.shape[0] == 17
    pd.DataFrame({"class_name": ["a1"], "count": [12], "images": [13]}).to_csv(tmp_path / "bad.csv", index=False)
    r = subprocess.run([sys.executable, "-m", "finetail.cli", "pool", "--inputs", a, "--classes", str(tmp_path / "bad.csv"),
                        "--out-dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "a1" in r.stderr and "13" in r.stderr


# ------------------------------------------------------------------ ranking scores against accuracy
TARGETS = ["t1", "t2"]


def _acc():
    """Accuracy by (source, target, seed): on t1 the order is a < b < c < d, on t2 d < c < b < a;
    seed 1 swaps a and b on t1."""
    base = {"t1": {"a": 10, "b": 20, "c": 30, "d": 40}, "t2": {"a": 40, "b": 30, "c": 20, "d": 10}}
    rows = []
    for t, accs in base.items():
        for s, v in accs.items():
            for seed in (0, 1):
                v2 = {"a": 20, "b": 10}.get(s, v) if (t == "t1" and seed == 1) else v
                rows.append({"source": s, "target": t, "seed": seed, "top1_acc": float(v2)})
    return pd.DataFrame(rows)


def _scores(values):
    """A long score frame: values[score][target] = per-source values (a, b, c, d), same for both seeds."""
    rows = []
    for score, per_target in values.items():
        for t, vals in per_target.items():
            for s, v in zip("abcd", vals, strict=True):
                for seed in (0, 1):
                    rows.append({"source": s, "target": t, "seed": seed, "score": score, "value": float(v),
                                 "seconds": 0.5 if score == "perfect" else 0.1, "extract_s": 1.0, "model_run_id": ""})
    return pd.DataFrame(rows)


def test_rank_agreement_on_a_hand_made_ranking():
    scores = _scores({
        "perfect": {"t1": [1, 2, 3, 4], "t2": [4, 3, 2, 1]},   # the seed-mean order on both targets
        "inverse": {"t1": [4, 3, 2, 1], "t2": [1, 2, 3, 4]},
        "flat": {"t1": [1, 1, 1, 1], "t2": [4, 3, 2, 1]},       # ranks nothing on t1
    })
    pairs = score_pairs(scores, _acc())
    table, per_seed = rank_agreement(pairs, TARGETS, ["perfect", "inverse", "flat"])
    t = table.set_index("score")
    # seed means on t1: a 15, b 15, c 30, d 40 (a tie): Kendall tau-b of (1,2,3,4) vs (15,15,30,40)
    tau_t1 = stats.kendalltau([1, 2, 3, 4], [15, 15, 30, 40]).statistic
    assert t.loc["perfect", "t1_tau"] == pytest.approx(tau_t1) and tau_t1 == pytest.approx(5 / math.sqrt(30))
    assert t.loc["perfect", "t2_tau"] == pytest.approx(1.0)
    assert t.loc["perfect", "mean_tau"] == pytest.approx((tau_t1 + 1) / 2)
    assert t.loc["inverse", "mean_tau"] == pytest.approx(-(tau_t1 + 1) / 2)
    assert math.isnan(t.loc["flat", "t1_tau"]) and t.loc["flat", "mean_tau"] == pytest.approx(1.0)
    # per seed: seed 0 is a perfect order on t1 (tau 1), seed 1 has a and b swapped (tau 2/3)
    assert per_seed["perfect"] == {0: pytest.approx(1.0), 1: pytest.approx((2 / 3 + 1) / 2)}
    assert t.loc["perfect", "seed_tau_std"] == pytest.approx(np.std([1.0, 5 / 6], ddof=1))
    # weighted tau follows scipy's weightedtau on the seed means
    w = stats.weightedtau([1, 2, 3, 4], [15, 15, 30, 40]).statistic
    assert t.loc["perfect", "mean_weighted_tau"] == pytest.approx((w + 1) / 2)
    assert t.loc["perfect", "seconds_per_pair"] == pytest.approx(0.5)
    assert t.loc["perfect", "pairs"] == 16


def test_best_score_claim_says_plainly_when_no_score_leads_beyond_noise():
    pairs = score_pairs(_scores({"p": {"t1": [1, 2, 3, 4], "t2": [4, 3, 2, 1]},
                                 "q": {"t1": [4, 3, 2, 1], "t2": [1, 2, 3, 4]}}), _acc())
    table, per_seed = rank_agreement(pairs, TARGETS, ["p", "q"])
    claim, rows = best_score_claim(table, per_seed)
    assert claim.startswith("- **Which score predicts transfer**: p ranked")
    # claims.csv: p vs q, and the pooled "best over every other score" (Holm over one rival: its raw p)
    assert [r.claim for r in rows] == ["transfer:score:p-vs-q:tau", "transfer:best_score:p"]
    assert rows[0].p_holm == pytest.approx(rows[1].p_holm)
    # By hand: mean within-target tau per replicate, p: seed 0 (1 + 1) / 2 = 1, seed 1 (2/3 + 1) / 2
    # = 5/6 (a and b swapped on t1: 5 concordant, 1 discordant of 6 pairs); q the negatives. p - q:
    # 2 and 5/3, mean 11/6, std (1/3) / sqrt(2); t(0.975, 1 df) = 12.706, so the interval is
    # 11/6 +- 12.706 * (1/3) / 2 = [-0.284, 3.951]: it holds 0, a lead on both replicates but not clear;
    # t = (11/6) / (1/6) = 11, p = 1 - 2 atan(11) / pi = 0.0577.
    assert per_seed["p"] == {0: pytest.approx(1.0), 1: pytest.approx(5 / 6)}
    assert per_seed["q"] == {0: pytest.approx(-1.0), 1: pytest.approx(-5 / 6)}
    r = rows[0]
    assert (r.estimate, r.low, r.high) == pytest.approx((11 / 6, -0.2844, 3.9510), abs=1e-4)
    assert r.verdict == "not clear" and r.p_holm == pytest.approx(1 - 2 * math.atan(11) / math.pi)
    assert "**no score beats the others** beyond replicate noise" in claim
    # two scores with identical rankings: never a winner beyond noise
    same = score_pairs(_scores({"p": {"t1": [1, 2, 3, 4], "t2": [4, 3, 2, 1]},
                                "p2": {"t1": [2, 3, 4, 5], "t2": [5, 4, 3, 2]}}), _acc())
    table, per_seed = rank_agreement(same, TARGETS, ["p", "p2"])
    assert "no score beats the others" in best_score_claim(table, per_seed)[0]


def test_score_pairs_refuses_a_pair_without_accuracy():
    acc = _acc()
    with pytest.raises(ValueError, match="no fine-tune accuracy for d -> t2"):
        score_pairs(_scores({"p": {"t1": [1, 2, 3, 4], "t2": [4, 3, 2, 1]}}),
                    acc[~((acc["source"] == "d") & (acc["target"] == "t2"))])


def test_selection_ablation_pairs_over_seeds():
    rows = []
    for seed, (sel, rnd) in enumerate([(50.0, 45.0), (52.0, 46.0), (51.0, 46.5)]):
        for t, shift in (("t1", 0.0), ("t2", -10.0)):
            rows += [{"source": "selected", "target": t, "seed": seed, "top1_acc": sel + shift},
                     {"source": "random", "target": t, "seed": seed, "top1_acc": rnd + shift}]
    ab = selection_ablation(pd.DataFrame(rows), "selected", "random", None, TARGETS).set_index("target")
    diffs = [5.0, 6.0, 4.5]
    assert ab.loc["t1", "selected_minus_random"] == pytest.approx(np.mean(diffs))
    half = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / math.sqrt(3)
    assert ab.loc["mean", "ci_low"] == pytest.approx(np.mean(diffs) - half)
    assert ab.loc["mean", "verdict"] == "better"
    assert ab.loc["t2", "selected_mean"] == pytest.approx(41.0) and "pool_mean" not in ab.columns


def test_the_whole_pool_is_the_source_pooling_exactly_the_pool_datasets():
    tr = {"sources": {"generic": ["generic"], "natural": ["natural"], "both": ["natural", "generic"]},
          "selection": {"pool": ["generic", "natural"]}}
    assert _pool_source(tr) == "both"
    del tr["sources"]["both"]
    assert _pool_source(tr) is None
    assert _pool_source({**tr, "selection": {"pool": ["natural"]}}) == "natural"


def test_the_schema_offers_exactly_the_library_scores():
    import yaml
    from conftest import ROOT

    from finetail.transferability import SCORES

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    prop = schema["properties"]["transfer"]["properties"]["transferability"]["properties"]["scores"]
    assert prop["items"]["enum"] == list(SCORES) and prop["default"] == list(SCORES)


def test_scores_frame_refuses_nan_stale_and_missing_scores(tmp_path):
    from finetail.layout import Layout
    from finetail.transfer_eval import scores_frame

    from finetail.fileio import file_sha256
    from finetail.record import MetricsRecord

    res = tmp_path / "results" / "s"
    layout = Layout.at(res)
    for seed in (0, 1, 2):
        m = Path(layout.train("pretrain", source="a", seed=seed))
        m.parent.mkdir(parents=True)
        m.write_text(json.dumps(MetricsRecord(rule="pretrain", wildcards={}, run_id=f"r{seed}").to_json()))
    manifest = Path(layout.dataset("t1"))
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(b"a manifest")
    path = Path(layout.scores("a", "t1"))
    path.parent.mkdir(parents=True)
    row = {"seed": 0, "logme": 1.0, "logme_s": 0.1, "extract_s": 0.5, "model_run_id": "r0",
           "manifest_sha256": file_sha256(manifest)}
    pd.DataFrame([row, {**row, "seed": 1, "model_run_id": "r1"}]).to_csv(path, index=False)
    df = scores_frame(res, ["a"], ["t1"], [0, 1], ["logme"])
    assert df[["seed", "score", "value"]].values.tolist() == [[0, "logme", 1.0], [1, "logme", 1.0]]
    with pytest.raises(ValueError, match=r"seed\(s\) \[2\]: stale"):
        scores_frame(res, ["a"], ["t1"], [0, 1, 2], ["logme"])
    with pytest.raises(ValueError, match="no 'knn' column"):
        scores_frame(res, ["a"], ["t1"], [0], ["logme", "knn"])
    with pytest.raises(FileNotFoundError, match="b -> t1"):
        scores_frame(res, ["a", "b"], ["t1"], [0], ["logme"])
    pd.DataFrame([row, {**row, "seed": 1, "model_run_id": "r1", "logme": float("nan")}]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"scores.csv: logme of seed 1 is nan"):
        scores_frame(res, ["a"], ["t1"], [0, 1], ["logme"])
    # scores of another network than the pretraining run of that seed, or of an older manifest
    pd.DataFrame([row, {**row, "seed": 1, "model_run_id": "r0"}]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="seed 1 scored the network of run r0, but a's pretraining run is r1"):
        scores_frame(res, ["a"], ["t1"], [0, 1], ["logme"])
    pd.DataFrame([row, {**row, "seed": 1, "model_run_id": "r1"}]).to_csv(path, index=False)
    manifest.write_bytes(b"another manifest")
    with pytest.raises(ValueError, match="another version of t1's manifest"):
        scores_frame(res, ["a"], ["t1"], [0, 1], ["logme"])


def test_scores_with_no_more_images_than_feature_dimensions_are_marked(tmp_path):
    from finetail.transfer_eval import _n_le_d, _n_le_d_line

    assert _n_le_d(pd.Series({"n_le_d": True})) is True and _n_le_d(pd.Series({"n_le_d": "False"})) is False
    # files written before the column: from the sizes; neither: unknown
    assert _n_le_d(pd.Series({"n_images": 2040, "feature_dim": 2048})) is True
    assert _n_le_d(pd.Series({"n_images": 5994, "feature_dim": 2048})) is False
    assert _n_le_d(pd.Series({"logme": 1.0})) is None
    long = pd.DataFrame({"target": ["flowers102", "cub200", "emd_row"], "n_le_d": [True, False, None]})
    line = _n_le_d_line(long)
    assert "(N ≤ D) on: flowers102." in line and "cub200" not in line and "regularized_hscore" in line
    assert _n_le_d_line(long.assign(n_le_d=False)) == "" and _n_le_d_line(long.drop(columns="n_le_d")) == ""


def test_a_score_that_ranks_nothing_in_any_seed_leaves_its_tau_empty_not_the_report_broken():
    """Two sources, one target (the smallest study): a score equal for both sources has no τ."""
    acc = _acc()
    acc = acc[acc["source"].isin(["a", "b"]) & (acc["target"] == "t2")]
    rows = []
    for score, vals in (("flat", (1.0, 1.0)), ("p", (2.0, 1.0))):
        for s, v in zip("ab", vals, strict=True):
            for seed in (0, 1):
                rows.append({"source": s, "target": "t2", "seed": seed, "score": score, "value": v, "seconds": 0.1,
                             "extract_s": 1.0, "model_run_id": ""})
    table, per_seed = rank_agreement(score_pairs(pd.DataFrame(rows), acc), ["t2"], ["flat", "p"])
    t = table.set_index("score")
    assert math.isnan(t.loc["flat", "mean_tau"]) and math.isnan(t.loc["flat", "seed_tau_mean"])
    assert t.loc["p", "mean_tau"] == pytest.approx(1.0) and t.loc["p", "seed_tau_std"] == pytest.approx(0.0)
    claim, rows = best_score_claim(table, per_seed)
    assert "p ranked the sources best" in claim and "flat: constant over the sources, no ranking" in claim
    assert "no other score ranks the sources here" in claim and "beyond replicate noise" not in claim and rows == []
