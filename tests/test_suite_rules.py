"""The suite's own rules: a test that lacks its environment (data, a browser, Slurm, mount
rights) is skipped, saying why, except under CI (CI=true or 1, which .ci/run sets), where it
fails (conftest.require); test modules share helpers through helpers.py and conftest.py,
never by importing each other."""

import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT, under_ci

CASE = '''
from conftest import require

def test_needs_something():
    require(False, "no frobnicator on PATH")
'''


@pytest.mark.parametrize(("ci", "outcome"), [(None, "1 skipped"), ("true", "1 failed")])
def test_require_skips_or_fails_under_ci(tmp_path, ci, outcome):
    (tmp_path / "test_case.py").write_text(CASE)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", "--rootdir",
                        str(tmp_path), "-c", os.devnull, str(tmp_path / "test_case.py")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert outcome in r.stdout, r.stdout[-2000:]
    assert "no frobnicator on PATH" in r.stdout


@pytest.mark.parametrize(("value", "ci"), [("true", True), ("1", True), ("TRUE", True), ("yes", True),
                                           ("", False), ("0", False), ("false", False)])
def test_which_values_of_ci_count(monkeypatch, value, ci):
    monkeypatch.setenv("CI", value)
    assert under_ci() is ci


def test_no_test_module_imports_another():
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [(path.name, n) for n in names if n.split(".")[0].startswith("test_")]
    assert found == []
