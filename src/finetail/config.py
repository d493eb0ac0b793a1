"""Study configuration: schema validation (with defaults) and the checks a schema cannot state.

The schema is ``workflow/schemas/config.schema.yaml``; the Snakefile validates with
Snakemake's ``validate`` and then calls :func:`check_config`; tools outside Snakemake (tests,
benchmarks, ``finetail check-config``) call :func:`load_config`, which does both.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .training.recipe import FEW_SHOT, MANY_SHOT

__all__ = ["ConfigError", "check_legacy", "MODEL_PATTERN", "NAME_PATTERN", "SCHEMA", "WEIGHTS_PATTERN", "check_config", "load_config"]

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"

# Names that become file path parts and wildcards (study, dataset, source, target, selection,
# loss names): no "/", no ".." (a name starts with a letter or digit), no spaces, quotes or
# shell characters. The schema states the same patterns ($defs name, model_name, weights_name).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"
MODEL_PATTERN = r"^(tv:[A-Za-z0-9_]+|[A-Za-z0-9][A-Za-z0-9_.+-]*)$"  # resnet32, tv:resnet50, a source name
WEIGHTS_PATTERN = r"^[A-Za-z0-9_]+$"  # a torchvision weights enum member: IMAGENET1K_V2
_WHY = {NAME_PATTERN: "names become file paths and wildcards and ", MODEL_PATTERN: "model names become file paths and ",
        WEIGHTS_PATTERN: "weights are torchvision enum names and "}


class ConfigError(ValueError):
    """A study configuration that cannot run, with the offending key in the message."""


def check_legacy(config: dict) -> None:
    """Keys that earlier versions took, with what replaced them (before schema validation, whose
    message would only say the key is not allowed)."""
    for sect in ("cbloss", "cbloss_natural", "transfer"):
        if isinstance(config.get(sect), dict) and "seeds" in config[sect]:
            n = len(config[sect]["seeds"]) if isinstance(config[sect]["seeds"], list) else "N"
            raise ConfigError(f"{sect}.seeds: seeds are replicates now; remove it and set the top-level "
                              f"`replicates: {{count: {n}}}` (each replicate reseeds the world, the long-tailed "
                              "subset, the feature network, the random draw and training: workflow/schemas/"
                              "config.schema.yaml, replicates)")


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
    errors = sorted(cls(schema).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    lines = []
    for e in errors:
        where = _key(e.absolute_path)
        if e.validator == "pattern":
            what = "name" if "propertyNames" in e.schema_path else "value"
            lines.append(_not_allowed(where, what, e.instance, e.validator_value))
        else:
            lines.append(f"{where}: {e.message}")
    if len(lines) == 1:
        raise ConfigError(f"invalid study configuration: {lines[0]}")
    raise ConfigError("invalid study configuration:\n" + "\n".join(f"  {line}" for line in lines))


def _key(path) -> str:
    """A config key as the user writes it: transfer.targets[2], or <top level>."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if out else str(p)
    return out or "<top level>"


def _not_allowed(where: str, what: str, value, pattern: str) -> str:
    return f"{where}: {what} {value!r} is not allowed: {_WHY.get(pattern, '')}must match {pattern}"


def _check_names(config: dict) -> None:
    """Every name that becomes a path part, a wildcard or a shell argument matches its pattern.

    The schema states the same patterns; this check also holds for configs that bypass the
    schema, and matches the whole string (a JSON-Schema ``$`` lets a trailing newline through).
    """
    found: list[tuple[str, str, object, str]] = [("study", "value", config.get("study"), NAME_PATTERN)]
    found += [("datasets", "name", d, NAME_PATTERN) for d in config.get("datasets") or {}]
    recipes = []
    for sect in ("cbloss", "cbloss_natural"):
        sub = config.get(sect) or {}
        found += [(f"{sect}.datasets", "value", d, NAME_PATTERN) for d in sub.get("datasets", [])]
        found += [(f"{sect}.losses", "name", n, NAME_PATTERN) for n in sub.get("losses", {})]
        found += [(f"{sect}.models", "value", m, MODEL_PATTERN) for m in sub.get("models", [])]
        recipes.append((f"{sect}.recipe", sub.get("recipe")))
    tr = config.get("transfer") or {}
    for name, parts in (tr.get("sources") or {}).items():
        found += [("transfer.sources", "name", name, NAME_PATTERN)]
        found += [(f"transfer.sources.{name}", "value", d, NAME_PATTERN) for d in parts or []]
    found += [("transfer.targets", "value", t, NAME_PATTERN) for t in tr.get("targets", [])]
    sel = tr.get("selection") or {}
    found += [("transfer.selection.pool", "value", p, NAME_PATTERN) for p in sel.get("pool", [])]
    if "name" in sel:
        found.append(("transfer.selection.name", "value", sel["name"], NAME_PATTERN))
    if "name" in (sel.get("random") or {}):
        found.append(("transfer.selection.random.name", "value", sel["random"]["name"], NAME_PATTERN))
    feats = tr.get("features") or {}
    if "model" in feats:
        found.append(("transfer.features.model", "value", feats["model"], MODEL_PATTERN))
    if feats.get("weights") is not None:
        found.append(("transfer.features.weights", "value", feats["weights"], WEIGHTS_PATTERN))
    for name, parts in (feats.get("networks") or {}).items():
        found += [("transfer.features.networks", "name", name, NAME_PATTERN)]
        found += [(f"transfer.features.networks.{name}", "value", d, NAME_PATTERN) for d in parts or []]
    recipes.append(("transfer.features.recipe", feats.get("recipe")))
    for stage, key in (("pretrain", "per_source"), ("finetune", "per_target")):
        found += [(f"transfer.{stage}.{key}", "name", n, NAME_PATTERN) for n in (tr.get(stage) or {}).get(key, {})]
        recipes.append((f"transfer.{stage}.recipe", (tr.get(stage) or {}).get("recipe")))
    for where, recipe in recipes:
        if recipe and "model" in recipe:
            found.append((f"{where}.model", "value", recipe["model"], MODEL_PATTERN))
        if recipe and recipe.get("weights") is not None:
            found.append((f"{where}.weights", "value", recipe["weights"], WEIGHTS_PATTERN))
    for where, what, value, pattern in found:
        if not isinstance(value, str) or not re.fullmatch(pattern, value):
            raise ConfigError(_not_allowed(where, what, value, pattern))


def _check_losses(section: str, grid: dict) -> None:
    """Each loss setting with the grid's recipe, as its training job will read it: a key its
    type does not take (gamma on softmax, tau on LDAM), or DRW without a beta, fails here,
    naming the setting, rather than when its job starts."""
    from .training.recipe import TrainConfig

    for key, loss in grid["losses"].items():
        if loss["type"] != "focal" and loss.get("gamma", 0):
            raise ConfigError(f"{section}.losses.{key}: gamma applies to the focal loss only")
        try:
            TrainConfig.from_spec({"recipe": grid["recipe"], "loss": loss})
        except ValueError as e:
            raise ConfigError(f"{section}.losses.{key}: {e}") from None


def _load_plugin(kind: str, ref: str, where: str, params: dict | None, search: list[str]):
    """Import a plugin and check the study's params against its signature (one line naming
    ``where`` on any failure): a plugin's contract is checked when the config is loaded, not
    at its first batch. Returns the plugin and the optional keywords it declares."""
    from .plugins import PluginError, check_signature, load

    try:
        plugin = load(kind, ref, search)
        return plugin, check_signature(plugin, params or {})
    except PluginError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_plugin_losses(section: str, losses: dict, search: list[str]) -> dict[str, object]:
    """Each plugin loss of ``losses`` (name -> setting, at ``<section>.<name>``) loads and takes
    its params; returns name -> plugin."""
    out = {}
    for key, loss in losses.items():
        if loss["type"] == "plugin":
            if "plugin" not in loss:
                raise ConfigError(f"{section}.{key}: type plugin needs plugin: <entry point or module:callable>")
            out[key], _ = _load_plugin("loss", loss["plugin"], f"{section}.{key}", loss.get("params"), search)
    return out


def _check_posthoc(cb: dict, search: list[str] | None = None, plugin_losses: dict | None = None) -> None:
    from .training.recipe import SOFTMAX_LOSSES, TrainConfig

    plugin_losses = plugin_losses or {}
    for name, ph in cb.get("posthoc", {}).items():
        if ph["method"] != "plugin" and ({"plugin", "params"} & set(ph)):
            raise ConfigError(f"cbloss.posthoc.{name}: plugin and params apply to method plugin only")
        if ph["method"] == "plugin":
            if "plugin" not in ph:
                raise ConfigError(f"cbloss.posthoc.{name}: method plugin needs plugin: <entry point or module:callable>")
            if "tau" in ph or "recipe" in ph:
                raise ConfigError(f"cbloss.posthoc.{name}: a plugin correction takes params, not "
                                  f"{'tau' if 'tau' in ph else 'a recipe'}")
            _, declared = _load_plugin("posthoc", ph["plugin"], f"cbloss.posthoc.{name}", ph.get("params"),
                                       search or [])
            if declared.get("holdout") and not cb["recipe"].get("holdout"):
                raise ConfigError(f"cbloss.posthoc.{name}: plugin {ph['plugin']!r} asks for held-out training images "
                                  "(it declares holdout); set cbloss.recipe.holdout (e.g. 0.1) so the cells keep some "
                                  "out of training")
        elif ph["method"] == "crt":
            if "tau" in ph:
                raise ConfigError(f"cbloss.posthoc.{name}: cRT retrains the head and takes no tau (give it a recipe)")
            try:
                TrainConfig.from_dict({**cb["recipe"], **ph.get("recipe", {})})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"cbloss.posthoc.{name}.recipe: {e}") from None
        elif "tau" not in ph:
            raise ConfigError(f"cbloss.posthoc.{name}: {ph['method']} needs a tau (a number, or auto)")
        elif "recipe" in ph:
            raise ConfigError(f"cbloss.posthoc.{name}: {ph['method']} retrains nothing and takes no recipe")
        for loss in ph["losses"]:
            if loss not in cb["losses"]:
                raise ConfigError(f"cbloss.posthoc.{name}.losses names {loss!r}, which is not one of "
                                  f"cbloss.losses: {sorted(cb['losses'])}")
            if cb["losses"][loss]["type"] not in SOFTMAX_LOSSES:
                raise ConfigError(f"cbloss.posthoc.{name}: {loss!r} is a {cb['losses'][loss]['type']} loss; "
                                  f"post-hoc corrections take softmax-type losses ({', '.join(SOFTMAX_LOSSES)})")
            if ph["method"] == "tau_norm" and cb["losses"][loss]["type"] == "ldam":
                raise ConfigError(f"cbloss.posthoc.{name}: tau_norm on the LDAM cells of {loss!r} changes nothing "
                                  "(their normalised head divides by the row norms already); use logit_adjust")
            if ph["method"] == "tau_norm" and loss in plugin_losses and plugin_losses[loss].head == "normed":
                raise ConfigError(f"cbloss.posthoc.{name}: tau_norm on the cells of {loss!r} changes nothing (its "
                                  "plugin trains a normalised head, which divides by the row norms already)")
        if ph.get("tau") == "auto" and not cb["recipe"].get("holdout"):
            raise ConfigError(f"cbloss.posthoc.{name}: tau auto is chosen on held-out training images; "
                              "set cbloss.recipe.holdout (e.g. 0.1) so the cells keep some out of training")


def _check_score_plugins(tr: dict, search: list[str]) -> None:
    plugins = (tr.get("transferability") or {}).get("plugins") or {}
    if not plugins:
        return
    from .transferability import SCORES

    for name, ref in plugins.items():
        if name in SCORES or name == "emd":
            raise ConfigError(f"transfer.transferability.plugins.{name}: the name is a built-in score's; rename it")
        _load_plugin("score", ref, f"transfer.transferability.plugins.{name}", None, search)


def check_config(config: dict, plugin_dirs=()) -> None:
    """Cross-field checks: every name is safe as a path part, every dataset a stage names is
    declared, every plugin imports and takes its params (searched on ``sys.path``, then
    ``plugin_dirs``, e.g. the study file's folder, then ``FINETAIL_PLUGIN_PATH``), and so on."""
    from .plugins import search_path

    search = search_path(plugin_dirs)
    _check_names(config)
    datasets = config.get("datasets", {})
    cb = config.get("cbloss")
    if cb:
        for name in cb["datasets"]:
            if name not in datasets:
                raise ConfigError(f"cbloss.datasets names {name!r}, which is not declared under datasets: {sorted(datasets)}")
        r = cb["recipe"]
        if len(r.get("milestones", [])) != len(r.get("lr_factors", [])):
            raise ConfigError("cbloss.recipe: milestones and lr_factors must have the same length")
        _check_losses("cbloss", cb)
        _check_posthoc(cb, search, _check_plugin_losses("cbloss.losses", cb["losses"], search))
    nat = config.get("cbloss_natural")
    if nat:
        for name in nat["datasets"]:
            if name not in datasets:
                raise ConfigError(f"cbloss_natural.datasets names {name!r}, which is not declared under datasets")
        _check_losses("cbloss_natural", nat)
        _check_plugin_losses("cbloss_natural.losses", nat["losses"], search)
    tr = config.get("transfer")
    if tr:
        _check_transfer(tr, datasets)
        _check_plugin_losses("transfer.pretrain", {"loss": tr["pretrain"]["loss"]}, search)
        _check_score_plugins(tr, search)
    shots = config.get("shots", {})
    if shots and shots.get("few", FEW_SHOT) > shots.get("many", MANY_SHOT):
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
    from .training.recipe import TrainConfig

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
        rnd = sel.get("random")
        if rnd and rnd.get("name", "random") in [*tr["sources"], sel.get("name", "selected"), "scratch"]:
            raise ConfigError(f"transfer.selection.random.name {rnd.get('name', 'random')!r} clashes with a source "
                              "name, the selected source or 'scratch'")
    if "scratch" in tr["sources"]:
        raise ConfigError("'scratch' is reserved for training from random weights; rename that source")
    names = list(tr["sources"]) + ([sel.get("name", "selected")] if sel else [])
    if sel and sel.get("random"):
        names.append(sel["random"].get("name", "random"))
    _check_features(tr, datasets, names)
    for stage, key, allowed in (("finetune", "per_target", tr["targets"]), ("pretrain", "per_source", names)):
        for name, over in tr[stage].get(key, {}).items():
            if name not in allowed:
                raise ConfigError(f"transfer.{stage}.{key} names {name!r}; expected one of {allowed}")
            if {"model", "width", "shortcut"} & set(over):
                raise ConfigError(f"transfer.{stage}.{key}.{name}: model, width and shortcut must stay shared")
            try:
                TrainConfig.from_dict({**tr[stage]["recipe"], **over})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"transfer.{stage}.{key}.{name}: {e}") from None
    pre, fine = tr["pretrain"]["recipe"], tr["finetune"]["recipe"]
    for key in ("model", "width", "shortcut"):
        if pre.get(key, getattr(TrainConfig, key)) != fine.get(key, getattr(TrainConfig, key)):
            raise ConfigError(f"transfer: finetune.recipe.{key} must equal pretrain.recipe.{key} (the backbone is reused)")


def _check_features(tr: dict, datasets: dict, ranked: list[str]) -> None:
    """The feature model names a feature network, a ranked source or ``tv:<name>``; a feature
    network's name is its own, its datasets are declared and disjoint from every source's and
    target's (by dataset, and for generated-world datasets by class), and its recipe is valid."""
    from .training.recipe import TrainConfig

    feats = tr.get("features", {})
    networks = feats.get("networks") or {}
    fmodel = feats.get("model")
    if fmodel is None:
        raise ConfigError("transfer.features.model is required: a feature network (transfer.features.networks), "
                          "a source name or tv:<torchvision name>")
    if not fmodel.startswith("tv:") and fmodel not in networks and fmodel not in tr["sources"]:
        raise ConfigError(
            f"transfer.features.model {fmodel!r} is not a feature network (transfer.features.networks: "
            f"{sorted(networks)}), a transfer source ({sorted(tr['sources'])}) or tv:<torchvision name>"
        )
    poolers: dict[str, list[str]] = {}
    for s, parts in tr["sources"].items():
        for d in parts:
            poolers.setdefault(d, []).append(repr(s))
    seen = {d: f"source{'s' if len(p) > 1 else ''} {', '.join(p)} pool{'' if len(p) > 1 else 's'} it"
            for d, p in poolers.items()}
    seen.update({t: "it is a target" for t in tr["targets"]})
    for name, parts in networks.items():
        if name in ranked or name == "scratch":
            raise ConfigError(f"transfer.features.networks.{name}: the name clashes with a source, the selection "
                              "or 'scratch' (a feature network is never ranked or fine-tuned)")
        for d in parts:
            if d not in datasets:
                raise ConfigError(f"transfer.features.networks.{name} trains on {d!r}, which is not declared under datasets")
            if d in seen:
                raise ConfigError(f"transfer.features.networks.{name} trains on {d!r}, but {seen[d]}: a feature "
                                  "network must be independent of every source and target")
        _check_disjoint_world_classes(name, parts, datasets, seen)
    if feats.get("recipe"):
        try:
            TrainConfig.from_dict({**tr["pretrain"]["recipe"], **feats["recipe"]})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"transfer.features.recipe: {e}") from None


def _check_disjoint_world_classes(network: str, parts: list[str], datasets: dict, seen: dict) -> None:
    """A feature network's generated-world classes appear in no source's or target's dataset."""
    from .world import WORLD_DATASETS, dataset_classes

    def world_classes(names) -> dict[str, set[str]]:
        return {d: set(dataset_classes(d)) for d in names
                if datasets.get(d, {}).get("kind") == "world" and d in WORLD_DATASETS}

    mine = world_classes(parts)
    if not mine:
        return
    for other, classes in world_classes(seen).items():
        for d, own in mine.items():
            shared = sorted(own & classes)
            if shared:
                raise ConfigError(
                    f"transfer.features.networks.{network}: {d!r} shares {len(shared)} classes "
                    f"({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}) with {other!r} ({seen[other]}): "
                    "a feature network must be independent of every source and target"
                )


def load_config(path: str | Path, schema: str | Path = SCHEMA) -> dict:
    """Read a study YAML, validate it (filling defaults) and run :func:`check_config`
    (plugins: also searched beside the study file)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not a text file (byte {e.start} is not UTF-8)") from None
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path}: a study is a mapping of keys (study, datasets, ...), "
                          f"not a {type(config).__name__}")
    check_legacy(config)
    _validate_with_defaults(config, yaml.safe_load(Path(schema).read_text()))
    check_config(config, plugin_dirs=[str(path.resolve().parent)])
    return config
