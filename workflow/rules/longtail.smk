# Long-tailed training subsets: manifests that point into the balanced set's store.
# Code: finetail.longtail.


rule longtail:
    input:
        manifest=lambda wildcards: dataset_manifest(wildcards.dataset, int(wildcards.rep)),
    output:
        manifest=L.longtail("{dataset}", "{imbalance}", rep="{rep}"),
        counts=L.longtail("{dataset}", "{imbalance}", "counts.csv", rep="{rep}"),
    params:
        code=code("longtail"),
        profile=config["longtail"]["profile"],
        # longtail.seed + rep when the subset varies between replicates (finetail.replicates)
        seed=lambda wildcards: R.seed("longtail", config["longtail"]["seed"], int(wildcards.rep)),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("longtail", "{dataset}_if{imbalance}", "rep{rep}"),
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "finetail longtail --input {input.manifest:q} --imbalance {wildcards.imbalance:q} "
        "--profile {params.profile:q} --seed {params.seed:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
