"""Figures render with no network: a notebook executed on a real kernel, converted to HTML by
nbconvert, and the explainer's scores.html are opened in a real headless Chromium with the
network cut, and every plotly figure must draw (its ``.main-svg``). A page that loads plotly.js
from the CDN is the control: offline it must stay blank, or the network was not cut."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from interp_lib.explain.records import Event, Explanation, HeadRecord, ScoreResult

from chromium import headless_chromium  # noqa: E402  (tests/chromium.py)
PLOTLY_MIME = "application/vnd.plotly.v1+json"

CELLS = [
    "import interp_lib as il, torch\n"
    "name, out, ckpt = il.notebook.setup('render_check', model_name='toy-2l', output_dir=OUT)",
    "il.plots.head_score_heatmap(torch.arange(8.0).reshape(2, 4) / 8, title='scores', threshold=0.5)",
    "import pandas as pd\n"
    "frame = pd.DataFrame({'layer': [0, 0, 1, 1], 'index': [0, 1, 0, 1], 'drop': [0.01, -0.02, 0.3, 0.0]})\n"
    "il.plots.head_importance_heatmap(frame).show()\n"
    "print('after the figure')",
]


@pytest.fixture(scope="module")
def offline_browser(tmp_path_factory):
    # every request that leaves the machine goes to a closed local port
    driver = headless_chromium(tmp_path_factory.mktemp("chrome-profile"), extra_args=(
        "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
        "--host-resolver-rules=MAP * ~NOTFOUND"))
    driver.set_page_load_timeout(60)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    yield driver
    driver.quit()


def _drawn(driver, path: Path, expected: int, wait: float = 20.0) -> tuple[int, int]:
    """(plotly figure divs, those holding a drawn ``.main-svg``) once all are drawn or ``wait`` passed."""
    driver.get(path.resolve().as_uri())
    script = ("const divs = [...document.querySelectorAll('div.plotly-graph-div')];"
              "return [divs.length, divs.filter(d => d.querySelector('svg.main-svg')).length];")
    deadline = time.monotonic() + wait
    while True:
        divs, drawn = driver.execute_script(script)
        if (divs >= expected and drawn == divs) or time.monotonic() > deadline:
            return divs, drawn
        time.sleep(0.2)


@pytest.fixture(scope="module")
def executed_notebook(tmp_path_factory):
    import nbformat
    from nbclient import NotebookClient

    folder = tmp_path_factory.mktemp("render")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"OUT = {str(folder / 'out')!r}")] + [
        nbformat.v4.new_code_cell(source) for source in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return folder, nb


def test_executed_notebook_carries_plotlyjs_once_and_the_plotly_json(executed_notebook):
    _, nb = executed_notebook
    figures = [o for cell in nb.cells for o in cell.get("outputs", []) if PLOTLY_MIME in o.get("data", {})]
    assert len(figures) == 2, [list(o.get("data", {})) for c in nb.cells for o in c.get("outputs", [])]
    html = [o["data"]["text/html"] for o in figures]
    # the plotly.js bundle (megabytes) in the first figure only; no CDN or MathJax fetch anywhere
    assert len(html[0]) > 1_000_000 and len(html[1]) < 50_000, [len(h) for h in html]
    assert not any(re.search(r"<script[^>]*\bsrc=", h) for h in html)
    assert figures[0]["data"][PLOTLY_MIME]["layout"]["title"]["text"].startswith("scores")
    assert all(o["data"]["text/plain"].startswith("<figure") for o in figures)


def test_notebook_html_export_draws_every_figure_offline(executed_notebook, offline_browser):
    HTMLExporter = pytest.importorskip(
        "nbconvert", reason="nbconvert (a dev dependency) converts the notebook to HTML").HTMLExporter

    folder, nb = executed_notebook
    body, _ = HTMLExporter().from_notebook_node(nb)
    page = folder / "notebook.html"
    page.write_text(body, encoding="utf-8")
    assert _drawn(offline_browser, page, expected=2) == (2, 2)


def _records() -> list[HeadRecord]:
    tokens = [" a", " b", " c", " a", " b"]
    return [HeadRecord(layer=layer, head=head,
                       explanation=Explanation(text=f"head {layer}.{head} attends to the previous token"),
                       scores={"simulation": ScoreResult("simulation", 0.1 * (layer + head), n=10)},
                       top_events=[Event(layer=layer, head=head, window=0, position=4, activation=1.0,
                                         tokens=tokens, attended=[(3, 0.9)])])
            for layer in range(2) for head in range(2)]


def test_scores_html_draws_offline_and_a_cdn_page_does_not(tmp_path, offline_browser):
    from interp_lib.explain.report import score_heatmap, write_report

    files = write_report(_records(), tmp_path / "run", n_layers=2, n_heads=2)
    assert _drawn(offline_browser, files["heatmap"], expected=1) == (1, 1)
    # control: the same figure with plotly.js from the CDN stays blank, so the network is cut
    control = tmp_path / "cdn.html"
    control.write_text(score_heatmap(_records(), 2, 2).to_html(include_plotlyjs="cdn"), encoding="utf-8")
    assert _drawn(offline_browser, control, expected=1, wait=3.0) == (1, 0)


def test_offline_renderer_embeds_plotlyjs_again_after_reset():
    import plotly.graph_objects as go
    import plotly.io as pio

    from interp_lib.notebook import set_plotly_renderer
    from interp_lib.plots import OFFLINE_RENDERER

    previous = pio.renderers.default
    try:
        assert set_plotly_renderer() == OFFLINE_RENDERER
        # what Jupyter asks a figure for when it displays it
        sizes = [len(go.Figure(go.Bar(y=[1, 2]))._repr_mimebundle_()["text/html"]) for _ in range(2)]
        set_plotly_renderer()
        sizes.append(len(go.Figure()._repr_mimebundle_()["text/html"]))
        assert sizes[0] > 1_000_000 > 50_000 > sizes[1] and sizes[2] > 1_000_000, sizes
        with pytest.raises(ValueError, match="unknown plotly renderer"):
            set_plotly_renderer("no_such_renderer")
    finally:
        pio.renderers.default = previous


# ----------------------------------------------------------------------------- figure content


def test_figures_fit_the_page_and_name_their_colour_scales():
    import pandas as pd
    import torch

    from interp_lib import plots

    rng = torch.Generator().manual_seed(0)
    wide = plots.patching_heatmap(torch.randn(12, 200, generator=rng),
                                  {"layer": [f"L{i}" for i in range(12)], "pos": list(range(200))},
                                  tokens=["\ufffd", " the", "\n"] + ["x"] * 197)
    assert wide.layout.width <= plots.FIGURE_WIDTH and wide.data[0].colorbar.title.text == "normalised logit diff"
    assert list(wide.data[0].x[:3]) == ["0: ‹byte›", "1: ␣the", "2: ↵"]
    lens_rows = [{"prompt": 0, "stage": s, "layer": l, "position": p, "input_token": "\ufffd", "top_token": " a",
                  "target_prob": 0.5} for l, s in enumerate(["embed", "L0"]) for p in range(100)]
    lens = plots.logit_lens_heatmap(pd.DataFrame(lens_rows), value="target_prob")
    assert lens.layout.width <= plots.FIGURE_WIDTH and len(lens.data[0].x) == 24   # the last 24 positions
    assert lens.data[0].x[-1] == "99: ‹byte›" and lens.data[0].colorbar.title.text == "P(next token)"
    for figure in (wide, lens, plots.head_score_heatmap(torch.rand(2, 4)), plots.qk_heatmap(torch.randn(5, 5))):
        assert figure.layout.xaxis.title.text and figure.layout.yaxis.title.text


def test_ablation_noise_stays_pale_and_thresholds_are_drawn():
    import pandas as pd
    import torch

    from interp_lib import plots

    noise = pd.DataFrame({"layer": [0, 0, 1, 1], "index": [0, 1, 0, 1], "drop": [0.018, -0.018, 0.004, 0.0]})
    pale = plots.head_importance_heatmap(noise).data[0]
    assert (pale.zmin, pale.zmax) == (-0.1, 0.1)            # the floor, not ±0.018
    strong = plots.head_importance_heatmap(noise.assign(drop=[0.6, -0.018, 0.0, 0.0])).data[0]
    assert (strong.zmin, strong.zmax) == (-0.6, 0.6)
    scores = torch.tensor([[0.1, 0.7], [0.9, 0.2]])
    figure = plots.head_score_heatmap(scores, threshold=0.5)
    outlined = figure.data[1]
    assert sorted(zip(outlined.y, outlined.x)) == [("L0", "H1"), ("L1", "H0")]  # exactly the cells >= 0.5
    assert figure.data[0].colorbar.tickvals == (0.5,)


def test_reliability_count_strip_has_its_own_scale():
    import numpy as np
    import pandas as pd

    from interp_lib import plots

    edges = np.linspace(0, 1, 6)
    frame = pd.DataFrame({"bin_lower": edges[:-1], "bin_upper": edges[1:], "confidence": [0.1, 0.3, 0.5, 0.7, 0.9],
                          "accuracy": [0.1, 0.2, 0.5, 0.6, 0.95], "count": np.array([3, 40, 900, 2500, 12], dtype=np.int64)})
    frame["gap"] = frame["confidence"] - frame["accuracy"]
    figure = plots.reliability_diagram({"a": frame, "b": frame})
    counts = [t for t in figure.data if t.name == "inputs per bin"]
    assert [list(t.y) for t in counts] == [[3, 40, 900, 2500, 12]] * 2
    assert figure.layout.yaxis3.range[1] >= 2500 and figure.layout.yaxis.range[1] == 1


def test_report_keeps_full_explanations_names_the_salience_and_flags_contradictions():
    from interp_lib.explain.report import markdown_report, records_table

    long = ("Induction head: when the current token occurred earlier it attends to the token that followed "
            "that earlier occurrence, so a repeated sequence can be continued; " * 3).strip()
    records = _records()
    records[0].explanation = Explanation(text=long)
    records[0].scores = {"contrastive": ScoreResult("contrastive", -0.8, n=6)}
    records[1].stats = {"causal_random": 0.0123}
    records[1].causal_effect = 0.25
    text = markdown_report(records, {"config": {"model": "toy-2l", "salience": "next_token_effect"}})
    assert long in text                                       # never cut mid-word
    assert "Events are ranked by `next_token_effect`: (z W_O) . (W_U[:, next]" in text
    assert "**contradicted by its score**: contrastive -0.800 Cohen's d, at or below chance 0" in text
    row = next(line for line in text.splitlines() if line.startswith("| L0H0 |"))
    assert "| contradicted |" in row
    shown = records_table(records)
    assert shown.cells["verdict"].tolist() == ["contradicted", "supported", "supported", "supported"]
    records[2].causal_effect = 0.0   # a unit that does nothing (toy-2l's neurons): "supported" says so
    assert records_table(records).cells["verdict"].tolist()[2] == \
        "supported by its score, but ablating the unit changes nothing (0 nats)"
    assert shown.cells["explanation"][0] == long
    assert shown.cells["ablated at top events (Δ loss, nats)"].tolist()[:2] == ["—", "0.250"]
    assert shown.cells["unit (chance)"][1] == "Pearson r (0)"
