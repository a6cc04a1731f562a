"""Padding of the planned batches, bounded by rows (today's plan) or by a token budget (measured, not built).

For each family's real-geometry processor (vlmstates.extraction.benchmark's full-size builders, no weights)
and two question sets (the demo set; HALP-like questions on images of mixed sizes), the engine's own length
estimates (batching.sort_keys) are planned:
- by rows: batching.plan_batches at the batch size;
- by tokens: the same length-sorted order, each batch filled while rows x its longest prompt stays within
  the budget that the longest-prompt batch of `batch size` rows takes (the size a row-bound search finds).
Reported: padding share (padded prompt tokens / all prompt tokens in the batches) and the number of batches.

python scripts/bench_padding.py                      # 480 samples, batch size 32
python scripts/bench_padding.py --samples 960 --batch-size 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import torch  # noqa: E402

from vlmstates.dataset import read_validated_table  # noqa: E402
from vlmstates.demo.dataset import write_demo_dataset  # noqa: E402
from vlmstates.extraction.adapters import adapter_for_family  # noqa: E402
from vlmstates.extraction.adapters.base import LoadedModel  # noqa: E402
from vlmstates.extraction.batching import SortKey, plan_batches, sort_keys  # noqa: E402
from vlmstates.extraction.benchmark import _FULL_SIZE_BUILDERS, FAMILIES, FULL_SIZE, synthetic_inputs  # noqa: E402
from vlmstates.extraction.preparing import ConfigOnly  # noqa: E402
from vlmstates.extraction.shards import questions_of  # noqa: E402
from vlmstates.settings import ModelSettings  # noqa: E402

MIXED_SIZES = [(640, 480), (1024, 768), (480, 640), (800, 600), (500, 375), (1280, 960)]


def processor_only(family: str) -> LoadedModel:
    _, config, processor = _FULL_SIZE_BUILDERS[family](FULL_SIZE[family])
    settings = ModelSettings(name=family, model=family)
    return LoadedModel(
        ConfigOnly(config), processor, adapter_for_family(family), settings, torch.device("cpu"), torch.bfloat16, "sdpa"
    )


def token_batches(keys: list[SortKey], batch_size: int) -> list[list[int]]:
    """Length-sorted batches (as plan_batches orders them) holding at most the padded tokens of the longest
    batch of `batch_size` rows."""
    budget = max(key.length for key in keys) * batch_size
    groups: dict[object, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key.group, []).append(i)
    batches = []
    for members in groups.values():
        members.sort(key=lambda i: (-keys[i].length, i))
        for i in members:
            if batches and batches[-1][0] in members and (len(batches[-1]) + 1) * keys[batches[-1][0]].length <= budget:
                batches[-1].append(i)
            else:
                batches.append([i])
    return batches


def padding_share(keys: list[SortKey], batches: list[list[int]]) -> float:
    padded = sum(len(b) * max(keys[i].length for i in b) for b in batches)
    return 1 - sum(keys[i].length for b in batches for i in b) / padded


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--samples", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    header = [
        "family",
        "set",
        "prompt tokens (min-max)",
        "padding by rows",
        "by tokens",
        "batches by rows",
        "by tokens",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        table = write_demo_dataset(Path(tmp) / "demo", n_images=args.samples * 2 // 3)
        sets = {
            "demo": (questions_of(read_validated_table(table))[: args.samples], table.parent / "images"),
            "mixed sizes": (synthetic_inputs(Path(tmp) / "mixed", args.samples, MIXED_SIZES, 0), Path(tmp) / "mixed"),
        }
        for family in args.families:
            loaded = processor_only(family)
            for name, (questions, images) in sets.items():
                keys = sort_keys(loaded, questions, images)
                by_rows, by_tokens = plan_batches(keys, args.batch_size), token_batches(keys, args.batch_size)
                lengths = [k.length for k in keys]
                rows.append(
                    [
                        family,
                        name,
                        f"{min(lengths)}-{max(lengths)}",
                        f"{padding_share(keys, by_rows):.1%}",
                        f"{padding_share(keys, by_tokens):.1%}",
                        str(len(by_rows)),
                        str(len(by_tokens)),
                    ]
                )
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"{args.samples} samples per set, batch size {args.batch_size} (the token budget: its longest batch's)")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join(row))


if __name__ == "__main__":
    main()
