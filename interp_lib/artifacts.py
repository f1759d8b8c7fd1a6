"""The files a run leaves behind, written so that a kill never leaves half of one.

One home for:

* **atomic writes**: ``atomic_write(path, write)`` (a callback given the open binary file),
  ``atomic_write_bytes``, ``atomic_write_text``, ``atomic_write_json``. Each writes a temp file
  ``.<name>.<host>-<pid>.<random>.tmp`` in the target's folder (created if missing), flushes and
  fsyncs it, ``os.replace``-s it over the target (a link there is replaced, never written
  through) and fsyncs the folder, so a reader or a killed
  session sees the old file or the new one, never half of one; the temp name says which process
  wrote it (``interp_lib.checkpoint`` removes those of dead writers). Files get the ordinary mode
  (0666 less the umask).
* **JSON-safe values**: ``jsonable`` (dataclasses, dicts, lists, numpy / torch scalars; NaN and
  infinities as None, so files stay standard JSON).
* **metrics**: ``record_metrics`` -- what a notebook's last cell calls to record its headline
  numbers (``<output_dir>/metrics/<notebook>.json``) -- and ``load_metrics``, which reads them
  back, from one output folder, ``seed-<s>`` folders, or a series run folder configured by its
  run manifest.
* **run manifests**: ``run.json`` of ``interp-lib run`` (``write_run_manifest`` /
  ``read_run_manifest``).
* ``markdown_table``: the tables of summary.md, aggregate.md and the explainer's report.

Cheap to import (standard library only; pandas where a DataFrame is built): every notebook kernel
imports it to record its metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import os
import re
import secrets
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["atomic_write", "check_run_folder", "RunFolderLinkError", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "jsonable",
           "record_metrics", "load_metrics", "read_metrics_file", "write_run_manifest",
           "read_run_manifest", "markdown_table", "METRICS_COLUMNS", "RUN_MANIFEST", "RUNNER_PARAMETERS"]

RUN_MANIFEST = "run.json"
METRICS_COLUMNS = ["model", "params", "seed", "notebook", "metric", "value"]
# Notebook parameters `interp-lib run` sets itself, and the option that sets each.
RUNNER_PARAMETERS = {"seed": "--seeds", "output_dir": "--out", "model_name": "--model"}
# Temp files: ".<target>.<host>-<pid>.<random>.tmp" -> the owner can be recognised after a kill.
TEMP_FILE_RE = re.compile(r"\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.[^.]+\.tmp")
_SEED_DIR = re.compile(r"^seed-(-?\d+)$")


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------

def host_name() -> str:
    """This machine's name as it appears in temp file names (letters, digits and '-')."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def temp_prefix(target: str) -> str:
    """The start of the name of a temp file this process writes for ``target``."""
    return f".{target}.{host_name()}-{os.getpid()}."


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); best effort elsewhere."""
    if os.name == "nt":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. FUSE mounts) do not support fsync on directories
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> int:
    """Write ``path`` through ``write(handle)`` on a temp file in the same folder, then fsync and
    ``os.replace``; returns the size in bytes. The folder is created if missing. On any error
    (KeyboardInterrupt included) the temp file is removed and the old ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f"{temp_prefix(path.name)}{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask: an ordinary file mode
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        os.replace(tmp, path)
    except BaseException:  # never leave the temp file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return size


class RunFolderLinkError(ValueError):
    """An entry of a run folder is a link that resolves outside it (see ``check_run_folder``)."""


def check_run_folder(folder: str | os.PathLike) -> None:
    """Refuse a run folder whose entries resolve outside it: every symlink under ``folder``
    (searched without following links) must point inside ``folder``. A run writes only through
    ``atomic_write`` (a new file in the folder, renamed over the old name: a link is replaced,
    never written through), but papermill, a notebook's kernel or a reader would follow a link
    planted in a folder someone shared; so such a folder is refused before anything runs.

    Raises:
        RunFolderLinkError: one line naming the entry and where it points.
    """
    root = Path(folder)
    if not root.is_dir():
        return
    resolved_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            entry = Path(dirpath) / name
            if not entry.is_symlink():
                continue
            target = entry.resolve()
            if target != resolved_root and resolved_root not in target.parents:
                raise RunFolderLinkError(
                    f"run folder {root}: {entry.relative_to(root)} is a link to {target}, outside "
                    "the folder; a run never writes through links: remove it (or choose another "
                    "output folder)")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> int:
    """``data`` to ``path`` atomically (see ``atomic_write``); returns the size."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> int:
    """``text`` to ``path`` atomically (see ``atomic_write``); returns the size in bytes."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2,
                      sort_keys: bool = False, default: Callable[[Any], Any] | None = None,
                      allow_nan: bool = False) -> int:
    """``value`` as JSON text (plus a final newline) to ``path`` atomically; returns the size.
    Refuses NaN / infinities unless ``allow_nan`` (pass ``jsonable(value)`` to store them as
    null)."""
    text = json.dumps(value, indent=indent, sort_keys=sort_keys, default=default, allow_nan=allow_nan)
    return atomic_write_text(path, text + "\n")


# --------------------------------------------------------------------------------------------
# JSON-safe values
# --------------------------------------------------------------------------------------------

def jsonable(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts: dataclass instances
    as dicts of their fields, dict keys as strings, tuples as lists, numpy / torch scalars as
    Python numbers, NaN and infinities as None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------
# Metrics: record (inside notebooks) and load
# --------------------------------------------------------------------------------------------

def _metric_value(name: str, value: Any) -> float:
    """``value`` as a finite float (Python, numpy or 0-d torch scalars), else ValueError."""
    problem = None
    dtype = str(getattr(value, "dtype", ""))
    if isinstance(value, (bool, str, bytes)) or dtype in ("bool", "torch.bool"):
        problem = f"got {type(value).__name__} {value!r}"
    elif isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        problem = f"got complex {value!r}"
    elif getattr(value, "ndim", 0) != 0:
        problem = f"got an array of shape {tuple(getattr(value, 'shape', ()))}; pass a scalar"
    else:
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            problem = f"got {type(value).__name__} {value!r}"
        else:
            if math.isfinite(number):
                return number
            problem = f"got {number}"
    raise ValueError(f"metrics[{name!r}]: expected a finite real number, {problem}")


def _json_context(key: str, value: Any) -> Any:
    """A JSON-ready copy of one ``record_metrics`` context value, else ValueError naming it."""
    def default(obj: Any) -> Any:
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
            return obj.item()  # numpy / torch scalars
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

    try:
        return json.loads(json.dumps(value, default=default, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"context {key}={value!r}: {exc}") from None


def record_metrics(metrics: Mapping[str, Any], output_dir: str | os.PathLike, notebook: str,
                   **context: Any) -> Path:
    """Record a notebook's headline metrics as ``<output_dir>/metrics/<notebook>.json``.

    The file is ``{"notebook": notebook, "metrics": {name: float}, "peak_rss_mib": float,
    **context}``; ``context`` carries provenance such as ``seed=seed, model=model_name``.
    ``peak_rss_mib`` is this process's peak resident memory so far (``peak_rss_mib()``): called
    as a notebook's last step, the notebook's peak memory, since each notebook runs in a fresh
    kernel. ``interp-lib run`` gathers these files across seeds into ``aggregate.csv`` and shows
    each notebook's peak memory next to its time.

    Args:
        metrics: non-empty mapping of metric name -> finite real number (Python, numpy or 0-d
            torch scalars; converted with ``float``).
        output_dir: the notebook's output folder (the ``output_dir`` parameter once resolved;
            ``"auto"`` is resolved here as ``il.notebook.setup`` would).
        notebook: the notebook's stem, e.g. ``"00_tour"``.
        **context: JSON-serialisable extras stored next to the metrics.

    Returns:
        The path written.

    Raises:
        ValueError: naming the offending key, for an empty mapping, a non-string name or a value
            that is not a finite real number.
    """
    if not isinstance(notebook, str) or not notebook or notebook != Path(notebook).name \
            or notebook.startswith("."):
        raise ValueError(f"notebook={notebook!r}: expected the notebook's stem, e.g. '00_tour'")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics: expected a dict of name -> number, got {type(metrics).__name__}")
    if not metrics:
        raise ValueError("metrics: expected at least one metric, got an empty dict")
    values: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"metrics key {name!r}: expected a non-empty string")
        values[name] = _metric_value(name, value)
    extras = {key: _json_context(key, value) for key, value in context.items()}

    if os.fspath(output_dir) == "auto":
        from .runtime import resolve_output_dir

        output_dir = resolve_output_dir(output_dir, notebook)
    path = Path(output_dir).expanduser() / "metrics" / f"{notebook}.json"
    record = {"notebook": notebook, "metrics": values, "peak_rss_mib": peak_rss_mib(), **extras}
    atomic_write_json(path, record, allow_nan=True)
    return path


def peak_rss_mib() -> float | None:
    """This process's peak resident set size so far, in MiB: ``VmHWM`` from /proc on Linux
    (``getrusage``'s ``ru_maxrss`` there can carry the pre-exec size of the process that
    started it, such as a large runner), else ``ru_maxrss`` (bytes on macOS); None where
    neither exists."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 2**10, 1)  # kB
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def seed_of_dir(folder: Path) -> int | None:
    """The seed a ``seed-<s>`` folder holds, else None."""
    match = _SEED_DIR.match(folder.name)
    return int(match.group(1)) if match else None


def params_text(params: Mapping[str, Any]) -> str:
    """A configuration's parameters as one canonical JSON text (sorted keys): the ``params``
    column, equal for equal configurations whatever run folder they come from."""
    return json.dumps(dict(params), sort_keys=True, default=str)


def read_metrics_file(path: Path) -> dict:
    """A file ``record_metrics`` wrote, as its dict; ValueError naming the file otherwise."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(record.get("metrics"), dict):
            raise TypeError("'metrics' is not an object")
    except RecursionError:  # a hostile file nested 100,000 levels deep
        raise ValueError(f"{path}: not a metrics file written by record_metrics (nested too "
                         "deeply)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a metrics file written by record_metrics ({exc})") from None
    for name, value in record["metrics"].items():  # what record_metrics accepts, nothing else
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
            raise ValueError(f"{path}: metric {name!r} is {shown[:60]}: expected a finite number "
                             "(as record_metrics writes)")
    return record


def _rows_from_run_manifest(root: Path, run: dict) -> list[tuple]:
    """Rows of the notebooks that succeeded in a series run, configuration from run.json."""
    rows = []
    for entry in run.get("runs", []):
        if entry.get("status") != "ok" or not entry.get("metrics"):
            continue
        path = root / entry["metrics"]
        if not path.is_file():
            continue
        record = read_metrics_file(path)
        parameters = entry.get("parameters") or {}
        model = entry.get("model", parameters.get("model_name"))
        if model is None and isinstance(record.get("model"), str):
            model = record["model"]  # the notebook's own default, as it resolved it
        params = entry.get("params")
        if params is None:  # run.json written before grids: the parameters minus the runner's
            params = {k: v for k, v in parameters.items() if k not in RUNNER_PARAMETERS}
        notebook = entry.get("notebook") or record.get("notebook") or path.stem
        rows += [(model, params_text(params), entry.get("seed"), notebook, name, float(value))
                 for name, value in record["metrics"].items()]
    return rows


def load_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every metric recorded under a run folder, as a long DataFrame with its configuration:
    ``model, params`` (canonical JSON of the notebook's ``-p`` parameters), ``seed, notebook,
    metric, value``, in run order, metrics in the order the notebook recorded them.

    A series folder (one with ``run.json``) gives the notebooks that succeeded, configured as
    run.json says. Any other folder is read as ``seed-<s>/metrics/*.json`` or a single output
    folder ``metrics/*.json`` (seed from the folder name or the file's ``seed``, model from the
    file's ``model``, params ``{}``).
    """
    import pandas as pd

    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {root} does not exist")
    rows: list[tuple] = []
    run = read_run_manifest(root)
    if run is not None:
        rows = _rows_from_run_manifest(root, run)
    else:
        folders = [root] if (root / "metrics").is_dir() else []
        seed_dirs = [d for d in root.glob("seed-*") if d.is_dir() and seed_of_dir(d) is not None]
        folders += sorted(seed_dirs, key=seed_of_dir)
        for folder in folders:
            for path in sorted((folder / "metrics").glob("*.json")):
                if path.name.startswith("."):
                    continue
                record = read_metrics_file(path)
                seed = seed_of_dir(folder)
                if seed is None and isinstance(record.get("seed"), int):
                    seed = record["seed"]
                model = record.get("model") if isinstance(record.get("model"), str) else None
                notebook = record.get("notebook") or path.stem
                rows += [(model, "{}", seed, notebook, name, float(value))
                         for name, value in record["metrics"].items()]
    frame = pd.DataFrame(rows, columns=METRICS_COLUMNS)
    frame["model"] = frame["model"].astype(object)
    frame["seed"] = frame["seed"].astype("Int64")
    frame["value"] = frame["value"].astype(float)
    if run is None:
        frame = frame.sort_values(["seed", "notebook"], kind="stable")
    return frame.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Run manifests
# --------------------------------------------------------------------------------------------

def write_run_manifest(run_dir: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write ``<run_dir>/run.json`` atomically (values JSON cannot hold are written as their
    ``str``); returns its path."""
    path = Path(run_dir) / RUN_MANIFEST
    atomic_write_json(path, dict(record), default=str, allow_nan=True)
    return path


def read_run_manifest(run_dir: str | os.PathLike) -> dict | None:
    """``<run_dir>/run.json`` as a dict; None when the folder has none, ValueError naming the
    file when it is not a run manifest."""
    path = Path(run_dir) / RUN_MANIFEST
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(run, dict):
            raise TypeError("not an object")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a run.json written by interp-lib run ({exc})") from None
    return run


# --------------------------------------------------------------------------------------------
# Markdown tables
# --------------------------------------------------------------------------------------------

def markdown_table(frame: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    """A GitHub-flavoured markdown table of ``frame`` (no ``tabulate`` dependency)."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else float_format.format(value)
        if value is None or (not isinstance(value, str) and _is_na(value)):
            return "n/a"
        return str(value).replace("|", "\\|")

    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if frame[c].dtype.kind in "iuf" else "---" for c in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in frame.itertuples(index=False, name=None)]
    return "\n".join(lines) + "\n"


def _is_na(value: Any) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False
