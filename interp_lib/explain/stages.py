"""The explainer's stages as small functions from typed inputs to typed results.

Each stage of :func:`interp_lib.explain.pipeline.run_explainer` is one function here, and each
checkpointed stage returns one dataclass (what the run folder stores for it):

==========  ===================================  =============================================
stage       function                             result
==========  ===================================  =============================================
sample      :func:`sample_stage`                 ``Tensor [window, pos]`` of token ids
events      :func:`events_stage`                 :class:`~interp_lib.explain.events.EventSet`
heuristic   :func:`heuristic_stage`              :class:`HeuristicResult`
(split)     :func:`split_stage`                  :class:`Splits` (not stored: cheap, seeded)
explain     :func:`explain_stage`                :class:`Explanations`
score       :func:`score_stage`                  :class:`Scores`
refine      :func:`refine_stage`                 :class:`Refinement`
causal      :func:`causal_stage`                 :class:`CausalEffects`
taxonomy    :func:`taxonomy_stage`               :class:`TaxonomyResult`
==========  ===================================  =============================================

Results are keyed by unit *label* (``"L1H0"``, ``"L0N17"``): a label names its kind, so heads
and neurons never collide and the key survives the checkpoint format (which stores a named
tuple as a plain tuple). ``result.get(unit)`` accepts a unit, a ``(layer, head)`` pair or a
label.

Runs saved before these types existed stored plain tuples and dicts keyed by ``(layer, head)``;
each result's :meth:`coerce` reads both, and anything else raises one line naming the stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..units import Head, Neuron, Unit
from .records import Explanation, RefinementStep, ScoreResult

__all__ = ["HeuristicResult", "Splits", "Explanations", "Scores", "Refinement", "CausalEffects",
           "TaxonomyResult", "StageFormatError", "unit_key", "sample_stage", "events_stage",
           "heuristic_stage", "split_stage", "explain_stage", "score_stage", "refine_stage",
           "causal_stage", "taxonomy_stage"]


class StageFormatError(ValueError):
    """A stored stage result in a format this version cannot read."""


def unit_key(unit) -> str:
    """The label a stage result is keyed by: a unit's label; a plain ``(layer, head)`` pair (the
    key of runs saved before units had a kind) is a head."""
    if isinstance(unit, str):
        return unit
    if isinstance(unit, (Head, Neuron)):
        return unit.label
    layer, index = unit
    return Head(int(layer), int(index)).label


def _bad(stage: str, saved: Any) -> StageFormatError:
    return StageFormatError(f"stage {stage!r}: the stored result ({type(saved).__name__}) is in a format "
                            "this version cannot read; rerun that stage (e.g. --stages "
                            f"{stage}) or use a new --out folder")


def _rekey(mapping: Mapping) -> dict[str, Any]:
    return {unit_key(k): v for k, v in mapping.items()}


# ----------------------------------------------------------------------------- results

@dataclass
class HeuristicResult:
    """The no-LLM explanation of each unit (the offline explainer and the LLM's baseline), and
    the statistics it was read from (one row per unit; heads: attention statistics, neurons:
    activation statistics of the events)."""

    explanations: dict[str, Explanation] = field(default_factory=dict)
    stats: Any = None  # pandas DataFrame or None

    def get(self, unit) -> Explanation | None:
        return self.explanations.get(unit_key(unit))

    @classmethod
    def coerce(cls, saved: Any) -> "HeuristicResult":
        if isinstance(saved, cls):
            return saved
        if isinstance(saved, tuple) and len(saved) == 2 and isinstance(saved[0], dict):
            return cls(_rekey(saved[0]), saved[1])  # before typed stages: (explanations, stats)
        raise _bad("heuristic", saved)


@dataclass
class Splits:
    """Per unit, the events shown to the explainer and the held-out events the scorers use."""

    shown: dict[str, list] = field(default_factory=dict)
    held: dict[str, list] = field(default_factory=dict)


@dataclass
class Explanations:
    """The explainer's answer per unit: an explanation, or None and why (``failures``)."""

    explanations: dict[str, Explanation | None] = field(default_factory=dict)
    failures: dict[str, str | None] = field(default_factory=dict)

    def get(self, unit) -> Explanation | None:
        return self.explanations.get(unit_key(unit))

    def failure(self, unit) -> str | None:
        key = unit_key(unit)
        if key not in self.explanations:
            return "not explained"
        return self.failures.get(key)

    def explained(self, units: Sequence) -> list:
        """The units of ``units`` that got an explanation, in order."""
        return [u for u in units if self.get(u) is not None]

    @classmethod
    def coerce(cls, saved: Any) -> "Explanations":
        if isinstance(saved, cls):
            return saved
        if isinstance(saved, dict) and all(isinstance(v, tuple) and len(v) == 2 for v in saved.values()):
            return cls({unit_key(k): v[0] for k, v in saved.items()},  # before: {head: (expl, failure)}
                       {unit_key(k): v[1] for k, v in saved.items()})
        raise _bad("explain", saved)


@dataclass
class Scores:
    """Per unit, scorer name -> result (``baseline_<scorer>``: the heuristic explanation scored
    the same way); ``skipped``: scorer -> why it did not run."""

    scores: dict[str, dict[str, ScoreResult]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def get(self, unit) -> dict[str, ScoreResult]:
        return dict(self.scores.get(unit_key(unit), {}))

    def __getitem__(self, index: int):
        # the stage used to store the pair (scores, skipped); load_stage(out, "score")[1] still works
        return (self.scores, self.skipped)[index]

    @classmethod
    def coerce(cls, saved: Any) -> "Scores":
        if isinstance(saved, cls):
            return saved
        if isinstance(saved, tuple) and len(saved) == 2 and isinstance(saved[0], dict):
            return cls(_rekey(saved[0]), dict(saved[1]))
        raise _bad("score", saved)


@dataclass
class Refinement:
    """Per unit, the refinement steps (see :func:`interp_lib.explain.refine.refine_explanations`)
    and the scorer that decided them."""

    steps: dict[str, list[RefinementStep]] = field(default_factory=dict)
    scorer: str | None = None

    def get(self, unit) -> list[RefinementStep]:
        return list(self.steps.get(unit_key(unit), []))

    @classmethod
    def coerce(cls, saved: Any) -> "Refinement":
        if isinstance(saved, cls):
            return saved
        if isinstance(saved, dict):  # before: {head: (steps, scorer name)}
            scorers = {v[1] for v in saved.values() if isinstance(v, tuple)}
            if all(isinstance(v, tuple) and len(v) == 2 for v in saved.values()) and len(scorers) <= 1:
                return cls({unit_key(k): list(v[0]) for k, v in saved.items()}, next(iter(scorers), None))
        raise _bad("refine", saved)


@dataclass
class CausalEffects:
    """Per unit, the ablation effect on next-token loss: ``{"top": mean delta over its top
    events, "random": over its random events, "n_top", "n_random"}`` (see
    :func:`interp_lib.patching.unit_ablation_effects`)."""

    effects: dict[str, dict[str, float]] = field(default_factory=dict)
    method: str = "zero"

    def get(self, unit) -> dict[str, float]:
        return dict(self.effects.get(unit_key(unit), {}))

    @classmethod
    def coerce(cls, saved: Any) -> "CausalEffects":
        if isinstance(saved, cls):
            return saved
        if isinstance(saved, dict) and all(isinstance(v, dict) for v in saved.values()):
            return cls(_rekey(saved))  # before: {head: {...}}
        raise _bad("causal", saved)


@dataclass
class TaxonomyResult:
    """The taxonomy (``Taxonomy.to_dict()``), or why there is none (too few units to cluster)."""

    taxonomy: dict | None = None
    error: str | None = None

    @classmethod
    def coerce(cls, saved: Any) -> "TaxonomyResult":
        if isinstance(saved, cls):
            return saved
        if isinstance(saved, dict) and ("taxonomy" in saved or "error" in saved):
            return cls(saved.get("taxonomy"), saved.get("error"))  # before: {"taxonomy"} | {"error"}
        raise _bad("taxonomy", saved)


# ----------------------------------------------------------------------------- stages

def sample_stage(model, config):
    """The run's token windows ``[window, pos]``."""
    from .events import sample_windows

    # clone: a view would drag its whole parent storage into the checkpoint file
    return sample_windows(model, config.dataset, config.windows, config.window_len, seed=config.seed).clone()


def events_stage(model, windows, units: Sequence[Unit], config, *, progress: bool = True):
    """Top / random / quantile events of every unit (heads: by ``config.salience``; neurons:
    by their activation)."""
    from .events import collect_events

    return collect_events(model, windows, units, top_k=config.top_k, n_random=config.n_random,
                          n_quantile=config.n_quantile, salience=config.salience,
                          batch_size=config.batch_size, seed=config.seed, progress=progress,
                          kind=config.unit_kind)


def heuristic_stage(model, windows, units: Sequence[Unit], config, event_set=None, *,
                    progress: bool = True) -> HeuristicResult:
    """The offline explanation of every unit. Heads: from attention statistics on the windows
    (every head of the model, so the result does not depend on the selection). Neurons: from
    their events (the token(s) that dominate the top events, with a confidence)."""
    from .heuristic import heuristic_explanations, neuron_heuristic_explanations

    if config.unit_kind == "neuron":
        explanations, stats = neuron_heuristic_explanations(event_set, units)
    else:
        explanations, stats = heuristic_explanations(model, windows, seed=config.seed,
                                                     batch_size=config.batch_size, progress=progress)
    return HeuristicResult(_rekey(explanations), stats)


def split_stage(event_set, units: Sequence[Unit], config) -> Splits:
    """Each unit's events split into shown / held-out parts (stratified by kind, seeded)."""
    from .scoring import split_events

    splits = Splits()
    for unit in units:
        key = unit_key(unit)
        splits.shown[key], splits.held[key] = split_events(
            event_set.events(*unit), holdout_fraction=config.holdout_fraction, seed=config.seed)
    return splits


def explain_stage(units: Sequence[Unit], heuristic: HeuristicResult, splits: Splits, llm=None) -> Explanations:
    """The LLM's explanation of each unit from its shown events, or the heuristic one without
    an LLM."""
    if llm is None:
        return Explanations({unit_key(u): heuristic.get(u) for u in units}, {unit_key(u): None for u in units})
    from .prompts import LLMExplainer

    answers = LLMExplainer(llm).explain_many({u: splits.shown[unit_key(u)] for u in units})
    return Explanations({unit_key(u): answers[u][0] for u in units}, {unit_key(u): answers[u][1] for u in units})


def _scoring_item(unit, explanation: Explanation, events: list):
    from .scoring import ScoringItem

    return ScoringItem(unit[0], unit[1], explanation, events, unit_kind=getattr(unit, "kind", "head"))


def choose_scorers(model, config, sim_client) -> tuple[list, dict[str, str]]:
    """The scorers ``config.scorers`` names that can run, and why each other one cannot."""
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


def score_stage(model, units: Sequence[Unit], explanations: Explanations, heuristic: HeuristicResult,
                splits: Splits, config, *, sim_client=None, with_baseline: bool = False) -> Scores:
    """Every explained unit scored on its held-out events by each available scorer; with
    ``with_baseline`` (an LLM explained) also the heuristic explanation, as ``baseline_<name>``."""
    from .scoring import score_explanations

    chosen, reasons = choose_scorers(model, config, sim_client)
    explained = explanations.explained(units)
    items = [_scoring_item(u, explanations.get(u), splits.held[unit_key(u)]) for u in explained]
    scored = score_explanations(chosen, items) if items else []
    results = {unit_key(u): dict(s) for u, s in zip(explained, scored)}
    if with_baseline:
        base_items = [_scoring_item(u, heuristic.get(u), splits.held[unit_key(u)]) for u in units]
        for u, s in zip(units, score_explanations(chosen, base_items)):
            results.setdefault(unit_key(u), {}).update({f"baseline_{k}": v for k, v in s.items()})
    return Scores(results, reasons)


def refine_stage(units: Sequence[Unit], explanations: Explanations, splits: Splits, config, *, llm=None,
                 sim_client=None) -> Refinement:
    """Rounds of revise-and-rescore with the first LLM scorer; a revision is kept only when its
    held-out score improves. Nothing without an LLM, rounds or an LLM scorer."""
    from .config import LLM_SCORERS

    llm_scorers = [s for s in config.scorers if s in LLM_SCORERS]
    if llm is None or config.refine_rounds == 0 or not llm_scorers:
        return Refinement()
    from .refine import refine_explanations
    from .scoring import DetectionScorer, SimulationScorer

    scorer = SimulationScorer(sim_client) if llm_scorers[0] == "simulation" else \
        DetectionScorer(sim_client, seed=config.seed)
    explained = explanations.explained(units)
    # feedback from the events the explainer saw; keep / reject decided on the held-out
    # events, the same ones the score stage used, so the refined score is comparable
    items = [_scoring_item(u, explanations.get(u), splits.shown[unit_key(u)]) for u in explained]
    steps = refine_explanations(llm, scorer, items, rounds=config.refine_rounds,
                                holdout_events=[splits.held[unit_key(u)] for u in explained])
    return Refinement({unit_key(u): s for u, s in zip(explained, steps)}, scorer.name)


def causal_stage(model, windows, event_set, units: Sequence[Unit], config, *, progress: bool = True
                 ) -> CausalEffects:
    """Each unit ablated alone: the change in next-token loss at its top and random events."""
    from ..patching import unit_ablation_effects

    by_unit = {u: event_set.events(*u, kinds=("top", "random")) for u in units}
    effects = unit_ablation_effects(model, windows, by_unit, method=config.causal_method,
                                    batch_size=config.batch_size, progress=progress, seed=config.seed)
    return CausalEffects({unit_key(u): v for u, v in effects.items()}, config.causal_method)


def taxonomy_stage(records: Sequence, config, *, llm=None, progress: bool = True) -> TaxonomyResult:
    """Families of the records' explanations -- best effort: a handful of units with
    near-identical texts can be too few to cluster; the reason is recorded."""
    from .taxonomy import build_taxonomy

    try:
        # with an LLM, it names the families (falling back to the member nearest the centroid)
        # and can embed them (embedding="openai")
        tax = build_taxonomy(records, min_cluster_size=config.min_cluster_size, backend=config.embedding,
                             seed=config.seed, progress=progress, client=llm, llm_labels=llm is not None)
    except ValueError as error:
        return TaxonomyResult(error=str(error))
    return TaxonomyResult(taxonomy=tax.to_dict())
