# Hallucination labels, per model: was each answer hallucinated?
# Conventions from common.smk: config["models"] (name -> settings), results_path("{model}/embeddings.h5"),
# config["labels"] (method, file). Every job runs the package's command line (shell:, never script:; see common.smk).


rule label:
    input:
        unpack(label_inputs),
    output:
        labels=results_path("{model}/labels.csv"),
        summary=results_path("{model}/labels.summary.json"),
    log:
        "logs/label/{model}.log",
    retries: 0  # deterministic: a retry repeats the same error
    conda:
        "../../envs/probes.yaml"
    params:
        cli=VLMSTATES,
        method=config["labels"]["method"],
        # only method `file` reads a labels file; the other methods judge the answers themselves
        labels_file=lambda wildcards, input: (
            f"--labels-file {shlex.quote(input.labels_file)}"
            if "labels_file" in input.keys()
            else ""
        ),
        # a labels file may name questions that dataset.limit or lenient validation left out
        ignore_unknown=(
            "--ignore-unknown"
            if config["dataset"]["limit"]
            or config["dataset"]["validation"] == "lenient"
            else ""
        ),
    shell:
        "{params.cli} label {input.embeddings:q} --method {params.method} {params.labels_file}"
        " {params.ignore_unknown} --output {output.labels:q} --summary {output.summary:q} > {log:q} 2>&1"
