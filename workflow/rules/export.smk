# The seed scripts' per-question layout, for analysis code written against it (config: export).
# A directory() output: the number of part files is known only once the embeddings are merged.


rule export_seed_layout:
    input:
        results_path("{model}/embeddings.h5"),
    output:
        directory(results_path("{model}/seed_layout")),
    log:
        "logs/export/{model}.log",
    retries: 0  # deterministic: a retry repeats the same error
    conda:
        "../../envs/core.yaml"
    params:
        cli=VLMSTATES,
        part_size=config["export"]["part_size"],
    shell:
        "{params.cli} export {input:q} {output:q} --prefix {wildcards.model}"
        " --part-size {params.part_size} > {log:q} 2>&1"


# The embeddings as a Hugging Face dataset, one array column per representation and layer (config:
# export.hf_dataset); read back with datasets.load_from_disk, or load_dataset for the parquet form.
rule export_hf_dataset:
    input:
        results_path("{model}/embeddings.h5"),
    output:
        directory(results_path("{model}/hf_dataset")),
    log:
        "logs/export_hf/{model}.log",
    retries: 0  # deterministic: a retry repeats the same error
    conda:
        "../../envs/core.yaml"
    params:
        cli=VLMSTATES,
        format=config["export"]["hf_format"],
    shell:
        "{params.cli} export-hf {input:q} {output:q} --format {params.format} > {log:q} 2>&1"
