# Helpers shared by the stages: paths, config subtrees as JSON, wildcard alternations.
import functools
import json
import shutil
import sys
from pathlib import Path

from finetail.code import PKG as INSTALLED_PKG, code_digest
from finetail.config import check_config
from finetail.plugins import PATH_ENV, plugin_digest
from finetail.layout import Layout, imbalance_tag
from finetail.replicates import Replicates
from finetail.training.recipe import crt_spec
from finetail.report_files import commit_label, halves_of, report_entry, report_files

# Plugins (finetail.plugins): a `module:callable` is found on PYTHONPATH, then beside the study
# file. Jobs find that folder in FINETAIL_PLUGIN_PATH (where a plugin lies is not part of a
# result; the digest of its code is, below).
STUDY_DIRS = [str(Path(f).resolve().parent) for f in workflow.configfiles] or [workflow.basedir]
os.environ[PATH_ENV] = os.pathsep.join(
    dict.fromkeys([*STUDY_DIRS, *filter(None, os.environ.get(PATH_ENV, "").split(os.pathsep))])
)


envvars:
    PATH_ENV,


check_config(config, plugin_dirs=STUDY_DIRS)

# Jobs call `finetail`, found on PATH (passed on to remote jobs too). When Snakemake runs
# from a virtual environment that is not activated (.venv/bin/snakemake), put that
# environment's bin/ on the jobs' PATH.
envvars:
    "PATH",


if shutil.which("finetail") is None:
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

STUDY = config["study"]
L = Layout.of_study(STUDY)  # every results/ and logs/ path (finetail.layout)
EXPERIMENT = config["tracking"]["experiment"] or f"finetail-{STUDY}"
CB = config.get("cbloss")
# Replicates (finetail.replicates): replicate r is every training folder seed<r>, and reseeds
# each stage of replicates.vary; a stage's output lives under rep<k>, k = R.<stage>_key(..., r).
R = Replicates.of(config)
REPS = list(R.ids)


def cli_option(flag, value):
    """An optional CLI option as a list of arguments, for `{params.x:q}` (which quotes each
    element): [flag, value], or [] when value is empty. Never a pre-joined string: every
    config value reaches the shell through `:q` quoting."""
    return [flag, str(value)] if value else []


TRACKING_ARGS = cli_option("--config-tracking-uri", config["tracking"]["uri"])


# The library code each `finetail <command>` runs (finetail.code: found from the command's
# imports; the training job puts the same digest in its resume key), as a digest in the
# params of the rules that call it: editing that code changes the params, so Snakemake plans
# those jobs again (rerun trigger "params").
# The checkout's library, or (a workflow copied without src/) the installed one.
PKG = Path(workflow.basedir) / "src" / "finetail"
if not (PKG / "cli.py").is_file():
    PKG = INSTALLED_PKG


def code(command):
    return code_digest(command, PKG)


@functools.cache
def plugin_code(kind, ref):
    """The digest of a plugin's code (finetail.plugins.plugin_digest: its files, found
    without importing it)."""
    return plugin_digest(kind, ref)


def code_with_plugins(command, plugins):
    """``finetail <command>``'s code digest, followed by that of each plugin (kind, ref) the job
    runs: editing a plugin reruns exactly the jobs that run it. A job without plugins keeps
    the plain digest."""
    return "+".join([code(command), *(plugin_code(kind, ref) for kind, ref in plugins)])


def loss_plugins(spec_json):
    """The plugin a training job's spec (JSON) trains with, as [(kind, ref)] (none: [])."""
    loss = json.loads(spec_json).get("loss") or {}
    return [("loss", loss["plugin"])] if loss.get("type") == "plugin" else []


def as_json(obj):
    """A config subtree as canonical JSON, for `--spec {params.spec:q}`."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def alternation(values):
    return "|".join(sorted(re.escape(str(v)) for v in values)) or "^$"


WORLD_SETS = [d for d, spec in config["datasets"].items() if spec["kind"] == "world"]
REAL_SETS = [d for d, spec in config["datasets"].items() if spec["kind"] != "world"]


def get_imagefolder_source(wildcards):
    """An imagefolder's CSV or archive is an input (a change reruns it); a tree is not tracked."""
    spec = config["datasets"][wildcards.dataset]
    src = spec.get("source")
    return [src] if spec["kind"] == "imagefolder" and src and os.path.isfile(src) else []


def get_world_spec(wildcards):
    """The world of replicate key {rep}: world.seed + rep when the world varies."""
    world = {**config["world"], "seed": R.seed("world", config["world"]["seed"], int(wildcards.rep))}
    return as_json({"world": world, "dataset": config["datasets"][wildcards.dataset]})


def dataset_manifest(name, r, file="manifest.parquet"):
    """A dataset's manifest as replicate r sees it (a generated dataset: its world's)."""
    return L.dataset(name, file, rep=R.dataset_key(name, r))


def seeded(recipe, wildcards):
    """A recipe with the job's training seed: replicate {seed}'s (finetail.replicates)."""
    return {**recipe, "seed": R.training_seed(int(wildcards.seed))}


def get_longtail_manifest(wildcards):
    """The long-tailed subset a cell of replicate {seed} trains on."""
    return L.longtail(wildcards.dataset, wildcards.imbalance, rep=R.longtail_key(wildcards.dataset, int(wildcards.seed)))


def get_cbloss_spec(wildcards):
    return as_json(
        {
            "recipe": seeded(CB["recipe"], wildcards),
            "loss": CB["losses"][wildcards.loss],
            "shots": config["shots"],
        }
    )


NAT = config.get("cbloss_natural")


def get_cbloss_natural_spec(wildcards):
    model = NAT_MODELS[wildcards.model]
    return as_json(
        {"recipe": seeded({**NAT["recipe"], "model": model}, wildcards), "loss": NAT["losses"][wildcards.loss], "shots": config["shots"]}
    )


# Model names as path parts: "tv:resnet50" -> "tv_resnet50".
NAT_MODELS = {m.replace(":", "_"): m for m in (NAT or {}).get("models", [])}


def get_cbloss_natural_metrics():
    if not NAT:
        return []
    return expand(
        L.train("cbloss_natural", dataset="{dataset}", model="{model}", loss="{loss}", seed="{seed}"),
        dataset=NAT["datasets"],
        model=list(NAT_MODELS),
        loss=list(NAT["losses"]),
        seed=REPS,
    )


def get_wildcards_json(wildcards):
    return as_json(dict(wildcards.items()))


def get_cbloss_metrics():
    if not CB:
        return []
    return expand(
        L.train("cbloss", dataset="{dataset}", imbalance="{imbalance}", loss="{loss}", seed="{seed}"),
        dataset=CB["datasets"],
        imbalance=[imbalance_tag(i) for i in CB["imbalance"]],
        loss=list(CB["losses"]),
        seed=REPS,
    )


# Post-hoc corrections (posthoc.smk): name -> {method, tau, losses}; one job per corrected cell.
POSTHOC = (CB or {}).get("posthoc", {})
CRT = [n for n, ph in POSTHOC.items() if ph["method"] == "crt"]  # training jobs (rule crt)
PLUGIN_POSTHOC = [n for n, ph in POSTHOC.items() if ph["method"] == "plugin"]  # a plugin's (rule posthoc_plugin)
ADJUST = [n for n in POSTHOC if n not in CRT and n not in PLUGIN_POSTHOC]  # no retraining (rule posthoc)
POSTHOC_WILDCARDS = {w: f"{{{w}}}" for w in ("dataset", "imbalance", "loss", "method", "seed")}


def get_crt_spec(wildcards):
    """cRT of a cell: the cell's spec with a new linear head on its frozen backbone, trained with
    class-balanced sampling (finetail.training.recipe.crt_spec), over the entry's recipe keys."""
    cell = {"recipe": seeded(CB["recipe"], wildcards), "loss": CB["losses"][wildcards.loss], "shots": config["shots"]}
    return as_json(crt_spec(cell, **POSTHOC[wildcards.method].get("recipe", {})))


def get_posthoc_metrics():
    """Every post-hoc job's metrics.json: each correction on each cell of the losses it names."""
    if not CB:
        return []
    return [
        L.train("posthoc", dataset=ds, imbalance=imbalance_tag(imb), loss=loss, method=name, seed=seed)
        for name, ph in POSTHOC.items()
        for ds in CB["datasets"]
        for imb in CB["imbalance"]
        for loss in ph["losses"]
        for seed in REPS
    ]


# ---------------------------------------------------------------- transfer half
TR = config.get("transfer")
SEL = (TR or {}).get("selection")
SELECTED = SEL["name"] if SEL else None
# The greedy selection's random counterpart (selection.random): as many pool classes and
# training images, drawn at random; pretrained and fine-tuned like every other source.
RANDOM_SEL = (SEL or {}).get("random")
RANDOM = RANDOM_SEL["name"] if RANDOM_SEL else None
SOURCES = list(TR["sources"]) if TR else []
ALL_SOURCES = SOURCES + ([SELECTED] if SELECTED else []) + ([RANDOM] if RANDOM else [])
TARGETS = list(TR["targets"]) if TR else []
SCORES = (TR or {}).get("transferability", {}).get("scores", [])  # transferability scores (none: no scoring jobs)
SCORE_PLUGINS = (TR or {}).get("transferability", {}).get("plugins", {})  # name -> a score plugin

# ---------------------------------------------------------------- the feature model
# Similarity and selection read the class-mean features of one model, FMODEL: a feature
# network (transfer.features.networks: pretrained here on data disjoint from every source and
# target, never ranked or fine-tuned: the paper's JFT network), a ranked source's network, or
# tv:<name>. A feature network is one more `pretrain` job (source wildcard = its name, its
# datasets pooled by `pool_source`), trained ONCE: get_feature_model is the one place that
# names its model.pt (and the seed it trains with, FEATURE_SEED).
FEATS = TR["features"] if TR else {}
FEATURE_NETWORKS = dict(FEATS.get("networks", {}))  # name -> datasets it pretrains on
FMODEL = FEATS.get("model", "")
FMODEL_TAG = FMODEL.replace(":", "_")


def feature_network_recipe():
    """A feature network's recipe: the pretrain recipe with transfer.features.recipe over it."""
    return {**TR["pretrain"]["recipe"], **FEATS.get("recipe", {})}


def get_pretrain_spec(wildcards):
    if wildcards.source in FEATURE_NETWORKS:
        # folder seed<k>: the network's replicate key; its seed is k when `features` varies
        recipe = {**feature_network_recipe(), "seed": R.seed("features", 0, int(wildcards.seed))}
    else:
        recipe = seeded({**TR["pretrain"]["recipe"], **TR["pretrain"]["per_source"].get(wildcards.source, {})}, wildcards)
    return as_json({"recipe": recipe, "loss": TR["pretrain"]["loss"], "shots": config["shots"]})


def get_pretrain_manifest(wildcards):
    """The pooled manifest a source (or the feature network) of replicate key {seed} trains on."""
    return L.source(wildcards.source, rep=R.source_key(wildcards.source, int(wildcards.seed)))


def get_target_manifest(wildcards):
    return dataset_manifest(wildcards.target, int(wildcards.seed))


def get_finetune_spec(wildcards):
    recipe = {**TR["finetune"]["recipe"], **TR["finetune"]["per_target"].get(wildcards.target, {})}
    return as_json({"recipe": seeded(recipe, wildcards), "loss": {"type": "softmax"}, "shots": config["shots"]})


def get_source_inputs(wildcards):
    """Manifests a source of replicate key {rep} pools: its datasets, or (selected) the
    selection pool's sources."""
    k = int(wildcards.rep)
    if wildcards.source in (SELECTED, RANDOM):
        return {
            "manifests": [L.source(s, rep=R.source_key(s, k)) for s in SEL["pool"]],
            "classes": L.selection(wildcards.source, rep=R.selection_key(wildcards.source, k)),
        }
    if wildcards.source in FEATURE_NETWORKS:
        return {"manifests": [dataset_manifest(d, k) for d in FEATURE_NETWORKS[wildcards.source]]}
    return {"manifests": [dataset_manifest(d, k) for d in TR["sources"][wildcards.source]]}


def random_seed(k):
    """The random draw's seed in replicate key k: selection.random.seed + k when `random` varies."""
    return R.seed("random", RANDOM_SEL["seed"], int(k))


def get_features_manifest(wildcards):
    k = int(wildcards.rep)
    if wildcards.fdataset in ALL_SOURCES:
        return L.source(wildcards.fdataset, rep=R.source_key(wildcards.fdataset, k))
    return dataset_manifest(wildcards.fdataset, k)


def get_feature_model(wildcards):
    """The pipeline-pretrained feature model's weights of replicate key {rep} (a feature
    network's or a ranked source's model.pt), or nothing for a torchvision model."""
    if FMODEL.startswith("tv:"):
        return []
    return [L.train("pretrain", "model.pt", source=FMODEL, seed=R.network_key(int(wildcards.rep)))]


def features_of(names, k):
    """The class-mean features of ``names`` as a job of replicate key k reads them."""
    return [L.features(FMODEL_TAG, d, rep=R.features_key(d, k)) for d in names]


def get_features_preprocess():
    """The feature model's input preprocessing as `finetail features` options."""
    return cli_option("--image-size", FEATS["image_size"]) + [
        "--crop", FEATS["crop"], "--crop-fraction", str(FEATS["crop_fraction"])
    ]


def get_finetune_init(wildcards):
    """Fine-tune replicate R starts from the source's pretrained network of replicate R (scratch: random weights)."""
    if wildcards.source == "scratch":
        return []
    return [L.train("pretrain", "model.pt", source=wildcards.source, seed=wildcards.seed)]


def get_transfer_metrics():
    if not TR:
        return []
    rows = ALL_SOURCES + (["scratch"] if TR["finetune"]["scratch"] else [])
    return expand(
        L.train("finetune", source="{source}", target="{target}", seed="{seed}"), source=rows, target=TARGETS, seed=REPS
    )


def get_scores():
    """Every (source, target, replicate)'s transferability scores (transferability.smk)."""
    if not SCORES and not SCORE_PLUGINS:
        return []
    return [L.scores(s, t, rep=r) for s in ALL_SOURCES for t in TARGETS for r in REPS]


def get_pretrain_metrics():
    """Every pretraining run behind the report: each ranked source per replicate, and the
    feature network (per replicate key) whose features ranked them."""
    runs = expand(L.train("pretrain", source="{source}", seed="{seed}"), source=ALL_SOURCES, seed=REPS)
    if FMODEL in FEATURE_NETWORKS:
        runs += [L.train("pretrain", source=FMODEL, seed=k) for k in sorted({R.network_key(r) for r in REPS})]
    return runs


def get_similarity_outputs():
    """The similarity matrix of every replicate key (one per replicate when anything upstream varies)."""
    if not TR:
        return []
    return [L.similarity(FMODEL_TAG, rep=k) for k in sorted({R.similarity_key(ALL_SOURCES + TARGETS, r) for r in REPS})]


def get_selection_outputs(name):
    if not name:
        return []
    return [L.selection(name, rep=k) for k in sorted({R.selection_key(name, r) for r in REPS})]


# ---------------------------------------------------------------- training jobs (training.smk)
def training_params(stage, spec, **options):
    """The params every training job takes; ``spec`` builds its --spec JSON; ``options``: the
    job's optional arguments (init, save_model) as argument lists."""
    return {
        "stage": stage,
        "code": lambda wildcards: code_with_plugins("train", loss_plugins(spec(wildcards))),
        "spec": spec,
        "wildcards": get_wildcards_json,
        "out_dir": lambda wildcards, output: os.path.dirname(output.metrics),
        "checkpoint": lambda wildcards: L.checkpoint(stage, **dict(wildcards.items())),
        "study_dir": lambda wildcards: L.root,  # holds the default MLflow store
        "experiment": EXPERIMENT,
        "tracking": TRACKING_ARGS,
        "init": [],
        "save_model": [],
        **options,
    }


def training_outputs(stage, *wildcards, model=False):
    """metrics.json, per_class.csv, history.csv (and model.pt) in the job's result folder."""
    wc = {w: f"{{{w}}}" for w in wildcards}
    files = {"metrics": "metrics.json", "per_class": "per_class.csv", "history": "history.csv"}
    if model:
        files = {"model": "model.pt", **files}
    return {key: L.train(stage, name, **wc) for key, name in files.items()}


def training_log(stage, *wildcards):
    return L.train_log(stage, **{w: f"{{{w}}}" for w in wildcards})


def get_final_outputs():
    return [L.report()]


# ---------------------------------------------------------------- `snakemake --report` (report.smk)
# What the Snakemake report shows, and how: finetail.report_files.REPORT_FILES (one entry per
# file: category = the study's half, subcategory, caption in workflow/report/).
HALVES = halves_of(config)


def report_labels(entry):
    """An entry's columns in the Snakemake report's result list: what it shows, and the commits
    of the runs behind it (read from the report's provenance.csv when the report is built).
    Only the first column may differ between the results of a subcategory: the report takes a
    later column with two values, each on half the results, for a toggle (and fails on it)."""

    def labels(wildcards):
        return {
            "result": entry.shows,
            "commit": commit_label(L.report("provenance.csv"), entry.half),
        }

    return labels


def report_flag(path, name):
    """``path`` marked for `snakemake --report` as the REPORT_FILES entry ``name``."""
    entry = report_entry(name)
    return report(
        path,
        caption=f"../report/{entry.caption}",
        category=entry.category,
        subcategory=entry.subcategory,
        labels=report_labels(entry),
    )


def get_report_outputs():
    """Every file of the report for this study's halves: figures marked for the Snakemake
    report; tables declared, and their HTML views marked (e.g. cbloss_table_csv and
    cbloss_table_csv_view)."""
    out = {}
    for entry in report_files(HALVES, rule="report"):
        if entry.view is None:
            out[entry.key] = report_flag(L.report(entry.name), entry.name)
        else:
            out[entry.key] = L.report(entry.name)
            out[f"{entry.key}_view"] = report_flag(L.report(entry.view), entry.name)
    return out
