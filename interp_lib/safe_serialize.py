"""Store analysis results without pickle: tensors in safetensors, everything else as JSON.

``dumps(obj)`` turns a result (tensors, numpy arrays, DataFrames, dataclasses, nested
containers, ...) into the bytes of one safetensors file; ``loads(data)`` turns them back. Unlike
``pickle`` / ``torch.load(weights_only=False)``, loading cannot run code: the file holds tensors
and one JSON tree describing how to reassemble them, and the only objects it may rebuild are

* plain values: None, bools, ints, floats (NaN / inf included), strings, bytes, complex;
* lists, tuples, dicts (any storable keys), sets and frozensets;
* ``torch.Tensor`` (stored natively in safetensors; complex as real pairs), ``numpy.ndarray``
  (raw bytes + dtype; object arrays item by item), numpy scalars and dtypes;
* ``pandas`` DataFrame / Series / Index (column by column: numeric columns as arrays, others as
  JSON values, then ``astype`` the recorded dtype);
* ``pathlib`` paths, ``torch.dtype`` / ``torch.device``;
* instances of dataclasses (the declared result types), by their declared fields only, and
  ``interp_lib`` enum members. The class is looked up by name in module namespaces -- only
  ``interp_lib`` modules are ever imported for it; other modules must already be loaded, and no
  module attribute hook runs (``torch:_dynamo.X`` imports nothing) -- and the instance is
  rebuilt with ``object.__new__`` and its stored fields (a field the file does not hold gets its
  default; one the class does not declare is refused). No ``__init__``, ``__setstate__``,
  ``__reduce__`` or custom ``__new__`` is called, and classes with ``__del__`` (live
  resources) are neither stored nor rebuilt.
* sizes are checked before anything is allocated: a pandas index must be as long as the
  values it labels; arrays must hold exactly the bytes their shape declares.

Anything else (a lambda, a model, an open file, an arbitrary third-party object) is refused at
save time with a ``TypeError`` naming where in the result it sits.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import importlib
import json
import math
import sys
import types
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any

import torch

__all__ = ["dumps", "loads", "FORMAT"]

FORMAT = "interp_lib.safe_serialize/1"
_STRUCTURE_KEY = "__structure__"
_TAG = "$"
_PATH_TYPES = {cls.__name__: cls for cls in (Path, PurePath, PurePosixPath, PureWindowsPath)}
# Library-owned packages whose modules may be imported to find a class named in a file.
_TRUSTED_PACKAGES = ("interp_lib",)


def _declared_fields(cls: type) -> tuple[str, ...]:
    """The fields an ``interp_lib`` class that is not a dataclass declares as its stored state
    (``__stored_fields__``, e.g. a fitted TemperatureScaler); empty for any other class."""
    names = vars(cls).get("__stored_fields__") if _trusted_module(cls.__module__) else None
    if not isinstance(names, tuple) or not all(isinstance(n, str) and n.isidentifier() for n in names):
        return ()
    return names


def _has_finalizer(cls: type) -> bool:
    return any("__del__" in vars(c) for c in cls.__mro__ if c is not object)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _trusted_module(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in _TRUSTED_PACKAGES)


def _find_class(name: Any) -> type:
    """The class ``module:qualname`` names; ValueError if it is not one we may rebuild."""
    if not isinstance(name, str) or name.count(":") != 1:
        raise ValueError(f"class reference {name!r}: expected 'module:qualname'")
    module_name, qualname = name.split(":")
    module = sys.modules.get(module_name)
    if module is None:
        if not _trusted_module(module_name):
            raise ValueError(f"class {name!r}: module {module_name!r} is not loaded, and only "
                             f"{', '.join(_TRUSTED_PACKAGES)} modules are imported to read a file")
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        if part.startswith("_") or part == "<locals>" or not part.isidentifier():
            raise ValueError(f"class {name!r}: not a public module-level class")
        # the object's own namespace only: getattr would run a module's lazy __getattr__, which
        # imports submodules (``torch:_dynamo.X`` imported torch._dynamo)
        namespace = getattr(obj, "__dict__", None)
        obj = namespace.get(part) if isinstance(namespace, dict) else None
        if isinstance(obj, types.ModuleType):
            raise ValueError(f"class {name!r}: {part!r} is a module, not a class")
    if not isinstance(obj, type):
        raise ValueError(f"class {name!r}: not found")
    return obj


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()
        self._active: set[int] = set()

    # ------------------------------------------------------------------ helpers
    def _tensor_key(self, tensor: torch.Tensor) -> str:
        key = f"t{len(self.tensors)}"
        t = tensor.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if (storage.data_ptr() in self._storages and t.numel()) \
                or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors refuses tensors that share memory
        if t.numel():
            self._storages.add(t.untyped_storage().data_ptr())
        self.tensors[key] = t
        return key

    def _raw(self, data: bytes) -> str:
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
            torch.zeros(0, dtype=torch.uint8)
        return self._tensor_key(tensor)

    # ------------------------------------------------------------------ values
    def encode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and not isinstance(value, enum.Enum):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {_TAG: "float", "v": repr(float(value))}
        if isinstance(value, complex):
            return {_TAG: "complex", "re": self.encode(value.real, path),
                    "im": self.encode(value.imag, path)}
        if isinstance(value, (bytes, bytearray)):
            return {_TAG: "bytes", "b64": base64.b64encode(bytes(value)).decode("ascii"),
                    "bytearray": isinstance(value, bytearray)}
        if id(value) in self._active:
            raise TypeError(f"{path} refers back to itself (a cycle): cannot be stored")
        self._active.add(id(value))
        try:
            return self._encode_compound(value, path)
        finally:
            self._active.discard(id(value))

    def _encode_compound(self, value: Any, path: str) -> Any:
        if isinstance(value, dict):
            if all(isinstance(k, str) and k != _TAG for k in value):
                return {k: self.encode(v, f"{path}[{k!r}]") for k, v in value.items()}
            return {_TAG: "dict", "items": [[self.encode(k, f"{path} key {k!r}"),
                                             self.encode(v, f"{path}[{k!r}]")]
                                            for k, v in value.items()]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):  # a namedtuple is stored as a plain tuple
            return {_TAG: "tuple", "items": [self.encode(v, f"{path}[{i}]")
                                             for i, v in enumerate(value)]}
        if isinstance(value, (set, frozenset)):
            return {_TAG: "frozenset" if isinstance(value, frozenset) else "set",
                    "items": [self.encode(v, f"{path}[...]") for v in value]}
        if isinstance(value, torch.Tensor):
            return self._encode_tensor(value, path)
        if isinstance(value, torch.dtype):
            return {_TAG: "torch_dtype", "v": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {_TAG: "torch_device", "v": str(value)}
        if isinstance(value, PurePath) and type(value).__name__ in _PATH_TYPES | {
                "PosixPath": Path, "WindowsPath": Path}:
            return {_TAG: "path", "v": str(value),
                    "pure": type(value).__name__ if type(value).__name__.startswith("Pure") else None}
        if isinstance(value, enum.Enum):
            cls = type(value)
            if not _trusted_module(cls.__module__):
                raise TypeError(f"{path} is an enum member of {_class_name(cls)}: only interp_lib "
                                "enums can be stored; store its name or value instead")
            return {_TAG: "enum", "cls": _class_name(cls), "name": value.name}
        module = type(value).__module__.split(".")[0]
        if module == "numpy":
            return self._encode_numpy(value, path)
        if module == "pandas":
            return self._encode_pandas(value, path)
        return self._encode_object(value, path)

    def _encode_tensor(self, value: torch.Tensor, path: str) -> Any:
        t = value.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.is_quantized:
            t = t.dequantize()
        entry: dict[str, Any] = {_TAG: "tensor", "device": t.device.type,
                                 "requires_grad": bool(value.requires_grad)}
        if t.is_complex():
            entry["complex"] = True
            t = torch.view_as_real(t.resolve_conj())
        entry["key"] = self._tensor_key(t)
        return entry

    def _encode_numpy(self, value: Any, path: str) -> Any:
        import numpy as np

        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                return {_TAG: "ndarray_obj", "shape": list(value.shape),
                        "items": [self.encode(v, f"{path}[...]") for v in value.reshape(-1).tolist()]}
            if value.dtype.fields is not None:
                raise TypeError(f"{path} is a structured numpy array: not storable; use a DataFrame")
            raw = np.ascontiguousarray(value).tobytes()
            return {_TAG: "ndarray", "dtype": value.dtype.str, "shape": list(value.shape),
                    "key": self._raw(raw)}
        if isinstance(value, np.generic):
            return {_TAG: "npscalar", "dtype": value.dtype.str,
                    "v": self.encode(value.item(), path)}
        if isinstance(value, np.dtype):
            return {_TAG: "np_dtype", "v": value.str}
        raise TypeError(f"{path} is a {type(value).__module__}.{type(value).__name__}: not storable")

    def _encode_values(self, values: Any, dtype: Any, path: str) -> Any:
        """A pandas column / index as a numpy array (numeric) or a JSON list plus its dtype."""
        import numpy as np

        if isinstance(dtype, np.dtype) and not dtype.hasobject:
            return {"dtype": str(dtype), "array": self.encode(np.asarray(values), path)}
        items = list(values.astype(object)) if hasattr(values, "astype") else list(values)
        return {"dtype": str(dtype), "items": [self.encode(v, f"{path}[{i}]")
                                              for i, v in enumerate(items)]}

    def _encode_index(self, index: Any, path: str) -> Any:
        import pandas as pd

        name = self.encode(index.name, f"{path}.name") if not isinstance(index, pd.MultiIndex) \
            else None
        if isinstance(index, pd.RangeIndex):
            return {_TAG: "rangeindex", "start": index.start, "stop": index.stop,
                    "step": index.step, "name": name}
        if isinstance(index, pd.MultiIndex):
            return {_TAG: "multiindex", "tuples": self.encode(list(index), path),
                    "names": self.encode(list(index.names), f"{path}.names")}
        return {_TAG: "index", "name": name, **self._encode_values(index, index.dtype, path)}

    def _encode_pandas(self, value: Any, path: str) -> Any:
        import pandas as pd

        if isinstance(value, pd.DataFrame):
            columns = [self._encode_values(value.iloc[:, i], value.dtypes.iloc[i],
                                           f"{path}[{value.columns[i]!r}]")
                       for i in range(value.shape[1])]
            return {_TAG: "dataframe", "columns": self._encode_index(value.columns, f"{path}.columns"),
                    "data": columns, "index": self._encode_index(value.index, f"{path}.index"),
                    "attrs": self.encode(dict(value.attrs), f"{path}.attrs")}
        if isinstance(value, pd.Series):
            return {_TAG: "series", "name": self.encode(value.name, f"{path}.name"),
                    "values": self._encode_values(value, value.dtype, path),
                    "index": self._encode_index(value.index, f"{path}.index")}
        if isinstance(value, pd.Index):
            return self._encode_index(value, path)
        if value is pd.NA:
            return {_TAG: "pd_na"}
        if value is pd.NaT:
            return {_TAG: "pd_nat"}
        if isinstance(value, pd.Timestamp):
            return {_TAG: "timestamp", "v": value.isoformat()}
        if isinstance(value, pd.Timedelta):
            return {_TAG: "timedelta", "ns": int(value.value)}
        raise TypeError(f"{path} is a pandas {type(value).__name__}: not storable")

    def _encode_object(self, value: Any, path: str) -> Any:
        cls = type(value)
        if callable(value) and (isinstance(value, type) or hasattr(value, "__code__")
                                or cls.__name__ in ("builtin_function_or_method", "method")):
            raise TypeError(f"{path} is a function or class ({value!r}): not storable; store "
                            "its result or its name")
        if not (dataclasses.is_dataclass(value) or _declared_fields(cls)):
            raise TypeError(f"{path} is a {_class_name(cls)}: not storable without pickle "
                            "(store tensors, arrays, DataFrames, dataclasses or plain values; "
                            "an object is stored only as a dataclass, by its declared fields)")
        if _has_finalizer(cls):
            raise TypeError(f"{path} is a {_class_name(cls)}, which defines __del__: objects that "
                            "hold live resources are not stored")
        if cls.__new__ is not object.__new__ or "<locals>" in cls.__qualname__:
            raise TypeError(f"{path} is a {_class_name(cls)}: only module-level classes without "
                            "a custom __new__ can be stored")
        names = [f.name for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) \
            else list(_declared_fields(cls))
        state = {n: getattr(value, n) for n in names if hasattr(value, n)}
        return {_TAG: "object", "cls": _class_name(cls),
                "state": {k: self.encode(v, f"{path}.{k}") for k, v in state.items()}}


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def _tensor(self, key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in self.tensors:
            raise ValueError(f"tensor {key!r} is missing from the file")
        return self.tensors[key]

    def decode(self, node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict):
            raise ValueError(f"unexpected node of type {type(node).__name__}")
        tag = node.get(_TAG)
        if tag is None:
            return {k: self.decode(v) for k, v in node.items()}
        method = getattr(self, f"_decode_{tag}", None) if isinstance(tag, str) else None
        if method is None:
            raise ValueError(f"unknown node type {tag!r}")
        return method(node)

    def _decode_float(self, node: dict) -> float:
        if node["v"] not in ("nan", "inf", "-inf"):
            raise ValueError(f"bad float {node['v']!r}")
        return float(node["v"])

    def _decode_complex(self, node: dict) -> complex:
        return complex(self.decode(node["re"]), self.decode(node["im"]))

    def _decode_bytes(self, node: dict) -> bytes | bytearray:
        data = base64.b64decode(node["b64"], validate=True)
        return bytearray(data) if node.get("bytearray") else data

    def _decode_dict(self, node: dict) -> dict:
        return {self.decode(k): self.decode(v) for k, v in node["items"]}

    def _decode_tuple(self, node: dict) -> tuple:
        return tuple(self.decode(v) for v in node["items"])

    def _decode_set(self, node: dict) -> set:
        return {self.decode(v) for v in node["items"]}

    def _decode_frozenset(self, node: dict) -> frozenset:
        return frozenset(self.decode(v) for v in node["items"])

    def _decode_tensor(self, node: dict) -> torch.Tensor:
        t = self._tensor(node["key"])
        if node.get("complex"):
            t = torch.view_as_complex(t.contiguous())
        if node.get("device") == "cuda" and torch.cuda.is_available():
            t = t.cuda()
        if node.get("requires_grad") and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
        return t

    def _decode_torch_dtype(self, node: dict) -> torch.dtype:
        dtype = getattr(torch, str(node["v"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown torch dtype {node['v']!r}")
        return dtype

    def _decode_torch_device(self, node: dict) -> torch.device:
        return torch.device(str(node["v"]))

    def _decode_path(self, node: dict) -> PurePath:
        cls = _PATH_TYPES.get(node.get("pure") or "Path", Path)
        return cls(str(node["v"]))

    def _decode_enum(self, node: dict) -> enum.Enum:
        cls = _find_class(node["cls"])
        if not issubclass(cls, enum.Enum) or not _trusted_module(cls.__module__):
            raise ValueError(f"{node['cls']!r} is not an interp_lib enum")
        return cls[str(node["name"])]

    def _decode_ndarray(self, node: dict) -> Any:
        import numpy as np

        dtype = np.dtype(str(node["dtype"]))
        if dtype.hasobject or dtype.fields is not None:
            raise ValueError(f"bad array dtype {node['dtype']!r}")
        raw = self._tensor(node["key"]).numpy().tobytes()
        shape = tuple(int(n) for n in node["shape"])
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

    def _decode_ndarray_obj(self, node: dict) -> Any:
        import numpy as np

        items = [self.decode(v) for v in node["items"]]
        out = np.empty(len(items), dtype=object)
        out[:] = items if items else []
        return out.reshape(tuple(int(n) for n in node["shape"]))

    def _decode_npscalar(self, node: dict) -> Any:
        import numpy as np

        dtype = np.dtype(str(node["dtype"]))
        if dtype.hasobject:
            raise ValueError(f"bad scalar dtype {node['dtype']!r}")
        return np.array(self.decode(node["v"]), dtype=dtype)[()]

    def _decode_np_dtype(self, node: dict) -> Any:
        import numpy as np

        return np.dtype(str(node["v"]))

    def _values(self, node: dict) -> Any:
        import numpy as np

        if "array" in node:
            return self.decode(node["array"])
        items = [self.decode(v) for v in node["items"]]
        out = np.empty(len(items), dtype=object)
        out[:] = items if items else []
        return out

    @staticmethod
    def _pandas_dtype(name: Any) -> Any:
        import pandas as pd

        if not isinstance(name, str):
            raise ValueError(f"bad pandas dtype {name!r}")
        return pd.api.types.pandas_dtype(name)

    def _column(self, node: dict) -> Any:
        """A column / index's values: a numpy array, or an extension array of the stored dtype."""
        import pandas as pd

        values = self._values(node)
        if "array" in node or node["dtype"] == "object":
            return values
        dtype = self._pandas_dtype(node["dtype"])
        try:
            return pd.array(list(values), dtype=dtype)
        except (TypeError, ValueError):
            return pd.Series(values, dtype=object).astype(dtype).array

    def _decode_rangeindex(self, node: dict) -> Any:
        import pandas as pd

        return pd.RangeIndex(int(node["start"]), int(node["stop"]), int(node["step"]),
                             name=self.decode(node["name"]))

    def _decode_multiindex(self, node: dict) -> Any:
        import pandas as pd

        names = self.decode(node["names"])
        return pd.MultiIndex.from_tuples(self.decode(node["tuples"]), names=names)

    def _decode_index(self, node: dict) -> Any:
        import pandas as pd

        return pd.Index(self._column(node), name=self.decode(node["name"]), tupleize_cols=False)

    @staticmethod
    def _check_length(what: str, index: Any, values: Any) -> None:
        """A stored index must be as long as the values it labels: checked before pandas
        allocates (a 0-d value over ``RangeIndex(0, 3e8)`` would be broadcast to 2.4 GB)."""
        import numpy as np

        n_values = len(values) if np.ndim(values) == 1 else None
        if n_values is None or len(index) != n_values:
            raise ValueError(f"{what}: the stored index has {len(index)} entries for "
                             f"{n_values if n_values is not None else 'a scalar, not'} values")

    def _decode_dataframe(self, node: dict) -> Any:
        import pandas as pd

        columns = self.decode(node["columns"])
        index = self.decode(node["index"])
        data = [self._column(c) for c in node["data"]]
        if not isinstance(index, pd.Index) or not isinstance(columns, pd.Index) \
                or len(columns) != len(data):
            raise ValueError(f"dataframe: {len(data)} stored columns, the header declares "
                             f"{len(columns) if isinstance(columns, pd.Index) else 'none'}")
        for i, col in enumerate(data):
            self._check_length(f"dataframe column {i}", index, col)
        frame = pd.DataFrame({i: pd.Series(col, index=index, copy=False)
                              for i, col in enumerate(data)}, index=index)
        frame.columns = columns
        frame.attrs.update(self.decode(node.get("attrs") or {}))
        return frame

    def _decode_series(self, node: dict) -> Any:
        import pandas as pd

        values = self._column(node["values"])
        index = self.decode(node["index"])
        if not isinstance(index, pd.Index):
            raise ValueError("series: the stored index is not an index")
        self._check_length("series", index, values)
        return pd.Series(values, index=index, name=self.decode(node["name"]))

    def _decode_pd_na(self, node: dict) -> Any:
        import pandas as pd

        return pd.NA

    def _decode_pd_nat(self, node: dict) -> Any:
        import pandas as pd

        return pd.NaT

    def _decode_timestamp(self, node: dict) -> Any:
        import pandas as pd

        return pd.Timestamp(str(node["v"]))

    def _decode_timedelta(self, node: dict) -> Any:
        import pandas as pd

        return pd.Timedelta(int(node["ns"]), unit="ns")

    def _decode_object(self, node: dict) -> Any:
        cls = _find_class(node["cls"])
        # only declared result types: dataclasses, by their declared fields; nothing that holds a
        # live resource (a rebuilt AnswerStore's __del__ once took a RunLock at a path in the file)
        if not (dataclasses.is_dataclass(cls) or _declared_fields(cls)) \
                or issubclass(cls, (type, enum.Enum, BaseException)) or _has_finalizer(cls):
            raise ValueError(f"class {node['cls']!r} may not be rebuilt from a file (only "
                             "dataclasses and interp_lib classes declaring __stored_fields__, "
                             "without __del__, are)")
        if cls.__new__ is not object.__new__:
            raise ValueError(f"class {node['cls']!r} has a custom __new__: not rebuilt")
        state = node["state"]
        if not isinstance(state, dict):
            raise ValueError(f"bad state for {node['cls']!r}")
        fields = ({f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls)
                  else {name: None for name in _declared_fields(cls)})
        unknown = sorted(str(k) for k in state if k not in fields)
        if unknown:
            raise ValueError(f"{node['cls']!r} declares no field {unknown[0]!r}: not rebuilt")
        obj = object.__new__(cls)
        values = {str(k): self.decode(v) for k, v in state.items()}
        for name, spec in fields.items():  # a field stored by an older version: its default
            if name not in values and spec is not None:
                if spec.default is not dataclasses.MISSING:
                    values[name] = spec.default
                elif spec.default_factory is not dataclasses.MISSING:
                    values[name] = spec.default_factory()
        if hasattr(obj, "__dict__"):
            obj.__dict__.update(values)
        else:
            for name, value in values.items():
                object.__setattr__(obj, name, value)
        return obj


def dumps(obj: Any) -> bytes:
    """The bytes of a safetensors file holding ``obj`` (see the module docstring)."""
    from safetensors.torch import save

    encoder = _Encoder()
    tree = encoder.encode(obj, "result")
    text = json.dumps({"format": FORMAT, "root": tree}, ensure_ascii=True, allow_nan=False,
                      separators=(",", ":"))
    tensors = dict(encoder.tensors)
    tensors[_STRUCTURE_KEY] = torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8)
    return save(tensors, metadata={"format": FORMAT})


def loads(data: bytes) -> Any:
    """The object ``dumps`` stored in ``data``; ValueError if ``data`` is not such a file."""
    from safetensors.torch import load

    try:
        tensors = load(bytes(data))
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ValueError(f"not a safetensors file ({type(error).__name__}: {error})") from None
    structure = tensors.pop(_STRUCTURE_KEY, None)
    if structure is None or structure.dtype != torch.uint8:
        raise ValueError("not a file written by interp_lib.safe_serialize (no structure)")
    try:
        document = json.loads(structure.numpy().tobytes().decode("ascii"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"damaged structure ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"unknown format {document.get('format') if isinstance(document, dict) else None!r}")
    try:
        return _Decoder(tensors).decode(document["root"])
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"damaged structure ({type(error).__name__}: {error})") from None
