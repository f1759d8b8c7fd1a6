"""Run a sweep's notebooks on a Ray cluster: ``interp-lib run --executor ray [--address ...]``.

Each (notebook, configuration, seed) of the sweep is one Ray task that declares its resources
(``num_cpus``, ``num_gpus``) and calls the same ``interp_lib.tasks.execute_task`` the local
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

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .artifacts import atomic_write_json
from .errors import RunInputError, first_line
from .tasks import attempt_pids, execute_task, kernel_environment

RAY_MISSING = ("--executor ray needs Ray, which is not installed: pip install "
               "'interp-lib[cluster]' (ray>=2.60,<3)")


def import_ray() -> Any:
    """The ``ray`` module, or RunInputError with the one line that says how to install it."""
    try:
        import ray
    except ImportError:
        raise RunInputError(RAY_MISSING) from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """The ``ray`` module, joined to a cluster for the duration: an already initialised Ray as
    it is; otherwise ``address`` (or ``$RAY_ADDRESS``, or a new local cluster), shut down on
    exit. RunInputError (one line) when Ray is missing or the cluster cannot be started or
    joined."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
        raise RunInputError(f"--address {where}: cannot start or join the Ray cluster "
                            f"({type(exc).__name__}: {first_line(exc)})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _as_finished(ray: Any, refs: Sequence[Any]) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """``(ref, result, None)`` for each of ``refs`` in the order they finish, or ``(ref, None,
    error)`` for one whose task failed for Ray's reasons (retries spent, cancelled, node lost)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:
                yield ref, None, exc
            else:
                yield ref, result, None


def _execute_on_worker(task: dict[str, Any], run_dir: str, kernel: str,
                       timeout: int | None) -> dict[str, Any]:
    """The body of one Ray task (runs on a worker)."""
    with kernel_environment():  # kernels import this interp_lib, as with the local executor
        return execute_task(task, run_dir, kernel, timeout, progress=False)


def run_tasks_on_ray(tasks: Sequence[dict[str, Any]], run_dir: str, *, kernel: str,
                     timeout: int | None, address: str | None, num_cpus: float,
                     num_gpus: float, max_retries: int,
                     on_done: Callable[[int, dict[str, Any]], bool],
                     on_submit: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Submit every task (``NotebookTask`` as a dict) as a Ray task and call
    ``on_done(index, result)`` as each finishes; ``on_done`` returning True cancels the rest.
    Returns what run.json keeps about the cluster (address, nodes, CPUs, GPUs)."""
    with ray_session(address) as ray:
        resources = ray.cluster_resources()
        info = {"address": ray.get_runtime_context().gcs_address, "nodes": len(ray.nodes()),
                "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0),
                "cpus_per_task": num_cpus, "gpus_per_task": num_gpus, "max_retries": max_retries}
        if num_cpus > info["cpus"] or num_gpus > info["gpus"]:
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
            finished = set()
            for ref, result, error in _as_finished(ray, list(index_of)):
                finished.add(ref)
                index = index_of[ref]
                if error is not None:
                    result = _ray_failure(error, tasks[index], run_dir)
                if on_done(index, result):
                    for other in index_of:
                        if other not in finished:
                            ray.cancel(other)
                    break
        except KeyboardInterrupt:
            for ref in index_of:
                ray.cancel(ref, force=True)
            raise
    return info


def _ray_failure(exc: BaseException, task: dict[str, Any], run_dir: str) -> dict[str, Any]:
    count = len(attempt_pids(run_dir, task["output"]))
    line = f"{type(exc).__name__}: {first_line(exc)}"
    return {"status": "failed", "error": line, "seconds": 0.0, "metrics": None, "attempt": count,
            "failure": {"type": type(exc).__name__, "message": str(exc)[:2000]}}


# --------------------------------------------------------------------------------------------
# The head explainer, sharded by unit range
# --------------------------------------------------------------------------------------------

def shard_heads(heads: Sequence[tuple[int, int]], shards: int) -> list[list[tuple[int, int]]]:
    """Contiguous ranges of ``heads`` (or any units, in their order, layer-major), as even as
    possible; never an empty shard (fewer shards when there are fewer units)."""
    if shards < 1:
        raise RunInputError(f"--shards: expected a number >= 1, got {shards}")
    heads = list(heads)
    shards = min(shards, len(heads)) or 1
    size, extra = divmod(len(heads), shards)
    ranges, start = [], 0
    for i in range(shards):
        stop = start + size + (1 if i < extra else 0)
        ranges.append(heads[start:stop])
        start = stop
    return ranges


def _explain_shard(config: dict[str, Any], run_dir: str, shard_dir: str,
                   labels: list[str]) -> dict[str, Any]:
    """The body of one shard's Ray task: the pipeline up to the causal check for ``labels``,
    checkpointed in the shard's folder (a rerun resumes it), LLM answers in the run's shared
    cache (``<run>/llm_cache``)."""
    from .explain.config import ExplainConfig
    from .explain.pipeline import load_stage, make_client, run_explainer

    field = "neurons" if config.get("units") == "neurons" else "heads"
    shard_config = ExplainConfig(**{**config, field: ",".join(labels)})
    client = make_client(shard_config, Path(run_dir), progress=False)
    run = run_explainer(shard_config, shard_dir, skip=["taxonomy", "report"], client=client,
                        progress=False)
    try:  # why a scorer did not run (no endpoint, ...), for the merged report
        skipped = dict(load_stage(shard_dir, "score")[1])
    except Exception:  # the score stage did not finish: nothing to say about skipped scorers
        skipped = {}
    return {"records": [r.to_dict() for r in run.records], "usage": run.usage,
            "unfinished": run.unfinished, "retried": run.retried, "skipped_scorers": skipped}


def explain_sharded(config: Any, out: str, *, shards: int, address: str | None = None,
                    cpus_per_task: float = 1.0, gpus_per_task: float = 0.0, max_retries: int = 2,
                    progress: bool = True) -> dict[str, Any]:
    """``interp-lib explain --executor ray``: split the units (heads, or neurons with
    ``units="neurons"``) into ``shards`` contiguous ranges,
    run each range as one Ray task (events, explanations, scores, refinement and the causal
    check on the worker that loads the model; ``<out>/shards/<i>-of-<n>/`` holds its
    checkpoints, so a rerun resumes each shard where it stopped), then merge the records into
    one run in ``out``: records.json, report, viewer and the taxonomy over all heads.

    Returns ``{"records", "unfinished", "retried", "files"}``; ``unfinished`` maps a shard (or
    stage) to why it did not finish -- its records are missing or partial and a rerun retries.
    """
    from .explain.pipeline import make_client, select_units
    from .explain.records import HeadRecord
    from .models import load_model
    from .runtime import resolve_model_name

    import_ray()  # one-line error now, before the model loads, when Ray is not installed
    out_path = Path(out).expanduser().resolve()
    out_path.mkdir(parents=True, exist_ok=True)
    model_name = resolve_model_name(config.model, default="toy-2l")
    model = load_model(model_name)  # the shape and the unit selection (validated here, once)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    ranges = shard_heads(select_units(model, config), shards)
    del model
    labels = [[unit.label for unit in units] for units in ranges]
    config_dict = {**config.to_dict(), "model": model_name}
    records: list = []
    unfinished: dict[str, str] = {}
    retried: list[str] = []
    usage: dict[str, Any] = {}
    skipped_scorers: dict[str, str] = {}
    with ray_session(address) as ray:
        from tqdm.auto import tqdm

        remote = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=max_retries,
                            retry_exceptions=False)(_explain_shard)
        refs = {}
        for i, shard_labels in enumerate(labels):
            shard_dir = out_path / "shards" / f"{i + 1}-of-{len(labels)}"
            name = f"explain {shard_labels[0]}..{shard_labels[-1]}"
            refs[remote.options(name=name).remote(config_dict, str(out_path), str(shard_dir),
                                                  shard_labels)] = i
        bar = tqdm(total=len(refs), desc="explain shards", unit="shard", disable=not progress)
        for ref, result, error in _as_finished(ray, list(refs)):
            i = refs[ref]
            span = f"shard {i + 1}-of-{len(labels)} ({labels[i][0]}..{labels[i][-1]})"
            bar.update()
            if error is not None:
                unfinished[span] = f"{type(error).__name__}: {first_line(error)}"
                continue
            records += [HeadRecord.from_dict(r) for r in result["records"]]
            unfinished.update({f"{span}: {k}": v for k, v in result["unfinished"].items()})
            retried += result["retried"]
            usage[span] = result["usage"]
            skipped_scorers.update(result["skipped_scorers"])
        bar.close()
    records.sort(key=lambda r: (r.layer, r.head))  # layer, then head / neuron index

    # the taxonomy and the report over every shard's heads, as the unsharded run writes them
    llm = make_client(config, out_path, progress=progress)
    tax_meta: Any = None
    try:
        from .explain.taxonomy import build_taxonomy

        tax = build_taxonomy(records, min_cluster_size=config.min_cluster_size,
                             backend=config.embedding, seed=config.seed, progress=progress,
                             client=llm, llm_labels=llm is not None)
        tax.apply_to_records(records)
        tax_meta = {k: v for k, v in tax.to_dict().items() if k in ("config", "metrics")}
    except ValueError as error:  # too few heads to cluster: recorded, as in the unsharded run
        tax_meta = str(error)
    from .explain.report import write_report

    neurons = config.units == "neurons"
    run_config = {**config_dict, "n_layers": n_layers, "n_heads": n_heads, "executor": "ray",
                  "shards": [f"{s[0]}..{s[-1]}" for s in labels]}
    meta = {"config": run_config, "usage": usage, "taxonomy": tax_meta,
            "skipped_scorers": skipped_scorers}
    files = write_report(records, out_path, meta=meta, n_layers=n_layers, n_heads=None if neurons else n_heads)
    atomic_write_json(out_path / "config.json", run_config, indent=1)
    atomic_write_json(out_path / "usage.json", usage, indent=1)
    return {"records": records, "unfinished": unfinished, "retried": retried, "files": files,
            "out": out_path}
