"""Transfer sources (rule ``pool_source``): one manifest per source, pooling its datasets.

A source is one or more datasets (``transfer.sources``), or the classes the greedy selection
chose from the pool (``transfer.selection``). Pretraining on it and fine-tuning from it are
training jobs (:mod:`finetail.training`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .manifest import class_table, read_manifest, rebase_store, write_manifest

__all__ = ["pool_sources"]


def pool_sources(inputs: list[str], classes: str | None, out_dir: Path) -> str:
    """Concatenate source manifests (optionally only the classes named in the CSV ``classes``)
    into ``out_dir/manifest.parquet``, relabelled 0..C-1 in (source, label) order, with its
    ``classes.csv``. Class names must be unique across the inputs. Returns a log line."""
    out = out_dir / "manifest.parquet"
    parts = []
    for m in inputs:
        parts.append(rebase_store(read_manifest(m), m, out).assign(source=Path(m).parent.name))
    df = pd.concat(parts, ignore_index=True)
    dup = df.groupby("class_name")["source"].nunique()
    if (dup > 1).any():
        raise ValueError(f"class names shared between pooled sources: {sorted(dup[dup > 1].index)[:5]}")
    if classes:
        keep = pd.read_csv(classes)["class_name"]
        missing = sorted(set(keep) - set(df["class_name"]))
        if missing:
            raise ValueError(f"{classes} names classes that no input has: {missing[:5]}")
        df = df[df["class_name"].isin(set(keep))]
    order = df.drop_duplicates("class_name")[["source", "label", "class_name"]].sort_values(["source", "label"])
    relabel = {c: i for i, c in enumerate(order["class_name"])}
    df = df.assign(label=df["class_name"].map(relabel).astype("int64"))
    write_manifest(df, out)
    class_table(df).to_csv(out_dir / "classes.csv", index=False)
    return f"pooled {len(inputs)} manifest(s): {len(relabel)} classes, {int((df['split'] == 'train').sum())} training images"
