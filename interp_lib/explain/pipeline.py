"""The explainer pipeline: sample -> events -> heuristic -> explain -> score -> refine ->
causal -> taxonomy -> report, each stage checkpointed, skippable and resumable.

One pipeline for every kind of unit: ``ExplainConfig.units="heads"`` explains attention heads
(``heads`` selects them), ``units="neurons"`` MLP neurons (``neurons`` / ``neuron_budget``; see
:func:`select_neurons`). Each stage is a function of :mod:`interp_lib.explain.stages` from typed
inputs to a typed result (keyed by unit label); :func:`run_explainer` composes them.

``ExplainConfig`` (one documented field per option) drives both ``interp-lib explain`` and the
saved run configuration. A run folder holds::

    <out>/config.json       the configuration (no API key, ever), embedding backend, versions
    <out>/checkpoints/      one file per finished stage (interp_lib.checkpoint.Checkpointer)
    <out>/llm_cache/        answered LLM requests: a rerun or a resumed run sends none twice
    <out>/records.json      one record per unit (interp_lib.explain.records.UnitRecord)
    <out>/report.md         per-unit explanations, scores, top events, best and worst units
    <out>/scores.html       layer x unit score heatmap
    <out>/viewer.html       the self-contained viewer with 1-5 ratings
    <out>/usage.json        LLM calls, tokens and dollars
    <out>/unfinished.json   only after a run whose LLM requests failed: the stages left
                            unfinished and the heads not explained (the next run retries them)
    <out>/.lock             while a run writes the folder (a second run stops with an error)

Failures are never stored as results: an LLM stage in which a request got no answer (timeouts
after retries, 5xx, ...; not the spending cap, and not an answer that came back truncated or
unparseable, which is the endpoint's answer) is returned for the report but not
checkpointed, so the next run recomputes it -- the request cache answers what succeeded and
only the failed requests are sent again. An endpoint that is unusable (refused connections,
401 / 403, answers that are not JSON) raises ``EndpointError`` from the client's circuit
breaker and the run stops there, with nothing of that stage saved.

With no LLM endpoint (``explainer`` unset) the heuristic explainer names every head and the
LLM scorers are skipped with that reason recorded; the contrastive scorer and the causal
check still run, so the whole pipeline works offline on the bundled models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from jaxtyping import Int
from torch import Tensor

from ..artifacts import atomic_write_text
from .client import public_url  # re-exported: it used to live here
from .records import HeadRecord, RefinementStep, ScoreResult

from .config import LLM_SCORERS, STAGES, ExplainConfig


# ---------------------------------------------------------------- heads and splits

def select_heads(model, heads: str | Sequence = "all") -> list[tuple[int, int]]:
    """``"all"``, labels (``"L0H1,L1H0"``) or pairs -> the model's (layer, head) pairs."""
    from .events import parse_heads

    return parse_heads(heads, model.cfg.n_layers, model.cfg.n_heads)


def select_neurons(model, neurons: str | Sequence = "auto", *, budget: int = 64, seed: int = 0) -> list:
    """``"auto"`` (a seeded random sample of ``budget`` neurons, spread as evenly as possible
    over the layers), ``"all"``, labels (``"L0N5,L1N17"``) or pairs -> the model's ``Neuron`` s."""
    from ..units import Neuron, parse_units, unit_count

    n_layers, d_mlp = unit_count(model, "neuron")
    if isinstance(neurons, str) and neurons.strip().lower() == "auto":
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"neuron_budget={budget!r}: expected a positive integer")
        chosen = []
        for layer in range(n_layers):
            count = min(d_mlp, budget // n_layers + (layer < budget % n_layers))
            rng = np.random.default_rng([int(seed), layer])
            chosen += [Neuron(layer, int(i)) for i in sorted(rng.choice(d_mlp, size=count, replace=False))]
        return chosen
    return parse_units(neurons, n_layers, d_mlp, "neuron", name="neurons")


def select_units(model, config: ExplainConfig) -> list:
    """The units a run explains (validated against the model): ``config.heads`` for
    ``units="heads"``, ``config.neurons`` (:func:`select_neurons`) for ``units="neurons"``."""
    if config.units == "neurons":
        return select_neurons(model, config.neurons, budget=config.neuron_budget, seed=config.seed)
    return select_heads(model, config.heads)


# ---------------------------------------------------------------- causal check

def causal_effects(model, windows: Int[Tensor, "window pos"], events_by_head: Mapping[Any, Sequence],
                   *, method: str = "zero", batch_size: int = 16, progress: bool = True, seed: int = 0
                   ) -> dict[Any, dict[str, float]]:
    """Ablate each unit (head or neuron) alone and measure the change in next-token loss at its
    events: :func:`interp_lib.patching.unit_ablation_effects`, the one intervention engine (a
    head is ablated in ``blocks.L.attn.hook_z[:, :, head]``, a neuron in
    ``blocks.L.mlp.hook_post[..., i]``; ``mean`` is the per-position mean over the windows; ``resample`` takes another window's
    activation at the same position, the windows shifted with ``seed``).

    For every unit, ``events_by_head[unit]`` (Events: window, position, kind) gives the query
    positions; the effect is the mean of (ablated - clean) loss of predicting the token after
    each query position, over its ``top`` events and, as a baseline, over its ``random`` events.
    An explanation that scores well on a unit with no effect explains something the model
    does not use. Keys are units (``Head`` / ``Neuron``; a plain ``(layer, head)`` pair is a head).

    Returns ``{unit: {"top": mean delta, "random": mean delta, "n_top": ..., "n_random": ...}}``.
    """
    from ..patching import unit_ablation_effects

    return unit_ablation_effects(model, windows, events_by_head, method=method, batch_size=batch_size,
                                 progress=progress, seed=seed)


# ---------------------------------------------------------------- the run

@dataclass
class ExplainRun:
    """What ``run_explainer`` returns: the records, the output folder and the LLM usage.

    ``unfinished``: stage -> "N failed LLM requests (last: reason)" for the stages that were not
    saved as finished (a rerun retries them); ``retried``: heads a previous run left unexplained
    because of failed requests, which this run tried again."""

    records: list[HeadRecord]
    out: Path
    config: ExplainConfig
    stages_run: list[str]
    usage: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    unfinished: dict[str, str] = field(default_factory=dict)
    retried: list[str] = field(default_factory=list)


class _FailedRequests(Exception):
    """Raised inside a stage's compute so the Checkpointer does not save it; carries the result."""

    def __init__(self, result: Any, message: str):
        super().__init__(message)
        self.result = result


UNFINISHED_NAME = "unfinished.json"
# stages whose result depends on the explanations: never saved while explaining is unfinished
_BUILDS_ON_EXPLANATIONS = ("score", "refine", "taxonomy")


def _check_stage_names(names: Sequence[str] | None, argument: str) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        names = [s for s in names.replace(" ", ",").split(",") if s]
    bad = [n for n in names if n not in STAGES]
    if bad:
        raise ValueError(f"{argument}={list(names)!r}: unknown stage(s) {bad}; valid: {list(STAGES)}")
    return list(names)


def make_client(config: ExplainConfig, out: Path, model_name: str | None = None, *, progress: bool = True,
                batch: bool = False):
    """An LLMClient for the run (cache under ``out/llm_cache``), or None without an explainer;
    ``batch``: through OpenAI's Batch API."""
    if not config.uses_llm:
        return None
    from .client import LLMClient

    prices = None
    if config.prices:
        path = Path(config.prices).expanduser()
        try:
            prices = {str(k): tuple(float(x) for x in v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"prices={config.prices!r}: expected a readable JSON file "
                             f"{{model: [USD per 1M prompt tokens, USD per 1M completion tokens]}} ({error})") from None
    return LLMClient(model_name or config.explainer, base_url=config.base_url_with_credentials,
                     concurrency=config.concurrency, max_retries=config.max_retries,
                     timeout=config.timeout, cache_dir=out / "llm_cache",
                     max_cost_usd=config.max_cost_usd, dry_run=config.dry_run, progress=progress, prices=prices,
                     seed=config.seed, batch=batch, batch_timeout=config.batch_timeout)


# Seconds one LLM request takes, for the dry run's wall-time estimate only (an assumption: a
# chat completion of a few hundred tokens from a hosted endpoint); the real run measures nothing
# against it.
DRY_RUN_SECONDS_PER_REQUEST = 2.0


def _say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


def run_explainer(config: ExplainConfig, out: str | Path, *, stages: Sequence[str] | None = None,
                  skip: Sequence[str] | None = None, model=None, client=None, simulator_client=None,
                  progress: bool = True) -> ExplainRun:
    """Run the pipeline into ``out``; finished stages are loaded, not recomputed.

    Args:
        stages: run only these stages (their inputs are loaded from earlier runs in ``out`` or
            computed); default all. skip: stages not to run (their outputs are left out).
        model: an already loaded model (else ``il.load_model(config.model)``).
        client / simulator_client: LLMClients to use instead of building them from the config.
    """
    from .. import checkpoint as ckpt_module

    if not isinstance(config, ExplainConfig):
        raise TypeError(f"config: expected an ExplainConfig, got {type(config).__name__}")
    selected = _check_stage_names(stages, "stages") or list(STAGES)
    skipped = set(_check_stage_names(skip, "skip"))
    wanted = [s for s in STAGES if s in selected and s not in skipped]
    out = Path(out).expanduser().resolve()
    blocking = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"out={str(out)!r}: expected a folder path, but {blocking} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"out={str(out)!r}: cannot create the run folder "
                         f"({error.strerror or error})") from None
    from ..artifacts import check_run_folder

    check_run_folder(out)  # a link planted in a shared folder is refused, never written through
    # one writer per run folder: a second run would replace this one's stage files
    with ckpt_module.RunLock(out, "interp-lib explain"):
        return _run_locked(config, out, wanted, skipped, model, client, simulator_client, progress)


class _StageRunner:
    """Runs / loads the checkpointed stages of one run (the same Checkpointer mechanism and params
    as before typed stages, so earlier run folders keep resuming).

    A stage in ``wanted`` is run or loaded; one not wanted is loaded if it finished, computed
    when a later stage needs its output (``needed``), else left out (None). An LLM request that
    failed during a stage, or a stage that builds on the explanations of an unfinished stage,
    keeps it from being saved as finished: its result is returned for the report, and a rerun
    retries it (the request cache answers what succeeded)."""

    def __init__(self, ckpt, base: dict, wanted: Sequence[str], skipped: set[str]):
        self.ckpt, self.base, self.wanted, self.skipped = ckpt, base, list(wanted), set(skipped)
        self.ran: list[str] = []
        self.unfinished: dict[str, str] = {}
        self.clients: list = []  # the LLM clients of the run, once built (failed requests are counted)

    def failed_requests(self) -> int:
        return sum(getattr(c.usage, "failed_requests", 0) for c in {id(c): c for c in self.clients}.values())

    def _guarded(self, name: str, compute: Callable[[], Any]) -> Callable[[], Any]:
        def run():
            before = self.failed_requests()
            upstream = [s for s in self.unfinished if name in _BUILDS_ON_EXPLANATIONS]
            result = compute()
            failed = self.failed_requests() - before
            if upstream and not failed:
                raise _FailedRequests(result, f"it builds on unfinished stage(s) {', '.join(upstream)}")
            if failed:
                last = next((c.last_failure for c in self.clients if getattr(c, "last_failure", None)), None)
                raise _FailedRequests(result, f"{failed} failed LLM request{'s' if failed > 1 else ''}"
                                      + (f" (last: {last})" if last else ""))
            return result
        return run

    def _saved(self, name: str, compute: Callable[[], Any], full: dict):
        try:
            return self.ckpt.stage(name, self._guarded(name, compute), full)
        except _FailedRequests as failure:
            self.unfinished[name] = str(failure)
            _say(f"[{name}] not saved as finished: {failure}; a rerun retries it")
            return failure.result

    def __call__(self, name: str, compute: Callable[[], Any], params: dict, needed: bool = True,
                 coerce: Callable[[Any], Any] | None = None):
        full = {**self.base, **params}
        if name in self.wanted:
            _say(f"[{name}] " + ("loaded" if self.ckpt.has(name, full) else "running"))
            self.ran.append(name)
            result = self._saved(name, compute, full)
        elif name in self.skipped and not needed:
            result = None
        elif self.ckpt.has(name, full):
            result = self._saved(name, compute, full)  # loads it (recomputes a damaged file)
        elif needed:
            _say(f"[{name}] not finished yet; computing it for the stages after it")
            result = self._saved(name, compute, full)
        else:
            result = None
        return coerce(result) if coerce is not None and result is not None else result


def _load_model(config: ExplainConfig, model):
    from ..models import load_model
    from ..runtime import resolve_model_name

    model_name = resolve_model_name(config.model, default="toy-2l")
    if model is None:
        model = load_model(model_name)
    else:
        model_name = getattr(model.cfg, "model_name", model_name) if config.model == "auto" else model_name
    model.eval()
    return model, model_name


def _sim_client(config: ExplainConfig, out: Path, llm, simulator_client, progress: bool):
    if simulator_client is not None or llm is None:
        return simulator_client
    if (not config.simulator or config.simulator == config.explainer) and not config.batch_api:
        return llm
    # its own client: another model, or the same model through the Batch API (scoring only)
    return make_client(config, out, config.simulator or config.explainer, progress=progress, batch=config.batch_api)


def _run_locked(config: ExplainConfig, out: Path, wanted: list[str], skipped: set[str], model,
                client, simulator_client, progress: bool) -> ExplainRun:
    from .. import checkpoint as ckpt_module
    from . import stages as S

    previous = _read_unfinished(out)
    model, model_name = _load_model(config, model)
    units = select_units(model, config)  # validated before anything is written
    if not units:
        raise ValueError(f"{config.units}: no units selected (neuron_budget={config.neuron_budget})")
    run_config = {**config.to_dict(), "base_url": public_url(config.base_url), "model_resolved": model_name,
                  "n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    stage = _StageRunner(ckpt_module.Checkpointer(out / "checkpoints"),
                         {"model": model_name, "seed": config.seed}, wanted, skipped)
    p = _stage_params(config, units)

    windows = stage("sample", lambda: S.sample_stage(model, config), p["sample"])
    event_set = stage("events", lambda: S.events_stage(model, windows, units, config, progress=progress),
                      p["events"])
    heuristic = stage("heuristic", lambda: S.heuristic_stage(model, windows, units, config, event_set,
                                                             progress=progress),
                      p["heuristic"], coerce=S.HeuristicResult.coerce)
    splits = S.split_stage(event_set, units, config)

    llm = client if client is not None else make_client(config, out, progress=progress)
    sim_client = _sim_client(config, out, llm, simulator_client, progress)
    stage.clients += [c for c in (llm, sim_client) if c is not None]
    p.update(_llm_params(config, p, llm, sim_client))
    if config.dry_run:
        if llm is None:
            raise ValueError("dry_run=True needs an explainer (an LLM): the heuristic run sends nothing")
        return _dry_run(config, out, llm, sim_client, units, heuristic, splits, wanted)

    explanations = stage("explain", lambda: S.explain_stage(units, heuristic, splits, llm), p["explain"],
                         coerce=S.Explanations.coerce)
    scores = stage("score", lambda: S.score_stage(model, units, explanations, heuristic, splits, config,
                                                  sim_client=sim_client, with_baseline=llm is not None),
                   p["score"], needed=False, coerce=S.Scores.coerce) or S.Scores()
    refinement = stage("refine", lambda: S.refine_stage(units, explanations, splits, config, llm=llm,
                                                        sim_client=sim_client),
                       p["refine"], needed=False, coerce=S.Refinement.coerce) or S.Refinement()
    causal = stage("causal", lambda: S.causal_stage(model, windows, event_set, units, config, progress=progress),
                   p["causal"], needed=False, coerce=S.CausalEffects.coerce) or S.CausalEffects()
    records = assemble_records(units, explanations, heuristic, scores, refinement, causal, event_set)
    taxonomy = stage("taxonomy", lambda: S.taxonomy_stage(records, config, llm=llm, progress=progress),
                     _taxonomy_params(config, records, llm), needed=False,
                     coerce=S.TaxonomyResult.coerce) or S.TaxonomyResult()
    return _finish(config, out, model, records, taxonomy, scores, run_config, stage, previous, llm, sim_client)


def _stage_params(config: ExplainConfig, units: Sequence) -> dict[str, dict]:
    """Each stage's checkpoint params (without the LLM's, added once the clients exist). A head
    run's params are those of runs saved before typed stages, so those keep resuming; a neuron
    run's events depend on the neurons chosen (not on the salience, which is for heads), and
    its heuristic on its events."""
    sample = config.params("dataset", "windows", "window_len")
    if config.units == "neurons":
        events = {**sample, "units": "neurons", "neurons": [u.label for u in units],
                  **config.params("top_k", "n_random", "n_quantile")}
        heuristic = events
    else:
        events = {**sample, **config.params("heads", "top_k", "n_random", "n_quantile", "salience")}
        heuristic = sample
    return {"sample": sample, "events": events, "heuristic": heuristic,
            "causal": {**events, **config.params("causal_method")}}


def _llm_params(config: ExplainConfig, p: dict, llm, sim_client) -> dict[str, dict]:
    # The LLM a stage talks to is part of its params (from the client actually used); without
    # one they are left out, so changing LLM-only options never recomputes a heuristic run.
    # max_cost_usd is a param: raising the cap recomputes the LLM stages and the request cache
    # answers everything already paid for, so only what the cap stopped is sent.
    llm_params = {} if llm is None else {
        "explainer": llm.model, "base_url": public_url(getattr(llm, "base_url", None)),
        "max_cost_usd": config.max_cost_usd}
    explain = {**p["events"], **config.params("holdout_fraction"), **llm_params}
    score = {**explain, **config.params("scorers"),
             **({"simulator": sim_client.model} if sim_client is not None else {})}
    return {"explain": explain, "score": score, "refine": {**score, **config.params("refine_rounds")}}


def _taxonomy_params(config: ExplainConfig, records: Sequence[HeadRecord], llm) -> dict:
    # keyed on what is clustered (texts and scores actually assembled), so a run that skipped or
    # had not yet finished scoring / refining never reuses families of other texts
    digest = hashlib.sha256(json.dumps([(r.label, r.explanation.text if r.explanation else None,
                                         r.best_score()) for r in records]).encode()).hexdigest()
    return {**config.params("min_cluster_size", "embedding"), "records": digest,
            **({"labeller": llm.model} if llm is not None else {})}


def _finish(config, out: Path, model, records, taxonomy, scores, run_config, stage: _StageRunner,
            previous: dict, llm, sim_client) -> ExplainRun:
    """Apply the taxonomy, write the report, usage and unfinished files; the run's result."""
    if taxonomy.taxonomy is not None:
        from .taxonomy import Taxonomy

        Taxonomy.from_dict(taxonomy.taxonomy).apply_to_records(records)
        run_config["taxonomy"] = taxonomy.taxonomy.get("config", {})  # the embedding actually used
    usage = _usage(llm, sim_client)
    meta = {"config": run_config, "usage": usage, "skipped_scorers": scores.skipped,
            "taxonomy": {k: v for k, v in (taxonomy.taxonomy or {}).items()
                         if k in ("config", "metrics")} or taxonomy.error}
    files: dict[str, Path] = {}
    if "report" in stage.wanted:
        from .report import write_report

        stage.ran.append("report")
        files = write_report(records, out, meta=meta, n_layers=model.cfg.n_layers,
                             n_heads=model.cfg.n_heads if config.units == "heads" else None)
        # written with the records it describes (a partial or refused run leaves both alone)
        atomic_write_text(out / "config.json", json.dumps(run_config, indent=1))
        files["config"] = out / "config.json"
        _say(f"[report] {', '.join(str(p.relative_to(out)) for p in files.values())} in {out}")
    if usage:
        atomic_write_text(out / "usage.json", json.dumps(usage, indent=1))
        _say(f"LLM usage: {usage.get('summary', '')}")
    retried = [label for label in previous.get("heads", []) if label in {r.label for r in records}]
    _write_unfinished(out, stage.unfinished, [r.label for r in records if r.explanation is None])
    return ExplainRun(records, out, config, stage.ran, usage=usage, files=files, unfinished=stage.unfinished,
                      retried=retried)


def _read_unfinished(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / UNFINISHED_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("heads", []), list) else {}


def _write_unfinished(out: Path, unfinished: dict[str, str], unexplained: list[str]) -> None:
    path = out / UNFINISHED_NAME
    if unfinished:
        atomic_write_text(path, json.dumps({"stages": unfinished, "heads": unexplained}, indent=1))
    else:
        path.unlink(missing_ok=True)


def _usage(*clients) -> dict[str, Any]:
    usage: dict[str, Any] = {}
    for client in clients:
        if client is None or client is clients[0] and usage:
            continue
        stats = client.usage
        entry = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(vars(stats))
        entry["summary"] = stats.summary() if hasattr(stats, "summary") else ""
        entry["stopped_reason"] = getattr(client, "stopped_reason", None)
        usage[getattr(client, "model", "llm")] = entry
    if usage:
        usage["summary"] = "; ".join(f"{name}: {entry['summary']}" for name, entry in usage.items())
    return usage


def _stats_by_unit(stats) -> dict[str, dict[str, float]]:
    """Numeric statistics per unit label from a heuristic statistics frame (heads: columns
    ``layer``, ``head``; the unit schema: ``unit``, ``layer``, ``index``, ``kind``)."""
    out: dict[str, dict[str, float]] = {}
    if stats is None or not len(stats):
        return out
    from .stages import unit_key

    for row in stats.to_dict("records"):
        key = str(row["unit"]) if "unit" in row else unit_key((int(row["layer"]), int(row["head"])))
        out[key] = {k: float(v) for k, v in row.items()
                    if k not in ("layer", "head", "label", "unit", "index", "kind")
                    and isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)}
    return out


def assemble_records(units, explanations, heuristic, scores, refinement, causal, event_set) -> list[HeadRecord]:
    """One record per unit from the typed stage results (:mod:`interp_lib.explain.stages`; any
    of scores / refinement / causal may be empty)."""
    from .stages import unit_key

    stats = _stats_by_unit(heuristic.stats if heuristic is not None else None)
    records = []
    for unit in units:
        key = unit_key(unit)
        explanation, failure = explanations.get(unit), explanations.failure(unit)
        steps: list[RefinementStep] = refinement.get(unit)
        kept = [s for s in steps if s.kept]
        if kept:
            explanation = kept[-1].explanation
        unit_scores: dict[str, ScoreResult] = scores.get(unit)
        if kept and kept[-1].score is not None:
            # the refined explanation's held-out score replaces the first explanation's
            unit_scores["refined"] = ScoreResult("refined", kept[-1].score, details={
                "round": kept[-1].round, "first_score": steps[0].previous_score, "scorer": refinement.scorer})
        effect = causal.get(unit)
        records.append(HeadRecord(
            layer=unit[0], head=unit[1], explanation=explanation, failure=failure,
            heuristic=heuristic.get(unit) if heuristic is not None else None, scores=unit_scores,
            refinement=steps, causal_effect=effect.get("top"),
            top_events=list(event_set.top.get(unit, []))[:20] if event_set is not None else [],
            stats={**stats.get(key, {}), **({"causal_random": effect["random"]} if "random" in effect else {})},
            unit_kind=getattr(unit, "kind", "head")))
    return records


def load_stage(out: str | Path, name: str) -> Any:
    """The stored result of a finished stage of the run in ``out`` (e.g. ``"events"``), typed
    (:mod:`interp_lib.explain.stages`; runs saved before typed stages are read too)."""
    from ..checkpoint import Checkpointer
    from . import stages as S

    _check_stage_names([name], "name")
    saved = Checkpointer(Path(out) / "checkpoints").load(name)
    coerce = {"heuristic": S.HeuristicResult, "explain": S.Explanations, "score": S.Scores,
              "refine": S.Refinement, "causal": S.CausalEffects, "taxonomy": S.TaxonomyResult}.get(name)
    return coerce.coerce(saved) if coerce is not None else saved


def _dry_run(config, out, llm, sim_client, heads, heuristic, splits, wanted: Sequence[str] | None = None
             ) -> ExplainRun:
    """Count every LLM request of the run and estimate its cost; send nothing, store nothing.

    Counted stage by stage, as the real run sends them (``wanted``: the stages the run would
    run; default all):

    * explain: the real requests (one per head whose answer is not cached).
    * score: each LLM scorer's requests on every head's held-out events for the heuristic
      baseline (the real requests) and for the LLM's explanation, built with a stand-in (the
      heuristic text marked with the head's label): a scorer's request count depends on the
      events, not on the text (simulation sends one request per event, detection one per
      ``n_per_prompt`` usable events).
    * refine, with the scorer refinement uses (the first LLM scorer in ``config.scorers``):
      ``rounds x (heads + its requests on the feedback events + on the held-out events)``. The
      first explanation's held-out score is answered by the cache the score stage filled (sent
      once more only when the score stage is not run), and so is a feedback event with the same
      context as a held-out one.
    * taxonomy: one family-name request per family (at most heads // min_cluster_size; none
      when there are fewer heads than that) and, with ``embedding="openai"``, one embeddings
      request per 256 texts.

    The count is exact when every head gets a parseable explanation and revision, refinement
    has one round, and the taxonomy finds as many families as it can; otherwise it is an upper
    bound (a head left unexplained is not scored, a revision that is unparseable or repeats a
    rejected one is not scored, a head whose explanation changed is re-scored on its feedback
    events only between rounds, fewer families ask fewer names, and identical requests --
    the same text and context for two heads -- are sent once).
    """
    from .client import EMBED_BATCH, _estimate_prompt_tokens
    from .scoring import DetectionScorer, ScoringItem, SimulationScorer
    from .stages import explain_stage, unit_key
    from .taxonomy import LABEL_PROMPT

    wanted = list(STAGES) if wanted is None else list(wanted)

    def used_tokens(client) -> int:
        return client.usage.dry_run_prompt_tokens + client.usage.dry_run_completion_tokens

    explain_stage(heads, heuristic, splits, llm)
    explain_calls, explain_cost, explain_tokens = llm.usage.dry_run_calls, llm.usage.dry_run_cost_usd, used_tokens(llm)

    def scorer_for(name):
        return SimulationScorer(sim_client) if name == "simulation" else DetectionScorer(sim_client, seed=config.seed)

    # The LLM's explanations are not known yet: one stand-in per head, the heuristic text marked
    # with the head's label, so that (as with real explanations, which differ between heads) no
    # two heads' requests coincide and get counted once
    stand_ins = {h: dataclasses.replace(heuristic.get(h), text=f"{heuristic.get(h).text} ({unit_key(h)})")
                 for h in heads}
    baseline = {h: heuristic.get(h) for h in heads}
    parts_of = (splits.shown, splits.held)

    def measured(name: str, parts: Sequence[int], explanations: Mapping) -> tuple[int, float, int]:
        """(requests, USD, tokens) the scorer ``name`` sends for ``explanations`` (one per head) on the
        split parts ``parts`` (0: the events shown to the explainer, 1: the held-out events),
        in one batch: an event in both parts (the same context) is one request, as in the real
        run, where the cache answers the second. The dry-run client stores nothing, so each
        measurement counts every request not cached."""
        calls, cost, used = sim_client.usage.dry_run_calls, sim_client.usage.dry_run_cost_usd, used_tokens(sim_client)
        scorer_for(name).score_many([ScoringItem(h[0], h[1], explanations[h], parts_of[part][unit_key(h)],
                                                 getattr(h, "kind", "head"))
                                     for part in parts for h in heads])
        return (sim_client.usage.dry_run_calls - calls, sim_client.usage.dry_run_cost_usd - cost,
                used_tokens(sim_client) - used)

    llm_scorers = [name for name in config.scorers if name in LLM_SCORERS] if heads else []
    score_calls, score_cost, score_tokens = 0, 0.0, 0
    if "score" in wanted:  # the LLM explanation and its heuristic baseline, on the held-out events
        for name in llm_scorers:
            for explanations in (stand_ins, baseline):
                calls, cost, used = measured(name, [1], explanations)
                score_calls, score_cost, score_tokens = score_calls + calls, score_cost + cost, score_tokens + used
    refine_calls, refine_cost, refine_tokens = 0, 0.0, 0
    if "refine" in wanted and llm_scorers and config.refine_rounds:
        name = llm_scorers[0]  # the scorer refinement uses
        # the first explanation's held-out score comes from the cache the score stage filled;
        # its feedback requests (those not already among them) are sent
        held_calls, held_cost, held_tokens = measured(name, [1], stand_ins)
        both_calls, both_cost, both_tokens = measured(name, [0, 1], stand_ins)
        feedback_calls, feedback_cost = both_calls - held_calls, both_cost - held_cost
        feedback_tokens = both_tokens - held_tokens
        rounds = config.refine_rounds
        # per round: one revision per head + its held-out score; the feedback events are scored
        # once before the first round and again, between rounds, for the heads that changed
        refine_calls = rounds * (len(heads) + feedback_calls + held_calls)
        refine_cost = rounds * (explain_cost + feedback_cost + held_cost)
        refine_tokens = rounds * (explain_tokens + feedback_tokens + held_tokens)
        if "score" not in wanted:  # the first explanation's held-out score is not in the cache
            refine_calls += held_calls
            refine_cost += held_cost
            refine_tokens += held_tokens
    taxonomy_calls, taxonomy_cost, taxonomy_tokens = 0, 0.0, 0
    n_texts = len(heads)
    if "taxonomy" in wanted and 2 <= n_texts and config.min_cluster_size <= n_texts:
        families = n_texts // config.min_cluster_size
        members = "\n".join(f"- {heuristic.get(h).text}" for h in heads[:12])
        prompt = [{"role": "user", "content": LABEL_PROMPT.format(members=members)}]
        taxonomy_calls = families
        taxonomy_cost = families * llm.cost(_estimate_prompt_tokens(prompt), 32)
        taxonomy_tokens = families * (_estimate_prompt_tokens(prompt) + 32)
        if config.embedding == "openai":
            taxonomy_calls += -(-n_texts // EMBED_BATCH)
            tokens = sum(len(heuristic.get(h).text) // 4 + 1 for h in heads)
            taxonomy_cost += llm.cost(tokens, 0, model="text-embedding-3-small")
            taxonomy_tokens += tokens
    total_calls = explain_calls + score_calls + refine_calls + taxonomy_calls
    total_cost = explain_cost + score_cost + refine_cost + taxonomy_cost
    total_tokens = explain_tokens + score_tokens + refine_tokens + taxonomy_tokens
    hours = total_calls / config.concurrency * DRY_RUN_SECONDS_PER_REQUEST / 3600
    _say(f"dry run: {total_calls} LLM calls (explain {explain_calls}, scoring {score_calls}, "
         f"refinement ~{refine_calls}, taxonomy ~{taxonomy_calls}), ~{total_tokens:,} tokens, estimated "
         f"${total_cost:.4f} (explain ${explain_cost:.4f}, scoring ${score_cost:.4f}"
         f"{' at the Batch API price' if config.batch_api else ''}, refinement ~${refine_cost:.4f}, "
         f"taxonomy ~${taxonomy_cost:.4f}); about {hours:.2g} h at {config.concurrency} requests in flight if each "
         f"takes {DRY_RUN_SECONDS_PER_REQUEST:g} s (an assumption: measure your endpoint)"
         f"{', plus up to 24 h per Batch API round' if config.batch_api else ''}; at most this many: fewer when a "
         "unit gets no usable explanation or revision; nothing was sent: rerun without --dry-run to spend")
    usage = {"dry_run": {"calls": total_calls, "estimated_cost_usd": total_cost, "tokens": total_tokens,
                         "explain_calls": explain_calls, "score_calls": score_calls, "refine_calls": refine_calls,
                         "taxonomy_calls": taxonomy_calls, "explain_tokens": explain_tokens,
                         "score_tokens": score_tokens, "refine_tokens": refine_tokens,
                         "taxonomy_tokens": taxonomy_tokens, "explain_cost_usd": explain_cost,
                         "score_cost_usd": score_cost, "refine_cost_usd": refine_cost,
                         "taxonomy_cost_usd": taxonomy_cost, "concurrency": config.concurrency,
                         "seconds_per_request_assumed": DRY_RUN_SECONDS_PER_REQUEST, "estimated_hours": hours,
                         "batch_api": config.batch_api}}
    return ExplainRun([], Path(out), config, ["dry_run"], usage=usage)
