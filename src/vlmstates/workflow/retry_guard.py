"""An extraction job's attempt that is not retried when its error would only repeat.

Extraction jobs are retried (profile `restart-times`) because running out of memory or time, or a lost
node, can pass on a second try with more memory and a smaller batch. A missing package, a bad checkpoint
or a refused config cannot: the retry would load everything again and print the same error. So when an
attempt fails with such an error, this writes a copy of its log to a marker file beside the log; the next
attempt of the same run finds the marker and ends at once with one line. The first attempt of a later
run (attempt 1) removes the marker and tries afresh, since the cause may have been fixed.

A job that ran out of device memory (or whose CUDA context broke) saves its samples and exits with
errors.EXIT_RESTART: never marked, so Snakemake retries it, and the retry (`--attempt`) runs with half the
batch size (vlmstates.extraction.shards.batch_size_for_attempt).

    python -m vlmstates.workflow.retry_guard --attempt N --log LOG --marker MARKER -- extract-shard ARGS...
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# Network errors (hub downloads) and errors raised inside torch or CUDA (RuntimeError, out of memory)
# may pass on another try, on another node; these modules' exceptions count as network errors.
NETWORK_MODULES = ("requests", "urllib3", "huggingface_hub", "httpx", "http", "socket", "ssl")
# What retrying never fixes: imports, code and config, and unreadable or missing checkpoint files.
DETERMINISTIC = (ImportError, SyntaxError, ValueError, KeyError, TypeError, AttributeError, NotImplementedError)


def repeats_on_retry(error: BaseException) -> bool:
    """Whether a retry would fail the same way (so it is not worth one)."""
    if isinstance(error, SystemExit):  # argparse refusing the command line
        return error.code not in (0, None)
    if isinstance(error, (ConnectionError, TimeoutError, MemoryError, RuntimeError, KeyboardInterrupt)):
        return False
    if type(error).__module__.split(".")[0] in NETWORK_MODULES:
        return False
    return isinstance(error, (OSError, *DETERMINISTIC))


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


def mark_no_retry(log: Path, marker: Path) -> None:
    """Keep the failed attempt's log as the marker: the retry's own log replaces the log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    marker.parent.mkdir(parents=True, exist_ok=True)
    if log.exists():
        shutil.copyfile(log, marker)
    else:
        marker.write_text("the attempt failed with an error that a retry repeats\n")


def run_attempt(command: list[str], log: Path, marker: Path) -> int:
    """Run the command in this process; mark its error when a retry would repeat it."""
    import traceback

    from vlmstates.cli import main

    try:
        status = main(command)
    except BaseException as error:
        if not repeats_on_retry(error):
            raise  # Snakemake retries the job
        traceback.print_exception(error, file=sys.stderr)  # now, so that the marker's copy holds it
        mark_no_retry(log, marker)
        return 1
    if status == 1:  # the command refused the step (bad config, table or too many failed samples)
        mark_no_retry(log, marker)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmstates.workflow.retry_guard", description=__doc__)
    parser.add_argument("--attempt", type=int, required=True, help="Snakemake's attempt number (1 first)")
    parser.add_argument("--log", type=Path, required=True, help="the job's log, where this attempt writes")
    parser.add_argument("--marker", type=Path, required=True, help="written when a retry would repeat the error")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the vlmstates command line")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.attempt > 1 and args.marker.exists():
        print(
            f"not retried: attempt {args.attempt - 1} failed with an error that a retry repeats "
            f"({last_line(args.marker)}); its log: {args.marker}. Fix the cause and run the same command again.",
            file=sys.stderr,
        )
        return 1
    args.marker.unlink(missing_ok=True)  # an earlier run's verdict: the cause may have been fixed since
    return run_attempt(command, args.log, args.marker)


if __name__ == "__main__":
    sys.exit(main())
