"""The issue-11 benchmarks run end to end with tiny settings (their numbers are not checked:
speed is measured by running them, never asserted in tests)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampler_benchmark_times_every_sampler(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("bench_sampler")
    assert bench.main(["--rows", "1", "--repeat", "1", "--threads", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["per_row_cpu_us"]) == set(bench.SAMPLERS)
    assert all(s["min"] <= s["median"] <= s["max"] for s in result["per_row_cpu_us"].values())
    assert len(result["parallel_wall_ms"]) == 2  # 1 and 2 threads
    assert result["n_vocab"] == 262_144


@pytest.mark.real_driver
@pytest.mark.llama_cpp
@pytest.mark.slow
def test_busy_benchmark_runs_end_to_end(starter_gguf: Path) -> None:
    from pie_local.bench.busy import format_busy_table, run_busy_bench

    r = run_busy_bench(str(starter_gguf), threads=2, rounds=2, tokens=2)
    assert set(r["sides"]) == {"pie auto", "pie 2", "llama.cpp 2"}
    for side in r["sides"].values():
        assert side["idle"]["median"] > 0 and side["busy"]["median"] > 0
        assert side["busy_over_idle"] == side["busy"]["median"] / side["idle"]["median"]
    assert len(r["auto_threads_when_busy"]) == 2 and all(1 <= n <= 2 for n in r["auto_threads_when_busy"])
    assert "pie auto" in format_busy_table(r)
