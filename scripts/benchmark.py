"""Throughput of the extraction engine against a HALP-style loop; see vlmstates.extraction.benchmark (or --help).

python scripts/benchmark.py --models tiny --device cpu --out benchmark-cpu.jsonl
python scripts/benchmark.py --models full --device cuda --batch-sizes 1 8 16 32 64 --peak-tflops 989
python scripts/benchmark.py --preset quick --peak-tflops 989 --out bench-quick.jsonl   # 10 minutes on one GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from vlmstates.extraction.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
