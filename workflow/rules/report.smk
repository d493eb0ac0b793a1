# The report: tables and figures from every metrics.json, with the papers' numbers beside ours.
# Code: finetail.report (lineage and audit of its numbers: finetail.provenance).


rule report:
    input:
        cbloss=get_cbloss_metrics(),
        cbloss_natural=get_cbloss_natural_metrics(),
        finetune=get_transfer_metrics(),
        pretrain=get_pretrain_metrics() if TR else [],
        similarity=[L.similarity(FMODEL_TAG)] if TR else [],
        selection=[L.selection(SELECTED)] if SELECTED else [],
    output:
        summary=L.report(),
    params:
        code=code("report"),
        spec=as_json(
            {
                "cbloss": CB,
                "cbloss_natural": NAT,
                "transfer": TR,
                "feature_model": FMODEL_TAG,
                "sources": ALL_SOURCES,
                "selected": SELECTED,
                "datasets": config["datasets"],
                "world": config.get("world"),
                "study": STUDY,
            }
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        results=lambda wildcards: L.root,
    conda:
        "../../envs/finetail.yaml"
    log:
        L.log("report", "report"),
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "finetail report --results {params.results:q} --spec {params.spec:q} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"
