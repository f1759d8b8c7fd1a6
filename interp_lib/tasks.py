"""Execute one notebook task: the body every executor of ``interp-lib run`` calls.

``execute_task`` runs one (notebook, configuration, seed) of a sweep with papermill into the run
folder -- in this process for ``--executor local`` (``interp_lib.runner``), on a Ray worker for
``--executor ray`` (``interp_lib.cluster``) -- and returns what run.json keeps of it. Around it:
the kernels' ``PYTHONPATH`` (``kernel_environment``), attempt markers that count retries after a
dead worker (``<run>/.attempts/``), fsspec URLs as run folders (``is_url``, ``url_filesystem``)
and how a failure is described (``failure_detail``). Both executors import this module; it
imports neither, so they stay free of cycles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import RunInputError, first_line
from .paths import repo_root

__all__ = ["DEFAULT_KERNEL", "execute_task", "kernel_environment", "failure_detail", "is_url",
           "url_filesystem", "attempt_pids", "ATTEMPTS_DIR"]

DEFAULT_KERNEL = "python3"
ATTEMPTS_DIR = ".attempts"
_ATTEMPTS_DIR = ATTEMPTS_DIR  # the runner's old private name


@contextlib.contextmanager
def kernel_environment() -> Iterator[None]:
    """Put the source checkout (if any) first on PYTHONPATH for the kernels papermill starts
    (they inherit ``os.environ``), so notebooks import this very interp_lib; restored after."""
    root = repo_root()
    saved = os.environ.get("PYTHONPATH")
    if root is not None:
        parts = [p for p in (saved or "").split(os.pathsep) if p]
        if str(root) not in parts:
            os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *parts])
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved



def _describe_failure(exc: BaseException) -> str:
    ename = getattr(exc, "ename", None)  # PapermillExecutionError: the notebook's own exception
    if ename:
        return f"{ename}: {first_line(getattr(exc, 'evalue', ''))}".rstrip(": ")
    return f"{type(exc).__name__}: {first_line(exc)}".rstrip(": ")


def _capped(text: Any, limit: int = 2000) -> str:
    text = str(text or "")
    return text if len(text) <= limit else text[:limit - 15] + " ...[truncated]"


def failure_detail(exc: BaseException) -> dict[str, Any]:
    """What run.json keeps of a failed notebook: the exception's type and whole message and,
    when the notebook itself raised, the failing cell (index as papermill counts it -- the
    runner replaces it with the index in the notebook as written --, execution count, source)."""
    ename = getattr(exc, "ename", None)
    detail: dict[str, Any] = {
        "type": ename or type(exc).__name__,
        "message": _capped(getattr(exc, "evalue", None) if ename else str(exc)),
    }
    if getattr(exc, "cell_index", None) is not None:
        detail.update(cell_index=exc.cell_index, execution_count=getattr(exc, "exec_count", None),
                      cell_source=_capped(getattr(exc, "source", "")))
    return detail


def _source_cell_index(path: Path, source: str) -> int | None:
    """The index of the failing cell in the notebook as written (papermill's index counts the
    cells it injects), found by its source; None when it cannot be told."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError, AttributeError):
        return None
    texts = ["".join(c.get("source", "")) if isinstance(c.get("source"), list) else c.get("source", "")
             for c in cells]
    return texts.index(source) if texts.count(source) == 1 else None




def is_url(out: str | os.PathLike) -> bool:
    """Whether ``out`` is an fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://``...)."""
    return isinstance(out, str) and bool(_URL_RE.match(out))


_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def url_filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) for ``url``; RunInputError naming the package to install when
    its filesystem is not available."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise RunInputError(f"--out {url}: its filesystem is not installed "
                            f"({first_line(exc)})") from None
    except (ValueError, OSError) as exc:
        raise RunInputError(f"--out {url}: {type(exc).__name__}: {first_line(exc)}") from None
    return fs, path


def _attempts_name(output: str) -> str:
    """``<config>/seed-<s>/<stem>``: the attempts folder of the task writing ``output``."""
    return output[:-len(".ipynb")] if output.endswith(".ipynb") else output


def _attempt_marker(run_dir: str, task: dict[str, Any]) -> int:
    """Leave one marker file per attempt of ``task`` under ``<run>/.attempts/<output>/`` (a
    retry after a dead worker adds one) and return how many there are: plain files, so it
    works on a shared folder and on an object store alike."""
    name = f"{time.time_ns()}-{os.getpid()}-{secrets.token_hex(3)}"
    if is_url(run_dir):
        fs, root = url_filesystem(run_dir)
        folder = f"{root.rstrip('/')}/{ATTEMPTS_DIR}/{_attempts_name(task['output'])}"
        fs.makedirs(folder, exist_ok=True)
        fs.pipe_file(f"{folder}/{name}", b"")
        return len(fs.ls(folder, detail=False))
    folder = Path(run_dir) / ATTEMPTS_DIR / _attempts_name(task["output"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).touch()
    return len(list(folder.iterdir()))


def attempt_pids(run_dir: str | os.PathLike, output: str) -> list[int]:
    """The process ids of the attempts of the task writing ``output`` into the run folder
    ``run_dir``, in order (from the attempt markers); [] for an fsspec URL."""
    folder = Path(run_dir) / ATTEMPTS_DIR / _attempts_name(output)
    names = sorted(p.name for p in folder.iterdir()) if not is_url(run_dir) and folder.is_dir() else []
    return [int(name.split("-")[1]) for name in names]


def execute_task(task: dict[str, Any], run_dir: str, kernel: str = DEFAULT_KERNEL,
                 timeout: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Execute one ``NotebookTask`` (as a dict) into the run folder ``run_dir`` (a path, or an
    fsspec URL): the same call for every executor, in this process or on a Ray worker. Leaves
    an attempt marker first (so a retry after a dead worker is counted), removes a stale
    metrics file, runs papermill. With a URL the notebook runs in a local scratch folder whose
    contents are uploaded afterwards (there, its checkpoints do not outlive a dead worker).
    Returns ``{"status", "error", "failure", "seconds", "metrics", "attempt",
    "metrics_record"}``; a notebook's exception is a ``failed`` result, never raised."""
    import shutil

    attempt = _attempt_marker(run_dir, task)
    scratch = tempfile.mkdtemp(prefix="interp-lib-task-") if is_url(run_dir) else None
    out = Path(scratch or run_dir)
    folder = out / Path(task["output"]).parent
    parameters = dict(task["parameters"])
    if scratch is not None:
        parameters["output_dir"] = str(folder)
    metrics_file = folder / "metrics" / f"{task['notebook']}.json"
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.unlink(missing_ok=True)  # a stale file from an earlier run or attempt
    bar: bool | dict = ({"desc": f"  {task['notebook']}", "leave": False, "position": 1}
                        if progress else False)
    started = time.perf_counter()
    status, error, failure = "ok", None, None
    target = out / task["output"]
    if target.is_symlink():  # papermill writes through a link: start from a new file instead
        target.unlink()
    try:
        import papermill

        papermill.execute_notebook(
            task["path"], str(target), parameters=parameters,
            kernel_name=kernel, cwd=str(Path(task["path"]).parent), progress_bar=bar,
            execution_timeout=timeout, log_output=False)
    except Exception as exc:  # the notebook's error, a dead kernel, a timeout: all recorded
        status, error, failure = "failed", _describe_failure(exc), failure_detail(exc)
        if "cell_source" in failure:
            failure["cell_index"] = _source_cell_index(Path(task["path"]), failure["cell_source"])
    record = None
    if metrics_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(metrics_file.read_text(encoding="utf-8"))
    result = {"status": status, "error": error, "failure": failure,
              "seconds": round(time.perf_counter() - started, 2),
              "metrics": str(metrics_file.relative_to(out)) if metrics_file.is_file() else None,
              "attempt": attempt, "metrics_record": record}
    if scratch is not None:
        try:
            fs, root = url_filesystem(run_dir)
            remote = f"{root.rstrip('/')}/{Path(task['output']).parent.as_posix()}"
            fs.makedirs(remote, exist_ok=True)
            fs.put(str(folder) + "/", remote + "/", recursive=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return result

