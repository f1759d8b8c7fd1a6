"""Reading predictions out of a model: top next-token predictions (logit lens and direct logit
attribution build on this module)."""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import models
from .models import check_tokens
from .units import head_label


def _as_tokens(model, text_or_tokens: str | Int[Tensor, "pos"] | Int[Tensor, "1 pos"]) -> Int[Tensor, "1 pos"]:
    if isinstance(text_or_tokens, str):
        if not text_or_tokens:
            raise ValueError("text_or_tokens='': expected a non-empty text or a token tensor")
        return check_tokens(model, model.to_tokens(text_or_tokens, truncate=False), "text_or_tokens")
    try:
        tokens = torch.as_tensor(text_or_tokens)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"text_or_tokens: expected a text or token ids [pos] / [1, pos], got "
                         f"{type(text_or_tokens).__name__} ({error})") from None
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0:
        raise ValueError(f"text_or_tokens has shape {tuple(tokens.shape)}: expected [pos] or [1, pos]")
    return check_tokens(model, tokens, "text_or_tokens")


@torch.no_grad()
def top_predictions(model, text_or_tokens, k: int = 5, position: int = -1) -> pd.DataFrame:
    """The ``k`` most probable next tokens after ``position`` of one prompt.

    Returns a DataFrame with columns rank, token, token_id, probability, logit.
    """
    if not isinstance(k, int) or not 1 <= k <= model.cfg.d_vocab:
        raise ValueError(f"k={k!r}: expected an integer in [1, {model.cfg.d_vocab}]")
    tokens = _as_tokens(model, text_or_tokens)
    n = tokens.shape[1]
    if not -n <= position < n:
        raise ValueError(f"position={position}: prompt has {n} tokens")
    logits = model(tokens)[0, position].float()
    probs = logits.softmax(-1)
    top = probs.topk(k)
    ids = top.indices.tolist()
    return pd.DataFrame({
        "rank": range(1, k + 1),
        "token": [model.tokenizer.decode([i]) for i in ids],
        "token_id": ids,
        "probability": top.values.tolist(),
        "logit": logits[top.indices].tolist(),
    })


@torch.no_grad()
def next_token_loss(model, tokens: Int[Tensor, "batch pos"], batch_size: int = 32) -> dict[str, float]:
    """Mean next-token loss (nats) and top-1 accuracy of ``model`` over ``tokens``, batched."""
    try:
        tokens = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"tokens: expected token ids [batch, pos], got {type(tokens).__name__} "
                         f"({error})") from None
    if tokens.ndim != 2:  # one sequence is not silently read as a batch of one here
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}: expected [batch, pos] with pos >= 2")
    tokens = check_tokens(model, tokens, "tokens", min_pos=2)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    total_loss, total_correct, count = 0.0, 0, 0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size]
        logits = model(batch)
        targets = batch[:, 1:]
        total_loss += models.next_token_loss(logits, batch).sum().item()
        total_correct += (logits[:, :-1].argmax(-1) == targets).sum().item()
        count += targets.numel()
    return {"loss": total_loss / count, "top1_accuracy": total_correct / count, "n_tokens": count}


# --------------------------------------------------------------------------------------------
# Logit lens
# --------------------------------------------------------------------------------------------

def _tokens_2d(model, text_or_tokens) -> Int[Tensor, "batch pos"]:
    if isinstance(text_or_tokens, str):
        return _as_tokens(model, text_or_tokens)
    return check_tokens(model, text_or_tokens, "tokens")


def _stage_labels(n_layers: int, incl_mid: bool) -> tuple[list[str], list[float], list[str]]:
    """Labels, ``layer`` values (blocks completed) and hook names of the residual-stream stages."""
    labels, depth, hooks = ["embed"], [0.0], ["blocks.0.hook_resid_pre"]
    for layer in range(n_layers):
        if incl_mid:
            labels.append(f"L{layer}.attn")
            depth.append(layer + 0.5)
            hooks.append(f"blocks.{layer}.hook_resid_mid")
        labels.append(f"L{layer}")
        depth.append(layer + 1.0)
        hooks.append(f"blocks.{layer}.hook_resid_post")
    return labels, depth, hooks


@torch.no_grad()
def logit_lens_logits(model, text_or_tokens, incl_mid: bool = False
                      ) -> tuple[Float[Tensor, "stage batch pos d_vocab"], list[str]]:
    """Decode the residual stream after the embeddings and after every layer (and, with
    ``incl_mid``, after every attention sub-layer) through the final LayerNorm and unembedding.

    The final LayerNorm's statistics are recomputed from each stage's own residual (as
    ``ActivationCache.accumulated_resid(apply_ln=True)`` does since TransformerLens #1076, which
    once scaled every stage by the last layer's scale). The last stage reproduces the model's
    logits. Returns ``(logits [stage, batch, pos, d_vocab], labels)``, labels ``embed``,
    ``L0.attn``, ``L0``, ..., ``L{n-1}``.
    """
    tokens = _tokens_2d(model, text_or_tokens)
    labels, _, hooks = _stage_labels(model.cfg.n_layers, incl_mid)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in set(hooks))
    stages = [model.unembed(model.ln_final(cache[name])) for name in hooks]
    return torch.stack(stages).float(), labels


def _one_token_id(model, token, name: str):
    """A text that is exactly one token -> its id; ids are returned as given."""
    if not isinstance(token, str):
        return token
    found = model.to_tokens(token, prepend_bos=False)[0]
    if found.numel() != 1:
        raise ValueError(f"{name}={token!r} is {found.numel()} tokens; pass a single token (or its id)")
    return int(found[0])


def _target_ids(model, target, batch: int, n_pos: int) -> Tensor | None:
    if target is None:
        return None
    ids = torch.as_tensor(_one_token_id(model, target, "target"))
    if ids.is_floating_point():
        raise ValueError(f"target has dtype {ids.dtype}: expected token ids")
    if ids.ndim == 1 and ids.shape[0] == n_pos:
        ids = ids[None]
    if ids.ndim not in (0, 2) or (ids.ndim == 2 and tuple(ids.shape) != (batch, n_pos) and tuple(ids.shape) != (1, n_pos)):
        raise ValueError(f"target has shape {tuple(ids.shape)}: expected a token id, a string, or ids of shape "
                         f"[pos={n_pos}] / [batch={batch}, pos={n_pos}] (negative = no target at that position)")
    if (ids >= model.cfg.d_vocab).any():
        raise ValueError(f"target holds ids >= the vocabulary size {model.cfg.d_vocab}")
    return ids.expand(batch, n_pos).to(model.cfg.device)


@torch.no_grad()
def lens_answer_depth(lens: pd.DataFrame, positions=None, majority: float = 0.5) -> float:
    """How deep the answer appears: the fewest blocks completed (``lens["layer"]``, whole blocks
    only) after which the target is the lens' top prediction (``target_rank == 0``) at more than
    ``majority`` of the rows (prompts x ``positions``, default every position with a target).
    NaN when it never is. ``lens``: :func:`logit_lens` with a target."""
    if "target_rank" not in lens.columns:
        raise ValueError("lens has no target_rank column: pass target= to logit_lens")
    rows = lens[lens["target_rank"].notna() & (lens["layer"] == lens["layer"].round())]
    if positions is not None:
        rows = rows[rows["position"].isin(list(positions))]
    if rows.empty:
        raise ValueError("lens has no rows with a target at these positions")
    top = (rows["target_rank"] == 0).groupby(rows["layer"]).mean()
    reached = top[top > majority]
    return float(reached.index.min()) if len(reached) else float("nan")


def logit_lens(model, text_or_tokens, target=None, k: int = 5, incl_mid: bool = False,
               positions=None) -> pd.DataFrame:
    """The logit lens as a tidy table: one row per (prompt, stage, position).

    Args:
        text_or_tokens: a prompt, or token ids ``[pos]`` / ``[batch, pos]``.
        target: optional token whose probability to track: a string (one token), an id, or ids
            per position ``[pos]`` / ``[batch, pos]`` (e.g. the next input token; negative = none).
        k: how many top tokens to list per row.
        incl_mid: also decode after every attention sub-layer.
        positions: positions to keep (default all; negative count from the end).

    Columns: ``prompt, stage, layer`` (blocks completed: 0 = embeddings, 2.5 = layer 2's
    attention), ``position, input_token, top_token, top_prob, top_tokens, top_probs`` and, with a
    target, ``target, target_token, target_prob, target_rank`` (rank 0 = top).
    """
    tokens = _tokens_2d(model, text_or_tokens)
    batch, n_pos = tokens.shape
    if not isinstance(k, int) or not 1 <= k <= model.cfg.d_vocab:
        raise ValueError(f"k={k!r}: expected an integer in [1, {model.cfg.d_vocab}]")
    if positions is None:
        keep = list(range(n_pos))
    else:
        keep = [int(p) for p in torch.as_tensor(positions).flatten().tolist()]
        bad = [p for p in keep if not -n_pos <= p < n_pos]
        if bad:
            raise ValueError(f"positions={bad} out of range for a prompt of {n_pos} tokens")
        keep = [p % n_pos for p in keep]
    targets = _target_ids(model, target, batch, n_pos)
    logits, labels = logit_lens_logits(model, tokens, incl_mid)
    _, depth, _ = _stage_labels(model.cfg.n_layers, incl_mid)
    logits = logits[:, :, keep]                                            # [stage, batch, kept, vocab]
    probs = logits.softmax(-1)
    top = probs.topk(k, dim=-1)
    decode = model.tokenizer.decode if getattr(model, "tokenizer", None) is not None else str
    vocab_strings: dict[int, str] = {}

    def token_string(i: int) -> str:
        if i not in vocab_strings:
            vocab_strings[i] = decode([i]) if decode is not str else str(i)
        return vocab_strings[i]

    stage_idx, batch_idx, pos_idx = torch.meshgrid(torch.arange(len(labels)), torch.arange(batch),
                                                   torch.arange(len(keep)), indexing="ij")
    frame = pd.DataFrame({
        "prompt": batch_idx.flatten().numpy(),
        "stage": [labels[i] for i in stage_idx.flatten().tolist()],
        "layer": [depth[i] for i in stage_idx.flatten().tolist()],
        "position": [keep[i] for i in pos_idx.flatten().tolist()],
    })
    frame["input_token"] = [token_string(int(tokens[b, keep[p]])) for b, p in
                            zip(batch_idx.flatten().tolist(), pos_idx.flatten().tolist())]
    top_ids = top.indices.reshape(-1, k).tolist()
    top_probs = top.values.reshape(-1, k).tolist()
    frame["top_token"] = [token_string(ids[0]) for ids in top_ids]
    frame["top_prob"] = [p[0] for p in top_probs]
    frame["top_tokens"] = [[token_string(i) for i in ids] for ids in top_ids]
    frame["top_probs"] = top_probs
    if targets is not None:
        tgt = targets[:, keep].cpu()                                       # [batch, kept]
        valid = tgt >= 0
        safe = tgt.clamp(min=0)
        gathered = probs.gather(-1, safe[None, :, :, None].expand(len(labels), -1, -1, 1)).squeeze(-1)
        target_logit = logits.gather(-1, safe[None, :, :, None].expand(len(labels), -1, -1, 1))
        rank = (logits > target_logit).sum(-1)
        mask = valid[None].expand_as(gathered)
        frame["target"] = torch.where(mask, safe[None].expand_as(gathered), -1).flatten().numpy()
        frame["target_token"] = [token_string(int(t)) if t >= 0 else None for t in frame["target"]]
        frame["target_prob"] = torch.where(mask, gathered, torch.nan).flatten().numpy()
        frame["target_rank"] = torch.where(mask, rank, -1).flatten().numpy()
    return frame


# --------------------------------------------------------------------------------------------
# Residual stream decomposition and direct logit attribution
# --------------------------------------------------------------------------------------------

DECOMPOSITIONS = ("layer", "head")


def decompose_residual(model, cache, by: str = "layer"
                       ) -> tuple[Float[Tensor, "component batch pos d_model"], list[str]]:
    """The final residual stream as a sum of parts, with labels.

    ``by="layer"``: ``embed``, ``pos_embed``, ``0_attn_out``, ``0_mlp_out``, ... (TransformerLens'
    ``cache.decompose_resid``). ``by="head"``: ``embed``, ``pos_embed``, then per layer every head
    ``L0H0``... (``cache.stack_head_results``), the attention output bias ``0_attn_bias`` and
    ``0_mlp_out``. Either way the parts sum to ``blocks.{n-1}.hook_resid_post``.
    """
    if by not in DECOMPOSITIONS:
        raise ValueError(f"by={by!r}: expected one of {', '.join(DECOMPOSITIONS)}")
    if by == "layer":
        stack, labels = cache.decompose_resid(layer=None, return_labels=True)
        return stack, list(labels)
    embeds, embed_labels = cache.decompose_resid(layer=0, return_labels=True)
    heads = cache.stack_head_results(layer=-1)                          # [layer*head, batch, pos, d]
    n_heads = model.cfg.n_heads
    parts, labels = list(embeds), list(embed_labels)
    for layer in range(model.cfg.n_layers):
        layer_heads = heads[layer * n_heads:(layer + 1) * n_heads]
        parts.extend(layer_heads)
        labels.extend(head_label(layer, h) for h in range(n_heads))
        # attn_out = sum of head results + b_O: take the bias as the remainder so the parts add up.
        parts.append(cache[f"blocks.{layer}.hook_attn_out"] - layer_heads.sum(0))
        labels.append(f"{layer}_attn_bias")
        if not model.cfg.attn_only:
            parts.append(cache[f"blocks.{layer}.hook_mlp_out"])
            labels.append(f"{layer}_mlp_out")
    return torch.stack(parts), labels


def _final_norm_affine(model) -> tuple[Tensor | None, Tensor | None]:
    norm = model.ln_final
    inner = getattr(norm, "_original_component", norm)
    return getattr(inner, "weight", None), getattr(inner, "bias", None)


@torch.no_grad()
def direct_logit_attribution(model, text_or_tokens, answer, wrong=None, position=-1, by: str = "layer",
                             return_labels: bool = False):
    """Direct logit attribution: each part of the residual stream's contribution to the logit of
    ``answer`` (or to ``logit[answer] - logit[wrong]``) at ``position``, per prompt.

    Each part goes through the final LayerNorm as TransformerLens' ``cache.apply_ln_to_stack``
    treats it: centred, divided by the *frozen* scale of the full residual at that position (the
    LayerNorm's only non-linearity), times the LayerNorm weight, then dotted with the unembedding
    direction. The last part, ``unembed_bias``, holds the constant terms (LayerNorm bias and
    unembedding bias; zero for GPT-2 in compatibility mode), so the parts sum exactly to the
    model's logit (difference). In compatibility mode the unembedding is centred, so a single
    answer's logit is shifted by a per-position constant from raw Hugging Face logits; logit
    differences are unaffected.

    Args:
        answer, wrong: a token string, an id, or ``[batch]`` ids.
        position: an int or ``[batch]`` ints (e.g. each prompt's last real token).
        by: ``"layer"`` or ``"head"`` (see :func:`decompose_residual`).

    Returns:
        ``[component, batch]`` contributions; with ``return_labels``, ``(contributions, labels)``.
    """
    tokens = _tokens_2d(model, text_or_tokens)
    batch, n_pos = tokens.shape
    if by not in DECOMPOSITIONS:
        raise ValueError(f"by={by!r}: expected one of {', '.join(DECOMPOSITIONS)}")
    pos = torch.as_tensor(position)
    pos = pos.expand(batch) if pos.ndim == 0 else pos
    if pos.ndim != 1 or pos.shape[0] != batch or pos.is_floating_point():
        raise ValueError(f"position has shape {tuple(pos.shape)}: expected an int or [batch={batch}] ints")
    if (pos < -n_pos).any() or (pos >= n_pos).any():
        raise ValueError(f"position={position!r} out of range for prompts of {n_pos} tokens")
    pos = (pos % n_pos).to(model.cfg.device)

    def ids(tok, name):
        if tok is None:
            return None
        out = torch.as_tensor(_one_token_id(model, tok, name))
        out = out.expand(batch) if out.ndim == 0 else out
        if out.ndim != 1 or out.shape[0] != batch or out.is_floating_point():
            raise ValueError(f"{name} has shape {tuple(out.shape)}: expected a token, an id or [batch={batch}] ids")
        if (out < 0).any() or (out >= model.cfg.d_vocab).any():
            raise ValueError(f"{name} holds ids outside [0, {model.cfg.d_vocab - 1}]")
        return out.long().to(model.cfg.device)

    answer_ids, wrong_ids = ids(answer, "answer"), ids(wrong, "wrong")
    _, cache = model.run_with_cache(tokens)
    stack, labels = decompose_residual(model, cache, by)
    rows = torch.arange(batch, device=stack.device)
    parts = stack[:, rows, pos]                                                    # [component, batch, d]
    scale = cache["ln_final.hook_scale"][rows, pos]                                # [batch, 1]
    if model.cfg.normalization_type in ("LN", "LNPre"):
        parts = parts - parts.mean(-1, keepdim=True)
    if model.cfg.normalization_type is not None:
        parts = parts / scale
    weight, bias = _final_norm_affine(model)
    direction = model.W_U[:, answer_ids]                                          # [d_model, batch]
    b_U = getattr(model, "b_U", None)
    constant = b_U[answer_ids] if b_U is not None else torch.zeros(batch, device=stack.device)
    if wrong_ids is not None:
        direction = direction - model.W_U[:, wrong_ids]
        if b_U is not None:
            constant = constant - b_U[wrong_ids]
    # logit = (normalised * weight + bias) @ direction + b_U: the bias is a constant, the weight
    # rescales the direction each normalised part is read along.
    if model.cfg.normalization_type is not None:
        if bias is not None:
            constant = constant + bias @ direction
        if weight is not None:
            direction = direction * weight[:, None]
    contributions = torch.einsum("cbd,db->cb", parts, direction)
    contributions = torch.cat([contributions, constant[None]]).float().cpu()
    labels = labels + ["unembed_bias"]
    return (contributions, labels) if return_labels else contributions


def head_grid(contributions: Tensor, labels: list[str], n_layers: int, n_heads: int) -> Tensor:
    """The ``L{l}H{h}`` rows of a ``by="head"`` attribution as a ``[layer, head, ...]`` tensor."""
    index = {label: i for i, label in enumerate(labels)}
    missing = [head_label(l, h) for l in range(n_layers) for h in range(n_heads) if head_label(l, h) not in index]
    if missing:
        raise ValueError(f"labels lack heads {missing[:3]}...: pass a by='head' attribution")
    rows = [index[head_label(l, h)] for l in range(n_layers) for h in range(n_heads)]
    return contributions[rows].reshape(n_layers, n_heads, *contributions.shape[1:])
