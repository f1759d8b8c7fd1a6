"""Circuits: edge attribution patching (EAP, EAP-IG), true edge patching, faithfulness and its
uncertainty.

**The graph** (:func:`edge_graph`). Upstream nodes write into the residual stream: the
embedding (``blocks.0.hook_resid_pre``: token + position embedding), every attention head's
output (``blocks.L.attn.hook_result[:, :, h]``, ``z_h @ W_O[h]``) and every MLP
(``blocks.L.hook_mlp_out``). Downstream inputs read it: the query, key and value input of every
head (``blocks.L.attn.hook_q_input`` / ``hook_k_input`` / ``hook_v_input``, one residual copy
per head, before ``ln1``), every MLP's input (``blocks.L.hook_mlp_in``, before ``ln2``) and the
logits (``ln_final.hook_in``). An edge joins every upstream node to every downstream input
after it: each downstream input is the sum of its upstream outputs plus constant biases.

These hook points exist on TransformerLens' ``TransformerBridge`` behind three switches,
``use_split_qkv_input``, ``use_attn_result`` and ``use_hook_mlp_in``; :func:`edge_hooks` turns
them on for the duration of a computation and :func:`check_edge_hooks` proves, once per model,
that they still mean what this module assumes (shapes; every downstream input equals its
upstream outputs' sum up to an input-independent constant; an edit of one head's query input
changes only that head's queries; an edit of an MLP input does not leak into the residual
stream). It raises with the installed versions if the bridge changes. Where the bridge does
not split: under grouped-query attention (Llama-family models, SmolLM2) keys and values are
computed once per *key / value head*, so the K / V inputs are per key / value head
(``L3KV1.k``) and shared by that group's query heads; gated-query architectures (Qwen3.5 /
Qwen3-Next) and multi-head latent attention (DeepSeek V2/V3) do not offer the split at all,
and models whose attention and MLP read the same residual (``parallel_attn_mlp``) are refused.

**Scores** (:func:`edge_scores`), one number per edge, the estimated change of the metric
when that edge alone carries its corrupted value (Syed et al. 2023's sign convention:
a negative score marks an edge the task needs):

* ``"eap"`` (Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit
  Discovery"): ``(a_corrupted(u) - a_clean(u)) . dM/d input(v)`` at the clean run, summed over
  positions: two forward passes and one backward pass.
* ``"eap-ig-inputs"`` (Hanna et al. 2024, "Have Faith in Faithfulness"): the same with the
  gradient averaged over ``steps`` runs whose *input embeddings* lie on the straight line from
  the corrupted to the clean embeddings (midpoint rule, ``alpha = (k + 1/2) / steps``). The
  scores of the embedding's outgoing edges then sum to ``M(corrupted) - M(clean)`` up to the
  integration error (integrated gradients' completeness).
* ``"eap-ig-activations"``: the gradient averaged along the line between the corrupted and
  clean *outputs of the edge's upstream layer* (the embedding, one attention layer, one MLP),
  the rest of the model recomputed on top: ``steps`` passes per upstream layer. The outgoing
  scores of one layer sum to the effect of patching that layer's output alone.

The metric is per prompt (``metric(logits, rows) -> [len(rows)]``, e.g.
:func:`logit_diff_metric`); circuit-level numbers are its mean over prompts. Scores are kept
per prompt (``EdgeScores.per_prompt``), so resampling prompts costs no further passes. Edges
are scored in chunks (one layer's downstream inputs at a time, ``batch_size`` prompts per pass).

**True edge patching** (:func:`run_circuit`): the clean run in which every downstream input is
recomputed as the sum of its upstream outputs, circuit edges carrying the outputs of the
current (patched) run and all other edges the corrupted run's: ``input(v) += sum over edges
u -> v outside the circuit of (a_corrupted(u) - a_current(u))``. The full circuit is the clean
run, the empty circuit the corrupted run. This is edge patching, not node patching: a head can
receive its clean value on one edge and its corrupted value on another.

**Evaluation** (Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark"):
faithfulness ``f(C) = (M(C) - M(empty)) / (M(full) - M(empty))`` (0 = the corrupted model,
1 = the clean model); :func:`faithfulness_curve` evaluates it at circuit sizes given as
fractions of all edges (MIB's ``0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100%`` by
default); ``CPR`` (circuit performance ratio, higher is better) is the area under ``f`` over
those fractions, circuits ranked by signed score (edges that help the task first); ``CMD``
(circuit-model distance, lower is better) is the area under ``|1 - f|``, circuits ranked by
``|score|``; both by the trapezoid rule (:func:`mib_scores`).

**Uncertainty** (:func:`bootstrap_circuit`): prompts are resampled with replacement; each
resample reselects the circuit from its own mean scores and measures that circuit's
faithfulness on its own prompts. Each edge's inclusion frequency, a percentile interval on
faithfulness, and the *stable core* (edges in at least 90% of resamples) come back together.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .patching import _check_eval, _check_pair, logit_diff, n_kv_heads
from .units import Head
from .versions import summary

__all__ = ["EdgeGraph", "EdgeScores", "CircuitBootstrap", "EdgeHookError", "METHODS", "MIB_FRACTIONS",
           "edge_graph", "edge_hooks", "check_edge_hooks", "logit_diff_metric", "edge_scores", "select_edges",
           "run_circuit", "circuit_metric", "exact_edge_effects", "faithfulness", "faithfulness_curve",
           "curve_area", "mib_scores", "smallest_faithful_circuit", "bootstrap_circuit", "circuit_heads", "edge_frame", "auroc"]

CircuitMetric = Callable[[Tensor, Tensor], Tensor]
METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations")
#: The circuit sizes (fractions of all edges) at which MIB evaluates faithfulness.
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_FLAGS = {"use_split_qkv_input": "set_use_split_qkv_input", "use_attn_result": "set_use_attn_result",
          "use_hook_mlp_in": "set_use_hook_mlp_in"}


class EdgeHookError(RuntimeError):
    """The bridge's split-input hooks no longer behave as edge patching assumes."""


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EdgeGraph:
    """Nodes and edges of a model, in forward order.

    Upstream index: ``0`` the embedding, then per layer ``L`` its heads
    (``1 + L * (n_heads + 1) + h``) and its MLP (``... + n_heads``). Downstream index: per layer
    the query inputs of its heads, the key inputs and value inputs of its key / value heads, its
    MLP input, and last the logits. ``valid[u, v]`` says whether ``u`` writes before ``v`` reads.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    has_mlp: bool
    upstream: tuple[str, ...] = field(init=False)
    downstream: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        up, down = ["embed"], []
        kv = "H" if self.n_kv_heads == self.n_heads else "KV"
        for layer in range(self.n_layers):
            up += [f"L{layer}H{h}" for h in range(self.n_heads)] + ([f"MLP{layer}"] if self.has_mlp else [])
            down += [f"L{layer}H{h}.q" for h in range(self.n_heads)]
            down += [f"L{layer}{kv}{g}.{s}" for s in "kv" for g in range(self.n_kv_heads)]
            down += [f"MLP{layer}"] if self.has_mlp else []
        object.__setattr__(self, "upstream", tuple(up))
        object.__setattr__(self, "downstream", tuple(down + ["logits"]))

    # layout -------------------------------------------------------------------------------
    @property
    def n_upstream(self) -> int:
        return len(self.upstream)

    @property
    def n_downstream(self) -> int:
        return len(self.downstream)

    def attn_start(self, layer: int) -> int:
        """Upstream nodes written before layer ``layer``'s attention reads (also its first head)."""
        return 1 + layer * (self.n_heads + int(self.has_mlp))

    def mlp_start(self, layer: int) -> int:
        """Upstream nodes written before layer ``layer``'s MLP reads (also the MLP's index)."""
        return self.attn_start(layer) + self.n_heads

    def down_start(self, layer: int) -> int:
        return layer * (self.n_heads + 2 * self.n_kv_heads + int(self.has_mlp))

    def upstream_groups(self) -> list[tuple[str, int, int]]:
        """``(hook name, first upstream index, count)`` in forward order."""
        groups = [("blocks.0.hook_resid_pre", 0, 1)]
        for layer in range(self.n_layers):
            groups.append((f"blocks.{layer}.attn.hook_result", self.attn_start(layer), self.n_heads))
            if self.has_mlp:
                groups.append((f"blocks.{layer}.hook_mlp_out", self.mlp_start(layer), 1))
        return groups

    def downstream_groups(self) -> list[tuple[str, int, int, int]]:
        """``(hook name, first downstream index, count, upstream nodes before it)``."""
        groups = []
        for layer in range(self.n_layers):
            start, prefix = self.down_start(layer), self.attn_start(layer)
            groups += [(f"blocks.{layer}.attn.hook_q_input", start, self.n_heads, prefix),
                       (f"blocks.{layer}.attn.hook_k_input", start + self.n_heads, self.n_kv_heads, prefix),
                       (f"blocks.{layer}.attn.hook_v_input", start + self.n_heads + self.n_kv_heads,
                        self.n_kv_heads, prefix)]
            if self.has_mlp:
                groups.append((f"blocks.{layer}.hook_mlp_in", start + self.n_heads + 2 * self.n_kv_heads, 1,
                               self.mlp_start(layer)))
        groups.append(("ln_final.hook_in", self.n_downstream - 1, 1, self.n_upstream))
        return groups

    @property
    def valid(self) -> Tensor:
        """``[n_upstream, n_downstream]`` bool: the edges that exist."""
        mask = torch.zeros(self.n_upstream, self.n_downstream, dtype=torch.bool)
        for _, start, count, prefix in self.downstream_groups():
            mask[:prefix, start:start + count] = True
        return mask

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def edge_label(self, u: int, v: int) -> str:
        return f"{self.upstream[u]}->{self.downstream[v]}"

    def downstream_nodes(self) -> list[list[int]]:
        """For each downstream input, the upstream indices of the node(s) it feeds (empty for the
        logits): a query input feeds its head, a key / value input every query head of its group."""
        group = self.n_heads // self.n_kv_heads
        nodes: list[list[int]] = []
        for layer in range(self.n_layers):
            first = self.attn_start(layer)
            nodes += [[first + h] for h in range(self.n_heads)]
            nodes += [[first + g * group + i for i in range(group)] for _ in "kv" for g in range(self.n_kv_heads)]
            nodes += [[self.mlp_start(layer)]] if self.has_mlp else []
        return nodes + [[]]

    def node_heads(self, upstream_indices) -> list[Head]:
        heads = []
        for u in upstream_indices:
            name = self.upstream[int(u)]
            if name.startswith("L"):
                layer, head = name[1:].split("H")
                heads.append(Head(int(layer), int(head)))
        return heads


def edge_graph(model) -> EdgeGraph:
    """The :class:`EdgeGraph` of ``model`` (a TransformerBridge)."""
    cfg = model.cfg
    if getattr(cfg, "parallel_attn_mlp", False):
        raise ValueError("model has parallel attention and MLP blocks (both read the same residual): edge "
                         "patching here assumes sequential blocks")
    n_heads, n_kv = int(cfg.n_heads), int(n_kv_heads(model))
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_key_value_heads={n_kv}")
    return EdgeGraph(int(cfg.n_layers), n_heads, n_kv, not bool(getattr(cfg, "attn_only", False)))


# --------------------------------------------------------------------------------------------
# Hooks: switch on, check once per model
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def edge_hooks(model, check: bool = True):
    """Turn on the bridge's split-input hooks (``use_split_qkv_input``, ``use_attn_result``,
    ``use_hook_mlp_in``) inside the block, restoring the previous settings after it; with
    ``check`` run :func:`check_edge_hooks` first (once per model)."""
    for flag, setter in _FLAGS.items():
        if not hasattr(model, setter):
            raise EdgeHookError(f"{type(model).__name__} has no {setter}(): edge patching needs a TransformerBridge "
                                f"with split-input hooks ({summary()})")
    before = {flag: bool(getattr(model.cfg, flag, False)) for flag in _FLAGS}
    try:
        for flag, setter in _FLAGS.items():
            getattr(model, setter)(True)
        if check:
            check_edge_hooks(model)
        yield model
    finally:
        for flag, setter in _FLAGS.items():
            getattr(model, setter)(before[flag])


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fail(what: str) -> EdgeHookError:
    return EdgeHookError(f"edge hooks: {what}; the TransformerBridge's split-input hooks changed meaning "
                         f"({summary()}): edge scores and edge patching would be wrong")


def check_edge_hooks(model, force: bool = False) -> None:
    """Prove on two random batches that the split-input hooks mean what this module assumes, or
    raise :class:`EdgeHookError`. Checked: every hook fires with its expected shape; with the
    switches on the logits equal the plain forward's; every downstream input equals the sum of
    its upstream outputs up to a constant that does not depend on the input; adding a vector to
    one head's query input changes that head's queries only; a change of an MLP input reaches
    the MLP but not the residual stream. Runs once per model unless ``force``."""
    if not force and _CHECKED.get(model):
        return
    graph = edge_graph(model)
    generator = torch.Generator().manual_seed(0)
    device = model.cfg.device
    n_pos = min(6, int(model.cfg.n_ctx))
    batches = [torch.randint(1, int(model.cfg.d_vocab), (2, n_pos), generator=generator).to(device) for _ in range(2)]
    d_model = int(model.cfg.d_model)
    names_up = [g[0] for g in graph.upstream_groups()]
    names_down = [g[0] for g in graph.downstream_groups()]
    extra = ["blocks.0.attn.hook_q", f"blocks.{graph.n_layers - 1}.hook_resid_mid",
             f"blocks.{graph.n_layers - 1}.hook_resid_post", f"blocks.{graph.n_layers - 1}.hook_mlp_out"]
    if not graph.has_mlp:
        extra = extra[:1]
    missing = [n for n in names_up + names_down + extra if n not in model.hook_dict]
    if missing:
        raise _fail(f"hook points {missing[:4]} do not exist")
    flags = {flag: bool(getattr(model.cfg, flag, False)) for flag in _FLAGS}
    try:
        _verify(model, graph, batches, names_up, names_down, extra, n_pos, d_model)
    finally:
        for flag, setter in _FLAGS.items():
            getattr(model, setter)(flags[flag])
    _CHECKED[model] = True


def _verify(model, graph, batches, names_up, names_down, extra, n_pos, d_model) -> None:
    with torch.no_grad():
        for flag, setter in _FLAGS.items():
            getattr(model, setter)(False)
        plain = model(batches[0])
        for flag, setter in _FLAGS.items():
            getattr(model, setter)(True)
        runs = []
        for tokens in batches:
            store: dict[str, Tensor] = {}
            logits = model.run_with_hooks(tokens, fwd_hooks=[(n, _saver(store, n)) for n in names_up + names_down + extra])
            runs.append((logits, store))
    scale = float(plain.abs().max()) + 1e-6
    if not torch.allclose(runs[0][0], plain, atol=1e-4 * scale, rtol=0):
        raise _fail(f"logits with the split hooks differ from the plain forward by "
                    f"{float((runs[0][0] - plain).abs().max()):.3g}")
    residues = []
    for logits, store in runs:
        missing = [n for n in names_up + names_down if n not in store]
        if missing:
            raise _fail(f"hooks {missing[:4]} did not fire")
        outputs = _stack_upstream(graph, store, d_model)
        residue = []
        for name, start, count, prefix in graph.downstream_groups():
            act = store[name]
            expected = (2, n_pos, count, d_model) if act.ndim == 4 else (2, n_pos, d_model)
            if tuple(act.shape) != expected:
                raise _fail(f"{name} has shape {tuple(act.shape)}, expected {expected}")
            act = act if act.ndim == 4 else act.unsqueeze(2)
            residue.append(act - outputs[:, :, :prefix].sum(2, keepdim=True))
        residues.append(residue)
    for (name, *_), first, second in zip(graph.downstream_groups(), *residues):
        # float32 sums of up to hundreds of outputs: rounding grows with the input's magnitude
        size = max(float(runs[0][1][name].abs().max()), float(runs[1][1][name].abs().max())) + 1.0
        if not torch.allclose(first, second, atol=2e-5 * size, rtol=0):
            raise _fail(f"{name} is not the sum of its upstream outputs plus a constant (differs by "
                        f"{float((first - second).abs().max()):.3g} between inputs)")
    _check_interventions(model, graph, batches[0], runs[0][1])


def _saver(store: dict, name: str):
    def hook(act, hook):
        store[name] = act.detach().clone()
    return hook


def _stack_upstream(graph: EdgeGraph, store: dict, d_model: int) -> Tensor:
    parts = []
    for name, _, count in graph.upstream_groups():
        act = store[name]
        if tuple(act.shape[2:]) != ((count, d_model) if act.ndim == 4 else (d_model,)) or (act.ndim != 4 and count != 1):
            raise _fail(f"{name} has shape {tuple(act.shape)}, expected [batch, pos, {count}, {d_model}]")
        parts.append(act if act.ndim == 4 else act.unsqueeze(2))
    return torch.cat(parts, dim=2)


def _check_interventions(model, graph: EdgeGraph, tokens: Tensor, clean: dict) -> None:
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(int(model.cfg.d_model), generator=generator).to(model.cfg.device)
    scale = float(clean["blocks.0.hook_resid_pre"].norm(dim=-1).mean())
    delta = delta / delta.norm() * scale

    def add_to_head0(act, hook):
        act = act.clone()
        act[:, :, 0] += delta
        return act

    store: dict[str, Tensor] = {}
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_q_input", add_to_head0),
                                                ("blocks.0.attn.hook_q", _saver(store, "q"))])
    changed = (store["q"] - clean["blocks.0.attn.hook_q"]).flatten(3).abs().amax(dim=(0, 1, 3))
    if not changed[0] > 0 or (changed[1:] > 1e-5 * (1 + float(clean["blocks.0.attn.hook_q"].abs().max()))).any():
        raise _fail(f"an edit of head 0's query input changed the queries of heads {changed.gt(0).nonzero().flatten().tolist()}")
    if not graph.has_mlp:
        return
    last = graph.n_layers - 1
    store = {}
    names = [f"blocks.{last}.hook_resid_mid", f"blocks.{last}.hook_resid_post", f"blocks.{last}.hook_mlp_out"]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{last}.hook_mlp_in", lambda act, hook: act + delta)]
                             + [(n, _saver(store, n)) for n in names])
    residual = store[names[1]] - store[names[2]]
    if not torch.allclose(residual, clean[names[0]], atol=1e-4 * (1 + scale), rtol=0):
        raise _fail("an edit of an MLP input leaked into the residual stream")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def logit_diff_metric(answer, wrong, position=-1) -> CircuitMetric:
    """Per-prompt ``logit[answer] - logit[wrong]`` at ``position``: ``metric(logits, rows)``
    reads prompt ``rows[i]``'s answer for row ``i`` of ``logits`` (rows repeat when several
    circuits run side by side)."""
    answer, wrong = torch.as_tensor(answer).long().flatten(), torch.as_tensor(wrong).long().flatten()
    position = torch.as_tensor(position).long().flatten()
    if answer.shape != wrong.shape:
        raise ValueError(f"answer has {answer.numel()} entries but wrong has {wrong.numel()}: one of each per prompt")

    def metric(logits: Tensor, rows: Tensor) -> Tensor:
        rows = rows.cpu()
        pick = (lambda t: t if t.numel() == 1 else t[rows])
        return logit_diff(logits, pick(answer), pick(wrong), pick(position) if position.numel() > 1 else int(position))

    metric.n_prompts = int(answer.numel())
    return metric


def _metric_values(metric: CircuitMetric, logits: Tensor, rows: Tensor) -> Tensor:
    value = metric(logits, rows)
    if not isinstance(value, Tensor) or value.shape != (len(rows),):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"metric returned {shape}: expected one value per prompt, shape ({len(rows)},) "
                         "(see logit_diff_metric)")
    return value


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------

@dataclass
class EdgeScores:
    """Edge scores kept per prompt. ``per_prompt[i, u, v]``: prompt ``i``'s estimated change of
    the metric when edge ``u -> v`` alone is corrupted (0 where the edge does not exist)."""

    graph: EdgeGraph
    per_prompt: Float[Tensor, "prompt upstream downstream"]
    method: str
    steps: int | None
    clean_metric: Float[Tensor, "prompt"]
    corrupted_metric: Float[Tensor, "prompt"]

    @property
    def scores(self) -> Float[Tensor, "upstream downstream"]:
        return self.per_prompt.mean(0)

    def resample(self, rows) -> "EdgeScores":
        rows = torch.as_tensor(rows).long()
        return EdgeScores(self.graph, self.per_prompt[rows], self.method, self.steps,
                          self.clean_metric[rows], self.corrupted_metric[rows])

    def frame(self, top: int | None = None) -> pd.DataFrame:
        """One row per edge, largest ``|score|`` first: ``edge``, ``upstream``, ``downstream``,
        ``input`` (q / k / v / mlp / logits), ``score``."""
        return edge_frame(self.graph, self.scores, top=top)


def edge_frame(graph: EdgeGraph, scores: Tensor, mask: Tensor | None = None, top: int | None = None) -> pd.DataFrame:
    """Edges (all valid ones, or those in ``mask``) with their scores, largest ``|score|`` first."""
    keep = graph.valid if mask is None else (mask & graph.valid)
    u, v = keep.nonzero(as_tuple=True)
    values = scores[u, v].double().numpy()
    frame = pd.DataFrame({
        "edge": [graph.edge_label(a, b) for a, b in zip(u.tolist(), v.tolist())],
        "upstream": [graph.upstream[a] for a in u.tolist()],
        "downstream": [graph.downstream[b] for b in v.tolist()],
        "input": [_input_kind(graph.downstream[b]) for b in v.tolist()],
        "score": values,
    })
    order = np.argsort(-np.abs(values), kind="stable")
    frame = frame.iloc[order].reset_index(drop=True)
    return frame if top is None else frame.head(top)


def _input_kind(name: str) -> str:
    return name.rsplit(".", 1)[1] if "." in name else ("logits" if name == "logits" else "mlp")


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: expected a positive integer")
    return steps


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    return batch_size


def _upstream_outputs(model, graph: EdgeGraph, tokens: Tensor, extra: Sequence[str] = ()
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    """``[batch, pos, n_upstream, d_model]`` outputs of every upstream node, and the ``extra`` hooks."""
    store: dict[str, Tensor] = {}
    names = [g[0] for g in graph.upstream_groups()] + list(extra)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, _saver(store, n)) for n in names])
    return _stack_upstream(graph, store, int(model.cfg.d_model)), {n: store[n] for n in extra}


def _accumulate(model, graph: EdgeGraph, tokens: Tensor, rows: Tensor, metric: CircuitMetric, diff: Tensor,
                out: Tensor, weight: float, upstream: tuple[int, int] | None = None, extra_hooks=()) -> Tensor:
    """One forward and backward pass of the clean run (with ``extra_hooks``): adds ``weight *
    diff[u] . dM/d input(v)`` (summed over positions) to ``out[prompt, u, v]`` for the upstream
    range ``upstream`` (default all), one downstream group at a time. Returns the metric.

    The gradient probe is *added out of place*: an in-place probe at ``hook_mlp_in`` (ln2's
    input, the residual itself) would also differentiate the residual add, not the MLP input
    alone (which is why the patching engine's in-place probe is not used here)."""
    probes: dict[str, Tensor] = {}

    def probe(name):
        def hook(act, hook):
            p = torch.zeros_like(act, requires_grad=True)
            probes[name] = p
            return act + p
        return hook

    groups = graph.downstream_groups()
    lo, hi = upstream or (0, graph.n_upstream)
    groups = [g for g in groups if g[3] > lo]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=list(extra_hooks) + [(g[0], probe(g[0])) for g in groups])
        values = _metric_values(metric, logits, rows)
        grads = torch.autograd.grad(values.sum(), [probes[g[0]] for g in groups], allow_unused=True)
    b, p, _, d = diff.shape
    flat = diff[:, :, lo:hi].permute(0, 2, 1, 3).reshape(b, hi - lo, p * d)   # once: [prompt, upstream, pos*d]
    for (name, start, count, prefix), grad in zip(groups, grads):
        if grad is None:
            continue
        grad = grad if grad.ndim == 4 else grad.unsqueeze(2)                   # [prompt, pos, n, d]
        top = min(prefix, hi)
        part = torch.bmm(flat[:, :top - lo].to(grad.dtype), grad.permute(0, 1, 3, 2).reshape(b, p * d, count))
        out[:, lo:top, start:start + count] += weight * part.detach().float().cpu()
    return values.detach().float().cpu()


def edge_scores(model, clean_tokens, corrupted_tokens, metric: CircuitMetric, method: str = "eap", *,
                steps: int = 5, batch_size: int = 16, progress: bool = True) -> EdgeScores:
    """Score every edge of :func:`edge_graph` by EAP or EAP-IG (module docstring).

    Args:
        model: a TransformerBridge in eval mode.
        clean_tokens, corrupted_tokens: ``[prompt, pos]`` ids of one shape.
        metric: per prompt, ``metric(logits, rows) -> [len(rows)]`` (:func:`logit_diff_metric`).
        method: ``"eap"``, ``"eap-ig-inputs"`` or ``"eap-ig-activations"``.
        steps: integration steps of the EAP-IG methods (midpoint rule).
        batch_size: prompts per forward pass.

    Returns:
        :class:`EdgeScores` with per-prompt scores and the clean / corrupted metric per prompt.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    steps = _check_steps(steps)
    batch_size = _check_batch_size(batch_size)
    _check_eval(model)
    clean, corrupted = _check_pair(model, clean_tokens, corrupted_tokens)
    graph = edge_graph(model)
    n = clean.shape[0]
    out = torch.zeros(n, graph.n_upstream, graph.n_downstream)
    clean_values, corrupted_values = torch.zeros(n), torch.zeros(n)
    chunks = list(range(0, n, batch_size))
    bar = _progress(len(chunks), f"edge scores ({method})", progress)
    with edge_hooks(model):
        for first in chunks:
            rows = torch.arange(first, min(first + batch_size, n))
            c, x = clean[rows.to(clean.device)], corrupted[rows.to(clean.device)]
            extra = [] if method != "eap-ig-activations" else \
                [f"blocks.{layer}.hook_{kind}_out" for layer in range(graph.n_layers)
                 for kind in (("attn", "mlp") if graph.has_mlp else ("attn",))]
            clean_out, clean_extra = _upstream_outputs(model, graph, c, extra)
            corrupted_out, corrupted_extra = _upstream_outputs(model, graph, x, extra)
            diff = corrupted_out - clean_out
            block = out[rows]
            with torch.no_grad():
                corrupted_values[rows] = _metric_values(metric, model(x), rows).float().cpu()
            if method == "eap":
                clean_values[rows] = _accumulate(model, graph, c, rows, metric, diff, block, 1.0)
            elif method == "eap-ig-inputs":
                for k in range(steps):
                    alpha = (k + 0.5) / steps
                    point = corrupted_out[:, :, 0] + alpha * (clean_out[:, :, 0] - corrupted_out[:, :, 0])
                    hook = ("blocks.0.hook_resid_pre", _replace(point))
                    _accumulate(model, graph, c, rows, metric, diff, block, 1.0 / steps, extra_hooks=[hook])
                with torch.no_grad():
                    clean_values[rows] = _metric_values(metric, model(c), rows).float().cpu()
            else:
                layers = [("blocks.0.hook_resid_pre", 0, 1, corrupted_out[:, :, 0], clean_out[:, :, 0])]
                for layer in range(graph.n_layers):
                    name = f"blocks.{layer}.hook_attn_out"
                    layers.append((name, graph.attn_start(layer), graph.n_heads, corrupted_extra[name], clean_extra[name]))
                    if graph.has_mlp:
                        name = f"blocks.{layer}.hook_mlp_out"
                        layers.append((name, graph.mlp_start(layer), 1, corrupted_extra[name], clean_extra[name]))
                for name, start, count, low, high in layers:
                    for k in range(steps):
                        alpha = (k + 0.5) / steps
                        hook = (name, _replace(low + alpha * (high - low)))
                        _accumulate(model, graph, c, rows, metric, diff, block, 1.0 / steps,
                                    upstream=(start, start + count), extra_hooks=[hook])
                with torch.no_grad():
                    clean_values[rows] = _metric_values(metric, model(c), rows).float().cpu()
            out[rows] = block
            bar.update(1)
    bar.close()
    out[:, ~graph.valid] = 0.0
    return EdgeScores(graph, out, method, None if method == "eap" else steps, clean_values, corrupted_values)


def _replace(value: Tensor):
    def hook(act, hook):
        return value.to(act.dtype).expand_as(act).clone()
    return hook


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled or total <= 1, leave=False)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------

def _rank_key(scores: Tensor, absolute: bool) -> Tensor:
    # Scores estimate the change when an edge is corrupted: the edges a task needs are negative.
    return scores.abs() if absolute else -scores


def select_edges(scores: EdgeScores | Tensor, graph: EdgeGraph | None = None, *, n: int | None = None,
                 threshold: float | None = None, rule: str = "top", absolute: bool = True) -> Tensor:
    """A circuit, as a ``[n_upstream, n_downstream]`` bool mask.

    ``rule="top"``: the ``n`` best edges, or every edge whose key is at least ``threshold``.
    ``rule="greedy"`` (Hanna et al. 2024): grow from the logits, each time adding the best edge
    whose downstream input belongs to a node already in the circuit, until ``n`` edges (or no
    candidate reaches ``threshold``); the circuit is connected to the logits by construction.
    The key is ``|score|`` (``absolute=True``) or ``-score`` (edges whose corruption lowers the
    metric most first).
    """
    if isinstance(scores, EdgeScores):
        graph, scores = scores.graph, scores.scores
    if graph is None:
        raise ValueError("graph= is required when scores is a tensor")
    if (n is None) == (threshold is None):
        raise ValueError("give exactly one of n= (number of edges) and threshold= (minimum key)")
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= graph.n_edges):
        raise ValueError(f"n={n!r}: expected an integer in [0, {graph.n_edges}] (the graph's edges)")
    if rule not in ("top", "greedy"):
        raise ValueError(f"rule={rule!r}: expected 'top' or 'greedy'")
    valid = graph.valid
    key = _rank_key(scores.float(), absolute).masked_fill(~valid, -math.inf)
    if rule == "top":
        if threshold is not None:
            return (key >= threshold) & valid
        mask = torch.zeros_like(valid)
        if n:
            flat = torch.argsort(key.flatten(), descending=True, stable=True)[:int(n)]
            mask.view(-1)[flat] = True
        return mask
    return _greedy(graph, key, n, threshold)


def _greedy(graph: EdgeGraph, key: Tensor, n: int | None, threshold: float | None) -> Tensor:
    mask = torch.zeros_like(graph.valid)
    in_node = torch.zeros(graph.n_upstream, dtype=torch.bool)
    feeds = graph.downstream_nodes()
    active = torch.zeros(graph.n_downstream, dtype=torch.bool)
    active[-1] = True
    limit = graph.n_edges if n is None else int(n)
    while int(mask.sum()) < limit:
        candidates = key.masked_fill(~active[None, :] | mask, -math.inf)
        best = int(torch.argmax(candidates))
        value = float(candidates.view(-1)[best])
        if value == -math.inf or (threshold is not None and value < threshold):
            break
        u, v = divmod(best, graph.n_downstream)
        mask[u, v] = True
        if not in_node[u]:
            in_node[u] = True
            for d, nodes in enumerate(feeds):
                if u in nodes:
                    active[d] = True
    return mask


# --------------------------------------------------------------------------------------------
# True edge patching
# --------------------------------------------------------------------------------------------

def run_circuit(model, clean_tokens, corrupted_tokens, metric: CircuitMetric, circuits: Tensor, *,
                batch_size: int = 16, memory_limit_mb: float = 1024.0, progress: bool = True
                ) -> Float[Tensor, "circuit prompt"]:
    """The metric per prompt with each circuit kept and every other edge patched from the
    corrupted run (true edge patching, module docstring).

    Args:
        circuits: ``[n_upstream, n_downstream]`` or ``[circuit, n_upstream, n_downstream]`` bool
            masks (:func:`select_edges`); several run side by side along the batch.
        batch_size: prompts per pass; circuits are stacked while the buffers stay under
            ``memory_limit_mb``.

    Returns:
        ``[circuit, prompt]`` metric values (``[prompt]`` for a single mask).
    """
    _check_eval(model)
    clean, corrupted = _check_pair(model, clean_tokens, corrupted_tokens)
    batch_size = _check_batch_size(batch_size)
    graph = edge_graph(model)
    masks = torch.as_tensor(circuits)
    single = masks.ndim == 2
    masks = masks[None] if single else masks
    if masks.ndim != 3 or tuple(masks.shape[1:]) != (graph.n_upstream, graph.n_downstream) or masks.dtype != torch.bool:
        raise ValueError(f"circuits has shape {tuple(masks.shape)} and dtype {masks.dtype}: expected bool masks "
                         f"[{graph.n_upstream}, {graph.n_downstream}] or [circuit, {graph.n_upstream}, "
                         f"{graph.n_downstream}] (see select_edges)")
    cut = ((~masks) & graph.valid).float()                           # 1 = the edge carries the corrupted value
    n, n_pos = clean.shape
    d_model = int(model.cfg.d_model)
    per_row = n_pos * graph.n_upstream * d_model * 4 * 3              # corrupted copy, difference, slack
    prompts = min(batch_size, n)
    per_pass = max(1, int(memory_limit_mb * 2 ** 20 // (per_row * prompts)))
    out = torch.zeros(masks.shape[0], n)
    chunks = [(first, c0) for first in range(0, n, prompts) for c0 in range(0, masks.shape[0], per_pass)]
    bar = _progress(len(chunks), "edge patching", progress)
    with edge_hooks(model):
        for first in range(0, n, prompts):
            rows = torch.arange(first, min(first + prompts, n))
            c, x = clean[rows.to(clean.device)], corrupted[rows.to(clean.device)]
            corrupted_out, _ = _upstream_outputs(model, graph, x)
            for c0 in range(0, masks.shape[0], per_pass):
                block = cut[c0:c0 + per_pass]
                out[c0:c0 + per_pass, rows] = _patched_run(model, graph, c, rows, corrupted_out, block, metric)
                bar.update(1)
    bar.close()
    return out[0] if single else out


def _patched_run(model, graph: EdgeGraph, tokens: Tensor, rows: Tensor, corrupted_out: Tensor, cut: Tensor,
                 metric: CircuitMetric) -> Tensor:
    n_circuits, (b, p, n_up, d) = cut.shape[0], corrupted_out.shape
    device = corrupted_out.device
    cut = cut.to(device=device, dtype=corrupted_out.dtype)
    # upstream-major, so that the nodes before a downstream input are one contiguous slice
    gap = torch.zeros(n_circuits, n_up, b * p * d, device=device, dtype=corrupted_out.dtype)
    corrupted_flat = corrupted_out.permute(2, 0, 1, 3).reshape(n_up, b * p * d)

    def record(start, count):
        def hook(act, hook):
            act = (act if act.ndim == 4 else act.unsqueeze(2)).view(n_circuits, b, p, count, d)
            gap[:, start:start + count] = corrupted_flat[None, start:start + count] - \
                act.permute(0, 3, 1, 2, 4).reshape(n_circuits, count, b * p * d)
        return hook

    def patch(start, count, prefix):
        weights = cut[:, :prefix, start:start + count].transpose(1, 2).contiguous()   # [circuit, n, prefix]
        if not bool(weights.any()):
            return None

        def hook(act, hook):
            delta = torch.bmm(weights, gap[:, :prefix]).view(n_circuits, count, b, p, d)
            delta = delta.permute(0, 2, 3, 1, 4).reshape(n_circuits * b, p, count, d)
            return act + (delta if act.ndim == 4 else delta[:, :, 0])
        return hook

    hooks = [(name, record(start, count)) for name, start, count in graph.upstream_groups()]
    for name, start, count, prefix in graph.downstream_groups():
        hook = patch(start, count, prefix)
        if hook is not None:
            hooks.append((name, hook))
    with torch.no_grad():
        logits = model.run_with_hooks(tokens.repeat(n_circuits, 1), fwd_hooks=hooks)
        values = _metric_values(metric, logits, rows.repeat(n_circuits))
    return values.view(n_circuits, b).float().cpu()


def circuit_metric(model, clean_tokens, corrupted_tokens, metric: CircuitMetric, circuit: Tensor, **kwargs) -> float:
    """The mean metric over prompts of one circuit under true edge patching."""
    return float(run_circuit(model, clean_tokens, corrupted_tokens, metric, circuit, **kwargs).mean())


def exact_edge_effects(model, clean_tokens, corrupted_tokens, metric: CircuitMetric, edges=None, *,
                       batch_size: int = 16, memory_limit_mb: float = 1024.0, progress: bool = True
                       ) -> Float[Tensor, "upstream downstream"]:
    """The measured counterpart of an edge score: mean metric with only edge ``u -> v``
    corrupted, minus the clean metric, for every edge in ``edges`` (a bool mask, default every
    edge); 0 elsewhere. One patched run per edge (side by side along the batch)."""
    graph = edge_graph(model)
    valid = graph.valid
    chosen = valid if edges is None else (torch.as_tensor(edges).bool() & valid)
    u, v = chosen.nonzero(as_tuple=True)
    masks = valid[None].repeat(len(u) + 1, 1, 1)
    masks[torch.arange(1, len(u) + 1), u, v] = False
    values = run_circuit(model, clean_tokens, corrupted_tokens, metric, masks, batch_size=batch_size,
                         memory_limit_mb=memory_limit_mb, progress=progress).mean(1)
    out = torch.zeros(graph.n_upstream, graph.n_downstream)
    out[u, v] = values[1:] - values[0]
    return out


# --------------------------------------------------------------------------------------------
# Faithfulness, MIB's CPR / CMD
# --------------------------------------------------------------------------------------------

def faithfulness(circuit_value, full_value, empty_value) -> float:
    """``(M(C) - M(empty)) / (M(full) - M(empty))``: 0 = corrupted model, 1 = clean model."""
    gap = float(full_value) - float(empty_value)
    if not math.isfinite(gap) or abs(gap) < 1e-9:
        raise ValueError(f"the clean and corrupted metrics are equal ({float(full_value):.6g}): faithfulness is "
                         "undefined; pick prompts the corruption changes")
    return (float(circuit_value) - float(empty_value)) / gap


def _sizes(graph: EdgeGraph, fractions) -> list[int]:
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0 <= f <= 1 for f in fractions) or fractions != sorted(fractions):
        raise ValueError(f"fractions={fractions!r}: expected increasing fractions of the edges in [0, 1]")
    return [max(1, round(f * graph.n_edges)) if f > 0 else 0 for f in fractions]


def faithfulness_curve(model, clean_tokens, corrupted_tokens, metric: CircuitMetric, scores: EdgeScores,
                       fractions=MIB_FRACTIONS, *, rule: str = "top", absolute: bool = True,
                       batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Faithfulness of the best circuit at each size (a fraction of all edges, MIB's by default):
    one row per size with ``fraction``, ``n_edges``, ``metric`` (mean over prompts) and
    ``faithfulness``; the empty and full circuits anchor it."""
    graph = scores.graph
    sizes = _sizes(graph, fractions)
    masks = [select_edges(scores, n=k, rule=rule, absolute=absolute) for k in sizes]
    full, empty = graph.valid, torch.zeros_like(graph.valid)
    values = run_circuit(model, clean_tokens, corrupted_tokens, metric, torch.stack(masks + [full, empty]),
                         batch_size=batch_size, progress=progress).mean(1)
    m_full, m_empty = float(values[-2]), float(values[-1])
    return pd.DataFrame({
        "fraction": [float(f) for f in fractions], "n_edges": [int(m.sum()) for m in masks],
        "metric": values[:-2].double().numpy(),
        "faithfulness": [faithfulness(v, m_full, m_empty) for v in values[:-2].tolist()],
    }).assign(clean_metric=m_full, corrupted_metric=m_empty)


def curve_area(curve: pd.DataFrame, column: str = "faithfulness", distance: bool = False) -> float:
    """Trapezoid area of ``column`` (``|1 - column|`` with ``distance``) over ``fraction``."""
    x = curve["fraction"].to_numpy(float)
    y = curve[column].to_numpy(float)
    y = np.abs(1.0 - y) if distance else y
    if len(x) < 2:
        raise ValueError("a curve needs at least two sizes to have an area")
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def mib_scores(model, clean_tokens, corrupted_tokens, metric: CircuitMetric, scores: EdgeScores,
               fractions=MIB_FRACTIONS, **kwargs) -> dict:
    """MIB's circuit metrics (Mueller et al. 2025).

    ``cpr`` (circuit performance ratio, higher is better): the area under faithfulness
    ``f(C_k)`` over circuit sizes ``k`` (fractions of the edges), ``C_k`` the top ``k`` edges by
    signed score (edges that help the task first). ``cmd`` (circuit-model distance, lower is
    better, 0 = indistinguishable from the model): the area under ``|1 - f(C_k)|``, ``C_k`` the
    top ``k`` edges by ``|score|``. Both by the trapezoid rule over ``fractions``. Returns the
    two numbers and the two curves."""
    signed = faithfulness_curve(model, clean_tokens, corrupted_tokens, metric, scores, fractions, absolute=False, **kwargs)
    absolute = faithfulness_curve(model, clean_tokens, corrupted_tokens, metric, scores, fractions, absolute=True, **kwargs)
    return {"cpr": curve_area(signed), "cmd": curve_area(absolute, distance=True),
            "cpr_curve": signed, "cmd_curve": absolute}


# --------------------------------------------------------------------------------------------
# Uncertainty
# --------------------------------------------------------------------------------------------

@dataclass
class CircuitBootstrap:
    """A circuit with its resampling uncertainty (:func:`bootstrap_circuit`)."""

    graph: EdgeGraph
    circuit: Tensor                      # [n_upstream, n_downstream] bool, from all prompts
    faithfulness: float                  # of ``circuit`` on all prompts
    samples: np.ndarray                  # faithfulness of each resample's circuit on its prompts
    interval: tuple[float, float]        # percentile interval of ``samples``
    inclusion: Tensor                    # [n_upstream, n_downstream] fraction of resamples with the edge
    stable_core: Tensor                  # inclusion >= stable
    core_faithfulness: float             # of the stable core on all prompts
    stable: float
    confidence: float

    @property
    def n_edges(self) -> int:
        return int(self.circuit.sum())

    @property
    def n_core(self) -> int:
        return int(self.stable_core.sum())

    def frame(self, scores: Tensor) -> pd.DataFrame:
        """The circuit's edges with score, inclusion frequency and stable-core membership."""
        frame = edge_frame(self.graph, scores, mask=self.circuit | self.stable_core)
        pairs = [(self.graph.upstream.index(a), self.graph.downstream.index(b))
                 for a, b in zip(frame["upstream"], frame["downstream"])]
        frame["inclusion"] = [float(self.inclusion[u, v]) for u, v in pairs]
        frame["in_circuit"] = [bool(self.circuit[u, v]) for u, v in pairs]
        frame["stable_core"] = [bool(self.stable_core[u, v]) for u, v in pairs]
        return frame


def bootstrap_circuit(model, clean_tokens, corrupted_tokens, metric: CircuitMetric, scores: EdgeScores, *,
                      n: int, rule: str = "top", absolute: bool = True, n_resamples: int = 50, seed: int = 0,
                      stable: float = 0.9, confidence: float = 0.95, batch_size: int = 16,
                      progress: bool = True) -> CircuitBootstrap:
    """Resample prompts with replacement ``n_resamples`` times; each resample selects its own
    ``n``-edge circuit from its prompts' mean scores and measures its faithfulness on those
    prompts (true edge patching). Returns the all-prompt circuit, its faithfulness, a
    ``confidence`` percentile interval over resamples, each edge's inclusion frequency and the
    stable core (edges in at least ``stable`` of the resamples) with its own faithfulness."""
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 2:
        raise ValueError(f"n_resamples={n_resamples!r}: expected an integer >= 2")
    if not 0 < stable <= 1 or not 0 < confidence < 1:
        raise ValueError(f"stable={stable!r} must be in (0, 1] and confidence={confidence!r} in (0, 1)")
    graph = scores.graph
    n_prompts = scores.per_prompt.shape[0]
    generator = torch.Generator().manual_seed(seed)
    resamples = [torch.randint(0, n_prompts, (n_prompts,), generator=generator) for _ in range(n_resamples)]
    circuit = select_edges(scores, n=n, rule=rule, absolute=absolute)
    masks = [select_edges(scores.resample(r), n=n, rule=rule, absolute=absolute) for r in resamples]
    inclusion = torch.stack(masks).float().mean(0)
    core = (inclusion >= stable - 1e-9) & graph.valid
    everything = torch.stack([circuit, core, graph.valid, torch.zeros_like(graph.valid)] + masks)
    values = run_circuit(model, clean_tokens, corrupted_tokens, metric, everything, batch_size=batch_size,
                         progress=progress)                                   # [4 + R, prompt]
    full, empty = values[2], values[3]
    point = faithfulness(values[0].mean(), full.mean(), empty.mean())
    core_value = faithfulness(values[1].mean(), full.mean(), empty.mean())
    samples = np.array([faithfulness(values[4 + i][r].mean(), full[r].mean(), empty[r].mean())
                        for i, r in enumerate(resamples)])
    tail = (1 - confidence) / 2 * 100
    interval = (float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail)))
    return CircuitBootstrap(graph, circuit, point, samples, interval, inclusion, core, core_value, stable, confidence)


# --------------------------------------------------------------------------------------------
# Reading circuits
# --------------------------------------------------------------------------------------------

def circuit_heads(graph: EdgeGraph, circuit: Tensor) -> list[Head]:
    """The heads with at least one edge in ``circuit`` (as upstream or as downstream node)."""
    u, v = circuit.nonzero(as_tuple=True)
    feeds = graph.downstream_nodes()
    nodes = set(u.tolist())
    for d in v.tolist():
        if len(feeds[d]) == 1 or graph.downstream[d].endswith(".q"):
            nodes.update(feeds[d])
        elif feeds[d]:  # a shared key / value input: its query heads that are otherwise in the circuit
            nodes.update(h for h in feeds[d] if h in set(u.tolist()))
    return sorted(set(graph.node_heads(sorted(nodes))))


def auroc(scores: Tensor, truth: Tensor, valid: Tensor | None = None) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely in the circuit) against the
    bool ``truth``, over ``valid`` entries; ties count one half (Mann-Whitney)."""
    valid = torch.ones_like(truth, dtype=torch.bool) if valid is None else valid
    s, t = scores[valid].double(), truth[valid].bool()
    pos, neg = s[t], s[~t]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auroc needs at least one positive and one negative")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def smallest_faithful_circuit(model, clean_tokens, corrupted_tokens, metric: CircuitMetric, scores: EdgeScores,
                              target: float = 0.8, *, n_sizes: int = 24, rule: str = "top", absolute: bool = True,
                              batch_size: int = 16, progress: bool = True) -> tuple[int, pd.DataFrame]:
    """The smallest circuit size, on a geometric grid of ``n_sizes`` sizes from 1 edge to all,
    whose circuit reaches faithfulness ``target``; with the curve over that grid. (MIB's ten
    fractions are too coarse to size a circuit on small graphs: toy-2l has 110 edges.)"""
    if isinstance(n_sizes, bool) or not isinstance(n_sizes, int) or n_sizes < 2:
        raise ValueError(f"n_sizes={n_sizes!r}: expected an integer >= 2")
    total = scores.graph.n_edges
    sizes = sorted({int(round(s)) for s in np.geomspace(1, total, n_sizes)})
    curve = faithfulness_curve(model, clean_tokens, corrupted_tokens, metric, scores, [s / total for s in sizes],
                               rule=rule, absolute=absolute, batch_size=batch_size, progress=progress)
    reaching = curve[curve["faithfulness"] >= target]
    return int((reaching if len(reaching) else curve)["n_edges"].iloc[0 if len(reaching) else -1]), curve
