"""Figures: plotly charts and circuitsvis views. Analyses return data; these draw it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_layer(model, layer: int) -> None:
    if not isinstance(layer, int) or not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer={layer!r}: expected an integer in [0, {model.cfg.n_layers - 1}]")


@torch.no_grad()
def attention_pattern(model, text: str, layer: int) -> tuple[list[str], torch.Tensor]:
    """String tokens and the attention pattern [head, query, key] of ``layer`` on ``text``."""
    _check_layer(model, layer)
    tokens = model.to_tokens(text)
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.attn.hook_pattern")
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].detach().cpu().clone()
    return model.to_str_tokens(tokens[0]), pattern


def attention_view(model, text: str, layer: int, heads: Sequence[int] | None = None):
    """An interactive circuitsvis view of the heads of ``layer`` attending over ``text``."""
    import circuitsvis as cv

    str_tokens, pattern = attention_pattern(model, text, layer)
    head_ids = list(range(model.cfg.n_heads)) if heads is None else list(heads)
    bad = [h for h in head_ids if not isinstance(h, int) or not 0 <= h < model.cfg.n_heads]
    if bad or not head_ids:
        raise ValueError(f"heads={heads!r}: expected head indices in [0, {model.cfg.n_heads - 1}]")
    return cv.attention.attention_patterns(
        tokens=str_tokens, attention=pattern[head_ids],
        attention_head_names=[f"L{layer}H{h}" for h in head_ids])
