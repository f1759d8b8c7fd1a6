"""Stage 3 of the head explainer: prompts, answer parsers and the LLM explainer.

Prompt construction is ordinary code and the tests pin its exact text. Every prompt shows
token text with whitespace made visible (:func:`visible_token`) and marks the query token
``[[like this]]``; explainer prompts also mark the tokens the head attends to from the query
``{like this|0.62}`` with their attention weight (simulation and detection prompts do not: the
attention pattern is the head's behaviour, which the simulator must predict, not read).

Parsers raise :class:`ParseError` with a reason; callers count such answers as unparseable and
never score them as zero or store them as explanations.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .records import Event, Explanation, head_label

__all__ = ["EXPLAIN_SYSTEM", "SIMULATE_SYSTEM", "DETECT_SYSTEM", "REFINE_SYSTEM", "ParseError",
           "visible_token", "format_event", "format_context", "approx_token_count",
           "explanation_messages", "parse_explanation", "simulation_messages", "parse_simulation",
           "expected_values_from_logprobs", "detection_messages", "parse_detection",
           "refinement_messages", "LLMExplainer"]

_EXPLANATION_FORMAT = (
    '{"explanation": "<one or two sentences: what the head does>", '
    '"attends_from": "<the query tokens it is active on>", '
    '"attends_to": "<the earlier tokens it attends to from them>", '
    '"positive_examples": ["<text>", ...], "negative_examples": ["<text>", ...]}')

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher explaining what one attention head of a transformer "
    "language model does. You are shown texts that each end at a query token where the head was "
    "measured. Say which query tokens the head is active on (attends from), which earlier tokens "
    "it attends to (attends to), and what it seems to compute. Then write test texts: positive "
    "examples are short texts (one or two sentences) in which the head should be strongly active "
    "at some token; negative examples are similar texts in which it should not be.\n"
    "Answer with one JSON object and nothing else:\n"
    f"{_EXPLANATION_FORMAT}\n"
    "Give 4 to 8 positive and 4 to 8 negative examples.")

SIMULATE_SYSTEM = (
    "You simulate one attention head of a language model from a description of what it does. "
    "You are given the description and a text split into numbered tokens. For each token, "
    "predict how strongly the head is active when that token is the query (the head sees only "
    "the tokens up to it), from 0 (not at all) to 10 (as strongly as it ever is). Most tokens "
    "are usually 0.\n"
    'Answer with one JSON object and nothing else: {"activations": [<integer 0-10 for token 1>, '
    "<for token 2>, ...]} with exactly one integer per token, in order. If you cannot write "
    "JSON, write one line per token instead: the token, a tab, its integer.")

DETECT_SYSTEM = (
    "You check a description of one attention head of a language model. You are given the "
    "description and numbered texts; each ends at a query token marked [[like this]]. Decide for "
    "each text whether the head is strongly active at its marked query token, according to the "
    "description.\n"
    'Answer with one JSON object and nothing else: {"fires": [<numbers of the texts where it '
    "is active>]}.")

DETECT_SYSTEM_PROBABILITIES = (
    "You check a description of one attention head of a language model. You are given the "
    "description and numbered texts; each ends at a query token marked [[like this]]. Decide for "
    "each text how likely the head is strongly active at its marked query token, according to "
    "the description.\n"
    'Answer with one JSON object and nothing else: {"probabilities": [<probability 0-1 for text '
    "1>, <for text 2>, ...]} with exactly one number per text, in order.")

REFINE_SYSTEM = (
    "You are an interpretability researcher revising your explanation of one attention head of a "
    "transformer language model. You are given your current explanation and texts where a "
    "simulator that read it predicted the head's activation at the marked query token badly "
    "(0 = not active, 10 = as active as it ever is). Tokens the head attends to from the query "
    "are marked {like this|0.62} with their attention weight. Revise the explanation so that it "
    "predicts these texts correctly without losing what it already got right.\n"
    "Answer with one JSON object and nothing else, in the same format:\n"
    f"{_EXPLANATION_FORMAT}\n"
    "Give 4 to 8 positive and 4 to 8 negative examples.")

_EVENT_NOTE = (
    "Each example is a text that ends at a query token marked [[like this]]. Tokens the head "
    "attends to from that query are marked {like this|0.62} with their attention weight; strong "
    "attention to tokens before the shown text is listed after it. The activation is the size "
    "of the head's output at the query: higher means the head does more there.")

# MLP neurons: the same prompts, about a neuron's activation at a token (nothing is attended)
_NEURON_EXPLANATION_FORMAT = (
    '{"explanation": "<one or two sentences: what makes the neuron active>", '
    '"positive_examples": ["<text>", ...], "negative_examples": ["<text>", ...]}')

NEURON_EXPLAIN_SYSTEM = (
    "You are an interpretability researcher explaining what one MLP neuron of a transformer "
    "language model responds to. You are shown texts that each end at a token where the neuron's "
    "activation was measured. Say which tokens or contexts make the neuron active and what it "
    "seems to detect. Then write test texts: positive examples are short texts (one or two "
    "sentences) in which the neuron should be strongly active at some token; negative examples "
    "are similar texts in which it should not be.\n"
    "Answer with one JSON object and nothing else:\n"
    f"{_NEURON_EXPLANATION_FORMAT}\n"
    "Give 4 to 8 positive and 4 to 8 negative examples.")

NEURON_SIMULATE_SYSTEM = SIMULATE_SYSTEM.replace("one attention head", "one MLP neuron").replace(
    "how strongly the head is active when that token is the query (the head sees only the tokens "
    "up to it)", "how strongly the neuron is active at that token (it sees only the tokens up to it)")
NEURON_DETECT_SYSTEM = DETECT_SYSTEM.replace("one attention head", "one MLP neuron").replace(
    "query token", "token").replace("the head", "the neuron")
NEURON_DETECT_SYSTEM_PROBABILITIES = DETECT_SYSTEM_PROBABILITIES.replace(
    "one attention head", "one MLP neuron").replace("query token", "token").replace("the head", "the neuron")
NEURON_REFINE_SYSTEM = (
    "You are an interpretability researcher revising your explanation of one MLP neuron of a "
    "transformer language model. You are given your current explanation and texts where a "
    "simulator that read it predicted the neuron's activation at the marked token badly "
    "(0 = not active, 10 = as active as it ever is). Revise the explanation so that it predicts "
    "these texts correctly without losing what it already got right.\n"
    "Answer with one JSON object and nothing else, in the same format:\n"
    f"{_NEURON_EXPLANATION_FORMAT}\n"
    "Give 4 to 8 positive and 4 to 8 negative examples.")

_NEURON_EVENT_NOTE = (
    "Each example is a text that ends at a token marked [[like this]]. The activation is the "
    "neuron's activation at that token (after the MLP nonlinearity): higher means it is more active.")


def _is_neuron_label(label: str) -> bool:
    return "N" in str(label).strip()[1:].upper()


def _noun(kind: str) -> str:
    if kind not in ("head", "neuron"):
        raise ValueError(f"kind={kind!r}: expected 'head' or 'neuron'")
    return kind


_KIND_TITLES = {"top": "Top-activating examples", "quantile": "Examples across the activation range",
                "random": "Random positions (for contrast)"}

_VISIBLE = {"\u0120": " ", "\u010a": "\u23ce", "\u0109": "\u21e5", "\n": "\u23ce", "\t": "\u21e5",
            "\r": "\u240d"}


class ParseError(ValueError):
    """An LLM answer that cannot be read; ``reason`` says why (it becomes ``"unparseable: ..."``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Rendering tokens and events
# ---------------------------------------------------------------------------------------------

def visible_token(token: str) -> str:
    """Token text with whitespace made visible on one line: byte-level ``Ġ`` -> space, newlines
    -> ``⏎``, tabs -> ``⇥``, carriage returns -> ``␍``."""
    return "".join(_VISIBLE.get(ch, ch) for ch in str(token))


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return value


def _event_tokens(event: Event) -> list[str]:
    if not isinstance(event, Event):
        raise TypeError(f"event={event!r}: expected an interp_lib.explain.Event")
    if not 0 <= event.position < len(event.tokens):
        raise ValueError(f"event {event.label} window {event.window}: position={event.position} is "
                         f"outside its {len(event.tokens)} tokens")
    return list(event.tokens[: event.position + 1])


def format_event(event: Event, *, max_context: int = 32, n_attended: int = 5) -> str:
    """One event as marked text: the query ``[[token]]``, attended sources ``{token|0.62}``.

    The context is cut on the left to ``max_context`` tokens ending at the query (``…`` marks
    the cut); the strongest attended sources before the cut are listed after the text as
    ``{token|weight} N tokens back``.
    """
    max_context = _check_int(max_context, "max_context", 1)
    n_attended = _check_int(n_attended, "n_attended", 0)
    tokens = _event_tokens(event)
    query = len(tokens) - 1
    attended = sorted(((int(p), float(w)) for p, w in event.attended), key=lambda pw: -pw[1])
    for source, _ in attended:
        if not 0 <= source <= query:
            raise ValueError(f"event {event.label} window {event.window}: attended source {source} "
                             f"is not in [0, {query}] (a head attends only up to its query)")
    weights = dict(attended[:n_attended])
    start = max(0, len(tokens) - max_context)
    parts = ["\u2026"] if start > 0 else []
    for index in range(start, len(tokens)):
        text = visible_token(tokens[index])
        if index in weights:
            text = "{" + text + f"|{weights[index]:.2f}" + "}"
        if index == query:
            text = "[[" + text + "]]"
        parts.append(text)
    hidden = [(p, w) for p, w in weights.items() if p < start]
    if hidden:
        notes = ", ".join("{" + visible_token(tokens[p]) + f"|{w:.2f}" + "}" + f" {query - p} tokens back"
                          for p, w in hidden)
        parts.append(f"   (also attends to: {notes})")
    return "".join(parts)


def format_context(tokens: Sequence[str], *, max_context: int | None = None) -> str:
    """Tokens as text whose last token is the marked query ``[[token]]`` (no attention marks)."""
    tokens = list(tokens)
    if not tokens:
        raise ValueError("tokens=[]: expected at least the query token")
    start = 0 if max_context is None else max(0, len(tokens) - _check_int(max_context, "max_context", 1))
    body = "".join(visible_token(t) for t in tokens[start:-1])
    return ("\u2026" if start > 0 else "") + body + "[[" + visible_token(tokens[-1]) + "]]"


def approx_token_count(text: str) -> int:
    """A conservative token estimate (about 3 characters a token) when no tokenizer is given."""
    return (len(text) + 2) // 3


def _explanation_user(label: str, events: Sequence[Event], max_context: int, n_attended: int) -> str:
    neuron = _is_neuron_label(label)
    lines = [f"MLP neuron {label}." if neuron else f"Attention head {label}.", "",
             _NEURON_EVENT_NOTE if neuron else _EVENT_NOTE]
    groups: dict[str, list[Event]] = {}
    for event in events:
        groups.setdefault(event.kind, []).append(event)
    order = [k for k in _KIND_TITLES if k in groups] + sorted(k for k in groups if k not in _KIND_TITLES)
    number = 0
    for kind in order:
        lines += ["", _KIND_TITLES.get(kind, f"{kind.capitalize()} examples") + ":"]
        for event in sorted(groups[kind], key=lambda e: -_finite(e.activation)):
            number += 1
            text = format_event(event, max_context=max_context, n_attended=n_attended)
            lines.append(f"{number}. activation {event.activation:.2f}: {text}")
    lines += ["", f"Explain what this {'neuron' if neuron else 'head'} does, in the JSON format given."]
    return "\n".join(lines)


def _finite(value: float) -> float:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def explanation_messages(label: str, events: Sequence[Event], *, max_prompt_tokens: int = 6000,
                         count_tokens: Callable[[str], int] | None = None, min_events: int = 3,
                         max_context: int = 32, n_attended: int = 5) -> list[dict]:
    """System + user messages asking for a head's explanation, shrunk to ``max_prompt_tokens``.

    Shrinking first shortens every context (32 -> 24 -> 16 -> 12 -> 8 tokens), then drops the
    weakest event of the larger group (top examples vs contrast examples), so the mix stays.
    Raises ValueError if even ``min_events`` events at the shortest context do not fit.
    """
    events = list(events)
    min_events = _check_int(min_events, "min_events", 1)
    max_prompt_tokens = _check_int(max_prompt_tokens, "max_prompt_tokens", 1)
    max_context = _check_int(max_context, "max_context", 1)
    if len(events) < min_events:
        raise ValueError(f"events has {len(events)} events for {label}: expected at least "
                         f"min_events={min_events}")
    count = count_tokens or approx_token_count

    def build(chosen: list[Event], context: int) -> tuple[list[dict], int]:
        system = NEURON_EXPLAIN_SYSTEM if _is_neuron_label(label) else EXPLAIN_SYSTEM
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": _explanation_user(label, chosen, context, n_attended)}]
        return messages, sum(count(m["content"]) for m in messages)

    contexts = [max_context] + [c for c in (24, 16, 12, 8) if c < max_context]
    for context in contexts:
        messages, size = build(events, context)
        if size <= max_prompt_tokens:
            return messages
    context = contexts[-1]
    chosen = list(events)
    while len(chosen) > min_events:
        tops = [e for e in chosen if e.kind == "top"]
        others = [e for e in chosen if e.kind != "top"]
        pool = tops if len(tops) > len(others) else (others or tops)
        weakest = min(pool, key=lambda e: _finite(e.activation))
        chosen.remove(weakest)
        messages, size = build(chosen, context)
        if size <= max_prompt_tokens:
            return messages
    raise ValueError(f"max_prompt_tokens={max_prompt_tokens} is too small for {label}: even "
                     f"min_events={min_events} events with {context}-token contexts need {size} tokens")


# ---------------------------------------------------------------------------------------------
# Reading JSON out of LLM answers
# ---------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def _find_json(content: str | None, kinds: tuple[type, ...]) -> Any:
    """The first JSON value of one of ``kinds`` in ``content`` (whole text, a ``` fence, or the
    first decodable ``{`` / ``[`` after leading prose). Objects are looked for before arrays, so
    prose like ``"Text [2] ... {"fires": [2, 4]}"`` gives the object, not ``[2]``."""
    if content is None or not str(content).strip():
        raise ParseError("empty answer")
    text = str(content).strip()
    candidates = [text] + [m.group(1).strip() for m in _FENCE_RE.finditer(text)]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, kinds):
            return value
    decoder = json.JSONDecoder()
    for kind in sorted(kinds, key=lambda k: k is not dict):  # objects first
        opener = {dict: "{", list: "["}[kind]
        index = text.find(opener)
        while index >= 0:
            try:
                value, _ = decoder.raw_decode(text, index)
            except ValueError:
                value = None
            if isinstance(value, kind):
                return value
            index = text.find(opener, index + 1)
    names = " or ".join({dict: "object", list: "array"}[k] for k in kinds)
    raise ParseError(f"no JSON {names} in the answer: {_snippet(text)}")


def _snippet(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else text[:n] + "...")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or value is None:
        raise ParseError(f"{where} is {value!r}, not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ParseError(f"{where} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise ParseError(f"{where} is {value!r}, not a finite number")
    return number


def parse_explanation(content: str | None, *, source: str) -> Explanation:
    """An :class:`Explanation` from the explainer's JSON answer (fences and prose tolerated).

    Raises ParseError for no JSON object, a missing or empty ``explanation``, or wrong types.
    """
    data = _find_json(content, (dict,))
    text = data.get("explanation")
    if text is None:
        raise ParseError(f"the JSON object has no 'explanation' (keys: {sorted(data)})")
    if not isinstance(text, str):
        raise ParseError(f"'explanation' is {type(text).__name__}, expected a string")
    if not text.strip():
        raise ParseError("'explanation' is empty")
    fields: dict[str, Any] = {}
    for key in ("attends_from", "attends_to"):
        value = data.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ParseError(f"{key!r} is {type(value).__name__}, expected a string")
        fields[key] = value.strip()
    for key in ("positive_examples", "negative_examples"):
        value = data.get(key, [])
        if value is None:
            value = []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ParseError(f"{key!r} is {_snippet(json.dumps(value))}, expected a list of strings")
        fields[key] = [v for v in value if v.strip()]
    return Explanation(text=text.strip(), source=source, **fields)


# ---------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------

def _describe(explanation: Explanation, kind: str = "head") -> list[str]:
    if not isinstance(explanation, Explanation):
        raise TypeError(f"explanation={explanation!r}: expected an interp_lib.explain.Explanation")
    lines = [f"{_noun(kind).capitalize()} description: {explanation.text}"]
    if explanation.attends_from:
        lines.append(f"Attends from: {explanation.attends_from}")
    if explanation.attends_to:
        lines.append(f"Attends to: {explanation.attends_to}")
    return lines


def simulation_messages(explanation: Explanation, event_tokens: Sequence[str], kind: str = "head") -> list[dict]:
    """Ask the simulator for one activation (0-10) per token of ``event_tokens`` (of a head, or
    with ``kind="neuron"`` of an MLP neuron)."""
    tokens = list(event_tokens)
    if not tokens:
        raise ValueError("event_tokens=[]: expected at least one token to simulate")
    lines = _describe(explanation, kind) + ["", f"Text ({len(tokens)} tokens):"]
    lines += [f"{i}\t{visible_token(t)}" for i, t in enumerate(tokens, 1)]
    lines += ["", f"Give the {len(tokens)} activations."]
    system = NEURON_SIMULATE_SYSTEM if kind == "neuron" else SIMULATE_SYSTEM
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]


def _clip10(values: list[float]) -> list[float]:
    return [min(10.0, max(0.0, v)) for v in values]


def parse_simulation(content: str | None, n_tokens: int) -> list[float]:
    """``n_tokens`` activations in [0, 10] from ``{"activations": [...]}`` (or a bare array), or
    from ``token<TAB>value`` lines when the answer holds no JSON. Values are clipped to [0, 10];
    a wrong count or a non-number raises ParseError."""
    n_tokens = _check_int(n_tokens, "n_tokens", 1)
    try:
        data = _find_json(content, (dict, list))
    except ParseError as json_error:
        values = _tab_values(content)
        if values is None:
            raise json_error
        if len(values) != n_tokens:
            raise ParseError(f"expected {n_tokens} 'token<TAB>value' lines, got {len(values)}") from None
        return _clip10(values)
    if isinstance(data, dict):
        if "activations" not in data:
            raise ParseError(f"the JSON object has no 'activations' (keys: {sorted(data)})")
        data = data["activations"]
    if not isinstance(data, list):
        raise ParseError(f"'activations' is {type(data).__name__}, expected a list")
    values = [_number(v, f"activation {i + 1}") for i, v in enumerate(data)]
    if len(values) != n_tokens:
        raise ParseError(f"expected {n_tokens} activations, got {len(values)}")
    return _clip10(values)


def _tab_values(content: str | None) -> list[float] | None:
    if not content:
        return None
    lines = [line for line in str(content).splitlines() if "\t" in line]
    if not lines:
        return None
    return [_number(line.rsplit("\t", 1)[1].strip(), f"value in line {line!r}") for line in lines]


_JSON_VALUES_RE = re.compile(r'"activations"\s*:\s*\[([^\]]*)\]')
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_DIGIT_TOKEN_RE = re.compile(r"[\s,\[:\"']*(\d{1,2})\s*")


def _value_offsets(content: str) -> list[int]:
    """Character offsets where each simulated value starts (JSON array or tab lines)."""
    match = _JSON_VALUES_RE.search(content)
    if match:
        return [match.start(1) + m.start() for m in _NUMBER_RE.finditer(match.group(1))]
    offsets, position = [], 0
    for line in content.splitlines(keepends=True):
        if "\t" in line:
            tab = line.rindex("\t")
            found = _NUMBER_RE.search(line, tab + 1)
            if found:
                offsets.append(position + found.start())
        position += len(line)
    return offsets


_NUMBER_TOKEN_STRIP = " \t\r\n,[]{}:\"'"


def expected_values_from_logprobs(logprobs: Sequence[Mapping] | None, n_tokens: int
                                  ) -> list[float | None] | None:
    """Expected activation per simulated token from the answer's top log-probabilities.

    Follows OpenAI's simulator: at each value position, the probabilities of the candidate
    tokens ``"0"``..``"10"`` are renormalised and their expectation taken. Returns None when the
    logprobs are missing, do not give exactly ``n_tokens`` value positions, or no position has a
    usable expectation. Otherwise one entry per value, None where the expectation does not
    apply, so the written value is used there:
    the sampled token is not the whole written integer (a tokenizer that writes ``10`` as ``1``,
    ``0`` or ``3.5`` as ``3``, ``.``, ``5``: the first token's alternatives are not the values),
    or it has no numeric alternative.
    """
    n_tokens = _check_int(n_tokens, "n_tokens", 1)
    if not logprobs:
        return None
    try:
        pieces = [str(entry["token"]) for entry in logprobs]
    except (KeyError, TypeError):
        return None
    content = "".join(pieces)
    offsets = _value_offsets(content)
    if len(offsets) != n_tokens:
        return None
    starts, position = [], 0
    for piece in pieces:
        starts.append(position)
        position += len(piece)
    values: list[float | None] = []
    for offset in offsets:
        index = max(i for i, s in enumerate(starts) if s <= offset)
        written = _NUMBER_RE.match(content, offset)
        end = offset + len(written.group()) if written else offset
        whole = (written is not None and end <= starts[index] + len(pieces[index])
                 and pieces[index].strip(_NUMBER_TOKEN_STRIP) == written.group()
                 and written.group().isdigit())
        top = (logprobs[index].get("top_logprobs") or []) if whole else []
        mass, total = 0.0, 0.0
        for candidate in top:
            try:
                match = _DIGIT_TOKEN_RE.fullmatch(str(candidate.get("token", "")))
                logprob = float(candidate["logprob"])
            except (AttributeError, KeyError, TypeError, ValueError):
                continue
            if not match or int(match.group(1)) > 10 or not math.isfinite(logprob):
                continue
            p = math.exp(logprob)
            mass += p
            total += p * int(match.group(1))
        values.append(total / mass if mass > 0.0 else None)
    return values if any(v is not None for v in values) else None


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

def detection_messages(explanation: Explanation, contexts: Sequence[Sequence[str]], *,
                       probabilities: bool = False, max_context: int | None = None, kind: str = "head") -> list[dict]:
    """Ask which numbered contexts (token lists; the last token is the query) the head fires
    on: ``{"fires": [numbers]}``, or ``{"probabilities": [...]}`` with ``probabilities=True``."""
    contexts = [list(c) for c in contexts]
    if not contexts:
        raise ValueError("contexts=[]: expected at least one context")
    lines = _describe(explanation, kind) + ["", "Texts:"]
    lines += [f"{i}. {format_context(c, max_context=max_context)}" for i, c in enumerate(contexts, 1)]
    lines += ["", f"Which of the {len(contexts)} texts is the {kind} strongly active on, at the marked token?"]
    if kind == "neuron":
        system = NEURON_DETECT_SYSTEM_PROBABILITIES if probabilities else NEURON_DETECT_SYSTEM
    else:
        system = DETECT_SYSTEM_PROBABILITIES if probabilities else DETECT_SYSTEM
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]


def parse_detection(content: str | None, n_contexts: int) -> list[float]:
    """One value per context: 1.0 / 0.0 from ``{"fires": [1-based numbers]}`` (or a bare array
    of numbers), or probabilities in [0, 1] from ``{"probabilities": [...]}``."""
    n_contexts = _check_int(n_contexts, "n_contexts", 1)
    data = _find_json(content, (dict, list))
    if isinstance(data, dict) and "probabilities" in data:
        probs = data["probabilities"]
        if not isinstance(probs, list):
            raise ParseError(f"'probabilities' is {type(probs).__name__}, expected a list")
        values = [_number(v, f"probability {i + 1}") for i, v in enumerate(probs)]
        if len(values) != n_contexts:
            raise ParseError(f"expected {n_contexts} probabilities, got {len(values)}")
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ParseError(f"probabilities {values} are not all in [0, 1]")
        return values
    if isinstance(data, dict):
        if "fires" not in data:
            raise ParseError(f"the JSON object has neither 'fires' nor 'probabilities' (keys: {sorted(data)})")
        data = data["fires"]
    if not isinstance(data, list):
        raise ParseError(f"'fires' is {type(data).__name__}, expected a list of text numbers")
    fires = [0.0] * n_contexts
    for item in data:
        number = _number(item, "text number")
        if number != int(number) or not 1 <= number <= n_contexts:
            raise ParseError(f"text number {item!r} is not one of 1..{n_contexts}")
        fires[int(number) - 1] = 1.0
    return fires


# ---------------------------------------------------------------------------------------------
# Refinement
# ---------------------------------------------------------------------------------------------

def _explanation_json(explanation: Explanation, neuron: bool = False) -> str:
    attends = {} if neuron else {"attends_from": explanation.attends_from, "attends_to": explanation.attends_to}
    return json.dumps({"explanation": explanation.text, **attends,
                       "positive_examples": list(explanation.positive_examples),
                       "negative_examples": list(explanation.negative_examples)},
                      indent=1, ensure_ascii=False)


def refinement_messages(label: str, explanation: Explanation,
                        wrong_events: Sequence[tuple[Event, float, float]], *, max_context: int = 32,
                        n_attended: int = 5, rejected: Sequence[Explanation] = ()) -> list[dict]:
    """Show the explainer its explanation and the events it got wrong (predicted vs actual
    activation, both on the 0-10 scale) and ask for a revision in the same JSON format.

    ``rejected``: earlier revisions of this explanation that scored no better; they are listed
    and the explainer is told to write something different (so a later round is a new request,
    not a repeat of one whose answer is already known)."""
    if not isinstance(explanation, Explanation):
        raise TypeError(f"explanation={explanation!r}: expected an interp_lib.explain.Explanation")
    neuron = _is_neuron_label(label)
    lines = [f"MLP neuron {label}." if neuron else f"Attention head {label}.", "", "Current explanation:",
             _explanation_json(explanation, neuron), ""]
    if wrong_events:
        lines.append(f"Texts it got wrong (activation at the marked {'token' if neuron else 'query'}, 0-10):")
        for i, (event, predicted, actual) in enumerate(wrong_events, 1):
            text = format_event(event, max_context=max_context, n_attended=n_attended)
            lines.append(f"{i}. predicted {float(predicted):.1f}, actual {float(actual):.1f}: {text}")
    else:
        lines.append("No per-text errors are available; make the explanation more precise.")
    rejected = list(rejected)
    for i, candidate in enumerate(rejected, 1):
        if not isinstance(candidate, Explanation):
            raise TypeError(f"rejected[{i - 1}]={candidate!r}: expected an "
                            "interp_lib.explain.Explanation")
    if rejected:
        lines += ["", "Your previous revision(s) below scored no better than the current "
                      "explanation on other texts; do not repeat them, write a clearly different revision:"]
        lines += [f"Rejected revision {i}: {json.dumps(c.text, ensure_ascii=False)}"
                  for i, c in enumerate(rejected, 1)]
    lines += ["", "Write the revised explanation, in the JSON format given."]
    return [{"role": "system", "content": NEURON_REFINE_SYSTEM if neuron else REFINE_SYSTEM},
            {"role": "user", "content": "\n".join(lines)}]


# ---------------------------------------------------------------------------------------------
# The explainer
# ---------------------------------------------------------------------------------------------

class LLMExplainer:
    """Asks an LLM (an ``LLMClient``) to explain heads from their events, all heads concurrently.

    ``count_tokens`` measures prompts for shrink-to-fit (default: :func:`approx_token_count`).
    """

    def __init__(self, client, *, max_prompt_tokens: int = 6000, max_tokens: int = 600,
                 count_tokens: Callable[[str], int] | None = None, min_events: int = 3,
                 temperature: float = 0.0):
        self.client = client
        self.max_prompt_tokens = _check_int(max_prompt_tokens, "max_prompt_tokens", 1)
        self.max_tokens = _check_int(max_tokens, "max_tokens", 1)
        self.count_tokens = count_tokens
        self.min_events = _check_int(min_events, "min_events", 1)
        self.temperature = temperature

    @property
    def source(self) -> str:
        return f"llm:{getattr(self.client, 'model', 'unknown')}"

    def explain_many(self, heads_events: Mapping[tuple[int, int], Sequence[Event]]
                     ) -> dict[tuple[int, int], tuple[Explanation | None, str | None]]:
        """``{(layer, head): (explanation, None)}`` or ``(None, reason)``: ``"unparseable: ..."``,
        ``"request failed: ..."``, or ``"prompt: ..."`` (too few events / does not fit)."""
        from .client import ChatRequest

        out: dict[tuple[int, int], tuple[Explanation | None, str | None]] = {}
        pending, requests = [], []
        for key, events in heads_events.items():
            label = key.label if hasattr(key, "label") else head_label(*key)
            try:
                messages = explanation_messages(label, list(events),
                                                max_prompt_tokens=self.max_prompt_tokens,
                                                count_tokens=self.count_tokens, min_events=self.min_events)
            except ValueError as error:
                out[key] = (None, f"prompt: {error}")
                continue
            pending.append(key)
            requests.append(ChatRequest(messages=messages, max_tokens=self.max_tokens,
                                        temperature=self.temperature, json_mode=True,
                                        tag=f"explain {label}"))
        results = self.client.chat_many(requests, desc="explain") if requests else []
        for key, result in zip(pending, results):
            out[key] = self._read(result)
        return {key: out[key] for key in heads_events}

    def _read(self, result) -> tuple[Explanation | None, str | None]:
        if not result.ok:
            return None, f"request failed: {result.failure}"
        try:
            return parse_explanation(result.content, source=self.source), None
        except ParseError as error:
            cut = (f" (answer cut at max_tokens={self.max_tokens})"
                   if result.finish_reason == "length" else "")
            return None, f"unparseable: {error.reason}{cut}"
