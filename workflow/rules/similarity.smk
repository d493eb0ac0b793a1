# Domain similarity: class-mean features of a feature model, the source x target EMD
# similarity matrix, and the greedy selection of the most similar source classes. All three
# read the same feature model (FMODEL, common.smk): by default a feature network pretrained
# on data no source or target holds (the paper's JFT network). Each replicate key {rep} has its
# own (finetail.replicates: the world, the feature network and the draw may differ per replicate).
# Code: finetail.features, finetail.similarity, finetail.selection.


rule features:
    input:
        manifest=get_features_manifest,
        model=get_feature_model,
    output:
        L.features(FMODEL_TAG, "{fdataset}", rep="{rep}"),
    params:
        code=code("features"),
        model=lambda wildcards, input: input.model[0] if input.model else FMODEL,
        model_name=FMODEL,
        weights=cli_option("--weights", TR["features"]["weights"]) if TR else [],
        preprocess=get_features_preprocess() if TR else [],
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("features", FMODEL_TAG, "rep{rep}", "{fdataset}"),
    threads: 1
    priority: 3  # on the transfer half's critical path (see training.smk)
    resources:
        gpu=1,  # one GPU where there is one (Slurm: --gpus; locally: --resources gpu=N tokens)
        mem_mb=3000,
        runtime=60,
    shell:
        "finetail features --model {params.model:q} {params.weights:q} --model-name {params.model_name:q} "
        "{params.preprocess:q} --manifest {input.manifest:q} --out {output:q} --threads {threads:q} > {log:q} 2>&1"


rule similarity:
    input:
        lambda wildcards: features_of(ALL_SOURCES + TARGETS, int(wildcards.rep)),
    output:
        matrix=L.similarity(FMODEL_TAG, "matrix.csv", rep="{rep}"),
        emd=L.similarity(FMODEL_TAG, "emd.csv", rep="{rep}"),
        heatmap=report_flag(L.similarity(FMODEL_TAG, "heatmap.png", rep="{rep}"), "heatmap.png"),
    params:
        code=code("similarity"),
        spec=lambda wildcards: as_json(
            {"sources": ALL_SOURCES, "targets": TARGETS, **TR["similarity"]}
        ),
        features=lambda wildcards, input: list(input),
        out_dir=lambda wildcards, output: os.path.dirname(output.matrix),
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("similarity", FMODEL_TAG, "rep{rep}"),
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "finetail similarity --features {params.features:q} --spec {params.spec:q} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"


rule selection:
    wildcard_constraints:
        source=SELECTED or "^$",
    input:
        lambda wildcards: features_of((SEL or {}).get("pool", []) + TARGETS, int(wildcards.rep)),
    output:
        L.selection("{source}", rep="{rep}"),
    params:
        code=code("select"),
        spec=lambda wildcards: as_json(
            {"pool": SEL["pool"], "targets": TARGETS, "top_k": SEL["top_k"], "threshold": SEL["threshold"],
             **TR["similarity"]}
        ),
        features=lambda wildcards, input: list(input),
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("selection", "{source}", "rep{rep}"),
    priority: 3
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "finetail select --features {params.features:q} --spec {params.spec:q} --out {output:q} > {log:q} 2>&1"


# The ablation of the greedy choice: as many classes (and training images) as the selection,
# drawn at random from the same pool (selection.random; code: finetail.selection.random_subset).
rule random_subset:
    wildcard_constraints:
        source=RANDOM or "^$",
    input:
        features=lambda wildcards: features_of((SEL or {}).get("pool", []), int(wildcards.rep)),
        selection=lambda wildcards: L.selection(SELECTED, rep=R.selection_key(SELECTED, int(wildcards.rep))) if SELECTED else [],
    output:
        L.selection("{source}", rep="{rep}"),
    params:
        code=code("random_subset"),
        spec=lambda wildcards: as_json(
            {"pool": SEL["pool"], "seed": random_seed(wildcards.rep),
             "min_source_images": TR["similarity"]["min_source_images"]}
        ),
        features=lambda wildcards, input: list(input.features),
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("random_subset", "{source}", "rep{rep}"),
    priority: 3
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "finetail random-subset --features {params.features:q} --spec {params.spec:q} "
        "--selection {input.selection:q} --out {output:q} > {log:q} 2>&1"
