"""Decode tok/s idle and with one core busy, pie-local (auto and fixed threads) against llama.cpp;
see pie_local/bench/busy.py.

    python benchmarks/bench_busy.py [--model PATH] [--threads N] [--rounds 5] [--tokens 64] [--json]
"""

import sys

from pie_local.bench.busy import main

if __name__ == "__main__":
    sys.exit(main())
