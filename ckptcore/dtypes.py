"""The one dtype table: names as users type them, storage classes, sizes, torch dtypes (lazily).

Dtypes are identified by :class:`DTypeName` (``"float32"``): a string that compares equal to the
torch dtype of the same name, so the byte-moving paths (reading, planning, resharding, writing)
never need to import torch; ``.torch`` gives the torch dtype where a tensor is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckptcore.errors import CkptError


class DTypeName(str):
    """A dtype by name; equal (and unequal) to torch dtypes of the same name."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return str.__eq__(self, other)
        if type(other).__name__ == "dtype" and type(other).__module__ == "torch":
            return "torch." + self == str(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = str.__hash__

    @property
    def torch(self) -> Any:
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, str(self))

    @property
    def is_floating_point(self) -> bool:
        return BY_NAME[self].floating

    @property
    def itemsize(self) -> int:
        return BY_NAME[self].itemsize


@dataclass(frozen=True)
class DType:
    name: str  # torch's short name: float32, bfloat16, ...
    storage_class: str  # legacy storage class name in torch pickles: FloatStorage, ...
    itemsize: int
    safetensors_code: str  # dtype code in safetensors headers
    floating: bool

    @property
    def dtype(self) -> DTypeName:
        return DTypeName(self.name)

    @property
    def torch_dtype(self) -> Any:
        return self.dtype.torch


_TABLE = [
    DType("float64", "DoubleStorage", 8, "F64", True),
    DType("float32", "FloatStorage", 4, "F32", True),
    DType("float16", "HalfStorage", 2, "F16", True),
    DType("bfloat16", "BFloat16Storage", 2, "BF16", True),
    DType("int64", "LongStorage", 8, "I64", False),
    DType("int32", "IntStorage", 4, "I32", False),
    DType("int16", "ShortStorage", 2, "I16", False),
    DType("int8", "CharStorage", 1, "I8", False),
    DType("uint8", "ByteStorage", 1, "U8", False),
    DType("bool", "BoolStorage", 1, "BOOL", False),
]

BY_STORAGE = {d.storage_class: d for d in _TABLE}
BY_NAME = {d.name: d for d in _TABLE}
BY_SAFETENSORS = {d.safetensors_code: d for d in _TABLE}

F32, BF16, F16 = DTypeName("float32"), DTypeName("bfloat16"), DTypeName("float16")

# --precision values, as NeMo spells them, mapped to the dtype they cast floating tensors to.
PRECISIONS: dict[str, DTypeName | None] = {
    "keep": None,
    "32": F32,
    "fp32": F32,
    "bf16": BF16,
    "bf16-mixed": BF16,
    "16": F16,
    "fp16": F16,
    "16-mixed": F16,
}
# What model_config.yaml's `precision` becomes for each target dtype.
CONFIG_PRECISION: dict[str, int | str] = {F32: 32, BF16: "bf16", F16: 16}


def dtype_name(dtype: Any) -> DTypeName:
    """The :class:`DTypeName` of a name, a DTypeName or a torch dtype."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in BY_NAME:
        raise CkptError(None, f"unsupported tensor dtype {dtype}")
    return DTypeName(name)


def dtype_info(dtype: Any) -> DType:
    return BY_NAME[dtype_name(dtype)]


def parse_precision(value: str | int | None) -> DTypeName | None:
    """Map a --precision value to the dtype floating tensors are cast to (None keeps them)."""
    key = "keep" if value is None else str(value).lower()
    if key not in PRECISIONS:
        choices = "keep, 32, bf16, 16"
        raise CkptError(
            None, f"unknown precision {value!r} (choose one of: {choices})", "--precision"
        )
    return PRECISIONS[key]
