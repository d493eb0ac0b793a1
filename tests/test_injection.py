"""Config values cannot run shell commands or write outside the study (issue 10).

Two defences, each tested on its own:
- the schema (and ``check_config``) allows only safe names where a name becomes a path part
  or a wildcard, and says which key is wrong: ``finetail check-config`` and Snakemake both
  refuse an unsafe config before any job runs;
- every value a rule puts into its ``shell:`` is quoted (``{x:q}``), so even a name that got
  past the schema reaches ``finetail`` as one argument, and no command substitution runs.
"""

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from finetail.config import MODEL_PATTERN, NAME_PATTERN, WEIGHTS_PATTERN, ConfigError, load_config

from conftest import ROOT

INJECT = "x$(touch PWNED)"
RECIPE = {"model": "resnet8", "width": 4, "epochs": 1, "batch_size": 4, "milestones": [], "lr_factors": [],
          "eval_every": 1, "warmup_epochs": 0}
SMALL_WORLD = {"kind": "world", "train_per_class": 2, "test_per_class": 1}


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _default() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def _image_tree(root: Path) -> Path:
    """A two-class ImageFolder tree (train/ + test/) of tiny PNGs."""
    from PIL import Image

    for split, n in (("train", 3), ("test", 2)):
        for c in ("c0", "c1"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), 40 * i + 100 * int(c[1]), np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _snakemake(workdir: Path, config: Path, *args: str, snakefile: Path = ROOT / "Snakefile"):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir), "--configfile",
           str(config), "--cores", "1", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------- (a) the schema refuses


def _set(path: tuple, value):
    def edit(cfg):
        node = cfg
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return edit


def _add_key(path: tuple, key, value):
    def edit(cfg):
        node = cfg
        for p in path:
            node = node[p]
        node[key] = value
    return edit


def _append(path: tuple, value):
    def edit(cfg):
        node = cfg
        for p in path:
            node = node[p]
        node.append(value)
    return edit


# (edit of the default config, the key the error must name, the offending value)
UNSAFE = {
    "dataset key $(...)": (_add_key(("datasets",), INJECT, {"kind": "imagefolder", "source": "x"}), "datasets", INJECT),
    "dataset key ../..": (_add_key(("datasets",), "../../evil", {"kind": "imagefolder", "source": "x"}), "datasets",
                          "../../evil"),
    "dataset key ..": (_add_key(("datasets",), "..", {"kind": "imagefolder", "source": "x"}), "datasets", ".."),
    "dataset key, trailing newline": (_add_key(("datasets",), "mine\n", {"kind": "imagefolder", "source": "x"}),
                                      "datasets", "mine\n"),
    "features weights": (_set(("transfer", "features", "weights"), "X$(touch PWNED)"), "transfer.features.weights",
                         "X$(touch PWNED)"),
    "features model": (_set(("transfer", "features", "model"), "tv:resnet18;touch PWNED"), "transfer.features.model",
                       "tv:resnet18;touch PWNED"),
    "loss name ;": (_add_key(("cbloss", "losses"), "cb;touch PWNED", {"type": "softmax"}), "cbloss.losses",
                    "cb;touch PWNED"),
    "study /": (_set(("study",), "../elsewhere"), "study", "../elsewhere"),
    "source name": (_add_key(("transfer", "sources"), "a b", ["generic"]), "transfer.sources", "a b"),
    # appended after the default study's seven targets
    "target": (_append(("transfer", "targets"), "../cub200"), "transfer.targets[7]", "../cub200"),
    "selection name": (_set(("transfer", "selection", "name"), "sel`touch PWNED`"), "transfer.selection.name",
                       "sel`touch PWNED`"),
    "selection pool": (_append(("transfer", "selection", "pool"), "/etc"), "transfer.selection.pool[2]", "/etc"),
    "random source name": (_set(("transfer", "selection", "random", "name"), "r$(touch PWNED)"),
                           "transfer.selection.random.name", "r$(touch PWNED)"),
    "recipe weights": (_set(("cbloss", "recipe", "weights"), "W'"), "cbloss.recipe.weights", "W'"),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_unsafe_names_are_refused_naming_the_key(tmp_path, case):
    edit, key, value = UNSAFE[case]
    cfg = _default()
    edit(cfg)
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path / "c.yaml", cfg))
    msg = str(err.value)
    assert "\n" not in msg, msg  # one line
    assert f"{key}: " in msg and repr(value) in msg and "is not allowed" in msg, msg


def test_unsafe_names_in_cbloss_natural_are_refused(tmp_path):
    cfg = _default()
    cfg["cbloss_natural"] = {"datasets": ["natural"], "models": ["resnet8"], "losses": {"softmax": {"type": "softmax"}},
                             "recipe": RECIPE}
    load_config(_write(tmp_path / "ok.yaml", cfg))
    for where, edit in (("cbloss_natural.losses", _add_key(("cbloss_natural", "losses"), "a;b", {"type": "softmax"})),
                        ("cbloss_natural.models[1]", _append(("cbloss_natural", "models"), "tv:x$(touch PWNED)")),
                        ("cbloss_natural.datasets[1]", _append(("cbloss_natural", "datasets"), "../natural"))):
        bad = copy.deepcopy(cfg)
        edit(bad)
        with pytest.raises(ConfigError, match=re.escape(f"{where}: ")):
            load_config(_write(tmp_path / "bad.yaml", bad))


@pytest.mark.parametrize("name", ["generic+natural", "cub200", "a.b-c_d", "CIFAR10", "x1"])
def test_safe_names_pass(tmp_path, name):
    cfg = _default()
    cfg["datasets"][name] = {"kind": "imagefolder", "source": "somewhere"}
    cfg["cbloss"]["losses"][name] = {"type": "softmax"}
    cfg["transfer"]["sources"][name] = ["generic"] if name != "generic+natural" else ["generic", "natural"]
    cfg["study"] = name
    load_config(_write(tmp_path / "c.yaml", cfg))


def test_patterns_are_the_schemas():
    """One pattern per kind of name, stated in the schema and in finetail.config alike."""
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert schema["$defs"]["name"]["pattern"] == NAME_PATTERN == "^[A-Za-z0-9][A-Za-z0-9_.+-]*$"
    assert schema["$defs"]["model_name"]["pattern"] == MODEL_PATTERN
    assert schema["$defs"]["weights_name"]["pattern"] == WEIGHTS_PATTERN
    for ok in ("resnet32", "tv:resnet50", "tv:inception_v3", "generic+natural"):
        assert re.fullmatch(MODEL_PATTERN, ok)
    for bad in ("tv:x y", "tv:../x", "../x", "tv:", "a$b"):
        assert not re.fullmatch(MODEL_PATTERN, bad)


def test_check_config_cli_reports_one_line(tmp_path):
    cfg = _default()
    cfg["datasets"][INJECT] = {"kind": "imagefolder", "source": "x"}
    r = subprocess.run([sys.executable, "-m", "finetail.cli", "check-config", str(_write(tmp_path / "c.yaml", cfg))],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"datasets: name {INJECT!r} is not allowed" in lines[0] and NAME_PATTERN in lines[0]
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("case", ["dataset key $(...)", "features weights", "loss name ;", "study /"])
@pytest.mark.slow
def test_snakemake_refuses_naming_the_key_before_any_job(tmp_path, case):
    edit, key, value = UNSAFE[case]
    cfg = _default()
    edit(cfg)
    r = _snakemake(tmp_path, _write(tmp_path / "c.yaml", cfg), "-n")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert value in out and "does not match" in out
    # Snakemake's validate() names the failing key as a schema path, e.g. schema['properties']['datasets']
    assert all(f"['{part}']" in out for part in re.sub(r"\[\d+\]", "", key).split(".")), out[-2000:]
    assert "Building DAG" not in out


# ----------------------------------------------- (b) real runs: nothing created, nothing outside


def _files(root: Path, skip: set) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] not in skip}


def _injection_configs(images: Path) -> dict[str, tuple[dict, list[str]]]:
    """Each attack of issue 10 as a tiny study, with the targets that make its job run."""
    folder = {"kind": "imagefolder", "source": str(images), "store": "array"}
    return {
        "dataset key $(...)": (
            {"study": "tiny", "datasets": {INJECT: folder}},
            [f"results/tiny/datasets/{INJECT}/manifest.parquet"],
        ),
        "dataset key ../..": (  # the prepare job of cbloss's dataset would write results/evil, logs/evil.log
            {"study": "tiny", "datasets": {"../../evil": folder},
             "cbloss": {"datasets": ["../../evil"], "imbalance": [2], "losses": {"softmax": {"type": "softmax"}},
                        "recipe": RECIPE}},
            ["--until", "prepare_dataset"],
        ),
        "features weights": (
            {"study": "tiny", "world": {"image_size": 16}, "datasets": {"generic": SMALL_WORLD, "cub200": SMALL_WORLD},
             "transfer": {"sources": {"generic": ["generic"]}, "targets": ["cub200"],
                          "features": {"model": "tv:resnet18", "weights": "X$(touch PWNED)"},
                          "pretrain": {"recipe": RECIPE}, "finetune": {"recipe": RECIPE}}},
            ["results/tiny/features/tv_resnet18/cub200.npz"],
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dataset key $(...)", "dataset key ../..", "features weights"])
def test_a_real_run_creates_nothing(tmp_path, case):
    images = _image_tree(tmp_path / "images")
    work = tmp_path / "work"
    work.mkdir()
    cfg, targets = _injection_configs(images)[case]
    r = _snakemake(work, _write(tmp_path / "study.yaml", cfg), *targets)
    out = r.stdout + r.stderr
    assert not list(tmp_path.rglob("PWNED")), out[-3000:]
    outside = {f for f in _files(work, {".snakemake"}) if not f.startswith(("results/tiny/", "logs/tiny/"))}
    assert not outside, outside
    assert r.returncode != 0 and "does not match" in out, out[-3000:]  # refused by the schema, before any job
    assert not (work / "results").exists() and not (work / "logs").exists()


# ------------------------------------------- (c) the quoting itself, with the name check disabled

WRAPPER = '''\
# Test-only entry point: the real Snakefile with the schema's name patterns taken out and
# finetail's name check switched off, so that the rules' shell quoting is tested on its own.
import snakemake.utils
import finetail.config

_validate = snakemake.utils.validate


def _relaxed_validate(data, schema, set_default=True):
    return _validate(data, schema={relaxed!r}, set_default=set_default)


snakemake.utils.validate = _relaxed_validate
finetail.config._check_names = lambda config: None


include: {snakefile!r}
'''


def _relaxed_snakefile(folder: Path) -> Path:
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("pattern", "propertyNames")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    (folder / "relaxed.schema.yaml").write_text(yaml.safe_dump(strip(schema)))
    snakefile = folder / "Snakefile"
    snakefile.write_text(WRAPPER.format(relaxed=str(folder / "relaxed.schema.yaml"), snakefile=str(ROOT / "Snakefile")))
    return snakefile


# Every kind of name, each carrying a space, a command substitution and shell metacharacters.
EVIL = {
    "study": "st udy$(touch PWNED)",
    "dataset": "da ta$(touch PWNED);`touch PWNED`'",
    "loss": "lo ss;touch PWNED",
    "source": "so urce$(touch PWNED)",
    "selected": "se l`touch PWNED`",
    "random": "ra nd;touch PWNED",
    "model": "tv:m$(touch PWNED)",
    "weights": "W$(touch PWNED)",
    "resources": "res $(touch PWNED)",
    "uri": "sqlite:///t $(touch PWNED).db",
    "experiment": "ex p$(touch PWNED)",
}


def _evil_config(images: Path) -> dict:
    e = EVIL
    losses = {e["loss"]: {"type": "softmax"}}
    return {
        "study": e["study"],
        "world": {"image_size": 16},
        "resources_dir": e["resources"],
        "datasets": {"generic": SMALL_WORLD, e["dataset"]: {"kind": "imagefolder", "source": str(images)}},
        "cbloss": {"datasets": [e["dataset"]], "imbalance": [2], "losses": losses, "recipe": RECIPE},
        "cbloss_natural": {"datasets": [e["dataset"]], "models": [e["model"]], "losses": losses, "recipe": RECIPE},
        "tracking": {"uri": e["uri"], "experiment": e["experiment"]},
        "transfer": {
            "sources": {"generic": ["generic"], e["source"]: ["generic"]},
            "selection": {"name": e["selected"], "pool": ["generic", e["source"]], "top_k": 1,
                          "random": {"name": e["random"], "seed": 0}},
            "targets": [e["dataset"]],
            "features": {"model": e["source"], "weights": e["weights"]},
            "pretrain": {"recipe": RECIPE},
            "finetune": {"recipe": RECIPE},
        },
    }


RULES = {"generate_world", "prepare_dataset", "longtail", "cbloss", "cbloss_natural", "pool_source", "pretrain",
         "finetune", "features", "similarity", "selection", "random_subset", "transferability", "report"}


def _shell_commands(dry_run_output: str) -> list[tuple[str, str]]:
    """(rule, shell command) of every job a `snakemake -n -p` printed."""
    rule, out = None, []
    for line in dry_run_output.splitlines():
        m = re.match(r"(?:local)?rule (\w+):$", line)
        if m:
            rule = m[1]
        elif line.startswith("Shell command: ") and line != "Shell command: None":  # rule all has none
            out.append((rule, line.removeprefix("Shell command: ")))
    return out


@pytest.mark.slow
def test_every_rule_quotes_every_value(tmp_path):
    """With unsafe names forced past the schema, every rule's rendered command still parses
    into whole arguments, and running the commands (``finetail`` replaced by a stub that
    records its argv) executes no substitution."""
    images = _image_tree(tmp_path / "images")
    work = tmp_path / "work"
    work.mkdir()
    r = _snakemake(work, _write(tmp_path / "evil.yaml", _evil_config(images)), "-n", "-p", "all",
                   snakefile=_relaxed_snakefile(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    commands = _shell_commands(r.stdout + r.stderr)
    assert {rule for rule, _ in commands} == RULES

    values = set(EVIL.values()) | {EVIL["model"].replace(":", "_")}
    for rule, cmd in commands:
        for token in shlex.split(cmd):  # unbalanced quoting would raise here
            if "PWNED" in token:
                # a value split by the shell would leave a token holding only part of it
                assert any(v in token for v in values), (rule, token, cmd)

    # Run them: a stub `finetail` records its arguments; bash expands the rest.
    argv_log = tmp_path / "argv.jsonl"
    stub = tmp_path / "bin" / "finetail"
    stub.parent.mkdir()
    stub.write_text(f"#!{sys.executable} -IS\nimport json, sys\n"
                    f"open({str(argv_log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    for rule, cmd in commands:
        log = shlex.split(cmd)[shlex.split(cmd).index(">") + 1]
        (work / log).parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["bash", "-c", f"set -euo pipefail; {cmd}"], cwd=work, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, (rule, done.stderr)
    assert not list(tmp_path.rglob("PWNED"))
    assert {p.name for p in (work / "logs").iterdir()} == {EVIL["study"]}

    calls = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert len(calls) == len(commands)

    def arg(call, flag):
        return call[call.index(flag) + 1]

    study, ds = EVIL["study"], EVIL["dataset"]
    prepare = next(c for c in calls if c[0] == "prepare")
    assert arg(prepare, "--dataset") == ds
    assert arg(prepare, "--resources") == EVIL["resources"]
    assert arg(prepare, "--out-dir") == f"results/{study}/datasets/{ds}"
    features = [c for c in calls if c[0] == "features"]
    assert all(arg(c, "--weights") == EVIL["weights"] for c in features) and len(features) == 5
    trains = [c for c in calls if c[0] == "train"]
    assert all(arg(c, "--config-tracking-uri") == EVIL["uri"] and arg(c, "--experiment") == EVIL["experiment"]
               for c in trains)
    finetunes = [c for c in trains if arg(c, "--rule") == "finetune"]
    assert {arg(c, "--init-model") for c in finetunes if "--init-model" in c} == {
        f"results/{study}/pretrain/{s}/seed0/model.pt" for s in ("generic", EVIL["source"], EVIL["selected"], EVIL["random"])}
    scores = {arg(c, "--out") for c in calls if c[0] == "transferability"}
    assert scores == {f"results/{study}/transferability/{s}/{ds}/rep0/scores.csv"
                      for s in ("generic", EVIL["source"], EVIL["selected"], EVIL["random"])}
    drawn = next(c for c in calls if c[0] == "random-subset")
    assert arg(drawn, "--out") == f"results/{study}/selection/{EVIL['random']}/rep0/classes.csv"
    pools = {arg(c, "--out-dir"): c for c in calls if c[0] == "pool"}
    selected = pools[f"results/{study}/sources/{EVIL['selected']}/rep0"]
    assert arg(selected, "--classes") == f"results/{study}/selection/{EVIL['selected']}/rep0/classes.csv"
    inputs = selected[selected.index("--inputs") + 1 : selected.index("--classes")]
    assert inputs == [f"results/{study}/sources/{s}/rep0/manifest.parquet" for s in ("generic", EVIL["source"])]
    cell = next(c for c in trains if arg(c, "--rule") == "cbloss")
    assert arg(cell, "--out-dir") == f"results/{study}/cbloss/{ds}/if2/{EVIL['loss']}/seed0"
    assert json.loads(arg(cell, "--wildcards")) == {"dataset": ds, "imbalance": "2", "loss": EVIL["loss"], "seed": "0"}


@pytest.mark.slow
def test_a_real_run_with_an_unsafe_name_forced_past_the_schema_runs_nothing_else(tmp_path):
    """The prepare job really runs (through Snakemake) for a dataset named x$(touch PWNED):
    its outputs land under that literal name in the study, and no PWNED file appears."""
    images = _image_tree(tmp_path / "images")
    work = tmp_path / "work"
    work.mkdir()
    cfg = {"study": "tiny", "datasets": {INJECT: {"kind": "imagefolder", "source": str(images), "store": "array"}}}
    r = _snakemake(work, _write(tmp_path / "study.yaml", cfg), f"results/tiny/datasets/{INJECT}/manifest.parquet",
                   snakefile=_relaxed_snakefile(tmp_path))
    assert not list(tmp_path.rglob("PWNED"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (work / "results" / "tiny" / "datasets" / INJECT / "manifest.parquet").exists()
    assert (work / "logs" / "tiny" / "prepare_dataset" / f"{INJECT}.log").exists()
    assert {f for f in _files(work, {".snakemake"}) if not f.startswith(("results/tiny/", "logs/tiny/"))} == set()


def test_every_shell_field_is_quoted():
    """Every {field} in every rule's shell: carries :q, so a new rule cannot forget it."""
    fields = []
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for block in re.findall(r"^    shell:\n((?:        .*\n?)+)", smk.read_text(), flags=re.M):
            text = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', block))
            fields += [(smk.name, f) for f in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", text)]
    assert len(fields) > 50
    assert [(name, f) for name, f in fields if not f.endswith(":q")] == []
