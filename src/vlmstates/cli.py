"""Command line: each step of the workflow, for users who run one by hand.

  vlmstates validate CSV IMAGES      check and normalise a VQA table
  vlmstates extract-shard ...        one extraction job (what the workflow runs)
  vlmstates merge --table T ...      merge shards into one embeddings file
  vlmstates inspect FILE             print structure and summary of an embeddings file
  vlmstates demo OUT                 generate the bundled demo VQA set
  vlmstates tiny FAMILY OUT          build a tiny random checkpoint of a real architecture
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import import_module


def _validate(args) -> None:
    from .dataset import validate_and_write

    result = validate_and_write(
        args.csv, args.images, args.table, args.report_json, args.report_md, strict=not args.lenient, limit=args.limit
    )
    print(f"{len(result.table)} questions kept; table {args.table}, report {args.report_md}")


def _extract_shard(args) -> None:
    from .gpu_lease import lease_gpu

    lease_gpu()  # before torch is imported: CUDA reads CUDA_VISIBLE_DEVICES once
    from .settings import ModelSettings
    from .shards import extract_shard

    entry = json.loads(args.settings)
    settings = ModelSettings.from_config(entry.pop("name"), entry)
    extract_shard(
        settings,
        args.table,
        args.images,
        int(args.shard),
        args.shard_size,
        args.out,
        max_failed_share=args.max_failed_share,
        progress_dir=args.progress_dir,
        save_every=args.save_every,
        attempt=args.attempt,
    )


def _merge(args) -> None:
    from .shards import merge_model_shards

    merge_model_shards(args.table, args.shards, args.out)
    print(f"merged {len(args.shards)} shards into {args.out}")


def _inspect(args) -> None:
    from .inspection import describe, write_inspection_report

    print(describe(args.file))
    if args.html:
        write_inspection_report(args.file, args.html, args.png, args.json)


def _demo(args) -> None:
    from .demo import write_demo_dataset

    print(write_demo_dataset(args.out))


def _tiny(args) -> None:
    from .tiny import build_tiny_checkpoint

    print(build_tiny_checkpoint(args.family, args.out, seed=args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmstates", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("validate", help="check and normalise a VQA table")
    p.add_argument("csv")
    p.add_argument("images")
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
    p.add_argument("--max-failed-share", type=float, default=0.05)
    p.add_argument("--out", required=True)
    p.add_argument("--progress-dir", help="where finished samples are saved to resume from (default: OUT.progress/)")
    p.add_argument("--save-every", type=int, default=64, help="save progress every N finished samples")
    p.add_argument("--attempt", type=int, default=1, help="Snakemake's attempt number: the batch size halves per retry")
    p.set_defaults(func=_extract_shard)

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
    p.set_defaults(func=_inspect)

    p = commands.add_parser("demo", help="generate the demo VQA set (questions.csv and images/)")
    p.add_argument("out")
    p.set_defaults(func=_demo)

    p = commands.add_parser("tiny", help="build a tiny randomly initialised checkpoint")
    p.add_argument("family")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny)

    for module in ("labels", "probes"):
        try:
            import_module(f".{module}", __package__).add_cli(commands)
        except ImportError:  # the probe extras are optional in a model's extraction environment
            pass
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except _expected_errors() as error:  # bad input or a refused step: a message, not a traceback
        print(f"vlmstates {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


def _expected_errors() -> tuple[type[Exception], ...]:
    from .dataset import DatasetError
    from .settings import ConfigError
    from .shards import ShardFailed
    from .store import MergeError

    return (ConfigError, DatasetError, MergeError, ShardFailed)


if __name__ == "__main__":
    sys.exit(main())
