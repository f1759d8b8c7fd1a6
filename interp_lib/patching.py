"""The one intervention engine: a registry of activation sources, activation patching (exact,
batched), attribution patching, and every zero / mean / resample ablation of the library.

**Sources.** :data:`COMPONENTS` is the registry of activation sources: each
:class:`Component` knows its hook name per layer (:meth:`Component.hook_name`), the axes of its
activation after the batch (``act_axes``), the sweep layouts it supports, and its *unit axis*
(``head`` for the per-head ``z`` / ``q`` / ``k`` / ``v``, ``neuron`` for ``mlp_post``, the MLP
post-activation ``blocks.L.mlp.hook_post``, ``d_model`` for the ``resid_*`` / ``attn_out`` /
``mlp_out`` streams), always the dimension after ``pos``; :meth:`Component.read_units` reads a
``[batch, pos, unit]`` view (a head's ``z`` norm, a neuron's value). A unit of
:mod:`interp_lib.units` finds its source through :data:`UNIT_COMPONENTS` /
:func:`unit_source` (``Head(1, 3)`` -> ``blocks.1.attn.hook_z``, index 3).

**Ablation** is defined once, in :func:`ablation_replacement`: ``zero``; ``mean``, the mean over
reference prompts *per position* (:func:`mean_activations`, streamed, computed once per hook
and reusable via ``means=``); ``resample``, another prompt's activation at the same positions
(:func:`resample_index`). :func:`ablation_sweep` (each index in turn, through the patching
engine), :func:`ablation_hooks` / :func:`run_with_ablation` (chosen heads, neurons and layers
together) and :func:`unit_ablation_effects` (each unit alone, loss change at its events: the
explainer's causal check) all use it, as do ``heads.icl_loss_drop``,
``probing.head_ablation_importance`` and the claims.

**Patching.** One engine, many components. :func:`activation_patch` runs the corrupted prompt with one
activation replaced by its value from a *source* run and records ``metric(logits)``, for every
index of a sweep (layer x position x head, ...). It returns the same layout as TransformerLens'
``patching.get_act_patch_*`` for that component, but instead of one forward pass per index it
stacks many patched copies of the corrupted input along the batch dimension (each copy patched
at a different index) and chunks them to a memory budget. Three exact shortcuts cut the work:

* **causality** - a patch at position ``p`` cannot change anything at positions ``< p``, so the
  copies run only positions ``p..`` on top of the corrupted run's cached keys and values (the
  Hugging Face KV cache the bridge accepts as ``past_key_values``);
* **no-op patches** - where the source activation equals the corrupted one (e.g. every position
  before the first token on which clean and corrupted differ) the result is the corrupted
  metric, and no forward pass is run;
* **logits the metric reads** - metrics that declare the positions they read (attribute
  ``reads_positions``; the factories here set it) only get those positions unembedded.

Passes are planned by a small cost model (a fixed cost per pass against arithmetic per token),
and a metric that also provides ``batched`` is evaluated once per pass for all copies.

The shortcuts lean on library internals (how transformers hands the KV cache to the bridge's
attention changed within transformers 5.x, and once made them silently wrong), so they check
themselves: the first sweep per model and component recomputes a few cells with plain
full-length patched forward passes, and on any difference warns with the installed versions
and uses the plain path from then on (:class:`ShortcutMismatchWarning`, :func:`shortcut_verdict`).

Patches are written in place, as TransformerLens' patch setters do: on a TransformerBridge
``blocks.L.hook_resid_mid`` is ``blocks.L.ln2.hook_in``, and a hook that *returns* a new tensor
there reaches the MLP but not the residual add; an in-place edit reaches both.

The same engine serves :func:`ablation_sweep` (the source is zeros, a mean, or a resampled run);
:func:`attribution_patch` is the first-order estimate with the same layout from two forward
passes and one backward pass.

Layouts (``by_position=True`` / ``False``), as in ``transformer_lens.patching``:

=====================================================  ===========================  ==============
component                                              by position                  all positions
=====================================================  ===========================  ==============
``resid_pre`` ``resid_mid`` ``resid_post``             ``[layer, pos]``             ``[layer]``
``attn_out`` ``mlp_out``                               ``[layer, pos]``             ``[layer]``
``attn_head_out`` (z) ``attn_head_q`` ``_k`` ``_v``    ``[layer, pos, head]``       ``[layer, head]``
``attn_head_pattern``                                  ``[layer, head, dest_pos]``  ``[layer, head]``
``mlp_post`` (MLP neurons)                             ``[layer, pos, neuron]``     ``[layer, neuron]``
=====================================================  ===========================  ==============

Under grouped-query attention (Llama-family models such as SmolLM2) ``attn_head_k`` and
``attn_head_v`` have one head index per key / value head (``model.cfg.n_key_value_heads``, see
:func:`n_kv_heads`), as their hooks do; the other head components index query heads.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .models import check_tokens, next_token_loss
from .units import Neuron, Unit, parse_units, unit_count
from .versions import summary

MetricFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor | float]


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Component:
    """An activation source: where its hook is, its axes, and how to read its units.

    ``act_axes`` names the activation's dimensions after the batch dimension; a sweep axis
    indexes the activation dimension of the same name (``layer`` picks the hook instead).
    ``unit_axis`` is the dimension that indexes the source's units (``head`` for the per-head
    activations, ``neuron`` for the MLP's post-activation, ``d_model`` for a whole-layer
    stream); it is always the dimension right after ``pos`` (index 2 of the activation with its
    batch dimension), so ``act[:, :, i]`` is unit ``i`` at every position.
    """

    name: str
    act_name: str                           # TransformerLens short name: "z", "resid_pre", "post", ...
    act_axes: tuple[str, ...]
    axes_by_position: tuple[str, ...]
    axes_all_positions: tuple[str, ...]
    unit_axis: str | None = None

    def hook_name(self, layer: int) -> str:
        """``blocks.{layer}.attn.hook_z``, ``blocks.{layer}.mlp.hook_post``, ``blocks.{layer}.hook_resid_pre``, ..."""
        inside = "attn." if self.act_name in ("z", "q", "k", "v", "pattern") else \
            "mlp." if self.act_name in ("pre", "post") else ""
        return f"blocks.{layer}.{inside}hook_{self.act_name}"

    def axes(self, by_position: bool) -> tuple[str, ...]:
        return self.axes_by_position if by_position else self.axes_all_positions

    @property
    def query_axis(self) -> str:
        """The activation axis whose index is the first position a patch can change."""
        return "dest_pos" if "dest_pos" in self.act_axes else "pos"

    def read_units(self, act: Tensor) -> Float[Tensor, "batch pos unit"]:
        """One number per unit and position: the activation itself where a unit is a scalar
        (a neuron, one ``d_model`` dimension), its L2 norm over the remaining axes where it is a
        vector (a head's ``z`` over ``d_head``)."""
        if self.unit_axis is None or self.act_axes[:2] != ("pos", self.unit_axis):
            raise ValueError(f"component {self.name!r} has no [pos, unit] layout (axes {self.act_axes})")
        if act.ndim != len(self.act_axes) + 1:
            raise ValueError(f"{self.name} activation has shape {tuple(act.shape)}: expected [batch, "
                             f"{', '.join(self.act_axes)}]")
        return act if act.ndim == 3 else act.flatten(3).norm(dim=-1)


_RESID = ("pos", "d_model")
_HEAD = ("pos", "head", "d_head")
_PATTERN = ("head", "dest_pos", "src_pos")


def _stream(name: str) -> Component:
    return Component(name, name, _RESID, ("layer", "pos"), ("layer",), "d_model")


def _head(name: str, act_name: str) -> Component:
    return Component(name, act_name, _HEAD, ("layer", "pos", "head"), ("layer", "head"), "head")


#: The activation sources, by name: every patching sweep, ablation and unit effect reads its hook
#: name, axes and unit layout from here. Under grouped-query attention ``attn_head_k`` / ``_v``
#: have one head per key / value head (:func:`n_kv_heads`).
COMPONENTS: dict[str, Component] = {c.name: c for c in (
    *(_stream(name) for name in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")),
    _head("attn_head_out", "z"), _head("attn_head_q", "q"), _head("attn_head_k", "k"), _head("attn_head_v", "v"),
    Component("attn_head_pattern", "pattern", _PATTERN, ("layer", "head", "dest_pos"), ("layer", "head")),
    Component("mlp_post", "post", ("pos", "neuron"), ("layer", "pos", "neuron"), ("layer", "neuron"), "neuron"),
)}
ALIASES = {"z": "attn_head_out", "q": "attn_head_q", "k": "attn_head_k", "v": "attn_head_v",
           "pattern": "attn_head_pattern", "post": "mlp_post"}
#: The source each kind of :mod:`interp_lib.units` unit lives in (its ``index`` on ``unit_axis``).
UNIT_COMPONENTS = {"head": "attn_head_out", "neuron": "mlp_post"}


def get_component(component: str | Component) -> Component:
    """The :class:`Component` called ``component`` (aliases ``z``, ``q``, ``k``, ``v``, ``pattern``)."""
    if isinstance(component, Component):
        return component
    name = ALIASES.get(component, component) if isinstance(component, str) else None
    if name not in COMPONENTS:
        valid = ", ".join(list(COMPONENTS) + [f"{a} (= {n})" for a, n in ALIASES.items()])
        raise ValueError(f"component={component!r} is not a patchable component; valid: {valid}")
    return COMPONENTS[name]


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------

def _check_eval(model) -> None:
    if getattr(model, "training", False):
        raise ValueError("model is in training mode (dropout would make every patch noisy): call model.eval()")


def _check_pair(model, clean_tokens, corrupted_tokens) -> tuple[Tensor, Tensor]:
    corrupted = check_tokens(model, corrupted_tokens, "corrupted_tokens")
    clean = check_tokens(model, clean_tokens, "clean_tokens")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean_tokens has shape {tuple(clean.shape)} but corrupted_tokens has shape "
                         f"{tuple(corrupted.shape)}: patching needs prompts of the same batch size and length "
                         "(pad or re-template them so positions line up)")
    return clean, corrupted


def n_kv_heads(model) -> int:
    """Key / value heads per layer: fewer than query heads under grouped-query attention."""
    return getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads


def _axis_size(model, axis: str, n_pos: int, comp: Component | None = None) -> int:
    if axis == "head" and comp is not None and comp.act_name in ("k", "v"):
        return n_kv_heads(model)   # hook_k / hook_v hold one entry per key / value head
    if axis == "neuron":
        return unit_count(model, "neuron")[1]
    return {"layer": model.cfg.n_layers, "head": model.cfg.n_heads, "pos": n_pos,
            "dest_pos": n_pos, "src_pos": n_pos}[axis]


def _check_selection(values, axis: str, size: int, argument: str) -> list[int]:
    if values is None:
        return list(range(size))
    if isinstance(values, (int, np.integer)):
        values = [values]
    values = [int(v) for v in torch.as_tensor(values).flatten().tolist()]
    bad = [v for v in values if not -size <= v < size]
    if bad or not values:
        raise ValueError(f"{argument}={bad or values!r} out of range: the {axis} axis has {size} entries "
                         f"(valid indices 0..{size - 1}, or negative from the end)")
    normalised = [v % size for v in values]
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"{argument}={values!r} names an index twice")
    return normalised


def _sweep_axes(model, comp: Component, by_position: bool, n_pos: int, layers, positions, heads
                ) -> tuple[tuple[str, ...], list[list[int]]]:
    axes = comp.axes(by_position)
    chosen = {"layer": layers, "pos": positions, "dest_pos": positions, "head": heads}
    if not by_position and positions is not None:
        raise ValueError("positions= given with by_position=False: an all-positions sweep patches every position")
    if "head" not in axes and heads is not None:
        raise ValueError(f"heads= given for component {comp.name!r}, which has no head axis")
    values = [_check_selection(chosen.get(a), a, _axis_size(model, a, n_pos, comp),
                               "positions" if a in ("pos", "dest_pos") else f"{a}s") for a in axes]
    return axes, values


def _as_scalar(value, where: str) -> float:
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, Tensor) and value.ndim == 0:
        return float(value.detach())
    shape = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
    raise ValueError(f"metric must return a scalar (a 0-d tensor or a float) but returned {shape} {where}; "
                     "reduce over the batch, e.g. return logit_diff(...).mean()")


def _reads_positions(metric, n_pos: int) -> list[int] | None:
    positions = getattr(metric, "reads_positions", None)
    if positions is None:
        return None
    positions = sorted({int(p) % n_pos for p in torch.as_tensor(positions).flatten().tolist()})
    return positions


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------

def _position_labels(model, tokens: Tensor) -> list[str]:
    if tokens.shape[0] == 1 and getattr(model, "tokenizer", None) is not None:
        return [f"{i}:{t}" for i, t in enumerate(model.to_str_tokens(tokens[0]))]
    return [str(i) for i in range(tokens.shape[1])]


def _cell_label(axes: Sequence[str], index: Sequence[int]) -> str:
    parts = dict(zip(axes, index))
    label = f"L{parts['layer']}"
    if "head" in parts:
        label += f"H{parts['head']}"
    for axis in ("pos", "dest_pos"):
        if axis in parts:
            label += f"@{parts[axis]}"
    return label


def make_labels(model, axes: Sequence[str], values: Sequence[Sequence[int]], tokens: Tensor) -> dict:
    """Tick labels per axis (``L3``, ``H7``, ``5:␣the``) and one label per cell (``L3H7@5``)."""
    pos_labels = _position_labels(model, tokens)
    labels: dict[str, object] = {}
    for axis, vals in zip(axes, values):
        if axis == "layer":
            labels[axis] = [f"L{v}" for v in vals]
        elif axis == "head":
            labels[axis] = [f"H{v}" for v in vals]
        else:
            labels[axis] = [pos_labels[v] for v in vals]
    cells = np.array([_cell_label(axes, idx) for idx in itertools.product(*values)], dtype=object)
    labels["cell"] = cells.reshape([len(v) for v in values])
    return labels


def patching_frame(result: Tensor, labels: Mapping) -> pd.DataFrame:
    """A long DataFrame (one row per cell: axis labels, ``cell`` label, ``value``) of a sweep."""
    axes = [a for a in labels if a != "cell"]
    shape = tuple(len(labels[a]) for a in axes)
    if tuple(result.shape) != shape:
        raise ValueError(f"result has shape {tuple(result.shape)} but labels describe {shape}")
    rows = itertools.product(*[labels[a] for a in axes])
    frame = pd.DataFrame(list(rows), columns=axes)
    frame["cell"] = np.asarray(labels["cell"]).reshape(-1)
    frame["value"] = result.detach().cpu().reshape(-1).numpy()
    return frame


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------

def _bytes_per_row(model, n_query: int, n_keys: int, n_logit_pos: int) -> int:
    cfg = model.cfg
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    per_position = 12 * cfg.d_model + 3 * d_mlp + 4 * cfg.n_heads * n_keys + 2 * cfg.d_vocab * n_logit_pos / max(n_query, 1)
    kv = 2 * cfg.n_layers * n_keys * cfg.d_model
    return int(4 * (n_query * per_position + kv)) + 1


def _save_hooks(names: Iterable[str], store: dict) -> list:
    def save(act, hook, name):
        store[name] = act.detach().clone()
        return act
    return [(name, (lambda n: (lambda act, hook: save(act, hook, n)))(name)) for name in names]


def _one_hot_mask(comp: Component, axes: Sequence[str], cells: Tensor, act_shape: Sequence[int],
                  start: int, active: Tensor | None = None) -> Tensor:
    """Bool mask ``[n_copies, *act_shape]`` (broadcastable): for copy i, True where cell i
    patches; all False for copies that are not ``active`` (patched at another layer)."""
    n = cells.shape[0]
    mask = torch.ones((n,) + (1,) * len(act_shape), dtype=torch.bool, device=cells.device)
    if active is not None:
        mask = mask & active.reshape((n,) + (1,) * len(act_shape))
    for column, axis in enumerate(axes):
        if axis == "layer":
            continue
        dim = comp.act_axes.index(axis)
        index = (cells[:, column] - (start if axis == comp.query_axis else 0)).clamp(min=0)
        shape = [n] + [1] * len(act_shape)
        shape[1 + dim] = act_shape[dim]
        one_hot = torch.nn.functional.one_hot(index, act_shape[dim]).bool().reshape(shape)
        mask = mask & one_hot
    return mask


def _slice_query(comp: Component, tensor: Tensor, start: int) -> Tensor:
    """``tensor[batch, ...]`` restricted to query positions ``start:``."""
    dim = 1 + comp.act_axes.index(comp.query_axis)
    return tensor.narrow(dim, start, tensor.shape[dim] - start)


def _patch_hook(comp, axes, cells, active, start, source_suffix, n_copies):
    def hook(act, hook):
        batch = act.shape[0] // n_copies
        view = act.reshape(batch, n_copies, *act.shape[1:])
        mask = _one_hot_mask(comp, axes, cells, act.shape[1:], start, active)
        patched = torch.where(mask.unsqueeze(0), source_suffix.unsqueeze(1).to(act.dtype), view)
        # In place, as TransformerLens' patch setters do: on a TransformerBridge some hook points
        # (``hook_resid_mid``) hand out a tensor that feeds two consumers (the next LayerNorm and
        # the residual add), and only an in-place edit reaches both.
        act.copy_(patched.reshape(act.shape))
        return act
    return hook


def _to_sweep_layout(comp: Component, axes: Sequence[str], per_act: Tensor, reduce: str = "sum") -> Tensor:
    """Reduce ``[batch, *act_axes]`` over the batch and the activation axes the sweep does not
    index, and order what is left like the sweep's axes (after ``layer``)."""
    keep = [a for a in comp.act_axes if a in axes]
    dims = [0] + [1 + i for i, a in enumerate(comp.act_axes) if a not in axes]
    if reduce == "sum":
        reduced = per_act.sum(dim=dims)
    else:
        reduced = per_act.bool()
        for dim in sorted(dims, reverse=True):
            reduced = reduced.any(dim=dim)
    order = [keep.index(a) for a in axes if a != "layer"]
    return reduced.permute(order) if order else reduced


# Rough cost model used only to decide how to group the patched copies into forward passes:
# a fixed cost per pass (hooks, Python, the bridge's wrappers) against the arithmetic per token.
_PASS_SECONDS_PER_LAYER = 1.5e-3
_FLOPS_PER_SECOND = 3e10


def _plan_forwards(model, starts: Tensor, todo: Tensor, batch: int, n_pos: int, reads, patches_per_batch,
                   memory_limit_mb: float) -> list[tuple[int, Tensor]]:
    """Group the cells to run into forward passes: ``[(start position, cell indices), ...]``.

    Cells whose patch starts at position ``s`` need positions ``s..`` recomputed. Neighbouring
    starts can share a pass run from the smaller one (fewer passes, more arithmetic): a small
    dynamic programme over the distinct starts picks the cheapest grouping under the cost model,
    and every pass is split to the memory budget (or ``patches_per_batch``).
    """
    cfg = model.cfg
    distinct = sorted(set(starts[todo].tolist()))
    if not distinct:
        return []
    counts = [int((todo & (starts == s)).sum()) for s in distinct]
    pass_cost = _PASS_SECONDS_PER_LAYER * (cfg.n_layers + 2)
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    block_flops = 2 * cfg.n_layers * (4 * cfg.d_model ** 2 + 2 * cfg.d_model * d_mlp)

    def capacity(start: int) -> int:
        if patches_per_batch is not None:
            return max(1, int(patches_per_batch))
        n_logit = n_pos - start if reads is None else sum(p >= start for p in reads)
        per_copy = batch * _bytes_per_row(model, n_pos - start, n_pos, n_logit)
        return max(1, int(memory_limit_mb * 2**20 // per_copy))

    prefix = list(itertools.accumulate(counts, initial=0))

    def cost(i: int, j: int) -> float:  # one group of distinct[i..j] run from distinct[i]
        start, copies = distinct[i], prefix[j + 1] - prefix[i]
        n_logit = n_pos - start if reads is None else sum(p >= start for p in reads)
        flops = copies * batch * ((n_pos - start) * block_flops + n_logit * 2 * cfg.d_model * cfg.d_vocab)
        return math.ceil(copies / capacity(start)) * pass_cost + flops / _FLOPS_PER_SECOND

    best, choice = [0.0] * (len(distinct) + 1), [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        best[j], choice[j] = min((best[i] + cost(i, j - 1), i) for i in range(j))
    groups, j = [], len(distinct)
    while j > 0:
        i = choice[j]
        groups.append((i, j - 1))
        j = i
    plan = []
    for i, j in reversed(groups):
        start = distinct[i]
        members = torch.nonzero(todo & (starts >= start) & (starts <= distinct[j])).flatten()
        plan.extend((start, chunk) for chunk in members.split(capacity(start)))
    return plan


# --------------------------------------------------------------------------------------------
# Fast paths that check themselves
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _kv_cache_plumbing(model):
    """While active, every attention block receives the KV cache under the name the bridge's
    attention reads (:func:`interp_lib.models.install_kv_cache_bridge`; models from
    ``il.load_model`` have it already). Whether the cached suffix passes are then exact on the
    installed versions is not assumed: :func:`patch_sweep` checks them against plain passes."""
    from .models import install_kv_cache_bridge, quiet_cache_rename

    had = getattr(model, "_interp_lib_kv_hooks", None) is not None
    handles = install_kv_cache_bridge(model)
    try:
        with quiet_cache_rename():
            yield
    finally:
        if not had:
            for handle in handles:
                handle.remove()
            del model._interp_lib_kv_hooks


def _prefix_cache(kv_cache, start: int, n_pos: int, n_copies: int):
    """The corrupted run's keys / values for positions ``< start``, repeated for ``n_copies``."""
    past = copy.deepcopy(kv_cache)
    past.crop(start - n_pos)
    past.batch_repeat_interleave(n_copies)
    return past


def _usable_kv_cache(kv_cache, n_pos: int) -> bool:
    if kv_cache is None or not all(hasattr(kv_cache, a) for a in ("crop", "batch_repeat_interleave", "get_seq_length")):
        return False
    try:
        return int(kv_cache.get_seq_length()) == n_pos
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False


# (model -> {component name: True when its shortcuts matched plain patches, False when not}).
_SHORTCUT_VERDICTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_VERIFY_CELLS = 4


def shortcut_verdict(model, component: str | Component) -> bool | None:
    """Whether the fast paths of :func:`patch_sweep` were checked and found exact for this model
    and component (``None``: not checked yet; ``False``: they disagreed, the plain path is used)."""
    return _SHORTCUT_VERDICTS.get(model, {}).get(get_component(component).name)


class MetricError(ValueError):
    """The metric misbehaved on patched logits (NaN, a wrong shape): the caller's to fix."""


class ShortcutMismatchWarning(RuntimeWarning):
    """The patching engine's fast path disagreed with plain patches; the plain path was used."""


@dataclass
class _Sweep:
    """Everything a set of patched forward passes needs (built once per :func:`patch_sweep`)."""

    model: object
    comp: Component
    axes: tuple[str, ...]
    cells: Tensor                     # [n_cells, n_axes] sweep indices
    hook_names: dict[int, str]
    source: Mapping[str, Tensor]
    corrupted: Tensor
    baseline_logits: Tensor
    baseline: float
    metric: MetricFn
    patches_per_batch: int | None
    memory_limit_mb: float
    input_hooks: Callable[[int], list] | None = None

    def evaluate(self, todo: Tensor, starts: Tensor, reads: list[int] | None, kv_cache) -> Tensor:
        """The metric for every cell in ``todo`` (others keep the baseline), each run from its
        ``starts`` position on top of ``kv_cache`` (all starts 0 and no cache: plain passes),
        unembedding only ``reads`` (``None``: every position)."""
        model, comp, axes, corrupted = self.model, self.comp, self.axes, self.corrupted
        batch, n_pos = corrupted.shape
        metric = self.metric
        batched_metric = getattr(metric, "batched", None) if reads is not None else None
        results = torch.full((len(self.cells),), self.baseline, dtype=torch.float64)
        vocab = self.baseline_logits.shape[-1]
        logits_view = torch.full((batch, n_pos, vocab), math.nan, dtype=self.baseline_logits.dtype,
                                 device=self.baseline_logits.device)
        plan = _plan_forwards(model, starts, todo, batch, n_pos, reads, self.patches_per_batch, self.memory_limit_mb)
        for start, group in plan:
            logit_pos = list(range(start, n_pos)) if reads is None else [p for p in reads if p >= start]
            logits_view.fill_(math.nan)
            if reads is None:
                logits_view[:, :start] = self.baseline_logits[:, :start]
            else:
                below = [p for p in reads if p < start]
                logits_view[:, below] = self.baseline_logits[:, below]
            n = len(group)
            chunk_cells = self.cells[group].to(corrupted.device)
            tokens = corrupted[:, start:].repeat_interleave(n, dim=0)   # row b * n + i: copy i of prompt b
            past = _prefix_cache(kv_cache, start, n_pos, n) if start > 0 else None
            hooks = []
            for layer in chunk_cells[:, 0].unique().tolist():
                name = self.hook_names[layer]
                hooks.append((name, _patch_hook(comp, axes, chunk_cells, chunk_cells[:, 0] == layer, start,
                                                _slice_query(comp, self.source[name], start), n)))
            keep = torch.tensor([p - start for p in logit_pos], device=corrupted.device)
            hooks.append(("unembed.hook_in", lambda act, hook: act.index_select(1, keep)))
            if self.input_hooks is not None:
                hooks.extend(self.input_hooks(start))
            logits = model.run_with_hooks(tokens, past_key_values=past, fwd_hooks=hooks)
            logits = logits.reshape(batch, n, len(logit_pos), vocab)
            if batched_metric is not None:
                # One call for every copy: logits at the declared positions, [copy, batch, read, vocab].
                read_logits = logits_view[:, reads].unsqueeze(0).repeat(n, 1, 1, 1)
                read_logits[:, :, [reads.index(p) for p in logit_pos]] = logits.transpose(0, 1)
                values_here = torch.as_tensor(batched_metric(read_logits)).detach().double().cpu()
                if values_here.shape != (n,):
                    raise MetricError(f"metric.batched returned shape {tuple(values_here.shape)}; expected ({n},)")
                if torch.isnan(values_here).any():
                    raise MetricError("metric.batched returned NaN on patched logits")
                results[group] = values_here
                continue
            for i in range(n):
                logits_view[:, logit_pos] = logits[:, i]
                value = _as_scalar(metric(logits_view), "on patched logits")
                if math.isnan(value):
                    raise MetricError(
                        "metric returned NaN on patched logits. If it declares reads_positions, it read "
                        f"logits at other positions (it declared {reads}); fix or remove the attribute")
                results[group[i]] = value
        return results

    def plain(self, todo: Tensor | None = None) -> Tensor:
        """Every cell in ``todo`` (default: all) by plain full-length patched forward passes
        read by the metric itself: what TransformerLens' patching functions compute."""
        n_cells = len(self.cells)
        todo = torch.ones(n_cells, dtype=torch.bool) if todo is None else todo
        return self.evaluate(todo, torch.zeros(n_cells, dtype=torch.long), None, None)


def _verification_cells(todo: Tensor, starts: Tensor, n: int) -> Tensor:
    """A few cells that exercise every shortcut: the latest-starting cells that were run (they
    lean hardest on the KV cache), one more run cell at random, and one skipped cell."""
    generator = torch.Generator().manual_seed(0)
    run = torch.nonzero(todo).flatten()
    skipped = torch.nonzero(~todo).flatten()
    chosen: list[int] = []
    if len(run):
        latest = run[starts[run] == starts[run].max()]
        chosen += latest[torch.randperm(len(latest), generator=generator)[: max(1, n - 2)]].tolist()
        rest = run[~torch.isin(run, torch.tensor(chosen))]
        if len(rest):
            chosen.append(int(rest[torch.randint(len(rest), (1,), generator=generator)]))
    if len(skipped):
        chosen.append(int(skipped[torch.randint(len(skipped), (1,), generator=generator)]))
    return torch.tensor(sorted(set(chosen)), dtype=torch.long)


@torch.no_grad()
def patch_sweep(model, corrupted_tokens: Int[Tensor, "batch pos"], source: Mapping[str, Tensor],
                metric: MetricFn, component: str | Component = "attn_head_out", by_position: bool = True,
                layers=None, positions=None, heads=None, patches_per_batch: int | None = None,
                memory_limit_mb: float = 1024.0, skip_noop: bool = True, shortcuts: bool = True,
                verify: bool | None = None, input_hooks: Callable[[int], list] | None = None) -> Tensor:
    """The engine: ``metric`` of the corrupted run with each index of the sweep patched from ``source``.

    ``source`` maps each needed hook name (``blocks.{l}.attn.hook_z``, ...) to an activation of
    the corrupted run's shape: a clean cache (activation patching), zeros or a mean (ablation),
    a resampled run (resample ablation). Returns the sweep's values on the CPU, shaped by the
    selected axes (see the module docstring). Most users want :func:`activation_patch` or
    :func:`ablation_sweep`.

    ``shortcuts=False`` runs every cell as a plain full-length patched forward pass. With
    shortcuts on, the first sweep per model and component (every sweep with ``verify=True``)
    also recomputes a few cells the plain way; if any differs, a
    :class:`ShortcutMismatchWarning` names the installed versions, the whole sweep is recomputed
    plainly and the plain path is used for that model and component from then on.

    ``input_hooks(start)``: forward hooks that corrupt the run itself (e.g. noise added to the
    token embeddings in causal tracing), applied to the corrupted run and to every patched pass;
    ``start`` is the first position a pass computes (a suffix pass on the KV cache holds positions
    ``start..`` only), so the hooks slice what they add accordingly.
    """
    comp = get_component(component)
    _check_eval(model)
    corrupted = check_tokens(model, corrupted_tokens, "corrupted_tokens")
    batch, n_pos = corrupted.shape
    axes, values = _sweep_axes(model, comp, by_position, n_pos, layers, positions, heads)
    hook_names = {layer: comp.hook_name(layer) for layer in values[0]}
    for layer, name in hook_names.items():
        if name not in source:
            raise ValueError(f"source lacks {name!r}, needed to patch layer {layer} of {comp.name}")
    verdicts = _SHORTCUT_VERDICTS.setdefault(model, {})
    shortcuts = shortcuts and verdicts.get(comp.name) is not False

    with _kv_cache_plumbing(model):
        # The corrupted run: baseline metric, the activations being replaced, and the KV cache.
        corrupted_acts: dict[str, Tensor] = {}
        baseline_logits, kv_cache = model.run_with_hooks(
            corrupted, return_type="logits_and_cache", use_cache=shortcuts,
            fwd_hooks=_save_hooks(hook_names.values(), corrupted_acts) + list(input_hooks(0) if input_hooks else []))
        baseline = _as_scalar(metric(baseline_logits), "on the corrupted logits")
        if math.isnan(baseline):
            raise ValueError("metric returned NaN on the corrupted run's logits")
        for layer, name in hook_names.items():
            if tuple(source[name].shape) != tuple(corrupted_acts[name].shape):
                raise ValueError(f"source[{name!r}] has shape {tuple(source[name].shape)}; the corrupted run's "
                                 f"activation has shape {tuple(corrupted_acts[name].shape)}")
        cells = torch.tensor(list(itertools.product(*values)), dtype=torch.long)
        sweep = _Sweep(model, comp, axes, cells, hook_names, source, corrupted, baseline_logits, baseline,
                       metric, patches_per_batch, memory_limit_mb, input_hooks)
        if not shortcuts:
            return sweep.plain().reshape([len(v) for v in values]).float()

        reads = _reads_positions(metric, n_pos)
        query_column = axes.index(comp.query_axis) if comp.query_axis in axes else None
        starts = cells[:, query_column] if query_column is not None else torch.zeros(len(cells), dtype=torch.long)
        # Cells whose patch cannot change what the metric reads keep the baseline value.
        todo = torch.ones(len(cells), dtype=torch.bool)
        if reads is not None:
            todo &= starts <= max(reads)
        if not _usable_kv_cache(kv_cache, n_pos):
            starts = torch.zeros_like(starts)  # no filled, croppable KV cache: every pass runs every position
        if skip_noop:
            for layer in values[0]:
                name = hook_names[layer]
                differs = _to_sweep_layout(comp, axes, source[name] != corrupted_acts[name], "any")
                for dim, vals in enumerate(values[1:]):
                    differs = differs.index_select(dim, torch.tensor(vals, device=differs.device))
                in_layer = cells[:, 0] == layer
                todo[in_layer] &= differs.flatten().cpu()

        failure = None
        try:
            results = sweep.evaluate(todo, starts, reads, kv_cache)
        except MetricError:
            raise  # the metric's own errors (NaN, wrong shapes) are the caller's to fix
        except Exception as error:  # noqa: BLE001 - a shortcut that crashes falls back like one that is wrong
            results, failure = None, f"raised {type(error).__name__}: {error}"
        if failure is None and (verify or comp.name not in verdicts):
            check = _verification_cells(todo, starts, _VERIFY_CELLS)
            if len(check):
                mask = torch.zeros(len(cells), dtype=torch.bool)
                mask[check] = True
                expected = sweep.plain(mask)[check]
                got = results[check]
                tolerance = 1e-4 * max(1.0, float(expected.abs().max()), abs(baseline))
                worst = int((got - expected).abs().argmax())
                if not torch.allclose(got, expected, rtol=0, atol=tolerance):
                    failure = (f"differed from plain patched forward passes by up to "
                               f"{float((got - expected).abs().max()):.3g} (at "
                               f"{_cell_label(axes, cells[check[worst]].tolist())}: {float(got[worst]):.6g} vs "
                               f"{float(expected[worst]):.6g})")
        if failure is None:
            verdicts[comp.name] = True
        else:
            verdicts[comp.name] = False
            warnings.warn(
                f"interp_lib.patching: the fast path for {comp.name} (KV-cache suffix passes, skipped no-op "
                f"patches, logits at declared positions) {failure} under {summary()}; this sweep and later "
                "ones on this model use plain patched forward passes (exact, slower). Please report it.",
                ShortcutMismatchWarning, stacklevel=3)
            results = sweep.plain()
    return results.reshape([len(v) for v in values]).float()


# --------------------------------------------------------------------------------------------
# Public API: activation patching
# --------------------------------------------------------------------------------------------

def _source_cache(model, tokens: Tensor, hook_names: Iterable[str]) -> dict[str, Tensor]:
    store: dict[str, Tensor] = {}
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=_save_hooks(hook_names, store))
    return store


def _cache_lookup(cache, names: Iterable[str]) -> dict[str, Tensor]:
    out = {}
    for name in names:
        try:
            out[name] = cache[name]
        except KeyError as error:
            raise ValueError(f"clean_cache lacks {name!r}") from error
    return out


def _prepare_sweep(model, clean_tokens, corrupted_tokens, component, by_position, layers, positions,
                   heads, clean_cache):
    """Checked inputs of a patching sweep: the component, clean / corrupted tokens, the sweep's
    axes and values, the hook names and the clean activations to patch in."""
    comp = get_component(component)
    if clean_cache is None:
        clean, corrupted = _check_pair(model, clean_tokens, corrupted_tokens)
    else:
        corrupted = check_tokens(model, corrupted_tokens, "corrupted_tokens")
        clean = corrupted if clean_tokens is None else _check_pair(model, clean_tokens, corrupted_tokens)[0]
    axes, values = _sweep_axes(model, comp, by_position, corrupted.shape[1], layers, positions, heads)
    names = [comp.hook_name(layer) for layer in values[0]]
    source = _source_cache(model, clean, names) if clean_cache is None else _cache_lookup(clean_cache, names)
    return comp, clean, corrupted, axes, values, names, source


def activation_patch(model, clean_tokens, corrupted_tokens, metric: MetricFn,
                     component: str = "attn_head_out", by_position: bool = True, *,
                     layers=None, positions=None, heads=None, clean_cache=None,
                     return_labels: bool = False, patches_per_batch: int | None = None,
                     memory_limit_mb: float = 1024.0, shortcuts: bool = True):
    """Exact activation patching: ``metric`` of the corrupted run with each activation of
    ``component`` (per layer / position / head) replaced by its value from the clean run.

    Args:
        model: a TransformerBridge (``il.load_model``), in eval mode.
        clean_tokens, corrupted_tokens: ``[batch, pos]`` token ids of the same shape.
        metric: maps logits ``[batch, pos, d_vocab]`` to a scalar (e.g.
            :func:`normalized_logit_diff_metric`). Optional attributes speed it up: with
            ``reads_positions`` (sorted non-negative positions) only those positions' logits are
            computed (the others are NaN); with ``batched`` as well, a function of the logits at
            those positions for many patched copies at once, ``[copy, batch, read, d_vocab]``
            -> ``[copy]``, it is called once per forward pass instead of once per copy.
        component: one of :data:`COMPONENTS` (aliases ``z``, ``q``, ``k``, ``v``, ``pattern``).
        by_position: patch one position at a time (``True``) or all positions at once.
        layers, positions, heads: restrict the sweep (indices; negative count from the end).
            The result's axes then have these lengths, in this order.
        clean_cache: activations of the clean run (an ``ActivationCache`` or a mapping from hook
            name to tensor) instead of running ``clean_tokens``.
        return_labels: also return ``{axis: tick labels, "cell": label per cell}`` (``L3H7@5``).
        patches_per_batch: patched copies per forward pass; default: as many as fit in
            ``memory_limit_mb``.
        shortcuts: take the engine's exact fast paths (checked against plain passes on first
            use, see :func:`patch_sweep`); ``False`` runs one plain patched pass per cell.

    Returns:
        A float tensor on the CPU with TransformerLens' ``get_act_patch_*`` layout for the
        component (module docstring); with ``return_labels`` a ``(tensor, labels)`` pair.
    """
    comp, clean, corrupted, axes, values, names, source = _prepare_sweep(
        model, clean_tokens, corrupted_tokens, component, by_position, layers, positions, heads, clean_cache)
    result = patch_sweep(model, corrupted, source, metric, comp, by_position, layers, positions, heads,
                         patches_per_batch=patches_per_batch, memory_limit_mb=memory_limit_mb, shortcuts=shortcuts)
    if return_labels:
        return result, make_labels(model, axes, values, clean)
    return result


# --------------------------------------------------------------------------------------------
# Attribution patching: the first-order estimate, same layout
# --------------------------------------------------------------------------------------------

def attribution_patch(model, clean_tokens, corrupted_tokens, metric: MetricFn,
                      component: str = "attn_head_out", by_position: bool = True, *,
                      layers=None, positions=None, heads=None, clean_cache=None,
                      return_labels: bool = False):
    """Attribution patching: the linear estimate of :func:`activation_patch` from two forward
    passes (clean, corrupted) and one backward pass (of ``metric`` on the corrupted run).

    Each cell is ``metric(corrupted) + sum((clean - corrupted) * d metric / d activation)`` over
    the patched slice, so it estimates the *value* exact patching returns (with a normalised
    metric the corrupted value is 0 and this is the estimated effect). Same arguments and
    layout as :func:`activation_patch`; ``metric`` must be differentiable.
    """
    comp, clean, corrupted, axes, values, names, source = _prepare_sweep(
        model, clean_tokens, corrupted_tokens, component, by_position, layers, positions, heads, clean_cache)

    _check_eval(model)
    activations, gradients, baseline = _activations_and_gradients(model, corrupted, metric, names)
    per_layer = []
    for name in names:
        activation, gradient = activations[name], gradients[name]
        delta = (source[name].to(activation.dtype) - activation) * gradient     # [batch, *act_axes]
        per_layer.append(_to_sweep_layout(comp, axes, delta, "sum"))
    estimate = torch.stack(per_layer).detach().cpu().float() + baseline
    for dim, (axis, vals) in enumerate(zip(axes, values)):
        if axis != "layer":
            estimate = estimate.index_select(dim, torch.tensor(vals))
    if return_labels:
        return estimate, make_labels(model, axes, values, clean)
    return estimate


def _activations_and_gradients(model, tokens: Tensor, metric: MetricFn, names: Sequence[str]
                               ) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """One forward and one backward pass: the activations at ``names`` and d metric / d activation.

    A zero "probe" is added to each activation and differentiated. Added in place, it reaches
    every consumer of the hooked tensor: on a TransformerBridge ``hook_resid_mid`` is
    ``ln2.hook_in``, and a returned tensor would reach only the LayerNorm, not the residual add
    (TransformerLens' ``cache_activation_and_gradient`` misses that path; it also returns no
    gradient for ``hook_z`` when only ``hook_z`` points are requested). The attention pattern
    is a softmax output that its backward needs, so there the probe is added out of place.
    """
    activations: dict[str, Tensor] = {}
    probes: dict[str, Tensor] = {}

    def make(name):
        def hook(act, hook):
            activations[name] = act.detach().clone()
            probe = torch.zeros_like(act, requires_grad=True)
            probes[name] = probe
            if name.endswith("hook_pattern"):
                return act + probe
            act.add_(probe)
            return act
        return hook

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(name, make(name)) for name in names])
        value = metric(logits)
        if not isinstance(value, Tensor) or value.ndim != 0:
            _as_scalar(value, "on the corrupted logits")  # raises for non-scalars
            raise ValueError("attribution_patch needs a metric that returns a differentiable 0-d tensor, "
                             f"not {type(value).__name__}")
        if not value.requires_grad:
            raise ValueError("the metric's value does not depend on the logits through autograd "
                             "(was it computed with .item(), numpy or under torch.no_grad()?)")
        missing = [n for n in names if n not in probes]
        if missing:
            raise RuntimeError(f"hooks {missing} did not fire on the corrupted run")
        grads = torch.autograd.grad(value, [probes[n] for n in names], allow_unused=True)
    gradients = {n: torch.zeros_like(activations[n]) if g is None else g.detach()
                 for n, g in zip(names, grads)}
    return activations, gradients, float(value.detach())


def patching_agreement(exact: Tensor, approx: Tensor, baseline: float = 0.0, k: int = 10) -> dict[str, float]:
    """How well ``approx`` (attribution patching) reproduces ``exact`` (activation patching).

    Returns ``pearson`` and ``spearman`` correlation over cells, ``sign_agreement`` (fraction of
    cells whose effect ``value - baseline`` has the same sign; use the corrupted metric as
    ``baseline``, 0 for a normalised metric) and ``top_k_overlap`` (fraction of the ``k``
    largest-|effect| cells of ``exact`` that are also among those of ``approx``).
    """
    from scipy import stats

    exact = torch.as_tensor(exact, dtype=torch.float64).flatten()
    approx = torch.as_tensor(approx, dtype=torch.float64).flatten()
    if exact.shape != approx.shape:
        raise ValueError(f"exact has {exact.numel()} cells but approx has {approx.numel()}: compare sweeps of one layout")
    if exact.numel() < 2:
        raise ValueError("need at least 2 cells to measure agreement")
    if not isinstance(k, int) or not 1 <= k <= exact.numel():
        raise ValueError(f"k={k!r}: expected an integer in [1, {exact.numel()}]")
    e, a = (exact - baseline).numpy(), (approx - baseline).numpy()
    constant = np.ptp(e) == 0 or np.ptp(a) == 0
    top_e = set(np.argsort(-np.abs(e), kind="stable")[:k].tolist())
    top_a = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    return {
        "pearson": math.nan if constant else float(stats.pearsonr(e, a)[0]),
        "spearman": math.nan if constant else float(stats.spearmanr(e, a)[0]),
        "sign_agreement": float(np.mean(np.sign(e) == np.sign(a))),
        "top_k_overlap": len(top_e & top_a) / k,
        "k": k,
        "n_cells": int(exact.numel()),
    }


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def _per_prompt(value, batch: int, name: str, expected: str, device) -> Tensor:
    """``value`` (one integer, or one per prompt) as ``[batch]`` integers."""
    out = torch.as_tensor(value, device=device)
    if out.ndim == 0:
        out = out.expand(batch)
    if out.ndim != 1 or out.shape[0] != batch or out.is_floating_point():
        raise ValueError(f"{name} has shape {tuple(out.shape)}: expected {expected.format(batch=batch)}")
    return out.long()


def _token_ids(tokens, batch: int, name: str, device) -> Tensor:
    return _per_prompt(tokens, batch, name, "a token id or [batch={batch}] token ids", device)


def _positions(position, batch: int, n_pos: int, device) -> Tensor:
    pos = _per_prompt(position, batch, "position", "an int or [batch={batch}] ints", device)
    if (pos < -n_pos).any() or (pos >= n_pos).any():
        raise ValueError(f"position={position!r} out of range for {n_pos} positions")
    return pos % n_pos


def logit_diff(logits: Float[Tensor, "batch pos d_vocab"], answer, wrong, position=-1) -> Float[Tensor, "batch"]:
    """``logit[answer] - logit[wrong]`` at ``position`` (an int, or one per prompt), per prompt."""
    if logits.ndim != 3:
        raise ValueError(f"logits has shape {tuple(logits.shape)}: expected [batch, pos, d_vocab]")
    batch, n_pos, _ = logits.shape
    rows = torch.arange(batch, device=logits.device)
    pos = _positions(position, batch, n_pos, logits.device)
    final = logits[rows, pos]
    return (final[rows, _token_ids(answer, batch, "answer", logits.device)]
            - final[rows, _token_ids(wrong, batch, "wrong", logits.device)])


def normalized_logit_diff_metric(clean_logits, corrupted_logits, answer, wrong, position=-1):
    """The patching metric people plot: mean logit difference rescaled so the corrupted run is 0
    and the clean run is 1. Differentiable (for :func:`attribution_patch`).

    The returned function carries ``clean_logit_diff``, ``corrupted_logit_diff`` and
    ``reads_positions`` (so the patching engine only unembeds those positions).
    """
    clean_value = float(logit_diff(clean_logits, answer, wrong, position).mean())
    corrupted_value = float(logit_diff(corrupted_logits, answer, wrong, position).mean())
    if not math.isfinite(clean_value - corrupted_value) or abs(clean_value - corrupted_value) < 1e-6:
        raise ValueError(f"clean and corrupted logit differences are equal ({clean_value:.6g} vs "
                         f"{corrupted_value:.6g}): the normalised metric is undefined; pick prompts the "
                         "corruption actually changes")
    scale = clean_value - corrupted_value

    def metric(logits):
        return (logit_diff(logits, answer, wrong, position).mean() - corrupted_value) / scale

    batch, n_pos = clean_logits.shape[:2]
    device = clean_logits.device
    pos = _positions(position, batch, n_pos, device)
    reads = sorted(set(pos.tolist()))
    slot = torch.tensor([reads.index(p) for p in pos.tolist()], device=device)
    rows = torch.arange(batch, device=device)
    answer_ids = _token_ids(answer, batch, "answer", device)
    wrong_ids = _token_ids(wrong, batch, "wrong", device)

    def batched(read_logits):  # [copy, batch, len(reads), vocab] -> [copy]
        final = read_logits[:, rows, slot]                       # [copy, batch, vocab]
        diff = final[:, rows, answer_ids] - final[:, rows, wrong_ids]
        return (diff.mean(-1) - corrupted_value) / scale

    metric.clean_logit_diff = clean_value
    metric.corrupted_logit_diff = corrupted_value
    metric.reads_positions = tuple(reads)
    metric.batched = batched
    return metric


# --------------------------------------------------------------------------------------------
# Ablation: zero / mean / resample, defined once, as a sweep (same engine), of chosen units
# together (hooks), or of each unit alone at its events (unit_ablation_effects)
# --------------------------------------------------------------------------------------------

ABLATIONS = ("zero", "mean", "resample")


def _check_method(method: str) -> str:
    if method not in ABLATIONS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(ABLATIONS)}")
    return method


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    return int(batch_size)


@torch.no_grad()
def mean_activations(model, tokens, hook_names: Iterable[str], batch_size: int = 16
                     ) -> dict[str, Float[Tensor, "1 pos ..."]]:
    """The per-position mean over the sequences of ``tokens`` of each hook's activation:
    ``{hook name: [1, pos, ...]}`` in the activation's dtype, what ``method="mean"`` ablation
    writes. Streamed ``batch_size`` sequences at a time (sums in float64), one pass for all
    hooks, so callers that ablate many units compute it once and pass it on as ``means=``."""
    tokens = check_tokens(model, tokens, "reference_tokens")
    batch_size = _check_batch_size(batch_size)
    names = list(dict.fromkeys(hook_names))
    sums: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}

    def add(name):
        def hook(act, hook):
            total = act.detach().double().sum(0, keepdim=True)
            sums[name] = total if name not in sums else sums[name] + total
            dtypes[name] = act.dtype
        return hook

    for begin in range(0, tokens.shape[0], batch_size):
        model.run_with_hooks(tokens[begin:begin + batch_size], fwd_hooks=[(n, add(n)) for n in names])
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"hook_names {missing} did not fire: expected hook names of this model "
                         "(e.g. blocks.0.attn.hook_z, blocks.0.mlp.hook_post)")
    return {n: (sums[n] / tokens.shape[0]).to(dtypes[n]) for n in names}


def resample_index(batch: int, n_reference: int | None = None, seed: int = 0) -> Tensor:
    """Which prompt each of ``batch`` prompts takes its activation from under resample ablation:
    without reference prompts (``n_reference=None``) a random cyclic shift of the batch itself,
    so no prompt keeps its own; with them, independent uniform draws from the ``n_reference``."""
    generator = torch.Generator().manual_seed(seed)
    if n_reference is None:
        if batch < 2:
            raise ValueError("resample ablation needs reference_tokens, or a batch of at least 2 prompts")
        shift = int(torch.randint(1, batch, (1,), generator=generator))
        return (torch.arange(batch) + shift) % batch
    return torch.randint(0, n_reference, (batch,), generator=generator)


def ablation_replacement(method: str, act: Tensor, *, mean: Tensor | None = None,
                         resampled: Tensor | None = None) -> Tensor:
    """The one ablation definition: what replaces ``act`` (``[batch, pos, ...]``) under ``method``.

    ``zero``: zeros. ``mean``: ``mean`` (``[1, pos, ...]``, :func:`mean_activations`), the mean
    over reference prompts kept separately for every position, since position shapes what a
    unit does (position 0 / BOS is the clearest case) and a mean over positions would write a
    value the unit never takes there. ``resample``: ``resampled``, the activation of other
    prompts at the same positions (:func:`resample_index`).
    """
    _check_method(method)
    if method == "zero":
        return torch.zeros_like(act)
    value, what = (mean, "mean") if method == "mean" else (resampled, "resampled")
    if value is None:
        raise ValueError(f"method={method!r} needs the {what} activations")
    expected = (1 if method == "mean" else act.shape[0], *act.shape[1:])
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{what} activations have shape {tuple(value.shape)}; the ablated prompts give "
                         f"{tuple(act.shape)}: reference prompts must have the same length")
    return value.to(device=act.device, dtype=act.dtype).expand_as(act)


def _ablation_sources(model, tokens: Tensor, names: Sequence[str], method: str, reference_tokens=None,
                      seed: int = 0, means: Mapping[str, Tensor] | None = None, batch_size: int = 16
                      ) -> dict[str, dict[str, Tensor]]:
    """Per hook, the keyword arguments of :func:`ablation_replacement` for ablating ``tokens``."""
    _check_method(method)
    if method == "zero":
        return {n: {} for n in names}
    reference = tokens if reference_tokens is None else check_tokens(model, reference_tokens, "reference_tokens")
    if method == "mean":
        given = dict(means or {})
        todo = [n for n in names if n not in given]
        if todo:
            given.update(mean_activations(model, reference, todo, batch_size))
        return {n: {"mean": given[n]} for n in names}
    index = resample_index(tokens.shape[0], None if reference_tokens is None else reference.shape[0], seed)
    resampled = _source_cache(model, reference[index.to(reference.device)], names)
    return {n: {"resampled": resampled[n]} for n in names}


def _ablation_values(model, tokens: Tensor, names: Sequence[str], method: str, reference_tokens=None,
                     seed: int = 0, means: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Replacement activations per hook, shaped like the activations of ``tokens`` (a sweep's source)."""
    sources = _ablation_sources(model, tokens, names, method, reference_tokens, seed, means)
    own = _source_cache(model, tokens, names)
    return {n: ablation_replacement(method, own[n], **sources[n]).clone() for n in names}


def ablation_sweep(model, tokens, metric: MetricFn, component: str = "attn_head_out", method: str = "zero",
                   by_position: bool = False, *, layers=None, positions=None, heads=None,
                   reference_tokens=None, seed: int = 0, return_labels: bool = False,
                   patches_per_batch: int | None = None, memory_limit_mb: float = 1024.0,
                   shortcuts: bool = True):
    """``metric`` with each head / layer (/ position) of ``component`` ablated in turn.

    ``method``: ``zero`` (replace by 0), ``mean`` (by the mean over ``reference_tokens``, default
    ``tokens``, per position), ``resample`` (by the activation on another prompt: from
    ``reference_tokens`` drawn with ``seed``, or a shuffled copy of the batch); see
    :func:`ablation_replacement`. Same layout and engine as :func:`activation_patch`.
    """
    comp = get_component(component)
    tokens = check_tokens(model, tokens, "tokens")
    axes, values = _sweep_axes(model, comp, by_position, tokens.shape[1], layers, positions, heads)
    names = [comp.hook_name(layer) for layer in values[0]]
    source = _ablation_values(model, tokens, names, method, reference_tokens, seed)
    result = patch_sweep(model, tokens, source, metric, comp, by_position, layers, positions, heads,
                         patches_per_batch=patches_per_batch, memory_limit_mb=memory_limit_mb, shortcuts=shortcuts)
    if return_labels:
        return result, make_labels(model, axes, values, tokens)
    return result


def unit_source(unit: Unit) -> tuple[Component, str, int]:
    """Where a :mod:`interp_lib.units` unit lives: its source, hook name and index on the unit axis
    (``Head(1, 3)`` -> attn_head_out, ``blocks.1.attn.hook_z``, 3)."""
    comp = COMPONENTS[UNIT_COMPONENTS[unit.kind]]
    return comp, comp.hook_name(unit[0]), int(unit[1])


def _as_unit(model, value, argument: str) -> Unit:
    """A Head / Neuron (a label's letter decides; a plain pair is a head), checked against the model."""
    label = value.strip().upper().rstrip("0123456789") if isinstance(value, str) else ""
    kind = "neuron" if isinstance(value, Neuron) or label.endswith("N") else "head"
    return parse_units([value], *unit_count(model, kind), kind, name=argument)[0]


def _ablation_hook(method: str, index: list[int] | None, source: Mapping[str, Tensor]):
    """A forward hook writing :func:`ablation_replacement` into units ``index`` of the unit axis
    (``None``: the whole activation), in place (see :func:`_patch_hook` for why)."""
    def hook(act, hook):
        replacement = ablation_replacement(method, act, **source)
        if index is None:
            act.copy_(replacement)
        else:
            act[:, :, index] = replacement[:, :, index]
        return act
    return hook


def ablation_hooks(model, tokens, heads=(), attn_layers=(), mlp_layers=(), method: str = "zero",
                   reference_tokens=None, seed: int = 0, *, neurons=(), means: Mapping[str, Tensor] | None = None
                   ) -> list:
    """Forward hooks that ablate the given heads (``"L1H3"``, ``Head(1, 3)`` or ``(1, 3)``), MLP
    neurons (``"L0N17"`` / ``Neuron(0, 17)``) and whole attention / MLP layers jointly, at every
    position; for ``model.hooks(fwd_hooks=...)`` / ``run_with_hooks`` on ``tokens``.

    ``means``: per-position means from :func:`mean_activations` (``method="mean"``), so callers
    ablating many units in turn average the reference prompts once; hooks without one are averaged
    over ``reference_tokens`` (default ``tokens``)."""
    tokens = check_tokens(model, tokens, "tokens")
    units = [_as_unit(model, h, "heads") for h in heads] + \
        [_as_unit(model, n if isinstance(n, (str, Neuron)) else Neuron(*n), "neurons") for n in neurons]
    for argument, layer_list in (("attn_layers", attn_layers), ("mlp_layers", mlp_layers)):
        bad = [l for l in layer_list if not 0 <= int(l) < model.cfg.n_layers]
        if bad:
            raise ValueError(f"{argument}={list(layer_list)!r}: layers must be in [0, {model.cfg.n_layers - 1}]")
    targets: dict[str, list | None] = {}
    for unit in units:
        _, name, index = unit_source(unit)
        targets.setdefault(name, []).append(index)
    for layer in attn_layers:
        targets[COMPONENTS["attn_out"].hook_name(int(layer))] = None
    for layer in mlp_layers:
        targets[COMPONENTS["mlp_out"].hook_name(int(layer))] = None
    sources = _ablation_sources(model, tokens, list(targets), method, reference_tokens, seed, means)
    return [(name, _ablation_hook(method, index, sources[name])) for name, index in targets.items()]


@torch.no_grad()
def run_with_ablation(model, tokens, heads=(), attn_layers=(), mlp_layers=(), method: str = "zero",
                      reference_tokens=None, seed: int = 0, *, neurons=(), means: Mapping[str, Tensor] | None = None
                      ) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of ``tokens`` with the given heads / neurons / layers ablated together (see :func:`ablation_hooks`)."""
    tokens = check_tokens(model, tokens, "tokens")
    hooks = ablation_hooks(model, tokens, heads, attn_layers, mlp_layers, method, reference_tokens, seed,
                           neurons=neurons, means=means)
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


EVENT_KINDS = ("top", "random")


def _event_positions(model, events_by_unit, n_windows: int, n_pos: int) -> dict[Unit, dict[str, list]]:
    """``{unit: {"top": [(window, position), ...], "random": [...]}}``, checked; positions that
    predict nothing (the last) are left out."""
    if not isinstance(events_by_unit, Mapping):
        raise ValueError(f"events_by_unit={type(events_by_unit).__name__}: expected a mapping unit -> events")
    out = {}
    for key, events in events_by_unit.items():
        unit = _as_unit(model, key, "events_by_unit")
        bad = [e for e in events if not (0 <= int(e.window) < n_windows and 0 <= int(e.position) < n_pos)]
        if bad:
            raise ValueError(f"events_by_unit[{unit.label}] has an event at window {bad[0].window}, position "
                             f"{bad[0].position}: windows has {n_windows} rows of {n_pos} positions")
        out[unit] = {kind: [(int(e.window), int(e.position)) for e in events
                            if e.kind == kind and e.position < n_pos - 1] for kind in EVENT_KINDS}
    return out


def _window_losses(model, windows: Tensor, rows: list[int], batch_size: int, hook=None) -> Tensor:
    """Next-token loss ``[len(rows), pos-1]`` of ``windows[rows]``, ``batch_size`` at a time;
    ``hook(chunk rows)`` gives the forward hooks of a chunk."""
    out = []
    for chunk in torch.tensor(rows, dtype=torch.long).split(batch_size):
        tokens = windows[chunk.to(windows.device)]
        hooks = hook(chunk) if hook else []
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks) if hooks else model(tokens)
        out.append(next_token_loss(logits, tokens))
    return torch.cat(out)


@torch.no_grad()
def unit_ablation_effects(model, windows, events_by_unit: Mapping, *, method: str = "zero", batch_size: int = 16,
                          progress: bool = True, reference_tokens=None, seed: int = 0
                          ) -> dict[Unit, dict[str, float]]:
    """Ablate each unit alone and measure the change in next-token loss at its events.

    ``events_by_unit`` maps a unit (``Head`` / ``Neuron`` / label; a plain ``(layer, head)`` pair is
    a head) to events with ``.window`` (a row of ``windows``), ``.position`` and ``.kind``. For
    each unit, the windows its events live in are run with the unit ablated (:func:`ablation_hooks`'
    definition: ``zero``, ``mean`` per position over ``reference_tokens``, default ``windows``,
    averaged once per hook; ``resample`` from the windows cyclically shifted with ``seed``, or
    from ``reference_tokens``); the effect is the mean of ablated - clean loss of predicting the
    token after each event position, over its ``top`` events and, as a baseline, its ``random``
    ones. Events at the last position (which predicts nothing) are left out.

    Returns ``{unit: {"top": mean delta, "random": mean delta, "n_top": ..., "n_random": ...}}``
    (a mean only where there are events of that kind).
    """
    from tqdm.auto import tqdm

    _check_method(method)
    _check_eval(model)
    batch_size = _check_batch_size(batch_size)
    windows = check_tokens(model, windows, "windows", min_pos=2)
    n_windows, n_pos = windows.shape
    units = _event_positions(model, events_by_unit, n_windows, n_pos)
    names = sorted({unit_source(unit)[1] for unit in units})
    reference = windows if reference_tokens is None else check_tokens(model, reference_tokens, "reference_tokens")
    means = mean_activations(model, reference, names, batch_size) if method == "mean" and names else {}
    donors = resample_index(n_windows, None if reference_tokens is None else len(reference), seed) \
        if method == "resample" else None

    def hook(name: str, index: int):
        def hooks(chunk: Tensor) -> list:
            source = {"mean": means[name]} if method == "mean" else {}
            if method == "resample":
                source = {"resampled": _source_cache(model, reference[donors[chunk].to(reference.device)], [name])[name]}
            return [(name, _ablation_hook(method, [index], source))]
        return hooks

    clean = _window_losses(model, windows, list(range(n_windows)), batch_size)       # [window, pos-1]
    results: dict[Unit, dict[str, float]] = {}
    for unit, groups in tqdm(list(units.items()), desc="unit ablation", disable=not progress, file=sys.stdout):
        needed = sorted({w for pairs in groups.values() for w, _ in pairs})
        entry: dict[str, float] = {}
        if needed:
            row = {w: i for i, w in enumerate(needed)}
            ablated = _window_losses(model, windows, needed, batch_size, hook(*unit_source(unit)[1:]))
            for kind, pairs in groups.items():
                if pairs:
                    entry[kind] = float(np.mean([float(ablated[row[w], p] - clean[w, p]) for w, p in pairs]))
                entry[f"n_{kind}"] = len(pairs)
        results[unit] = entry
    return results
