"""The few lines a run ends with on the terminal (the Snakefile's onsuccess/onerror): per model how many
questions came out ok or failed and where the merged file is, rows dropped by validation, the steps that
failed with their logs, and the command to run next.

Failed steps are read off the files, not off Snakemake's log: a step failed in this run when its output is
missing and its log was written after the run started (a log older than that belongs to an earlier run,
whose output may since have been deleted on purpose to redo it).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vlmstates.analysis.probes.settings import PROBE_OUTPUTS
from vlmstates.extraction.shards import count_shards
from vlmstates.store import STATUS_OK, read_embeddings


@dataclass(frozen=True)
class Step:
    """One job of the workflow: its name, the output that shows it done, and its log."""

    name: str
    output: Path
    log: Path


def dataset_line(results: Path) -> str | None:
    report = results / "dataset" / "validation.json"
    if not report.exists():
        return None
    document = json.loads(report.read_text())
    counts = document.get("counts", {})
    if not document.get("ok", True):  # strict validation refused the table: nothing was kept
        return (
            f"  dataset: validation failed with {counts.get('errors', '?')} error(s) in {counts.get('rows_read', '?')} "
            f"rows read ({results / 'dataset' / 'validation.md'})"
        )
    return (
        f"  dataset: {counts.get('rows_read', '?')} rows read, {counts.get('rows_kept', '?')} kept, "
        f"{counts.get('rows_dropped', '?')} dropped by validation ({results / 'dataset' / 'validation.md'})"
    )


def probe_counts(metrics_csv: Path) -> str:
    """`probes 12 ok, 4 skipped`: skipped probes (one class only) are the usual surprise of a run."""
    if not metrics_csv.exists():
        return ""
    statuses = pd.read_csv(metrics_csv, usecols=["status"])["status"].value_counts()
    return "; probes " + ", ".join(f"{count} {status}" for status, count in statuses.items())


def model_line(results: Path, model: str) -> str:
    merged = results / model / "embeddings.h5"
    if not merged.exists():
        return f"  {model}: not merged yet"
    status = read_embeddings(merged).table["status"]
    ok = int((status == STATUS_OK).sum())
    line = f"  {model}: {ok} questions ok, {len(status) - ok} failed -> {merged}"
    return line + probe_counts(results / model / "probes" / PROBE_OUTPUTS.metrics_csv)


def model_steps(config: dict, results: Path, model: str) -> list[Step]:
    """The jobs of one model, in the order they run (shards once the table's size is known)."""
    steps = []
    table = results / "dataset" / "questions.csv"
    if table.exists():
        rows = len(pd.read_csv(table, dtype=str, usecols=["question_id"]))
        for shard in range(count_shards(rows, config["extraction"]["shard_size"])):
            name = f"shard_{shard:04d}"
            output = results / model / "shards" / f"{name}.h5"
            steps.append(Step(f"extract_shard {model} {name}", output, Path(f"logs/extract/{model}/{name}.log")))
    steps += [
        Step(f"merge_shards {model}", results / model / "embeddings.h5", Path(f"logs/merge/{model}.log")),
        Step(f"label {model}", results / model / "labels.csv", Path(f"logs/label/{model}.log")),
        Step(f"inspect_embeddings {model}", results / model / "inspection" / "summary.json", Path(f"logs/inspect/{model}.log")),
        Step(f"probe {model}", results / model / "probes" / PROBE_OUTPUTS.metrics_csv, Path(f"logs/probe/{model}.log")),
    ]  # fmt: skip
    if config.get("export", {}).get("seed_layout"):
        steps.append(
            Step(f"export_seed_layout {model}", results / model / "seed_layout", Path(f"logs/export/{model}.log"))
        )
    return steps


def all_steps(config: dict, results: Path) -> list[Step]:
    steps = [Step("validate_dataset", results / "dataset" / "questions.csv", Path("logs/validate_dataset.log"))]
    for model in config["models"]:
        steps += model_steps(config, results, model)
    return steps + [Step("probe_summary", results / "summary" / "probes.csv", Path("logs/probe_summary.log"))]


def failed_steps(config: dict, results: Path, started: float) -> list[Step]:
    """Steps whose output is missing although their log was written in this run."""
    return [
        step
        for step in all_steps(config, results)
        if not step.output.exists() and step.log.exists() and step.log.stat().st_mtime >= started
    ]


# The line a failed log's excerpt starts at: the command's refusal (`vlmstates merge: ...`), the retry
# guard's verdict, or a traceback's exception line (`OSError: ...`).
ERROR_START = re.compile(r"^(vlmstates [\w-]+: |not retried: |[\w.]*(Error|Exception|Interrupt|Exit)\b)")
EXCERPT_LINES = 4
EXCERPT_WIDTH = 300


def error_excerpt(log: Path) -> list[str]:
    """The few lines of a failed job's log that say what went wrong (the profile does not print logs)."""
    lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    starts = [k for k, line in enumerate(lines) if ERROR_START.match(line)]
    start = starts[-1] if starts else max(len(lines) - 1, 0)
    return [f"      {line[:EXCERPT_WIDTH]}" for line in lines[start : start + EXCERPT_LINES]]


def failure_lines(step: Step) -> list[str]:
    lines = [f"  {step.name}: {step.log}"]
    marker = step.log.with_name(step.log.stem + ".no-retry.log")  # vlmstates.workflow.retry_guard's marker
    if marker.exists():
        lines[0] += f" (not retried: the same error would repeat; first attempt's log {marker})"
    if step.name == "validate_dataset":
        lines[0] += f", every problem in {step.output.parent / 'validation.md'}"
    return lines + error_excerpt(step.log)


def never_raising(line_of, *args) -> str | None:
    """A summary line, or what kept it from being read: the summary must never fail a finished run."""
    try:
        return line_of(*args)
    except Exception as error:  # an unreadable file is reported, not raised, at the very end of a run
        return (
            f"  {' '.join(map(str, args[1:])) or 'dataset'}: could not be summarised ({type(error).__name__}: {error})"
        )


def the_command(argv: list[str]) -> str:
    """This run's command line, to run again (python -m snakemake shows as snakemake)."""
    return shlex.join(["snakemake", *argv[1:]])


def run_summary(config: dict, succeeded: bool, started: float = 0.0, argv: list[str] | None = None) -> str:
    """The closing lines of a run; `started` is the run's start (epoch seconds), to tell its failures."""
    results = Path(config.get("results", "results"))
    lines = ["", f"vlmstates: {'finished' if succeeded else 'stopped with failures'}; results in {results}/"]
    lines += [line for line in [never_raising(dataset_line, results)] if line]
    lines += [never_raising(model_line, results, model) for model in config["models"]]
    command = the_command(argv if argv is not None else sys.argv)
    if succeeded:
        # the same command line, so that the report reads the same config
        lines.append(
            f"Next, the report (inspection pages, probe tables and plots in one file): {command} --report report.html"
        )
        return "\n".join(lines)
    try:
        failed = failed_steps(config, results, started)
        if failed:
            lines.append("Failed (log of each):")
            lines += [line for step in failed for line in failure_lines(step)]
    except Exception as error:  # as in never_raising: the logs are under logs/ either way
        lines.append(f"Failed steps could not be listed ({type(error).__name__}: {error}); see logs/")
    lines.append(f"Next: fix the cause, then run the same command again (only what is missing runs): {command}")
    return "\n".join(lines)
