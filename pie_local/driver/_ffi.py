"""ctypes mirror of ``native/ggml_driver/include/pie_driver.h``: the only place its structs and
function signatures are declared. ``bind(lib)`` checks the ABI and sets every signature."""

from __future__ import annotations

import ctypes as C

ABI_VERSION = 6
MAX_DEVICES = 16  # PIE_MAX_DEVICES

# pie_status
OK = 0
STATUS_NAMES = {
    -1: "io",
    -2: "format",
    -3: "unsupported",
    -4: "out_of_memory",
    -5: "invalid_argument",
    -6: "backend",
}

KV_TYPES = {"f16": 0, "q8_0": 1}

RETURN_LOGPROB = 1 << 0
RETURN_TOP_K = 1 << 1
RETURN_LOGITS = 1 << 2
RETURN_HIDDEN = 1 << 3
RETURN_HIDDEN_ONLY = 1 << 4
ROW_ERROR_SIZE = 160  # PIE_ROW_ERROR_SIZE: bytes of one row's message in out_errors

LOG_CALLBACK = C.CFUNCTYPE(None, C.c_int32, C.c_char_p, C.c_void_p)
# (name, ne[4], data or NULL, user_data) -> wanted; see pie_set_activation_callback
ACTIVATION_CALLBACK = C.CFUNCTYPE(C.c_int32, C.c_char_p, C.POINTER(C.c_int64), C.POINTER(C.c_float), C.c_void_p)

_i32p = C.POINTER(C.c_int32)
_f32p = C.POINTER(C.c_float)


class ModelParams(C.Structure):
    _fields_ = [
        ("n_threads", C.c_int32),
        ("device", C.c_char * 32),
        ("page_size", C.c_int32),
        ("n_pages", C.c_int32),
        ("kv_type", C.c_int32),
        ("max_batch_tokens", C.c_int32),
        ("max_batch_kv", C.c_int32),
        ("use_mmap", C.c_int32),
        ("repack", C.c_int32),
        ("own_kernels", C.c_int32),
        ("n_gpu_layers", C.c_int32),
        ("rpc", C.c_char * 256),
        ("tensor_split", C.c_float * MAX_DEVICES),
    ]


class ModelInfo(C.Structure):
    _fields_ = [
        ("arch", C.c_char * 32),
        ("name", C.c_char * 128),
        ("backend", C.c_char * 64),
        ("n_vocab", C.c_int32),
        ("n_ctx_train", C.c_int32),
        ("n_embd", C.c_int32),
        ("n_layer", C.c_int32),
        ("n_head", C.c_int32),
        ("n_head_kv", C.c_int32),
        ("head_dim", C.c_int32),
        ("sliding_window", C.c_int32),
        ("page_size", C.c_int32),
        ("n_pages", C.c_int32),
        ("kv_type", C.c_int32),
        ("max_batch_tokens", C.c_int32),
        ("n_params", C.c_int64),
        ("weight_bytes", C.c_int64),
        ("kv_bytes", C.c_int64),
        ("page_bytes", C.c_int64),
        ("n_repacked", C.c_int32),
        ("embedding_only", C.c_int32),
    ]


class Sampler(C.Structure):
    _fields_ = [
        ("temperature", C.c_float),
        ("top_k", C.c_int32),
        ("top_p", C.c_float),
        ("min_p", C.c_float),
        ("seed", C.c_uint64),
    ]


class Batch(C.Structure):
    _fields_ = [
        ("n_tokens", C.c_int32),
        ("tokens", _i32p),
        ("positions", _i32p),
        ("n_requests", C.c_int32),
        ("qo_indptr", _i32p),
        ("kv_page_indices", _i32p),
        ("kv_page_indptr", _i32p),
        ("kv_last_page_len", _i32p),
        ("mask_indptr", _i32p),
        ("mask_runs", _i32p),
        ("n_outputs", C.c_int32),
        ("output_rows", _i32p),
        ("samplers", C.POINTER(Sampler)),
        ("logit_masks", C.POINTER(C.c_uint32)),
        ("return_flags", C.c_uint32),
        ("top_k", C.c_int32),
        ("out_tokens", _i32p),
        ("out_logprobs", _f32p),
        ("out_top_ids", _i32p),
        ("out_top_probs", _f32p),
        ("out_logits", _f32p),
        ("out_hidden", _f32p),
        ("out_status", _i32p),
        ("out_errors", C.c_char_p),
    ]


class DeviceUse(C.Structure):
    _fields_ = [
        ("name", C.c_char * 64),
        ("description", C.c_char * 128),
        ("is_cpu", C.c_int32),
        ("first_layer", C.c_int32),
        ("n_layers", C.c_int32),
        ("input", C.c_int32),
        ("output", C.c_int32),
        ("weight_bytes", C.c_int64),
        ("kv_bytes", C.c_int64),
        ("compute_bytes", C.c_int64),
        ("free_bytes", C.c_int64),
        ("total_bytes", C.c_int64),
    ]


# pie_struct_id -> the ctypes layout that must match
STRUCTS = {0: ModelParams, 1: ModelInfo, 2: Sampler, 3: Batch, 4: DeviceUse}

_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "pie_last_error": (C.c_char_p, []),
    "pie_status_name": (C.c_char_p, [C.c_int32]),
    "pie_abi_version": (C.c_int32, []),
    "pie_struct_size": (C.c_size_t, [C.c_int32]),
    "pie_arch_count": (C.c_int32, []),
    "pie_arch_name": (C.c_char_p, [C.c_int32]),
    "pie_log_set": (None, [LOG_CALLBACK, C.c_void_p]),
    "pie_model_default_params": (ModelParams, []),
    "pie_model_load": (C.c_int32, [C.c_char_p, C.POINTER(ModelParams), C.POINTER(C.c_void_p)]),
    "pie_model_free": (None, [C.c_void_p]),
    "pie_model_get_info": (C.c_int32, [C.c_void_p, C.POINTER(ModelInfo)]),
    "pie_model_devices": (C.c_int32, [C.c_void_p, C.POINTER(DeviceUse), C.c_int32, _i32p]),
    "pie_plan_devices": (C.c_int32, [C.c_char_p, C.POINTER(ModelParams), C.POINTER(DeviceUse), C.c_int32, _i32p]),
    "pie_rpc_available": (C.c_int32, []),
    "pie_rpc_version": (C.c_char_p, []),
    "pie_rpc_serve": (C.c_int32, [C.c_char_p, C.c_int32]),
    "pie_model_threads": (C.c_int32, [C.c_void_p]),
    "pie_forward": (C.c_int32, [C.c_void_p, C.POINTER(Batch)]),
    "pie_copy_pages": (C.c_int32, [C.c_void_p, C.c_int32, _i32p, _i32p]),
    "pie_read_pages": (C.c_int32, [C.c_void_p, C.c_int32, _i32p, C.c_void_p, C.c_size_t]),
    "pie_write_pages": (C.c_int32, [C.c_void_p, C.c_int32, _i32p, C.c_void_p, C.c_size_t]),
    "pie_set_activation_callback": (C.c_int32, [C.c_void_p, ACTIVATION_CALLBACK, C.c_void_p]),
}


class AbiMismatch(RuntimeError):
    """The library found on disk was built from a different pie_driver.h than this package."""


def bind(lib: C.CDLL, path: str) -> C.CDLL:
    """Checks ABI version and struct sizes, then declares every signature on ``lib``."""
    lib.pie_abi_version.restype = C.c_int32
    lib.pie_abi_version.argtypes = []
    version = lib.pie_abi_version()
    if version != ABI_VERSION:
        raise AbiMismatch(
            f"libpie_driver ABI {version} does not match this pie_local (expects {ABI_VERSION}); "
            f"reinstall pie-local (pip install --force-reinstall pie-local) or rebuild {path}"
        )
    lib.pie_struct_size.restype = C.c_size_t
    lib.pie_struct_size.argtypes = [C.c_int32]
    for which, layout in STRUCTS.items():
        size = lib.pie_struct_size(which)
        if size != C.sizeof(layout):
            raise AbiMismatch(
                f"libpie_driver struct {layout.__name__} is {size} bytes but this pie_local expects "
                f"{C.sizeof(layout)}; reinstall pie-local or rebuild {path}"
            )
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib
