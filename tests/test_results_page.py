"""Results pages are rendered from committed tables, never typed: docs/results.md and the
README's results block match their rendering, and a changed number changes the page."""

import shutil

from finetail.claims import read_claims
import pytest

from finetail.results_page import RESULTS, check, page_path, read_table, render_page, render_readme_block, studies


def test_results_pages_match_their_rendering():
    assert check() == [], "run: python -m finetail.results_page render"


@pytest.mark.parametrize("name", studies())
def test_the_committed_claims_name_their_run(name):
    meta, claims = read_table(RESULTS / f"{name}_claims.csv")
    assert {"commit", "date", "cpu", "replicates", "wall_s"} <= set(meta)
    assert int(meta["replicates"]) >= 3 and len(meta["commit"]) >= 40
    assert (claims["replicates"].dropna() == int(meta["replicates"])).all()
    assert not read_claims(RESULTS / f"{name}_claims.csv").empty  # what compare-claims reads
    assert page_path(name).is_file()


def test_the_real_photo_study_converged_and_answers_each_method_against_softmax():
    """cifar10lt_cpu's published run: softmax at IF 100 below 50% error, and a verdict for
    every method against softmax on error, balanced and few-shot accuracy."""
    _, methods = read_table(RESULTS / "cifar10lt_cpu_cbloss_methods.csv")
    softmax = methods[(methods["setting"] == "softmax") & (methods["imbalance"] == 100)]
    assert len(softmax) == 1 and softmax["top1_error_mean"].iloc[0] <= 50.0
    assert methods["few_acc_mean"].notna().all()  # a few-shot group exists (thresholds 1500 / 200)
    _, claims = read_table(RESULTS / "cifar10lt_cpu_claims.csv")
    versus = claims[claims["claim"].str.match(r"cbloss:cifar10:if100:.*-vs-softmax:")]
    methods_vs = {c.split(":")[3].removesuffix("-vs-softmax") for c in versus["claim"]}
    assert methods_vs == {"cb_focal", "ldam_drw", "balanced_softmax", "softmax+logit_adjust"}
    assert versus["verdict"].isin(["better", "worse", "not clear"]).all() and len(versus) == 3 * len(methods_vs)


def test_a_changed_number_changes_the_page(tmp_path):
    shutil.copytree(RESULTS, tmp_path / "results")
    path = tmp_path / "results" / "default_claims.csv"
    text = path.read_text()
    head = [ln for ln in text.splitlines() if ln.startswith("#")]
    meta, claims = read_table(path)
    claims.loc[0, "estimate"] = claims.loc[0, "estimate"] + 1.0
    path.write_text("\n".join(head) + "\n" + claims.to_csv(index=False, float_format="%.6f"))
    assert render_page(tmp_path / "results") != render_page(RESULTS)
    assert render_readme_block(tmp_path / "results") != render_readme_block(RESULTS)
