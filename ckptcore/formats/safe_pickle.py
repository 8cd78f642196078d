"""A restricted unpickler for torch checkpoints: nothing a file contains is ever executed.

torch's ``weights_only=True`` loader resolves globals against an allow-list and rebuilds tensors.
This module does the same with a smaller, explicit allow-list, and goes one step further: tensors
are never materialised. Every tensor in the pickle becomes a :class:`TensorRef` (where its bytes
live inside the zip archive), so a multi-gigabyte optimizer state costs nothing to "load".

The allow-list covers what NeMo / PyTorch Lightning checkpoints contain: containers, torch's
tensor-rebuild functions and storage classes, OmegaConf containers and their node/metadata classes
(NeMo saves ``hyper_parameters`` itself as a ``DictConfig`` ``{cfg: ...}``), Lightning's
``AttributeDict`` (read as a plain dict), ``argparse.Namespace``. Any other global is
refused with a :class:`~ckptcore.errors.CkptError` naming it. :data:`TORCH_SAFE_GLOBALS` is the
same allow-list in the form ``torch.serialization.safe_globals`` takes, for callers that want
torch's own ``weights_only=True`` loader.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import enum
import io
import pickle
import typing
from dataclasses import dataclass
from typing import Any

from ckptcore.dtypes import BY_STORAGE, DTypeName, dtype_info
from ckptcore.errors import CkptError


@dataclass(frozen=True)
class StorageRef:
    """A storage record of a torch zip archive: ``data/<key>`` holding ``numel`` items of ``dtype``."""

    key: str
    dtype: DTypeName
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_info(self.dtype).itemsize


@dataclass(frozen=True)
class TensorRef:
    """A tensor that has not been read: a strided view into a :class:`StorageRef`."""

    storage: StorageRef
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> DTypeName:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_info(self.dtype).itemsize

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def span(self) -> tuple[int, int]:
        """First and one-past-last element index of the storage this view touches."""
        if self.numel == 0:
            return self.offset, self.offset
        last = self.offset + sum(
            (s - 1) * st for s, st in zip(self.shape, self.stride, strict=True)
        )
        return self.offset, last + 1


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. inside persistent ids."""

    def __init__(self, dtype: DTypeName) -> None:
        self.dtype = dtype


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise pickle.UnpicklingError(f"malformed tensor {what}: {value!r}")
    return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("tensor without a storage record")
    if not isinstance(offset, int) or offset < 0:
        raise pickle.UnpicklingError(f"malformed tensor offset: {offset!r}")
    shape = _int_tuple(size, "shape")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides) or any(s < 0 for s in shape + strides):
        raise pickle.UnpicklingError(f"malformed tensor shape/stride: {shape} {strides}")
    ref = TensorRef(storage, offset, shape, strides)
    lo, hi = ref.span()
    if hi > storage.numel:
        raise pickle.UnpicklingError(
            f"tensor view {shape} at offset {offset} overruns its storage of {storage.numel} items"
        )
    return ref


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *rest):
    if isinstance(storage, StorageRef) and isinstance(dtype, DTypeName):
        itemsize = dtype_info(dtype).itemsize
        storage = StorageRef(storage.key, dtype, storage.numel // itemsize)
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data


class _TensorType:
    """Stands in for ``torch.Tensor`` / ``torch.nn.Parameter`` as ``_rebuild_from_type_v2``'s type."""

    def __init__(self, name: str) -> None:
        self.name = name


_TENSOR_TYPES = {
    ("torch", "Tensor"): _TensorType("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("torch.nn.Parameter"),
}


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """torch's rebuild of a tensor that carries Python attributes (NeMo's O2 master parameters
    carry ``tensor_model_parallel``, ``partition_dim``, ``partition_stride``): the tensor, as a
    :class:`TensorRef`; the attributes are dropped. Only a plain tensor or parameter rebuilt by
    one of the functions above is accepted, never another type or function."""
    if func not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
        raise pickle.UnpicklingError(
            "_rebuild_from_type_v2 with a function that is not a tensor rebuild"
        )
    if not isinstance(new_type, _TensorType):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 of a type that is not a tensor")
    if not isinstance(args, tuple):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 without an argument tuple")
    if state is not None and not isinstance(state, dict):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 with a state that is not a dict")
    return func(*args)


def _encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode``: how protocol-2 pickles spell ``bytes``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected use of _codecs.encode")
    return text.encode("latin1")


def _copying(cls: type) -> Any:
    """``bytes``/``bytearray`` as protocol-2 pickles use them: to copy data, never ``cls(n)``,
    which would allocate ``n`` zeroed bytes on the file's say-so."""

    def build(*args: Any) -> Any:
        if args and isinstance(args[0], int):
            raise pickle.UnpicklingError(
                f"builtins.{cls.__name__} may only copy bytes, not allocate {args[0]} of them"
            )
        return cls(*args)

    return build


def _omegaconf_globals() -> dict[tuple[str, str], Any]:
    try:
        import omegaconf
        from omegaconf import base, dictconfig, listconfig, nodes
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return {}
    found: dict[tuple[str, str], Any] = {
        ("omegaconf.dictconfig", "DictConfig"): dictconfig.DictConfig,
        ("omegaconf.listconfig", "ListConfig"): listconfig.ListConfig,
        ("omegaconf.base", "ContainerMetadata"): base.ContainerMetadata,
        ("omegaconf.base", "Metadata"): base.Metadata,
    }
    for name in (
        "AnyNode",
        "StringNode",
        "IntegerNode",
        "FloatNode",
        "BooleanNode",
        "EnumNode",
        "BytesNode",
        "PathNode",
        "ValueNode",
        "InterpolationResultNode",
    ):
        if hasattr(nodes, name):
            found[("omegaconf.nodes", name)] = getattr(nodes, name)
    if hasattr(omegaconf, "SCMode"):
        found[("omegaconf.base", "SCMode")] = omegaconf.SCMode
    return found


_BUILTINS = {
    "dict": dict,
    "list": list,
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
    "int": int,
    "long": int,
    "float": float,
    "str": str,
    "unicode": str,
    "bool": bool,
    "bytes": _copying(bytes),
    "bytearray": _copying(bytearray),
    "complex": complex,
    "slice": slice,
    "object": object,
    "NoneType": type(None),
}


class AttributeDict(dict):
    """Lightning's ``AttributeDict`` (the ``hyper_parameters`` of models that save plain keyword
    arguments) read back as what it is: a dict. None of Lightning's code is imported or run."""


# Where Lightning has defined ``AttributeDict`` across its releases and package names.
_ATTRIBUTE_DICT_MODULES = (
    "lightning.pytorch.utilities.parsing",
    "pytorch_lightning.utilities.parsing",
    "lightning.fabric.utilities.data",
    "lightning_fabric.utilities.data",
)

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    **_TENSOR_TYPES,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _encode,
    ("typing", "Any"): typing.Any,
    ("argparse", "Namespace"): argparse.Namespace,
    **{(mod, "AttributeDict"): AttributeDict for mod in _ATTRIBUTE_DICT_MODULES},
    **{("torch", cls): _StorageType(info.dtype) for cls, info in BY_STORAGE.items()},
    ("torch", "UntypedStorage"): _StorageType(DTypeName("uint8")),
    **{("torch", info.name): info.dtype for info in BY_STORAGE.values()},
    **{(mod, name): obj for mod in ("builtins", "__builtin__") for name, obj in _BUILTINS.items()},
    **_omegaconf_globals(),
}


def _torch_safe_globals() -> list[Any]:
    out: list[Any] = [
        collections.OrderedDict,
        collections.defaultdict,
        argparse.Namespace,
        typing.Any,
        dict,  # OmegaConf metadata records container and key types
        list,
        int,
    ]
    for (mod, _), obj in _ALLOWED.items():
        if mod.startswith("omegaconf") and obj not in out:
            out.append(obj)
    out.extend((AttributeDict, f"{mod}.AttributeDict") for mod in _ATTRIBUTE_DICT_MODULES)
    return out


TORCH_SAFE_GLOBALS: list[Any] = _torch_safe_globals()
"""The same allow-list for ``torch.serialization.safe_globals`` + ``torch.load(weights_only=True)``."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            shown = "builtins" if module == "__builtin__" else module
            raise pickle.UnpicklingError(f"refused to load global {shown}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[2], str)
            or not isinstance(pid[4], int)
            or pid[4] < 0
        ):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        return StorageRef(key=pid[2], dtype=pid[1].dtype, numel=pid[4])


def load_pickle(data: bytes, path: str) -> Any:
    """Unpickle a checkpoint's ``data.pkl`` with the allow-list; tensors become :class:`TensorRef`."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except CkptError:
        raise
    except pickle.UnpicklingError as exc:
        raise CkptError(path, f"unsafe or malformed pickle: {_one_line(exc)}") from None
    except (MemoryError, RecursionError) as exc:
        raise CkptError(path, f"malformed pickle: {type(exc).__name__}") from None
    except Exception as exc:  # only allow-listed constructors ran: the data made them fail
        raise CkptError(path, f"malformed pickle: {type(exc).__name__}: {_one_line(exc)}") from None


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_CONFIG_VALUES = 200_000  # a NeMo model config has a few hundred


def to_plain(value: Any, path: str | None = None, what: str = "config") -> Any:
    """A config as plain dicts/lists/scalars: OmegaConf containers and Namespaces converted
    (interpolations resolved where possible), dates as ISO strings, enums by name.

    The input comes from a file, so it is bounded: cycles, more than :data:`MAX_CONFIG_VALUES`
    values (shared references or YAML aliases expanding exponentially), non-string keys and
    values no config can hold (tensors, complex numbers, ...) are a ``CkptError`` naming ``what``.
    """
    budget = [MAX_CONFIG_VALUES]
    try:
        return _plain(value, path, what, "", budget, set())
    except RecursionError:
        raise CkptError(path, f"{what} nests too deeply") from None


def _plain(value: Any, path, what: str, where: str, budget: list[int], active: set[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise CkptError(path, f"{what} holds more than {MAX_CONFIG_VALUES} values")
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if _is_omegaconf(value):
        value = _omegaconf_container(value, path, what)
    elif isinstance(value, argparse.Namespace):
        value = vars(value)
    if not isinstance(value, dict | list | tuple):
        shown = where.lstrip(".") or "(top level)"
        raise CkptError(path, f"{what} holds a {type(value).__name__} value at {shown}")
    if id(value) in active:
        raise CkptError(path, f"{what} refers to itself at {where.lstrip('.') or '(top level)'}")
    active.add(id(value))
    try:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise CkptError(path, f"{what} has a non-string key {k!r:.40}")
                out[k] = _plain(v, path, what, f"{where}.{k}", budget, active)
            return out
        return [_plain(v, path, what, f"{where}[{i}]", budget, active) for i, v in enumerate(value)]
    finally:
        active.discard(id(value))


def _is_omegaconf(value: Any) -> bool:
    try:
        from omegaconf import DictConfig, ListConfig
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, DictConfig | ListConfig)


def _omegaconf_container(value: Any, path: str | None, what: str) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(value, resolve=True)
    except Exception:  # an unresolvable interpolation: keep it as written
        pass
    try:
        return OmegaConf.to_container(value, resolve=False)
    except Exception as exc:  # a DictConfig rebuilt from damaged pickle state
        raise CkptError(path, f"{what} is not a valid OmegaConf config: {_one_line(exc)}") from None
