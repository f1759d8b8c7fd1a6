"""The one intervention engine's ablations: unit_ablation_effects (heads and neurons), the
per-position mean, the activation-source registry and the shared token checks, each against a
plain computation written out here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import interp_lib as il
from interp_lib import patching as P
from interp_lib.models import check_tokens, next_token_loss
from interp_lib.units import Head, Neuron


@dataclass
class Ev:
    window: int
    position: int
    kind: str


def _events(n_windows: int, n_pos: int, seed: int, n: int = 6) -> list[Ev]:
    rng = np.random.default_rng(seed)
    out = []
    for kind in ("top", "random"):
        for _ in range(n):
            out.append(Ev(int(rng.integers(n_windows)), int(rng.integers(n_pos)), kind))
    out.append(Ev(0, n_pos - 1, "top"))      # the last position predicts nothing: left out
    return out


def _windows(model, n: int = 6, n_pos: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n, n_pos), generator=generator)


def _hand_effects(model, windows, events, layer_hook, edit):
    """Mean (ablated - clean) next-token loss at the events, by a plain hook written here."""
    n_pos = windows.shape[1]
    with torch.no_grad():
        clean = torch.nn.functional.cross_entropy(model(windows)[:, :-1].float().transpose(1, 2), windows[:, 1:],
                                                  reduction="none")

        def hook(act, hook):
            edit(act)
            return act

        ablated_logits = model.run_with_hooks(windows, fwd_hooks=[(layer_hook, hook)])
        ablated = torch.nn.functional.cross_entropy(ablated_logits[:, :-1].float().transpose(1, 2), windows[:, 1:],
                                                    reduction="none")
    out = {}
    for kind in ("top", "random"):
        pairs = [(e.window, e.position) for e in events if e.kind == kind and e.position < n_pos - 1]
        out[kind] = float(np.mean([float(ablated[w, p] - clean[w, p]) for w, p in pairs]))
        out[f"n_{kind}"] = len(pairs)
    return out


def test_zero_ablation_of_every_head_matches_plain_hooks(toy_2l):
    """The explainer's causal check (it was explain.pipeline.causal_effects: zero hook_z[:, :, head]
    on the windows, loss change at the top / random events), computed here with plain hooks."""
    windows = _windows(toy_2l, n=7, n_pos=16)
    events = {(layer, head): _events(7, 16, seed=10 * layer + head)
              for layer in range(toy_2l.cfg.n_layers) for head in range(toy_2l.cfg.n_heads)}
    got = P.unit_ablation_effects(toy_2l, windows, events, method="zero", batch_size=3, progress=False)
    assert set(got) == set(events) and all(isinstance(unit, Head) for unit in got)
    for (layer, head), unit_events in events.items():
        def zero(act, head=head):
            act[:, :, head] = 0.0

        expected = _hand_effects(toy_2l, windows, unit_events, f"blocks.{layer}.attn.hook_z", zero)
        assert got[(layer, head)]["n_top"] == expected["n_top"] > 0
        assert got[(layer, head)]["n_random"] == expected["n_random"]
        for kind in ("top", "random"):
            assert got[(layer, head)][kind] == pytest.approx(expected[kind], abs=1e-5)
    # the induction heads matter on some events: the comparison is not between zeros
    assert max(abs(e["top"]) for e in got.values()) > 1e-2


def test_neuron_zero_ablation_matches_a_plain_hook(toy_lm):
    windows = _windows(toy_lm, n=5, n_pos=14, seed=1)
    events = _events(5, 14, seed=3)
    unit = Neuron(1, 37)
    got = P.unit_ablation_effects(toy_lm, windows, {unit: events}, batch_size=2, progress=False)[unit]

    def zero(act):
        act[:, :, 37] = 0.0

    expected = _hand_effects(toy_lm, windows, events, "blocks.1.mlp.hook_post", zero)
    assert got["n_top"] == expected["n_top"] == 6 and got["n_random"] == expected["n_random"]
    for kind in ("top", "random"):
        assert got[kind] == pytest.approx(expected[kind], abs=1e-5)
    # labels name the same neuron
    by_label = P.unit_ablation_effects(toy_lm, windows, {"L1N37": events}, batch_size=5, progress=False)
    assert by_label[unit]["top"] == pytest.approx(got["top"], abs=1e-5)


def test_mean_ablation_is_the_per_position_mean(toy_lm):
    windows = _windows(toy_lm, n=6, n_pos=10, seed=2)
    reference = _windows(toy_lm, n=9, n_pos=10, seed=5)
    events = _events(6, 10, seed=4)
    with torch.no_grad():
        _, cache = toy_lm.run_with_cache(reference, names_filter=lambda n: n in ("blocks.2.mlp.hook_post",
                                                                             "blocks.0.attn.hook_z"))
    neuron_mean = cache["blocks.2.mlp.hook_post"][:, :, 100].mean(0)             # [pos]
    head_mean = cache["blocks.0.attn.hook_z"][:, :, 2].mean(0)                  # [pos, d_head]
    assert (neuron_mean.max() - neuron_mean.min()) > 1e-3   # it does vary by position

    def neuron(act):
        act[:, :, 100] = neuron_mean

    def head(act):
        act[:, :, 2] = head_mean

    got = P.unit_ablation_effects(toy_lm, windows, {Neuron(2, 100): events, Head(0, 2): events}, method="mean",
                                  reference_tokens=reference, batch_size=4, progress=False)
    for unit, edit, hook in ((Neuron(2, 100), neuron, "blocks.2.mlp.hook_post"),
                             (Head(0, 2), head, "blocks.0.attn.hook_z")):
        expected = _hand_effects(toy_lm, windows, events, hook, edit)
        for kind in ("top", "random"):
            assert got[unit][kind] == pytest.approx(expected[kind], abs=1e-5)
    # mean_activations streams: batch size does not change it
    means = P.mean_activations(toy_lm, reference, ["blocks.2.mlp.hook_post"], batch_size=2)["blocks.2.mlp.hook_post"]
    assert means.shape == (1, 10, toy_lm.cfg.d_mlp)
    torch.testing.assert_close(means[0, :, 100], neuron_mean, atol=1e-6, rtol=0)


def test_resample_ablation_takes_another_windows_activation(toy_lm):
    windows = _windows(toy_lm, n=4, n_pos=9, seed=6)
    events = [Ev(w, p, "top") for w in range(4) for p in (2, 5)]
    got = P.unit_ablation_effects(toy_lm, windows, {Neuron(0, 5): events}, method="resample", seed=3,
                                  batch_size=3, progress=False)[Neuron(0, 5)]
    source = P.resample_index(4, None, seed=3)
    assert not (source == torch.arange(4)).any()
    with torch.no_grad():
        _, cache = toy_lm.run_with_cache(windows[source], names_filter="blocks.0.mlp.hook_post")
    donor = cache["blocks.0.mlp.hook_post"][:, :, 5]

    def edit(act):
        act[:, :, 5] = donor

    expected = _hand_effects(toy_lm, windows, events + [Ev(0, 1, "random")], "blocks.0.mlp.hook_post", edit)
    assert got["top"] == pytest.approx(expected["top"], abs=1e-5) and "random" not in got


def test_ablation_hooks_take_neurons_and_precomputed_means(toy_lm):
    tokens = _windows(toy_lm, n=4, n_pos=8, seed=7)
    names = ["blocks.1.mlp.hook_post", "blocks.1.attn.hook_z"]
    means = P.mean_activations(toy_lm, tokens, names, batch_size=3)
    with torch.no_grad():
        own = P.run_with_ablation(toy_lm, tokens, heads=["L1H0"], neurons=[Neuron(1, 3)], method="mean")
        given = toy_lm.run_with_hooks(tokens, fwd_hooks=P.ablation_hooks(
            toy_lm, tokens, heads=[(1, 0)], neurons=["L1N3"], method="mean", means=means))
        _, cache = toy_lm.run_with_cache(tokens, names_filter=lambda n: n in names)

        def hand(act, hook):
            if hook.name.endswith("hook_post"):
                act[:, :, 3] = cache[hook.name][:, :, 3].mean(0)
            else:
                act[:, :, 0] = cache[hook.name][:, :, 0].mean(0)
            return act

        expected = toy_lm.run_with_hooks(tokens, fwd_hooks=[(n, hand) for n in names])
    torch.testing.assert_close(own, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(given, expected, atol=1e-4, rtol=0)


def test_registry_reads_units(toy_lm):
    tokens = _windows(toy_lm, n=2, n_pos=6, seed=8)
    with torch.no_grad():
        _, cache = toy_lm.run_with_cache(tokens)
    z = P.COMPONENTS["attn_head_out"]
    post = P.get_component("post")
    assert z.hook_name(3) == "blocks.3.attn.hook_z" and post.hook_name(0) == "blocks.0.mlp.hook_post"
    assert P.COMPONENTS["resid_pre"].hook_name(1) == "blocks.1.hook_resid_pre"
    torch.testing.assert_close(z.read_units(cache["blocks.1.attn.hook_z"]),
                               cache["blocks.1.attn.hook_z"].norm(dim=-1))
    assert post.read_units(cache["blocks.0.mlp.hook_post"]) is cache["blocks.0.mlp.hook_post"]
    assert P.unit_source(Neuron(2, 9)) == (post, "blocks.2.mlp.hook_post", 9)
    assert P.unit_source(Head(0, 1))[1:] == ("blocks.0.attn.hook_z", 1)
    with pytest.raises(ValueError, match="attn_head_pattern"):
        P.COMPONENTS["attn_head_pattern"].read_units(cache["blocks.0.attn.hook_pattern"])


def test_unit_ablation_effects_bad_input(toy_lm):
    windows = _windows(toy_lm, n=3, n_pos=6)
    with pytest.raises(ValueError, match="method='noise'"):
        P.unit_ablation_effects(toy_lm, windows, {}, method="noise", progress=False)
    with pytest.raises(ValueError, match=r"L9N0.*out of range"):
        P.unit_ablation_effects(toy_lm, windows, {Neuron(9, 0): []}, progress=False)
    with pytest.raises(ValueError, match=r"events_by_unit\[L0H1\].*window 7"):
        P.unit_ablation_effects(toy_lm, windows, {(0, 1): [Ev(7, 0, "top")]}, progress=False)
    with pytest.raises(ValueError, match="windows has shape"):
        P.unit_ablation_effects(toy_lm, windows[:, :1], {}, progress=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        P.unit_ablation_effects(toy_lm, windows, {}, batch_size=0, progress=False)


def test_next_token_loss_and_token_checks(toy_lm):
    tokens = _windows(toy_lm, n=3, n_pos=7, seed=9)
    with torch.no_grad():
        logits = toy_lm(tokens)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    torch.testing.assert_close(next_token_loss(logits, tokens), expected)
    assert check_tokens(toy_lm, tokens[0]).shape == (1, 7)
    for bad, match in ((tokens.float(), "tokens has dtype"), (tokens + 10_000, r"tokens holds token id \d+: expected ids in \[0, 4095\]"),
                       (tokens[:0], r"shape \(0, 7\)"), (None, "tokens is None")):
        with pytest.raises(ValueError, match=match):
            check_tokens(toy_lm, bad)
    with pytest.raises(ValueError, match="windows has 3 sequences: expected at least 4"):
        check_tokens(toy_lm, tokens, "windows", min_seqs=4)


def test_icl_loss_drop_mean_ablation_is_the_per_position_mean(toy_2l):
    from interp_lib import heads as H

    tokens = H.repeat_probe_tokens(toy_2l, 11, 0, 6, 0)
    with torch.no_grad():
        _, cache = toy_2l.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
        mean = cache["blocks.1.attn.hook_z"].mean(0)                           # [pos, head, d_head]

        def hook(z, hook):
            z[:, :, [0, 2]] = mean[:, [0, 2]]
            return z

        logits = toy_2l.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", hook)])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    got = H.icl_loss_drop(toy_2l, ["L1H0", (1, 2)], length=11, n_sequences=6, method="mean")
    assert got["loss_first"] == pytest.approx(float(nll[:, :11].mean()), abs=1e-5)
    assert got["loss_second"] == pytest.approx(float(nll[:, 11:].mean()), abs=1e-5)
    # ablation_effects averages once for all its groups: the same numbers as one call per group
    frame = H.ablation_effects(toy_2l, [(1, 0), (1, 2)], length=11, n_sequences=6, method="mean")
    joint = frame.set_index("head").loc["L1H0+L1H2"]
    assert joint["drop"] == pytest.approx(got["drop"], abs=1e-5)


def test_neuron_sweeps_run_on_the_patching_engine(toy_lm):
    tokens = _windows(toy_lm, n=2, n_pos=6, seed=11)
    rows, answer = torch.arange(2), tokens[:, -1]

    def metric(logits):  # log-probability of the last token, read at position 4 only
        return logits[:, 4].log_softmax(-1)[rows, answer].mean()

    metric.reads_positions = (4,)
    metric.batched = lambda read: read[:, :, 0].log_softmax(-1)[:, rows, answer].mean(-1)

    sweep = P.ablation_sweep(toy_lm, tokens, metric, component="mlp_post", layers=[1], by_position=False)
    by_position = P.ablation_sweep(toy_lm, tokens, metric, component="post", layers=[1], by_position=True,
                                   positions=[3])
    assert sweep.shape == (1, toy_lm.cfg.d_mlp) and by_position.shape == (1, 1, toy_lm.cfg.d_mlp)
    for neuron, position in ((0, 3), (37, 3), (511, 3)):
        def zero(act, hook, positions=slice(None)):
            act[:, positions, neuron] = 0.0
            return act

        with torch.no_grad():
            everywhere = metric(toy_lm.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_post", zero)]))
            one = metric(toy_lm.run_with_hooks(tokens, fwd_hooks=[(
                "blocks.1.mlp.hook_post", lambda act, hook: zero(act, hook, position))]))
        assert float(sweep[0, neuron]) == pytest.approx(float(everywhere), abs=1e-4)
        assert float(by_position[0, 0, neuron]) == pytest.approx(float(one), abs=1e-4)
