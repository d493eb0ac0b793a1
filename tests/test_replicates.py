"""Replicates: each reseeds every stage it varies; fixed stages stay equal; claims over replicates.

The real run: a 2-replicate reduced world study in which the world, the long-tailed subset,
the feature network's weights, its features, the greedy selection and the random draw all
differ between replicates; then the same study with the long-tailed subset fixed on purpose
(``vary`` without ``longtail``): only the subsets are planned again, and they keep the same
images of the same classes in both worlds.
"""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from finetail.claims import compare_claims, pooled_claim, read_claims, write_claims
from finetail.config import ConfigError, load_config
from finetail.replicates import STAGES, Replicates, covered_words
from finetail.world import dataset_classes

CONFIG = {
    "replicates": {"count": 3, "vary": list(STAGES)},
    "datasets": {"gen10": {"kind": "world"}, "generic": {"kind": "world"}, "natural": {"kind": "world"},
                 "probe": {"kind": "world"}, "cub200": {"kind": "world"}, "cifar10": {"kind": "registry"}},
    "transfer": {"sources": {"generic": ["generic"], "natural": ["natural"]}, "targets": ["cub200"],
                 "selection": {"pool": ["generic", "natural"], "random": {"name": "random"}},
                 "features": {"model": "probe", "networks": {"probe": ["probe"]}}},
}


def _rep(vary, **over):
    cfg = json.loads(json.dumps(CONFIG))
    cfg["replicates"]["vary"] = vary
    cfg["transfer"].update(over)
    return Replicates.of(cfg)


def test_every_stage_varies_by_default_and_keys_follow_the_replicate():
    rep = _rep(list(STAGES))
    assert rep.ids == (0, 1, 2)
    for r in rep.ids:
        assert rep.dataset_key("gen10", r) == r and rep.longtail_key("gen10", r) == r
        assert rep.network_key(r) == r and rep.features_key("cub200", r) == r
        assert rep.selection_key("selected", r) == r and rep.selection_key("random", r) == r
        assert rep.seed("world", 5, r) == 5 + r and rep.training_seed(r) == r
    assert rep.dataset_key("cifar10", 2) is None  # a real dataset: stored once, unseeded
    assert rep.longtail_key("cifar10", 2) == 2  # its long-tailed subset still varies


def test_a_fixed_stage_is_computed_once_and_keeps_its_base_seed():
    rep = _rep(["training"])  # everything upstream of training fixed
    for r in (0, 1, 2):
        assert rep.dataset_key("gen10", r) == 0 and rep.longtail_key("gen10", r) == 0
        assert rep.network_key(r) == 0 and rep.selection_key("random", r) == 0
        assert rep.seed("world", 3, r) == 3 and rep.seed("random", 4, r) == 4
        assert rep.training_seed(r) == r
    # the long-tailed subset fixed, the world varying: the subset is stored per world (key r) but
    # drawn with its base seed, so it keeps the same images of each class in every world
    rep = _rep(["world", "training"])
    assert rep.longtail_key("gen10", 2) == 2 and rep.seed("longtail", 0, 2) == 0
    # the draw varies on its own when the world and the feature network are fixed
    rep = _rep(["random", "training"])
    assert rep.selection_key("selected", 2) == 0 and rep.selection_key("random", 2) == 2
    # a torchvision feature model never varies; a ranked source's network always does
    assert _rep(["world"], features={"model": "tv:resnet18"}).network_key(1) == 0
    assert _rep([], features={"model": "generic"}).network_key(1) == 1


def test_keys_compose_downstream_of_upstream():
    """Each rule computes its inputs' keys from its own output's key k (the {rep} wildcard):
    that must name the same inputs as replicate r's own keys, for every choice of what varies."""
    import itertools

    for n in range(len(STAGES) + 1):
        for vary in itertools.combinations(STAGES, n):
            for over in ({}, {"features": {"model": "generic"}}, {"features": {"model": "tv:resnet18"}}):
                rep = _rep(list(vary), **over)
                for r in (0, 1, 2):
                    k = rep.longtail_key("gen10", r)  # rule longtail reads the dataset of key k
                    assert rep.dataset_key("gen10", k) == rep.dataset_key("gen10", r), (vary, over)
                    for d in ("generic", "natural", "cub200"):  # rule features reads a manifest and the network
                        k = rep.features_key(d, r)
                        assert rep.dataset_key(d, k) == rep.dataset_key(d, r)
                        assert rep.network_key(k) == rep.network_key(r), (vary, over)
                    k = rep.similarity_key(["generic", "natural", "cub200"], r)
                    assert all(rep.features_key(d, k) == rep.features_key(d, r) for d in ("generic", "natural", "cub200"))
                    k = rep.selection_key("random", r)  # rule random_subset reads the pool's features and the selection
                    assert rep.selection_key("selected", k) == rep.selection_key("selected", r)
                    assert all(rep.features_key(d, k) == rep.features_key(d, r) for d in ("generic", "natural"))
                    for s in ("selected", "random"):  # rule pool_source: the pool's sources and the class list
                        k = rep.source_key(s, r)
                        assert all(rep.source_key(p, k) == rep.source_key(p, r) for p in ("generic", "natural"))
                        assert rep.selection_key(s, k) == rep.selection_key(s, r)
                    for s in ("generic", *rep.feature_networks):  # rule pool_source: the datasets it pools
                        assert rep.dataset_key(s, rep.source_key(s, r)) == rep.dataset_key(s, r)
                    k = rep.network_key(r)  # the feature network's pretrain job (folder seed<k>) pools probe
                    assert rep.source_key("probe", k) == rep.source_key("probe", r) or over


def test_covered_sources_name_what_varies_and_what_the_statistic_depends_on():
    rep = _rep(list(STAGES))
    assert covered_words(rep.covers("cbloss", ["gen10"])) == "world + long-tailed subset + training seed"
    assert covered_words(rep.covers("cbloss", ["cifar10"])) == "long-tailed subset + training seed"
    assert covered_words(rep.covers("transfer", ["cub200"], random_source=True)) == \
        "world + feature network + random draw + training seed"
    assert covered_words(_rep(["training"]).covers("cbloss", ["gen10"])) == "training seed"
    with pytest.raises(ValueError, match="replicates.vary names"):
        _rep(["wrld"])


def test_old_seeds_keys_are_refused_with_what_replaced_them(tmp_path):
    p = tmp_path / "study.yaml"
    p.write_text("study: s\ndatasets: {gen10: {kind: world}}\ncbloss: {datasets: [gen10], imbalance: [10], "
                 "losses: {softmax: {type: softmax}}, recipe: {}, seeds: [0, 1]}\n")
    with pytest.raises(ConfigError, match=r"cbloss.seeds: seeds are replicates now.*replicates: \{count: 2\}"):
        load_config(p)


@pytest.mark.slow
def test_default_study_dry_run_reseeds_every_stage(tmp_path):
    """The default study plans each replicate's world (world seed + r), long-tailed subset
    (longtail seed + r), feature network (seed r) and random draw (seed + r)."""
    from helpers import snakemake

    cfg = load_config("config.yaml")
    r = snakemake(tmp_path, cfg, "-n", "-p")
    assert r.returncode == 0, r.stderr[-2000:]
    n = cfg["replicates"]["count"]
    assert n >= 3
    worlds = {json.loads(re.search(r"--spec '([^']+)'", c).group(1))["world"]["seed"]
              for c in re.findall(r"finetail generate --dataset gen10 .*", r.stdout)}
    assert worlds == set(range(n))
    subsets = {int(m) for m in re.findall(r"finetail longtail .*--seed (\d+)", r.stdout)}
    assert subsets == set(range(n))
    draws = {json.loads(re.search(r"--spec '([^']+)'", c).group(1))["seed"]
             for c in re.findall(r"finetail random-subset .*", r.stdout)}
    assert draws == set(range(n))
    probes = {json.loads(re.search(r"--spec '([^']+)'", c).group(1))["recipe"]["seed"]
              for c in re.findall(r"finetail train .*pretrain/probe/seed\d.*", r.stdout)}
    assert probes == set(range(n))
    # fixing the world and the draw: one world for all, one draw, every replicate reads them
    cfg["replicates"]["vary"] = ["longtail", "features", "training"]
    r = snakemake(tmp_path, cfg, "-n", "-p")
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(re.findall(r"datasets/gen10/rep(\d)/manifest.parquet", r.stdout)) == {"0"}


# --------------------------------------------------------------------------- claims over replicates
def test_pooled_claim_corrects_for_multiplicity_by_hand():
    # two CB losses against softmax over 3 replicates; differences a: +10, +11, +12 (t = 19.05,
    # p = 0.00274); b: +1, -1, +3 (p = 0.48). Holm: a's p x 2 = 0.00549 < 0.05 -> holds, decided by a,
    # whose interval is at Holm's level for rank 1 of 2: 1 - 0.05 / 2 = 97.5 %.
    base = [50.0, 50.0, 50.0]
    members = {"a": ([60.0, 61.0, 62.0], base), "b": ([51.0, 49.0, 53.0], base)}
    claim, pick = pooled_claim("c", "some CB loss helps", members, higher_is_better=True, sources="training seed")
    assert (pick, claim.verdict, claim.holds_in, claim.replicates) == ("a", "holds", 3, 3)
    assert claim.level == pytest.approx(0.975) and claim.p_holm == pytest.approx(2 * 0.0027426, rel=1e-3)
    # t(0.9875, 2) = 6.2053: half width 6.2053 * 1 / sqrt(3) = 3.5826
    assert claim.low == pytest.approx(11 - 3.5826, abs=1e-3) and claim.high == pytest.approx(11 + 3.5826, abs=1e-3)
    assert (claim.p_improve, claim.p_improve_low, claim.p_improve_high) == (1.0, 1.0, 1.0)
    # alone, b is not clear; with only worse members beyond noise, the claim does not hold
    claim, pick = pooled_claim("c", "", {"b": members["b"]}, True, "")
    assert (pick, claim.verdict) == ("b", "not clear")
    claim, _ = pooled_claim("c", "", {"a": members["a"]}, higher_is_better=False, sources="")
    assert claim.verdict == "does not hold"


def test_compare_claims_flags_a_flip_and_disjoint_intervals(tmp_path):
    from finetail.claims import Claim

    def row(name, est, lo, hi, verdict):
        return Claim(name, "", est, lo, hi, 0.95, verdict, 3, 3, 1.0, 0.5, 1.0, 0.01, "world")

    ref = [row("x", 2.0, 1.0, 3.0, "better"), row("y", 0.5, -1.0, 2.0, "not clear"), row("z", 1.0, 0.5, 1.5, "better")]
    write_claims(ref, tmp_path / "ref.csv")
    text = (tmp_path / "ref.csv").read_text()
    (tmp_path / "ref.csv").write_text("# commit abc\n# cpu: test\n" + text)  # the committed copy's header
    mine = [row("x", -2.0, -3.0, -1.0, "worse"), row("y", 1.0, 0.1, 1.9, "better"), row("z", 1.1, 0.6, 1.6, "better")]
    write_claims(mine, tmp_path / "mine.csv")
    table, problems = compare_claims(read_claims(tmp_path / "mine.csv"), read_claims(tmp_path / "ref.csv"))
    assert table["agrees"].tolist() == ["NO", "yes", "yes"]  # not clear -> better is no flip
    assert len(problems) == 2 and "flipped from 'better' to 'worse'" in problems[0] and "does not overlap" in problems[1]
    _, missing = compare_claims(read_claims(tmp_path / "mine.csv").iloc[1:], read_claims(tmp_path / "ref.csv"))
    assert missing == ["x: missing from this run's claims"]


def test_compare_claims_cli_exits_nonzero_on_a_flip(tmp_path):
    import subprocess
    import sys

    from finetail.claims import Claim

    a = [Claim("x", "", 2.0, 1.0, 3.0, 0.95, "better", 3, 3, 1.0, 0.5, 1.0, 0.01, "world")]
    b = [Claim("x", "", -2.0, -3.0, -1.0, 0.95, "worse", 0, 3, 0.0, 0.0, 0.5, 0.01, "world")]
    write_claims(a, tmp_path / "a.csv")
    write_claims(b, tmp_path / "b.csv")
    run = lambda mine: subprocess.run([sys.executable, "-m", "finetail.cli", "compare-claims", str(mine),  # noqa: E731
                                       "--against", str(tmp_path / "a.csv")], capture_output=True, text=True)
    ok, bad = run(tmp_path / "a.csv"), run(tmp_path / "b.csv")
    assert ok.returncode == 0 and "1 of 1 committed claims agree" in ok.stderr
    assert bad.returncode == 1 and "DIFFERS: x: verdict flipped" in bad.stderr


# --------------------------------------------------------------------------- a real run
SUBSET_FIXED = ["world", "features", "random", "training"]  # the long-tailed subset fixed on purpose


@pytest.fixture(scope="module")
def two_replicates(tmp_path_factory):
    from helpers import TINY, planned, snakemake

    cfg = json.loads(json.dumps(TINY))
    cfg.pop("cbloss_natural")
    cfg["replicates"] = {"count": 2}  # every stage varies
    cfg["cbloss"]["imbalance"] = [10]
    cfg["datasets"]["probe"] = {"kind": "world", "train_per_class": 4, "test_per_class": 2}
    cfg["transfer"]["features"] = {"model": "probe", "networks": {"probe": ["probe"]}, "recipe": {"width": 8}}
    work = tmp_path_factory.mktemp("replicates")
    targets = [f"results/tiny/{p}/rep{k}/{f}" for k in (0, 1) for p, f in
               (("similarity/probe", "matrix.csv"), ("selection/selected", "classes.csv"),
                ("selection/random", "classes.csv"), ("longtail/gen10_if10", "manifest.parquet"))]
    r = snakemake(work, cfg, *targets)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = work / "results" / "tiny"
    varied = [pd.read_parquet(res / "longtail" / "gen10_if10" / f"rep{k}" / "manifest.parquet") for k in (0, 1)]
    cfg["replicates"]["vary"] = SUBSET_FIXED
    subsets = [t for t in targets if "/longtail/" in t]
    plan = snakemake(work, cfg, *targets, "-n")
    assert plan.returncode == 0, plan.stderr[-2000:]
    r = snakemake(work, cfg, *subsets)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fixed = [pd.read_parquet(res / "longtail" / "gen10_if10" / f"rep{k}" / "manifest.parquet") for k in (0, 1)]
    return res, varied, fixed, planned(plan)


@pytest.mark.slow
def test_each_replicate_redraws_world_subset_network_selection_and_draw(two_replicates):
    res, varied, fixed, replanned = two_replicates
    # the world: same classes, other images
    a, b = (np.load(res / "datasets" / "gen10" / f"rep{k}" / "images.npy") for k in (0, 1))
    assert a.shape == b.shape and not np.array_equal(a, b)
    ca, cb = (pd.read_csv(res / "datasets" / "gen10" / f"rep{k}" / "classes.csv") for k in (0, 1))
    assert ca["class_name"].tolist() == cb["class_name"].tolist()
    # the feature network: one pretrain job per replicate, other weights; only it was pretrained
    assert sorted(p.name for p in (res / "pretrain").iterdir()) == ["probe"]
    records = [json.loads((res / "pretrain" / "probe" / f"seed{k}" / "metrics.json").read_text()) for k in (0, 1)]
    assert [m["config"]["recipe"]["seed"] for m in records] == [0, 1]
    assert all(m["config"]["recipe"]["width"] == 8 for m in records)  # the feature recipe over the pretrain recipe
    assert len(pd.read_csv(res / "pretrain" / "probe" / "seed0" / "per_class.csv")) == len(dataset_classes("probe"))
    wa, wb = (torch.load(res / "pretrain" / "probe" / f"seed{k}" / "model.pt", weights_only=True) for k in (0, 1))
    sa, sb = (w.get("model", w) for w in (wa, wb))
    assert any(not torch.equal(sa[n], sb[n]) for n in sa if torch.is_tensor(sa[n]) and sa[n].is_floating_point())
    # features, similarity: each replicate's from its own network
    for k, rec in enumerate(records):
        for npz in (res / "features" / "probe" / f"rep{k}").glob("*.npz"):
            assert str(np.load(npz)["model_run_id"]) == rec["run_id"], npz
    sims = [pd.read_csv(res / "similarity" / "probe" / f"rep{k}" / "matrix.csv", index_col=0) for k in (0, 1)]
    assert list(sims[0].index) == ["generic", "natural", "generic+natural", "selected", "random"]
    assert not np.allclose(sims[0].to_numpy(), sims[1].to_numpy())
    # the greedy selection follows its inputs; the random draw is another draw
    sel = [pd.read_csv(res / "selection" / "selected" / f"rep{k}" / "classes.csv") for k in (0, 1)]
    assert all(len(s) >= 3 for s in sel) and not sel[0].equals(sel[1])
    drawn = [pd.read_csv(res / "selection" / "random" / f"rep{k}" / "classes.csv") for k in (0, 1)]
    assert not drawn[0].equals(drawn[1])
    # the long-tailed subset: each replicate keeps other images of each class (longtail seed + r) ...
    cols = ["index", "class_name", "split"]
    assert (varied[0].groupby("class_name").size() == varied[1].groupby("class_name").size()).all()
    assert not varied[0][cols].equals(varied[1][cols])
    # ... and fixed on purpose, only the subsets are planned again (replicate 1's: its seed
    # changes; replicate 0's seed is the base seed either way), and both keep the same images of
    # each class (store indices), of other worlds
    assert replanned == {"longtail": 1}
    assert fixed[0][cols].equals(fixed[1][cols]) and fixed[0][cols].equals(varied[0][cols])
    assert fixed[0]["store_sha256"].iloc[0] != fixed[1]["store_sha256"].iloc[0]


def test_claims_table_has_the_columns_another_machine_checks(tmp_path):
    from finetail.claims import CLAIM_COLUMNS

    assert {"claim", "estimate", "low", "high", "verdict", "replicates", "sources"} <= set(CLAIM_COLUMNS)
    write_claims([], tmp_path / "empty.csv")
    assert read_claims(tmp_path / "empty.csv").empty
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a claims table"):
        read_claims(tmp_path / "other.csv")
