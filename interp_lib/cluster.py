"""Run a sweep's notebooks on a Ray cluster: ``interp-lib run --executor ray [--address ...]``.

Each (notebook, configuration, seed) of the sweep is one Ray task that declares its resources
(``num_cpus``, ``num_gpus``) and calls the same ``interp_lib.runner.execute_task`` the local
executor calls, writing into the run folder, which every worker must reach: a shared directory
(on one machine, any folder) or an fsspec URL such as ``s3://`` / ``gs://`` (see the runner). The driver keeps run.json and the tables, updated as tasks finish,
in the order they finish.

Faults: a task whose worker process dies (killed, out of memory, node lost) is re-run by Ray up
to ``max_retries`` times; the notebook starts again and resumes from its own checkpoints, and
the task's attempts are counted in ``<run>/.attempts/`` (run.json ``attempts``). A notebook's own
exception is a ``failed`` result, never retried. Once the retries are spent, the task is
recorded as failed with Ray's error.

Ray is an optional extra (``pip install 'interp-lib[cluster]'``) and is imported only here, only
when ``--executor ray`` is asked for. An already initialised Ray (``ray.init`` in a notebook or a
test) is used as it is; otherwise the driver joins ``address`` (or ``$RAY_ADDRESS``), or starts a
local cluster, and shuts down what it started.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

RAY_MISSING = ("--executor ray needs Ray, which is not installed: pip install "
               "'interp-lib[cluster]' (ray>=2.60,<3)")


def import_ray() -> Any:
    """The ``ray`` module, or RunInputError with the one line that says how to install it."""
    try:
        import ray
    except ImportError:
        from .runner import RunInputError

        raise RunInputError(RAY_MISSING) from None
    return ray


def _execute_on_worker(task: dict[str, Any], run_dir: str, kernel: str,
                       timeout: int | None) -> dict[str, Any]:
    """The body of one Ray task (runs on a worker)."""
    from .runner import execute_task, kernel_environment

    with kernel_environment():  # kernels import this interp_lib, as with the local executor
        return execute_task(task, run_dir, kernel, timeout, progress=False)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else ""


def run_tasks_on_ray(tasks: Sequence[dict[str, Any]], run_dir: str, *, kernel: str,
                     timeout: int | None, address: str | None, num_cpus: float,
                     num_gpus: float, max_retries: int,
                     on_done: Callable[[int, dict[str, Any]], bool],
                     on_submit: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Submit every task (``NotebookTask`` as a dict) as a Ray task and call
    ``on_done(index, result)`` as each finishes; ``on_done`` returning True cancels the rest.
    Returns what run.json keeps about the cluster (address, nodes, CPUs, GPUs)."""
    ray = import_ray()
    started_here = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, configure_logging=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            from .runner import RunInputError

            where = address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
            raise RunInputError(f"--address {where}: cannot start or join the Ray cluster "
                                f"({type(exc).__name__}: {_first_line(exc)})") from None
        started_here = True
    resources = ray.cluster_resources()
    info = {"address": ray.get_runtime_context().gcs_address, "nodes": len(ray.nodes()),
            "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0),
            "cpus_per_task": num_cpus, "gpus_per_task": num_gpus, "max_retries": max_retries}
    if num_cpus > info["cpus"] or num_gpus > info["gpus"]:
        if started_here:
            ray.shutdown()
        from .runner import RunInputError

        raise RunInputError(f"--cpus-per-task {num_cpus} / --gpus-per-task {num_gpus}: the Ray "
                            f"cluster has {info['cpus']:g} CPUs and {info['gpus']:g} GPUs, so no "
                            "task could ever be scheduled")
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                        retry_exceptions=False)(_execute_on_worker)
    index_of: dict[Any, int] = {}
    try:
        for index, task in enumerate(tasks):
            name = f"{task['notebook']} {task['config'] or ''} seed {task['seed']}".replace("  ", " ")
            ref = remote.options(name=name).remote(task, run_dir, kernel, timeout)
            index_of[ref] = index
            if on_submit is not None:
                on_submit(index)
        pending = list(index_of)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                index = index_of[ref]
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:  # retries spent, cancelled, node lost
                    result = _ray_failure(exc, tasks[index], run_dir)
                if on_done(index, result):
                    for other in pending:
                        ray.cancel(other)
                    pending = []
                    break
    except KeyboardInterrupt:
        for ref in index_of:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()
    return info


def _ray_failure(exc: BaseException, task: dict[str, Any], run_dir: str) -> dict[str, Any]:
    from pathlib import Path

    from .runner import _ATTEMPTS_DIR, _attempts_name, is_url

    count = 0
    folder = Path(run_dir) / _ATTEMPTS_DIR / _attempts_name(task["output"])
    if not is_url(run_dir) and folder.is_dir():
        count = len(list(folder.iterdir()))
    line = f"{type(exc).__name__}: {_first_line(exc)}"
    return {"status": "failed", "error": line, "seconds": 0.0, "metrics": None, "attempt": count,
            "failure": {"type": type(exc).__name__, "message": str(exc)[:2000]}}
