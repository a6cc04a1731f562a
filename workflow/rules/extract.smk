# On the CPU, before any extraction job of the model: the dataset's largest image in image tokens, with the
# model's processor (its family's environment) and the config's image budget (vlmstates.extraction.image_budget).
rule image_budget:
    input:
        table=VALIDATED_TABLE,
        weights=built_weights,
    output:
        results_path("{model}/image_budget.json"),
    log:
        "logs/image_budget/{model}.log",
    retries: 0  # deterministic: a retry repeats the same refusal
    conda:
        family_environment
    params:
        cli=VLMSTATES,
        settings=settings_json,
        images=dataset_images(),
    shell:
        "{params.cli} image-budget --settings {params.settings:q} --table {input.table:q}"
        " --images {params.images:q} --out {output:q} > {log:q} 2>&1"


rule extract_shard:
    input:
        table=VALIDATED_TABLE,
        weights=built_weights,
        budget=image_budget_report,
    output:
        results_path("{model}/shards/shard_{shard}.h5"),
    log:
        "logs/extract/{model}/shard_{shard}.log",
    benchmark:
        "benchmarks/extract/{model}/shard_{shard}.tsv"
    conda:
        family_environment
    # image decoding and the processor in worker processes (extraction.preprocess_workers); on SLURM
    # --cpus-per-gpu (profiles/slurm)
    threads: EXTRACTION.threads
    resources:
        gpu=1,
        # requests of a cluster job (profiles/slurm); a site may override them per model there
        mem_mb=extraction_memory_mb,
        runtime=extraction_runtime,
        # each retry halves the batch size (at most half the one that ran out of GPU memory, auto included)
        attempt=lambda wildcards, attempt: attempt,
    # retried (profile restart-times) for out of memory or time; an error that a retry would repeat
    # leaves this marker (a copy of the log), and the retry then ends at once (vlmstates.workflow.retry_guard)
    params:
        cli=VLMSTATES_NO_REPEAT,
        marker="logs/extract/{model}/shard_{shard}.no-retry.log",
        settings=settings_json,
        images=dataset_images(),
        shard_size=EXTRACTION.shard_size,
        max_failed_share=EXTRACTION.max_failed_share,
        save_every=EXTRACTION.save_every,
        preprocess_workers=EXTRACTION.preprocess_workers,
        # the batch sizes `auto` found, per GPU type, for the model's later jobs (not an output: a cache)
        batch_sizes=lambda wildcards: results_path(
            f"{wildcards.model}/shards/{BATCH_SIZE_RECORD}"
        ),
        # after its own shard, the model's unclaimed shards, while the job's runtime leaves room
        # (vlmstates.extraction.turns)
        reuse=(
            "--reuse-loaded-model"
            if EXTRACTION.reuse_loaded_model
            else "--no-reuse-loaded-model"
        ),
    shell:
        "{params.cli} --attempt {resources.attempt} --log {log:q} --marker {params.marker:q} -- extract-shard"
        " --settings {params.settings:q} --table {input.table:q} --images {params.images:q}"
        " --shard {wildcards.shard} --shard-size {params.shard_size}"
        " --max-failed-share {params.max_failed_share} --save-every {params.save_every}"
        " --attempt {resources.attempt} --threads {threads} --preprocess-workers {params.preprocess_workers}"
        " {params.reuse} --time-limit {resources.runtime} --batch-size-record {params.batch_sizes:q}"
        " --out {output:q} > {log:q} 2>&1"


rule merge_shards:
    input:
        table=VALIDATED_TABLE,
        shards=model_shards,
    output:
        results_path("{model}/embeddings.h5"),
    log:
        "logs/merge/{model}.log",
    retries: 0  # deterministic: a retry repeats the same refusal
    conda:
        "../../envs/core.yaml"
    params:
        cli=VLMSTATES,
    shell:
        "{params.cli} merge --table {input.table:q} --out {output:q} {input.shards:q} > {log:q} 2>&1"
