"""Which library files each kind of job runs, and their digest.

A training job's resume key and the workflow's rerun trigger both include the digest of the
code that computes the job's result, so editing that code never lets a checkpoint (or an old
output) written by other code stand in for a new result. Imports neither torch nor snakemake.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["CODE_OF", "code_digest"]

PKG = Path(__file__).resolve().parent

CODE_OF: dict[str, list[str]] = {
    "generate": ["world.py", "manifest.py"],
    "longtail": ["longtail.py", "manifest.py"],
    "train": [f"training/{m}.py" for m in ("recipe", "batches", "checkpoint", "optim", "loop")]
    + ["losses.py", "models.py", "metrics.py", "manifest.py", "features.py", "loader.py", "distributed.py"],
    "features": ["features.py", "models.py", "manifest.py"],
    "similarity": ["similarity.py", "selection.py"],
    "report": ["report.py"],
    "prepare": [f"datasets/{m}.py" for m in ("download", "parsers", "pipeline", "registry", "store")],
}


def code_digest(kind: str, pkg: str | Path = PKG) -> str:
    """sha256 (16 hex digits) over the library files a kind of job runs.

    >>> len(code_digest("train"))
    16
    """
    h = hashlib.sha256()
    for name in CODE_OF[kind]:
        f = Path(pkg) / name
        if f.exists():
            h.update(name.encode() + f.read_bytes())
    return h.hexdigest()[:16]
