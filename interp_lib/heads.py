"""Attention heads: induction / previous-token / duplicate-token scores, dynamic-threshold
detection, precision / recall / F1 against ground truth, ablation confirmation, QK / OV circuits
(``FactoredMatrix``), composition scores and head families by behaviour.

Scores are computed from attention patterns read out of a cache; nothing here edits a cached
tensor in place (TransformerLens' ``detect_head`` once did, PR #1745).

Score definitions (all in [0, 1], means over sequences and query positions):

* ``induction``: on ``BOS + prefix + S + S`` (``S`` random tokens of length ``L``, a random
  prefix of length ``o``), attention from every query in the second copy of ``S`` to the token
  *after* its earlier occurrence (key ``q - L + 1``). Computed for several ``L`` (including
  lengths far from any training range) and offsets ``o``; the score is the **minimum over
  lengths** of the per-length mean, so a head that attends at a fixed positional offset ``k``
  (perfect only when ``L = k + 1``) scores near zero: induction is content-based and must work
  at every length. The default lengths adapt to the model's context
  (:func:`resolve_repeat_lengths`); at least two distinct lengths are always used.
* ``duplicate_token``: the same sequences, attention from the second copy to the earlier copy
  of the *same* token (key ``q - L``), minimum over lengths.
* ``previous_token``: natural text windows, attention from query ``q >= 2`` to key ``q - 1``
  (query 1 is excluded: its previous token is BOS, which would reward BOS-sink heads).

``exclude_bos=True`` additionally renormalises each query's attention over non-BOS keys (on a
copy) before scoring, for models whose heads park attention on BOS.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .models import next_token_loss
from .patching import ablation_hooks, mean_activations, unit_source
from .paths import data_dir
from .units import Head, head_label, parse_units, unit_columns

KINDS = ("induction", "previous_token", "duplicate_token")
DEFAULT_REPEAT_LENGTHS = (11, 23, 47, 61)
DEFAULT_OFFSETS = (0, 7)
THRESHOLD_RULES = ("robust_z", "mean_std", "largest_gap")



# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------

def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")


def _check_positive_ints(values, name: str, minimum: int = 1) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    try:
        out = tuple(values)
    except TypeError:
        raise ValueError(f"{name}={values!r}: expected a sequence of integers >= {minimum}") from None
    if not out or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in out):
        raise ValueError(f"{name}={values!r}: expected a non-empty sequence of integers >= {minimum}")
    return tuple(int(v) for v in out)


def _check_n(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return int(value)


def _parse_head(head, n_layers: int, n_heads: int) -> Head:
    """One head (label, pair or :class:`~interp_lib.units.Head`) checked against the model's range."""
    return parse_units([head], n_layers, n_heads, "head", name="head")[0]


def resolve_repeat_lengths(model, repeat_lengths: Sequence[int] | None = None,
                           offsets: Sequence[int] = DEFAULT_OFFSETS) -> tuple[int, ...]:
    """The repeat lengths the induction / duplicate-token probes use on ``model``.

    A probe ``BOS + prefix(offset) + S + S`` needs ``1 + offset + 2 * length`` positions.
    Explicit ``repeat_lengths`` must fit with every offset, else a ValueError names the first
    that does not. ``None`` (the default) means :data:`DEFAULT_REPEAT_LENGTHS` adapted to
    ``model.cfg.n_ctx``: a length that does not fit is shrunk to the longest that does (and
    dropped if that length is already used), with a warning naming the change. Fewer than two
    distinct lengths would let a fixed-offset head pass as an induction head, so then a
    ValueError says how much context the defaults need.
    """
    offs = _check_positive_ints(offsets, "offsets", 0)
    n_ctx, widest = int(model.cfg.n_ctx), max(offs)
    if repeat_lengths is not None:
        lengths = _check_positive_ints(repeat_lengths, "repeat_lengths", 2)
        for length in lengths:
            if 1 + widest + 2 * length > n_ctx:
                raise ValueError(f"repeat_lengths={list(lengths)}: repeat length {length} with offset {widest} "
                                 f"needs {1 + widest + 2 * length} positions; the model's context is {n_ctx}")
        return lengths
    longest = (n_ctx - 1 - widest) // 2  # the longest length that fits with every offset
    lengths: list[int] = []
    changes: list[str] = []
    for length in DEFAULT_REPEAT_LENGTHS:
        fitted = min(length, longest)
        if fitted >= 2 and fitted not in lengths:
            lengths.append(fitted)
            if fitted != length:
                changes.append(f"{length} shrunk to {fitted}")
        else:
            changes.append(f"{length} dropped")
    if len(lengths) < 2:
        need = 1 + widest + 2 * (min(DEFAULT_REPEAT_LENGTHS) + 1)
        raise ValueError(f"the model's context ({n_ctx} positions) is too short for the default repeat_lengths: "
                         f"two distinct lengths with offsets {list(offs)} need at least {need} positions; "
                         "pass shorter repeat_lengths= and offsets=")
    if changes:
        warnings.warn(f"default repeat_lengths {list(DEFAULT_REPEAT_LENGTHS)} adapted to the model's context of "
                      f"{n_ctx} positions with offsets {list(offs)}: {', '.join(changes)}; using {lengths}",
                      UserWarning, stacklevel=_caller_stacklevel())
    return tuple(lengths)


def _caller_stacklevel() -> int:
    """``stacklevel`` that points a warning at the first frame outside interp_lib and torch
    (whose ``no_grad`` decorators add frames), so it names the user's line."""
    import os
    import sys

    skip = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))
    frame, level = sys._getframe(1), 1  # level 1 = the function that calls warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _bos_id(model) -> int:
    tok = getattr(model, "tokenizer", None)
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tok, attr, None) if tok is not None else None
        if value is not None:
            return int(value)
    return 0


# --------------------------------------------------------------------------------------------
# Probe sequences and patterns
# --------------------------------------------------------------------------------------------

def repeat_probe_tokens(model, length: int, offset: int = 0, n_sequences: int = 16, seed: int = 0
                        ) -> Int[Tensor, "batch pos"]:
    """``BOS + prefix(offset) + S + S`` with ``S`` ``length`` uniformly random non-BOS tokens."""
    from .data import repeated_random_tokens

    bos = _bos_id(model)
    vocab = model.cfg.d_vocab
    if 1 + offset + 2 * length > model.cfg.n_ctx:
        raise ValueError(f"repeat length {length} with offset {offset} needs {1 + offset + 2 * length} positions; "
                         f"the model's context is {model.cfg.n_ctx}")
    tokens = repeated_random_tokens(n_sequences, length, vocab_size=vocab, seed=seed, bos_id=bos, low=0,
                                    exclude=[bos])
    if offset:
        rng = np.random.default_rng(seed + 10_007)
        allowed = np.setdiff1d(np.arange(vocab), [bos])
        prefix = torch.from_numpy(rng.choice(allowed, size=(n_sequences, offset))).long()
        tokens = torch.cat([tokens[:, :1], prefix, tokens[:, 1:]], dim=1)
    return tokens


@torch.no_grad()
def attention_patterns(model, tokens: Int[Tensor, "batch pos"], layers: Iterable[int] | None = None
                       ) -> Float[Tensor, "layer batch head query key"]:
    """Attention patterns of ``layers`` (default: every layer), stacked in the order given (a
    fresh tensor: later edits never reach a cache)."""
    n_layers = model.cfg.n_layers
    if layers is None:
        layers = list(range(n_layers))
    else:
        given = layers
        try:
            layers = list(layers)
        except TypeError:
            layers = None
        if not layers or any(isinstance(l, bool) or not isinstance(l, (int, np.integer)) or not 0 <= l < n_layers
                             for l in layers):
            raise ValueError(f"layers={given!r}: expected a non-empty list of layer indices in [0, {n_layers - 1}] "
                             f"(the model has {n_layers} layers)")
        layers = [int(l) for l in layers]
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in layers}
    _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda name: name in names)
    return torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"].detach().float().cpu().clone()
                        for layer in layers])


def _renormalise_without_bos(patterns: Tensor) -> Tensor:
    out = patterns.clone()
    out[..., 0] = 0.0
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12)


def _offset_attention(patterns: Tensor, queries: Tensor, shift: int) -> Float[Tensor, "layer head"]:
    """Mean attention from ``queries`` to ``queries - shift`` -> [layer, head]."""
    return patterns[..., queries, queries - shift].mean(dim=(1, 3))


def _text_tokens(model, n_sequences: int, seq_len: int, seed: int, dataset: str) -> Tensor:
    from .data import load_texts, text_windows

    return text_windows(model, load_texts(dataset, "validation"), seq_len, n_sequences, seed=seed)


@torch.no_grad()
def head_scores_by_length(model, kind: str = "induction", repeat_lengths: Sequence[int] | None = None,
                          offsets: Sequence[int] = DEFAULT_OFFSETS, n_sequences: int = 16, seed: int = 0,
                          exclude_bos: bool = False) -> Float[Tensor, "length layer head"]:
    """Per repeat length (averaged over ``offsets``) induction or duplicate-token scores, one row
    per length of :func:`resolve_repeat_lengths` (``None``: the defaults fitted to the context)."""
    if kind not in ("induction", "duplicate_token"):
        raise ValueError(f"kind={kind!r}: scores by repeat length exist for 'induction' and 'duplicate_token'")
    lengths = resolve_repeat_lengths(model, repeat_lengths, offsets)
    offs = _check_positive_ints(offsets, "offsets", 0)
    n_sequences = _check_n(n_sequences, "n_sequences")
    shift_extra = 1 if kind == "induction" else 0
    per_length = []
    for length in lengths:
        per_offset = []
        for offset in offs:
            tokens = repeat_probe_tokens(model, length, offset, n_sequences, seed + 1000 * length + offset)
            patterns = attention_patterns(model, tokens)
            if exclude_bos:
                patterns = _renormalise_without_bos(patterns)
            start = 1 + offset + length  # first query of the second copy
            queries = torch.arange(start, start + length)
            per_offset.append(_offset_attention(patterns, queries, length - shift_extra))
        per_length.append(torch.stack(per_offset).mean(0))
    return torch.stack(per_length)


@torch.no_grad()
def head_scores(model, kind: str = "induction", *, repeat_lengths: Sequence[int] | None = None,
                offsets: Sequence[int] = DEFAULT_OFFSETS, n_sequences: int = 16, seq_len: int = 64,
                seed: int = 0, exclude_bos: bool = False, dataset: str = "auto",
                tokens: Int[Tensor, "batch pos"] | None = None) -> Float[Tensor, "layer head"]:
    """Score every head for ``kind`` -> ``[n_layers, n_heads]`` (definitions in the module docstring).

    Args:
        kind: ``"induction"``, ``"previous_token"`` or ``"duplicate_token"``.
        repeat_lengths: segment lengths of the repeated-random-token probes (induction and
            duplicate-token); the score is the minimum over lengths, so include lengths the
            model never saw in training. ``None``: :data:`DEFAULT_REPEAT_LENGTHS` fitted to the
            model's context (:func:`resolve_repeat_lengths`, which warns when it changes them).
        offsets: random-prefix lengths before the first copy (the same length at different
            absolute positions); averaged.
        n_sequences: probe sequences per (length, offset), or natural-text windows.
        seq_len: natural-text window length (previous-token), BOS included.
        dataset: text for the previous-token probe: ``"auto"`` (WikiText on Colab, the bundled
            corpus elsewhere), ``"bundled"`` or ``"wikitext"``.
        tokens: previous-token only: score on these ``[batch, pos]`` tokens instead of text windows.
        exclude_bos: renormalise attention over non-BOS keys before scoring (on a copy).
    """
    _check_kind(kind)
    if tokens is not None and kind != "previous_token":
        raise ValueError(f"tokens= is only used with kind='previous_token' (got kind={kind!r}); induction and "
                         "duplicate-token scores build their own repeated-random-token probes")
    if kind == "previous_token":
        if tokens is None:
            n = _check_n(n_sequences, "n_sequences")
            if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 3 <= seq_len <= model.cfg.n_ctx:
                raise ValueError(f"seq_len={seq_len!r}: expected an integer in [3, {model.cfg.n_ctx}]")
            tokens = _text_tokens(model, n, seq_len, seed, dataset)
        tokens = torch.as_tensor(tokens)
        if tokens.ndim != 2 or tokens.shape[1] < 3:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}: expected [batch, pos] with pos >= 3")
        patterns = attention_patterns(model, tokens)
        if exclude_bos:
            patterns = _renormalise_without_bos(patterns)
        queries = torch.arange(2, tokens.shape[1])
        return _offset_attention(patterns, queries, 1)
    lengths = resolve_repeat_lengths(model, repeat_lengths, offsets)
    by_length = head_scores_by_length(model, kind, lengths, offsets, n_sequences, seed, exclude_bos)
    return by_length.min(0).values


# --------------------------------------------------------------------------------------------
# TransformerLens head_detector ("mul" measure) reimplemented on tokens, for cross-checks
# --------------------------------------------------------------------------------------------

def detection_pattern(tokens: Int[Tensor, "pos"], kind: str) -> Float[Tensor, "pos pos"]:
    """TransformerLens' ``get_<kind>_head_detection_pattern`` for one token sequence."""
    _check_kind(kind)
    tokens = torch.as_tensor(tokens).flatten().cpu()
    n = len(tokens)
    if kind == "previous_token":
        pattern = torch.zeros(n, n)
        pattern[1:, :-1] = torch.eye(n - 1)
        return pattern
    same = (tokens[:, None] == tokens[None, :]).float()
    same.fill_diagonal_(0)
    duplicate = torch.tril(same)
    if kind == "duplicate_token":
        return duplicate
    shifted = torch.zeros_like(duplicate)
    shifted[:, 1:] = duplicate[:, :-1]
    return torch.tril(shifted)


@torch.no_grad()
def detector_scores(model, tokens: Int[Tensor, "batch pos"], kind: str, exclude_bos: bool = False,
                    exclude_current_token: bool = False) -> Float[Tensor, "layer head"]:
    """``transformer_lens.head_detector.detect_head``'s "mul" score, averaged over sequences:
    per head, sum(attention * detection pattern) / sum(attention), the masked entries zeroed
    on a copy. Equals ``detect_head(model, text, "<kind>_head", ...)`` for one sequence."""
    _check_kind(kind)
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    patterns = attention_patterns(model, tokens)  # [layer, batch, head, q, k]
    scores = []
    for b in range(tokens.shape[0]):
        att = patterns[:, b].clone()
        if exclude_bos:
            att[..., 0] = 0
        if exclude_current_token:
            att = att * (1 - torch.eye(att.shape[-1]))
        det = detection_pattern(tokens[b], kind)
        scores.append((att * det).sum((-1, -2)) / att.sum((-1, -2)))
    return torch.stack(scores).mean(0)


# --------------------------------------------------------------------------------------------
# Dynamic thresholds and detection
# --------------------------------------------------------------------------------------------

def dynamic_threshold(scores: Tensor | np.ndarray, rule: str = "robust_z", k: float = 3.5,
                      floor: float = 0.0) -> float:
    """A detection threshold derived from the distribution of scores across heads.

    * ``robust_z`` (default): ``median + k * 1.4826 * MAD`` - a head is an outlier when its
      modified z-score exceeds ``k`` (3.5 is Iglewicz & Hoaglin's rule). When the MAD is 0 the
      mean absolute deviation is used instead.
    * ``mean_std``: ``mean + k * std``.
    * ``largest_gap``: the midpoint of the largest gap between consecutive sorted scores.

    The result is never below ``floor`` (detect_heads sets it to the score a head with uniform
    causal attention would get, so noise in a model without the behaviour is not detected).
    """
    values = torch.as_tensor(scores, dtype=torch.float64).flatten()
    values = values[torch.isfinite(values)]
    if values.numel() < 2:
        raise ValueError(f"scores has {values.numel()} finite values: expected at least 2 heads")
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"rule={rule!r}: expected one of {', '.join(THRESHOLD_RULES)}")
    if not isinstance(k, (int, float)) or isinstance(k, bool) or not math.isfinite(k) or k <= 0:
        raise ValueError(f"k={k!r}: expected a positive number")
    if rule == "robust_z":
        median = values.median()
        spread = 1.4826 * (values - median).abs().median()
        if spread <= 0:
            spread = 1.2533 * (values - median).abs().mean()
        threshold = median + k * spread
    elif rule == "mean_std":
        threshold = values.mean() + k * values.std()
    else:
        ordered = values.sort().values
        gaps = ordered[1:] - ordered[:-1]
        i = int(gaps.argmax())
        threshold = (ordered[i] + ordered[i + 1]) / 2
    return float(max(float(threshold), floor))


def chance_score(model, kind: str, repeat_lengths: Sequence[int] | None = None,
                 offsets: Sequence[int] = DEFAULT_OFFSETS, seq_len: int = 64) -> float:
    """The score of a head attending uniformly to all keys (1 / number of keys), per ``kind``,
    on the probes :func:`head_scores` uses (the same :func:`resolve_repeat_lengths`)."""
    _check_kind(kind)
    if kind == "previous_token":
        return float(np.mean([1 / (q + 1) for q in range(2, seq_len)]))
    lengths = resolve_repeat_lengths(model, repeat_lengths, offsets)
    offsets = _check_positive_ints(offsets, "offsets", 0)
    values = []
    for length in lengths:
        values.append(np.mean([1 / (q + 1) for o in offsets for q in range(1 + o + length, 1 + o + 2 * length)]))
    return float(max(values))


@dataclass
class DetectedHead:
    layer: int
    head: int
    score: float

    @property
    def label(self) -> str:
        return head_label(self.layer, self.head)

    def __iter__(self):  # unpacks as (layer, head, score), the DESIGN contract
        return iter((self.layer, self.head, self.score))

    def __getitem__(self, index):
        return (self.layer, self.head, self.score)[index]

    def __len__(self) -> int:
        return 3


@dataclass
class Detection:
    """Heads detected for ``kind``: iterable / indexable as ``[(layer, head, score), ...]``."""

    kind: str
    heads: list[DetectedHead]
    threshold: float
    rule: str
    k: float
    floor: float
    scores: list[list[float]] = field(repr=False)
    repeat_lengths: list[int] | None = None  # the probes' lengths (induction / duplicate-token)

    def __iter__(self):
        return iter(self.heads)

    def __len__(self) -> int:
        return len(self.heads)

    def __getitem__(self, index):
        return self.heads[index]

    def head_set(self) -> set[Head]:
        return {(h.layer, h.head) for h in self.heads}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "threshold": self.threshold, "rule": self.rule, "k": self.k,
                "floor": self.floor, "scores": self.scores, "repeat_lengths": self.repeat_lengths,
                "heads": [asdict(h) for h in self.heads]}

    @classmethod
    def from_dict(cls, data: dict) -> "Detection":
        return cls(kind=data["kind"], heads=[DetectedHead(**h) for h in data["heads"]],
                   threshold=data["threshold"], rule=data["rule"], k=data["k"], floor=data["floor"],
                   scores=data["scores"], repeat_lengths=data.get("repeat_lengths"))


def detect_from_scores(scores: Float[Tensor, "layer head"], kind: str = "induction", rule: str = "robust_z",
                       k: float = 3.5, floor: float = 0.0) -> Detection:
    """Heads whose score exceeds :func:`dynamic_threshold` of ``scores``, highest first."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores has shape {tuple(scores.shape)}: expected [n_layers, n_heads]")
    threshold = dynamic_threshold(scores, rule, k, floor)
    found = [DetectedHead(int(l), int(h), float(scores[l, h])) for l, h in zip(*torch.where(scores > threshold))]
    found.sort(key=lambda d: -d.score)
    return Detection(kind, found, threshold, rule, float(k), float(floor), scores.tolist())


def detect_heads(model, kind: str = "induction", rule: str = "robust_z", k: float = 3.5,
                 floor: float | None = None, scores: Tensor | None = None, **score_kwargs) -> Detection:
    """Heads of ``kind`` above a dynamic threshold -> :class:`Detection` (iterates as
    ``(layer, head, score)`` triples, highest score first).

    The threshold is :func:`dynamic_threshold` (default: modified z-score > 3.5 over all heads'
    scores), floored at ``max(2 * chance, 0.1)`` where chance is the score of a uniform-attention
    head (:func:`chance_score`): an outlier among heads that all lack the behaviour is not a
    detection. Pass ``scores`` to skip recomputing them. Induction and duplicate-token scores
    and the floor use the same repeat lengths (:func:`resolve_repeat_lengths`), recorded in
    ``Detection.repeat_lengths``.
    """
    _check_kind(kind)
    lengths = None
    if kind != "previous_token" and (scores is None or floor is None):
        lengths = resolve_repeat_lengths(model, score_kwargs.pop("repeat_lengths", None),
                                          score_kwargs.get("offsets", DEFAULT_OFFSETS))
        score_kwargs["repeat_lengths"] = lengths
    if scores is None:
        scores = head_scores(model, kind, **score_kwargs)
    if floor is None:
        keys = {key: score_kwargs[key] for key in ("repeat_lengths", "offsets", "seq_len") if key in score_kwargs}
        floor = max(2 * chance_score(model, kind, **keys), 0.1)
    detection = detect_from_scores(scores, kind, rule, k, floor)
    detection.repeat_lengths = None if lengths is None else list(lengths)
    return detection


# --------------------------------------------------------------------------------------------
# Ground truth and precision / recall / F1
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def induction_pvalues(model, length: int = 23, n_sequences: int = 32, seed: int = 0, alpha: float = 0.05,
                      min_effect: float = 0.05) -> pd.DataFrame:
    """A significance test per head for induction, with the false discovery rate controlled over
    all heads (Benjamini-Hochberg at ``alpha``).

    Each sequence ``BOS + S + S`` (``length`` random tokens) is paired with a control ``BOS + S +
    S'`` whose second half is other random tokens: the same positions, no repeat. A head's
    statistic per pair is its mean attention from the second half to the key ``length - 1`` back
    (the induction target when the half repeats) on the repeat minus on the control, so position,
    recency and BOS habits cancel and only tracking the repeat remains. One-sided one-sample t-test
    over the pairs (independent sequences); ``adjusted`` is the BH-adjusted p-value. With dozens of
    sequences a statistically clear effect can be tiny (a layer-0 head moving 0.1% of its attention),
    so ``significant`` also asks for ``mean_diff >= min_effect`` (attention share).

    Columns: the unit columns, ``mean_diff``, ``t``, ``pvalue``, ``adjusted``, ``significant``.
    """
    from scipy import stats as scipy_stats

    from .stats import benjamini_hochberg

    length = _check_n(length, "length")
    if length < 2:
        raise ValueError(f"length={length}: expected at least 2")
    n_sequences = _check_n(n_sequences, "n_sequences")
    if n_sequences < 3:
        raise ValueError(f"n_sequences={n_sequences}: expected at least 3 sequences for a t-test")
    repeated = repeat_probe_tokens(model, length, 0, n_sequences, seed)
    control = repeated.clone()
    control[:, 1 + length:] = repeat_probe_tokens(model, length, 0, n_sequences, seed + 7919)[:, 1:1 + length]
    queries = torch.arange(1 + length, 1 + 2 * length)

    def to_target(tokens):  # [layer, batch, head]: mean attention from each query to query - length + 1
        return attention_patterns(model, tokens)[..., queries, queries - length + 1].mean(-1)

    diff = (to_target(repeated) - to_target(control)).double().numpy()
    diff = np.moveaxis(diff, 1, -1).reshape(-1, n_sequences)            # [layer * head, pair]
    t, p = scipy_stats.ttest_1samp(diff, 0.0, axis=1, alternative="greater")
    p = np.where(np.isfinite(p), p, 1.0)                                # a constant difference: no evidence
    adjusted, rejected = benjamini_hochberg(p, alpha)
    significant = rejected & (diff.mean(1) >= min_effect)
    n_heads = model.cfg.n_heads
    return pd.DataFrame([{**unit_columns(Head(i // n_heads, i % n_heads)), "mean_diff": float(diff[i].mean()),
                          "t": float(t[i]), "pvalue": float(p[i]), "adjusted": float(adjusted[i]),
                          "significant": bool(significant[i])} for i in range(len(p))])


def known_heads(model_name: str, kind: str | None = None) -> dict[str, list[Head]] | list[Head]:
    """Published / verified head roles from ``data/known_heads``: ``{role: [(layer, head), ...]}``,
    or the list for one ``kind``. Model names: ``gpt2`` (alias ``gpt2-small``), ``toy-2l``, ``toy-1l``."""
    folder = data_dir() / "known_heads"
    if model_name in ("gpt2", "gpt2-small"):
        document = json.loads((folder / "gpt2-small.json").read_text())
        roles = document["roles"]
        # the IOI circuit's classes (name mover, s2 inhibition, ...) are roles too, where they
        # do not repeat one of the verified roles above
        ioi = {name: {"heads": heads} for name, heads in document.get("ioi_classes", {}).items()
               if name != "source" and name.replace(" ", "_") not in roles}
        roles = {**roles, **ioi}
    else:
        models = json.loads((folder / "toy-models.json").read_text())["models"]
        if model_name not in models:
            raise ValueError(f"model_name={model_name!r}: no ground-truth table; expected one of "
                             f"gpt2, gpt2-small, {', '.join(models)}")
        roles = models[model_name]["roles"]
    table = {role: [tuple(h) for h in entry["heads"]] for role, entry in roles.items()}
    if kind is None:
        return table
    if kind not in table:
        raise ValueError(f"kind={kind!r}: the table for {model_name} has roles {', '.join(table)}")
    return table[kind]


def precision_recall_f1(detected: Iterable, truth: Iterable) -> dict[str, float]:
    """Precision, recall and F1 of detected heads against true heads (``(layer, head, ...)`` items).

    With no true heads and no detections all three are 1.0 (nothing to find, nothing claimed).
    """
    found = {(int(h[0]), int(h[1])) for h in detected}
    true = {(int(h[0]), int(h[1])) for h in truth}
    tp = len(found & true)
    if not found and not true:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 0, "fp": 0, "fn": 0}
    precision = tp / len(found) if found else 0.0
    recall = tp / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp,
            "fp": len(found - true), "fn": len(true - found)}


# --------------------------------------------------------------------------------------------
# Ablation: the in-context-learning loss drop on repeated sequences
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def icl_loss_drop(model, heads: Iterable = (), length: int = 47, n_sequences: int = 32, seed: int = 0,
                  method: str = "zero", *, means: dict | None = None) -> dict[str, float]:
    """Loss on the first and second copy of ``BOS + S + S`` (``S`` random, length ``length``)
    with ``heads`` ablated together (:func:`interp_lib.patching.ablation_hooks`: ``"zero"``,
    ``"mean"`` over the batch per position, or ``"resample"``), and the in-context drop
    ``loss_first - loss_second``. ``means``: precomputed per-position means
    (:func:`interp_lib.patching.mean_activations` of the same batch)."""
    length = _check_n(length, "length")
    heads = [_parse_head(h, model.cfg.n_layers, model.cfg.n_heads) for h in heads]
    tokens = repeat_probe_tokens(model, length, 0, _check_n(n_sequences, "n_sequences"), seed).to(model.cfg.device)
    hooks = ablation_hooks(model, tokens, heads=heads, method=method, means=means)
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks) if hooks else model(tokens)
    nll = next_token_loss(logits, tokens)
    first, second = nll[:, :length].mean().item(), nll[:, length:].mean().item()
    return {"loss_first": first, "loss_second": second, "drop": first - second}


def ablation_effects(model, heads: Iterable, length: int = 47, n_sequences: int = 32, seed: int = 0,
                     method: str = "zero") -> pd.DataFrame:
    """In-context loss drop with each head ablated alone, then all together.

    Columns: ``head``, ``drop`` (with the ablation), ``clean_drop``, ``fraction_removed``
    (``1 - drop / clean_drop``: 1 means the drop is gone).
    """
    heads = [_parse_head(h, model.cfg.n_layers, model.cfg.n_heads) for h in heads]
    clean = icl_loss_drop(model, (), length, n_sequences, seed, method)["drop"]
    means = None
    if method == "mean" and heads:  # one pass for every group below
        tokens = repeat_probe_tokens(model, _check_n(length, "length"), 0, _check_n(n_sequences, "n_sequences"), seed)
        names = sorted({unit_source(Head(*h))[1] for h in heads})
        means = mean_activations(model, tokens, names, batch_size=len(tokens))
    rows = []
    groups = [[h] for h in heads] + ([heads] if len(heads) > 1 else [])
    for group in groups:
        result = icl_loss_drop(model, group, length, n_sequences, seed, method, means=means)
        rows.append({"head": "+".join(head_label(*h) for h in group), "n_heads": len(group),
                     "loss_first": result["loss_first"], "loss_second": result["loss_second"],
                     "drop": result["drop"], "clean_drop": clean,
                     "fraction_removed": 1 - result["drop"] / clean if clean else float("nan")})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# QK / OV circuits through FactoredMatrix
# --------------------------------------------------------------------------------------------

def _factored(left: Tensor, right: Tensor):
    from transformer_lens import FactoredMatrix

    return FactoredMatrix(left, right)


def _query_heads_per_kv_head(model, stacked: Tensor) -> int:
    """How many query heads share each key / value head of ``stacked`` (``W_K`` or ``W_V``,
    ``[layer, kv_head, d_model, d_head]``): 1 without grouped-query attention, 3 on SmolLM2
    (9 query heads, 3 key / value heads)."""
    n_heads, n_kv = model.cfg.n_heads, stacked.shape[1]
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"model: {n_heads} query heads cannot share {n_kv} key / value heads evenly")
    return n_heads // n_kv


def kv_head(model, head: int) -> int:
    """The key / value head that query head ``head`` reads under grouped-query attention
    (``head // (n_heads // n_key_value_heads)``, as Hugging Face's ``repeat_kv``); ``head``
    itself on models without it."""
    return head // _query_heads_per_kv_head(model, model.W_K)


def _per_query_head(model, stacked: Tensor) -> Tensor:
    """``W_K`` / ``W_V`` ``[layer, kv_head, ...]`` expanded to one entry per query head."""
    return stacked.repeat_interleave(_query_heads_per_kv_head(model, stacked), dim=1)


def qk_circuit(model, layer: int, head: int):
    """``W_Q W_K^T`` of one head (d_model x d_model, query side on the left) as a FactoredMatrix.

    Under grouped-query attention ``W_K`` is that of the key / value head the query head reads
    (:func:`kv_head`). On rotary-position models (Llama, SmolLM2, ...) this is the bilinear form
    *without* the rotation: the real score between positions ``i`` and ``j`` is
    ``x_i W_Q R_(j-i) W_K^T x_j^T`` with a position-dependent rotation ``R``, so ``W_Q W_K^T`` is
    the score only at equal positions (use :func:`qk_interaction` for actual scores)."""
    layer, head = _parse_head((layer, head), model.cfg.n_layers, model.cfg.n_heads)
    return _factored(model.W_Q[layer, head], model.W_K[layer, kv_head(model, head)].T)


def ov_circuit(model, layer: int, head: int):
    """``W_V W_O`` of one head (d_model x d_model, input on the left) as a FactoredMatrix
    (``W_V`` of the key / value head the query head reads under grouped-query attention)."""
    layer, head = _parse_head((layer, head), model.cfg.n_layers, model.cfg.n_heads)
    return _factored(model.W_V[layer, kv_head(model, head)], model.W_O[layer, head])


@torch.no_grad()
def full_qk_circuit(model, layer: int, head: int, tokens: Sequence[int] | Tensor | None = None
                    ) -> Float[Tensor, "query_token key_token"]:
    """Token-token QK circuit ``W_E W_Q W_K^T W_E^T`` (bilinear attention score between query
    token and key token, ignoring positions), on ``tokens`` (default: the whole vocabulary when
    it has at most 4096 tokens, else an error naming the argument). Norms before the head are
    ignored, and on rotary models so is the rotation (see :func:`qk_circuit`)."""
    W_E = model.W_E
    if tokens is None:
        if W_E.shape[0] > 4096:
            raise ValueError(f"tokens=None with a vocabulary of {W_E.shape[0]}: pass a subset of token ids")
        index = torch.arange(W_E.shape[0])
    else:
        index = torch.as_tensor(tokens).flatten().long()
    emb = W_E[index.to(W_E.device)]
    return (emb @ qk_circuit(model, layer, head) @ emb.T).AB.detach().float().cpu() / math.sqrt(model.cfg.d_head)


@torch.no_grad()
def positional_qk_circuit(model, layer: int, head: int, n_positions: int | None = None
                          ) -> Float[Tensor, "query_pos key_pos"]:
    """``W_pos W_Q W_K^T W_pos^T`` with the causal mask applied (-inf above the diagonal),
    over the first ``n_positions`` positions (default: all). Only for learned absolute position
    embeddings: a rotary model (Llama, SmolLM2) has no ``W_pos`` and gets a ValueError."""
    kind = getattr(model.cfg, "positional_embedding_type", "standard")
    if kind not in ("standard", "shortformer"):
        raise ValueError(f"model: positional_qk_circuit does not apply to {kind}-position models (no W_pos; position "
                         "acts inside each head's scores): read real scores with qk_interaction or hook_attn_scores")
    n = model.cfg.n_ctx if n_positions is None else _check_n(n_positions, "n_positions")
    pos = model.W_pos[:n]
    scores = (pos @ qk_circuit(model, layer, head) @ pos.T).AB.detach().float().cpu() / math.sqrt(model.cfg.d_head)
    return scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))


@torch.no_grad()
def ov_copying_score(model, layer: int | None = None, head: int | None = None) -> Tensor | float:
    """Elhage et al.'s copying score: ``sum(Re λ) / sum(|λ|)`` over the eigenvalues of the full OV
    circuit ``W_E W_V W_O W_U`` (1 = pure copying, -1 = anti-copying). All heads -> [layer, head]."""
    if layer is None and head is None:
        return torch.tensor([[ov_copying_score(model, l, h) for h in range(model.cfg.n_heads)]
                             for l in range(model.cfg.n_layers)])
    full = model.W_E @ ov_circuit(model, layer, head) @ model.W_U
    eig = full.eigenvalues
    return float(eig.real.sum() / eig.abs().sum())


@torch.no_grad()
def composition_scores(model, mode: str = "K") -> Float[Tensor, "layer_a head_a layer_b head_b"]:
    """Q-, K- or V-composition ``||W_A^OV M_B|| / (||W_A^OV|| ||M_B||)`` (Frobenius norms, Elhage
    et al. 2021) between every earlier head A and later head B, with ``M_B = W_Q W_K^T`` (Q),
    ``(W_Q W_K^T)^T`` (K) or ``W_V W_O`` (V). Entries with ``layer_b <= layer_a`` are 0.

    The same numbers as ``FactoredMatrix`` products (``ov_circuit(A) @ qk_circuit(B).T``) and
    TransformerLens' ``all_composition_scores``, computed for all pairs at once through the
    small Gram matrices: ``||L M R||_F^2 = tr(M^T (L^T L) M (R R^T))``. Under grouped-query
    attention ``W_K`` / ``W_V`` are expanded to query heads first (:func:`kv_head`), so heads
    sharing a key / value head share their K- and V-side factor; on rotary models ``W_Q W_K^T``
    ignores the rotation (:func:`qk_circuit`).
    """
    if mode not in ("Q", "K", "V"):
        raise ValueError(f"mode={mode!r}: expected 'Q', 'K' or 'V'")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    f64 = lambda t: t.detach().to(torch.float64).cpu()  # noqa: E731
    W_Q, W_O = f64(model.W_Q), f64(model.W_O)
    # grouped-query attention: each query head composes through the key / value head it reads
    W_K, W_V = f64(_per_query_head(model, model.W_K)), f64(_per_query_head(model, model.W_V))
    left_a, right_a = W_V, W_O                                   # OV_A = W_V W_O
    if mode == "Q":
        left_b, right_b = W_Q, W_K.transpose(-1, -2)             # QK = W_Q W_K^T
    elif mode == "K":
        left_b, right_b = W_K, W_Q.transpose(-1, -2)             # QK^T = W_K W_Q^T
    else:
        left_b, right_b = W_V, W_O
    gram_left_a = left_a.transpose(-1, -2) @ left_a              # [L, H, h, h]
    gram_right_b = right_b @ right_b.transpose(-1, -2)           # [L, H, h, h]
    product_sq = torch.zeros(L, H, L, H, dtype=torch.float64)
    for layer in range(L - 1):  # one source layer at a time bounds memory (H * L * H * d_head^2)
        middle = torch.einsum("ahd,mbdk->ambhk", right_a[layer], left_b)  # R_A L_B
        product_sq[layer] = torch.einsum("ambij,aik,ambkn,mbnj->amb", middle, gram_left_a[layer], middle,
                                         gram_right_b)
    norm_a = (gram_left_a * (right_a @ right_a.transpose(-1, -2))).sum((-1, -2)).sqrt()
    norm_b = ((left_b.transpose(-1, -2) @ left_b) * gram_right_b).sum((-1, -2)).sqrt()
    scores = product_sq.clamp_min(0).sqrt() / (norm_a[:, :, None, None] * norm_b[None, None])
    later = torch.arange(L)[None, :] > torch.arange(L)[:, None]  # [layer_a, layer_b]
    return (scores * later[:, None, :, None]).float()


def composition_frame(model, mode: str = "K", scores: Tensor | None = None) -> pd.DataFrame:
    """Composition scores as a table (``source``, ``target``, ``score``, ``rank``), highest first."""
    scores = composition_scores(model, mode) if scores is None else scores
    rows = []
    L, H = model.cfg.n_layers, model.cfg.n_heads
    for la in range(L):
        for ha in range(H):
            for lb in range(la + 1, L):
                for hb in range(H):
                    rows.append({"source": head_label(la, ha), "target": head_label(lb, hb),
                                 "mode": mode, "score": float(scores[la, ha, lb, hb])})
    frame = pd.DataFrame(rows, columns=["source", "target", "mode", "score"])  # no pairs in a 1-layer model
    frame = frame.sort_values("score", ascending=False, ignore_index=True)
    frame["rank"] = np.arange(1, len(frame) + 1)
    return frame


@torch.no_grad()
def qk_interaction(model, tokens: Int[Tensor, "batch pos"], layer: int, head: int, query_position: int = -1
                   ) -> Float[Tensor, "batch key"]:
    """Pre-softmax attention scores of ``query_position`` with every key position (``q . k /
    sqrt(d_head)``, causal mask -> -inf) for each sequence: the QK interaction heatmap data,
    equal to ``blocks.{layer}.attn.hook_attn_scores[:, head, query_position]``.

    ``q`` and ``k`` are read after the rotary rotation on RoPE models (``hook_rot_q`` /
    ``hook_rot_k``), and ``k`` is that of the key / value head the query head reads under
    grouped-query attention (:func:`kv_head`)."""
    layer, head = _parse_head((layer, head), model.cfg.n_layers, model.cfg.n_heads)
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    n = tokens.shape[1]
    q_pos = query_position % n if -n <= query_position < n else None
    if q_pos is None:
        raise ValueError(f"query_position={query_position}: expected an index into {n} positions")
    rotary = getattr(model.cfg, "positional_embedding_type", "standard") == "rotary"
    q_name, k_name = (f"blocks.{layer}.attn.hook_rot_{x}" if rotary else f"blocks.{layer}.attn.hook_{x}"
                      for x in "qk")
    _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda name: name in (q_name, k_name))
    q, k = cache[q_name][:, q_pos, head].float(), cache[k_name].float()
    k = k[:, :, head // (model.cfg.n_heads // k.shape[2])]  # hook_k holds key / value heads only
    scale = getattr(model.cfg, "attn_scale", -1.0)
    scale = scale if scale > 0 else math.sqrt(model.cfg.d_head)
    if not getattr(model.cfg, "use_attn_scale", True):
        scale = 1.0
    scores = torch.einsum("bd,bkd->bk", q, k).cpu() / scale
    scores[:, q_pos + 1:] = float("-inf")
    return scores


# --------------------------------------------------------------------------------------------
# Head families by behaviour
# --------------------------------------------------------------------------------------------

STAT_NAMES = ("bos", "previous_token", "self", "same_token", "induction", "entropy")


@torch.no_grad()
def attention_statistics(model, length: int = 47, n_sequences: int = 16, seed: int = 0) -> pd.DataFrame:
    """Per head, on ``BOS + S + S`` repeated random tokens (queries in the second copy): mean
    attention to BOS, the previous token, itself, the earlier copy of the same token, the
    induction target, and the attention entropy normalised by log(#keys). One row per head: the
    unit columns (``unit``, ``layer``, ``index``, ``kind``; :func:`interp_lib.units.unit_columns`),
    then the statistics."""
    tokens = repeat_probe_tokens(model, length, 0, n_sequences, seed)
    patterns = attention_patterns(model, tokens)  # [layer, batch, head, q, k]
    queries = torch.arange(1 + length, 1 + 2 * length)
    rows = patterns[..., queries, :]  # [layer, batch, head, nq, k]
    n_keys = (queries + 1).float()
    entropy = -(rows.clamp_min(1e-12).log() * rows).sum(-1) / n_keys.log()
    stats = {
        "bos": rows[..., 0].mean((1, 3)),
        "previous_token": _offset_attention(patterns, queries, 1),
        "self": _offset_attention(patterns, queries, 0),
        "same_token": _offset_attention(patterns, queries, length),
        "induction": _offset_attention(patterns, queries, length - 1),
        "entropy": entropy.mean((1, 3)),
    }
    records = []
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            unit = Head(layer, head)
            records.append({**unit_columns(unit),
                            **{name: float(stats[name][layer, head]) for name in STAT_NAMES}})
    return pd.DataFrame(records)


def head_families(stats: pd.DataFrame, method: str = "agglomerative", distance_threshold: float = 0.5,
                  min_cluster_size: int = 2) -> pd.DataFrame:
    """Cluster heads by their attention statistics (:func:`attention_statistics`) and name each
    family by its strongest statistic.

    ``agglomerative`` (default; deterministic, works for a handful of heads): Ward linkage on the
    raw statistics (all in [0, 1]) cut at ``distance_threshold``. ``hdbscan``: scikit-learn's
    HDBSCAN with ``min_cluster_size`` (label -1 = unclustered), for models with many heads.
    Adds columns ``family`` (int) and ``family_name``.
    """
    missing = [name for name in STAT_NAMES if name not in getattr(stats, "columns", ())]
    if missing:
        raise ValueError(f"stats lacks columns {missing}: expected the output of attention_statistics")
    features = stats[list(STAT_NAMES)].to_numpy(dtype=float)
    if method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        if len(features) < 2:
            labels = np.zeros(len(features), dtype=int)
        else:
            labels = AgglomerativeClustering(n_clusters=None, distance_threshold=distance_threshold,
                                             linkage="ward").fit_predict(features)
    elif method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        labels = HDBSCAN(min_cluster_size=min_cluster_size).fit_predict(features)
    else:
        raise ValueError(f"method={method!r}: expected 'agglomerative' or 'hdbscan'")
    out = stats.copy()
    out["family"] = labels
    names = {}
    for label in sorted(set(labels)):
        if label < 0:
            names[label] = "unclustered"
            continue
        centroid = features[labels == label].mean(0)
        pointed = dict(zip(STAT_NAMES[:-1], centroid[:-1]))
        best = max(pointed, key=pointed.get)
        names[label] = best if pointed[best] > 0.3 else "diffuse"
    out["family_name"] = [names[label] for label in labels]
    return out


def families_table(families: pd.DataFrame) -> pd.DataFrame:
    """One row per family: name, members, mean statistics."""
    grouped = families.groupby("family")
    table = grouped[list(STAT_NAMES)].mean()
    table.insert(0, "members", grouped["unit"].apply(lambda s: ", ".join(s)))
    table.insert(0, "family_name", grouped["family_name"].first())
    return table.reset_index()
