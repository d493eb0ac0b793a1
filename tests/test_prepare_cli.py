"""`finetail prepare` (what the prepare_dataset rule runs): an imagefolder tree, with and
without the pre-resize, and a clear error for a registry dataset whose file is missing."""

import json
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from helpers import read_only


def _tree(root):
    for split, n in (("train", 3), ("test", 2)):
        for cls, colour in (("owl", (200, 30, 30)), ("wren", (30, 30, 200))):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (120, 80), colour).save(d / f"{i}.jpg")
    return root


def _prepare(spec, out, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "finetail.cli", "prepare", "--dataset", "birds", "--spec",
                           json.dumps(spec), "--out-dir", str(out), *extra], capture_output=True, text=True, env=env)


def test_imagefolder_with_pre_resize(tmp_path):
    tree = _tree(tmp_path / "tree")
    r = _prepare({"kind": "imagefolder", "source": str(tree), "short_side": 40}, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    m = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert sorted(m.groupby("split").size().items()) == [("test", 4), ("train", 6)]
    assert m.groupby("label")["class_name"].first().tolist() == ["owl", "wren"]
    for rel in m["path"]:
        with Image.open(tmp_path / "out" / rel) as im:
            assert min(im.size) == 40 and im.size == (60, 40)  # aspect kept
    assert (tmp_path / "out" / "classes.csv").exists() and (tmp_path / "out" / "source.json").exists()


def test_missing_manual_file_names_the_file_and_the_place(tmp_path):
    r = _prepare({"kind": "registry", "name": "nabirds"}, tmp_path / "out", "--resources", str(tmp_path / "res"))
    assert r.returncode == 2
    assert "nabirds.tar.gz" in r.stderr and str(tmp_path / "res" / "nabirds") in r.stderr
    assert not (tmp_path / "out" / "manifest.parquet").exists()


@pytest.mark.parametrize("folder", ["writable", "read-only"])
def test_an_archive_is_prepared_without_writing_beside_it(folder, tmp_path):
    """Issue 26: preparing an ImageFolder archive left a hidden ``.<archive>.digests.json``
    beside the user's archive. Its digest cache lives in $XDG_CACHE_HOME/finetail; the user's
    folder, writable or truly read-only (a read-only mount: root ignores file modes), gets nothing."""
    data = tmp_path / "data"
    data.mkdir()
    archive = Path(shutil.make_archive(str(data / "birds"), "zip", _tree(tmp_path / "tree")))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    with read_only(data) if folder == "read-only" else nullcontext():
        r = _prepare({"kind": "imagefolder", "source": str(archive)}, tmp_path / "out", env=env)
        assert r.returncode == 0, r.stderr
        assert [p.name for p in data.iterdir()] == ["birds.zip"]
    assert len(pd.read_parquet(tmp_path / "out" / "manifest.parquet")) == 10
    assert len(list((tmp_path / "cache" / "finetail" / "digests").iterdir())) == 1
