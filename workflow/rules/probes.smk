# HALP probes, per model, on the labels of labels.smk, and a summary across models beside the paper's numbers.
# Conventions from common.smk: config["models"] (name -> settings), results_path("{model}/embeddings.h5"),
# config["probes"] (vlmstates.analysis.probes.settings.ProbeSettings fields).
# Every job runs the package's command line (shell:, never script:; see common.smk).


rule probe:
    input:
        embeddings=results_path("{model}/embeddings.h5"),
        labels=results_path("{model}/labels.csv"),
        # names the label method, which metrics and summary record (the paper's numbers sit beside halp_paper only)
        labels_summary=results_path("{model}/labels.summary.json"),
        # the dataset's own columns (beyond the required four), which probes.breakdown names
        dataset=VALIDATED_TABLE,
    output:
        metrics=report(
            results_path(f"{{model}}/probes/{PROBE_OUTPUTS.metrics_csv}"),
            caption="../report/probe_metrics.rst",
            category="Probes",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "metrics table (CSV)"},
        ),
        # the same table as a page: the report shows HTML, a CSV it only offers for download
        metrics_html=report(
            results_path(f"{{model}}/probes/{PROBE_OUTPUTS.metrics_html}"),
            caption="../report/probe_metrics.rst",
            category="Probes",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "metrics table"},
        ),
        json=results_path(f"{{model}}/probes/{PROBE_OUTPUTS.metrics_json}"),
        # the test AUROC per answer type and breakdown value, every layer (the page: the best layers only)
        subsets=results_path(f"{{model}}/probes/{PROBE_OUTPUTS.subsets_csv}"),
        subsets_html=report(
            results_path(f"{{model}}/probes/{PROBE_OUTPUTS.subsets_html}"),
            caption="../report/probe_subsets.rst",
            category="Probes",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "AUROC per subset"},
        ),
        splits=results_path(f"{{model}}/probes/{PROBE_OUTPUTS.splits_csv}"),
        # every trained probe, for rule screen and `vlmstates screen` (format: vlmstates.analysis.probes.saved)
        saved=directory(results_path(f"{{model}}/probes/{PROBE_OUTPUTS.saved}")),
        heatmap=report(
            results_path(f"{{model}}/probes/{PROBE_OUTPUTS.heatmap_png}"),
            caption="../report/probe_heatmap.rst",
            category="Probes",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "AUROC heatmap"},
        ),
        by_layer=report(
            results_path(f"{{model}}/probes/{PROBE_OUTPUTS.auroc_by_layer_png}"),
            caption="../report/probe_auroc_by_layer.rst",
            category="Probes",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "AUROC by layer"},
        ),
    log:
        "logs/probe/{model}.log",
    retries: 0  # deterministic (seeded): a retry repeats the same error
    conda:
        "../../envs/probes.yaml"
    threads: 1
    params:
        cli=VLMSTATES,
        settings=json.dumps(config["probes"]),
        out_dir=lambda wildcards, output: Path(output.metrics).parent,
    shell:
        "{params.cli} probe {input.embeddings:q} {input.labels:q} --output {params.out_dir:q}"
        " --labels-summary {input.labels_summary:q} --dataset {input.dataset:q}"
        " --settings-json {params.settings:q} --threads {threads} > {log:q} 2>&1"


rule probe_summary:
    input:
        # the labelled models (common.smk: LABELLED_MODELS, not the prefill-only ones left out)
        metrics=expand(
            results_path(f"{{model}}/probes/{PROBE_OUTPUTS.metrics_csv}"),
            model=LABELLED_MODELS,
        ),
    output:
        table=report(
            results_path("summary/probes.csv"),
            caption="../report/probe_summary_table.rst",
            category="Probes",
            subcategory="Summary",
            labels={"model": "all", "figure": "summary table (CSV)"},
        ),
        # written beside the CSV by probe-summary (vlmstates.analysis.summary.summary_html_path)
        table_html=report(
            results_path("summary/probes.html"),
            caption="../report/probe_summary_table.rst",
            category="Probes",
            subcategory="Summary",
            labels={"model": "all", "figure": "summary table"},
        ),
        plot=report(
            results_path("summary/probes.png"),
            caption="../report/probe_summary_plot.rst",
            category="Probes",
            subcategory="Summary",
            labels={"model": "all", "figure": "summary plot"},
        ),
    log:
        "logs/probe_summary.log",
    retries: 0  # deterministic: a retry repeats the same error
    conda:
        "../../envs/probes.yaml"
    params:
        cli=VLMSTATES,
    shell:
        # a model's name is read off its path, <results>/{model}/probes/metrics.csv
        "{params.cli} probe-summary {input.metrics:q} --output {output.table:q} --plot {output.plot:q}"
        " > {log:q} 2>&1"
