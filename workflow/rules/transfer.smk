# Transfer sources: pool each source's datasets (or the selected classes) into one manifest.
# Pretraining and fine-tuning are training jobs (training.smk). Code: finetail.transfer.


rule pool_source:
    input:
        unpack(get_source_inputs),
    output:
        manifest=L.source("{source}", rep="{rep}"),
        classes=L.source("{source}", "classes.csv", rep="{rep}"),
    params:
        code=code("pool"),
        classes=lambda wildcards, input: cli_option("--classes", input.classes if "classes" in input.keys() else None),
        # the random source keeps a drawn number of each class's images, drawn with its seed
        seed=lambda wildcards: ["--seed", str(random_seed(wildcards.rep))] if wildcards.source == RANDOM else [],
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("pool_source", "{source}", "rep{rep}"),
    priority: 3  # on the transfer half's critical path (see training.smk)
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "finetail pool --inputs {input.manifests:q} {params.classes:q} {params.seed:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
