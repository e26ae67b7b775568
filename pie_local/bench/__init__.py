"""Benchmarks of pie-local against llama-cpp-python, behind `pie-local bench` and benchmarks/.

    driver     the native driver against llama.cpp's low-level API (prefill, decode, batched streams)
    runtime    agent-shaped workloads as inferlets on one Engine against llama-cpp-python's `Llama`,
               and the runtime's overhead per decode step (overhead)
    baseline   the llama.cpp side of both, through llama-cpp-python
    batches    driver batches built by hand (the driver benchmark, the bare decode loop)
    workloads  the inputs and sampling both sides get
    report     ratios of pie-local against llama.cpp, and the text tables
    machine    the default thread count (physical cores)
"""

from pie_local.bench.driver import run_driver_bench
from pie_local.bench.machine import physical_cores
from pie_local.bench.report import format_runtime_report
from pie_local.bench.runtime import run_runtime_bench
from pie_local.bench.workloads import BenchConfig

__all__ = ["BenchConfig", "format_runtime_report", "physical_cores", "run_driver_bench", "run_runtime_bench"]
