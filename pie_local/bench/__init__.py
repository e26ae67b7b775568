"""Benchmarks of pie-local against llama-cpp-python, behind `pie-local bench` and benchmarks/.

    driver   the native driver against llama.cpp's low-level API (prefill, decode, batched streams)
    runtime  agent-shaped workloads as inferlets on one Engine against llama-cpp-python's `Llama`,
             and the runtime's overhead per decode step
"""

from pie_local.bench.driver import run_driver_bench
from pie_local.bench.runtime import BenchConfig, format_runtime_report, physical_cores, run_runtime_bench

__all__ = ["BenchConfig", "format_runtime_report", "physical_cores", "run_driver_bench", "run_runtime_bench"]
