"""Stages 1-2 of the explainer: sample text windows, then stream per-unit events.

Units are attention heads or MLP neurons (:mod:`interp_lib.units`). A neuron's events are
ranked by its activation ``blocks.L.mlp.hook_post[..., i]`` (``EventSet.salience ==
"activation"``) with the same top / random / quantile reductions as below, and attend to
nothing (``Event.attended == []``); the rest of this docstring is about heads.

:func:`sample_windows` cuts a corpus into BOS-prefixed token windows (fixed seed, length and
count, exact duplicates removed). :func:`collect_events` runs the model over the windows in
batches with forward hooks on ``hook_pattern`` and ``hook_z`` that reduce each batch on the fly,
so memory stays proportional to ``heads x (top_k + n_random + quantile_reservoir)`` whatever the
corpus size (the activation tensor of the corpus is never held; delphi issue #38). Per head it
keeps:

* ``top``: the ``top_k`` most salient query positions, strongest first;
* ``random``: a uniform sample of positions (reservoir sampling by random keys);
* ``quantile``: events at evenly spaced quantiles of the activation distribution, picked at the
  end from a bounded uniform reservoir of ``(activation, position, attended)`` (disjoint from the
  random events: both are slices of one uniform sample);
* ``activation_stats``: streaming mean, std, min, max and count of the salience.

Salience: ``z_norm`` = ``||z[pos, head]||``; ``resid_write_norm`` = ``||z[pos, head] W_O[layer,
head]||`` (the norm of what the head writes into the residual stream), computed as the quadratic
form ``z (W_O W_O^T) z`` so no ``[batch, pos, head, d_model]`` tensor is made;
``next_token_effect`` = ``(z W_O) . (W_U[:, next] - mean W_U)``, the head's direct effect on the
logit of the token that actually comes next (before the final norm). Norms measure how much a
head writes, not whether it matters: many heads park attention on BOS when they have nothing to
do, and the BOS value can be large, so by ``||z||`` their top events are resting positions. On
toy-2l's bundled text the top 10 events of induction heads L1H0 / L1H1 by ``||z||`` are 0 / 10
repeated-token copies (L1H1's all rest on ``<|endoftext|>``); by ``next_token_effect`` all
10 of each attend to the token after an earlier copy of the current token.

Ties in salience (identical prefixes give identical activations) are broken by the earlier
``(window, position)``, so results do not depend on ``batch_size``. Random and reservoir keys are
a hash of ``(seed, head, window, position)``: a deterministic function of ``seed``, also
independent of ``batch_size``.

Event tokens are ``tokenizer.decode([id])`` of each token (``" def"``, ``"\\n"``), which reads
as the text does; ``convert_ids_to_tokens`` would show byte-level symbols (``"Ġdef"``, ``"Ċ"``). A
character split across byte-level tokens decodes to ``"\\ufffd"`` in each piece.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..artifacts import jsonable
from ..units import Head, parse_units, unit_count
from .records import Event, head_label, make_unit, parse_head_label, parse_unit_label

logger = logging.getLogger(__name__)

SALIENCE = ("z_norm", "resid_write_norm", "next_token_effect")
SALIENCE_DESCRIPTIONS = {
    "z_norm": "||z||: the norm of the head's attention-weighted values at the query",
    "resid_write_norm": "||z W_O||: the norm of what the head writes into the residual stream",
    "next_token_effect": "(z W_O) . (W_U[:, next] - mean over the vocabulary of W_U): the head's direct push "
                         "on the logit of the token that actually comes next (before the final norm; the "
                         "last position of a window, which has no next token, counts 0)",
}
"""What each salience measures (recorded with the events: ``EventSet.config["salience_description"]``)."""
NEURON_SALIENCE = "activation"
NEURON_SALIENCE_DESCRIPTION = ("the neuron's activation blocks.L.mlp.hook_post[..., i] (after the MLP "
                               "nonlinearity) at the position")


def units_kind(units) -> str:
    """``"neuron"`` when ``units`` names neurons (``Neuron`` objects or labels like ``L0N5``),
    else ``"head"`` (pairs, ``Head`` objects, ``"all"``, head labels)."""
    from ..units import Neuron

    items = units.split(",") if isinstance(units, str) else [units] if isinstance(units, Neuron) else units
    try:
        items = list(items)
    except TypeError:
        return "head"
    for item in items:
        if isinstance(item, Neuron) or (isinstance(item, str) and "N" in item.strip()[1:].upper()):
            return "neuron"
    return "head"
EVENT_KINDS = ("top", "random", "quantile")
DATASETS = ("auto", "bundled", "wikitext", "code")


_MASK32 = 0xFFFFFFFF
_KEY_SENTINEL = (1 << 63) - 1  # above every sample key: marks an empty slot


# --------------------------------------------------------------------------------------------
# Stage 1: text windows
# --------------------------------------------------------------------------------------------

def _dataset_text(dataset: str, split: str) -> tuple[str, str]:
    from ..data import BUNDLED_SPLITS, load_texts

    if not isinstance(dataset, str):
        raise ValueError(f"dataset={dataset!r}: expected one of {DATASETS} or a path to a text file")
    if dataset == "code":
        return load_texts("bundled", "code"), "bundled/code"
    if dataset in ("auto", "bundled", "wikitext"):
        if dataset != "wikitext" and split not in BUNDLED_SPLITS:
            raise ValueError(f"split={split!r}: expected one of {BUNDLED_SPLITS}")
        return load_texts(dataset, split), f"{dataset}/{split}"
    path = Path(dataset).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as error:
            raise ValueError(f"dataset={dataset!r}: {path} is not UTF-8 text (byte {error.start}: "
                             f"{error.reason}); expected a UTF-8 text file") from None
    raise ValueError(f"dataset={dataset!r}: expected one of {DATASETS} or a path to a text file")


def _dedupe_rows(rows: Tensor) -> tuple[Tensor, int]:
    seen: set[bytes] = set()
    keep = []
    for index, row in enumerate(rows.numpy()):
        digest = hashlib.sha1(row.tobytes()).digest()
        if digest not in seen:
            seen.add(digest)
            keep.append(index)
    return rows[keep], len(rows) - len(keep)


def sample_windows(model, dataset: str = "auto", n_windows: int = 256, window_len: int = 64, *,
                   split: str = "validation", seed: int = 0, dedupe: bool = True,
                   return_info: bool = False) -> Int[Tensor, "window pos"] | tuple[Tensor, dict]:
    """``n_windows`` BOS-prefixed windows of ``window_len`` tokens (BOS included) from a corpus.

    Args:
        model: a model with a ``.tokenizer`` (and ``.cfg.n_ctx``), or a tokenizer.
        dataset: ``"auto"`` (WikiText-103 on Colab, the bundled corpus elsewhere), ``"bundled"``,
            ``"wikitext"`` (through ``datasets``; needs the hub or a cache), ``"code"`` (the
            bundled code split: out-of-distribution text), or a path to a UTF-8 text file.
        split: corpus split for ``auto`` / ``bundled`` / ``wikitext``.
        seed: the window order (and so which windows are kept) is fixed by ``seed``.
        dedupe: drop windows whose tokens exactly repeat an earlier window; the count is logged.
        return_info: also return ``{"source", "n_available", "n_duplicates", "n_windows"}``.

    Non-overlapping windows are cut from the tokenised text (:func:`interp_lib.data.text_windows`),
    shuffled with ``seed``, deduplicated, and the first ``n_windows`` kept. Raises ValueError
    saying how many exist when fewer than ``n_windows`` are available.
    """
    from ..data import text_windows

    if isinstance(n_windows, bool) or not isinstance(n_windows, (int, np.integer)) or n_windows < 1:
        raise ValueError(f"n_windows={n_windows!r}: expected a positive integer")
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if isinstance(window_len, bool) or not isinstance(window_len, (int, np.integer)) or window_len < 2 \
            or (n_ctx is not None and window_len > n_ctx):
        upper = f", at most the model's context {n_ctx}" if n_ctx is not None else ""
        raise ValueError(f"window_len={window_len!r}: expected an integer >= 2{upper}")
    tokenizer = getattr(model, "tokenizer", model)
    text, source = _dataset_text(dataset, split)
    rows = text_windows(tokenizer, text, int(window_len), None, seed=seed, prepend_bos=True, deduplicate=False)
    n_duplicates = 0
    if dedupe:
        rows, n_duplicates = _dedupe_rows(rows)
    if n_duplicates:
        logger.info("sample_windows: dropped %d duplicate windows of %d from %s", n_duplicates,
                    n_duplicates + len(rows), source)
    if len(rows) < n_windows:
        raise ValueError(f"n_windows={n_windows}: {source} has only {len(rows)} "
                         f"{'distinct ' if dedupe else ''}windows of {window_len} tokens "
                         f"({n_duplicates} duplicates dropped); ask for at most {len(rows)}, use shorter "
                         "windows, or a larger dataset / split")
    windows = rows[: int(n_windows)].contiguous()
    if return_info:
        return windows, {"source": source, "n_available": len(rows), "n_duplicates": n_duplicates,
                         "n_windows": len(windows)}
    return windows


# --------------------------------------------------------------------------------------------
# Event set
# --------------------------------------------------------------------------------------------

def _label_key(key, unit_kind: str = "head") -> str:
    return make_unit(*key, unit_kind).label if isinstance(key, tuple) else str(key)


@dataclass
class EventSet:
    """Per-unit events of one collection run (see the module docstring). JSON round-trips.

    Keyed by ``(layer, index)`` (a :class:`~interp_lib.units.Head` / ``Neuron`` finds its
    entry); ``unit_kind`` says which kind every key is, ``n_heads`` the units per layer (heads,
    or ``d_mlp`` for neurons)."""

    n_layers: int
    n_heads: int
    n_windows: int
    window_len: int
    salience: str                                             # "z_norm" | "resid_write_norm"
    top: dict[Head, list[Event]] = field(default_factory=dict)       # strongest first
    random: dict[Head, list[Event]] = field(default_factory=dict)    # uniform sample of positions
    quantile: dict[Head, list[Event]] = field(default_factory=dict)  # low to high activation
    activation_stats: dict[Head, dict] = field(default_factory=dict)  # mean, std, min, max, n
    config: dict[str, Any] = field(default_factory=dict)      # the collection arguments
    unit_kind: str = "head"                                   # "head" | "neuron"

    def _check_head(self, layer: int, head: int) -> Head:
        key = (int(layer), int(head))
        if key not in self.top:
            raise ValueError(f"{self.unit_kind} {_label_key(key, self.unit_kind)} has no events here; collected "
                             f"{self.unit_kind}s: {', '.join(u.label for u in self.units()) or 'none'}")
        return key

    def events(self, layer: int, head: int, kinds: Sequence[str] = EVENT_KINDS) -> list[Event]:
        """The head's events of ``kinds`` (in that order)."""
        if isinstance(kinds, str):
            kinds = (kinds,)
        bad = [k for k in kinds if k not in EVENT_KINDS]
        if bad:
            raise ValueError(f"kinds={tuple(kinds)!r}: unknown {bad}; expected a subset of {EVENT_KINDS}")
        key = self._check_head(layer, head)
        return [event for kind in kinds for event in getattr(self, kind).get(key, [])]

    def heads(self) -> list[Head]:
        return sorted(self.top)

    def units(self) -> list:
        """The collected units, typed (``Head`` / ``Neuron``), in order."""
        return [make_unit(*key, self.unit_kind) for key in sorted(self.top)]

    def to_dict(self) -> dict:
        data = {name: getattr(self, name) for name in ("n_layers", "n_heads", "n_windows", "window_len", "salience",
                                                        "unit_kind")}
        for kind in EVENT_KINDS:
            data[kind] = {_label_key(k, self.unit_kind): [e.to_dict() for e in v] for k, v in getattr(self, kind).items()}
        data["activation_stats"] = {_label_key(k, self.unit_kind): jsonable(v) for k, v in self.activation_stats.items()}
        data["config"] = jsonable(self.config)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "EventSet":
        missing = [k for k in ("n_layers", "n_heads", "n_windows", "window_len", "salience") if k not in data]
        if missing:
            raise ValueError(f"EventSet data lacks {missing}: expected the output of EventSet.to_dict()")
        kinds = {kind: {parse_unit_label(k): [Event.from_dict(e) for e in v]
                        for k, v in data.get(kind, {}).items()} for kind in EVENT_KINDS}
        stats = {parse_unit_label(k): {n: (float("nan") if x is None else x) for n, x in v.items()}
                 for k, v in data.get("activation_stats", {}).items()}
        return cls(int(data["n_layers"]), int(data["n_heads"]), int(data["n_windows"]), int(data["window_len"]),
                   str(data["salience"]), activation_stats=stats, config=dict(data.get("config", {})),
                   unit_kind=str(data.get("unit_kind", "head")), **kinds)


# --------------------------------------------------------------------------------------------
# Streaming reductions
# --------------------------------------------------------------------------------------------

def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash on int64 tensors (multipliers < 2^31 so products fit in int64)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def _head_salt(seed: int, head_ids: Tensor) -> Tensor:
    base = int(hashlib.sha1(f"events:{seed}".encode()).hexdigest()[:8], 16)
    return _mix32(_mix32(head_ids ^ base) + 0x3C6EF372)


def _sample_keys(head_salt: Int[Tensor, "head 1"], hashed: Int[Tensor, "cand"], gidx: Int[Tensor, "cand"]
                 ) -> Int[Tensor, "head cand"]:
    """Uniform random keys per (head, global position), made unique by the position in the low
    31 bits: the ``n`` smallest keys are a uniform sample without replacement (reservoir
    sampling by random keys), mergeable batch by batch and independent of the batch size."""
    return (_mix32(hashed[None, :] ^ head_salt) << 31) | gidx[None, :]


class _Keep:
    """Per head, the ``size`` candidates with the smallest sort key so far (kept in key order),
    with their activation, global position and attended sources. Stable sorting of
    ``[kept, batch]`` (both in increasing position order) breaks key ties by the earlier position."""

    def __init__(self, n: int, size: int, n_att: int, key_dtype: torch.dtype, device):
        sentinel = math.inf if key_dtype.is_floating_point else _KEY_SENTINEL
        self.size = size
        self.key = torch.full((n, size), sentinel, dtype=key_dtype, device=device)
        self.val = torch.zeros((n, size), dtype=torch.float32, device=device)
        self.gidx = torch.full((n, size), -1, dtype=torch.long, device=device)
        self.att_pos = torch.zeros((n, size, n_att), dtype=torch.long, device=device)
        self.att_w = torch.zeros((n, size, n_att), dtype=torch.float32, device=device)

    def update(self, key: Tensor, val: Tensor, gidx: Tensor, attended) -> None:
        size = self.size
        keys = torch.cat([self.key, key], 1)
        order = torch.sort(keys, dim=1, stable=True).indices[:, :size]
        self.key = keys.gather(1, order)
        self.val = torch.cat([self.val, val], 1).gather(1, order)
        self.gidx = torch.cat([self.gidx, gidx.expand(len(order), -1)], 1).gather(1, order)
        old = order.clamp_max(size - 1)[..., None].expand(-1, -1, self.att_pos.shape[-1])
        att_pos, att_w = self.att_pos.gather(1, old), self.att_w.gather(1, old)
        # The pattern is gone after this batch: read the attended sources of the new entries now.
        heads, slots = (order >= size).nonzero(as_tuple=True)
        if len(heads):
            att_pos[heads, slots], att_w[heads, slots] = attended(heads, order[heads, slots] - size)
        self.att_pos, self.att_w = att_pos, att_w

    def cpu(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name).cpu().numpy() for name in ("key", "val", "gidx", "att_pos", "att_w")}


class _LayerState:
    """Streaming state of the selected heads of one layer: the top-k, one uniform sample (its
    first ``n_random`` keys are the random events, the rest the quantile reservoir: disjoint
    uniform samples) and running activation sums."""

    def __init__(self, layer: int, heads: list[int], n_heads_total: int, *, top_k: int, n_sample: int,
                 n_att: int, seed: int, w_o_gram: Tensor | None, device):
        self.layer, self.heads, self.n_heads_total = layer, heads, n_heads_total
        self.index = torch.tensor(heads, dtype=torch.long, device=device)
        self.all_heads = heads == list(range(n_heads_total))
        self.n_att, self.gram = n_att, w_o_gram
        n = len(heads)
        self.salt = _head_salt(seed, (self.index + layer * n_heads_total)[:, None])
        self.top = _Keep(n, top_k, n_att, torch.float32, device)
        self.sample = _Keep(n, n_sample, n_att, torch.long, device) if n_sample else None
        self.total = torch.zeros(n, dtype=torch.float64, device=device)
        self.total_sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.max = torch.full((n,), -math.inf, device=device)
        self.min = torch.full((n,), math.inf, device=device)
        self.count = 0
        self.pattern: Tensor | None = None
        self.w_o: Tensor | None = None       # [head, d_head, d_model] for salience="next_token_effect"
        self.unembed: Tensor | None = None   # [d_model, vocab], centred over the vocabulary
        self.next_ids: Tensor | None = None  # [batch, query] the token after each query (-1: none)

    def salience(self, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "head cand"]:
        if not self.all_heads:
            z = z.index_select(2, self.index)
        z = z.float()
        if self.w_o is not None:
            # the unembedding column of each query's next token, through each head's W_O:
            # [head, d_head, batch * query] (never a [batch, pos, head, d_model] tensor)
            nxt = self.next_ids.reshape(-1)
            columns = self.unembed[:, nxt.clamp_min(0)]                       # [d_model, cand]
            through = torch.einsum("hde,ec->hdc", self.w_o, columns)
            flat = z.reshape(-1, z.shape[2], z.shape[3])                       # [cand, head, d_head]
            effect = torch.einsum("chd,hdc->hc", flat, through)
            return torch.where(nxt[None, :] >= 0, effect, torch.zeros_like(effect))
        if self.gram is None:
            s = torch.linalg.vector_norm(z, dim=-1)
        else:  # ||z W_O||^2 = z (W_O W_O^T) z, without a d_model-wide tensor
            s = torch.einsum("bphd,bphd->bph", torch.einsum("bphd,hde->bphe", z, self.gram), z).clamp_min(0).sqrt()
        return s.permute(2, 0, 1).reshape(len(self.heads), -1)

    def update(self, z: Tensor, q0: int, batch: dict) -> None:
        pattern, self.pattern = self.pattern, None
        if pattern is None:
            raise RuntimeError(f"blocks.{self.layer}.attn.hook_pattern did not fire before hook_z: this model's "
                               "attention does not expose its pattern through TransformerLens hooks")
        n_q, n_keys = z.shape[1] - q0, pattern.shape[-1]
        s = self.salience(z[:, q0:])
        gidx = batch["gidx"]
        rows = pattern.reshape(-1, n_keys)  # [batch * head * query, key]
        n_att = min(self.n_att, n_keys)

        def attended(heads: Int[Tensor, "n"], cand: Int[Tensor, "n"]):
            b, q = cand // n_q, cand % n_q + q0
            flat = (b * self.n_heads_total + self.index[heads]) * pattern.shape[-2] + q
            weights, positions = rows[flat].float().topk(n_att, dim=-1)
            if n_att < self.n_att:  # window shorter than n_attended: pad, dropped at the end
                pad = self.n_att - n_att
                weights = torch.nn.functional.pad(weights, (0, pad), value=-1.0)
                positions = torch.nn.functional.pad(positions, (0, pad), value=n_keys)
            return positions, weights

        self._reduce(s, batch, attended)

    def _reduce(self, s: Float[Tensor, "unit cand"], batch: dict, attended) -> None:
        gidx = batch["gidx"]
        self.top.update(-s, s, gidx, attended)
        if self.sample is not None:
            self.sample.update(_sample_keys(self.salt, batch["hashed"], gidx), s, gidx, attended)
        s64 = s.double()
        self.total += s64.sum(1)
        self.total_sq += (s64 * s64).sum(1)
        self.max = torch.maximum(self.max, s.max(1).values)
        self.min = torch.minimum(self.min, s.min(1).values)
        self.count += s.shape[1]


class _NeuronLayerState(_LayerState):
    """The same streaming state for the selected MLP neurons of one layer: salience is the
    neuron's activation ``blocks.{layer}.mlp.hook_post[..., index]``; nothing is attended."""

    def salience(self, post: Float[Tensor, "batch pos neuron"]) -> Float[Tensor, "neuron cand"]:
        post = post.index_select(2, self.index).float() if not self.all_heads else post.float()
        return post.permute(2, 0, 1).reshape(len(self.heads), -1)

    def update(self, post: Tensor, q0: int, batch: dict) -> None:
        def attended(units: Int[Tensor, "n"], cand: Int[Tensor, "n"]):
            # no sources: a position past every query with a negative weight, dropped at the end
            shape = (len(units), self.n_att)
            return (torch.full(shape, 1 << 30, dtype=torch.long, device=units.device),
                    torch.full(shape, -1.0, device=units.device))

        self._reduce(self.salience(post[:, q0:]), batch, attended)


# --------------------------------------------------------------------------------------------
# Stage 2: collection
# --------------------------------------------------------------------------------------------

def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


def parse_heads(heads, n_layers: int, n_heads: int) -> list[Head]:
    """``"all"``, ``[(layer, head), ...]`` or ``["L1H0", ...]`` (or a comma-separated string of
    labels) -> sorted unique heads, checked against the model's range (:func:`interp_lib.units.parse_units`)."""
    return parse_units(heads, n_layers, n_heads, "head", name="heads")


def _check_windows(windows, model) -> Tensor:
    """Token windows ``[window, pos]`` (pos >= 2) on the CPU: the one token check,
    :func:`interp_lib.models.check_tokens`."""
    from ..models import check_tokens

    return check_tokens(model, windows, "windows", min_pos=2).cpu()


class _TokenText:
    """Token id -> text, decoded once per id (see the module docstring for the choice)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, ids: Iterable[int]) -> list[str]:
        ids = list(ids)
        missing = sorted({i for i in ids if i not in self.cache})
        if missing:  # one batched call: per-id decode calls dominate for many windows
            texts = self.tokenizer.batch_decode([[i] for i in missing]) if self.tokenizer is not None \
                else [str(i) for i in missing]
            self.cache.update(zip(missing, texts))
        return [self.cache[i] for i in ids]


@torch.no_grad()
def head_salience(model, tokens: Int[Tensor, "batch pos"], heads, salience: str = "next_token_effect"
                  ) -> dict[Head, Float[Tensor, "batch pos"]]:
    """Per-position salience of ``heads`` on ``tokens`` (BOS included), the quantity
    :func:`collect_events` ranks events by: one ``[batch, pos]`` tensor per ``(layer, head)``.

    For a scorer that must measure what the events measured (e.g. the head's activation on an
    explanation's positive vs negative texts). ``next_token_effect`` is 0 at the last position
    (no next token); right padding is safe for the other positions (causal attention)."""
    if salience not in SALIENCE:
        raise ValueError(f"salience={salience!r}: expected one of {', '.join(SALIENCE)}")
    cfg = model.cfg
    tokens = _check_windows(tokens, model) if torch.as_tensor(tokens).ndim == 2 else _check_windows(
        torch.as_tensor(tokens)[None], model)
    selected = parse_heads(heads, cfg.n_layers, cfg.n_heads)
    device = torch.device(cfg.device) if getattr(cfg, "device", None) is not None else torch.device("cpu")
    tokens = tokens.to(device)
    layers = sorted({layer for layer, _ in selected})
    names = {f"blocks.{layer}.attn.hook_z" for layer in layers}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    out: dict[Head, Tensor] = {}
    if salience == "next_token_effect":
        unembed = model.W_U.float().to(device)
        unembed = unembed - unembed.mean(-1, keepdim=True)
        following = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], 1)
        columns = unembed[:, following.clamp_min(0)]                            # [d_model, batch, pos]
    for layer, head in selected:
        z = cache[f"blocks.{layer}.attn.hook_z"][:, :, head].float()            # [batch, pos, d_head]
        w_o = model.W_O[layer, head].float().to(device)                         # [d_head, d_model]
        if salience == "z_norm":
            value = z.norm(dim=-1)
        elif salience == "resid_write_norm":
            value = (z @ w_o).norm(dim=-1)
        else:
            value = torch.einsum("bpe,ebp->bp", z @ w_o, columns)
            value = torch.where(following >= 0, value, torch.zeros_like(value))
        out[Head(layer, head)] = value.cpu()
    return out


@torch.no_grad()
def neuron_activation(model, tokens: Int[Tensor, "batch pos"], neurons) -> dict:
    """Per-position activation ``blocks.L.mlp.hook_post[..., i]`` of ``neurons`` (labels like
    ``L0N5``, pairs or ``Neuron`` objects) on ``tokens``: one ``[batch, pos]`` tensor per neuron,
    the quantity :func:`collect_events` ranks a neuron's events by."""
    cfg = model.cfg
    tokens = torch.as_tensor(tokens)
    tokens = _check_windows(tokens if tokens.ndim == 2 else tokens[None], model)
    selected = parse_units(neurons, cfg.n_layers, unit_count(model, "neuron")[1], "neuron", name="neurons")
    device = torch.device(cfg.device) if getattr(cfg, "device", None) is not None else torch.device("cpu")
    names = {f"blocks.{layer}.mlp.hook_post" for layer, _ in selected}
    last = max(layer for layer, _ in selected) + 1
    kwargs = {"stop_at_layer": last} if last < cfg.n_layers else {}
    _, cache = model.run_with_cache(tokens.to(device), names_filter=lambda n: n in names, **kwargs)
    return {unit: cache[f"blocks.{unit.layer}.mlp.hook_post"][:, :, unit.index].float().cpu() for unit in selected}


def unit_activation(model, tokens: Int[Tensor, "batch pos"], units, salience: str = "next_token_effect") -> dict:
    """What a unit's events are ranked by, per position: :func:`head_salience` for heads (with
    ``salience``), :func:`neuron_activation` for neurons. ``units`` may mix both kinds."""
    from ..units import Neuron

    units = list(units)
    neurons = [u for u in units if isinstance(u, Neuron)]
    heads = [u for u in units if not isinstance(u, Neuron)]
    out: dict = {}
    if heads:
        out.update(head_salience(model, tokens, heads, salience))
    if neurons:
        out.update(neuron_activation(model, tokens, neurons))
    return out


def collect_events(model, windows: Int[Tensor, "window pos"], heads="all", *, top_k: int = 20, n_random: int = 10,
                   n_quantile: int = 10, salience: str = "z_norm", n_attended: int = 5, batch_size: int = 16,
                   skip_bos: bool = True, seed: int = 0, progress: bool = True,
                   quantile_reservoir: int = 256, kind: str | None = None) -> EventSet:
    """Stream the windows through the model and keep, per unit, its top / random / quantile events.

    Args:
        windows: ``[window, pos]`` token ids (BOS first), e.g. from :func:`sample_windows`.
        heads: the units: ``"all"``, ``[(layer, head), ...]``, labels ``["L1H0", ...]`` or
            ``["L0N5", ...]``, or ``Head`` / ``Neuron`` objects.
        kind: ``"head"`` or ``"neuron"`` (default: read from ``heads``, see :func:`units_kind`;
            ``"all"`` means every head). Neurons are ranked by their activation
            ``blocks.L.mlp.hook_post[..., i]`` (``salience`` does not apply; the EventSet records
            ``"activation"``) and attend to nothing, so their events have no ``attended``.
        top_k: most salient query positions kept per head (strongest first).
        n_random: uniformly sampled positions per head (0: none).
        n_quantile: events at evenly spaced quantiles (lowest to highest) of a per-head uniform
            reservoir of ``quantile_reservoir`` positions (0: none).
        salience: ``"z_norm"`` (``||z||``), ``"resid_write_norm"`` (``||z W_O||``) or
            ``"next_token_effect"`` (the head's direct effect on the logit of the actual next
            token; see the module docstring and :data:`SALIENCE_DESCRIPTIONS`). Recorded in the
            result (``EventSet.salience`` and ``config["salience_description"]``).
        n_attended: source positions recorded per event (highest attention first).
        batch_size: windows per forward pass (results do not depend on it).
        skip_bos: never use the BOS query (position 0) as an event or in the statistics.
        seed: fixes the random and quantile samples.

    Memory is ``O(heads x (top_k + n_random + quantile_reservoir))`` plus one batch's activations.
    """
    top_k = _check_int(top_k, "top_k", 1)
    n_random = _check_int(n_random, "n_random", 0)
    n_quantile = _check_int(n_quantile, "n_quantile", 0)
    n_attended = _check_int(n_attended, "n_attended", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    quantile_reservoir = _check_int(quantile_reservoir, "quantile_reservoir", 1)
    kind = units_kind(heads) if kind is None else kind
    neurons = kind == "neuron"
    if not neurons and salience not in SALIENCE:
        raise ValueError(f"salience={salience!r}: expected one of {', '.join(SALIENCE)}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r}: expected an integer")
    cfg = model.cfg
    windows = _check_windows(windows, model)
    per_layer = unit_count(model, kind)[1]
    selected = parse_units(heads, cfg.n_layers, per_layer, kind, name="heads" if not neurons else "neurons")
    if neurons:
        salience, n_attended = NEURON_SALIENCE, 1
    n_windows, n_pos = windows.shape
    if n_windows * n_pos >= 2**31:  # positions are packed into 31 bits of the sample keys
        raise ValueError(f"windows has {n_windows} x {n_pos} positions: expected fewer than 2**31; collect in parts")
    q0 = 1 if skip_bos else 0
    device = torch.device(cfg.device) if getattr(cfg, "device", None) is not None else torch.device("cpu")
    reservoir = max(quantile_reservoir, n_quantile) if n_quantile else 0

    by_layer: dict[int, list[int]] = {}
    for layer, head in selected:
        by_layer.setdefault(layer, []).append(head)
    states: dict[int, _LayerState] = {}
    with torch.inference_mode():
        w_o = model.W_O if salience == "resid_write_norm" and not neurons else None
        unembed = None
        if salience == "next_token_effect":
            unembed = model.W_U.float().to(device)
            unembed = unembed - unembed.mean(-1, keepdim=True)
        for layer, layer_heads in by_layer.items():
            if neurons:
                states[layer] = _NeuronLayerState(layer, layer_heads, per_layer, top_k=top_k,
                                                  n_sample=n_random + reservoir, n_att=1, seed=int(seed),
                                                  w_o_gram=None, device=device)
                continue
            gram = None
            if w_o is not None:
                w = w_o[layer, layer_heads].to(device).double()
                gram = (w @ w.transpose(-1, -2)).float()
            states[layer] = _LayerState(layer, layer_heads, cfg.n_heads, top_k=top_k, n_sample=n_random + reservoir,
                                        n_att=n_attended, seed=int(seed), w_o_gram=gram, device=device)
            if unembed is not None:
                states[layer].w_o = model.W_O[layer, layer_heads].to(device).float()
                states[layer].unembed = unembed

        batch_info: dict[str, Tensor] = {}  # this batch's global positions, shared by all layers
        query_positions = torch.arange(q0, n_pos, device=device)

        def pattern_hook(pattern, hook):
            states[hook.layer()].pattern = pattern  # read by the z hook of the same layer
            return None

        def z_hook(z, hook):
            states[hook.layer()].update(z, q0, batch_info)
            return None

        fwd_hooks = []
        for layer in states:
            if neurons:  # the same reduction as z_hook, on the MLP's post-activation
                fwd_hooks.append((f"blocks.{layer}.mlp.hook_post", z_hook))
                continue
            fwd_hooks.append((f"blocks.{layer}.attn.hook_pattern", pattern_hook))
            fwd_hooks.append((f"blocks.{layer}.attn.hook_z", z_hook))
        last = max(states) + 1
        run_kwargs = {"stop_at_layer": last} if last < cfg.n_layers else {}
        from tqdm.auto import tqdm

        for start in tqdm(range(0, n_windows, batch_size), desc="collecting events", disable=not progress,
                          total=math.ceil(n_windows / batch_size), unit="batch"):
            batch = windows[start:start + batch_size].to(device)
            gidx = ((torch.arange(len(batch), device=device) + start)[:, None] * n_pos
                    + query_positions[None, :]).reshape(-1)
            batch_info.update(gidx=gidx, hashed=_mix32(gidx))
            if unembed is not None:
                following = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -1)], 1)[:, q0:]
                for state in states.values():
                    state.next_ids = following
            model.run_with_hooks(batch, fwd_hooks=fwd_hooks, **run_kwargs)

    text = _TokenText(getattr(model, "tokenizer", None))
    window_tokens: dict[int, list[str]] = {}

    def tokens_of(window: int) -> list[str]:
        return window_tokens[window]

    def decode_windows(kept: Iterable[np.ndarray]) -> None:
        used = sorted({int(g) // n_pos for gidx in kept for g in gidx.ravel() if g >= 0} - set(window_tokens))
        if used:
            rows = windows[used].tolist()
            flat = text([t for row in rows for t in row])
            for k, window in enumerate(used):
                window_tokens[window] = flat[k * n_pos:(k + 1) * n_pos]

    def to_events(data: dict, row: int, slots: Iterable[int], layer: int, head: int, kind: str) -> list[Event]:
        events = []
        for slot in slots:
            gidx = int(data["gidx"][row, slot])
            if gidx < 0:
                continue
            window, pos = divmod(gidx, n_pos)
            attended = [(int(p), float(w)) for p, w in zip(data["att_pos"][row, slot], data["att_w"][row, slot])
                        if p <= pos and w >= 0]
            events.append(Event(layer, head, window, pos, float(data["val"][row, slot]), kind,
                                tokens_of(window)[: pos + 1], attended, unit_kind=unit_kind))
        return events

    unit_kind = "neuron" if neurons else "head"
    description = NEURON_SALIENCE_DESCRIPTION if neurons else SALIENCE_DESCRIPTIONS[salience]
    result = EventSet(cfg.n_layers, per_layer, n_windows, n_pos, salience,
                      config={"salience_description": description,
                              "top_k": top_k, "n_random": n_random, "n_quantile": n_quantile,
                              "n_attended": 0 if neurons else n_attended, "skip_bos": bool(skip_bos),
                              "seed": int(seed), "quantile_reservoir": reservoir,
                              ("neurons" if neurons else "heads"): [u.label for u in selected]},
                      unit_kind=unit_kind)
    for layer, state in states.items():
        top = state.top.cpu()
        sample = state.sample.cpu() if state.sample is not None else None
        decode_windows([top["gidx"]] + ([sample["gidx"]] if sample is not None else []))
        total, total_sq = state.total.cpu().numpy(), state.total_sq.cpu().numpy()
        maxima, minima = state.max.cpu().numpy(), state.min.cpu().numpy()
        for row, head in enumerate(state.heads):
            key = make_unit(layer, head, unit_kind)
            result.top[key] = to_events(top, row, range(top_k), layer, head, "top")
            result.random[key], result.quantile[key] = [], []
            if sample is not None:
                valid = np.flatnonzero(sample["gidx"][row] >= 0)  # in key order: a random order
                result.random[key] = to_events(sample, row, valid[:n_random], layer, head, "random")
                pool = valid[n_random:]
                picked: list[int] = []
                if n_quantile and len(pool):
                    ordered = pool[np.argsort(sample["val"][row, pool], kind="stable")]
                    spots = np.round(np.linspace(0, len(ordered) - 1, min(n_quantile, len(ordered)))).astype(int)
                    picked = [int(ordered[i]) for i in dict.fromkeys(spots.tolist())]
                result.quantile[key] = to_events(sample, row, picked, layer, head, "quantile")
            n = state.count
            mean = total[row] / n if n else float("nan")
            var = max(total_sq[row] / n - mean * mean, 0.0) if n else float("nan")
            result.activation_stats[key] = {"mean": float(mean), "std": float(math.sqrt(var)),
                                            "min": float(minima[row]), "max": float(maxima[row]), "n": int(n)}
    return result
