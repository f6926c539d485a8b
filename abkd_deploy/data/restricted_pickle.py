"""A restricted unpickler for data files: numpy arrays, scipy sparse matrices, plain containers.

Pickle is a program, not a format: ``pickle.load`` calls whatever function a file names,
so a crafted data file runs code as the user. :func:`load_restricted` follows the idea of
``torch.load(weights_only=True)``: it resolves only an allow-list of globals, and none of
them is a real constructor that the file's arguments or state reach unchecked:

- ``numpy.ndarray`` / ``numpy.dtype`` / ``_reconstruct`` / ``scalar`` / ``_frombuffer``
  build inert records; an array is then made by :func:`numpy.frombuffer` from its raw
  bytes, with a plain dtype (bool, int, float, complex) made by :func:`numpy.dtype` from a
  checked string, after checking that the bytes fit the shape. numpy's own
  ``__setstate__`` never sees the file's state;
- ``scipy.sparse.{csr,csc,coo,lil}_matrix`` resolve to records that only collect their
  state; the matrix is then built by scipy's constructor and checked with
  ``check_format(full_check=True)``, so out-of-range indices never reach scipy's C code;
- ``collections.defaultdict`` builds a plain ``dict`` (factory ``list`` only); ``set``,
  ``frozenset``, ``bytes()`` and ``_codecs.encode(str, "latin1")`` (how protocols 0-2
  write those) are accepted with checked arguments.

The resolved globals are immutable (a ``BUILD`` opcode cannot set attributes on them).
Everything loaded is then walked: only ``None``, ``bool``, ``int``, ``float``, ``str``,
``bytes``, lists, tuples, dicts, sets, non-object numpy arrays and scalars and the
rebuilt sparse matrices (lil comes back as csr) may come back. Anything else raises a
one-line :class:`DatasetError` naming the file. Python-2 pickles (Planetoid's ``ind.*``
files) are read with ``encoding="latin1"``, as PyG does.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from abkd_deploy.errors import DatasetError

#: dtype kinds an array may have: bool, integers, floats, complex (object: lil rows only).
_DTYPE_KINDS = "biufcO"
_SPARSE_FORMATS = {"csr_matrix": "csr", "csc_matrix": "csc", "coo_matrix": "coo"}
_SPARSE_FORMATS["lil_matrix"] = "lil"
_PLAIN = (type(None), bool, int, float, complex, str, bytes)


class _Global:
    """A resolved global: immutable (no state can be set on it), callable only through ``func``.

    Fresh module functions would not do: a pickle's BUILD opcode can set attributes such as
    ``__defaults__`` on a function, and those would outlive the load.
    """

    __slots__ = ("func", "name")

    def __init__(self, name: str, func: Any = None) -> None:
        self.name = name
        self.func = func

    def __call__(self, *args: Any) -> Any:
        if self.func is None:
            raise pickle.UnpicklingError(f"{self.name} cannot be called")
        return self.func(*args)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"{self.name} has no state")


_NDARRAY = _Global("numpy.ndarray")
_LIST = _Global("builtins.list")
_OBJECT = _Global("builtins.object")


class _SparseRecord:
    """Inert stand-in for a pickled scipy sparse matrix: only collects its state dict."""

    fmt = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.fmt}_matrix state is not a dict")
        self.state = state


_RECORDS = {
    fmt: type(f"_{fmt.capitalize()}Record", (_SparseRecord,), {"fmt": fmt})
    for fmt in _SPARSE_FORMATS.values()
}


class _DtypeRecord:
    """A pickled ``numpy.dtype``: one plain scalar type, its byte order set by the state.

    numpy's own ``dtype.__setstate__`` never sees the pickle's state (it takes flags and
    fields as given); the real dtype is made by :func:`numpy.dtype` from a checked string.
    """

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        if not isinstance(spec, str):
            raise pickle.UnpicklingError(f"numpy dtype from {type(spec).__name__}, expected str")
        dtype = np.dtype(spec)
        if dtype.kind not in _DTYPE_KINDS or dtype.names is not None or dtype.subdtype:
            raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not a plain number type")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, subarray, names, fields, elsize, alignment, flags[, meta])
        if not (
            isinstance(state, tuple)
            and len(state) in (8, 9)
            and state[1] in ("<", ">", "|", "=")
            and state[2:5] == (None, None, None)
        ):
            raise pickle.UnpicklingError("numpy dtype with a structured or unknown state")
        if state[1] in "<>" and self.dtype.byteorder != "|":
            self.dtype = self.dtype.newbyteorder(state[1])


class _ArrayRecord:
    """A pickled ``numpy.ndarray``: built from its raw bytes by :func:`numpy.frombuffer`."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # (version, shape, dtype, is_fortran, raw)
        if not (isinstance(state, tuple) and len(state) == 4):
            raise pickle.UnpicklingError("numpy array with an unknown state")
        shape, dtype, fortran, raw = state
        self.array = _make_array(raw, _real_dtype(dtype), shape, "F" if fortran else "C")

    def value(self) -> np.ndarray:
        if self.array is None:
            raise ValueError("a numpy array without data")
        return self.array


def _real_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, _DtypeRecord):
        raise pickle.UnpicklingError("numpy array or scalar without a numpy dtype")
    return dtype.dtype


def _make_array(raw: Any, dtype: np.dtype, shape: Any, order: str) -> np.ndarray:
    if not (
        isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)
    ) or order not in ("C", "F"):
        raise pickle.UnpicklingError("numpy array with an invalid shape or order")
    size = math.prod(shape)
    if dtype.hasobject:  # only lil matrices hold these; cleaning refuses them elsewhere
        if not isinstance(raw, list) or len(raw) != size:
            raise pickle.UnpicklingError("numpy object array whose items do not fit its shape")
        out = np.empty(size, dtype=object)
        for i, item in enumerate(raw):
            out[i] = item
        return out.reshape(shape, order=order)
    if isinstance(raw, str):
        raw = raw.encode("latin1")  # Python-2 str, read with encoding="latin1"
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != size * dtype.itemsize:
        raise pickle.UnpicklingError("numpy array whose data does not fit its shape and dtype")
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order=order).copy()


def _reconstruct(subtype: Any, shape: Any, code: Any) -> _ArrayRecord:
    if subtype is not _NDARRAY or not isinstance(shape, tuple) or shape != (0,):
        raise pickle.UnpicklingError("numpy _reconstruct with unexpected arguments")
    return _ArrayRecord()


def _scalar(dtype: Any, data: Any) -> np.generic:
    real = _real_dtype(dtype)
    if real.hasobject:
        raise pickle.UnpicklingError("numpy scalar of dtype object")
    return _make_array(data, real, (), "C")[()]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    real = _real_dtype(dtype)
    if real.hasobject:
        raise pickle.UnpicklingError("numpy _frombuffer of dtype object")
    return _make_array(buf, real, shape, order)


def _latin1_bytes(text: Any, encoding: Any = "utf-8") -> bytes:
    # How Python 3 writes bytes in protocol 2: _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than str to latin1")
    return text.encode("latin1")


def _record(cls: Any, base: Any, state: Any) -> _SparseRecord:
    # How protocols 0 and 1 make an instance: copy_reg._reconstructor(cls, object, None).
    if cls not in _RECORDS.values() or base is not _OBJECT or state is not None:
        raise pickle.UnpicklingError("copy_reg._reconstructor with unexpected arguments")
    return cls()


def _set_of(kind: type) -> Any:
    def build(items: Any = ()) -> set | frozenset:
        if not isinstance(items, (list, tuple)):
            raise pickle.UnpicklingError(f"{kind.__name__} from {type(items).__name__}")
        return kind(items)

    return _Global(f"builtins.{kind.__name__}", build)


def _empty_bytes(*args: Any) -> bytes:
    # How protocols 0-2 write b"": bytes(); other bytes come as _codecs.encode(...).
    if args:
        raise pickle.UnpicklingError("bytes() with arguments")
    return b""


def _plain_dict(factory: Any = None) -> dict:
    if factory not in (None, _LIST):
        raise pickle.UnpicklingError("defaultdict with a factory other than list")
    return {}


_NUMPY_GLOBALS = {
    "ndarray": _NDARRAY,
    "dtype": _Global("numpy.dtype", _DtypeRecord),
    "_reconstruct": _Global("numpy._reconstruct", _reconstruct),
    "scalar": _Global("numpy.scalar", _scalar),
}
_DEFAULTDICT = _Global("collections.defaultdict", _plain_dict)
_FROMBUFFER = _Global("numpy._frombuffer", _frombuffer)
_CODECS_ENCODE = _Global("_codecs.encode", _latin1_bytes)
_BUILTINS = {"list": _LIST, "object": _OBJECT, "set": _set_of(set)}
_BUILTINS["frozenset"] = _set_of(frozenset)
_BUILTINS["bytes"] = _Global("builtins.bytes", _empty_bytes)
_RECONSTRUCTOR = _Global("copy_reg._reconstructor", _record)
_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")
_BUILTIN_MODULES = ("__builtin__", "builtins")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _NUMPY_MODULES and name in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[name]
        if module in _NUMERIC_MODULES and name == "_frombuffer":
            return _FROMBUFFER
        if module == "_codecs" and name == "encode":
            return _CODECS_ENCODE
        if module.split(".")[:2] == ["scipy", "sparse"] and name in _SPARSE_FORMATS:
            return _RECORDS[_SPARSE_FORMATS[name]]
        if module == "collections" and name == "defaultdict":
            return _DEFAULTDICT
        if module in _BUILTIN_MODULES and name in _BUILTINS:
            return _BUILTINS[name]
        if module in ("copy_reg", "copyreg") and name == "_reconstructor":
            return _RECONSTRUCTOR
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, which is not a numpy array, scipy sparse matrix or "
            "plain container"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent id")


def load_restricted(path: Path) -> Any:
    """Unpickles ``path`` building nothing but data (see the module docstring).

    Args:
        path: A pickle file (any protocol, Python 2 or 3).

    Returns:
        The object: plain values and containers, numpy arrays (never of dtype object),
        numpy scalars and ``scipy.sparse`` matrices (csr, csc, coo or lil), any nesting.

    Raises:
        DatasetError: the file is unreadable, is not a pickle, or names anything else;
            one line naming ``path``.
    """
    try:
        with open(path, "rb") as f:
            raw = _RestrictedUnpickler(f, encoding="latin1").load()
        return _Cleaner().clean(raw)
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None
    except RecursionError:
        raise DatasetError(f"refusing to unpickle {path}: nested too deeply") from None
    except Exception as e:  # hostile input: any failure means a bad file
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DatasetError(f"refusing to unpickle {path}: {reason}") from None


class _Cleaner:
    """Walks an unpickled object: checks every type, turns records into sparse matrices."""

    def __init__(self) -> None:
        self.done: dict[int, Any] = {}  # id -> cleaned: shared references stay linear
        self.active: set[int] = set()

    def clean(self, obj: Any) -> Any:
        if isinstance(obj, _PLAIN):
            return obj
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if key in self.active:
            raise ValueError("a container holds itself")
        self.active.add(key)
        out = self._clean_new(obj)
        self.active.discard(key)
        self.done[key] = out
        return out

    def _clean_new(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in (list, tuple, set, frozenset):
            return kind(self.clean(v) for v in obj)
        if kind is dict:
            return {self.clean(k): self.clean(v) for k, v in obj.items()}
        if kind is _ArrayRecord:
            obj = obj.value()
        if type(obj) is np.ndarray or isinstance(obj, np.generic):
            if obj.dtype.hasobject:
                raise ValueError("it holds a numpy array of Python objects")
            return obj
        if isinstance(obj, _SparseRecord):
            return _to_sparse(obj.fmt, getattr(obj, "state", {}))
        raise ValueError(f"it holds a {kind.__name__}, expected arrays and plain containers")


def _to_sparse(fmt: str, state: dict) -> sp.spmatrix:
    state = {k: v.value() if isinstance(v, _ArrayRecord) else v for k, v in state.items()}
    if isinstance(state.get("coords"), tuple):
        state["coords"] = tuple(
            v.value() if isinstance(v, _ArrayRecord) else v for v in state["coords"]
        )
    shape = state.get("_shape", state.get("shape"))
    if not (
        isinstance(shape, tuple)
        and len(shape) == 2
        and all(isinstance(s, int) and s >= 0 for s in shape)
    ):
        raise ValueError(f"{fmt}_matrix without a valid 2-D shape")
    if fmt == "lil":
        return _lil_to_csr(state, shape)
    if fmt == "coo":
        coords = state.get("coords", (state.get("row"), state.get("col")))
        if not (isinstance(coords, tuple) and len(coords) == 2):
            raise ValueError("coo_matrix without row and column arrays")
        parts = [state.get("data"), *coords]
    else:
        parts = [state.get("data"), state.get("indices"), state.get("indptr")]
    for part in parts:
        if type(part) is not np.ndarray or part.dtype.hasobject or part.ndim != 1:
            raise ValueError(f"{fmt}_matrix with a component that is not a 1-D numeric array")
    if fmt == "coo":
        data, row, col = parts
        if row.dtype.kind not in "iu" or col.dtype.kind not in "iu":
            raise ValueError("coo_matrix with non-integer coordinates")
        return sp.coo_matrix((data, (row, col)), shape=shape)  # checks index ranges
    cls = sp.csr_matrix if fmt == "csr" else sp.csc_matrix
    matrix = cls((parts[0], parts[1], parts[2]), shape=shape)
    matrix.check_format(full_check=True)  # index bounds and indptr order
    return matrix


def _lil_to_csr(state: dict, shape: tuple[int, int]) -> sp.csr_matrix:
    rows, data = state.get("rows"), state.get("data")
    if not all(type(a) is np.ndarray and a.shape == (shape[0],) for a in (rows, data)):
        raise ValueError("lil_matrix whose rows/data do not match its shape")
    r, c, v = [], [], []
    for i, (cols, vals) in enumerate(zip(rows.tolist(), data.tolist(), strict=True)):
        if not (isinstance(cols, list) and isinstance(vals, list) and len(cols) == len(vals)):
            raise ValueError(f"lil_matrix row {i} is not two lists of equal length")
        if not all(isinstance(j, int) and 0 <= j < shape[1] for j in cols):
            raise ValueError(f"lil_matrix row {i} has a column outside 0..{shape[1] - 1}")
        r += [i] * len(cols)
        c += cols
        v += vals
    values = np.asarray(v, dtype=np.float64 if not v else None)
    if values.dtype.hasobject or values.dtype.kind not in "biuf":
        raise ValueError("lil_matrix with non-numeric values")
    return sp.csr_matrix((values, (r, c)), shape=shape)
