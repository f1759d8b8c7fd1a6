"""The heuristic (no-LLM) head explainer: attention statistics -> a family and a sentence.

It is the baseline every LLM explanation is compared against, and the offline default of the
explainer pipeline. :func:`head_statistics` measures, per head, where its attention goes on
natural text windows and on repeated random tokens; :func:`heuristic_explanation` turns one row
into an :class:`~interp_lib.explain.records.Explanation` by deterministic threshold rules.

Statistics (attention fractions in [0, 1], averaged over windows and the queries named):

* ``bos``: attention on the BOS key (position 0), queries ``q >= 1``.
* ``self``: attention on the query's own position, queries ``q >= 1``.
* ``prev``: attention on key ``q - 1``, queries ``q >= 2`` (query 1's previous token is BOS).
* ``recent``: total attention on keys 2..5 tokens back (``2 <= q - k <= 5``, BOS excluded),
  queries ``q >= 2``: a local window that is not just the previous token.
* ``punctuation``: attention on non-BOS keys ``k <= q`` whose token is a delimiter
  (punctuation only, or containing a newline), queries ``q >= 1``; ``punctuation_base`` is what
  uniform attention over the same keys would give (delimiters are common in code).
* ``same_token``: attention on earlier non-BOS occurrences of the query's own token, over the
  queries that have one; ``same_token_base`` is uniform attention's value on the same queries.
* ``mean_distance``: expected ``q - k`` in tokens under the attention renormalised without BOS,
  queries ``q >= 1``.
* ``entropy``: attention entropy divided by ``log(q + 1)`` (1 = uniform), queries ``q >= 1``.
* ``induction``: on ``BOS + S + S`` (``S`` random tokens of ``repeat_length``), attention from
  the second copy to the token after the query token's earlier occurrence (key ``q - L + 1``).
* ``repeat_duplicate``: the same sequences, attention to the earlier occurrence itself (``q - L``).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from .records import Explanation, head_label

HEURISTIC_FAMILIES = ["previous-token", "bos/resting", "induction", "duplicate-token", "self",
                      "punctuation/delimiter", "recent-window", "diffuse/mixed"]

#: Minimum attention fraction for a family (``duplicate-token`` and ``punctuation/delimiter``
#: also need twice what uniform attention would give). ``bos/resting`` applies only when no
#: other family does; otherwise the head is ``diffuse/mixed``.
THRESHOLDS = {"induction": 0.3, "previous-token": 0.4, "duplicate-token": 0.3, "self": 0.4,
              "punctuation/delimiter": 0.35, "recent-window": 0.35, "bos/resting": 0.5}
BASE_RATIO = 2.0

STAT_COLUMNS = ("bos", "self", "prev", "recent", "punctuation", "punctuation_base", "same_token",
                "same_token_base", "mean_distance", "entropy", "induction", "repeat_duplicate")

# Which statistic backs each family (the percentage quoted in the explanation).
_FEATURE = {"induction": "induction", "previous-token": "prev", "self": "self",
            "punctuation/delimiter": "punctuation", "recent-window": "recent", "bos/resting": "bos"}


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

def is_delimiter(text: str) -> bool:
    """A token that is punctuation only (``"."``, ``" ("``, ``"):"``) or contains a newline."""
    if "\n" in text:
        return True
    visible = text.strip()
    return bool(visible) and all(unicodedata.category(ch).startswith("P") for ch in visible)


def _delimiter_mask(model, tokens: Tensor) -> Tensor:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    ids = torch.unique(tokens).tolist()
    table = torch.zeros(int(max(ids)) + 1, dtype=torch.bool)
    for i in ids:
        table[i] = is_delimiter(tokenizer.decode([i]))
    return table[tokens]


class _Sums:
    """Per-head running sums (on the model's device) and per-statistic query counts."""

    def __init__(self, n_layers: int, n_heads: int, device):
        self.shape, self.device = (n_layers, n_heads), device
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, float] = {}
        # uniform-attention baselines (head independent), summed over the same queries
        self.base = {"punctuation_base": 0.0, "same_token_base": 0.0}

    def add(self, layer: int, name: str, value: Tensor) -> None:
        if name not in self.sums:
            self.sums[name] = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        self.sums[name][layer] += value.double()

    def count(self, name: str, n: float) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + float(n)

    def mean(self, name: str) -> np.ndarray:
        n = self.counts.get(name, 0.0)
        if name not in self.sums or n == 0:
            return np.full(self.shape, np.nan)
        return (self.sums[name] / n).cpu().numpy()


def _text_batch(model, tokens: Tensor, sums: _Sums, delim: Tensor) -> None:
    """One forward pass over natural-text windows, reducing every layer's pattern in its hook."""
    device = sums.device
    b, n = tokens.shape
    q = torch.arange(n, device=device)
    distance = (q[:, None] - q[None, :]).float()                       # [q, k]
    recent_mask = ((distance >= 2) & (distance <= 5) & (q[None, :] >= 1)).float()
    causal_nonbos = ((distance >= 0) & (q[None, :] >= 1))              # keys 1..q
    delim = delim.to(device)
    punct_mask = (causal_nonbos[None] & delim[:, None, :]).float()     # [b, q, k]
    same = (tokens[:, :, None] == tokens[:, None, :]) & (distance > 0)[None] & (q[None, None, :] >= 1)
    has_same = same.any(-1)                                            # [b, q]
    same = same.float()
    log_keys = torch.log(q[1:].float() + 1)
    n_q1, n_q2 = b * (n - 1), b * max(n - 2, 0)
    n_delim = torch.cumsum((delim & (q[None, :] >= 1)).float(), 1)    # delimiters among keys 1..q
    base_punct = (n_delim[:, 1:] / q[1:].float()).sum()
    base_same = (same.sum(-1) / (q.float() + 1))[has_same].sum()

    def hook(pattern, hook):
        layer = hook.layer()
        p = pattern.float()                                            # [b, h, q, k]
        rows = p[:, :, 1:]
        sums.add(layer, "bos", rows[..., 0].sum((0, 2)))
        sums.add(layer, "self", torch.diagonal(p, 0, -2, -1)[..., 1:].sum((0, 2)))
        sums.add(layer, "prev", torch.diagonal(p, -1, -2, -1)[..., 1:].sum((0, 2)))
        sums.add(layer, "recent", torch.einsum("bhqk,qk->h", p, recent_mask))
        sums.add(layer, "punctuation", torch.einsum("bhqk,bqk->h", p, punct_mask))
        sums.add(layer, "same_token", torch.einsum("bhqk,bqk->h", p, same))
        nonbos = rows[..., 1:]
        dist = (nonbos * distance[1:, 1:]).sum(-1) / nonbos.sum(-1).clamp_min(1e-12)
        sums.add(layer, "mean_distance", dist.sum((0, 2)))
        entropy = -(rows * rows.clamp_min(1e-12).log()).sum(-1) / log_keys
        sums.add(layer, "entropy", entropy.sum((0, 2)))
        return None

    model.run_with_hooks(tokens, fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), hook)])
    for name in ("bos", "self", "punctuation", "mean_distance", "entropy"):
        sums.count(name, n_q1)
    for name in ("prev", "recent"):
        sums.count(name, n_q2)
    sums.count("same_token", float(has_same.sum()))
    sums.base["punctuation_base"] += float(base_punct)
    sums.base["same_token_base"] += float(base_same)


def _check_windows(windows, model) -> Tensor:
    from .events import _check_windows as check

    windows = check(windows, model)
    if windows.shape[1] < 3:
        raise ValueError(f"windows has shape {tuple(windows.shape)}: expected pos >= 3 (previous-token needs q >= 2)")
    return windows


@torch.inference_mode()
def head_statistics(model, windows: Int[Tensor, "window pos"] | None = None, *, repeat_length: int = 23,
                    n_repeat: int = 8, seed: int = 0, batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Attention statistics of every head (definitions in the module docstring).

    Args:
        windows: natural-text windows (BOS first); None samples 64 windows of up to 64 tokens
            with :func:`interp_lib.explain.events.sample_windows` (dataset ``"auto"``).
        repeat_length, n_repeat: the repeated-random-token probe for ``induction``.

    Returns one row per head: ``layer``, ``head`` (index), ``label`` (``"L1H0"``), ``family`` and
    ``secondary`` (the heuristic families, see :func:`heuristic_family`) and the statistics.
    """
    from tqdm.auto import tqdm

    from ..heads import repeat_probe_tokens
    from .events import _check_int, sample_windows

    repeat_length = _check_int(repeat_length, "repeat_length", 2)
    n_repeat = _check_int(n_repeat, "n_repeat", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    cfg = model.cfg
    if windows is None:
        windows = sample_windows(model, "auto", n_windows=64, window_len=min(64, cfg.n_ctx), seed=seed)
    windows = _check_windows(windows, model)
    device = torch.device(cfg.device) if getattr(cfg, "device", None) is not None else torch.device("cpu")
    delim = _delimiter_mask(model, windows)
    sums = _Sums(cfg.n_layers, cfg.n_heads, device)
    starts = range(0, len(windows), batch_size)
    for start in tqdm(starts, desc="head statistics", disable=not progress, unit="batch"):
        _text_batch(model, windows[start:start + batch_size].to(device), sums, delim[start:start + batch_size])

    # Induction / duplicate on repeated random tokens: queries in the second copy.
    probe = repeat_probe_tokens(model, repeat_length, 0, n_repeat, seed).to(device)
    queries = torch.arange(1 + repeat_length, 1 + 2 * repeat_length, device=device)

    def probe_hook(pattern, hook):
        rows = pattern.float()[:, :, queries]                          # [b, h, nq, k]
        for name, shift in (("induction", repeat_length - 1), ("repeat_duplicate", repeat_length)):
            sums.add(hook.layer(), name, rows.gather(-1, (queries - shift).expand(*rows.shape[:-1])[..., None])
                     .sum((0, 2, 3)))
        return None

    for start in range(0, n_repeat, batch_size):
        model.run_with_hooks(probe[start:start + batch_size],
                             fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), probe_hook)])
    sums.count("induction", n_repeat * repeat_length)
    sums.count("repeat_duplicate", n_repeat * repeat_length)

    means = {name: sums.mean(name) for name in ("bos", "self", "prev", "recent", "punctuation", "same_token",
                                                 "mean_distance", "entropy", "induction", "repeat_duplicate")}
    bases = {name: value / max(sums.counts.get(name.removesuffix("_base"), 0.0), 1.0)
             for name, value in sums.base.items()}
    if sums.counts.get("same_token", 0.0) == 0:
        bases["same_token_base"] = float("nan")
    records = []
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            row: dict[str, Any] = {"layer": layer, "head": head, "label": head_label(layer, head)}
            for name in STAT_COLUMNS:
                row[name] = float(bases[name]) if name in bases else float(means[name][layer, head])
            family, secondary = heuristic_family(row)
            row["family"], row["secondary"] = family, ",".join(secondary)
            records.append(row)
    columns = ["layer", "head", "label", "family", "secondary", *STAT_COLUMNS]
    return pd.DataFrame(records, columns=columns)


# --------------------------------------------------------------------------------------------
# Rules and explanations
# --------------------------------------------------------------------------------------------

def _get(row: Mapping, name: str) -> float:
    try:
        value = row[name]
    except (KeyError, IndexError):
        raise ValueError(f"row lacks {name!r}: expected a row of head_statistics with columns "
                         f"{', '.join(STAT_COLUMNS)}") from None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"row[{name!r}]={value!r}: expected a number") from None
    return value


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def family_strengths(row: Mapping) -> dict[str, float]:
    """Each family's statistic divided by its threshold (>= 1: the family applies; 0 when a
    base-rate condition fails). ``bos/resting`` and ``diffuse/mixed`` are fallbacks, not listed."""
    g = {name: _finite(_get(row, name)) for name in STAT_COLUMNS}
    out = {
        "induction": g["induction"] / THRESHOLDS["induction"],
        "previous-token": g["prev"] / THRESHOLDS["previous-token"],
        "duplicate-token": max(
            g["same_token"] / THRESHOLDS["duplicate-token"] if g["same_token"] >= BASE_RATIO * g["same_token_base"] else 0.0,
            g["repeat_duplicate"] / THRESHOLDS["duplicate-token"]),
        "self": g["self"] / THRESHOLDS["self"],
        "punctuation/delimiter": (g["punctuation"] / THRESHOLDS["punctuation/delimiter"]
                                  if g["punctuation"] >= BASE_RATIO * g["punctuation_base"] else 0.0),
        "recent-window": g["recent"] / THRESHOLDS["recent-window"],
    }
    return out


def heuristic_family(row: Mapping) -> tuple[str, list[str]]:
    """``(family, secondary families)``: the family whose statistic most exceeds its threshold
    (ties: the order of :data:`HEURISTIC_FAMILIES`), others above threshold as secondary; with
    none, ``bos/resting`` if BOS attention >= 0.5, else ``diffuse/mixed``."""
    strengths = family_strengths(row)
    passing = sorted((name for name, value in strengths.items() if value >= 1.0),
                     key=lambda name: (-strengths[name], HEURISTIC_FAMILIES.index(name)))
    if passing:
        return passing[0], passing[1:]
    if _finite(_get(row, "bos")) >= THRESHOLDS["bos/resting"]:
        return "bos/resting", []
    return "diffuse/mixed", []


def _value(row: Mapping, family: str) -> float:
    if family == "duplicate-token":
        g = {name: _finite(_get(row, name)) for name in ("same_token", "repeat_duplicate")}
        return max(g.values())
    return _finite(_get(row, _FEATURE[family]))


# family -> (sentence, attends_from, attends_to, positive examples, negative examples). Position-
# based heads (previous-token, self, resting) do the same on every text: their negatives are the
# few texts where the pattern cannot show (nothing before the token) or are left empty.
_TEMPLATES: dict[str, tuple[str, str, str, list[str], list[str]]] = {
    "induction": (
        "Induction head: when the current token occurred earlier, it attends to the token that "
        "followed that earlier occurrence ({v:.0%} of its attention on repeated random sequences), "
        "so a repeated sequence can be continued.",
        "a token that occurred earlier in the text", "the token right after the earlier occurrence",
        ["Mr Dursley said Potter. Mr Dursley said", "k7 q2 z9 m4 b8 k7 q2 z9 m4", "def f(x): return x\ndef f(x): return"],
        ["Every word in this sentence is different.", "one two three four five six seven"]),
    "previous-token": (
        "Previous-token head: from each token it attends to the token immediately before it "
        "({v:.0%} of its attention).",
        "every token", "the token immediately before it",
        ["The quick brown fox jumps over the lazy dog.", "import numpy as np"],
        ["Hello", "x"]),
    "duplicate-token": (
        "Duplicate-token head: it attends to earlier occurrences of the current token "
        "({v:.0%} of its attention when the token occurred before).",
        "a token that already occurred earlier", "the earlier occurrences of the same token",
        ["the cat saw the dog and the", "x = x + x", "a b c a b c"],
        ["quick brown fox", "one two three four"]),
    "self": (
        "Self-attending head: each token attends mostly to itself ({v:.0%} of its attention).",
        "every token", "itself",
        ["The quick brown fox jumps over the lazy dog.", "def main():"],
        []),
    "punctuation/delimiter": (
        "Delimiter head: it attends to punctuation and line breaks earlier in the text "
        "({v:.0%} of its attention, against {base:.0%} for uniform attention).",
        "tokens after a delimiter", "punctuation marks and newlines",
        ["Hello, world. How are you?\nFine, thanks.", "f(x, y); g(z);\nh()"],
        ["the quick brown fox jumps over the lazy dog", "alpha beta gamma delta epsilon"]),
    "recent-window": (
        "Local-window head: it spreads its attention over the few tokens before the current one "
        "({v:.0%} on tokens 2 to 5 back, {prev:.0%} on the previous token).",
        "every token", "the 2-5 tokens just before it",
        ["The quick brown fox jumps over the lazy dog.", "for i in range(10):"],
        ["Hi", "x"]),
    "bos/resting": (
        "Resting head: it parks most of its attention on the beginning-of-text token "
        "({v:.0%}), i.e. it does little on this text.",
        "every token", "the beginning-of-text token",
        ["The quick brown fox jumps over the lazy dog.", "an ordinary sentence of text"],
        []),
    "diffuse/mixed": (
        "Diffuse head: no single pattern dominates; its attention is spread out (normalised "
        "entropy {entropy:.2f}, mean distance {distance:.1f} tokens; strongest statistic: "
        "{strongest} {strongest_value:.0%}).",
        "every token", "many earlier tokens",
        [], []),
}

_PHRASE = {"induction": "induction", "previous-token": "previous-token", "duplicate-token": "duplicate-token",
           "self": "self-attention", "punctuation/delimiter": "delimiter", "recent-window": "local-window"}


def heuristic_explanation(row: Mapping) -> Explanation:
    """A deterministic explanation of one :func:`head_statistics` row (``source="heuristic"``)."""
    family, secondary = heuristic_family(row)
    sentence, attends_from, attends_to, positive, negative = _TEMPLATES[family]
    fields: dict[str, Any] = {"base": _finite(_get(row, "punctuation_base")), "prev": _finite(_get(row, "prev"))}
    if family == "diffuse/mixed":
        candidates = {"BOS": "bos", "self": "self", "previous token": "prev", "tokens 2-5 back": "recent",
                      "delimiters": "punctuation"}
        strongest = max(candidates, key=lambda k: _finite(_get(row, candidates[k])))
        fields.update(entropy=_finite(_get(row, "entropy")), distance=_finite(_get(row, "mean_distance")),
                      strongest=strongest, strongest_value=_finite(_get(row, candidates[strongest])))
    else:
        fields["v"] = _value(row, family)
    text = sentence.format(**fields)
    if secondary:
        extra = ", ".join(f"{_PHRASE[name]} ({_value(row, name):.0%})" for name in secondary)
        text += f" It also shows {extra} patterns." if len(secondary) > 1 else f" It also shows a {extra} pattern."
    return Explanation(text=text, attends_from=attends_from, attends_to=attends_to,
                       positive_examples=list(positive), negative_examples=list(negative), source="heuristic")


def heuristic_explanations(model, windows: Int[Tensor, "window pos"] | None = None, **kwargs
                           ) -> tuple[dict[tuple[int, int], Explanation], pd.DataFrame]:
    """Explain every head of ``model`` -> ``({(layer, head): Explanation}, statistics frame)``.
    Keyword arguments go to :func:`head_statistics`."""
    stats = head_statistics(model, windows, **kwargs)
    explanations = {(int(row["layer"]), int(row["head"])): heuristic_explanation(row)
                    for row in stats.to_dict("records")}
    return explanations, stats


# --------------------------------------------------------------------------------------------
# Neurons
# --------------------------------------------------------------------------------------------

#: A neuron is said to fire "on the token X" when X is the current token of at least this share
#: of its top events; below it the explanation lists its most common tokens.
NEURON_TOKEN_SHARE = 0.5
_NEURON_CONTEXT = 6  # tokens of context (ending at the event) in a test example


def _context_text(event, n_tokens: int = _NEURON_CONTEXT) -> str:
    tokens = [t for t in event.tokens[max(1, event.position + 1 - n_tokens): event.position + 1]]
    return "".join(tokens)


def _mean(values) -> float:
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def neuron_explanation(top: list, random: list, quantile: list = ()) -> tuple[Explanation, dict[str, Any]]:
    """The offline explanation of one MLP neuron from its events: which current token(s)
    dominate its top events, with a confidence (the share of top events at those tokens).

    Returns ``(explanation, statistics)``; the statistics hold ``top_token``, ``top_token_share``,
    ``confidence``, ``mean_top`` and ``mean_random`` (the mean activation of its top and random
    events). The positive test examples are short contexts ending at top events on the named
    token(s); the negative ones, contexts of random / quantile events that contain none of them
    (so the contrastive scorer asks whether the named token drives the neuron)."""
    if not top:
        raise ValueError("neuron_explanation: no top events (expected the neuron's top events)")
    counts: dict[str, int] = {}
    for event in top:
        counts[event.query_token] = counts.get(event.query_token, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    token, n_token = ranked[0]
    share = n_token / len(top)
    mean_top, mean_random = _mean(e.activation for e in top), _mean(e.activation for e in random)
    versus = f"mean activation {mean_top:.2f} at its top events vs {mean_random:.2f} at random positions"
    if share >= NEURON_TOKEN_SHARE:
        named = [token]
        text = f"Fires on the token {token!r} ({n_token} of its {len(top)} top events; {versus})."
    else:
        named = [t for t, _ in ranked[:3]]
        listed = ", ".join(f"{t!r} ({n})" for t, n in ranked[:3])
        text = (f"Fires on several tokens, most often {listed} of its {len(top)} top events; no single "
                f"token dominates ({versus}).")
    confidence = sum(counts[t] for t in named) / len(top)
    positive = list(dict.fromkeys(_context_text(e) for e in top if e.query_token in named))[:5]
    negative = list(dict.fromkeys(_context_text(e) for e in [*random, *quantile]
                                  if not any(t in named for t in e.tokens[1:e.position + 1])))[:5]
    explanation = Explanation(text=text, positive_examples=positive, negative_examples=negative, source="heuristic")
    stats = {"top_token": token, "top_token_share": share, "confidence": confidence,
             "mean_top": mean_top, "mean_random": mean_random}
    return explanation, stats


def neuron_heuristic_explanations(event_set, units=None) -> tuple[dict, pd.DataFrame]:
    """Explain every neuron of ``event_set`` (an EventSet of neurons) offline ->
    ``({Neuron: Explanation}, statistics frame)`` (one row per neuron, the unit schema's columns
    ``unit``, ``layer``, ``index``, ``kind`` first)."""
    from ..units import unit_frame

    if getattr(event_set, "unit_kind", "head") != "neuron":
        raise ValueError("neuron_heuristic_explanations: expected the EventSet of neurons "
                         f"(unit_kind 'neuron'), got unit_kind {getattr(event_set, 'unit_kind', None)!r}")
    units = event_set.units() if units is None else list(units)
    explanations, rows = {}, []
    for unit in units:
        explanation, stats = neuron_explanation(event_set.top.get(unit, []), event_set.random.get(unit, []),
                                                event_set.quantile.get(unit, []))
        explanations[unit] = explanation
        rows.append((unit, stats))
    return explanations, unit_frame(rows)
