rule inspect_embeddings:
    input:
        # the page also shows what came before the vectors and after them: the dataset's validation (a log
        # of validate_dataset, so it exists whenever the table does) and the answers' labels, for a model
        # that is labelled (common.smk: LABELLED_MODELS)
        unpack(inspection_inputs),
    output:
        summary=report(
            results_path("{model}/inspection/summary.html"),
            caption="../report/inspection.rst",
            category="Embeddings",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "summary"},
        ),
        norms=report(
            results_path("{model}/inspection/norms.png"),
            caption="../report/norms.rst",
            category="Embeddings",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "vector norms"},
        ),
        json=results_path("{model}/inspection/summary.json"),
    log:
        "logs/inspect/{model}.log",
    retries: 0  # deterministic: a retry repeats the same error
    conda:
        "../../envs/core.yaml"
    params:
        cli=VLMSTATES,
        labels=lambda wildcards, input: (
            f"--labels {shlex.quote(input.labels)} --labels-summary {shlex.quote(input.labels_summary)}"
            if "labels" in input.keys()
            else ""
        ),
    shell:
        "{params.cli} inspect {input.embeddings:q} --name {wildcards.model:q} --html {output.summary:q}"
        " --png {output.norms:q} --json {output.json:q} --validation {input.validation:q}"
        " {params.labels} > {log:q} 2>&1"
