"""The one dtype table: names as users type them, torch dtypes, storage classes and sizes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckptcore.errors import CkptError


@dataclass(frozen=True)
class DType:
    name: str  # torch's short name: float32, bfloat16, ...
    torch_dtype: torch.dtype
    storage_class: str  # legacy storage class name in torch pickles: FloatStorage, ...
    itemsize: int
    safetensors_code: str  # dtype code in safetensors headers


_TABLE = [
    DType("float64", torch.float64, "DoubleStorage", 8, "F64"),
    DType("float32", torch.float32, "FloatStorage", 4, "F32"),
    DType("float16", torch.float16, "HalfStorage", 2, "F16"),
    DType("bfloat16", torch.bfloat16, "BFloat16Storage", 2, "BF16"),
    DType("int64", torch.int64, "LongStorage", 8, "I64"),
    DType("int32", torch.int32, "IntStorage", 4, "I32"),
    DType("int16", torch.int16, "ShortStorage", 2, "I16"),
    DType("int8", torch.int8, "CharStorage", 1, "I8"),
    DType("uint8", torch.uint8, "ByteStorage", 1, "U8"),
    DType("bool", torch.bool, "BoolStorage", 1, "BOOL"),
]

BY_TORCH = {d.torch_dtype: d for d in _TABLE}
BY_STORAGE = {d.storage_class: d for d in _TABLE}
BY_NAME = {d.name: d for d in _TABLE}
BY_SAFETENSORS = {d.safetensors_code: d for d in _TABLE}

# --precision values, as NeMo spells them, mapped to the dtype they cast floating tensors to.
PRECISIONS: dict[str, torch.dtype | None] = {
    "keep": None,
    "32": torch.float32,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "16": torch.float16,
    "fp16": torch.float16,
    "16-mixed": torch.float16,
}
# What model_config.yaml's `precision` becomes for each target dtype.
CONFIG_PRECISION = {torch.float32: 32, torch.bfloat16: "bf16", torch.float16: 16}


def dtype_info(dtype: torch.dtype) -> DType:
    try:
        return BY_TORCH[dtype]
    except KeyError:
        raise CkptError(None, f"unsupported tensor dtype {dtype}") from None


def parse_precision(value: str | int | None) -> torch.dtype | None:
    """Map a --precision value to the dtype floating tensors are cast to (None keeps them)."""
    key = "keep" if value is None else str(value).lower()
    if key not in PRECISIONS:
        choices = "keep, 32, bf16, 16"
        raise CkptError(
            None, f"unknown precision {value!r} (choose one of: {choices})", "--precision"
        )
    return PRECISIONS[key]
