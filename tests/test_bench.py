"""The benchmark package: hand-built driver batches, the tool loop's calculator, the reports; and,
slow, both benchmarks end to end on the starter model with tiny sizes (speed is never asserted)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pie_local.bench.batches import forward_batch
from pie_local.bench.calculator import call_schema, observe, tool_prompt
from pie_local.bench.machine import physical_cores, threads_or_cores
from pie_local.bench.overhead import page_runs
from pie_local.bench.report import driver_report, format_driver_table


def test_forward_batch_lays_out_requests_and_samples_each_last_token_greedily():
    # a 3-token prefill over pages [4] and one decode step at position 9 over pages [7, 2] (page size 8)
    batch = forward_batch([([5, 6, 7], [4], 3), ([9], [7, 2], 10)], page_size=8)
    assert batch.tokens.tolist() == [5, 6, 7, 9]
    assert batch.positions.tolist() == [0, 1, 2, 9]
    assert batch.qo_indptr.tolist() == [0, 3, 4]
    assert batch.kv_page_indices.tolist() == [4, 7, 2]
    assert batch.kv_page_indptr.tolist() == [0, 1, 3]
    assert batch.kv_last_page_len.tolist() == [3, 2]
    assert batch.output_rows.tolist() == [2, 3]
    assert len(batch.samplers) == 2 and all(s.greedy for s in batch.samplers)
    assert batch.return_logprobs is False
    assert forward_batch([([1], [0], 1)], page_size=8, return_logprobs=True).return_logprobs is True


def call(expression: str) -> str:
    return json.dumps({"name": "calculator", "arguments": {"expression": expression}})


def test_calculator_observations():
    assert observe(call("(17 * 23) + (45 * 12) - 99")) == "832"
    assert observe(call("7 / 2")) == "3.5"
    assert observe(call("2 ^ 3")) == "8"  # models write ^ for powers
    assert observe(call("6 / 3")) == "2"  # whole results read as integers
    assert observe(call("x + 1")) == "Error: unsupported expression: 'x'"
    assert observe(call("1 +")) == "Error: not an arithmetic expression: '1 +'"
    assert observe(call("9 ** 99")) == "Error: exponent too large"
    assert observe(call("1 / 0")) == "Error: division by zero"
    assert observe('{"name": "calcul').startswith("Error: ")  # a call cut off by the token budget


def test_tool_prompt_offers_the_calculator_and_the_schema_admits_only_short_calls():
    prompt = tool_prompt("What is 2 + 2?")
    assert "- calculator: Evaluate an arithmetic expression." in prompt
    assert prompt.endswith("Question: What is 2 + 2?\n")
    schema = call_schema()
    jsonschema.validate(json.loads(call("17 * 23")), schema)
    for bad in (call("1" * 81), '{"name": "final_answer", "arguments": {"answer": "7"}}',
                '{"name": "calculator", "arguments": {"expression": "1", "x": 2}}'):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(bad), schema)
    assert call_schema() == schema  # a fresh copy each time: callers may not change another's


def test_driver_report_ratios_and_table():
    pie = [{"prefill": 300.0, "decode": 50.0, "decode_multi": 200.0},
           {"prefill": 100.0, "decode": 50.0, "decode_multi": 200.0},
           {"prefill": 330.0, "decode": 50.0, "decode_multi": 200.0}]
    llama = [{"prefill": 200.0, "decode": 40.0, "decode_multi": 80.0},
             {"prefill": 200.0, "decode": 40.0, "decode_multi": 80.0},
             {"prefill": 110.0, "decode": 40.0, "decode_multi": 80.0}]
    workloads = {k: f"what {k} does" for k in pie[0]}
    report = driver_report("/models/m.gguf", 4, workloads, pie, llama)
    # ratios pair the sides round by round (3.0, 1.5, 0.5): their median, not a ratio of medians
    assert report["ratio"] == {"prefill": 1.5, "decode": 1.25, "decode_multi": 2.5}
    assert report["ratio_spread"]["prefill"] == {"median": 1.5, "min": 0.5, "max": 3.0}
    assert report["pie"]["prefill"] == 300.0 and report["pie_spread"]["prefill"]["min"] == 100.0
    assert report["rounds"] == 3
    assert report["pie_multi_over_single"] == 4.0 and report["llama_cpp_multi_over_single"] == 2.0
    lines = format_driver_table(report).splitlines()
    assert lines[0] == "model m.gguf, 4 threads, 3 round(s), median (min-max)"
    assert lines[2].split() == ["prefill", "300.0", "(100.0-330.0)", "200.0", "(110.0-200.0)", "1.50", "(0.50-3.00)x",
                                "what", "prefill", "does"]
    assert lines[-1] == "multi-stream / single-stream decode (medians): pie 4.00x, llama.cpp 2.00x"


def test_page_runs_and_threads():
    assert page_runs([3, 4, 5]) == 1
    assert page_runs([3, 4, 9, 10, 2]) == 3
    assert threads_or_cores(3) == 3
    assert threads_or_cores(0) == physical_cores() >= 1


@pytest.mark.real_driver
@pytest.mark.llama_cpp
@pytest.mark.slow
def test_driver_benchmark_runs_end_to_end(starter_gguf):
    from pie_local.bench import run_driver_bench

    report = run_driver_bench(starter_gguf, threads=2, prefill=32, decode=4, streams=2, stream_tokens=2)
    assert set(report["workloads"]) == {"prefill", "decode", "decode_multi"}
    for side in ("pie", "llama_cpp"):
        assert all(report[side][k] > 0 for k in report["workloads"])
    assert report["ratio"]["decode"] == report["pie"]["decode"] / report["llama_cpp"]["decode"]


@pytest.mark.real_driver
@pytest.mark.llama_cpp
@pytest.mark.slow
def test_runtime_benchmark_runs_end_to_end_with_the_same_work_on_both_sides(starter_gguf):
    from pie_local.bench import BenchConfig, format_runtime_report, run_runtime_bench

    cfg = BenchConfig(model=str(starter_gguf), n_threads=2, prompt_tokens=24, best_of=2, best_of_tokens=3,
                      n_chats=2, chat_tokens=3, tot_depth=1, tot_breadth=2, tot_tokens=3, tool_calls=1,
                      overhead_steps=4)
    report = run_runtime_bench(cfg)
    rows = report["workloads"]
    assert list(rows) == ["best_of", "chats", "tree_of_thought", "tool_loop"]
    for name, tokens in (("best_of", 6), ("chats", 6), ("tree_of_thought", 6)):
        assert rows[name]["pie_tokens"] == rows[name]["llama_cpp_tokens"] == tokens  # end-of-sequence is banned
    assert rows["tool_loop"]["pie_tokens"] > 0 and rows["tool_loop"]["llama_cpp_tokens"] > 0
    assert report["overhead"]["steps"] == 4
    assert "tool_loop" in format_runtime_report(report)


def test_amx_probe_allows_extra_bufts_only_where_amx_cannot_fault(monkeypatch) -> None:
    from pie_local.bench import machine

    monkeypatch.setattr(machine, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert machine.extra_bufts_safe() == (True, "the CPU advertises no AMX")
    monkeypatch.setattr(machine, "_cpu_flags", lambda: {"avx2", "amx_tile", "amx_int8"})
    monkeypatch.setattr(machine, "_amx_usable", lambda: False)
    safe, why = machine.extra_bufts_safe()
    assert not safe and "refuses" in why
    monkeypatch.setattr(machine, "_amx_usable", lambda: True)
    assert machine.extra_bufts_safe()[0]


@pytest.mark.real_driver
@pytest.mark.llama_cpp
@pytest.mark.slow
def test_fork_benchmark_runs_end_to_end(starter_gguf):
    from pie_local.bench.fork import format_fork_report, run_fork_bench

    report = run_fork_bench(str(starter_gguf), threads=2, prompt_tokens=32, n=2, tokens=3,
                            samplings=("top_p",), rounds=2)
    result = report["results"]["top_p"]
    assert result["sampling"] == {"temperature": 0.8, "top_k": 0, "top_p": 0.95, "min_p": 0.0}
    for key in ("pie", "llama_cpp", "speedup"):
        assert 0 < result[key]["min"] <= result[key]["median"] <= result[key]["max"]
    assert "best-of-2 from a 32-token prompt, 3 tokens per branch" in format_fork_report(report)
