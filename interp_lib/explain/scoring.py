"""Stage 4 of the head explainer: score explanations three ways, behind one signature.

Every scorer has ``name`` and ``score_many(items) -> list[ScoreResult]`` (one result per
:class:`ScoringItem`, same order); LLM scorers send all their requests through one
``client.chat_many`` call so they run concurrently.

* :class:`ContrastiveScorer` runs the explanation's own positive and negative test texts
  through the model and reports Cohen's d of the head's activation (no LLM needed).
* :class:`SimulationScorer` (OpenAI's method) has an LLM predict activations from the
  explanation alone on held-out events; score = Pearson correlation with the real values.
* :class:`DetectionScorer` (delphi's method) has an LLM say on which held-out contexts the head
  fires; score = ROC AUC (equal to balanced accuracy when the answers are yes / no).

Unparseable LLM answers are excluded from the score and counted in ``n_unparseable``; they are
never scored as zero. LLM scorers record per-event predictions in ``details`` (``predicted``,
``actual``, ``event_ids`` = indices into ``ScoringItem.events``, ``predicted_scale``) for
refinement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .prompts import (ParseError, detection_messages, expected_values_from_logprobs,
                      parse_detection, parse_simulation, simulation_messages)
from .records import Event, Explanation, ScoreResult, head_label, make_unit

__all__ = ["Scorer", "ScoringItem", "ContrastiveScorer", "SimulationScorer", "DetectionScorer",
           "score_explanations", "split_events", "cohens_d"]

_MAX_REASONS = 5  # unparseable reasons kept per result (enough to diagnose, small to store)


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score_many(self, items: Sequence["ScoringItem"]) -> list[ScoreResult]:
        ...


@dataclass
class ScoringItem:
    """One explanation of one unit and the held-out events to score it on (``kind`` says
    which are top-activating and which random / quantile). ``head`` is the unit's index in its
    layer; ``unit_kind`` says whether it is a head or a neuron."""

    layer: int
    head: int
    explanation: Explanation
    events: list[Event] = field(default_factory=list)
    unit_kind: str = "head"

    @property
    def unit(self):
        return make_unit(self.layer, self.head, self.unit_kind)

    @property
    def label(self) -> str:
        return self.unit.label


def _check_items(items: Sequence[ScoringItem]) -> list[ScoringItem]:
    items = list(items)
    for i, item in enumerate(items):
        if not isinstance(item, ScoringItem):
            raise TypeError(f"items[{i}]={item!r}: expected a ScoringItem")
        if not isinstance(item.explanation, Explanation):
            raise TypeError(f"items[{i}].explanation={item.explanation!r}: expected an Explanation")
    return items


def split_events(events: Sequence[Event], holdout_fraction: float = 0.5, seed: int = 0
                 ) -> tuple[list[Event], list[Event]]:
    """``(shown, held_out)``: explain on one part, score on the other, stratified by ``kind``.

    Within each kind, ``round(n * holdout_fraction)`` events (at least 1 and at most n - 1 when
    n >= 2; a lone event is shown) are held out at random; both parts keep the input order.
    """
    if isinstance(holdout_fraction, bool) or not isinstance(holdout_fraction, (int, float)) \
            or not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction={holdout_fraction!r}: expected a number in (0, 1)")
    events = list(events)
    rng = np.random.default_rng(seed)
    by_kind: dict[str, list[int]] = {}
    for index, event in enumerate(events):
        by_kind.setdefault(event.kind, []).append(index)
    held: set[int] = set()
    for kind in sorted(by_kind):
        indices = by_kind[kind]
        if len(indices) < 2:
            continue
        n_hold = min(len(indices) - 1, max(1, int(round(len(indices) * holdout_fraction))))
        held.update(int(i) for i in rng.choice(indices, size=n_hold, replace=False))
    return ([e for i, e in enumerate(events) if i not in held],
            [e for i, e in enumerate(events) if i in held])


def score_explanations(scorers: Sequence[Scorer], items: Sequence[ScoringItem]
                       ) -> list[dict[str, ScoreResult]]:
    """Every scorer on every item: ``[{scorer name: ScoreResult}, ...]`` in item order."""
    items = _check_items(items)
    names = [getattr(s, "name", None) for s in scorers]
    if len(set(names)) != len(names) or None in names:
        raise ValueError(f"scorers have names {names}: expected distinct names")
    out: list[dict[str, ScoreResult]] = [{} for _ in items]
    for scorer in scorers:
        results = scorer.score_many(items)
        if len(results) != len(items):
            raise RuntimeError(f"scorer {scorer.name!r} returned {len(results)} results for {len(items)} items")
        for slot, result in zip(out, results):
            slot[scorer.name] = result
    return out


# ---------------------------------------------------------------------------------------------
# Contrastive
# ---------------------------------------------------------------------------------------------

def cohens_d(positive: Sequence[float], negative: Sequence[float]) -> tuple[float | None, str | None]:
    """Cohen's d with the pooled standard deviation, or ``(None, reason)`` when undefined."""
    a, b = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None, f"too few examples ({len(a)} positive, {len(b)} negative; need >= 2 each)"
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    sd = math.sqrt(pooled)
    if not sd > 1e-12 * max(1.0, abs(a.mean()), abs(b.mean())):
        return None, "zero variance in the head's activation on the examples"
    return float((a.mean() - b.mean()) / sd), None


class ContrastiveScorer:
    """Cohen's d of the head's activation between the explanation's positive and negative texts.

    Each text is tokenised with BOS (``model.to_tokens``), cut to the model's context, and its
    activation is ``reduce`` over positions >= ``min_position`` of the head's ``salience``, the
    quantity that chose the events (:func:`interp_lib.explain.events.head_salience`; pass the run's
    ``ExplainConfig.salience``). ``next_token_effect`` (the default) is the head's direct effect on
    the logit of the token that actually comes next; the text's last position, which has no next
    token, is left out (a text needs ``min_position + 2`` tokens). ``z_norm`` (``||z||``) and
    ``resid_write_norm`` (``||z W_O||``) use every position >= ``min_position``.

    Why the salience matters (measured on toy-2l, the heuristic induction explanation's own
    examples): by ``||z||`` the verified induction heads L1H0 / L1H1 look *less* active on
    repeated text (d < 0), so the scorer contradicted explanations that are true; by
    ``next_token_effect`` all three induction heads are clearly positive.

    ``reduce="mean"`` is the default because ``max`` is dominated by the first few positions,
    where a head averages few values and ``||z||`` is large whatever the text. ``reduce="max"``
    asks whether the head fires anywhere.
    """

    name = "contrastive"

    def __init__(self, model, *, batch_size: int = 16, reduce: str = "mean", min_position: int = 1,
                 salience: str = "next_token_effect", progress: bool = False):
        from .events import SALIENCE


        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce={reduce!r}: expected 'mean' or 'max'")
        if isinstance(min_position, bool) or not isinstance(min_position, int) or min_position < 0:
            raise ValueError(f"min_position={min_position!r}: expected an integer >= 0")
        if salience not in SALIENCE:
            raise ValueError(f"salience={salience!r}: expected one of {', '.join(SALIENCE)}")
        self.model, self.batch_size, self.reduce, self.salience = model, batch_size, reduce, salience
        self.min_position, self.progress = min_position, progress

    @torch.no_grad()
    def activations(self, texts: Sequence[str], heads: Sequence) -> list[float | None]:
        """Activation of unit ``heads[i]`` on ``texts[i]``; None for a text with no position
        scored. A unit is a ``Head`` / ``(layer, head)`` pair (read by the scorer's salience) or a
        ``Neuron`` (read as its activation, every position >= ``min_position``)."""
        from ..units import Head, Neuron
        from .events import unit_activation

        if len(texts) != len(heads):
            raise ValueError(f"texts has {len(texts)} entries and heads {len(heads)}: expected equal lengths")
        n_ctx = int(self.model.cfg.n_ctx)
        rows = [self.model.to_tokens(str(t))[0, :n_ctx].cpu() for t in texts]
        # next_token_effect has no value at a text's last position (no next token); with right
        # padding that position would see the padding as its next token, so it is cut here
        units = [h if isinstance(h, (Head, Neuron)) else Head(int(h[0]), int(h[1])) for h in heads]
        cuts = [1 if self.salience == "next_token_effect" and u.kind == "head" else 0 for u in units]
        out: list[float | None] = [None] * len(texts)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths pad less
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="contrastive")
        for batch in batches:
            batch = [i for i in batch if len(rows[i]) - cuts[i] > self.min_position]
            if not batch:
                continue
            lengths = [len(rows[i]) for i in batch]
            width = max(2, *lengths)  # head_salience takes at least 2 positions
            # Right padding is safe: causal attention never lets a position see later padding.
            tokens = torch.full((len(batch), width), int(rows[batch[0]][0]), dtype=torch.long)
            for j, i in enumerate(batch):
                tokens[j, : lengths[j]] = rows[i]
            wanted = [units[i] for i in batch]
            values = unit_activation(self.model, tokens, sorted(set(wanted)), self.salience)
            for j, i in enumerate(batch):
                scored = values[wanted[j]][j, self.min_position: lengths[j] - cuts[i]].float()
                out[i] = float(scored.mean() if self.reduce == "mean" else scored.max())
        return out

    def score_many(self, items: Sequence[ScoringItem]) -> list[ScoreResult]:
        items = _check_items(items)
        texts, heads, owners = [], [], []
        for index, item in enumerate(items):
            for sign, group in ((1, item.explanation.positive_examples), (0, item.explanation.negative_examples)):
                for text in group:
                    texts.append(text)
                    heads.append(item.unit)
                    owners.append((index, sign))
        values = self.activations(texts, heads) if texts else []
        per_item: list[dict[int, list[float]]] = [{1: [], 0: []} for _ in items]
        skipped = [0] * len(items)
        for (index, sign), value in zip(owners, values):
            if value is None:
                skipped[index] += 1
            else:
                per_item[index][sign].append(value)
        results = []
        for index, item in enumerate(items):
            pos, neg = per_item[index][1], per_item[index][0]
            d, failure = cohens_d(pos, neg)
            results.append(ScoreResult(
                self.name, d, n=len(pos) + len(neg), failure=failure,
                details={"positive": pos, "negative": neg, "reduce": self.reduce, "salience": self.salience,
                         "mean_positive": float(np.mean(pos)) if pos else None,
                         "mean_negative": float(np.mean(neg)) if neg else None,
                         "skipped_texts": skipped[index]}))
        return results


# ---------------------------------------------------------------------------------------------
# LLM scorers: shared helpers
# ---------------------------------------------------------------------------------------------

def _context(event: Event, max_tokens: int) -> list[str]:
    if not 0 <= event.position < len(event.tokens):
        raise ValueError(f"event {event.label} window {event.window}: position={event.position} is "
                         f"outside its {len(event.tokens)} tokens")
    tokens = list(event.tokens[: event.position + 1])
    return tokens[-max_tokens:]


class SimulationScorer:
    """OpenAI's simulation score, per event.

    An :class:`Event` stores only the activation at its query, so each held-out event is one
    simulation: the simulator predicts 0-10 for every token of the event's context (the last
    ``max_tokens_per_event`` tokens ending at the query) and the query's value is compared with
    the event's real activation. Score = Pearson correlation across the item's events (a mix
    of top and random events, so the real values vary). With log-probabilities the query value
    is the expectation over the digit tokens ``0``..``10`` (OpenAI's method); without them, the
    value written. ``use_logprobs``: ``"auto"`` requests them unless the client knows the
    endpoint lacks them, ``True`` always requests them, ``False`` never; an answer without usable
    logprobs falls back to its written values (``details["n_logprob_values"]`` counts the rest).
    """

    name = "simulation"

    def __init__(self, client, *, use_logprobs: bool | str = "auto", max_tokens_per_event: int = 64,
                 top_logprobs: int = 10, min_events: int = 3):
        if use_logprobs not in (True, False, "auto"):
            raise ValueError(f"use_logprobs={use_logprobs!r}: expected True, False or 'auto'")
        for name, value in (("max_tokens_per_event", max_tokens_per_event), ("top_logprobs", top_logprobs),
                            ("min_events", min_events)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if min_events < 3:  # a Pearson correlation of fewer than 3 points means nothing
            raise ValueError(f"min_events={min_events!r}: expected an integer >= 3 (a correlation "
                             "needs at least 3 events)")
        self.client, self.use_logprobs = client, use_logprobs
        self.max_tokens_per_event, self.top_logprobs = max_tokens_per_event, min(20, top_logprobs)
        self.min_events = min_events

    def _wants_logprobs(self) -> bool:
        if self.use_logprobs == "auto":
            return getattr(self.client, "supports_logprobs", None) is not False
        return bool(self.use_logprobs)

    def score_many(self, items: Sequence[ScoringItem]) -> list[ScoreResult]:
        from .client import ChatRequest

        items = _check_items(items)
        logprobs = self._wants_logprobs()
        requests, owners = [], []
        skipped = [0] * len(items)
        for index, item in enumerate(items):
            for event_index, event in enumerate(item.events):
                if not math.isfinite(event.activation):  # nothing to correlate with
                    skipped[index] += 1
                    continue
                tokens = _context(event, self.max_tokens_per_event)
                requests.append(ChatRequest(
                    messages=simulation_messages(item.explanation, tokens, item.unit_kind),
                    max_tokens=16 + 12 * len(tokens), temperature=0.0, json_mode=True,
                    logprobs=logprobs, top_logprobs=self.top_logprobs if logprobs else None,
                    tag=f"simulate {item.label}"))
                owners.append((index, event_index, len(tokens)))
        answers = self.client.chat_many(requests, desc="simulate") if requests else []
        collected: list[dict[str, Any]] = [
            {"predicted": [], "actual": [], "event_ids": [], "kinds": [], "n_unparseable": 0,
             "n_failed": 0, "reasons": [], "n_logprob_values": 0} for _ in items]
        for (index, event_index, n_tokens), answer in zip(owners, answers):
            slot, event = collected[index], items[index].events[event_index]
            if not answer.ok:
                slot["n_failed"] += 1
                _keep_reason(slot, f"request failed: {answer.failure}")
                continue
            try:
                values = parse_simulation(answer.content, n_tokens)
            except ParseError as error:
                slot["n_unparseable"] += 1
                _keep_reason(slot, f"unparseable: {error.reason}")
                continue
            expected = expected_values_from_logprobs(answer.logprobs, n_tokens) if answer.logprobs else None
            # per value: the expectation where it applies, else the value written
            if expected is not None and expected[-1] is not None:
                values = [w if e is None else e for w, e in zip(values, expected)]
                slot["n_logprob_values"] += 1
            slot["predicted"].append(float(values[-1]))
            slot["actual"].append(float(event.activation))
            slot["event_ids"].append(event_index)
            slot["kinds"].append(event.kind)
        for slot, n_skipped in zip(collected, skipped):
            slot["n_skipped"] = n_skipped
        return [self._result(item, slot) for item, slot in zip(items, collected)]

    def _result(self, item: ScoringItem, slot: dict[str, Any]) -> ScoreResult:
        predicted, actual = slot["predicted"], slot["actual"]
        n_total = len(item.events) - slot["n_skipped"]
        details = {"predicted": predicted, "actual": actual, "event_ids": slot["event_ids"],
                   "kinds": slot["kinds"], "predicted_scale": 10.0, "n_failed_requests": slot["n_failed"],
                   "n_logprob_values": slot["n_logprob_values"], "reasons": slot["reasons"],
                   "n_skipped_events": slot["n_skipped"]}
        score, failure = None, None
        if len(predicted) < self.min_events:
            failure = f"too few parseable simulations ({len(predicted)} of {n_total})"
        else:
            score, failure = _pearson(predicted, actual)
        return ScoreResult(self.name, score, n=len(predicted), n_unparseable=slot["n_unparseable"],
                           details=details, failure=failure)


def _keep_reason(slot: dict[str, Any], reason: str) -> None:
    if len(slot["reasons"]) < _MAX_REASONS:
        slot["reasons"].append(reason)


def _pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, str | None]:
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if np.ptp(a) == 0:
        return None, "the simulated values are constant: correlation undefined"
    if np.ptp(b) == 0:
        return None, "the real activations are constant: correlation undefined"
    return float(np.corrcoef(a, b)[0, 1]), None


class DetectionScorer:
    """delphi's detection score.

    Held-out ``top`` events are positives; random / quantile events are negatives, except those
    at least as strong as the weakest top event, which are left out (``details["n_ambiguous"]``).
    They are shuffled (``seed``, per head) into prompts of ``n_per_prompt`` contexts; the LLM
    answers which contexts the head fires on (or, with ``probabilities=True``, a probability per
    context). Score = ROC AUC over parsed contexts; ``details`` also has ``balanced_accuracy``
    (threshold 0.5). ``n_unparseable`` counts unparseable answers (each covers a whole prompt;
    ``details["n_unparseable_contexts"]`` counts the contexts lost).
    """

    name = "detection"

    def __init__(self, client, *, n_per_prompt: int = 10, seed: int = 0, probabilities: bool = False,
                 max_context: int = 32):
        for name, value in (("n_per_prompt", n_per_prompt), ("max_context", max_context)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        self.client, self.n_per_prompt, self.seed = client, n_per_prompt, int(seed)
        self.probabilities, self.max_context = bool(probabilities), max_context

    def score_many(self, items: Sequence[ScoringItem]) -> list[ScoreResult]:
        from .client import ChatRequest

        items = _check_items(items)
        requests, owners = [], []
        ambiguous = []
        for index, item in enumerate(items):
            usable = self._usable(item.events)
            ambiguous.append(len(item.events) - len(usable))
            rng = np.random.default_rng([self.seed, item.layer, item.head])
            order = [usable[int(i)] for i in rng.permutation(len(usable))]
            for start in range(0, len(order), self.n_per_prompt):
                chunk = order[start:start + self.n_per_prompt]
                contexts = [_context(item.events[i], self.max_context) for i in chunk]
                requests.append(ChatRequest(
                    messages=detection_messages(item.explanation, contexts, probabilities=self.probabilities,
                                                kind=item.unit_kind),
                    max_tokens=32 + 8 * len(chunk), temperature=0.0, json_mode=True,
                    tag=f"detect {item.label}"))
                owners.append((index, chunk))
        answers = self.client.chat_many(requests, desc="detect") if requests else []
        collected: list[dict[str, Any]] = [
            {"predicted": [], "actual": [], "event_ids": [], "n_unparseable": 0, "n_lost": 0,
             "n_failed": 0, "reasons": []} for _ in items]
        for (index, chunk), answer in zip(owners, answers):
            slot = collected[index]
            if not answer.ok:
                slot["n_failed"] += 1
                slot["n_lost"] += len(chunk)
                _keep_reason(slot, f"request failed: {answer.failure}")
                continue
            try:
                values = parse_detection(answer.content, len(chunk))
            except ParseError as error:
                slot["n_unparseable"] += 1
                slot["n_lost"] += len(chunk)
                _keep_reason(slot, f"unparseable: {error.reason}")
                continue
            for event_index, value in zip(chunk, values):
                slot["predicted"].append(float(value))
                slot["actual"].append(1.0 if items[index].events[event_index].kind == "top" else 0.0)
                slot["event_ids"].append(event_index)
        for slot, n_ambiguous in zip(collected, ambiguous):
            slot["n_ambiguous"] = n_ambiguous
        return [self._result(item, slot) for item, slot in zip(items, collected)]

    @staticmethod
    def _usable(events: Sequence[Event]) -> list[int]:
        """Indices of top events and of the other events below every top event's activation (a
        random or quantile event as strong as a top one is no clear negative)."""
        tops = [e.activation for e in events if e.kind == "top" and math.isfinite(e.activation)]
        floor = min(tops) if tops else math.inf
        return [i for i, e in enumerate(events) if e.kind == "top" or e.activation < floor]

    def _result(self, item: ScoringItem, slot: dict[str, Any]) -> ScoreResult:
        from sklearn.metrics import roc_auc_score

        predicted, actual = np.asarray(slot["predicted"]), np.asarray(slot["actual"])
        n_pos_events = sum(e.kind == "top" for e in item.events)
        details = {"predicted": slot["predicted"], "actual": slot["actual"], "event_ids": slot["event_ids"],
                   "predicted_scale": 1.0, "n_unparseable_contexts": slot["n_lost"],
                   "n_failed_requests": slot["n_failed"], "reasons": slot["reasons"],
                   "n_positive": int(actual.sum()), "n_negative": int(len(actual) - actual.sum()),
                   "balanced_accuracy": None, "auc": None, "n_ambiguous": slot["n_ambiguous"]}
        n_neg_events = len(item.events) - n_pos_events - slot["n_ambiguous"]
        if n_pos_events == 0 or n_neg_events == 0:
            failure = (f"needs both top (positive) and weaker other (negative) events: got "
                       f"{n_pos_events} top and {n_neg_events} negative of {len(item.events)}")
            return ScoreResult(self.name, None, n=len(predicted), n_unparseable=slot["n_unparseable"],
                               details=details, failure=failure)
        if details["n_positive"] == 0 or details["n_negative"] == 0:
            failure = (f"too few parseable contexts: {details['n_positive']} positive and "
                       f"{details['n_negative']} negative of {len(item.events)}")
            return ScoreResult(self.name, None, n=len(predicted), n_unparseable=slot["n_unparseable"],
                               details=details, failure=failure)
        said = predicted >= 0.5
        tpr = float(said[actual == 1].mean())
        tnr = float((~said[actual == 0]).mean())
        details["balanced_accuracy"] = (tpr + tnr) / 2
        details["auc"] = float(roc_auc_score(actual, predicted))
        return ScoreResult(self.name, details["auc"], n=len(predicted), n_unparseable=slot["n_unparseable"],
                           details=details)
