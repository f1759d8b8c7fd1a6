"""Probing and input attribution: how is position encoded, and which inputs / states matter.

* :func:`probe` - generic per-token probes (linear = logistic / ridge regression, MLP) on
  residual-stream activations collected layer by layer in batches, evaluated on held-out
  *sequences* (never held-out tokens of a training sequence), with a control task.
* :func:`position_probe` - :func:`probe` with position labels (absolute, bucketed, regression).
* :func:`cross_domain_probe` - train on one text source, test on another.
* :func:`head_position_scores` - position / content / hybrid attention heads.
* :func:`head_ablation_importance` - which heads' ablation hurts a fixed position probe.
* :func:`integrated_gradients`, :func:`attention_rollout`, :func:`causal_trace`.

Residual *streams* are numbered ``0..n_layers``: stream ``s < n_layers`` is
``blocks.s.hook_resid_pre`` (stream 0 = token + position embeddings), stream ``n_layers`` is the
last block's ``hook_resid_post``. So stream ``s`` is "after ``s`` blocks".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .models import check_tokens
from .units import Head, unit_columns

PROBES = ("linear", "mlp")
TASKS = ("classification", "regression")
POSITION_TARGETS = ("absolute", "relative_bucket", "log_bucket", "regression")
CONTROLS = ("shuffle", "random_model", None)
IGNORE = -1  # label of tokens a probe skips (e.g. BOS)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def _check_streams(model, layers) -> list[int]:
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n + 1))
    if isinstance(layers, (int, np.integer)):
        layers = [layers]
    layers = list(layers)
    bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, (int, np.integer)) or not 0 <= l <= n]
    if bad or not layers:
        raise ValueError(f"layers={layers!r}: expected residual streams in [0, {n}] (0 = embeddings, "
                         f"s = after s blocks) or None for all")
    return [int(l) for l in layers]


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (float, int)) or isinstance(value, bool) or not 0 < value < 1:
        raise ValueError(f"{name}={value!r}: expected a number strictly between 0 and 1")


def stream_hook(model, stream: int) -> str:
    """Hook name of residual stream ``stream`` (see the module docstring)."""
    n = model.cfg.n_layers
    return f"blocks.{stream}.hook_resid_pre" if stream < n else f"blocks.{n - 1}.hook_resid_post"


def stream_label(model, stream: int) -> str:
    return "embed" if stream == 0 else f"L{stream - 1} out"


# --------------------------------------------------------------------------------------------
# Activations (streamed in batches: only the requested hooks are kept, as float32 numpy)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def collect_activations(model, tokens, layers=None, batch_size: int = 32,
                        fwd_hooks: Callable[[Tensor], list] | None = None) -> dict[int, np.ndarray]:
    """Residual-stream activations ``{stream: array [batch, pos, d_model]}``, run in batches.

    ``fwd_hooks(batch_tokens)`` may return extra forward hooks (e.g. ablations) for each batch.
    """
    tokens = check_tokens(model, tokens, min_pos=2)
    streams = _check_streams(model, layers)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    names = {stream_hook(model, s): s for s in streams}
    out: dict[int, list[np.ndarray]] = {s: [] for s in streams}
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size]
        store: dict[str, Tensor] = {}

        def save(name):
            def hook(act, hook):  # keyed by our name: hook.name may be an alias
                store[name] = act.detach().float().cpu()
                return act
            return hook

        hooks = list(fwd_hooks(batch) if fwd_hooks else []) + [(n, save(n)) for n in names]
        model.run_with_hooks(batch, fwd_hooks=hooks)
        for name, stream in names.items():
            out[stream].append(store[name].numpy())
    return {s: np.concatenate(parts) for s, parts in out.items()}


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------

class TorchMLPProbe:
    """One-hidden-layer MLP probe trained full-batch with Adam (sklearn-style ``fit`` /
    ``predict``); much faster than ``sklearn.neural_network`` on CPU for probe-sized data."""

    def __init__(self, task: str = "classification", hidden: int = 64, steps: int = 150, lr: float = 1e-2,
                 weight_decay: float = 1e-4, seed: int = 0):
        self.task, self.hidden, self.steps, self.lr, self.weight_decay, self.seed = (
            task, hidden, steps, lr, weight_decay, seed)

    def fit(self, x, y):
        torch.manual_seed(self.seed)  # deterministic init
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        self.mean_, self.std_ = x.mean(0), x.std(0) + 1e-6  # standardise, as the linear pipeline does
        x = (x - self.mean_) / self.std_
        if self.task == "classification":
            self.classes_, y_index = np.unique(y, return_inverse=True)
            target, n_out = torch.as_tensor(y_index), len(self.classes_)
            loss_fn = torch.nn.functional.cross_entropy
        else:
            self.y_mean_, self.y_std_ = float(np.mean(y)), float(np.std(y)) or 1.0
            target, n_out = torch.as_tensor((np.asarray(y) - self.y_mean_) / self.y_std_, dtype=torch.float32)[:, None], 1
            loss_fn = torch.nn.functional.mse_loss
        self.net_ = torch.nn.Sequential(torch.nn.Linear(x.shape[1], self.hidden), torch.nn.ReLU(),
                                        torch.nn.Linear(self.hidden, n_out))
        optimizer = torch.optim.Adam(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # probe-sized matmuls: thread overhead dominates (30x slower on 2 cores)
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    optimizer.zero_grad()
                    loss_fn(self.net_(x), target).backward()
                    optimizer.step()
        finally:
            torch.set_num_threads(threads)
        return self

    @torch.no_grad()
    def predict(self, x):
        out = self.net_((torch.as_tensor(np.asarray(x), dtype=torch.float32) - self.mean_) / self.std_)
        if self.task == "classification":
            return self.classes_[out.argmax(-1).numpy()]
        return out[:, 0].numpy() * self.y_std_ + self.y_mean_


def make_probe(probe: str = "linear", task: str = "classification", seed: int = 0, max_iter: int = 300):
    """A pipeline (standardise, then probe): scikit-learn logistic / ridge regression for
    ``"linear"``, a one-hidden-layer torch MLP (64 units, :class:`TorchMLPProbe`) for ``"mlp"``."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _check_choice("probe", probe, PROBES)
    _check_choice("task", task, TASKS)
    if probe == "mlp":
        return TorchMLPProbe(task, seed=seed)
    head = LogisticRegression(max_iter=max_iter, tol=1e-3) if task == "classification" else Ridge(alpha=1.0)
    return make_pipeline(StandardScaler(), head)


def split_sequences(n_sequences: int, test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train / test *sequence* indices: every token of a sequence lands on the same side."""
    _check_fraction("test_fraction", test_fraction)
    n_test = int(round(n_sequences * test_fraction))
    if n_test < 1 or n_test >= n_sequences:
        raise ValueError(f"test_fraction={test_fraction} of {n_sequences} sequences leaves an empty train or "
                         "test split: pass more sequences")
    order = np.random.default_rng(seed).permutation(n_sequences)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _is_norm(module) -> bool:
    """LayerNorm / RMSNorm modules, by type: torch's own and any class named ``*LayerNorm`` /
    ``*RMSNorm`` (Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``, ...); parameter names do not
    tell (GPT-2 says ``ln_1``, Llama ``input_layernorm`` and ``model.norm``)."""
    norm_types = tuple(t for t in (torch.nn.LayerNorm, getattr(torch.nn, "RMSNorm", None)) if t is not None)
    return isinstance(module, norm_types) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


@torch.no_grad()
def random_init_model(model, seed: int = 0, std: float = 0.02):
    """A copy of ``model`` with every weight re-drawn at GPT-2 initialisation (matrices
    N(0, ``std``), biases 0, LayerNorm / RMSNorm gains 1): the architecture without what
    training learned. A control for probes (Hewitt & Liang's "random model" baseline).

    Norm gains are found by the module that owns them (:func:`_is_norm`), so a Llama's
    ``input_layernorm.weight`` / ``model.norm.weight`` are 1 like GPT-2's ``ln_1.weight`` (zeroing
    them would make every logit 0)."""
    import copy

    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    gains = {id(module.weight) for module in clone.modules()
             if _is_norm(module) and isinstance(getattr(module, "weight", None), torch.nn.Parameter)}
    for _, param in clone.named_parameters():
        if id(param) in gains:
            param.fill_(1.0)
        elif param.ndim >= 2:
            param.copy_(torch.randn(param.shape, generator=generator).to(param) * std)
        else:
            param.zero_()
    return clone.eval()


def shuffle_within_sequence(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Control labels: each sequence's labels permuted among its own (non-ignored) tokens, so the
    label distribution is kept but the token -> label relation is destroyed."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    for row in out:
        keep = row != IGNORE
        row[keep] = rng.permutation(row[keep])
    return out


def _flat(acts: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, y = acts[rows], labels[rows]
    keep = y != IGNORE
    return a[keep], y[keep]


def _fit(probe: str, task: str, seed: int, x, y):
    """Fit a fresh probe with one BLAS thread: for probe-sized problems thread start-up and
    contention cost far more than they save (40x on a shared 2-core machine)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return make_probe(probe, task, seed).fit(x, y)


def _score(model_, x, y, task: str) -> dict[str, float]:
    predicted = model_.predict(x)
    if task == "classification":
        return {"accuracy": float((predicted == y).mean())}
    from sklearn.metrics import r2_score

    return {"r2": float(r2_score(y, predicted)), "mae": float(np.abs(predicted - y).mean()),
            "accuracy": float((np.rint(predicted) == y).mean())}


def _check_labels(labels, tokens: Tensor, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if labels.shape != tuple(tokens.shape):
        raise ValueError(f"{name} has shape {labels.shape}: expected one label per token, {tuple(tokens.shape)} "
                         f"(use {IGNORE} for tokens to skip)")
    return labels


def probe(model, tokens, labels, layers=None, probe: str = "linear", task: str = "classification",
          control: str | None = "shuffle", test_fraction: float = 0.25, seed: int = 0, batch_size: int = 32,
          test_tokens=None, test_labels=None) -> pd.DataFrame:
    """Train a probe per residual stream to read ``labels`` (one per token, ``-1`` = skip) and
    score it on held-out sequences.

    With ``test_tokens`` / ``test_labels`` the probe trains on all of ``tokens`` and is scored on
    the other set (cross-domain); otherwise sequences are split ``1 - test_fraction`` /
    ``test_fraction``. ``control="shuffle"`` trains and scores the same probe on labels shuffled
    within each sequence; ``control="random_model"`` trains it on the true labels but the
    activations of a re-initialised copy (:func:`random_init_model`; with learned positions its
    random position embeddings are still distinct, so this control is high in stream 0 and
    measures what training added). ``selectivity = accuracy - control_accuracy``
    (Hewitt & Liang, 2019).

    Returns a DataFrame, one row per stream: layer, stream, probe, accuracy, control_accuracy,
    selectivity, chance (majority class of the test labels), n_train, n_test, and for
    regression r2 and mae.
    """
    tokens = check_tokens(model, tokens, min_seqs=1 if test_tokens is not None else 2, min_pos=2)
    labels = _check_labels(labels, tokens)
    streams = _check_streams(model, layers)
    _check_choice("probe", probe, PROBES)
    _check_choice("task", task, TASKS)
    _check_choice("control", control, CONTROLS)
    if (test_tokens is None) != (test_labels is None):
        raise ValueError("test_tokens and test_labels: pass both (cross-domain) or neither")
    if test_tokens is None:
        train_rows, test_rows = split_sequences(len(tokens), test_fraction, seed)
        acts_train = acts_test = collect_activations(model, tokens, streams, batch_size)
        y_train = y_test = labels
    else:
        test_tokens = check_tokens(model, test_tokens, "test_tokens", min_pos=2)
        y_test = _check_labels(test_labels, test_tokens, "test_labels")
        train_rows, test_rows = np.arange(len(tokens)), np.arange(len(test_tokens))
        acts_train = collect_activations(model, tokens, streams, batch_size)
        acts_test = collect_activations(model, test_tokens, streams, batch_size)
        y_train = labels
    if (y_train[train_rows] != IGNORE).sum() == 0 or (y_test[test_rows] != IGNORE).sum() == 0:
        raise ValueError("labels: every token of the train or test split is ignored (-1)")
    shuffled_train = shuffle_within_sequence(y_train, seed) if control == "shuffle" else y_train
    shuffled_test = shuffle_within_sequence(y_test, seed + 1) if control == "shuffle" else y_test
    control_train, control_test = acts_train, acts_test
    if control == "random_model":  # same labels, activations of an untrained copy
        random_model = random_init_model(model, seed)
        control_train = collect_activations(random_model, tokens, streams, batch_size)
        control_test = control_train if test_tokens is None else collect_activations(
            random_model, test_tokens, streams, batch_size)
        del random_model
    rows = []
    for stream in streams:
        x_tr, t_tr = _flat(acts_train[stream], y_train, train_rows)
        x_te, t_te = _flat(acts_test[stream], y_test, test_rows)
        fitted = _fit(probe, task, seed, x_tr, t_tr)
        row = {"layer": stream, "stream": stream_label(model, stream), "probe": probe, **_score(fitted, x_te, t_te, task)}
        values, counts = np.unique(t_te, return_counts=True)
        row["chance"] = float(counts.max() / counts.sum())
        if control:
            xc_tr, c_tr = _flat(control_train[stream], shuffled_train, train_rows)
            xc_te, c_te = _flat(control_test[stream], shuffled_test, test_rows)
            control_scores = _score(_fit(probe, task, seed, xc_tr, c_tr), xc_te, c_te, task)
            row["control_accuracy"] = control_scores["accuracy"]
            if task == "regression":
                row["control_r2"] = control_scores["r2"]
            row["selectivity"] = row["accuracy"] - row["control_accuracy"]
        row.update(n_train=len(t_tr), n_test=len(t_te))
        rows.append(row)
    return pd.DataFrame(rows)


def position_labels(tokens_shape: Sequence[int], target: str = "absolute", n_buckets: int = 4,
                    skip_first: int = 1) -> np.ndarray:
    """Per-token position labels ``[batch, pos]``; the first ``skip_first`` positions (BOS,
    whose state is the same in every sequence) are ignored (-1).

    ``absolute``: the position index. ``relative_bucket``: which of ``n_buckets`` equal parts of
    the window the token is in. ``log_bucket``: ``floor(log2(position))``. ``regression``: the
    position index as a number (ridge / MLP regression; r2 and mae reported).
    """
    _check_choice("target", target, POSITION_TARGETS)
    batch, n_pos = (int(x) for x in tokens_shape)
    if not isinstance(n_buckets, int) or n_buckets < 2:
        raise ValueError(f"n_buckets={n_buckets!r}: expected an integer >= 2")
    positions = np.arange(n_pos)
    if target in ("absolute", "regression"):
        row = positions
    elif target == "relative_bucket":
        row = positions * n_buckets // n_pos
    else:
        row = np.floor(np.log2(np.maximum(positions, 1))).astype(int)
    labels = np.broadcast_to(row, (batch, n_pos)).copy()
    labels[:, :skip_first] = IGNORE
    return labels


def position_probe(model, tokens, layers=None, probe: str = "linear", target: str = "absolute",
                   control: str | None = "shuffle", test_fraction: float = 0.25, seed: int = 0,
                   batch_size: int = 32, n_buckets: int = 4, test_tokens=None) -> pd.DataFrame:
    """Per-stream probe for position (see :func:`probe` and :func:`position_labels`), scored on
    held-out sequences. ``test_tokens`` (other text, same length) makes it cross-domain."""
    _check_choice("target", target, POSITION_TARGETS)
    tokens = check_tokens(model, tokens, min_seqs=1 if test_tokens is not None else 2, min_pos=2)
    labels = position_labels(tokens.shape, target, n_buckets)
    test_labels = None
    if test_tokens is not None:
        test_tokens = check_tokens(model, test_tokens, "test_tokens", min_pos=2)
        test_labels = position_labels(test_tokens.shape, target, n_buckets)
    frame = probe_fn(model, tokens, labels, layers, probe, "regression" if target == "regression" else "classification",
                     control, test_fraction, seed, batch_size, test_tokens, test_labels)
    frame.insert(3, "target", target)
    return frame


probe_fn = probe  # `position_probe` has a `probe` argument that shadows the function


def cross_domain_probe(model, train_tokens, test_tokens, labels_fn: Callable | None = None, layers=None,
                       probe: str = "linear", seed: int = 0, **kwargs) -> pd.DataFrame:
    """In-domain (held-out sequences of the train source) against cross-domain accuracy.

    ``labels_fn(tokens) -> labels`` defines the property (default: absolute position). Returns one
    row per stream with ``in_domain``, ``cross_domain`` and ``gap``.
    """
    labels_fn = labels_fn or (lambda t: position_labels(t.shape))
    train_tokens = check_tokens(model, train_tokens, "train_tokens", min_seqs=2, min_pos=2)
    test_tokens = check_tokens(model, test_tokens, "test_tokens", min_pos=2)
    train_rows, held_rows = split_sequences(len(train_tokens), kwargs.pop("test_fraction", 0.25), seed)
    fit_tokens = train_tokens[torch.as_tensor(train_rows)]
    base = dict(layers=layers, probe=probe, control=None, seed=seed, **kwargs)
    inside = probe_fn(model, fit_tokens, labels_fn(fit_tokens), test_tokens=train_tokens[torch.as_tensor(held_rows)],
                      test_labels=labels_fn(train_tokens[torch.as_tensor(held_rows)]), **base)
    across = probe_fn(model, fit_tokens, labels_fn(fit_tokens), test_tokens=test_tokens,
                      test_labels=labels_fn(test_tokens), **base)
    out = inside[["layer", "stream", "probe"]].copy()
    out["in_domain"] = inside["accuracy"].to_numpy()
    out["cross_domain"] = across["accuracy"].to_numpy()
    out["gap"] = out["in_domain"] - out["cross_domain"]
    return out


# --------------------------------------------------------------------------------------------
# Position vs content heads
# --------------------------------------------------------------------------------------------

def counterfactual_tokens(tokens: Tensor, kind: str = "shuffle", vocab_size: int | None = None, seed: int = 0,
                          keep_first: int = 1) -> Tensor:
    """Same positions, different content: tokens permuted within each sequence (``shuffle``) or
    uniform random ids (``random``, ids >= 1); the first ``keep_first`` (BOS) stay."""
    _check_choice("kind", kind, ("shuffle", "random"))
    generator = torch.Generator().manual_seed(seed)
    out = tokens.clone().cpu()
    body = out[:, keep_first:]
    if kind == "shuffle":
        perm = torch.argsort(torch.rand(body.shape, generator=generator), dim=1)
        out[:, keep_first:] = torch.gather(body, 1, perm)
    else:
        if vocab_size is None:
            raise ValueError("vocab_size=None: random counterfactual tokens need the vocabulary size")
        out[:, keep_first:] = torch.randint(1, vocab_size, body.shape, generator=generator)
    return out.to(tokens.device)


@torch.no_grad()
def _patterns(model, tokens: Tensor, batch_size: int) -> Tensor:
    """Attention patterns ``[layer, batch, head, q, k]`` (float32, cpu)."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    parts = []
    for start in range(0, len(tokens), batch_size):
        _, cache = model.run_with_cache(tokens[start:start + batch_size], names_filter=lambda n: n in names)
        parts.append(torch.stack([cache[n].float().cpu() for n in names]))
    return torch.cat(parts, dim=1)


def head_position_scores(model, tokens, kind: str = "random", seed: int = 0, min_query: int = 4,
                         position_threshold: float = 0.8, content_threshold: float = 0.5,
                         batch_size: int = 32) -> pd.DataFrame:
    """Classify heads by how much their attention depends on position rather than content.

    For every query row, the total-variation distance between the head's attention on the
    natural text and on counterfactual content at the same positions (:func:`counterfactual_tokens`)
    is computed; ``position_score = 1 - mean TV`` over sequences and queries ``>= min_query``
    (early rows have too few keys to differ). Rule: ``position`` if the score is at least
    ``position_threshold`` (the pattern barely moves when the content changes: previous-token,
    fixed-offset or BOS heads), ``content`` if at most ``content_threshold``, else ``hybrid``.
    ``mean_offset`` is the attention-weighted query - key distance on natural text.

    One row per head: the unit columns (``unit``, ``layer``, ``index``, ``kind``), ``head`` /
    ``name`` (index and label again, the names ``il.plots.head_class_scatter`` reads), then
    ``position_score``, ``mean_offset``, ``bos_attention``, ``label``.
    """
    tokens = check_tokens(model, tokens, min_pos=2)
    _check_choice("kind", kind, ("shuffle", "random"))
    if not isinstance(min_query, int) or not 0 <= min_query < tokens.shape[1]:
        raise ValueError(f"min_query={min_query!r}: expected an integer in [0, {tokens.shape[1] - 1}]")
    if not 0 <= content_threshold < position_threshold <= 1:
        raise ValueError(f"content_threshold={content_threshold!r}, position_threshold={position_threshold!r}: "
                         "expected 0 <= content_threshold < position_threshold <= 1")
    natural = _patterns(model, tokens, batch_size)[..., min_query:, :]
    other = _patterns(model, counterfactual_tokens(tokens, kind, model.cfg.d_vocab, seed), batch_size)[..., min_query:, :]
    tv = 0.5 * (natural - other).abs().sum(-1)  # [layer, batch, head, q]
    score = 1 - tv.mean((1, 3))
    n_pos = tokens.shape[1]
    offset = (torch.arange(min_query, n_pos)[:, None] - torch.arange(n_pos)[None, :]).float()
    mean_offset = (natural * offset).sum(-1).mean((1, 3))
    bos = natural[..., 0].mean((1, 3))
    rows = []
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            s = float(score[layer, head])
            label = "position" if s >= position_threshold else "content" if s <= content_threshold else "hybrid"
            rows.append({**unit_columns(Head(layer, head)), "position_score": s,
                         "mean_offset": float(mean_offset[layer, head]), "bos_attention": float(bos[layer, head]),
                         "label": label})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Head ablation importance for a position probe
# --------------------------------------------------------------------------------------------

def head_ablation_importance(model, tokens, layer: int | None = None, probe: str = "linear",
                             method: str = "mean", test_fraction: float = 0.25, seed: int = 0,
                             batch_size: int = 32) -> pd.DataFrame:
    """Accuracy drop of a *fixed* absolute-position probe on stream ``layer`` (default: the last)
    when one head (in a block before that stream) is ablated on the held-out sequences.

    The probe is trained on clean activations of the train sequences; ablation (``zero``, or
    ``mean`` per position over all held-out sequences, via
    :func:`interp_lib.patching.ablation_hooks`) only changes the test activations, so
    ``drop = clean_accuracy - ablated_accuracy`` measures how much the probe relies on what the
    head writes. Columns: the unit columns (``unit``, ``layer``, ``index``, ``kind``), ``head`` /
    ``name`` (as in :func:`head_position_scores`), ``clean_accuracy``, ``ablated_accuracy``, ``drop``.
    """
    from .patching import ablation_hooks, mean_activations, unit_source

    tokens = check_tokens(model, tokens, min_seqs=2, min_pos=2)
    layer = model.cfg.n_layers if layer is None else layer
    (stream,) = _check_streams(model, [layer])
    if stream == 0:
        raise ValueError("layer=0: the embedding stream is before every head; expected a stream in "
                         f"[1, {model.cfg.n_layers}]")
    _check_choice("method", method, ("zero", "mean"))
    labels = position_labels(tokens.shape)
    train_rows, test_rows = split_sequences(len(tokens), test_fraction, seed)
    acts = collect_activations(model, tokens, [stream], batch_size)[stream]
    fitted = _fit(probe, "classification", seed, *_flat(acts, labels, train_rows))
    test_tokens = tokens[torch.as_tensor(test_rows)]
    test_labels = labels[test_rows]
    rows_all = np.arange(len(test_rows))
    clean = _score(fitted, *_flat(acts[test_rows], test_labels, rows_all), "classification")["accuracy"]
    # the means over all held-out sequences, once (not per batch, not per head)
    means = mean_activations(model, test_tokens, [unit_source(Head(l, 0))[1] for l in range(stream)], batch_size) \
        if method == "mean" else None
    rows = []
    for l in range(stream):
        for h in range(model.cfg.n_heads):
            hooks = lambda batch, l=l, h=h: ablation_hooks(model, batch, heads=[(l, h)], method=method,  # noqa: E731
                                                           means=means)
            ablated = collect_activations(model, test_tokens, [stream], batch_size, fwd_hooks=hooks)[stream]
            accuracy = _score(fitted, *_flat(ablated, test_labels, rows_all), "classification")["accuracy"]
            rows.append({**unit_columns(Head(l, h)), "clean_accuracy": clean,
                         "ablated_accuracy": accuracy, "drop": clean - accuracy})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Attribution: integrated gradients, attention rollout, causal tracing
# --------------------------------------------------------------------------------------------

def _one_sequence(model, tokens) -> Int[Tensor, "1 pos"]:
    tokens = check_tokens(model, tokens, min_pos=2)
    if tokens.shape[0] != 1:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}: expected one sequence, [pos] or [1, pos]")
    return tokens


def _position(position: int, n_pos: int, name: str = "position") -> int:
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not -n_pos <= position < n_pos:
        raise ValueError(f"{name}={position!r}: expected an integer in [{-n_pos}, {n_pos - 1}]")
    return int(position) % n_pos


def _target_id(model, logits: Tensor, target) -> int:
    if target is None:
        return int(logits.argmax())
    if isinstance(target, str):
        ids = model.to_tokens(target, prepend_bos=False)[0]
        if len(ids) != 1:
            raise ValueError(f"target={target!r} is {len(ids)} tokens: expected a single token")
        return int(ids[0])
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < model.cfg.d_vocab:
        raise ValueError(f"target={target!r}: expected a token id in [0, {model.cfg.d_vocab - 1}], a one-token "
                         "string, or None (the model's top prediction)")
    return int(target)


@dataclass
class IntegratedGradients:
    """Integrated gradients of one logit with respect to the token embeddings."""

    tokens: Tensor            # [pos]
    target: int               # token id whose logit is explained
    position: int             # position whose prediction is explained
    attributions: Tensor      # [pos] summed over d_model
    attributions_full: Tensor  # [pos, d_model]
    output: float             # logit at the input
    baseline_output: float    # logit at the baseline
    completeness_error: float  # |sum(attributions) - (output - baseline_output)|

    def frame(self, model) -> pd.DataFrame:
        return pd.DataFrame({"position": range(len(self.tokens)), "token": model.to_str_tokens(self.tokens),
                             "attribution": self.attributions.numpy()})


# Where the integration path starts: a normalisation layer (RMSNorm / LayerNorm) divides by
# sqrt(mean(x^2) + eps), so close to a zero baseline the output changes steeply over a tiny
# stretch of the path (on SmolLM2 the logit swings by several units for alpha below 1e-3).
# The path is cut finer there from the start.
IG_BREAKPOINTS = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0)


class IGConvergenceWarning(UserWarning):
    """Integrated gradients spent its step budget before completeness reached the tolerance."""


def integrated_gradients(model, tokens, target=None, position: int = -1, baseline: str | Tensor = "zero",
                         n_steps: int = 32, batch_size: int = 16, tolerance: float = 1e-3,
                         max_steps: int | None = None) -> IntegratedGradients:
    """Integrated gradients (Sundararajan et al., 2017) of the logit of ``target`` (default: the
    model's top prediction) at ``position``, over the token embeddings (``hook_embed``; position
    embeddings stay); ``baseline`` is ``"zero"`` (zero token embeddings), ``"zero_keep_bos"``
    (zero except a leading BOS, which keeps its embedding: models that park attention on the
    first token, such as Llama-family models, are far from their working regime when it is
    removed, and the path from there is rugged) or a tensor ``[pos, d_model]``.

    The path integral is computed adaptively and checked: the path is split into intervals
    (finer near the baseline, see ``IG_BREAKPOINTS``), each integrated by Gauss-Legendre
    quadrature; completeness holds interval by interval (the attributions of ``[a, b]`` must sum
    to ``f(b) - f(a)``, one forward pass each), and the interval that misses it most is halved
    until the summed interval errors are below ``tolerance x max(1, |output - baseline_output|)``
    or ``max_steps`` gradient evaluations (default ``8 x n_steps``) are spent, in which case an
    :class:`IGConvergenceWarning` says what was reached. ``n_steps`` is the initial number of
    nodes over the whole path (at least 2 per interval). ``completeness_error`` is the final
    ``|sum(attributions) - (output - baseline_output)|``.
    """
    tokens = _one_sequence(model, tokens)
    n_pos = tokens.shape[1]
    position = _position(position, n_pos)
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 2:
        raise ValueError(f"n_steps={n_steps!r}: expected an integer >= 2")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"tolerance={tolerance!r}: expected a positive number")
    max_steps = 8 * n_steps if max_steps is None else max_steps
    if not isinstance(max_steps, int) or max_steps < n_steps:
        raise ValueError(f"max_steps={max_steps!r}: expected an integer >= n_steps ({n_steps})")
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n == "hook_embed")
    embed = cache["hook_embed"][0].detach()
    target = _target_id(model, logits[0, position], target)
    if isinstance(baseline, str):
        _check_choice("baseline", baseline, ("zero", "zero_keep_bos"))
        base = torch.zeros_like(embed)
        bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
        if baseline == "zero_keep_bos" and bos is not None and int(tokens[0, 0]) == bos:
            base[0] = embed[0]
    else:
        base = torch.as_tensor(baseline, dtype=embed.dtype, device=embed.device)
        if base.shape != embed.shape:
            raise ValueError(f"baseline has shape {tuple(base.shape)}: expected {tuple(embed.shape)} ([pos, d_model])")
    delta = embed - base
    n_intervals = len(IG_BREAKPOINTS) - 1
    k = max(2, -(-n_steps // n_intervals))  # nodes per interval
    nodes, weights = np.polynomial.legendre.leggauss(k)

    def values(alphas: list[float]) -> list[float]:  # f at points of the path (no gradient)
        out = []
        for start in range(0, len(alphas), batch_size):
            a = torch.as_tensor(alphas[start:start + batch_size], dtype=embed.dtype, device=embed.device)
            points = base + a[:, None, None] * delta
            with torch.no_grad():
                res = model.run_with_hooks(tokens.expand(len(a), -1),
                                           fwd_hooks=[("hook_embed", lambda act, hook: points)])
            out += res[:, position, target].float().tolist()
        return out

    def integrate(intervals: list[tuple[float, float]]) -> list[Tensor]:  # per interval [pos, d_model]
        alphas, scale = [], []
        for a, b in intervals:
            alphas += [a + (b - a) * (t + 1) / 2 for t in nodes]
            scale += [(b - a) / 2 * w for w in weights]
        grads = torch.zeros(len(alphas), *embed.shape, dtype=embed.dtype, device=embed.device)
        for start in range(0, len(alphas), batch_size):
            a = torch.as_tensor(alphas[start:start + batch_size], dtype=embed.dtype, device=embed.device)
            points = (base + a[:, None, None] * delta).requires_grad_(True)
            out = model.run_with_hooks(tokens.expand(len(a), -1),
                                       fwd_hooks=[("hook_embed", lambda act, hook: points)])
            grad, = torch.autograd.grad(out[:, position, target].sum(), points)
            w = torch.as_tensor(scale[start:start + batch_size], dtype=embed.dtype, device=embed.device)
            grads[start:start + len(a)] = w[:, None, None] * grad.detach()
        return [delta * grads[i * k:(i + 1) * k].sum(0) for i in range(len(intervals))]

    # each entry: (a, b, attributions over [a, b], f(b) - f(a))
    edges = list(IG_BREAKPOINTS)
    f = dict(zip(edges, values(edges)))
    spans = list(zip(edges[:-1], edges[1:]))
    pieces = [(a, b, part, f[b] - f[a]) for (a, b), part in zip(spans, integrate(spans))]
    output, baseline_output = float(logits[0, position, target]), f[0.0]
    allowed = tolerance * max(1.0, abs(output - baseline_output))
    used = k * len(pieces)
    while True:
        errors = [abs(float(part.sum()) - change) for _, _, part, change in pieces]
        if sum(errors) <= allowed or used + 2 * k > max_steps:
            break
        n_split = min(max(1, batch_size // (2 * k)), (max_steps - used) // (2 * k))  # halve a batch's worth
        worst = sorted(range(len(pieces)), key=errors.__getitem__, reverse=True)[:n_split]
        halves = []
        for i in worst:
            a, b = pieces[i][:2]
            halves += [(a, (a + b) / 2), ((a + b) / 2, b)]
        mids = [mid for _, mid in halves[::2]]
        f.update(zip(mids, values(mids)))
        new = [(a, b, part, f[b] - f[a]) for (a, b), part in zip(halves, integrate(halves))]
        used += k * len(halves)
        pieces = sorted([p for i, p in enumerate(pieces) if i not in worst] + new, key=lambda p: p[0])
    full = sum(part for _, _, part, _ in pieces).detach().cpu()
    error = abs(float(full.sum()) - (output - baseline_output))
    if sum(errors) > allowed:
        warnings.warn(IGConvergenceWarning(
            f"integrated_gradients: completeness error {error:.3g} (summed interval errors "
            f"{sum(errors):.3g}) after {used} gradient evaluations, above the tolerance {allowed:.3g}; "
            f"raise max_steps (now {max_steps}) for a closer path integral"), stacklevel=2)
    return IntegratedGradients(tokens[0].cpu(), target, position, full.sum(-1), full, output, baseline_output, error)


@torch.no_grad()
def attention_rollout(model, tokens, residual_weight: float = 0.5) -> Float[Tensor, "layer q k"]:
    """Attention rollout (Abnar & Zuidema, 2020): per layer the head-averaged pattern mixed with
    the identity (the residual path), rows renormalised, multiplied through the layers. Entry
    ``[l, q, k]`` is how much position ``q`` after block ``l`` draws from input token ``k``."""
    tokens = _one_sequence(model, tokens)
    if not 0 <= residual_weight <= 1:
        raise ValueError(f"residual_weight={residual_weight!r}: expected a number in [0, 1]")
    patterns = _patterns(model, tokens, 1)[:, 0].mean(1)  # [layer, q, k]
    eye = torch.eye(patterns.shape[-1])
    rolled, out = eye, []
    for layer_pattern in patterns:
        mixed = residual_weight * eye + (1 - residual_weight) * layer_pattern
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rolled = mixed @ rolled
        out.append(rolled)
    return torch.stack(out)


@dataclass
class CausalTrace:
    """Causal tracing result: probability of ``target`` when one stream/position is restored."""

    scores: Tensor          # [stream, pos] probability of the target with that state restored
    full_restore: Tensor    # [stream] probability with every position of that stream restored
    clean_prob: float
    corrupted_prob: float
    target: int
    position: int
    corrupt_positions: list[int]
    stream_labels: list[str]

    def frame(self, model, tokens) -> pd.DataFrame:
        words = model.to_str_tokens(torch.as_tensor(tokens).reshape(-1))
        rows = [{"layer": s, "stream": self.stream_labels[s], "position": p, "token": words[p],
                 "prob": float(self.scores[s, p])} for s in range(self.scores.shape[0]) for p in range(self.scores.shape[1])]
        return pd.DataFrame(rows)


@torch.no_grad()
def causal_trace(model, tokens, target=None, position: int = -1, corrupt_positions=None,
                 noise_scale: float = 3.0, seed: int = 0) -> CausalTrace:
    """Causal tracing (Meng et al., 2022): add Gaussian noise (``noise_scale`` x the std of the
    token embeddings) to the token embeddings at ``corrupt_positions`` (default: all but BOS),
    then restore the clean residual stream at one (stream, position) at a time and record the
    probability of ``target`` (default: the clean top prediction) at ``position``.
    """
    tokens = _one_sequence(model, tokens)
    n_pos = tokens.shape[1]
    position = _position(position, n_pos)
    if not isinstance(noise_scale, (int, float)) or noise_scale < 0:
        raise ValueError(f"noise_scale={noise_scale!r}: expected a non-negative number")
    corrupt = list(range(1, n_pos)) if corrupt_positions is None else [
        _position(p, n_pos, "corrupt_positions") for p in corrupt_positions]
    if not corrupt:
        raise ValueError("corrupt_positions=[]: expected at least one position to corrupt")
    from .patching import _source_cache, patch_sweep

    n_layers = model.cfg.n_layers
    streams = list(range(n_layers + 1))
    clean_logits = model(tokens)
    target = _target_id(model, clean_logits[0, position], target)
    clean_prob = float(clean_logits[0, position].float().softmax(-1)[target])
    embed = _source_cache(model, tokens, ["hook_embed"])["hook_embed"]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.zeros_like(embed)
    noise[0, corrupt] = (torch.randn(len(corrupt), embed.shape[-1], generator=generator)
                         * noise_scale * float(model.W_E.std())).to(embed)

    def corrupt_hooks(start: int) -> list:
        def hook(act, hook):
            act += noise[:, start:].to(act.dtype)  # in place, the same noise for every patched copy
            return act
        return [("hook_embed", hook)]

    def metric(logits):
        return logits[0, position].float().softmax(-1)[target]

    metric.reads_positions = (position,)
    metric.batched = lambda read: read[:, 0, 0].float().softmax(-1)[:, target]
    corrupted_prob = float(metric(model.run_with_hooks(tokens, fwd_hooks=corrupt_hooks(0))))
    # restore the clean stream: resid_pre of every block, then the last block's resid_post
    source = _source_cache(model, tokens, [stream_hook(model, s) for s in streams])
    sweeps = {by_position: torch.cat([
        patch_sweep(model, tokens, source, metric, component, by_position, layers=layers, verify=True,
                    input_hooks=corrupt_hooks) for component, layers in (("resid_pre", None), ("resid_post", [-1]))])
        for by_position in (True, False)}
    scores, full = sweeps[True].float().cpu(), sweeps[False].float().cpu()
    return CausalTrace(scores, full, clean_prob, corrupted_prob, target, position, corrupt,
                       [stream_label(model, s) for s in streams])
