rule inspect_embeddings:
    input:
        embeddings=results_path("{model}/embeddings.h5"),
        # the page also shows what came before the vectors and after them: the dataset's validation (a log
        # of validate_dataset, so it exists whenever the table does) and the answers' labels
        validation=results_path("dataset/validation.json"),
        labels=results_path("{model}/labels.csv"),
        labels_summary=results_path("{model}/labels.summary.json"),
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
    shell:
        "{params.cli} inspect {input.embeddings:q} --name {wildcards.model:q} --html {output.summary:q}"
        " --png {output.norms:q} --json {output.json:q} --validation {input.validation:q}"
        " --labels {input.labels:q} --labels-summary {input.labels_summary:q} > {log:q} 2>&1"
