"""Read PyTorch ``.pth`` files without PyTorch, and without running code from them.

A ``.pth`` written by ``torch.save`` (PyTorch 1.6 and later) is a zip archive: ``data.pkl``, a
pickle of the object, plus one raw little-endian buffer per storage under ``data/``. A pickle
can call any importable function, so :func:`load` unpickles with an allow-list: tensor and
parameter rebuilds, PyTorch's storage types, ``OrderedDict`` and plain containers. Anything
else (``os.system``, a class from some training script) is refused with
:class:`UnsafePickle` before it is called. Tensors come back as NumPy arrays, copied out of
their storage with the strides and offset the file records (views and transposed tensors
included), after checking that they lie inside it.

Files from PyTorch before 1.6 (or saved with ``_use_new_zipfile_serialization=False``) are a
sequence of pickles, not a zip; they are refused with the one-line fix (re-save them, or use
``.safetensors``).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

#: PyTorch's storage classes (what a tensor's storage pickles as) -> element dtype.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}
#: ``torch.<dtype>`` names (``_rebuild_tensor_v3`` passes the dtype itself).
TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": STORAGE_DTYPES["FloatStorage"], "float64": STORAGE_DTYPES["DoubleStorage"],
    "float16": STORAGE_DTYPES["HalfStorage"], "bfloat16": STORAGE_DTYPES["BFloat16Storage"],
    "int64": STORAGE_DTYPES["LongStorage"], "int32": STORAGE_DTYPES["IntStorage"],
    "int16": STORAGE_DTYPES["ShortStorage"], "int8": STORAGE_DTYPES["CharStorage"],
    "uint8": STORAGE_DTYPES["ByteStorage"], "bool": STORAGE_DTYPES["BoolStorage"],
    "complex64": STORAGE_DTYPES["ComplexFloatStorage"],
    "complex128": STORAGE_DTYPES["ComplexDoubleStorage"],
}
#: data.pkl holds names and shapes only (the tensors' bytes are separate entries).
MAX_PICKLE_BYTES = 256 << 20
#: The first bytes of every pickle PyTorch < 1.6 wrote (protocol 2, then the magic number).
_LEGACY_START = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


class TorchFileError(ValueError):
    """The file is not a PyTorch zip checkpoint this reader understands."""


class UnsafePickle(TorchFileError):
    """The pickle asks for something other than tensors and plain containers."""


class _Storage:
    """A storage named by the pickle; its bytes are read from the archive when a tensor uses
    it (once per storage: views share it)."""

    def __init__(self, dtype: np.dtype, key: str, numel: int, read):
        self.dtype, self.key, self.numel, self._read = dtype, key, int(numel), read
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            need = self.numel * self.dtype.itemsize
            raw = self._read(self.key, need)
            if len(raw) < need:
                raise TorchFileError(f"storage {self.key} holds {len(raw)} bytes, its "
                                     f"{self.numel} elements need {need}: the file is damaged.")
            self._array = np.frombuffer(raw, self.dtype, self.numel)
        return self._array


class _DType:
    """``torch.float32``, ``torch.FloatStorage`` and friends, as the pickle names them: a fresh
    object per name, so nothing the pickle does to it reaches NumPy's own dtypes."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


def _tensor(storage: _Storage, offset: int, size, stride, *rest) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2``: the elements of ``storage`` at ``offset`` with
    ``size`` and ``stride`` (in elements), copied into a C-contiguous array."""
    if not isinstance(storage, _Storage):
        raise UnsafePickle("a tensor rebuild was given something other than a storage.")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(offset)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
        raise TorchFileError(f"a tensor of size {size}, stride {stride} and offset {offset}: "
                             "the file is damaged.")
    data = storage.array()
    if 0 in size:
        return np.zeros(size, data.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:  # as_strided would read past the buffer
        raise TorchFileError(f"a tensor of size {size}, stride {stride} at offset {offset} "
                             f"reaches element {last} of storage {storage.key}, which has "
                             f"{data.size}: the file is damaged.")
    if math.prod(size) > data.size:  # overlapping strides (0, say) would multiply the storage
        raise TorchFileError(f"a tensor of size {size} and stride {stride} has more elements "
                             f"than its storage {storage.key} ({data.size}); a saved weight "
                             "never does.")
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(data[offset:], size, [s * item for s in stride],
                                           writeable=False)
    return np.array(view, order="C")


def _parameter(data, *rest):
    """``torch._utils._rebuild_parameter`` (and ``_with_state``): a Parameter is its data."""
    return data


#: A pickle may make at most this many times its storages' bytes in tensors (views of one
#: storage are each copied); beyond it, a few bytes of pickle could demand any memory.
MAX_COPIES = 4


class _Unpickler(pickle._Unpickler):  # the Python implementation: its opcodes can be narrowed
    """Globals from an allow-list only, each mapped to our own code (:meth:`find_class`), and
    BUILD (``__setstate__``) only on the OrderedDicts the pickle itself made, so nothing it
    names can be modified either."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, read):
        super().__init__(io.BytesIO(data))
        self._read = read
        self._storages: dict[tuple[str, np.dtype], _Storage] = {}
        self._budget = 1 << 20  # bytes of tensors left: MAX_COPIES x the storages, plus 1 MB
        self._safe = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._tensor_v3,
            ("torch._utils", "_rebuild_parameter"): _parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
            ("torch", "Size"): tuple,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
        }

    def find_class(self, module: str, name: str):
        if (module, name) in self._safe:
            return self._safe[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _DType(STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return _DType(TORCH_DTYPES[name])
        raise UnsafePickle(f"the pickle asks for {f'{module}.{name}'!r}, which is not a tensor, "
                           "a storage or a plain container; it was not loaded (a .pth is a "
                           "pickle, and loading it must not run code). Save only the "
                           "state_dict, or convert the file to .safetensors.")

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        # state_dict() keeps its per-module versions as an attribute of the OrderedDict
        if type(inst) is not collections.OrderedDict or not isinstance(state, dict) or not all(
                isinstance(k, str) for k in state):
            raise UnsafePickle(f"the pickle sets the state of a {type(inst).__name__}; only a "
                               "state_dict's own attributes may be set.")
        inst.__dict__.update(state)

    dispatch[pickle.BUILD[0]] = _load_build

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickle(f"the pickle refers to a persistent object {str(pid)[:80]!r}, "
                               "not a storage.")
        _, kind, key, _location, numel = pid[:5]
        if not isinstance(kind, _DType) or not isinstance(numel, int) or numel < 0:
            raise UnsafePickle(f"storage {str(key)[:40]!r} is not a PyTorch storage.")
        return self._storage(str(key), kind.dtype, numel * kind.dtype.itemsize)

    def _storage(self, key: str, dtype: np.dtype, nbytes: int) -> _Storage:
        """The storage ``key`` seen as ``dtype`` (one per pair: views share it)."""
        if (key, dtype) not in self._storages:
            self._storages[(key, dtype)] = _Storage(dtype, key, nbytes // dtype.itemsize,
                                                    self._read)
            self._budget += MAX_COPIES * nbytes
        return self._storages[(key, dtype)]

    def _spend(self, out: np.ndarray) -> np.ndarray:
        self._budget -= out.nbytes
        if self._budget < 0:
            raise TorchFileError(f"the file's tensors copy its storages more than {MAX_COPIES} "
                                 "times over; a saved state_dict does not.")
        return out

    def _tensor_v2(self, storage, offset, size, stride, *rest):
        return self._spend(_tensor(storage, offset, size, stride))

    def _tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, *rest):
        """``_rebuild_tensor_v3``: an untyped storage and the dtype given separately."""
        if not isinstance(dtype, _DType) or not isinstance(storage, _Storage):
            raise UnsafePickle("a tensor rebuild was given something other than a storage and "
                               "a dtype.")
        if storage.dtype != dtype.dtype:
            storage = self._storage(storage.key, dtype.dtype,
                                    storage.numel * storage.dtype.itemsize)
        return self._spend(_tensor(storage, offset, size, stride))


def is_pytorch_zip(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zip archive with a ``data.pkl`` (what torch.save writes)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def is_legacy(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a pre-1.6 PyTorch pickle."""
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_START)) == _LEGACY_START


def load(path: str | os.PathLike) -> Any:
    """The object ``torch.save`` wrote to ``path``, tensors as NumPy arrays.

    Raises :class:`UnsafePickle` for anything beyond tensors and plain containers, and
    :class:`TorchFileError` for a file that is not a PyTorch zip checkpoint or is damaged.
    """
    path = os.fspath(path)
    if not is_pytorch_zip(path):
        if is_legacy(path):
            raise TorchFileError(f"{path} is in PyTorch's pre-1.6 format (not a zip archive); "
                                 "re-save it with a current torch (torch.save(torch.load(f), "
                                 "f)) or convert it to .safetensors.")
        raise TorchFileError(f"{path} is not a PyTorch file (torch.save writes a zip archive "
                             "with a data.pkl).")
    try:
        with zipfile.ZipFile(path) as z:
            return _load_zip(path, z)
    except TorchFileError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged zip or pickle raises many types
        raise TorchFileError(f"cannot read {path} ({type(e).__name__}: {e}); the file is "
                             "damaged.") from e


def _load_zip(path: str, z: zipfile.ZipFile) -> Any:
    pkls = [n for n in z.namelist() if n.endswith("data.pkl")]
    if len(pkls) != 1:
        raise TorchFileError(f"{path} is a zip archive with {len(pkls)} data.pkl entries; a "
                             "PyTorch file has one.")
    prefix = pkls[0][:-len("data.pkl")]
    names = set(z.namelist())

    def read(key: str, limit: int) -> bytes:
        """At most ``limit`` bytes of the entry: a compressed entry cannot expand past what
        the pickle says it holds."""
        name = f"{prefix}data/{key}"
        if name not in names:
            raise TorchFileError(f"{path} lacks the storage {name}: the file is damaged.")
        with z.open(name) as f:
            return f.read(limit)

    order = "little"
    if prefix + "byteorder" in names:
        with z.open(prefix + "byteorder") as f:
            order = f.read(16).decode("ascii", "replace").strip()
    if order != "little":
        raise TorchFileError(f"{path} was written on a {order!r}-endian machine; re-save it on "
                             "a little-endian one.")
    if z.getinfo(pkls[0]).file_size > MAX_PICKLE_BYTES:
        raise TorchFileError(f"{path}'s data.pkl is over {MAX_PICKLE_BYTES} bytes; a "
                             "state_dict's is far smaller (its tensors are separate entries).")
    with z.open(pkls[0]) as f:
        return _Unpickler(f.read(MAX_PICKLE_BYTES), read).load()
