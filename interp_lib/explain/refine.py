"""Stage 5 of the head explainer: iterative refinement of explanations.

Each round, for every head: find the events its current explanation gets most wrong (from the
scorer's per-event predictions on *feedback* events), show them to the explainer and ask for a
revision, score the revision on *held-out* events the explainer never saw, and keep it only if
that score improves. The events shown and the events that decide are disjoint, so a kept
revision is an improvement that generalises, not a fit to the examples shown.
"""

from __future__ import annotations

import json

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .prompts import ParseError, parse_explanation, refinement_messages
from .records import Event, Explanation, RefinementStep, ScoreResult
from .scoring import Scorer, ScoringItem, _check_items, split_events

__all__ = ["refine_explanations", "refinement_gain", "most_wrong_events"]


def most_wrong_events(result: ScoreResult, events: Sequence[Event], n_wrong: int
                      ) -> list[tuple[Event, float, float]]:
    """The ``n_wrong`` events with the largest prediction error, as ``(event, predicted,
    actual)`` on a 0-10 scale.

    Predictions are divided by ``details["predicted_scale"]``; actual values are divided by
    their maximum (min-max scaled if any is negative), so simulation (activations) and detection
    (0 / 1 labels) errors are comparable. Events predicted exactly right are never listed.
    """
    details = result.details or {}
    predicted = np.asarray(details.get("predicted", []), dtype=float)
    actual = np.asarray(details.get("actual", []), dtype=float)
    ids = list(details.get("event_ids", []))
    if len(predicted) == 0 or not len(predicted) == len(actual) == len(ids):
        return []
    scale = float(details.get("predicted_scale", 10.0)) or 1.0
    low, high = (0.0, float(actual.max())) if actual.min() >= 0 else (float(actual.min()), float(actual.max()))
    actual_unit = (actual - low) / (high - low) if high > low else np.zeros_like(actual)
    predicted_unit = np.clip(predicted / scale, 0.0, 1.0)
    errors = np.abs(predicted_unit - actual_unit)
    order = [int(i) for i in np.argsort(-errors, kind="stable") if errors[i] > 0][:n_wrong]
    return [(events[ids[i]], float(predicted_unit[i] * 10), float(actual_unit[i] * 10)) for i in order]


def refine_explanations(explainer_client, scorer: Scorer, items: Sequence[ScoringItem], *, rounds: int = 2,
                        n_wrong: int = 6, holdout_events: Sequence[Sequence[Event]] | None = None,
                        holdout_fraction: float = 0.5, seed: int = 0, max_tokens: int = 600
                        ) -> list[list[RefinementStep]]:
    """Refine every item's explanation for ``rounds`` rounds; one list of steps per item.

    ``scorer`` must give per-event predictions (simulation or detection). Feedback events are
    ``item.events`` and the deciding events ``holdout_events[i]``; without ``holdout_events``
    each item's events are split (:func:`split_events`, ``holdout_fraction``, ``seed``) into the
    two. A step records the candidate's held-out ``score``, the current ``previous_score`` and
    whether it was ``kept`` (strictly better). A revision that could not be parsed, or whose
    request failed, is a step with the unchanged current explanation, ``score=None`` and
    ``kept=False``; an item with no per-event predictions gets no step that round. Revisions
    rejected since the current explanation last changed are listed in the next request (the
    explainer is told to write a different one), so a later round never repeats a request whose
    answer is known, and no rejected revision is recorded twice.
    """
    from .client import ChatRequest

    items = _check_items(items)
    for name, value, low in (("rounds", rounds, 0), ("n_wrong", n_wrong, 1), ("max_tokens", max_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}: expected an integer >= {low}")
    if holdout_events is None:
        pairs = [split_events(item.events, holdout_fraction, seed) for item in items]
        feedback, deciding = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        holdout_events = list(holdout_events)
        if len(holdout_events) != len(items):
            raise ValueError(f"holdout_events has {len(holdout_events)} lists for {len(items)} items: "
                             "expected one list of events per item")
        feedback, deciding = [list(item.events) for item in items], [list(h) for h in holdout_events]
    steps: list[list[RefinementStep]] = [[] for _ in items]
    if not items or rounds == 0:
        return steps

    def score(explanations: dict[int, Explanation], events: list[list[Event]]) -> dict[int, ScoreResult]:
        keys = sorted(explanations)
        batch = [ScoringItem(items[i].layer, items[i].head, explanations[i], list(events[i]), items[i].unit_kind)
                 for i in keys]
        return dict(zip(keys, scorer.score_many(batch))) if batch else {}

    current = {i: item.explanation for i, item in enumerate(items)}
    current_score = score(current, deciding)
    feedback_result = score(current, feedback)
    if all("predicted" not in r.details for r in feedback_result.values()):
        raise ValueError(f"scorer {getattr(scorer, 'name', scorer)!r} gives no per-event predictions "
                         "(details['predicted']): refinement needs a simulation or detection scorer")
    source = f"llm:{getattr(explainer_client, 'model', 'unknown')}"
    # revisions rejected against the current explanation: shown in later requests, forgotten
    # once a revision is kept (it is judged against a new explanation then)
    rejected: dict[int, list[Explanation]] = {i: [] for i in range(len(items))}
    # a request whose answer could not be used is not sent again (it would come back from the
    # cache, or be the same temperature-0 answer) and its failure is recorded once
    failed_requests: dict[int, set[str]] = {i: set() for i in range(len(items))}
    for round_ in range(1, rounds + 1):
        asked, requests = [], []
        for i, item in enumerate(items):
            wrong = most_wrong_events(feedback_result[i], feedback[i], n_wrong)
            if not wrong:
                continue
            messages = refinement_messages(item.label, current[i], wrong, rejected=rejected[i])
            if json.dumps(messages, sort_keys=True) in failed_requests[i]:
                continue
            asked.append(i)
            requests.append(ChatRequest(messages=messages,
                                        max_tokens=max_tokens, temperature=0.0, json_mode=True,
                                        tag=f"refine {item.label} round {round_}"))
        answers = explainer_client.chat_many(requests, desc=f"refine round {round_}") if requests else []
        revised: dict[int, Explanation] = {}
        for i, answer in zip(asked, answers):
            previous = current_score[i].score
            candidate, why = None, None
            if answer.ok:
                try:
                    candidate = parse_explanation(answer.content, source=source)
                except ParseError as error:
                    why = f"unparseable: {error}"
            else:
                why = f"request failed: {answer.failure}"
            if candidate is None:
                steps[i].append(RefinementStep(round_, current[i], None, previous, False, failure=why))
                failed_requests[i].add(json.dumps(requests[asked.index(i)].messages, sort_keys=True))
                continue
            if any(r.text == candidate.text for r in rejected[i]):
                continue  # a rejected revision again: already recorded, not scored twice
            candidate.round = round_
            revised[i] = candidate
        candidate_score = score(revised, deciding)
        changed: dict[int, Explanation] = {}
        for i in sorted(revised):
            previous, new = current_score[i].score, candidate_score[i].score
            kept = new is not None and (previous is None or new > previous)
            steps[i].append(RefinementStep(round_, revised[i], new, previous, kept))
            if kept:
                current[i], current_score[i] = revised[i], candidate_score[i]
                changed[i] = revised[i]
                rejected[i] = []
            else:
                rejected[i].append(revised[i])
        if round_ < rounds and changed:
            feedback_result.update(score(changed, feedback))
    return steps


def refinement_gain(steps: Sequence[Sequence[RefinementStep]]) -> pd.DataFrame:
    """Per round: items revised, revisions scored and kept, mean previous / candidate score,
    ``mean_delta`` (candidate - previous, where both exist: can be negative) and ``mean_gain``
    (the kept score's improvement; 0 for a rejected revision), averaged over the items whose
    previous score exists."""
    rows: dict[int, list[RefinementStep]] = {}
    for item_steps in steps:
        for step in item_steps:
            rows.setdefault(step.round, []).append(step)
    out = []
    for round_ in sorted(rows):
        group = rows[round_]
        both = [s for s in group if s.score is not None and s.previous_score is not None]
        with_previous = [s for s in group if s.previous_score is not None]
        gains = [(s.score - s.previous_score) if s.kept and s.score is not None else 0.0 for s in with_previous]
        out.append({
            "round": round_, "n_items": len(group), "n_scored": sum(s.score is not None for s in group),
            "n_kept": sum(s.kept for s in group),
            "mean_previous": float(np.mean([s.previous_score for s in with_previous])) if with_previous else np.nan,
            "mean_candidate": float(np.mean([s.score for s in group if s.score is not None]))
            if any(s.score is not None for s in group) else np.nan,
            "mean_delta": float(np.mean([s.score - s.previous_score for s in both])) if both else np.nan,
            "mean_gain": float(np.mean(gains)) if gains else np.nan})
    return pd.DataFrame(out, columns=["round", "n_items", "n_scored", "n_kept", "mean_previous",
                                      "mean_candidate", "mean_delta", "mean_gain"])
