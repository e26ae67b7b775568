"""The native driver against llama.cpp (prefill, decode, 8 streams); see pie_local/bench/driver.py.

    python benchmarks/bench_driver.py [--model PATH] [--threads N] [--json]
"""

import sys

from pie_local.bench.driver import main

if __name__ == "__main__":
    sys.exit(main())
