"""Study configuration: schema validation (with defaults) and the checks a schema cannot state.

The schema is ``workflow/schemas/config.schema.yaml``; the Snakefile validates with
Snakemake's ``validate`` and then calls :func:`check_config`; tools outside Snakemake (tests,
benchmarks, ``finetail check-config``) call :func:`load_config`, which does both.
"""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["ConfigError", "SCHEMA", "check_config", "load_config", "train_spec"]

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A study configuration that cannot run, with the offending key in the message."""


def _validate_with_defaults(config: dict, schema: dict) -> None:
    import jsonschema

    base = jsonschema.Draft202012Validator

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub:
                    instance.setdefault(name, sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    cls = jsonschema.validators.extend(base, {"properties": set_defaults})
    errors = sorted(cls(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors:
            where = "/".join(str(p) for p in e.absolute_path) or "<top level>"
            lines.append(f"  at {where}: {e.message}")
        raise ConfigError("invalid study configuration:\n" + "\n".join(lines))


def check_config(config: dict) -> None:
    """Cross-field checks: every dataset a stage names is declared, and so on."""
    datasets = config.get("datasets", {})
    cb = config.get("cbloss")
    if cb:
        for name in cb["datasets"]:
            if name not in datasets:
                raise ConfigError(f"cbloss.datasets names {name!r}, which is not declared under datasets: {sorted(datasets)}")
        r = cb["recipe"]
        if len(r.get("milestones", [])) != len(r.get("lr_factors", [])):
            raise ConfigError("cbloss.recipe: milestones and lr_factors must have the same length")
        for key, loss in cb["losses"].items():
            if loss["type"] != "focal" and loss.get("gamma", 0):
                raise ConfigError(f"cbloss.losses.{key}: gamma applies to the focal loss only")
    nat = config.get("cbloss_natural")
    if nat:
        for name in nat["datasets"]:
            if name not in datasets:
                raise ConfigError(f"cbloss_natural.datasets names {name!r}, which is not declared under datasets")
        for key, loss in nat["losses"].items():
            if loss["type"] != "focal" and loss.get("gamma", 0):
                raise ConfigError(f"cbloss_natural.losses.{key}: gamma applies to the focal loss only")
    tr = config.get("transfer")
    if tr:
        _check_transfer(tr, datasets)
    shots = config.get("shots", {})
    if shots and shots.get("few", 20) > shots.get("many", 100):
        raise ConfigError("shots.few must not exceed shots.many")
    for name, spec in datasets.items():
        kind = spec.get("kind")
        world_keys = {"train_per_class", "test_per_class"} & set(spec)
        if kind == "world":
            from .world import WORLD_DATASETS

            if name not in WORLD_DATASETS:
                raise ConfigError(f"datasets.{name}: kind 'world' makes only {list(WORLD_DATASETS)}")
        elif world_keys:
            raise ConfigError(f"datasets.{name}: {sorted(world_keys)} apply to kind 'world' only")
        if kind == "registry":
            from .datasets import names

            if spec.get("name", name) not in names():
                raise ConfigError(f"datasets.{name}: {spec.get('name', name)!r} is not in the registry: {names()}")
        if kind == "imagefolder" and not spec.get("source"):
            raise ConfigError(f"datasets.{name}: kind 'imagefolder' needs source: <tree, CSV or archive>")


def _check_transfer(tr: dict, datasets: dict) -> None:
    from .engine import TrainConfig

    for name, parts in tr["sources"].items():
        for d in parts:
            if d not in datasets:
                raise ConfigError(f"transfer.sources.{name} pools {d!r}, which is not declared under datasets")
    for t in tr["targets"]:
        if t not in datasets:
            raise ConfigError(f"transfer.targets names {t!r}, which is not declared under datasets")
    sel = tr.get("selection")
    if sel:
        if (sel.get("top_k") is None) == (sel.get("threshold") is None):
            raise ConfigError("transfer.selection needs exactly one of top_k and threshold")
        for p in sel["pool"]:
            if p not in tr["sources"]:
                raise ConfigError(f"transfer.selection.pool names {p!r}, which is not a transfer source")
        if sel.get("name", "selected") in tr["sources"] or sel.get("name") == "scratch":
            raise ConfigError(f"transfer.selection.name {sel.get('name')!r} clashes with a source name")
    if "scratch" in tr["sources"]:
        raise ConfigError("'scratch' is reserved for training from random weights; rename that source")
    fmodel = tr.get("features", {}).get("model")
    if fmodel is None:
        raise ConfigError("transfer.features.model is required: a source name or tv:<torchvision name>")
    if not fmodel.startswith("tv:") and fmodel not in tr["sources"]:
        raise ConfigError(f"transfer.features.model {fmodel!r} is neither a transfer source nor tv:<name>")
    names = list(tr["sources"]) + ([sel.get("name", "selected")] if sel else [])
    for stage, key, allowed in (("finetune", "per_target", tr["targets"]), ("pretrain", "per_source", names)):
        for name, over in tr[stage].get(key, {}).items():
            if name not in allowed:
                raise ConfigError(f"transfer.{stage}.{key} names {name!r}; expected one of {allowed}")
            if {"model", "width"} & set(over):
                raise ConfigError(f"transfer.{stage}.{key}.{name}: model and width must stay shared")
            try:
                TrainConfig.from_dict({**tr[stage]["recipe"], **over})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"transfer.{stage}.{key}.{name}: {e}") from None
    pre, fine = tr["pretrain"]["recipe"], tr["finetune"]["recipe"]
    for key in ("model", "width"):
        if pre.get(key) != fine.get(key):
            raise ConfigError(f"transfer: finetune.recipe.{key} must equal pretrain.recipe.{key} (the backbone is reused)")


def load_config(path: str | Path, schema: str | Path = SCHEMA) -> dict:
    """Read a study YAML, validate it (filling defaults) and run :func:`check_config`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    _validate_with_defaults(config, yaml.safe_load(Path(schema).read_text()))
    check_config(config)
    return config


def imbalance_tag(imbalance: float) -> str:
    """Imbalance factor as used in paths: 100 -> "100", 12.5 -> "12.5"."""
    return f"{imbalance:g}"


def train_spec(recipe: dict, loss: dict, shots: dict) -> dict:
    """The config subtree a training job depends on, as the CLI's ``--spec`` takes it."""
    return {"recipe": dict(recipe), "loss": dict(loss), "shots": dict(shots)}
