#!/usr/bin/env bash
# GPU verification: on a machine with an NVIDIA GPU and the CUDA toolkit (nvcc) but no network,
# build llama-cpp-python with CUDA for this GPU's architecture only, install pie-local against
# it, and run the driver and runtime tests on the CUDA device (logits against llama.cpp on the
# same device, paging, masks, sampling) and the driver benchmark. About ten minutes on 16 cores.
#
# Everything comes from a wheelhouse prepared beforehand on a machine with network access and
# the same Python version, OS and CPU architecture:
#     scripts/gpu_check.sh --prepare WHEELHOUSE
# then copy the repository and WHEELHOUSE to the GPU machine and run
#     scripts/gpu_check.sh --wheelhouse WHEELHOUSE
#
# usage: scripts/gpu_check.sh --wheelhouse DIR [--venv DIR] [--out DIR] [--jobs N] [--arch SM]
#                             [--skip-build] [--dry-run]
#        scripts/gpu_check.sh --prepare DIR
#   --arch SM     CUDA architecture to build for (e.g. 90); default: nvidia-smi's compute capability
#   --skip-build  reuse the venv's llama-cpp-python and pie-local (after a first run)
#   --dry-run     detect and check everything, print the commands instead of running them
# Results (logs, junit XML, benchmark JSON) go to --out (default gpu-check-results/).
set -euo pipefail

LLAMA_CPP_VERSION=0.3.36
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELHOUSE="" VENV="$REPO/.venv-gpu" OUT="$REPO/gpu-check-results" JOBS="" ARCH="" PREPARE=""
SKIP_BUILD=0 DRY_RUN=0
PYTHON=${PYTHON:-python3}

die() { echo "gpu_check: error: $*" >&2; exit 2; }
say() { echo "gpu_check: $*" >&2; }
# run CMD...: runs it, or prints it under --dry-run
run() {
    if [ "$DRY_RUN" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi
}

while [ $# -gt 0 ]; do
    case "$1" in
        --wheelhouse) WHEELHOUSE=${2:?}; shift 2 ;;
        --venv) VENV=${2:?}; shift 2 ;;
        --out) OUT=${2:?}; shift 2 ;;
        --jobs) JOBS=${2:?}; shift 2 ;;
        --arch) ARCH=${2:?}; shift 2 ;;
        --prepare) PREPARE=${2:?}; shift 2 ;;
        --skip-build) SKIP_BUILD=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

# requirements NAME...: every requirement of pie-local (build, runtime, test) and of building
# llama-cpp-python from source, one per line, from pyproject.toml.
requirements() {
    "$PYTHON" - "$REPO/pyproject.toml" <<'PY'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    p = tomllib.load(f)
reqs = p["build-system"]["requires"] + p["project"]["dependencies"] + p["project"]["optional-dependencies"]["test"]
# what llama-cpp-python's own build needs (its sdist's build-system), and ninja for speed
reqs += ["scikit-build-core[pyproject]>=0.9.2", "ninja", "wheel"]
print("\n".join(r for r in reqs if not r.startswith("llama-cpp-python")))
PY
}

# ---------------------------------------------------------------------------------------------
# --prepare: fill a wheelhouse (needs network; run where Python/OS/CPU match the GPU machine)
# ---------------------------------------------------------------------------------------------
if [ -n "$PREPARE" ]; then
    mkdir -p "$PREPARE"
    mapfile -t reqs < <(requirements)
    run "$PYTHON" -m pip download --dest "$PREPARE" "${reqs[@]}"
    run "$PYTHON" -m pip download --dest "$PREPARE" --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_VERSION"
    say "wheelhouse ready in $PREPARE: copy it and the repository to the GPU machine"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Detection: GPU, its architecture, the CUDA toolkit, the wheelhouse
# ---------------------------------------------------------------------------------------------
[ -n "$WHEELHOUSE" ] || die "--wheelhouse DIR is required (prepare one with --prepare DIR where there is network)"
[ -d "$WHEELHOUSE" ] || die "wheelhouse $WHEELHOUSE is not a directory"
SDIST=$(ls "$WHEELHOUSE"/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz 2>/dev/null || true)
[ -n "$SDIST" ] || die "no llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz in $WHEELHOUSE (run --prepare again)"

command -v nvidia-smi >/dev/null 2>&1 || die "no NVIDIA GPU here: nvidia-smi not found"
GPU=$(nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader 2>/dev/null | head -n 1) ||
    die "nvidia-smi cannot query the GPU (driver not loaded?)"
[ -n "$GPU" ] || die "nvidia-smi lists no GPU"
if [ -z "$ARCH" ]; then
    CAP=$(echo "$GPU" | cut -d, -f2 | tr -d ' ')
    [[ "$CAP" =~ ^[0-9]+\.[0-9]+$ ]] || die "cannot read the compute capability from nvidia-smi ('$GPU'); pass --arch"
    ARCH=${CAP/./}
fi
[[ "$ARCH" =~ ^[0-9]+[a-z]?$ ]] || die "--arch must look like 90 or 90a, got '$ARCH'"
NVCC=$(command -v nvcc || true)
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -n "$NVCC" ] || { [ -x "$CUDA_HOME/bin/nvcc" ] && NVCC=$CUDA_HOME/bin/nvcc; } || true
[ -n "$NVCC" ] || die "nvcc not found on PATH or in $CUDA_HOME/bin: install the CUDA toolkit or set CUDA_HOME"
CUDA_VERSION=$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n 1)
[ -n "$JOBS" ] || JOBS=$(nproc 2>/dev/null || echo 4)
say "GPU: $GPU -> CUDA architecture $ARCH; nvcc $CUDA_VERSION ($NVCC); $JOBS build jobs"

mkdir -p "$OUT"
PIP=("$VENV/bin/python" -m pip)
OFFLINE=(--no-index --find-links "$WHEELHOUSE")

# ---------------------------------------------------------------------------------------------
# Build: llama-cpp-python with CUDA (this architecture only) and RPC, then pie-local against it
# ---------------------------------------------------------------------------------------------
if [ "$SKIP_BUILD" = 0 ]; then
    run "$PYTHON" -m venv --clear "$VENV"
    mapfile -t reqs < <(requirements)
    run "${PIP[@]}" install -q "${OFFLINE[@]}" "${reqs[@]}"
    # One architecture, the flash-attention kernels of the KV types the driver uses (f16, q8_0:
    # ggml's default set without GGML_CUDA_FA_ALL_QUANTS), no tests or examples.
    run env CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=ON -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DGGML_CUDA_FA_ALL_QUANTS=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_CUDA_COMPILER=$NVCC" \
        CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        "${PIP[@]}" install "${OFFLINE[@]}" --no-build-isolation --no-cache-dir "$SDIST" 2>&1 | tee "$OUT/build-llama-cpp.log"
    run "${PIP[@]}" install "${OFFLINE[@]}" --no-build-isolation --no-deps "$REPO" 2>&1 | tee "$OUT/build-pie-local.log"
fi

# ---------------------------------------------------------------------------------------------
# Checks on the CUDA device
# ---------------------------------------------------------------------------------------------
# The driver puts every layer on the GPU by default (device auto, n_gpu_layers auto); the
# llama.cpp oracle and baseline follow PIE_LLAMA_GPU_LAYERS.
export PIE_LLAMA_GPU_LAYERS=999
TESTS=(tests/test_driver_smoke.py tests/test_driver_logits.py tests/test_driver_paging.py
       tests/test_driver_sampling.py tests/test_driver_invariance.py tests/test_driver_errors.py
       tests/test_runtime_real.py tests/test_generation_real.py tests/test_rpc.py)
status=0
cd "$OUT"  # the installed package, not the source tree, is imported
run "$VENV/bin/pie-local" doctor 2>&1 | tee "$OUT/doctor.txt" || status=1
run "$VENV/bin/python" -m pytest -ra -p no:cacheprovider --rootdir "$REPO" -o "testpaths=$REPO/tests" \
    --junitxml "$OUT/tests.xml" "${TESTS[@]/#/$REPO/}" 2>&1 | tee "$OUT/tests.log" || status=1
run "$VENV/bin/python" "$REPO/benchmarks/bench_driver.py" --json | tee "$OUT/bench_driver.json" || status=1
say "results in $OUT (status $status)"
exit $status
