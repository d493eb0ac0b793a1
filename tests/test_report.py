"""The report's tables from hand-made cells: spread per cell, the best-CB row, pairing with the paper."""

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from finetail.report import (
    BEST_CB,
    baseline_loss,
    cbloss_frame,
    is_class_balanced,
    methods_markdown,
    methods_table,
    cbloss_table,
    cbloss_table_markdown,
    paired_table,
    paper_comparable,
    shots_table,
)
from finetail.training.recipe import CBLOSS_CIFAR_RECIPE, LONGTAIL_CIFAR_RECIPE, paper_recipe

REAL_CIFAR = {"cifar10": {"kind": "registry"}}  # the registry's CIFAR-10: downloaded and checked against its md5
LOSSES = {
    "softmax": {"type": "softmax"},
    "cb_focal_g1": {"type": "focal", "beta": 0.9999, "gamma": 1.0},  # the paper's best at CIFAR-10 IF 100
    "cb_focal_g2": {"type": "focal", "beta": 0.9999, "gamma": 2.0},  # the paper's best at CIFAR-10 IF 50
}


def _cells(errors: dict[tuple[str, float], list[float]], dataset="cifar10") -> pd.DataFrame:
    rows = []
    for (loss, imb), vals in errors.items():
        spec = LOSSES[loss]
        for seed, v in enumerate(vals):
            rows.append({"dataset": dataset, "imbalance": imb, "loss": loss, "setting": loss, "type": spec["type"],
                         "beta": spec.get("beta", 0.0), "gamma": spec.get("gamma", 0.0), "seed": seed,
                         "top1_error": v, "balanced_acc": 100 - v, "few_acc": 50.0 + seed})
    return pd.DataFrame(rows)


ERRORS = {
    ("softmax", 100.0): [30.0, 31.0, 32.0],
    ("cb_focal_g1", 100.0): [27.0, 28.0, 26.0],  # mean 27: the best CB at IF 100
    ("cb_focal_g2", 100.0): [29.0, 29.0, 29.0],
    ("softmax", 50.0): [25.0, 25.0, 25.0],
    ("cb_focal_g1", 50.0): [24.0, 24.0, 24.0],
    ("cb_focal_g2", 50.0): [22.0, 23.0, 24.0],  # mean 23: the best CB at IF 50
}


def test_each_cell_gives_mean_std_and_n():
    t = cbloss_table(_cells(ERRORS), {"losses": LOSSES}, {"cifar10": False}).set_index("loss")
    assert t.loc["softmax", "if100_mean"] == pytest.approx(31.0)
    assert t.loc["softmax", "if100_std"] == pytest.approx(1.0)
    assert t.loc["softmax", "if100_n"] == 3 and t.loc["cb_focal_g2", "if50_std"] == pytest.approx(1.0)
    md = cbloss_table_markdown(t.reset_index())
    assert "31.00 ± 1.00" in md


def test_best_cb_row_is_chosen_per_column_on_the_test_set():
    t = cbloss_table(_cells(ERRORS), {"losses": LOSSES}, {"cifar10": False}).set_index("loss")
    assert t.loc[BEST_CB, "if100_choice"] == "cb_focal_g1" and t.loc[BEST_CB, "if100_mean"] == pytest.approx(27.0)
    assert t.loc[BEST_CB, "if50_choice"] == "cb_focal_g2" and t.loc[BEST_CB, "if50_mean"] == pytest.approx(23.0)
    assert "chosen on the test set" in t.loc[BEST_CB, "setting"]


def test_a_reduced_recipe_gets_no_paper_column():
    t = cbloss_table(_cells(ERRORS), {"losses": LOSSES}, {"cifar10": False})
    assert not [c for c in t.columns if c.startswith("paper")]
    spec = {"datasets": REAL_CIFAR, "cbloss": {"datasets": ["cifar10"], "recipe": {**CBLOSS_CIFAR_RECIPE, "epochs": 15}}}
    assert paper_comparable(spec) == {"cifar10": False}
    assert paper_recipe(spec["cbloss"]["recipe"]).differences == ["epochs 15 ≠ 200"]
    # the paper's recipe on a dataset that is not the paper's: no column either
    assert paper_comparable({"cbloss": {"datasets": ["gen10"], "recipe": dict(CBLOSS_CIFAR_RECIPE)}}) == {"gen10": False}


def test_the_papers_best_number_lands_only_on_its_own_setting():
    spec = {"datasets": REAL_CIFAR, "cbloss": {"datasets": ["cifar10"], "recipe": dict(CBLOSS_CIFAR_RECIPE)}}
    ok = paper_comparable(spec)
    assert ok == {"cifar10": True}
    t = cbloss_table(_cells(ERRORS), {"losses": LOSSES}, ok).set_index("loss")
    # Table 2, CIFAR-10: softmax 29.64 (IF 100), 25.19 (IF 50); CB best 25.43 (IF 100: focal
    # beta 0.9999 gamma 1.0), 20.73 (IF 50: focal beta 0.9999 gamma 2.0).
    assert t.loc["softmax", "paper_if100"] == pytest.approx(29.64)
    assert t.loc["softmax", "paper_if50"] == pytest.approx(25.19)
    assert t.loc["cb_focal_g1", "paper_if100"] == pytest.approx(25.43)
    assert math.isnan(t.loc["cb_focal_g1", "paper_if50"])
    assert t.loc["cb_focal_g2", "paper_if50"] == pytest.approx(20.73)
    assert math.isnan(t.loc["cb_focal_g2", "paper_if100"])
    assert t.loc[BEST_CB, "paper_if100"] == pytest.approx(25.43) and t.loc[BEST_CB, "paper_if50"] == pytest.approx(20.73)


def test_paired_comparison_with_its_interval_and_verdict():
    p = paired_table(_cells(ERRORS), "softmax")
    row = p[(p["loss"] == "cb_focal_g1") & (p["imbalance"] == 100.0) & (p["metric"] == "top1_error")].iloc[0]
    # differences -3, -3, -6: mean -4, std sqrt(3); half width 4.3027 * 1.7321 / sqrt(3) = 4.3027
    assert row["difference"] == pytest.approx(-4.0)
    assert row["ci_low"] == pytest.approx(-8.3027, abs=1e-4) and row["ci_high"] == pytest.approx(0.3027, abs=1e-4)
    assert row["verdict"] == "not clear" and row["n"] == 3
    row = p[(p["loss"] == "cb_focal_g1") & (p["imbalance"] == 50.0) & (p["metric"] == "top1_error")].iloc[0]
    # every seed 1 point lower: zero spread, the interval is the point -1, which excludes 0
    assert row["difference"] == pytest.approx(-1.0) and row["verdict"] == "better"
    few = p[(p["metric"] == "few_acc")]
    assert set(few["difference"]) == {0.0}


def test_the_report_says_where_each_dataset_came_from_and_why_no_paper_column():
    from finetail.report import data_lines, paper_reasons

    spec = {"world": {"seed": 3, "image_size": 16},
            "datasets": {"gen10": {"kind": "world"},
                         "cifar10": {"kind": "imagefolder", "source": "x.tar.gz", "about": "CIFAR-10 re-encoded as JPEG"}}}
    text = "".join(data_lines(spec))
    assert "`gen10`: generated world (`finetail.world`, world seed 3, 16 px)" in text
    assert "`cifar10`: ImageFolder from `x.tar.gz` — CIFAR-10 re-encoded as JPEG" in text
    why = paper_reasons({"datasets": REAL_CIFAR,
                         "cbloss": {"datasets": ["cifar10"], "recipe": {**CBLOSS_CIFAR_RECIPE, "epochs": 15, "amp": True}}})
    assert why.startswith("reduced recipe: not comparable") and "epochs 15 ≠ 200" in why and "amp true ≠ false" in why
    assert "not the paper's datasets" in paper_reasons({"cbloss": {"datasets": ["gen10"], "recipe": {}}})


def test_a_grid_with_nothing_to_pair_still_writes_the_paired_table_header(tmp_path):
    only = {k: v for k, v in ERRORS.items() if k[0] == "softmax"}
    p = paired_table(_cells(only), "softmax")
    assert p.empty and {"difference", "ci_low", "ci_high", "verdict"} <= set(p.columns)
    p.to_csv(tmp_path / "p.csv", index=False)
    assert pd.read_csv(tmp_path / "p.csv").empty  # readable: a header, no rows


def _write_cbloss_runs(results, finals: list[dict]):
    """metrics.json of one cbloss cell (gen10, IF 10, softmax) for seeds 0.. with these finals."""
    from finetail.layout import Layout

    for seed, final in enumerate(finals):
        path = Layout.at(results).train("cbloss", dataset="gen10", imbalance=10, loss="softmax", seed=seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"rule": "cbloss", "run_id": f"r{seed}", "final": final}, f)  # json writes nan as NaN


CELL = {"datasets": ["gen10"], "imbalance": [10], "losses": {"softmax": {"type": "softmax"}}}


def test_a_nan_metric_in_a_run_fails_the_report_naming_its_file(tmp_path):
    _write_cbloss_runs(tmp_path, [{"top1_error": 0.3, "ece": 0.05}, {"top1_error": 0.31, "ece": float("nan")}])
    with pytest.raises(ValueError, match=r"seed1/metrics.json: ece is nan"):
        cbloss_frame(tmp_path, CELL, [0, 1])


def test_an_absent_metric_is_told_apart_from_a_nan_one(tmp_path):
    # few_acc is None where no class is few-shot: absent in every seed -> n = 0, not an error
    _write_cbloss_runs(tmp_path, [{"top1_error": 0.3, "few_acc": None}, {"top1_error": 0.32, "few_acc": None}])
    shots = shots_table(cbloss_frame(tmp_path, CELL, [0, 1])).iloc[0]
    assert shots["few_acc_n"] == 0 and shots["top1_error_n"] == 2
    assert shots["top1_error_mean"] == pytest.approx(31.0)
    # absent from one seed only: a mean over fewer seeds than the cell has is refused
    _write_cbloss_runs(tmp_path, [{"top1_error": 0.3, "few_acc": 0.5}, {"top1_error": 0.32, "few_acc": None}])
    with pytest.raises(ValueError, match="few_acc .* absent from 1 of its 2 runs"):
        shots_table(cbloss_frame(tmp_path, CELL, [0, 1]))


METHOD_LOSSES = {
    "softmax": {"type": "softmax"},
    "ldam_drw": {"type": "ldam", "max_margin": 0.5, "scale": 30, "drw_epoch": 160, "beta": 0.9999},
    "ldam_drw_early": {"type": "ldam", "max_margin": 0.5, "scale": 30, "drw_epoch": 100, "beta": 0.9999},
    "balanced_softmax": {"type": "balanced_softmax"},
    "la": {"type": "logit_adjusted", "tau": 1.0},
}
METHOD_CB = {"losses": METHOD_LOSSES, "recipe": dict(LONGTAIL_CIFAR_RECIPE),
             "posthoc": {"tn": {"method": "tau_norm", "tau": 1.0, "losses": ["softmax"]}}}
METHOD_ERRORS = [("softmax", 30.0), ("ldam_drw", 24.0), ("ldam_drw_early", 25.0), ("balanced_softmax", 23.0),
                 ("la", 23.5), ("softmax+tn", 27.0)]


def _method_cells(dataset="cifar10", best_drop=2.0):
    """Three runs per method; each run's best evaluation (chosen on the test set) ``best_drop``
    points under its last, evaluated every 10 epochs."""
    rows = []
    for loss, err in METHOD_ERRORS:
        for seed in range(3):
            rows.append({"dataset": dataset, "imbalance": 100.0, "loss": loss, "setting": loss, "seed": seed,
                         "top1_error": err + seed, "balanced_acc": 100 - err, "many_acc": 90.0, "medium_acc": 70.0,
                         "few_acc": np.nan, "ece": 5.0, "best_top1_error": err + seed - best_drop,
                         "best_balanced_acc": 100 - err + best_drop, "best_epoch": 187.0, "eval_every": 10.0})
    return pd.DataFrame(rows)


def _method_shots(dataset="cifar10"):
    return shots_table(_method_cells(dataset))


def test_published_followup_numbers_land_only_on_their_own_method_and_recipe():
    cells = _method_cells()
    m = methods_table(shots_table(cells), METHOD_CB, {"cifar10": True}, cells=cells).set_index("loss")
    # Cao et al. and BagofTricks-LT kept the best epoch on the test set: their numbers stand
    # beside our best-on-test rows, not beside the last epoch, which says why.
    assert np.isnan(m.loc["ldam_drw", "published_error"])
    assert m.loc["ldam_drw", "published_note"].startswith("paper: checkpoint best on test vs ours last epoch")
    assert m.loc["ldam_drw@best", "published_error"] == pytest.approx(22.97)  # Cao et al., CIFAR-10-LT IF 100
    assert m.loc["ldam_drw@best", "top1_error_mean"] == pytest.approx(23.0)  # 24 + (0, 1, 2) - 2
    assert m.loc["ldam_drw@best", "setting"] == ("ldam_drw — best epoch, chosen on the test set "
                                                 "(evaluated every 10 epochs)")
    assert m.loc["balanced_softmax@best", "published_error"] == pytest.approx(22.46)
    assert np.isnan(m.loc["softmax", "published_error"]) and pd.isna(m.loc["softmax", "published_note"])
    md = methods_markdown(m.reset_index())
    assert "IF 100 published err" in md and "90.00 ± 0.00 / 70.00 ± 0.00 / —" in md
    assert "| 22.97 |" in md and "chosen on the test set" in md
    # not CIFAR: no number, no note
    other = methods_table(shots_table(cells), METHOD_CB, {"cifar10": False}, cells=cells)
    assert other["published_error"].isna().all() and other["published_note"].isna().all()
    assert not other["loss"].str.endswith("@best").any()


def test_a_published_number_whose_recipe_differs_in_one_field_is_not_printed_and_names_it():
    m = methods_table(_method_shots(), METHOD_CB, {"cifar10": True}).set_index("loss")
    # one method parameter: DRW from epoch 100, not Cao et al.'s 160
    assert np.isnan(m.loc["ldam_drw_early", "published_error"])
    assert m.loc["ldam_drw_early", "published_note"] == "paper: drw_epoch 160 vs ours 100 (+1 more)"  # + checkpoint
    # Menon et al.'s number is the last epoch of 1241 (Nesterov, 20 warm-up epochs, x/255 - 0.5, ...)
    assert np.isnan(m.loc["la", "published_error"]) and m.loc["la", "published_note"].startswith(
        "paper: epochs 1241 vs ours 200")
    # BagofTricks-LT's tau-norm keeps the classifier bias; ours drops it (Kang et al.'s code)
    assert m.loc["softmax+tn", "published_note"].startswith("paper: head bias kept vs ours dropped")
    # exactly one field: the recipe is Cao et al.'s but for the batch size
    one = {**METHOD_CB, "recipe": {**LONGTAIL_CIFAR_RECIPE, "batch_size": 64}}
    cells = _method_cells()
    m = methods_table(shots_table(cells), one, {"cifar10": True}, cells=cells).set_index("loss")
    assert m["published_error"].isna().all() and not m.index.str.endswith("@best").any()
    assert m.loc["balanced_softmax", "published_note"] == "paper: batch_size 128 vs ours 64 (+1 more)"


def test_one_differing_field_is_named_alone():
    from finetail.published import PUBLISHED_RECIPES, compare, our_fields

    ours = our_fields(METHOD_CB, "ldam_drw", checkpoint="best on test")
    assert compare(PUBLISHED_RECIPES["cao_ldam_drw"], ours) == []
    assert compare(PUBLISHED_RECIPES["cao_ldam_drw"], {**ours, "weight_decay": 5e-4}) == [
        "weight_decay 0.0002 vs ours 0.0005"]
    crt = {**METHOD_CB, "posthoc": {"crt": {"method": "crt", "losses": ["softmax"], "recipe": {
        "epochs": 30, "weight_decay": 5e-4, "warmup_epochs": 5, "milestones": [10, 20], "lr_factors": [0.1, 0.01]}}}}
    assert compare(PUBLISHED_RECIPES["bot_crt"], our_fields(crt, "softmax+crt", "best on test")) == []
    crt["posthoc"]["crt"]["recipe"]["epochs"] = 10
    assert compare(PUBLISHED_RECIPES["bot_crt"], our_fields(crt, "softmax+crt", "best on test")) == [
        "cRT epochs 30 vs ours 10"]


def test_a_world_dataset_named_cifar10_gets_no_paper_columns(tmp_path):
    from finetail.report import followups_comparable, paper_reasons

    world = {"datasets": {"cifar10": {"kind": "world"}},
             "cbloss": {"datasets": ["cifar10"], "recipe": dict(CBLOSS_CIFAR_RECIPE)}}
    assert paper_comparable(world) == {"cifar10": False} and followups_comparable(world) == {"cifar10": False}
    t = cbloss_table(_cells(ERRORS), {"losses": LOSSES}, paper_comparable(world))
    assert not [c for c in t.columns if c.startswith("paper")]
    assert "generated (world), not the CIFAR archive" in paper_reasons(world)
    folder = {**world, "datasets": {"cifar10": {"kind": "imagefolder", "source": "cifar10.tar.gz"}}}
    assert paper_comparable(folder) == {"cifar10": False}
    # the registry's CIFAR-10 under its name is; unless its prepared archive is another file
    real = {**world, "datasets": REAL_CIFAR}
    assert paper_comparable(real, tmp_path) == {"cifar10": True}
    from finetail.layout import Layout

    stamp = tmp_path / Layout.at(tmp_path).dataset("cifar10", "source.json")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"dataset": "cifar10", "files": {"cifar-10-python.tar.gz": "0" * 64}}))
    assert paper_comparable(real, tmp_path) == {"cifar10": False}
    assert "not the official cifar10 archive" in paper_reasons(real, tmp_path)
    from finetail.published import CIFAR_ARCHIVES

    stamp.write_text(json.dumps({"dataset": "cifar10", "files": {"cifar-10-python.tar.gz": CIFAR_ARCHIVES["cifar10"][1]}}))
    assert paper_comparable(real, tmp_path) == {"cifar10": True}
    # the registry's CIFAR-100 stored under the name cifar10 would be paired with CIFAR-10's numbers
    renamed = {**world, "datasets": {"cifar10": {"kind": "registry", "name": "cifar100"}}}
    assert paper_comparable(renamed) == {"cifar10": False}


def test_best_on_test_reads_the_history_beside_the_metrics(tmp_path):
    from finetail.published import best_on_test

    pd.DataFrame({"epoch": range(6), "train_loss": 1.0,
                  "test_top1_error": [np.nan, 0.5, np.nan, 0.3, np.nan, 0.35],
                  "test_balanced_acc": [np.nan, 0.4, np.nan, 0.6, np.nan, 0.55]}).to_csv(tmp_path / "history.csv",
                                                                                           index=False)
    b = best_on_test(tmp_path / "metrics.json")
    assert b == {"best_top1_error": pytest.approx(30.0), "best_balanced_acc": pytest.approx(60.0), "best_epoch": 3.0,
                 "eval_every": 2.0}
    assert all(np.isnan(v) for v in best_on_test(tmp_path / "none" / "metrics.json").values())  # no history


def test_ldam_drw_is_not_a_class_balanced_loss_for_the_best_cb_row_or_the_baseline():
    assert not is_class_balanced(METHOD_LOSSES["ldam_drw"])
    assert is_class_balanced({"type": "focal", "beta": 0.999, "gamma": 1.0})
    assert not is_class_balanced({"type": "softmax", "beta": 0.9999, "drw_epoch": 160})  # CE-DRW
    assert baseline_loss({"losses": {"drw": {"type": "softmax", "beta": 0.9999, "drw_epoch": 8}, **METHOD_LOSSES}}) == "softmax"
