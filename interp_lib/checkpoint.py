"""Stage-level memoisation that survives a killed session (Colab, a laptop, a batch job).

A notebook wraps each expensive step in ``ckpt.stage(name, compute_fn, params={...})``. The first
call computes and stores the result; later calls -- in this process or after a restart -- load
it, as long as the params are the same. Different params recompute and replace the old result.

Layout of a root (Drive on Colab, ``runs/`` locally, ``$INTERP_LIB_RUNS`` when set)::

    <root>/manifest.json                 one entry per finished stage (params, hash, file,
                                         its SHA-256, timing)
    <root>/<name>-<hash16>.safetensors   the stage result (``interp_lib.safe_serialize``:
                                         tensors in safetensors, everything else as JSON)

Guarantees and limits:

* Writes are atomic (``interp_lib.artifacts.atomic_write``): a temp file in the same directory,
  flushed and fsynced, then ``os.replace``.
  The stage file is written before the manifest names it, and its name carries the params hash,
  so a process killed at any moment leaves either the old finished state or the new one, never a
  half-written file that is read as finished. A stage file damaged or altered afterwards
  (truncated copy, Drive sync trouble, a changed byte) is detected on load -- its size and
  SHA-256 must match the manifest -- warned about, and recomputed.
* Loading runs no code: results are stored without pickle (``interp_lib.safe_serialize``
  rebuilds only plain values, tensors, arrays, DataFrames and dataclass / interp_lib objects),
  so a run folder someone shared with you is safe to resume. Stage files of the old pickle
  format (``*.pt``) are never loaded: their stages are recomputed, with a warning.
* Stages are signed (HMAC-SHA256 of the stage, file name, params hash, size and SHA-256 under
  a key kept outside run folders, see ``interp_lib.signing``): a stage whose data *and*
  manifest were edited elsewhere no longer verifies; it is recomputed (``untrusted="recompute"``,
  the default) or loaded and marked unverified (``untrusted="load"``), with a one-line warning
  naming the folder as produced elsewhere. Stages of older, unsigned folders load with a
  warning. A manifest's ``file`` must be a plain stage-file name inside the root: anything else
  (``../x``, an absolute path) is refused, recomputed and never deleted.
* Secrets are never written: params whose key looks like a credential (see ``is_secret_key``),
  at any nesting depth, are stored as ``"<redacted>"`` and left out of the hash; so is any string
  param equal to the value of a credential-named environment variable. A *result* that equals
  such a value (e.g. ``$OPENAI_API_KEY``) is refused.
* One writer per root at a time: the manifest is read, updated and replaced without a lock
  (file locks are unreliable on Drive). ``notebook.setup`` gives each notebook its own root;
  ``interp-lib explain`` and ``interp-lib run`` hold a ``RunLock`` on their run folder, so a
  second run into the same folder stops at once with a one-line error.

How params are hashed (``params_hash``): the params are turned into a canonical JSON value and
hashed with SHA-256 (``json.dumps(sort_keys=True, separators=(",", ":"))``), so key order and
the process do not matter. The canonical form of

* ``None``, bools, ints, strings: themselves; finite floats: themselves (``repr`` round-trips);
  NaN / +-inf: the strings ``"nan"``, ``"inf"``, ``"-inf"`` under a ``{"__float__": ...}`` tag;
* dicts: dicts (non-string keys become ``"<type>:<repr>"``); lists and tuples: lists (so a
  tuple and a list with the same items hash the same, as papermill passes lists); sets: sorted;
* ``torch.Tensor``: dtype, shape and SHA-256 of the raw bytes (device is ignored);
  ``numpy.ndarray``: dtype, shape and SHA-256 of the bytes (object arrays: their items);
  numpy scalars: the Python value; ``pandas`` DataFrame / Series / Index: columns, dtypes and
  ``pandas.util.hash_pandas_object`` (index included), which is stable across processes;
* ``pathlib`` paths: the path string as given (not resolved); enums: ``Class.MEMBER``;
  ``torch.dtype`` / ``torch.device``: their ``str``; dataclass instances: class name and fields;
  functions and classes: ``module:qualname``;
* anything else: ``"<ClassName>:" + repr(obj)``, with a warning when that repr holds a memory
  address (it changes every run, so the stage would never be reused).

``torch.nn.Module`` params are refused: their repr ignores the weights and hashing the weights is
slow; pass something that identifies the model (its name or path) instead.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, Callable, Iterator

import torch

from . import safe_serialize
from .artifacts import TEMP_FILE_RE as _TEMP_RE
from .artifacts import atomic_write, temp_prefix
from .artifacts import host_name as _host
from .runtime import DRIVE_HOME, default_root, in_colab  # re-exported: their home is interp_lib.runtime

# The old private names, still imported by interp_lib.explain: use interp_lib.artifacts.
_atomic_write = atomic_write
_temp_prefix = temp_prefix

__all__ = ["Checkpointer", "RunLock", "RunFolderBusyError", "default_root", "in_colab", "secret_env_values",
           "is_secret_key", "params_hash", "MANIFEST_NAME", "REDACTED"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2
STAGE_SUFFIX = ".safetensors"
LOCK_NAME = ".lock"
REDACTED = "<redacted>"

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_MAX_NAME_LEN = 200  # leaves room for "-<hash16>.safetensors" and temp suffixes (255-byte limit)
_HASH_IN_FILE = 16
_STAGE_FILE_RE = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)-(?P<hash>[0-9a-f]{%d})\.safetensors"
                            % _HASH_IN_FILE)
# Stage files of manifest format 1 (pickles): never loaded, removed when their stage is redone.
_LEGACY_FILE_RE = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)-(?P<hash>[0-9a-f]{%d})\.pt" % _HASH_IN_FILE)
_STALE_TEMP_SECONDS = 6 * 3600  # a temp file untouched this long is left over from a dead writer

# Credential-looking key words. "token" must be a whole word so that LM params such as
# max_tokens, n_tokens or tokenizer stay in the hash; the others may appear inside a word.
_SECRET_SUBSTRINGS = ("apikey", "secret", "password", "authorization")
_SECRET_WORDS = {"token"}


# ----------------------------------------------------------------------------- secrets


def _key_words(key: str) -> list[str]:
    """'openaiApiKey' -> ['openai', 'api', 'key']; 'HF_TOKEN' -> ['hf', 'token']."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [word.lower() for word in re.split(r"[^A-Za-z0-9]+", spaced) if word]


def is_secret_key(key: Any) -> bool:
    """Whether a param (or env var) name looks like a credential.

    Matches, case-insensitively, ``api_key`` / ``apikey`` / ``API-Key``, ``secret``, ``password``
    and ``authorization`` anywhere in the name, and ``token`` as a whole word (``hf_token``,
    ``accessToken``, ``TOKEN``) -- but not ``max_tokens`` or ``tokenizer``, which are ordinary
    language-model params that must stay in the hash.
    """
    if not isinstance(key, str):
        return False
    words = _key_words(key)
    compact = "".join(words)
    return any(s in compact for s in _SECRET_SUBSTRINGS) or any(w in _SECRET_WORDS for w in words)


def secret_env_values() -> set[str]:
    """Values of credential-named environment variables (OPENAI_API_KEY, HF_TOKEN, ...).

    Short values are skipped: they cannot be real credentials and would match ordinary strings.
    """
    values = {value for name, value in os.environ.items() if is_secret_key(name) and len(value) >= 8}
    if os.environ.get("OPENAI_API_KEY"):
        values.add(os.environ["OPENAI_API_KEY"])
    return values


_secret_env_values = secret_env_values  # the old private name, imported by interp_lib.explain.viewer


# ----------------------------------------------------------------------------- hashing


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> dict[str, Any]:
    t = tensor.detach()
    if t.layout != torch.strided or t.is_quantized:
        t = t.to_dense() if t.layout != torch.strided else t.dequantize()
    t = t.cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"__tensor__": {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": _sha256(raw)}}


def _canonical(value: Any, secrets: set[str], path: str, redact: bool) -> Any:
    """A JSON value standing for ``value`` (see the module docstring).

    ``redact=True`` replaces secrets by ``REDACTED`` (for the manifest); ``redact=False`` drops
    them (for the hash). ``path`` names the param in error messages, e.g. ``params['a'][0]``.
    """
    if value is None or isinstance(value, (bool, int, str)) and not isinstance(value, enum.Enum):
        if isinstance(value, str) and value in secrets:
            return REDACTED
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            text = key if isinstance(key, str) else f"<{type(key).__name__}>:{key!r}"
            if is_secret_key(key):
                if redact:
                    out[text] = REDACTED
                continue  # left out of the hash: rotating a key must not invalidate results
            out[text] = _canonical(item, secrets, f"{path}[{key!r}]", redact)
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(item, secrets, f"{path}[{i}]", redact) for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [_canonical(item, secrets, f"{path}[...]", redact) for item in value]
        return {"__set__": sorted(items, key=lambda item: json.dumps(item, sort_keys=True))}
    if isinstance(value, torch.nn.Module):
        raise ValueError(
            f"{path} is a torch.nn.Module ({type(value).__name__}): pass something that identifies "
            "it (its name or path) instead; its repr ignores the weights and hashing them is slow")
    if isinstance(value, torch.Tensor):
        return _tensor_digest(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, PurePath):
        return {"__path__": str(value)}
    if isinstance(value, enum.Enum):
        return {"__enum__": f"{type(value).__qualname__}.{value.name}"}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields: dict[str, Any] = {}
        for field in dataclasses.fields(value):
            if is_secret_key(field.name):
                if redact:
                    fields[field.name] = REDACTED
                continue
            fields[field.name] = _canonical(getattr(value, field.name), secrets,
                                            f"{path}.{field.name}", redact)
        return {"__dataclass__": f"{type(value).__module__}.{type(value).__qualname__}",
                "fields": fields}
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return {"__callable__": f"{getattr(value, '__module__', '?')}:{value.__qualname__}"}
    module = type(value).__module__.split(".")[0]
    if module == "numpy":
        import numpy as np

        if isinstance(value, np.generic):
            return _canonical(value.item(), secrets, path, redact)
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:  # tobytes() of an object array is pointers
                items = _canonical(value.tolist(), secrets, path, redact)
                return {"__ndarray__": {"dtype": "object", "shape": list(value.shape), "items": items}}
            raw = np.ascontiguousarray(value).tobytes()
            return {"__ndarray__": {"dtype": value.dtype.str, "shape": list(value.shape),
                                    "sha256": _sha256(raw)}}
    if module == "pandas":
        import pandas as pd

        if isinstance(value, (pd.DataFrame, pd.Series, pd.Index)):
            row_hashes = pd.util.hash_pandas_object(value, index=not isinstance(value, pd.Index))
            columns = [str(c) for c in value.columns] if isinstance(value, pd.DataFrame) else []
            dtypes = ([str(d) for d in value.dtypes] if isinstance(value, pd.DataFrame)
                      else [str(value.dtype)])
            return {"__pandas__": {"type": type(value).__name__, "columns": columns,
                                   "dtypes": dtypes, "shape": list(value.shape),
                                   "sha256": _sha256(row_hashes.to_numpy().tobytes())}}
    text = repr(value)
    if re.search(r" at 0x[0-9a-fA-F]+", text):
        warnings.warn(f"{path} ({type(value).__name__}) has a repr with a memory address, which "
                      "changes every run: the stage will be recomputed each time; pass a plain "
                      "value (name, number, path) instead", stacklevel=4)
    return f"<{type(value).__name__}>:{text}"


def params_hash(params: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``params``, credentials left out.

    Stable across processes and independent of key order; see the module docstring for how
    tensors, arrays, DataFrames, paths and other objects are represented.
    """
    if not isinstance(params, dict):
        raise ValueError(f"params={params!r}: expected a dict of parameters")
    canonical = _canonical(params, secret_env_values(), "params", redact=False)
    return _sha256(_canonical_json(canonical).encode("utf-8"))


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


# ----------------------------------------------------------------------------- processes, provenance


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _versions() -> dict[str, str | None]:
    """The versions a stage's result depends on most (see :mod:`interp_lib.versions`)."""
    from .versions import installed_version

    return {name: installed_version(name) for name in ("torch", "transformers", "transformer-lens", "numpy")}


def _library_version() -> str | None:
    package = sys.modules.get(__name__.rpartition(".")[0])
    return getattr(package, "__version__", None)


# ----------------------------------------------------------------------------- signatures

UNTRUSTED_ENV = "INTERP_LIB_UNTRUSTED"


def _entry_fields(name: str, file: Any, digest: Any, size: Any, sha256: Any) -> dict[str, Any]:
    return {"stage": name, "file": file, "params_hash": digest, "bytes": size, "sha256": sha256}


def _entry_signature(name: str, file: str, digest: str, size: int, sha256: str) -> str:
    """HMAC of what identifies a stage's stored result (``interp_lib.signing``)."""
    from .signing import sign_json

    return sign_json(_entry_fields(name, file, digest, size, sha256))


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Memoise named stages of a run under ``root`` so a killed session resumes where it stopped.

    >>> ckpt = Checkpointer("runs/demo")
    >>> scores = ckpt.stage("scores", lambda: expensive(model), params={"model": "gpt2", "n": 100})

    Args:
        root: folder for stage files and ``manifest.json``; created if missing. ``None`` ->
            ``default_root()``. Must be writable: checked here, not at the first save.
        verbose: print one line per stage ("loaded from ..." / "computed in 1.2 s").
        untrusted: what to do with a stage whose signature does not verify (the folder was
            produced elsewhere, or edited): ``"recompute"`` it (the default) or ``"load"`` it,
            marked unverified (its name is added to ``self.unverified``). Default:
            ``$INTERP_LIB_UNTRUSTED``, else ``"recompute"``. See ``interp_lib.signing``.

    Raises:
        ValueError: ``root`` is not a path, or it (or a parent) is an existing regular file.
        PermissionError: ``root`` cannot be created or written.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, verbose: bool = False,
                 untrusted: str | None = None) -> None:
        from .signing import check_untrusted

        self.untrusted = check_untrusted(
            untrusted if untrusted is not None else os.environ.get(UNTRUSTED_ENV) or "recompute",
            "untrusted" if untrusted is not None else f"${UNTRUSTED_ENV}")
        self.unverified: set[str] = set()
        if root is None:
            root = default_root()
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise ValueError(f"root={root!r}: expected a folder path (str or os.PathLike) or None")
        self.root = Path(root).expanduser().resolve()
        self.verbose = bool(verbose)
        self._check_writable()
        self._remove_stale_temps()

    def __repr__(self) -> str:
        return f"Checkpointer(root={str(self.root)!r})"

    # ------------------------------------------------------------------ public API

    @property
    def manifest_path(self) -> Path:
        """``<root>/manifest.json``."""
        return self.root / MANIFEST_NAME

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as stored: ``{"format": 1, "stages": {name: entry}}``.

        Each entry holds ``params`` (secrets redacted), ``params_hash``, ``file``, ``bytes``,
        ``sha256`` (of the file), ``finished_at`` (UTC ISO 8601), ``seconds``, ``library_version``, ``torch_version``,
        ``versions`` (torch, transformers, transformer-lens, numpy).
        Read from disk on every access, so it reflects other processes' finished stages too.
        """
        return copy.deepcopy(self._read_manifest())

    def stage(self, name: str, compute_fn: Callable[[], Any], params: dict[str, Any] | None = None,
              *, force: bool = False) -> Any:
        """The result of stage ``name``: loaded if it finished under the same ``params``, else
        ``compute_fn()`` computed, stored atomically, recorded in the manifest and returned.

        Args:
            name: stage name, letters / digits / ``_.-`` only (it becomes a file name).
            compute_fn: zero-argument callable producing the result: tensors, numpy arrays,
                DataFrames, dataclasses, plain values and containers of them (see
                ``interp_lib.safe_serialize``; anything else is refused with a TypeError).
            params: everything the result depends on (model name, seed, sizes, ...). A stage
                finished under other params is recomputed and replaced, never reused.
            force: recompute even if a finished result exists.
        """
        self._check_name(name)
        if not callable(compute_fn):
            raise ValueError(f"compute_fn={compute_fn!r}: expected a zero-argument callable "
                             f"computing stage {name!r} (e.g. a lambda)")
        params = self._check_params(params)
        digest = params_hash(params)
        entry = self._finished_entry(name, digest)
        if entry is None and self.verbose and self._finished_entry(name, None) is not None:
            self._say(f"stage {name}: params changed, recomputing")
        if entry is not None and not force and not self._trusted(name, entry, load=False):
            entry = None
        if entry is not None and not force:
            path = self.root / entry["file"]
            try:
                result = self._load_file(path, entry)
            except Exception as error:  # altered, truncated, unreadable: recompute
                warnings.warn(f"stage {name!r}: stored file {path} is unreadable "
                              f"({type(error).__name__}: {error}); recomputing", stacklevel=2)
            else:
                self._say(f"stage {name}: loaded from {path}")
                return result

        start = time.perf_counter()
        result = compute_fn()
        seconds = time.perf_counter() - start
        self._refuse_secret_result(name, result)
        data = safe_serialize.dumps(result)
        path = self.root / f"{name}-{digest[:_HASH_IN_FILE]}{STAGE_SUFFIX}"
        # Stage file first, manifest second: until the manifest names the new file, a kill
        # leaves the previous finished state intact (the hash in the file name keeps them apart).
        size = atomic_write(path, lambda handle: handle.write(data))
        manifest = self._read_manifest()
        previous = manifest["stages"].get(name)
        manifest["stages"][name] = {
            "params": _canonical(params, secret_env_values(), "params", redact=True),
            "params_hash": digest,
            "file": path.name,
            "bytes": size,
            "sha256": _sha256(data),
            "signature": _entry_signature(name, path.name, digest, size, _sha256(data)),
            "finished_at": _now_utc(),
            "seconds": round(seconds, 3),
            "library_version": _library_version(),
            "torch_version": torch.__version__,
            "versions": _versions(),
        }
        self._write_manifest(manifest)
        if isinstance(previous, dict) and previous.get("file") not in (None, path.name):
            old = previous["file"]
            # only a plain stage-file name inside root is ever removed: a manifest edited to name
            # "../../victim" or "/etc/x" must not delete files outside the run folder
            if isinstance(old, str) and (_STAGE_FILE_RE.fullmatch(old) or _LEGACY_FILE_RE.fullmatch(old)):
                self._unlink_quietly(self.root / old)
        self._say(f"stage {name}: computed in {seconds:.1f} s, saved to {path}")
        return result

    def has(self, name: str, params: dict[str, Any] | None = None) -> bool:
        """Whether stage ``name`` finished -- under exactly ``params`` when given, under any
        params when ``None``. Checks the manifest and the file's size, without loading it."""
        self._check_name(name)
        digest = None if params is None else params_hash(self._check_params(params))
        return self._finished_entry(name, digest) is not None

    def load(self, name: str, params: dict[str, Any] | None = None) -> Any:
        """The stored result of stage ``name`` (finished under ``params`` when given).

        Raises:
            KeyError: the stage has not finished (under these params).
            RuntimeError: the stored file is unreadable; ``stage(...)`` would recompute it.
        """
        self._check_name(name)
        digest = None if params is None else params_hash(self._check_params(params))
        entry = self._finished_entry(name, digest)
        if entry is None:
            finished = sorted(self._read_manifest()["stages"])
            under = "" if params is None else " under these params"
            raise KeyError(f"stage {name!r} has not finished{under} in {self.root} "
                           f"(finished stages: {finished})")
        if not self._trusted(name, entry, load=True):
            raise RuntimeError(f"stage {name!r} in {self.root} was produced elsewhere: its "
                               "signature does not verify; run the stage again to recompute it "
                               "(or pass untrusted='load')")
        path = self.root / entry["file"]
        try:
            return self._load_file(path, entry)
        except Exception as error:
            raise RuntimeError(f"stage {name!r}: stored file {path} is unreadable "
                               f"({type(error).__name__}: {error}); run the stage again to "
                               "recompute it") from error

    def clear(self, name: str | None = None) -> None:
        """Forget stage ``name`` (its manifest entry and files), or every stage when ``None``.

        Only files this class writes are removed (stage files, temp files, the manifest); other
        files under ``root`` are left alone. Clearing a stage that never finished is a no-op.
        """
        if name is not None:
            self._check_name(name)
            manifest = self._read_manifest()
            entry = manifest["stages"].pop(name, None)
            if entry is not None:
                self._write_manifest(manifest)  # forget first, so a kill cannot leave a dangling entry
            for path in self._stage_files(name):
                self._unlink_quietly(path)
            return
        self._unlink_quietly(self.manifest_path)
        for path in self._stage_files(None):
            self._unlink_quietly(path)
        for path in self._temp_files():
            self._unlink_quietly(path)

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _check_name(name: Any) -> None:
        if (not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.startswith(".")
                or len(name) > _MAX_NAME_LEN):
            raise ValueError(
                f"name={name!r}: expected a non-empty stage name of letters, digits, '_', '.' "
                f"and '-' (no path separators, not starting with '.', at most {_MAX_NAME_LEN} "
                "characters)")

    @staticmethod
    def _check_params(params: Any) -> dict[str, Any]:
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise ValueError(f"params={params!r}: expected a dict of the stage's parameters "
                             "(or None)")
        return params

    def _check_writable(self) -> None:
        root = self.root
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=root, prefix=temp_prefix("write-probe"), suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except (FileExistsError, NotADirectoryError) as error:
            raise ValueError(f"checkpoint root {root} is not a usable folder: a path component is "
                             f"an existing file ({type(error).__name__})") from error
        except OSError as error:  # PermissionError, read-only filesystem, quota, ...
            raise PermissionError(f"checkpoint root {root} is not writable "
                                  f"({type(error).__name__}: {error.strerror or error})") from error

    @staticmethod
    def _refuse_secret_result(name: str, result: Any) -> None:
        if isinstance(result, (str, bytes)):
            text = result.decode("utf-8", "replace") if isinstance(result, bytes) else result
            if text in secret_env_values():
                raise ValueError(f"stage {name!r}: the result equals the value of a credential "
                                 "environment variable (e.g. OPENAI_API_KEY); refusing to store it")

    # ------------------------------------------------------------------ manifest and files

    def _read_manifest(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"format": MANIFEST_FORMAT, "stages": {}}
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return empty
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            # Only outside damage gets here (writes are atomic): start over, stages recompute.
            warnings.warn(f"checkpoint manifest {self.manifest_path} is not valid JSON ({error}); "
                          "treating every stage as unfinished", stacklevel=3)
            return empty
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            warnings.warn(f"checkpoint manifest {self.manifest_path} has no 'stages' table; "
                          "treating every stage as unfinished", stacklevel=3)
            return empty
        return data

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["format"] = MANIFEST_FORMAT
        text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
        atomic_write(self.manifest_path, lambda handle: handle.write(text.encode("utf-8")))

    def _finished_entry(self, name: str, digest: str | None) -> dict[str, Any] | None:
        """The manifest entry of ``name`` if its file is present and whole (and, when ``digest``
        is given, it finished under those params); else None."""
        entry = self._read_manifest()["stages"].get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            return None
        if digest is not None and entry.get("params_hash") != digest:
            return None
        if _LEGACY_FILE_RE.fullmatch(entry["file"]):
            warnings.warn(f"stage {name!r}: stored in the old pickle format ({entry['file']}), "
                          "which is never loaded (unpickling can run code); recomputing",
                          stacklevel=3)
            return None
        if not _STAGE_FILE_RE.fullmatch(entry["file"]):  # never follow a path out of root
            warnings.warn(f"stage {name!r}: the manifest names {entry['file']!r}, not a plain "
                          f"stage file name inside {self.root}; refused, recomputing", stacklevel=3)
            return None
        if not isinstance(entry.get("sha256"), str):
            warnings.warn(f"stage {name!r}: the manifest records no SHA-256 for "
                          f"{entry['file']}; treating it as unfinished", stacklevel=3)
            return None
        try:
            size = (self.root / entry["file"]).stat().st_size
        except OSError:
            return None
        if isinstance(entry.get("bytes"), int) and size != entry["bytes"]:
            warnings.warn(f"stage {name!r}: stored file {self.root / entry['file']} has {size} "
                          f"bytes, the manifest says {entry['bytes']}; treating it as unfinished",
                          stacklevel=3)
            return None
        return entry

    def _trusted(self, name: str, entry: dict[str, Any], load: bool) -> bool:
        """Whether the manifest entry of ``name`` may be used: warns when it is unsigned or its
        signature does not verify (see ``interp_lib.signing`` and ``untrusted``)."""
        from .signing import key_path, verify_json

        signature = entry.get("signature")
        if signature is None:
            warnings.warn(f"stage {name!r} in {self.root} is unsigned (written by an older "
                          "interp_lib, or its signature was removed): loaded as unverified",
                          stacklevel=4)
            self.unverified.add(name)
            return True
        fields = _entry_fields(name, entry.get("file"), entry.get("params_hash"), entry.get("bytes"),
                               entry.get("sha256"))
        if verify_json(fields, signature):
            self.unverified.discard(name)
            return True
        what = ("loaded as unverified (untrusted='load')" if self.untrusted == "load"
                else "refused" if load else "recomputing")
        warnings.warn(f"stage {name!r} in {self.root} was produced elsewhere: its signature does "
                      f"not verify with this user's key ({key_path()}); {what}", stacklevel=4)
        if self.untrusted == "load":
            self.unverified.add(name)
            return True
        return False

    @staticmethod
    def _load_file(path: Path, entry: dict[str, Any]) -> Any:
        """The result stored in ``path``, after checking its size and SHA-256 against the
        manifest ``entry``; never unpickles (a result saved with CUDA tensors loads on CPU in a
        CPU-only session)."""
        data = path.read_bytes()
        if len(data) != entry.get("bytes", len(data)):
            raise ValueError(f"{len(data)} bytes, the manifest says {entry.get('bytes')}")
        digest = _sha256(data)
        if digest != entry.get("sha256"):
            raise ValueError(f"content changed since it was written: SHA-256 {digest[:16]}..., "
                             f"the manifest says {str(entry.get('sha256'))[:16]}...")
        return safe_serialize.loads(data)

    def _stage_files(self, name: str | None) -> Iterator[Path]:
        for path in self.root.iterdir():
            match = _STAGE_FILE_RE.fullmatch(path.name) or _LEGACY_FILE_RE.fullmatch(path.name)
            if match and (name is None or match["name"] == name) and path.is_file():
                yield path

    def _temp_files(self) -> Iterator[Path]:
        for path in self.root.iterdir():
            if _TEMP_RE.fullmatch(path.name) and path.is_file():
                yield path

    def _remove_stale_temps(self) -> None:
        """Delete temp files left by killed writers: same host and the pid is gone, or untouched
        for hours (a Colab VM that died is another host by the time the session resumes)."""
        host = _host()
        now = time.time()
        for path in list(self._temp_files()):
            match = _TEMP_RE.fullmatch(path.name)
            assert match is not None
            try:
                age = now - path.stat().st_mtime
            except OSError:
                continue
            dead_here = (os.name != "nt" and match["host"] == host
                         and not _pid_alive(int(match["pid"])))
            if dead_here or age > _STALE_TEMP_SECONDS:
                self._unlink_quietly(path)

    @staticmethod
    def _unlink_quietly(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def _say(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)


# ----------------------------------------------------------------------------- run folder lock


class RunFolderBusyError(RuntimeError):
    """Another run holds the lock of a run folder (one line: folder, holder, what to do)."""


class RunLock:
    """One writer per run folder: ``<folder>/.lock`` created with ``O_EXCL`` (which works on
    local disks and on Drive, unlike ``flock``), holding the owner's host, pid and start time.

    >>> with RunLock(out, "interp-lib explain"):
    ...     run the stages

    A second ``RunLock`` on the same folder raises ``RunFolderBusyError`` at once, naming the
    holder. A lock left by a process that died on this host is taken over; one left by another
    host (a Colab VM that is gone) must be deleted by hand, as the message says.
    """

    def __init__(self, folder: str | os.PathLike[str], purpose: str = "a run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose
        self._token: str | None = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        token = f"{_host()}-{os.getpid()}-{os.urandom(4).hex()}"
        record = {"host": _host(), "pid": os.getpid(), "purpose": self.purpose,
                  "started": _now_utc(), "token": token}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._is_dead(holder):
                    self._unlink_if(holder.get("token"))
                    continue
                raise RunFolderBusyError(self._busy_message(holder)) from None
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
                handle.flush()
                os.fsync(handle.fileno())
            self._token = token
            return self
        raise RunFolderBusyError(self._busy_message(self._holder()))

    def release(self) -> None:
        if self._token is not None:
            self._unlink_if(self._token)
            self._token = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # being written right now, or unreadable: treat as held
        return data if isinstance(data, dict) else None

    @staticmethod
    def _is_dead(holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        return (os.name != "nt" and holder.get("host") == _host() and isinstance(pid, int)
                and pid != os.getpid() and not _pid_alive(pid))

    def _unlink_if(self, token: Any) -> None:
        holder = self._holder()
        if holder is not None and holder.get("token") == token:
            self._unlink_quietly()

    def _unlink_quietly(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _busy_message(self, holder: dict[str, Any] | None) -> str:
        who = ("another process" if holder is None else
               f"{holder.get('purpose', 'a run')} (pid {holder.get('pid')} on host "
               f"{holder.get('host')}, since {holder.get('started')})")
        return (f"run folder {self.folder} is in use by {who}: wait for it to finish or choose "
                f"another output folder; if that run is dead, delete {self.path}")
