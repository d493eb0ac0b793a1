"""Replicates: the unit of evidence of a study.

A study runs R replicates (``replicates.count``). Replicate ``r`` reseeds every random stage
named in ``replicates.vary`` from ``r``, so that a claim's interval covers every source of
variation a rerun elsewhere would meet, not the training seed alone (Bouthillier et al.,
"Accounting for Variance in Machine Learning Benchmarks", MLSys 2021):

============  =====================================================  ======================
stage         what replicate ``r`` redraws                           seed of replicate ``r``
============  =====================================================  ======================
world         the generated world (every ``kind: world`` dataset)     ``world.seed + r``
longtail      which images the long-tailed subsets keep               ``longtail.seed + r``
features      the feature network's initialisation and data order     ``r``
random        the random counterpart of the greedy selection          ``random.seed + r``
training      every training run's initialisation and data order      ``r``
============  =====================================================  ======================

A stage left out of ``vary`` is fixed on purpose (e.g. the paper's long-tailed subset, to
compare with published numbers): it takes its base seed in every replicate. What a stage
writes is stored per replicate (``rep<k>`` in its path, :mod:`finetail.layout`) with the
*key* ``k = r`` when the stage or anything upstream of it varies, and ``k = 0`` otherwise, so a
fixed stage with fixed inputs is computed once and shared by every replicate. Keys compose:
``key_X(key_Y(r)) == key_X(r)`` when ``X`` is upstream of ``Y``, so a rule may compute its
inputs' keys from its own. Real datasets (not seeded) carry no key at all. A training job's
folder ``seed<r>`` is replicate ``r``; its training seed is ``r`` when ``training`` varies,
else 0.

>>> rep = Replicates.of({"replicates": {"count": 3, "vary": ["world", "training"]},
...                      "datasets": {"gen10": {"kind": "world"}, "cifar": {"kind": "registry"}}})
>>> rep.ids, rep.dataset_key("gen10", 2), rep.dataset_key("cifar", 2), rep.longtail_key("cifar", 2)
((0, 1, 2), 2, None, 0)
>>> rep.seed("longtail", 5, 2), rep.seed("world", 5, 2)
(5, 7)
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["STAGES", "Replicates", "covered_words"]

# The random stages a replicate may reseed, in DAG order, and how a report names each.
STAGES: dict[str, str] = {
    "world": "world",
    "longtail": "long-tailed subset",
    "features": "feature network",
    "random": "random draw",
    "training": "training seed",
}


def covered_words(stages: list[str] | tuple[str, ...]) -> str:
    """The sources of variation an interval covers, in words: ``"world + training seed"``."""
    return " + ".join(STAGES[s] for s in STAGES if s in stages) or "none (every stage fixed)"


@dataclass(frozen=True)
class Replicates:
    """Which replicates a study runs and where each stage's output of replicate ``r`` lives."""

    ids: tuple[int, ...]
    vary: frozenset[str]
    world_sets: frozenset[str] = frozenset()
    feature_model: str = ""
    feature_networks: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    selected: str | None = None
    random: str | None = None
    pool: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()

    @classmethod
    def of(cls, config: dict) -> Replicates:
        """From a (validated) study configuration; missing sections mean no such stage."""
        rep = config.get("replicates") or {}
        vary = rep.get("vary", list(STAGES))
        unknown = sorted(set(vary) - set(STAGES))
        if unknown:
            raise ValueError(f"replicates.vary names {unknown}; the stages are {list(STAGES)}")
        tr = config.get("transfer") or {}
        sel = tr.get("selection") or {}
        feats = tr.get("features") or {}
        return cls(
            ids=tuple(range(int(rep.get("count", 1)))),
            vary=frozenset(vary),
            world_sets=frozenset(d for d, s in (config.get("datasets") or {}).items() if s.get("kind") == "world"),
            feature_model=feats.get("model", ""),
            feature_networks={k: list(v) for k, v in (feats.get("networks") or {}).items()},
            sources={k: list(v) for k, v in (tr.get("sources") or {}).items()},
            selected=sel.get("name", "selected") if sel else None,
            random=(sel.get("random") or {}).get("name", "random") if sel.get("random") else None,
            pool=tuple(sel.get("pool", [])),
            targets=tuple(tr.get("targets", [])),
        )

    # -- seeds
    def seed(self, stage: str, base: int, key: int) -> int:
        """The seed of ``stage`` in the replicate whose key for it is ``key``: ``base + key`` when
        the stage varies, else ``base``."""
        if stage not in STAGES:
            raise ValueError(f"{stage!r} is not a replicate stage; expected one of {list(STAGES)}")
        return base + key if stage in self.vary else base

    def training_seed(self, r: int) -> int:
        """The training seed of replicate ``r`` (folder ``seed<r>``)."""
        return self.seed("training", 0, int(r))

    # -- what varies (a stage varies when it is reseeded or anything upstream of it varies)
    def dataset_varies(self, name: str) -> bool:
        return name in self.world_sets and "world" in self.vary

    def longtail_varies(self, dataset: str) -> bool:
        return "longtail" in self.vary or self.dataset_varies(dataset)

    def network_varies(self) -> bool:
        """The feature model's weights: a feature network's, a ranked source's network, or fixed (tv:)."""
        fm = self.feature_model
        if fm in self.feature_networks:
            return "features" in self.vary or any(self.dataset_varies(d) for d in self.feature_networks[fm])
        if fm in self.sources or fm in (self.selected, self.random):
            return True  # a ranked source's network of replicate r (a training run)
        return False

    def source_varies(self, name: str) -> bool:
        if name in self.feature_networks:
            return any(self.dataset_varies(d) for d in self.feature_networks[name])
        if name == self.selected:
            return self.selection_varies()
        if name == self.random:
            return "random" in self.vary or self.selection_varies()
        return any(self.dataset_varies(d) for d in self.sources.get(name, []))

    def features_varies(self, fdataset: str) -> bool:
        if self.network_varies():
            return True
        if fdataset in self.sources or fdataset in (self.selected, self.random):
            return self.source_varies(fdataset)
        return self.dataset_varies(fdataset)

    def selection_varies(self) -> bool:
        return any(self.features_varies(d) for d in (*self.pool, *self.targets))

    def similarity_varies(self, names: list[str] | tuple[str, ...]) -> bool:
        return any(self.features_varies(d) for d in names)

    # -- keys (the rep<k> of a stage's output in replicate r)
    @staticmethod
    def key(varies: bool, r: int) -> int:
        return int(r) if varies else 0

    def dataset_key(self, name: str, r: int) -> int | None:
        """None for a real dataset (stored once, unseeded); else the world's key."""
        if name not in self.world_sets:
            return None
        return self.key(self.dataset_varies(name), r)

    def longtail_key(self, dataset: str, r: int) -> int:
        return self.key(self.longtail_varies(dataset), r)

    def network_key(self, r: int) -> int:
        return self.key(self.network_varies(), r)

    def source_key(self, name: str, r: int) -> int:
        return self.key(self.source_varies(name), r)

    def features_key(self, fdataset: str, r: int) -> int:
        return self.key(self.features_varies(fdataset), r)

    def selection_key(self, name: str, r: int) -> int:
        return self.source_key(name, r)

    def similarity_key(self, names: list[str] | tuple[str, ...], r: int) -> int:
        return self.key(self.similarity_varies(names), r)

    # -- what an interval covers
    def covers(self, half: str, datasets: list[str] | tuple[str, ...] = (), random_source: bool = False) -> list[str]:
        """The stages whose variation an interval over replicates covers, for a statistic of
        ``half`` (``cbloss`` or ``transfer``) on ``datasets``: each stage that varies and that the
        statistic depends on."""
        out = []
        if "world" in self.vary and any(d in self.world_sets for d in datasets):
            out.append("world")
        if half == "cbloss" and "longtail" in self.vary:
            out.append("longtail")
        if half == "transfer" and self.network_varies() and self.feature_model in self.feature_networks \
                and "features" in self.vary:
            out.append("features")
        if half == "transfer" and random_source and "random" in self.vary:
            out.append("random")
        if "training" in self.vary:
            out.append("training")
        return out
