"""Reading predictions out of a model: top next-token predictions (logit lens and direct logit
attribution build on this module)."""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor


def _as_tokens(model, text_or_tokens: str | Int[Tensor, "pos"] | Int[Tensor, "1 pos"]) -> Int[Tensor, "1 pos"]:
    if isinstance(text_or_tokens, str):
        if not text_or_tokens:
            raise ValueError("text_or_tokens='': expected a non-empty text or a token tensor")
        return model.to_tokens(text_or_tokens)
    tokens = torch.as_tensor(text_or_tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0:
        raise ValueError(f"text_or_tokens has shape {tuple(tokens.shape)}: expected [pos] or [1, pos]")
    return tokens.to(model.cfg.device)


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
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}: expected [batch, pos] with pos >= 2")
    total_loss, total_correct, count = 0.0, 0, 0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(model.cfg.device)
        logits = model(batch).float()[:, :-1]
        targets = batch[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                reduction="sum")
        total_loss += nll.item()
        total_correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
    return {"loss": total_loss / count, "top1_accuracy": total_correct / count, "n_tokens": count}
