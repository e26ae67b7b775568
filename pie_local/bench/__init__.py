"""Benchmarks of pie-local against llama-cpp-python, behind `pie-local bench` and benchmarks/.

    driver      the native driver against llama.cpp's low-level API (prefill, decode, batched streams)
    runtime     agent-shaped workloads as inferlets on one Engine against llama-cpp-python's `Llama`
    overhead    the runtime's cost per decode step against a bare loop over the driver
    generation  generation features on pie-local alone: forced tokens in one pass, speculation
    busy        decode idle and with one core busy: pie-local "auto" and fixed threads against llama.cpp
    baseline    the llama.cpp side of both benchmarks, through llama-cpp-python
    workloads   the inputs and sampling both sides get
    calculator  the tool of the runtime benchmark's tool loop, with its prompt and call schema
    batches     driver batches (and their samplers) built by hand
    report      ratios of pie-local against llama.cpp, and the text tables
    machine     the default thread count (physical cores), whether the CPU advertises AMX
    schemas     real-world JSON schemas (JSONSchemaBench): compile rate, validity, mask cost
"""

from pie_local.bench.driver import run_driver_bench
from pie_local.bench.machine import physical_cores
from pie_local.bench.report import format_runtime_report
from pie_local.bench.runtime import run_runtime_bench
from pie_local.bench.workloads import BenchConfig

__all__ = ["BenchConfig", "format_runtime_report", "physical_cores", "run_driver_bench", "run_runtime_bench"]
