"""Benchmark: ISA calibration time against the dense runs it observes, for a non-Wan family (LTX-2 by default).

The same measurement as ``bench_calibration.py`` (see its docstring for what is timed and the correctness
gates), with ``--family ltx2`` as the default: an LTX-2-shaped transformer (16 of its 48 layers, random bf16
weights) on ``LTX2InContextPipeline``'s call at 512 x 768 px, 121 frames (6,144 noisy + 6,144 reference
tokens). Acceptance: calibration at most 2x the dense runs. Every option of ``bench_calibration.py`` applies.

Examples:
    python benchmarks/bench_calibration_family.py --json ltx2.json     # on a GPU
    python benchmarks/bench_calibration_family.py --tiny               # CPU smoke test, seconds
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from bench_calibration import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--family" or a.startswith("--family=") for a in argv):
        argv = ["--family", "ltx2"] + argv
    sys.exit(main(argv))
