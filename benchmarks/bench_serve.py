"""Serving benchmark: `pie-local serve` against llama-cpp-python's own OpenAI server
(`python -m llama_cpp.server`) and, when it is built, llama.cpp's `llama-server --parallel N`.

Same GGUF, same thread count, same run. Each round, N concurrent clients (the official `openai`
package, streaming) send a chat with one shared system prompt (~1,000 tokens, new every round so
no round reuses another's cache) and their own question, for 64 tokens out, greedy. Every server
renders the same Gemma prompt, so greedy decoding gives them the same tokens to produce. Rounds are
interleaved between the servers (their order alternates) after a warm-up round on each.

Reported per server: requests/s, output tok/s, time to first token p50/p95 (median over rounds,
with min-max), and the ratios against llama-cpp-python (targets: >= 3x output tok/s, >= 3x lower
p95 time to first token). Close other CPU-heavy programs first.

    python benchmarks/bench_serve.py                         # starter model, physical cores
    python benchmarks/bench_serve.py --threads 8 --rounds 7 --json
    python benchmarks/bench_serve.py --rounds 1 --clients 2 --max-tokens 8 --system-tokens 100   # smoke run

llama-cpp-python's server needs its extras: pip install '.[bench]' (or 'llama-cpp-python[server]').
llama-server is looked for in $LLAMA_SERVER, then ~/.cache/pie-llama-tools/build/bin (built by the
project's build-llama-tools script from the pinned llama-cpp-python source).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

QUESTIONS = [
    "What should I check first?", "Summarise the rules in one line.", "Which rule matters most?",
    "Give me an example of rule 3.", "How do I cite a record?", "What is a record number?",
    "Who wrote these rules?", "Can you list three rules?", "What happens if I forget a citation?",
    "How long should answers be?", "Is rule 10 optional?", "What does the archive hold?",
    "Where are maps kept?", "How old is the oldest record?", "Who may read the records?",
    "How are records numbered?",
]

# llama-cpp-python's server, with ggml's AMX weight buffer type off (it crashes in VMs that
# advertise AMX without enabling it; pie-local's driver never uses it either).
LLAMA_CPP_PYTHON_LAUNCHER = """
import runpy, sys
import llama_cpp.llama_cpp as lib
_default = lib.llama_model_default_params
def _params():
    p = _default()
    p.use_extra_bufts = False
    return p
lib.llama_model_default_params = _params
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


@dataclass
class Server:
    name: str
    url: str  # OpenAI base URL (.../v1)
    model: str  # the model field requests send
    proc: subprocess.Popen


@dataclass
class Round:
    wall_s: float
    requests: int
    output_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)  # as each server's usage reports them

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def ttft_p50(self) -> float:
        return percentile(self.ttft_s, 50)

    @property
    def ttft_p95(self) -> float:
        return percentile(self.ttft_s, 95)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# ---- servers ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}: not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def launched(name: str, cmd: list[str], url: str, model: str, workdir: Path,
             env: dict | None = None) -> Iterator[Server]:
    log = workdir / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or os.environ.copy())
        try:
            wait_ready(url, proc, log)
            yield Server(name, url, model, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def pie_server(gguf: Path, threads: int, clients: int, workdir: Path) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    home = workdir / "pie-home"  # its own data directory: never collides with a server the user runs
    home.mkdir(exist_ok=True)
    import pie_local  # the server runs the pie_local this script imports

    package_root = str(Path(pie_local.__file__).resolve().parents[1])
    env = dict(os.environ, PIE_LOCAL_HOME=str(home),
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "pie_local", "serve", "--port", str(port), "--model", str(gguf),
           "--threads", str(threads), "--keep-alive", "never", "--max-connections", str(4 * clients + 16)]
    return launched("pie-local", cmd, f"http://127.0.0.1:{port}/v1", str(gguf), workdir, env)


def llama_cpp_python_missing() -> str | None:
    missing = []
    for module in ("fastapi", "pydantic_settings", "sse_starlette", "starlette_context", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return (f"llama-cpp-python's server needs its extras (missing: {', '.join(missing)}): "
                "pip install '.[bench]'  (or pip install 'llama-cpp-python[server]')")
    return None


def llama_cpp_python_server(gguf: Path, threads: int, n_ctx: int,
                            workdir: Path) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    cmd = [sys.executable, "-c", LLAMA_CPP_PYTHON_LAUNCHER, "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--n_ctx", str(n_ctx), "--chat_format", "gemma", "--model_alias", "model",
           "--interrupt_requests", "False"]  # by default a new request cuts off the stream in progress
    return launched("llama-cpp-python", cmd, f"http://127.0.0.1:{port}/v1", "model", workdir)


def find_llama_server() -> Path | None:
    candidates = [os.environ.get("LLAMA_SERVER"), Path.home() / ".cache/pie-llama-tools/build/bin/llama-server",
                  shutil.which("llama-server")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


def llama_server(binary: Path, gguf: Path, threads: int, clients: int, n_ctx: int,
                 workdir: Path) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True).stdout
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-tb", str(threads), "--parallel", str(clients), "-c", str(n_ctx * clients), "--alias", "model"]
    # Newer llama-servers render with Jinja by default, and there "gemma" is not a template name but
    # a template whose whole output is the word "gemma" (a 3-token prompt): ask for the built-in one.
    if "--no-jinja" in help_text:
        cmd.append("--no-jinja")
    cmd += ["--chat-template", "gemma"]
    if "--no-repack" in help_text:
        cmd.append("--no-repack")  # the AMX-safe weight layout, as on the other sides
    return launched(f"llama-server --parallel {clients}", cmd, f"http://127.0.0.1:{port}/v1", "model", workdir)


# ---- the workload ------------------------------------------------------------------------------------


def system_prompt(tag: str, n_tokens: int) -> str:
    """About n_tokens tokens of archive rules, opened by a tag unique to the round."""
    rules = [f"Rule {i}: cite the record number of every document you mention, and say where it is kept."
             for i in range(1, 1000)]
    words_needed = int(n_tokens * 0.75)
    text, words = f"Session {tag}. You are the assistant of the city archive.", 0
    for rule in rules:
        if words >= words_needed:
            break
        text += " " + rule
        words += len(rule.split())
    return text


async def one_request(client, server: Server, system: str, question: str,
                      max_tokens: int) -> tuple[float, int, int]:
    """(time to first token, output tokens, prompt tokens) of one streamed chat."""
    start = time.perf_counter()
    ttft, chunks, usage_tokens, prompt_tokens = None, 0, None, 0
    # Gemma has no system role: its format puts the system prompt at the head of the first user turn.
    # Sending it there ourselves gives every server the same prompt (llama-cpp-python's "gemma"
    # format would drop a system message, leaving it ~1,000 tokens less to compute).
    stream = await client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": f"{system}\n\n{question}"}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - start
        if getattr(chunk, "usage", None) is not None:
            usage_tokens = chunk.usage.completion_tokens
            prompt_tokens = chunk.usage.prompt_tokens
    return (ttft if ttft is not None else time.perf_counter() - start), (usage_tokens or chunks), prompt_tokens


async def run_round(server: Server, clients: int, system: str, max_tokens: int) -> Round:
    import httpx
    import openai

    limits = httpx.Limits(max_connections=clients + 4)
    async with openai.AsyncOpenAI(base_url=server.url, api_key="bench", max_retries=0, timeout=1800,
                                  http_client=httpx.AsyncClient(limits=limits, timeout=1800)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, server, system, QUESTIONS[i % len(QUESTIONS)],
                                                     max_tokens) for i in range(clients)))
        wall = time.perf_counter() - start
    return Round(wall, clients, sum(n for _, n, _ in results), [t for t, _, _ in results],
                 [p for _, _, p in results])


def summarise(rounds: list[Round]) -> dict:
    out = {}
    for metric in ("requests_per_s", "tokens_per_s", "ttft_p50", "ttft_p95"):
        values = [getattr(r, metric) for r in rounds]
        out[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["output_tokens_per_round"] = statistics.median(r.output_tokens for r in rounds)
    out["prompt_tokens_median"] = statistics.median(p for r in rounds for p in r.prompt_tokens)
    out["rounds"] = [asdict(r) for r in rounds]
    return out


def format_report(report: dict) -> str:
    cfg = report["config"]
    lines = [f"bench_serve: {cfg['clients']} clients x {cfg['max_tokens']} tokens, ~{cfg['system_tokens']}-token "
             f"shared system prompt, {cfg['threads']} threads, {cfg['rounds']} rounds, {cfg['model']}", ""]
    head = (f"{'server':<26} {'prompt':>6} {'req/s':>16} {'out tok/s':>20} {'TTFT p50 s':>20} "
            f"{'TTFT p95 s':>20}")
    lines.append(head)

    def cell(m: dict) -> str:
        return f"{m['median']:.2f} ({m['min']:.2f}-{m['max']:.2f})"

    for name, s in report["servers"].items():
        prompt = f"{s['prompt_tokens_median']:.0f}" if s["prompt_tokens_median"] else "n/a"  # not in its usage
        lines.append(f"{name:<26} {prompt:>6} {cell(s['requests_per_s']):>16} "
                     f"{cell(s['tokens_per_s']):>20} "
                     f"{cell(s['ttft_p50']):>20} {cell(s['ttft_p95']):>20}")
    if report.get("ratios"):
        lines.append("")
        for peer, r in report["ratios"].items():
            lines.append(f"pie-local vs {peer}: output tok/s x{r['tokens_per_s']:.2f} (target >= 3), "
                         f"TTFT p95 {r['ttft_p95_lower']:.2f}x lower (target >= 3), req/s x{r['requests_per_s']:.2f}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------------------


def default_gguf(model: str | None) -> Path:
    if model and Path(model).expanduser().is_file():
        return Path(model).expanduser().resolve()
    from pie_local.models import resolve_model

    return Path(resolve_model(model).path)


def physical_cores() -> int:
    from pie_local.bench import physical_cores as cores

    return cores()


async def bench(args: argparse.Namespace) -> dict:
    gguf = default_gguf(args.model)
    threads = args.threads or physical_cores()
    notes: list[str] = []
    n_ctx = max(2048, 2 * (args.system_tokens + args.max_tokens + 64))
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-serve-")))
        servers = [stack.enter_context(pie_server(gguf, threads, args.clients, workdir))]
        missing = llama_cpp_python_missing()
        if missing:
            notes.append(missing)
        else:
            servers.append(stack.enter_context(llama_cpp_python_server(gguf, threads, n_ctx, workdir)))
        binary = find_llama_server()
        if binary is None:
            notes.append("llama-server not found (not built here; set $LLAMA_SERVER or run the project's "
                         "build-llama-tools script): compared with llama-cpp-python's server only")
        else:
            servers.append(stack.enter_context(llama_server(binary, gguf, threads, args.clients, n_ctx, workdir)))
        for server in servers:  # warm-up: first requests pay for graph building and caches
            print(f"[bench] warm-up {server.name}", file=sys.stderr, flush=True)
            await run_round(server, args.clients, system_prompt(f"warm-{uuid.uuid4().hex[:8]}", args.system_tokens),
                            args.max_tokens)
        rounds: dict[str, list[Round]] = {s.name: [] for s in servers}
        for r in range(args.rounds):
            order = servers if r % 2 == 0 else servers[::-1]
            for server in order:
                system = system_prompt(f"{r}-{server.name}-{uuid.uuid4().hex[:8]}", args.system_tokens)
                result = await run_round(server, args.clients, system, args.max_tokens)
                rounds[server.name].append(result)
                print(f"[bench] round {r + 1}/{args.rounds} {server.name}: {result.tokens_per_s:.1f} tok/s, "
                      f"TTFT p95 {result.ttft_p95:.2f} s", file=sys.stderr, flush=True)
    summary = {name: summarise(rs) for name, rs in rounds.items()}
    ratios = {}
    pie = summary["pie-local"]
    for name, s in summary.items():
        if name == "pie-local":
            continue
        ratios[name] = {
            "tokens_per_s": pie["tokens_per_s"]["median"] / s["tokens_per_s"]["median"],
            "requests_per_s": pie["requests_per_s"]["median"] / s["requests_per_s"]["median"],
            "ttft_p95_lower": s["ttft_p95"]["median"] / pie["ttft_p95"]["median"],
        }
    config = {"model": str(gguf), "threads": threads, "clients": args.clients, "max_tokens": args.max_tokens,
              "system_tokens": args.system_tokens, "rounds": args.rounds}
    return {"config": config, "servers": summary, "ratios": ratios, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or .gguf path (default: the default model)")
    parser.add_argument("--threads", type=int, default=0, help="threads for every server (default: physical cores)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens out per request (default 64)")
    parser.add_argument("--system-tokens", type=int, default=1000, help="shared system prompt size (default ~1000)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per server (default 5)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        import openai  # noqa: F401
    except ImportError:
        print("bench_serve needs the openai package: pip install '.[bench]'", file=sys.stderr)
        return 2
    report = asyncio.run(bench(args))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
