# Transferability scores beside domain similarity: for every ranked source and every target,
# the source's pretrained network of each replicate on that replicate's target training images, scored by
# LogME, LEEP, NCE, H-score and k-NN (transfer.transferability.scores). The report ranks them
# against the fine-tuned accuracy (Kendall τ and weighted τ per target).
# Code: finetail.scoring (the job), finetail.transferability (the scores), finetail.transfer_eval.


rule transferability:
    wildcard_constraints:
        source=alternation(ALL_SOURCES) if TR else "^$",
    input:
        manifest=lambda wildcards: dataset_manifest(wildcards.target, int(wildcards.rep)),
        models=lambda wildcards: [L.train("pretrain", "model.pt", source=wildcards.source, seed=wildcards.rep)],
    output:
        L.scores("{source}", "{target}", rep="{rep}"),
    params:
        # with score plugins (transfer.transferability.plugins), their code's digests too
        code=code_with_plugins("transferability", [("score", ref) for ref in SCORE_PLUGINS.values()]),
        spec=lambda wildcards: as_json(
            {"source": wildcards.source, "target": wildcards.target, **TR["transferability"]}
        ),
        seeds=lambda wildcards: [wildcards.rep],
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("transferability", "{source}", "{target}", "rep{rep}"),
    threads: 1
    resources:
        gpu=1,  # one GPU where there is one (Slurm: --gpus; locally: --resources gpu=N tokens)
        mem_mb=3000,
        runtime=30,
    shell:
        "finetail transferability --models {input.models:q} --seeds {params.seeds:q} --manifest {input.manifest:q} "
        "--spec {params.spec:q} --out {output:q} --threads {threads:q} > {log:q} 2>&1"
