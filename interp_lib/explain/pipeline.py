"""The head-explainer pipeline: sample -> events -> heuristic -> explain -> score -> refine ->
causal -> taxonomy -> report, each stage checkpointed, skippable and resumable.

``ExplainConfig`` (one documented field per option) drives both ``interp-lib explain`` and the
saved run configuration. A run folder holds::

    <out>/config.json       the configuration (no API key, ever), embedding backend, versions
    <out>/checkpoints/      one file per finished stage (interp_lib.checkpoint.Checkpointer)
    <out>/llm_cache/        answered LLM requests: a rerun or a resumed run sends none twice
    <out>/records.json      one HeadRecord per head (interp_lib.explain.records)
    <out>/report.md         per-head explanations, scores, top events, best and worst heads
    <out>/scores.html       layer x head score heatmap
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
import torch
from jaxtyping import Int
from torch import Tensor

from .client import public_url  # re-exported: it used to live here
from .records import HeadRecord, RefinementStep, ScoreResult

from .config import LLM_SCORERS, STAGES, ExplainConfig


# ---------------------------------------------------------------- heads and splits

def select_heads(model, heads: str | Sequence = "all") -> list[tuple[int, int]]:
    """``"all"``, labels (``"L0H1,L1H0"``) or pairs -> the model's (layer, head) pairs."""
    from .events import parse_heads

    return parse_heads(heads, model.cfg.n_layers, model.cfg.n_heads)


# ---------------------------------------------------------------- causal check

def _loss_per_position(logits: Tensor, tokens: Tensor) -> Tensor:
    """[batch, pos-1] next-token cross entropy (position p predicts token p+1)."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]


@torch.inference_mode()
def causal_effects(model, windows: Int[Tensor, "window pos"], events_by_head: Mapping[tuple[int, int], Sequence],
                   *, method: str = "zero", batch_size: int = 16, progress: bool = True
                   ) -> dict[tuple[int, int], dict[str, float]]:
    """Ablate each head alone and measure the change in next-token loss at its events.

    For every head, ``events_by_head[head]`` (Events: window, position, kind) gives the query
    positions; the effect is the mean of (ablated - clean) loss of predicting the token after
    each query position, over its ``top`` events and, as a baseline, over its ``random`` events.
    An explanation that scores well on a head with no effect explains something the model
    does not use.

    Returns ``{head: {"top": mean delta, "random": mean delta, "n_top": ..., "n_random": ...}}``.
    """
    if method not in ("zero", "mean"):
        raise ValueError(f"method={method!r}: expected 'zero' or 'mean'")
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows: expected a non-empty [window, pos] tensor, got shape {tuple(windows.shape)}")
    device = next(model.parameters()).device
    windows = windows.to(device)
    n_pos = windows.shape[1]

    def losses(tokens: Tensor, hooks=()) -> Tensor:
        out = []
        for start in range(0, tokens.shape[0], batch_size):
            chunk = tokens[start:start + batch_size]
            logits = model.run_with_hooks(chunk, fwd_hooks=list(hooks)) if hooks else model(chunk)
            out.append(_loss_per_position(logits, chunk))
        return torch.cat(out)

    clean = losses(windows)                                        # [window, pos-1]
    means: dict[int, Tensor] = {}
    if method == "mean":
        layers = sorted({layer for layer, _ in events_by_head})
        store: dict[int, Tensor] = {}

        def keep(layer):
            def hook(z, hook):
                total = z.float().sum(dim=(0, 1))
                store[layer] = store.get(layer, 0) + total
            return hook

        for start in range(0, windows.shape[0], batch_size):
            model.run_with_hooks(windows[start:start + batch_size],
                                 fwd_hooks=[(f"blocks.{l}.attn.hook_z", keep(l)) for l in layers])
        means = {l: store[l] / (windows.shape[0] * n_pos) for l in layers}

    from tqdm.auto import tqdm

    results = {}
    for (layer, head), events in tqdm(list(events_by_head.items()), desc="causal check",
                                      disable=not progress, file=sys.stdout):
        groups = {kind: [(e.window, e.position) for e in events if e.kind == kind and e.position < n_pos - 1]
                  for kind in ("top", "random")}
        needed = sorted({w for pairs in groups.values() for w, _ in pairs})
        entry: dict[str, float] = {}
        if needed:
            def ablate(z, hook, head=head, layer=layer):
                z[:, :, head] = 0.0 if method == "zero" else means[layer][head].to(z.dtype)
                return z

            index = {w: i for i, w in enumerate(needed)}
            ablated = losses(windows[needed], [(f"blocks.{layer}.attn.hook_z", ablate)])
            for kind, pairs in groups.items():
                if pairs:
                    deltas = [float(ablated[index[w], p] - clean[w, p]) for w, p in pairs]
                    entry[kind] = float(np.mean(deltas))
                entry[f"n_{kind}"] = len(pairs)
        results[(layer, head)] = entry
    return results


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


def make_client(config: ExplainConfig, out: Path, model_name: str | None = None, *, progress: bool = True):
    """An LLMClient for the run (cache under ``out/llm_cache``), or None without an explainer."""
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
                     seed=config.seed)


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
    # one writer per run folder: a second run would replace this one's stage files
    with ckpt_module.RunLock(out, "interp-lib explain"):
        return _run_locked(config, out, wanted, skipped, model, client, simulator_client, progress)


def _run_locked(config: ExplainConfig, out: Path, wanted: list[str], skipped: set[str], model,
                client, simulator_client, progress: bool) -> ExplainRun:
    from .. import checkpoint as ckpt_module
    from ..models import load_model
    from ..notebook import resolve_model_name

    ckpt = ckpt_module.Checkpointer(out / "checkpoints")
    previous = _read_unfinished(out)
    model_name = resolve_model_name(config.model, default="toy-2l")
    if model is None:
        model = load_model(model_name)
    else:
        model_name = getattr(model.cfg, "model_name", model_name) if config.model == "auto" else model_name
    model.eval()
    base = {"model": model_name, "seed": config.seed}
    heads = select_heads(model, config.heads)  # validated before anything is written
    run_config = {**config.to_dict(), "base_url": public_url(config.base_url), "model_resolved": model_name,
                  "n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ran: list[str] = []
    unfinished: dict[str, str] = {}
    clients: list = []  # the LLM clients of the run, once built (failed requests are counted)

    def failed_requests() -> int:
        return sum(getattr(c.usage, "failed_requests", 0)
                   for c in {id(c): c for c in clients}.values())

    def guarded(name: str, compute: Callable[[], Any]) -> Callable[[], Any]:
        """``compute``, raising _FailedRequests (so nothing is saved) when an LLM request failed
        during it, or when it builds on the explanations of an unfinished stage."""
        def run():
            before = failed_requests()
            upstream = [s for s in unfinished if name in _BUILDS_ON_EXPLANATIONS]
            result = compute()
            failed = failed_requests() - before
            if upstream and not failed:
                raise _FailedRequests(result, f"it builds on unfinished stage(s) {', '.join(upstream)}")
            if failed:
                last = next((c.last_failure for c in clients if getattr(c, "last_failure", None)), None)
                raise _FailedRequests(result, f"{failed} failed LLM request{'s' if failed > 1 else ''}"
                                      + (f" (last: {last})" if last else ""))
            return result
        return run

    def saved(name: str, compute: Callable[[], Any], full: dict):
        try:
            return ckpt.stage(name, guarded(name, compute), full)
        except _FailedRequests as failure:
            unfinished[name] = str(failure)
            _say(f"[{name}] not saved as finished: {failure}; a rerun retries it")
            return failure.result

    def stage(name: str, compute: Callable[[], Any], params: dict, needed: bool = True):
        """Run / load a stage; a stage not wanted is loaded if it finished, else computed when a
        later stage needs its output (``needed``) or None."""
        full = {**base, **params}
        if name in wanted:
            _say(f"[{name}] " + ("loaded" if ckpt.has(name, full) else "running"))
            ran.append(name)
            return saved(name, compute, full)
        if name in skipped and not needed:
            return None
        if ckpt.has(name, full):
            return saved(name, compute, full)  # loads it (recomputes a damaged file)
        if needed:
            _say(f"[{name}] not finished yet; computing it for the stages after it")
            return saved(name, compute, full)
        return None

    # 1. sample
    from .events import collect_events, sample_windows

    sample_params = config.params("dataset", "windows", "window_len")
    # clone: a view would drag its whole parent storage into the checkpoint file
    windows = stage("sample", lambda: sample_windows(model, config.dataset, config.windows, config.window_len,
                                                     seed=config.seed).clone(), sample_params)

    # 2. events
    event_params = {**sample_params, **config.params("heads", "top_k", "n_random", "n_quantile", "salience")}
    event_set = stage("events", lambda: collect_events(
        model, windows, heads, top_k=config.top_k, n_random=config.n_random, n_quantile=config.n_quantile,
        salience=config.salience, batch_size=config.batch_size, seed=config.seed, progress=progress),
        event_params)

    # 3a. heuristic baseline (always: it is the offline explainer and the LLM's baseline)
    from .heuristic import heuristic_explanations

    heuristic, stats = stage("heuristic", lambda: heuristic_explanations(
        model, windows, seed=config.seed, batch_size=config.batch_size, progress=progress), sample_params)

    # held-out split per head: the explainer sees one part, scorers the other
    from .scoring import split_events

    def splits():
        result = {}
        for head in heads:
            shown, held = split_events(event_set.events(*head), holdout_fraction=config.holdout_fraction,
                                       seed=config.seed)
            result[head] = (shown, held)
        return result

    split = splits()

    # 3b. explain
    llm = client if client is not None else (make_client(config, out, progress=progress) if config.uses_llm else None)
    if llm is not None:
        clients.append(llm)

    def explain():
        if llm is None:
            return {head: (heuristic[head], None) for head in heads}
        from .prompts import LLMExplainer

        return LLMExplainer(llm).explain_many({head: split[head][0] for head in heads})

    sim_client = simulator_client
    if sim_client is None and llm is not None:
        sim_client = llm if not config.simulator or config.simulator == config.explainer else \
            make_client(config, out, config.simulator, progress=progress)
    if sim_client is not None:
        clients.append(sim_client)

    # The LLM a stage talks to is part of its params (from the client actually used); without
    # one they are left out, so changing LLM-only options never recomputes a heuristic run.
    # max_cost_usd is a param: raising the cap recomputes the LLM stages and the request cache
    # answers everything already paid for, so only what the cap stopped is sent.
    llm_params = {} if llm is None else {
        "explainer": llm.model, "base_url": public_url(getattr(llm, "base_url", None)),
        "max_cost_usd": config.max_cost_usd}
    explain_params = {**event_params, **config.params("holdout_fraction"), **llm_params}
    if config.dry_run:
        if llm is None:
            raise ValueError("dry_run=True needs an explainer (an LLM): the heuristic run sends nothing")
        return _dry_run(config, out, llm, sim_client, explain, heads, heuristic, split, model,
                        wanted)
    answers = stage("explain", explain, explain_params)

    # 4. score

    def scorers_available() -> tuple[list, dict[str, str]]:
        from .scoring import ContrastiveScorer, DetectionScorer, SimulationScorer

        chosen, reasons = [], {}
        for name in config.scorers:
            if name == "contrastive":
                chosen.append(ContrastiveScorer(model, batch_size=config.batch_size, salience=config.salience))
            elif sim_client is None:
                reasons[name] = "no LLM endpoint configured (explainer unset)"
            elif name == "simulation":
                chosen.append(SimulationScorer(sim_client))
            else:
                chosen.append(DetectionScorer(sim_client, seed=config.seed))
        return chosen, reasons

    def score():
        from .scoring import ScoringItem, score_explanations

        chosen, reasons = scorers_available()
        explained = [h for h in heads if answers[h][0] is not None]
        items = [ScoringItem(h[0], h[1], answers[h][0], split[h][1]) for h in explained]
        scored = score_explanations(chosen, items) if items else []
        results = {h: dict(s) for h, s in zip(explained, scored)}
        if llm is not None:  # the heuristic baseline, scored the same way on the same events
            base_items = [ScoringItem(h[0], h[1], heuristic[h], split[h][1]) for h in heads]
            for h, s in zip(heads, score_explanations(chosen, base_items)):
                results.setdefault(h, {}).update({f"baseline_{k}": v for k, v in s.items()})
        return results, reasons

    score_params = {**explain_params, **config.params("scorers"),
                    **({"simulator": sim_client.model} if sim_client is not None else {})}
    scores, skipped_scorers = stage("score", score, score_params, needed=False) or ({}, {})

    # 5. refine
    def refine():
        llm_scorers = [s for s in config.scorers if s in LLM_SCORERS]
        if llm is None or config.refine_rounds == 0 or not llm_scorers:
            return {}
        from .refine import refine_explanations
        from .scoring import DetectionScorer, ScoringItem, SimulationScorer

        scorer = SimulationScorer(sim_client) if llm_scorers[0] == "simulation" else \
            DetectionScorer(sim_client, seed=config.seed)
        explained = [h for h in heads if answers[h][0] is not None]
        # feedback from the events the explainer saw; keep / reject decided on the held-out
        # events, the same ones the score stage used, so the refined score is comparable
        items = [ScoringItem(h[0], h[1], answers[h][0], split[h][0]) for h in explained]
        steps = refine_explanations(llm, scorer, items, rounds=config.refine_rounds,
                                    holdout_events=[split[h][1] for h in explained])
        return {h: (item_steps, scorer.name) for h, item_steps in zip(explained, steps)}

    refinement = stage("refine", refine, {**score_params, **config.params("refine_rounds")},
                       needed=False) or {}

    # 6. causal check
    def causal():
        by_head = {h: event_set.events(*h, kinds=("top", "random")) for h in heads}
        return causal_effects(model, windows, by_head, method=config.causal_method,
                              batch_size=config.batch_size, progress=progress)

    causal_result = stage("causal", causal, {**event_params, **config.params("causal_method")},
                          needed=False) or {}

    records = assemble_records(heads, answers, heuristic, scores, refinement, causal_result,
                               event_set, stats)

    # 7. taxonomy (text families of the explanations) -- best effort: a handful of heads with
    # near-identical heuristic texts can be too few to cluster; the reason is recorded.
    def taxonomy():
        from .taxonomy import build_taxonomy

        try:
            # with an LLM, it names the families (falling back to the member nearest the centroid)
            # and can embed them (embedding="openai")
            tax = build_taxonomy(records, min_cluster_size=config.min_cluster_size,
                                 backend=config.embedding, seed=config.seed, progress=progress,
                                 client=llm, llm_labels=llm is not None)
        except ValueError as error:
            return {"error": str(error)}
        return {"taxonomy": tax.to_dict()}

    # keyed on what is clustered (texts and scores actually assembled), so a run that skipped or
    # had not yet finished scoring / refining never reuses families of other texts
    digest = hashlib.sha256(json.dumps([(r.label, r.explanation.text if r.explanation else None,
                                         r.best_score()) for r in records]).encode()).hexdigest()
    tax_params = {**config.params("min_cluster_size", "embedding"), "records": digest,
                  **({"labeller": llm.model} if llm is not None else {})}
    tax_result = stage("taxonomy", taxonomy, tax_params, needed=False) or {}
    if "taxonomy" in tax_result:
        from .taxonomy import Taxonomy

        Taxonomy.from_dict(tax_result["taxonomy"]).apply_to_records(records)

    if "taxonomy" in tax_result:  # the embedding actually used goes into the saved run config
        run_config["taxonomy"] = tax_result["taxonomy"].get("config", {})
    usage = _usage(llm, sim_client)
    meta = {"config": run_config, "usage": usage, "skipped_scorers": skipped_scorers,
            "taxonomy": {k: v for k, v in tax_result.get("taxonomy", {}).items()
                         if k in ("config", "metrics")} or tax_result.get("error")}
    files: dict[str, Path] = {}
    if "report" in wanted:
        from .report import write_report

        ran.append("report")
        files = write_report(records, out, meta=meta, n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads)
        # written with the records it describes (a partial or refused run leaves both alone)
        (out / "config.json").write_text(json.dumps(run_config, indent=1))
        files["config"] = out / "config.json"
        _say(f"[report] {', '.join(str(p.relative_to(out)) for p in files.values())} in {out}")
    if usage:
        (out / "usage.json").write_text(json.dumps(usage, indent=1))
        _say(f"LLM usage: {usage.get('summary', '')}")
    retried = [label for label in previous.get("heads", []) if label in {r.label for r in records}]
    _write_unfinished(out, unfinished, [r.label for r in records if r.explanation is None])
    return ExplainRun(records, out, config, ran, usage=usage, files=files, unfinished=unfinished,
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
        path.write_text(json.dumps({"stages": unfinished, "heads": unexplained}, indent=1))
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


def assemble_records(heads, answers, heuristic, scores, refinement, causal_result, event_set, stats
                     ) -> list[HeadRecord]:
    """One HeadRecord per head from the stage outputs (any of which may be empty)."""
    stats_by_head = {}
    if stats is not None and len(stats):
        for row in stats.to_dict("records"):
            stats_by_head[(int(row["layer"]), int(row["head"]))] = {
                k: float(v) for k, v in row.items()
                if k not in ("layer", "head", "label") and isinstance(v, (int, float, np.floating))
                and not isinstance(v, bool)}
    records = []
    for head in heads:
        explanation, failure = answers.get(head, (None, "not explained"))
        steps, refine_scorer = refinement.get(head, ([], None))
        steps: list[RefinementStep] = list(steps)
        kept = [s for s in steps if s.kept]
        if kept:
            explanation = kept[-1].explanation
        head_scores: dict[str, ScoreResult] = dict(scores.get(head, {}))
        if kept and kept[-1].score is not None:
            # the refined explanation's held-out score replaces the first explanation's
            head_scores["refined"] = ScoreResult("refined", kept[-1].score, details={
                "round": kept[-1].round, "first_score": steps[0].previous_score, "scorer": refine_scorer})
        causal = causal_result.get(head, {})
        records.append(HeadRecord(
            layer=head[0], head=head[1], explanation=explanation, failure=failure,
            heuristic=heuristic.get(head) if heuristic else None, scores=head_scores,
            refinement=steps, causal_effect=causal.get("top"),
            top_events=list(event_set.top.get(head, []))[:20] if event_set is not None else [],
            stats={**stats_by_head.get(head, {}),
                   **({"causal_random": causal["random"]} if "random" in causal else {})}))
    return records


def load_stage(out: str | Path, name: str) -> Any:
    """The stored result of a finished stage of the run in ``out`` (e.g. ``"events"``)."""
    from ..checkpoint import Checkpointer

    _check_stage_names([name], "name")
    return Checkpointer(Path(out) / "checkpoints").load(name)




def _dry_run(config, out, llm, sim_client, explain, heads, heuristic, split, model,
             wanted: Sequence[str] | None = None) -> ExplainRun:
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
    from .taxonomy import LABEL_PROMPT

    wanted = list(STAGES) if wanted is None else list(wanted)
    explain()
    explain_calls, explain_cost = llm.usage.dry_run_calls, llm.usage.dry_run_cost_usd

    def scorer_for(name):
        return SimulationScorer(sim_client) if name == "simulation" else DetectionScorer(sim_client, seed=config.seed)

    # The LLM's explanations are not known yet: one stand-in per head, the heuristic text marked
    # with the head's label, so that (as with real explanations, which differ between heads) no
    # two heads' requests coincide and get counted once
    stand_ins = {h: dataclasses.replace(heuristic[h], text=f"{heuristic[h].text} (L{h[0]}H{h[1]})")
                 for h in heads}

    def measured(name: str, parts: Sequence[int], explanations: Mapping) -> tuple[int, float]:
        """(requests, USD) the scorer ``name`` sends for ``explanations`` (one per head) on the
        split parts ``parts`` (0: the events shown to the explainer, 1: the held-out events),
        in one batch: an event in both parts (the same context) is one request, as in the real
        run, where the cache answers the second. The dry-run client stores nothing, so each
        measurement counts every request not cached."""
        calls, cost = sim_client.usage.dry_run_calls, sim_client.usage.dry_run_cost_usd
        scorer_for(name).score_many([ScoringItem(h[0], h[1], explanations[h], split[h][part])
                                     for part in parts for h in heads])
        return sim_client.usage.dry_run_calls - calls, sim_client.usage.dry_run_cost_usd - cost

    llm_scorers = [name for name in config.scorers if name in LLM_SCORERS] if heads else []
    score_calls, score_cost = 0, 0.0
    if "score" in wanted:  # the LLM explanation and its heuristic baseline, on the held-out events
        for name in llm_scorers:
            for explanations in (stand_ins, heuristic):
                calls, cost = measured(name, [1], explanations)
                score_calls, score_cost = score_calls + calls, score_cost + cost
    refine_calls, refine_cost = 0, 0.0
    if "refine" in wanted and llm_scorers and config.refine_rounds:
        name = llm_scorers[0]  # the scorer refinement uses
        # the first explanation's held-out score comes from the cache the score stage filled;
        # its feedback requests (those not already among them) are sent
        held_calls, held_cost = measured(name, [1], stand_ins)
        both_calls, both_cost = measured(name, [0, 1], stand_ins)
        feedback_calls, feedback_cost = both_calls - held_calls, both_cost - held_cost
        rounds = config.refine_rounds
        # per round: one revision per head + its held-out score; the feedback events are scored
        # once before the first round and again, between rounds, for the heads that changed
        refine_calls = rounds * (len(heads) + feedback_calls + held_calls)
        refine_cost = rounds * (explain_cost + feedback_cost + held_cost)
        if "score" not in wanted:  # the first explanation's held-out score is not in the cache
            refine_calls += held_calls
            refine_cost += held_cost
    taxonomy_calls, taxonomy_cost = 0, 0.0
    n_texts = len(heads)
    if "taxonomy" in wanted and 2 <= n_texts and config.min_cluster_size <= n_texts:
        families = n_texts // config.min_cluster_size
        members = "\n".join(f"- {heuristic[h].text}" for h in heads[:12])
        prompt = [{"role": "user", "content": LABEL_PROMPT.format(members=members)}]
        taxonomy_calls = families
        taxonomy_cost = families * llm.cost(_estimate_prompt_tokens(prompt), 32)
        if config.embedding == "openai":
            taxonomy_calls += -(-n_texts // EMBED_BATCH)
            tokens = sum(len(heuristic[h].text) // 4 + 1 for h in heads)
            taxonomy_cost += llm.cost(tokens, 0, model="text-embedding-3-small")
    total_calls = explain_calls + score_calls + refine_calls + taxonomy_calls
    total_cost = explain_cost + score_cost + refine_cost + taxonomy_cost
    _say(f"dry run: {total_calls} LLM calls (explain {explain_calls}, scoring {score_calls}, "
         f"refinement ~{refine_calls}, taxonomy ~{taxonomy_calls}), estimated ${total_cost:.4f} "
         f"(explain ${explain_cost:.4f}, scoring ${score_cost:.4f}, refinement ~${refine_cost:.4f}, "
         f"taxonomy ~${taxonomy_cost:.4f}); at most this many: fewer when a head gets no usable "
         "explanation or revision; nothing was sent: rerun without --dry-run to spend")
    usage = {"dry_run": {"calls": total_calls, "estimated_cost_usd": total_cost, "explain_calls": explain_calls,
                         "score_calls": score_calls, "refine_calls": refine_calls,
                         "taxonomy_calls": taxonomy_calls}}
    return ExplainRun([], Path(out), config, ["dry_run"], usage=usage)
