"""Results pages are rendered from committed tables, never typed: docs/results.md and the
README's results block match their rendering, and a changed number changes the page."""

import shutil

from finetail.claims import read_claims
from finetail.results_page import RESULTS, check, read_table, render_page, render_readme_block


def test_results_pages_match_their_rendering():
    assert check() == [], "run: python -m finetail.results_page render"


def test_the_committed_claims_name_their_run():
    meta, claims = read_table(RESULTS / "default_claims.csv")
    assert {"commit", "date", "cpu", "replicates"} <= set(meta)
    assert int(meta["replicates"]) >= 3 and len(meta["commit"]) >= 40
    assert (claims["replicates"] == int(meta["replicates"])).all()
    assert not read_claims(RESULTS / "default_claims.csv").empty  # what compare-claims reads


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
