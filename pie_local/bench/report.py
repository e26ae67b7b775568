"""What the benchmarks report: per-workload ratios of pie-local against llama.cpp, and text tables.

The dicts are JSON-able (`--json` prints them as they are); the tables are for people.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def tok_per_s(n_tokens: int, seconds: float) -> float:
    return n_tokens / seconds if seconds > 0 else float("inf")


# ---------------------------------------------------------------- driver benchmark

def driver_report(model: str, threads: int, workloads: dict[str, str], pie: list[dict[str, float]],
                  llama: list[dict[str, float]], weights: dict[str, str] | None = None) -> dict[str, Any]:
    """tok/s per side from one dict per round (``workloads``: name -> what it does): each side's
    median with min-max, the pie / llama.cpp ratio of each round (the sides ran back to back
    in it) as median with min-max, each side's multi-stream over single-stream decode, and how
    each side holds its weights."""

    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    ratios = {k: spread([p[k] / q[k] for p, q in zip(pie, llama)]) for k in workloads}
    med = {side: {k: statistics.median(r[k] for r in runs) for k in workloads} for side, runs in
           (("pie", pie), ("llama_cpp", llama))}
    return {
        "model": model,
        "threads": threads,
        "rounds": len(pie),
        "weights": weights or {},
        "workloads": workloads,
        "pie": med["pie"],
        "llama_cpp": med["llama_cpp"],
        "pie_spread": {k: spread([r[k] for r in pie]) for k in workloads},
        "llama_cpp_spread": {k: spread([r[k] for r in llama]) for k in workloads},
        "ratio": {k: v["median"] for k, v in ratios.items()},
        "ratio_spread": ratios,
        "pie_multi_over_single": med["pie"]["decode_multi"] / med["pie"]["decode"],
        "llama_cpp_multi_over_single": med["llama_cpp"]["decode_multi"] / med["llama_cpp"]["decode"],
        "per_round": {"pie": pie, "llama_cpp": llama},
    }


def format_driver_table(r: dict[str, Any]) -> str:
    lines = [f"model {Path(r['model']).name}, {r['threads']} threads, {r['rounds']} round(s), "
             "median (min-max)"]
    w = r.get("weights") or {}
    if w:
        lines.append(f"weights: pie {w['pie']}; llama.cpp {w['llama_cpp']} (AMX probe: {w['amx_probe']})")

    def cell(m: dict[str, float], fmt: str) -> str:
        return f"{m['median']:{fmt}} ({m['min']:{fmt}}-{m['max']:{fmt}})"

    lines += [f"{'workload':<14}{'pie tok/s':>22}{'llama.cpp tok/s':>22}{'ratio':>20}   what"]
    for k, what in r["workloads"].items():
        lines.append(f"{k:<14}{cell(r['pie_spread'][k], '.1f'):>22}{cell(r['llama_cpp_spread'][k], '.1f'):>22}"
                     f"{cell(r['ratio_spread'][k], '.2f') + 'x':>20}   {what}")
    lines.append(f"multi-stream / single-stream decode (medians): pie {r['pie_multi_over_single']:.2f}x, "
                 f"llama.cpp {r['llama_cpp_multi_over_single']:.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------- runtime benchmark

def runtime_rows(pie: dict[str, dict], llama: dict[str, dict]) -> dict[str, dict]:
    """One row per workload from each side's {"seconds", "generated_tokens"}; `speedup` is
    llama.cpp's time over pie's, and `chats` adds the aggregate throughput ratio."""
    rows = {}
    for name in pie:
        p, l = pie[name], llama[name]
        rows[name] = {
            "pie_s": round(p["seconds"], 3), "llama_cpp_s": round(l["seconds"], 3),
            "pie_tokens": p["generated_tokens"], "llama_cpp_tokens": l["generated_tokens"],
            "pie_tok_s": round(p["generated_tokens"] / p["seconds"], 2),
            "llama_cpp_tok_s": round(l["generated_tokens"] / l["seconds"], 2),
            "speedup": round(l["seconds"] / p["seconds"], 2),
        }
    rows["chats"]["throughput_ratio"] = round(rows["chats"]["pie_tok_s"] / rows["chats"]["llama_cpp_tok_s"], 2)
    return rows


def runtime_targets(rows: dict[str, dict], overhead: dict) -> dict[str, bool]:
    """The issue-3 targets, met or not."""
    return {"best_of_speedup>=3": rows["best_of"]["speedup"] >= 3,
            "chats_throughput_ratio>=4": rows["chats"]["throughput_ratio"] >= 4,
            "overhead_pct<=5": overhead["overhead_pct"] <= 5}


def format_runtime_report(report: dict) -> str:
    lines = [f"runtime benchmark: {report['model']}, {report['threads']} threads (pie-local vs llama-cpp-python; "
             f"load average {report['load_avg_1m']} at the end)",
             f"{'workload':<16} {'pie s':>8} {'llama s':>8} {'pie tok/s':>10} {'llama tok/s':>12} {'ratio':>7}"]
    for name, r in report["workloads"].items():
        lines.append(f"{name:<16} {r['pie_s']:>8.2f} {r['llama_cpp_s']:>8.2f} {r['pie_tok_s']:>10.1f} "
                     f"{r['llama_cpp_tok_s']:>12.1f} {r['speedup']:>6.2f}x")
    o = report["overhead"]
    lines.append(f"decode step: runtime {o['runtime_step_ms']:.2f} ms vs bare driver {o['bare_driver_step_ms']:.2f} ms "
                 f"-> overhead {o['overhead_pct']:+.1f}% (KV in {o.get('kv_page_runs', 1)} page run(s), same for both)")
    t = report["targets"]
    lines.append("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in t.items()))
    return "\n".join(lines)
