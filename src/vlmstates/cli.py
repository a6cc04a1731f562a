"""Command line: each step of the workflow, for users who run one by hand.

vlmstates validate CSV IMAGES      check and normalise a VQA table (or --source: a Hub dataset, parquet, TSV, JSON)
vlmstates extract-shard ...        one extraction job (what the workflow runs)
vlmstates merge --table T ...      merge shards into one embeddings file
vlmstates inspect FILE             print structure and summary of an embeddings file (either layout)
vlmstates export FILE OUT_DIR      write an embeddings file in the seed scripts' per-question layout
vlmstates export-hf FILE OUT       write an embeddings file as a Hugging Face dataset (arrow or parquet)
vlmstates extract --vqa-dataset ...  the workflow's steps for one model, with the seed scripts' flags
vlmstates predict --model M ...    answer one image (vqa, caption or ocr)
vlmstates label FILE ...           hallucination labels of a model's answers (halp_paper, difflib_lenient, ...)
vlmstates probe FILE LABELS ...    probes per representation and layer: AUROC with intervals and a control
vlmstates probe-summary ...        every model's best probes beside the HALP paper's published AUROCs
vlmstates screen PROBES ...        hallucination risk per question from a saved probe (no answer generated)
vlmstates demo OUT                 generate the bundled demo VQA set
vlmstates tiny FAMILY OUT          build a tiny random checkpoint of a real architecture
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

# light modules only: building the parser must not need torch or the probe extras (scikit-learn, scipy),
# which a model's extraction environment lacks; each command imports what it runs
from vlmstates import __version__
from vlmstates.analysis import labels
from vlmstates.analysis.probes import settings as probe_settings
from vlmstates.errors import EXIT_RESTART, RestartJob, VlmstatesError
from vlmstates.settings import ConfigError, ExtractionSettings


def _validate(args) -> None:
    from vlmstates.dataset import DatasetError, validate_and_write
    from vlmstates.sources import load_source_setting, validate_source_and_write

    if bool(args.source) == bool(args.csv and args.images) or (args.csv and not args.images):
        raise DatasetError("give CSV and IMAGES, or --source, not both")
    options = dict(strict=not args.lenient, limit=args.limit)
    if args.source:
        folder = args.materialise_dir or Path(args.table).parent / "source"
        value = load_source_setting(args.source)
        result, _ = validate_source_and_write(value, folder, args.table, args.report_json, args.report_md, **options)
    else:
        result = validate_and_write(args.csv, args.images, args.table, args.report_json, args.report_md, **options)
    print(f"{len(result.table)} questions kept; table {args.table}, report {args.report_md}")


def _extract_shard(args) -> None:
    from dataclasses import replace

    from vlmstates.settings import ModelSettings, preprocess_workers_for
    from vlmstates.workflow.gpu_lease import check_gpu_usable, cuda_index, device_after_lease, lease_gpu

    workers = preprocess_workers_for(_workers_setting(args.preprocess_workers), args.threads)
    entry = json.loads(args.settings)
    settings = ModelSettings.from_config(entry.pop("name"), entry)
    # before torch is imported: CUDA reads CUDA_VISIBLE_DEVICES once
    leased = lease_gpu(wanted=cuda_index(settings.device))
    settings = replace(settings, device=device_after_lease(settings.device, leased))
    check_gpu_usable(settings.device, leased)
    from vlmstates.extraction.shards import extract_shard
    from vlmstates.extraction.turns import extract_shard_taking_turns

    options = {
        "max_failed_share": args.max_failed_share,
        "save_every": args.save_every,
        "attempt": args.attempt,
        "batch_size_record": args.batch_size_record,
    }
    shard = (settings, args.table, args.images, int(args.shard), args.shard_size, args.out)
    if not args.reuse_loaded_model:
        extract_shard(*shard, progress_dir=args.progress_dir, preprocess_workers=workers, **options)
        return
    if args.progress_dir:
        raise ConfigError(
            "--progress-dir cannot be combined with --reuse-loaded-model: the jobs taking turns at a "
            "model's shards find each one's progress beside its output; leave out one of them"
        )
    # a limit only where a scheduler enforces it (sbatch --time); a local run's runtime is an estimate
    limit = args.time_limit * 60 if args.time_limit and "SLURM_JOB_ID" in os.environ else None
    extract_shard_taking_turns(*shard, preprocess_workers=workers, time_limit_s=limit, **options)


def _workers_setting(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _image_budget(args) -> None:
    from vlmstates.extraction.image_budget import image_budget_report
    from vlmstates.settings import ModelSettings

    entry = json.loads(args.settings)
    settings = ModelSettings.from_config(entry.pop("name"), entry)
    image_budget_report(settings, args.table, args.images, args.out)


def _merge(args) -> None:
    from vlmstates.extraction.shards import merge_model_shards

    merge_model_shards(args.table, args.shards, args.out)
    print(f"merged {len(args.shards)} shards into {args.out}")


def _inspect(args) -> None:
    from vlmstates.inspection.report import describe, write_inspection_report

    print(describe(args.file))
    if args.html:
        write_inspection_report(
            args.file,
            args.html,
            args.png,
            args.json,
            name=args.name,
            validation_json=args.validation,
            labels_csv=args.labels,
            labels_summary_json=args.labels_summary,
        )


def _export(args) -> None:
    from vlmstates.inspection.seed_layout import export_seed_layout

    parts = export_seed_layout(args.embeddings, args.out_dir, args.prefix, args.part_size)
    print(f"{len(parts)} part files in {parts[0].parent}, from {parts[0].name}")


def _export_hf(args) -> None:
    from vlmstates.inspection.hf_dataset import READ_BACK, export_hf_dataset

    out = export_hf_dataset(
        args.embeddings,
        args.out,
        format=args.format,
        representations=args.representations,
        layers=args.layers,
        rows=args.rows,
    )
    print(f"Hugging Face dataset in {out}; read it with {READ_BACK[args.format].format(out=str(out))}")


def _extract(args) -> None:
    from vlmstates.extraction.command import run_extract

    if bool(args.source) == bool(args.vqa_dataset and args.images_dir):
        raise VlmstatesError("give --vqa-dataset and --images-dir, or --source")
    outputs = run_extract(
        args.vqa_dataset,
        args.images_dir,
        args.output_dir,
        args.model,
        cache_dir=args.cache_dir,
        checkpoint_interval=args.checkpoint_interval,
        test=args.test,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        trust_remote_code=args.trust_remote_code,
        source=args.source,
    )
    print(f"embeddings: {outputs.embeddings}")
    print(f"seed layout: {len(outputs.seed_parts)} part files in {outputs.seed_parts[0].parent}")


def _predict(args) -> None:
    from vlmstates.extraction.predict import predict

    prediction = predict(
        args.model,
        args.image,
        task=args.task,
        question=args.question,
        prompt=args.prompt,
        device=args.device,
        max_new_tokens=args.max_new_tokens,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps(prediction.as_dict(), indent=2) if args.format == "json" else prediction.answer)


def _label_method(name: str) -> str:
    """--method's value; an old name (halp) is refused with what to write instead."""
    try:
        return labels.check_method(name)
    except labels.LabelError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _label(args) -> None:
    out = Path(args.output) if args.output else Path(args.embeddings).with_name("labels.csv")
    summary = labels.label_embeddings(
        args.embeddings, out, args.method, args.labels_file, args.summary, args.ignore_unknown
    )
    rate = summary["positive_rate"]
    print(
        f"{out}: {summary['n_judged']} of {summary['n_total']} judged by {args.method}, "
        f"{summary['n_hallucinated']} hallucinated" + (f" ({rate:.1%})" if rate is not None else "")
    )
    for reason, count in sorted(summary["unjudged_by_reason"].items()):
        print(f"  {reason}: {count}")


def _probe_settings(args):
    """The probe settings of --settings or --settings-json, with the flags given over them."""
    mapping = {}
    if args.settings and args.settings_json:
        raise probe_settings.ProbeError("give probe settings as --settings FILE or --settings-json TEXT, not both")
    if args.settings_json:
        mapping = json.loads(args.settings_json)
        if not isinstance(mapping, dict):
            raise probe_settings.ProbeError(f"--settings-json must be a JSON object, not {args.settings_json!r}")
    if args.settings:
        text = Path(args.settings).read_text()
        if args.settings.endswith((".yaml", ".yml")):
            import yaml

            mapping = yaml.safe_load(text) or {}
        else:
            mapping = json.loads(text)
    overrides = {
        "split": args.split, "seed": args.seed, "folds": args.folds, "probes": args.probes,
        "representations": args.representations, "layers": args.layers, "mlp_max_epochs": args.max_epochs,
        "mlp_patience": args.patience, "bootstrap": args.bootstrap, "device": args.device,
        "breakdown": args.breakdown,
    }  # fmt: skip
    mapping.update({k: v for k, v in overrides.items() if v is not None})
    if args.fractions:
        mapping.update(
            train_fraction=args.fractions[0], val_fraction=args.fractions[1], test_fraction=args.fractions[2]
        )
    if args.no_control:
        mapping["shuffled_control"] = False
    return probe_settings.ProbeSettings.from_mapping(mapping)


def _probe(args) -> None:
    from vlmstates.analysis.probes.stats import run_probes

    settings = _probe_settings(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out_dir = Path(args.output) if args.output else Path(args.embeddings).with_name("probes")
    metrics = run_probes(args.embeddings, args.labels, out_dir, settings, args.dataset, args.labels_summary)
    ok = metrics[metrics["status"] == "ok"]
    print(f"{out_dir}: {len(ok)} of {len(metrics)} probes evaluated")
    if len(ok):
        best = ok.loc[ok["auroc"].astype(float).idxmax()]
        print(f"  best test AUROC {best['auroc']:.3f} ({best['key']}, {best['probe']})")


def _probe_summary(args) -> None:
    from vlmstates.analysis.summary import summarise_models

    pairs = {}
    for item in args.metrics:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).parent.parent.name or item, item
        pairs[name] = path
    summary = summarise_models(pairs, args.output, args.plot)
    ours = summary[summary["source"] == "ours"]
    compared = ours.loc[ours["published_auroc"].notna(), "model"].nunique()
    print(
        f"{args.output}: {len(ours)} rows for {len(pairs)} models, {compared} set beside the paper's AUROCs "
        f"(labels by its rule; label methods: {', '.join(dict.fromkeys(ours['label_method'].astype(str)))})"
    )


def _screen(args) -> None:
    from vlmstates.analysis.screen import extract_for_probe, score_embeddings, sidecar_path

    if (args.embeddings is None) == (args.dataset is None):
        raise probe_settings.ProbeError(
            "give an embeddings file or --dataset CSV (with --images and --model), not both"
        )
    embeddings = args.embeddings
    if args.dataset:
        if not (args.images and args.model):
            raise probe_settings.ProbeError(
                "--dataset needs --images DIR and --model JSON (a models entry with its name)"
            )
        from vlmstates.dataset import validate_and_write
        from vlmstates.settings import ModelSettings
        from vlmstates.workflow.gpu_lease import lease_gpu

        lease_gpu()  # before torch is imported: CUDA reads CUDA_VISIBLE_DEVICES once
        entry = json.loads(args.model)
        settings = ModelSettings.from_config(entry.pop("name"), entry)
        out = Path(args.output)
        embeddings = Path(args.embeddings_out) if args.embeddings_out else out.with_name("embeddings.h5")
        table = embeddings.with_name("questions.csv")
        validate_and_write(
            args.dataset, args.images, table, table.with_suffix(".validation.json"),
            table.with_suffix(".validation.md"), strict=not args.lenient,
        )  # fmt: skip
        extract_for_probe(settings, args.probes, args.probe, table, args.images, embeddings)
    score_embeddings(args.probes, args.probe, embeddings, args.output)
    about = json.loads(sidecar_path(args.output).read_text())
    print(
        f"{args.output}: {about['n_scored']} of {about['n_questions']} questions scored by {about['probe']['id']} "
        f"(test AUROC {about['test_auroc']}), {about['n_predicted_hallucinated']} predicted hallucinated; "
        f"metadata {sidecar_path(args.output)}"
    )


def _demo(args) -> None:
    from vlmstates.demo.dataset import write_demo_dataset

    print(write_demo_dataset(args.out))


def _tiny(args) -> None:
    from vlmstates.demo.tiny import build_tiny_checkpoint

    print(build_tiny_checkpoint(args.family, args.out, seed=args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmstates", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("validate", help="check and normalise a VQA table")
    p.add_argument("csv", nargs="?", help="the VQA table (CSV), or give --source")
    p.add_argument("images", nargs="?", help="its images folder")
    p.add_argument(
        "--source",
        metavar="YAML",
        help="a dataset source instead (config key dataset.source): a YAML/JSON file, or the mapping as text",
    )
    p.add_argument(
        "--materialise-dir", help="where --source is written as CSV + images (default: TABLE's folder/source)"
    )
    p.add_argument("--table", required=True, help="normalised table to write")
    p.add_argument("--report-json", required=True)
    p.add_argument("--report-md", required=True)
    p.add_argument("--lenient", action="store_true", help="drop bad rows (listed in the report) instead of failing")
    p.add_argument("--limit", type=int, help="keep only the first N questions")
    p.set_defaults(func=_validate)

    p = commands.add_parser("extract-shard", help="extract one shard of one model (a workflow job)")
    p.add_argument("--settings", required=True, help="the model's config entry as JSON, with its name")
    p.add_argument("--table", required=True, help="validated table")
    p.add_argument("--images", required=True)
    p.add_argument("--shard", required=True)
    p.add_argument("--shard-size", type=int, required=True)
    p.add_argument("--max-failed-share", type=float, default=ExtractionSettings.max_failed_share)
    p.add_argument("--out", required=True)
    p.add_argument("--progress-dir", help="where finished samples are saved to resume from (default: OUT.progress/)")
    p.add_argument(
        "--save-every", type=int, default=ExtractionSettings.save_every, help="save progress every N finished samples"
    )
    p.add_argument("--attempt", type=int, default=1, help="Snakemake's attempt number: the batch size halves per retry")
    p.add_argument(
        "--reuse-loaded-model",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="after this shard, extract the model's shards no job has claimed (config extraction.reuse_loaded_model)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        help="the job's time limit in minutes (the rule's runtime; read under SLURM, which enforces it): no other shard past it",
    )
    p.add_argument("--threads", type=int, default=1, help="the job's CPU cores (the rule's threads)")
    p.add_argument(
        "--preprocess-workers",
        default=str(ExtractionSettings.preprocess_workers),
        help="worker processes preparing batches: a number, or auto (threads less one)",
    )
    p.add_argument(
        "--batch-size-record",
        metavar="JSON",
        help="batch_size auto on CUDA: the file of the sizes found, per GPU type and settings, that later jobs "
        "reuse instead of searching (shared by a model's jobs, e.g. results/MODEL/shards/batch_sizes.json)",
    )
    p.set_defaults(func=_extract_shard)

    p = commands.add_parser(
        "image-budget", help="the image tokens of the dataset's largest image for one model, before extraction"
    )
    p.add_argument("--settings", required=True, help="the model's config entry as JSON, with its name")
    p.add_argument("--table", required=True, help="validated table")
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True, help="the report (JSON)")
    p.set_defaults(func=_image_budget)

    p = commands.add_parser("merge", help="merge shards into one embeddings file")
    p.add_argument("--table", required=True, help="validated table the shards must cover, in order")
    p.add_argument("--out", required=True)
    p.add_argument("shards", nargs="+")
    p.set_defaults(func=_merge)

    p = commands.add_parser("inspect", help="print structure and summary of an embeddings file")
    p.add_argument("file")
    report = p.add_argument_group("report files (all three or none)")
    report.add_argument("--html", help="summary page")
    report.add_argument("--png", help="plot of vector norms per layer")
    report.add_argument("--json", help="summary as JSON")
    page = p.add_argument_group("more on the summary page (each optional)")
    page.add_argument("--name", help="the model's name in titles (default: the file's folder, results/<model>/)")
    page.add_argument("--validation", metavar="JSON", help="dataset validation report (validate's --report-json)")
    page.add_argument("--labels", metavar="CSV", help="labels of the answers, for example answers with their label")
    page.add_argument("--labels-summary", metavar="JSON", help="label summary (label's --summary)")
    p.set_defaults(func=_inspect)

    p = commands.add_parser("export", help="write an embeddings file in the seed scripts' per-question layout")
    p.add_argument("embeddings", help="a merged embeddings file, e.g. results/<model>/embeddings.h5")
    p.add_argument("out_dir", help="folder for the {prefix}_embeddings_part_NNN.h5 files")
    p.add_argument("--prefix", help="file name prefix (default: from the model id, e.g. qwen2_5_vl_7b_instruct)")
    p.add_argument("--part-size", type=int, default=1000, help="questions per file (the seeds' checkpoint interval)")
    p.set_defaults(func=_export)

    p = commands.add_parser(
        "export-hf",
        help="write an embeddings file as a Hugging Face dataset, one array column per representation and layer",
    )
    p.add_argument("embeddings", metavar="EMBEDDINGS.h5")
    p.add_argument("out", metavar="OUT_DIR", help="the dataset's folder (an earlier export there is replaced)")
    p.add_argument(
        "--format",
        choices=("arrow", "parquet"),
        default="arrow",
        help="arrow: save_to_disk's form, for datasets.load_from_disk (default); parquet: the Hub's data/ layout",
    )
    p.add_argument(
        "--representations",
        nargs="+",
        metavar="REP",
        help=f"representations to export (default: all): {', '.join(probe_settings.CODE_ORDER)}",
    )
    p.add_argument("--layers", nargs="+", type=int, help="decoder layers to export (default: all)")
    p.add_argument("--rows", choices=("all", "ok"), default="all", help="all rows (default) or only status ok")
    p.set_defaults(func=_export_hf)

    p = commands.add_parser("extract", help="validate, extract every shard (resuming) and merge, with the seeds' flags")
    p.add_argument("--vqa-dataset", help="the VQA table (CSV), or give --source")
    p.add_argument("--images-dir")
    p.add_argument("--source", metavar="YAML", help="a dataset source instead (as validate --source)")
    p.add_argument("--output-dir", required=True, help="results-style folder: dataset/, <model>/shards/, ...")
    p.add_argument("--model", required=True, help="hub id or local checkpoint folder")
    p.add_argument("--cache-dir", help="Hugging Face hub cache folder (sets HF_HUB_CACHE)")
    p.add_argument(
        "--checkpoint-interval",
        type=int,
        default=1000,
        help="questions per seed-layout file, and progress saved every N samples",
    )
    p.add_argument("--test", action="store_true", help="only the first 3 questions, as a quick check")
    p.add_argument(
        "--shard-size",
        type=int,
        default=ExtractionSettings.shard_size,
        help="questions per shard (the workflow's default)",
    )
    p.add_argument("--batch-size", type=int, help="samples per generate() call (default: the models config's)")
    p.add_argument("--max-new-tokens", type=int, help="answer length limit (default: the models config's, 200)")
    p.add_argument("--trust-remote-code", action="store_true", help="let the checkpoint's own code run (Molmo)")
    p.set_defaults(func=_extract)

    p = commands.add_parser("predict", help="answer one image through the extraction engine")
    p.add_argument("--model", required=True, help="hub id or local checkpoint folder")
    p.add_argument("--image", required=True)
    p.add_argument("--task", choices=["vqa", "caption", "ocr"], default="vqa")
    p.add_argument("--question", help="the question (task vqa, or a --prompt with {question})")
    p.add_argument("--prompt", help="prompt template replacing the task's preset; {question} is replaced")
    p.add_argument("--format", choices=["txt", "json"], default="txt")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--trust-remote-code", action="store_true", help="let the checkpoint's own code run (Molmo)")
    p.set_defaults(func=_predict)

    p = commands.add_parser(
        "label",
        help="label each answer of an embeddings file as hallucinated or not",
        description=labels.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("embeddings", metavar="EMBEDDINGS.h5", help="embeddings file of the vlmstates schema")
    p.add_argument(
        "--method",
        type=_label_method,
        choices=labels.METHODS,
        default=labels.DEFAULT_METHOD,
        help=f"labelling rule, as above (default: {labels.DEFAULT_METHOD}, the HALP paper's label)",
    )
    p.add_argument("--labels-file", metavar="CSV", help="for --method file: CSV with columns question_id, hallucinated")
    p.add_argument(
        "--ignore-unknown",
        action="store_true",
        help="for --method file: skip (with a warning) rows of questions not in the embeddings file, "
        "e.g. ones cut by dataset.limit; without it they are an error",
    )
    p.add_argument(
        "-o", "--output", metavar="LABELS.csv", help="output CSV (default: labels.csv beside the embeddings)"
    )
    p.add_argument(
        "--summary", metavar="JSON", help="summary of the labels (default: LABELS.summary.json beside the output)"
    )
    p.set_defaults(func=_label)

    p = commands.add_parser(
        "probe",
        help="train hallucination probes on every representation and layer of an embeddings file",
        description=probe_settings.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("embeddings", metavar="EMBEDDINGS.h5")
    p.add_argument("labels", metavar="LABELS.csv", help="labels as written by `label`")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (default: probes/ beside the embeddings)")
    p.add_argument(
        "--labels-summary", metavar="JSON", help="the labels' summary, which names their method "
        "(default: LABELS.summary.json beside LABELS.csv; without one the method is recorded as unknown)",
    )  # fmt: skip
    p.add_argument(
        "--dataset", metavar="TABLE.csv", help="the validated dataset table (`validate --table`), whose "
        "columns --breakdown names",
    )  # fmt: skip
    p.add_argument("--breakdown", nargs="+", metavar="COLUMN", help="dataset columns to break the AUROC down by")
    p.add_argument("--settings", metavar="FILE", help="JSON or YAML mapping of probe settings (flags override)")
    p.add_argument("--settings-json", metavar="TEXT", help="the same mapping given inline as a JSON object")
    p.add_argument("--split", choices=probe_settings.SPLITS)
    p.add_argument("--fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--folds", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--probes", nargs="+", choices=probe_settings.PROBES)
    p.add_argument("--representations", nargs="+", choices=probe_settings.CODE_ORDER)
    p.add_argument("--layers", nargs="+", type=int, help="decoder layers to probe (default: all)")
    p.add_argument("--max-epochs", type=int, help="MLP epochs at most (default 50)")
    p.add_argument("--patience", type=int, help="stop the MLP after this many epochs without improvement")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples for the AUROC interval (default 1000)")
    p.add_argument("--no-control", action="store_true", help="skip the shuffled-label control")
    p.add_argument("--device", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=_probe)

    p = commands.add_parser(
        "probe-summary",
        help="compare probe results across models and with the HALP paper's published AUROCs",
    )
    p.add_argument("metrics", nargs="+", metavar="NAME=METRICS.csv")
    p.add_argument("-o", "--output", default="probes_summary.csv", metavar="CSV")
    p.add_argument("--plot", default="probes_summary.png", metavar="PNG")
    p.set_defaults(func=_probe_summary)

    p = commands.add_parser(
        "screen",
        help="hallucination risk per question from a saved probe",
        description="Score questions with a probe that `probe` saved (results/<model>/probes/saved/): from an "
        "embeddings file, or from a VQA table that is first extracted prefill-only (just the probe's layer). "
        "Writes a CSV (question_id, ..., hallucination_risk, predicted_hallucinated) and beside it a JSON "
        "sidecar with the probe's test AUROC and threshold.",
    )
    p.add_argument("probes", metavar="SAVED_DIR", help="a saved-probes folder, e.g. results/<model>/probes/saved")
    p.add_argument("embeddings", nargs="?", metavar="EMBEDDINGS.h5", help="vectors to score (or give --dataset)")
    p.add_argument("--probe", default="best", help="best (default: highest validation AUROC), REP/LAYER/KIND "
                   "(e.g. VT/12/logreg) or VF/KIND")  # fmt: skip
    p.add_argument("-o", "--output", required=True, metavar="SCORES.csv", help="scores; metadata goes to SCORES.json")
    extract = p.add_argument_group("extracting a dataset first (prefill-only, just the probe's layer)")
    extract.add_argument("--dataset", metavar="CSV", help="VQA table (validated as `validate` does)")
    extract.add_argument("--images", metavar="DIR")
    extract.add_argument("--model", metavar="JSON", help="the model's config entry as JSON, with its name")
    extract.add_argument("--lenient", action="store_true", help="drop bad rows of the table instead of failing")
    extract.add_argument("--embeddings-out", metavar="H5", help="where the vectors go (default: beside the output)")
    p.set_defaults(func=_screen)

    p = commands.add_parser("demo", help="generate the demo VQA set (questions.csv and images/)")
    p.add_argument("out")
    p.set_defaults(func=_demo)

    p = commands.add_parser("tiny", help="build a tiny randomly initialised checkpoint")
    p.add_argument("family")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status is 0, 1 for a refused step, EXIT_RESTART when a fresh process can
    go on where this one cannot (out of device memory), 128 + N when signal N stopped it."""
    try:
        try:
            with _terminate_as_interrupt():
                return _run(argv)
        except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (Terminated); the step saved what it could
            signum = getattr(interrupt, "signum", signal.SIGINT)
            print(f"vlmstates: stopped by {signal.Signals(signum).name}", file=sys.stderr)
            return 128 + signum
        finally:
            sys.stdout.flush()  # so that a reader gone early shows up here, not at interpreter exit
    except BrokenPipeError:
        return _reader_went_away()


def _run(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except VlmstatesError as error:  # bad input or a refused step: a message, not a traceback
        print(f"vlmstates {args.command}: {error}", file=sys.stderr)
        return 1
    except RestartJob as error:  # progress saved; a retry (fresh process) goes on
        print(f"vlmstates {args.command}: {error}", file=sys.stderr)
        return EXIT_RESTART
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler cancelling or pre-empting the job), raised like Ctrl-C's KeyboardInterrupt so
    that the same code saves progress and removes temporary files on either."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises Terminated while a command runs (Python's default would end the process on the
    spot); the previous handler comes back after, for callers of main() such as the tests. Python lets
    only the main thread set handlers: called from another thread, main() leaves SIGTERM alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _reader_went_away() -> int:
    """The reader of stdout closed it (`vlmstates inspect FILE | head -1`): end quietly, as a tool killed
    by SIGPIPE would, with its status 141 (so `set -o pipefail` still sees that output was cut short).

    stdout is pointed at /dev/null first: the interpreter flushes it once more on exit, and that flush
    would raise again (the recipe of Python's signal module documentation, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
