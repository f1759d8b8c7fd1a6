"""The static HTML viewer, ratings read-back, the notebook rating widget; the page is driven in a
real headless Chromium (Debian chromium + chromedriver)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from interp_lib.explain.records import Event, Explanation, HeadRecord, ScoreResult
from interp_lib.explain.viewer import (DATA_ELEMENT_ID, SCORER_INFO, RatingWidget, rating_widgets,
                                       ratings_vs_scores, read_ratings, score_verdict, viewer_data,
                                       viewer_run_id, write_viewer)

MALICIOUS = "</script><img src=x onerror=alert(1)>"
from chromium import headless_chromium  # noqa: E402  (tests/chromium.py)


def _event(layer: int, head: int, tokens: list[str], position: int, attended, window: int = 0) -> Event:
    return Event(layer=layer, head=head, window=window, position=position, activation=1.5,
                 tokens=tokens, attended=list(attended))


def make_records() -> list[HeadRecord]:
    toks = [" The", " cat", " sat", " on", " the", " mat", ".", " The", " cat"]
    return [
        HeadRecord(  # induction head: attends to the token after the previous occurrence
            layer=1, head=0,
            explanation=Explanation(text="Induction: attends to the token after an earlier copy of the current token",
                                    attends_from="repeated token", attends_to="token after its earlier copy",
                                    source="llm:test-model"),
            heuristic=Explanation(text="attends 6 tokens back"),
            scores={"simulation": ScoreResult("simulation", 0.8, n=20),
                    "contrastive": ScoreResult("contrastive", 0.7, n=10)},
            causal_effect=0.42,
            top_events=[_event(1, 0, toks, 8, [(2, 0.72), (1, 0.11)]),
                        _event(1, 0, toks, 7, [(1, 0.5)], window=3)],
            family=0, family_label="induction", stats={"mean_offset": 6.0}),
        HeadRecord(
            layer=0, head=2,
            explanation=Explanation(text="Previous token head: attends to the immediately preceding token"),
            scores={"simulation": ScoreResult("simulation", 0.6, n=20)},
            top_events=[_event(0, 2, toks, 4, [(3, 0.93)])],
            family=1, family_label="previous token"),
        HeadRecord(  # a hostile explanation (and a URL token) that must stay inert text
            layer=0, head=0,
            explanation=Explanation(text=MALICIOUS),
            scores={"simulation": ScoreResult("simulation", 0.2, n=20)},
            top_events=[_event(0, 0, ["<b>", "https://evil.example/x.png", MALICIOUS], 2,
                               [(0, 0.4), (1, 0.3)])],
            family=-1),
        HeadRecord(  # failed head: no explanation, no score
            layer=1, head=1, failure="unparseable: the model answered with prose",
            scores={"simulation": ScoreResult("simulation", None, failure="no explanation")},
            family=None),
        HeadRecord(
            layer=1, head=2,
            explanation=Explanation(text="Attends to the first token (attention sink)"),
            scores={"simulation": ScoreResult("simulation", 0.35, n=20)},
            top_events=[_event(1, 2, toks[:5], 4, [(0, 0.97)])],
            family=2, family_label="sink"),
    ]


def _embedded(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="%s">(.*?)</script>' % DATA_ELEMENT_ID,
                      page, re.S)
    assert match, "no embedded data element"
    return json.loads(match.group(1))


# ----------------------------------------------------------------------------- page, unit


def test_page_is_self_contained_and_data_round_trips(tmp_path):
    records = make_records()
    meta = {"model": "toy-2l", "api_key": "sk-should-not-appear", "client": {"password": "pw-nope", "n": 3}}
    path = write_viewer(records, tmp_path / "viewer.html", meta=meta, n_layers=2, n_heads=4)
    page = path.read_text(encoding="utf-8")

    # no external resource at all; the URL token inside the data is escaped too
    assert not re.search(r"https?://", page, re.I) and "//evil" not in page
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page, re.I)
    # the hostile text cannot close the data element or create markup
    assert page.count("</script>") == 2
    assert "<img" not in page and MALICIOUS not in page
    # credentials in meta are dropped
    assert "sk-should-not-appear" not in page and "pw-nope" not in page
    assert "api_key" not in page and "password" not in page

    data = _embedded(page)
    assert data == viewer_data(records, meta=meta, n_layers=2, n_heads=4)
    assert data["meta"] == {"model": "toy-2l", "client": {"n": 3}}
    assert (data["n_layers"], data["n_heads"]) == (2, 4)
    by_label = {h["label"]: h for h in data["heads"]}
    assert set(by_label) == {r.label for r in records}
    assert by_label["L0H0"]["explanation"]["text"] == MALICIOUS
    assert by_label["L0H0"]["top_events"][0]["tokens"][1] == "https://evil.example/x.png"
    for record in records:
        expected = record.to_dict()
        got = dict(by_label[record.label])
        assert got.pop("best_score") == record.best_score()
        assert got.pop("verdict") == score_verdict(record)
        assert got == expected
    assert data["run"] == viewer_run_id(records)


def test_meta_urls_lose_user_info_and_query(tmp_path):
    records = make_records()
    meta = {"base_url": "https://user:s3cr3t@api.example.com:8443/v1?key=q-secret&x=1#tok=f-secret",
            "client": {"endpoints": ["http://bob@localhost:8000/v1", "https://plain.example/v1"],
                       "note": "see https://x.example/?key=kept-in-prose", "n": 2},
            "not_a_url": "ftp://u:p@host/?a=1", "model": "toy-2l"}
    data = viewer_data(records, meta=meta)
    assert data["meta"] == {
        "base_url": "https://api.example.com:8443/v1",
        "client": {"endpoints": ["http://localhost:8000/v1", "https://plain.example/v1"],
                   # only whole-string http(s) URLs are rewritten; prose is left as written
                   "note": "see https://x.example/?key=kept-in-prose", "n": 2},
        "not_a_url": "ftp://u:p@host/?a=1", "model": "toy-2l"}
    page = write_viewer(records, tmp_path / "viewer.html", meta=meta).read_text(encoding="utf-8")
    for secret in ("s3cr3t", "q-secret", "f-secret", "bob"):
        assert secret not in page
    assert _embedded(page)["meta"] == data["meta"]


def test_viewer_options_and_bad_input(tmp_path):
    records = make_records()
    data = viewer_data(records, max_events=1, color_by="score")
    assert max(len(h["top_events"]) for h in data["heads"]) == 1
    assert (data["n_layers"], data["n_heads"]) == (2, 3)   # inferred from the records
    assert data["scorers"] == ["contrastive", "simulation"]
    # the run id follows the explanations: same text -> same id, new text -> new id
    assert viewer_run_id(make_records()) == viewer_run_id(records)
    changed = make_records()
    changed[0].explanation.text += " (refined)"
    assert viewer_run_id(changed) != viewer_run_id(records)

    with pytest.raises(ValueError, match="color_by='heat'"):
        write_viewer(records, tmp_path / "v.html", color_by="heat")
    with pytest.raises(ValueError, match="n_heads=2 is too small"):
        write_viewer(records, tmp_path / "v.html", n_heads=2)
    with pytest.raises(ValueError, match="records is empty"):
        write_viewer([], tmp_path / "v.html")
    with pytest.raises(TypeError, match=r"records\[1\] must be a HeadRecord"):
        write_viewer([records[0], {"layer": 0}], tmp_path / "v.html")
    with pytest.raises(ValueError, match="'L1H0' twice"):
        write_viewer([records[0], records[0]], tmp_path / "v.html")
    with pytest.raises(ValueError, match="must end in .html"):
        write_viewer(records, tmp_path / "v.json")
    with pytest.raises(ValueError, match="max_events=-1"):
        write_viewer(records, tmp_path / "v.html", max_events=-1)


# ----------------------------------------------------------------------------- ratings


def _write_ratings(path: Path, entries: list, **extra) -> Path:
    path.write_text(json.dumps({"schema": 1, "run": "r", "ratings": entries, **extra}))
    return path


def test_read_ratings_valid_and_errors(tmp_path):
    good = _write_ratings(tmp_path / "ok.json", [
        {"label": "L1H0", "rating": 4, "comment": "good", "time": "2024-05-01T10:00:00.000Z"},
        {"label": "L0H2", "rating": 2, "comment": "", "time": "2024-05-01T10:01:00+00:00", "rater": "ann"},
    ])
    frame = read_ratings(good)
    assert list(frame.columns) == ["label", "layer", "head", "rating", "comment", "rater", "time"]
    assert frame.set_index("label")["rating"].to_dict() == {"L1H0": 4, "L0H2": 2}
    assert frame.loc[frame.label == "L0H2", "rater"].item() == "ann"
    assert str(frame["time"].dt.tz) == "UTC"
    assert frame.attrs["run"] == "r"

    cases = [
        ([{"label": "L1H0", "rating": 6}], r"rating 6; expected an int from 1 to 5"),
        ([{"label": "L1H0", "rating": 3.5}], r"rating 3.5"),
        ([{"label": "L1H0", "rating": True}], r"rating True"),
        ([{"label": "L1H0", "rating": "4"}], r"rating '4'"),
        ([{"label": "head7", "rating": 3}], r"label 'head7'; expected a head label like 'L1H0'"),
        ([{"label": "L1H0", "rating": 3, "time": "yesterday-ish"}], r"time 'yesterday-ish'"),
        ([{"label": "L1H0", "rating": 3}, {"label": "L1H0", "rating": 4}], r"rates L1H0 a second time"),
        (["L1H0"], r"ratings\[0\] is str; expected an object"),
    ]
    for entries, message in cases:
        with pytest.raises(ValueError, match=message):
            read_ratings(_write_ratings(tmp_path / "bad.json", entries))
    with pytest.raises(ValueError, match="schema 2; expected 1"):
        read_ratings({"schema": 2, "ratings": []})
    with pytest.raises(ValueError, match="not a ratings document"):
        read_ratings({"heads": []})
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_ratings(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_ratings(tmp_path / "missing.json")
    # two raters may rate the same head
    two = read_ratings({"schema": 1, "ratings": [{"label": "L1H0", "rating": 3, "rater": "a"},
                                                 {"label": "L1H0", "rating": 5, "rater": "b"}]})
    assert sorted(two["rating"]) == [3, 5]


def test_ratings_vs_scores():
    records = make_records()
    # simulation scores: L1H0 0.8, L0H2 0.6, L1H2 0.35, L0H0 0.2; L1H1 has none
    ratings = read_ratings({"schema": 1, "run": "r", "ratings": [
        {"label": "L1H0", "rating": 5}, {"label": "L0H2", "rating": 4},
        {"label": "L1H2", "rating": 2}, {"label": "L0H0", "rating": 1},
        {"label": "L1H1", "rating": 3}, {"label": "L3H3", "rating": 3}]})
    result = ratings_vs_scores(ratings, records, scorer="simulation")
    assert result["n"] == 4
    assert result["spearman_rho"] == pytest.approx(1.0)
    assert 0.9 < result["pearson_r"] <= 1.0
    assert "L3H3" in result["message"] and "L1H1" in result["message"]
    table = result["table"].set_index("label")
    assert math.isnan(table.loc["L1H1", "score"]) and not table.loc["L3H3", "in_records"]
    assert table.loc["L1H0", "score"] == pytest.approx(0.8)

    reversed_ = ratings.assign(rating=6 - ratings["rating"])
    assert ratings_vs_scores(reversed_, records)["spearman_rho"] == pytest.approx(-1.0)

    # averaging raters: two ratings of one head count as one point
    multi = read_ratings({"schema": 1, "ratings": [
        {"label": "L1H0", "rating": 5, "rater": "a"}, {"label": "L1H0", "rating": 3, "rater": "b"},
        {"label": "L0H2", "rating": 2}, {"label": "L1H2", "rating": 1}]})
    out = ratings_vs_scores(multi, records)
    assert out["n"] == 3 and out["table"].set_index("label").loc["L1H0", "rating"] == 4.0

    few = ratings_vs_scores(ratings.iloc[:2], records)
    assert few["n"] == 2 and math.isnan(few["spearman_rho"]) and math.isnan(few["pearson_r"])
    assert "at least 3" in few["message"]
    const = ratings.assign(rating=3)
    assert "ratings are constant" in ratings_vs_scores(const, records)["message"]
    with pytest.raises(ValueError, match="scorer='detection' scored none"):
        ratings_vs_scores(ratings, records, scorer="detection")
    with pytest.raises(TypeError, match="ratings must be a DataFrame"):
        ratings_vs_scores([1, 2, 3], records)


def test_rating_widget_saves_the_page_format(tmp_path):
    records = make_records()
    save_to = tmp_path / "sub" / "ratings.json"
    widget = rating_widgets(records, save_to=save_to)
    assert isinstance(widget, RatingWidget)
    assert [r.label for r in widget.records] == ["L0H0", "L0H2", "L1H0", "L1H1", "L1H2"]
    # the hostile explanation is escaped in the widget's HTML too
    assert MALICIOUS not in widget.head_view.value and "&lt;/script&gt;" in widget.head_view.value
    assert not save_to.exists()   # nothing rated yet

    widget.select("L1H0")
    assert "Induction" in widget.head_view.value and "rgba(255,140,0,0.72)" in widget.head_view.value
    widget.buttons.value = 4          # what a click on "4" does
    widget.comment.value = "clear induction"
    widget.next_button.click()        # -> L1H1 (the failed head)
    assert widget.current.label == "L1H1" and widget.buttons.value is None
    assert "unparseable" in widget.head_view.value
    widget.rate(2)

    frame = read_ratings(save_to)
    assert frame.set_index("label")["rating"].to_dict() == {"L1H0": 4, "L1H1": 2}
    assert frame.set_index("label").loc["L1H0", "comment"] == "clear induction"
    assert frame.attrs["run"] == viewer_run_id(records)   # same run id as the page
    assert widget.ratings["L1H0"]["rating"] == 4
    assert "rated 2 / 5" in widget.status.value
    doc = json.loads(save_to.read_text())
    assert set(doc) == {"schema", "run", "ratings"}
    assert list(tmp_path.joinpath("sub").iterdir()) == [save_to]   # atomic: no temp left

    widget.buttons.value = None       # un-rating removes the entry
    assert set(read_ratings(save_to)["label"]) == {"L1H0"}

    resumed = RatingWidget(records, save_to=save_to)   # a restarted kernel picks up the file
    resumed.select("L1H0")
    assert resumed.buttons.value == 4 and resumed.comment.value == "clear induction"
    with pytest.raises(ValueError, match="rating=7"):
        resumed.rate(7)
    with pytest.raises(ValueError, match="not one of the rated heads"):
        resumed.select("L5H5")


# ----------------------------------------------------------------------------- real Chromium


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    driver = headless_chromium(tmp_path_factory.mktemp("chrome-profile"), prefs={
        "download.default_directory": str(downloads), "download.prompt_for_download": False,
        "download.directory_upgrade": True, "safebrowsing.enabled": False},
        capabilities={"goog:loggingPrefs": {"browser": "ALL"}})
    driver.set_page_load_timeout(30)
    driver.downloads = downloads
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    path = write_viewer(make_records(), tmp_path_factory.mktemp("page") / "viewer.html",
                        n_layers=2, n_heads=4, meta={"model": "toy-2l"})
    return path.resolve().as_uri()


def _open(driver, url):
    driver.get(url)
    driver.execute_script("window.localStorage.clear();")
    driver.get("about:blank")
    driver.get_log("browser")  # drop what came before this page
    driver.get(url)


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _cell(driver, label):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'button.cell[data-head="{label}"]')


def test_chromium_loads_cleanly_and_hostile_text_stays_text(browser, page_url):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    _open(browser, page_url)
    assert browser.execute_script("return typeof window.interpLibViewer.exportRatings") == "function"
    cells = browser.find_elements(By.CSS_SELECTOR, "button.cell")
    assert len(cells) == 8   # 2 layers x 4 heads, unexplained ones disabled
    assert not _cell(browser, "L0H3").is_enabled() and _cell(browser, "L1H0").is_enabled()
    _cell(browser, "L0H0").click()
    assert browser.find_element(By.ID, "detail-explanation").text == MALICIOUS
    assert browser.find_elements(By.TAG_NAME, "img") == []
    assert browser.find_elements(By.CSS_SELECTOR, "#detail-events b") == []
    tokens = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#detail-events .tok")]
    assert tokens == ["<b>", "https://evil.example/x.png", MALICIOUS]
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    assert _severe(browser) == []


def test_chromium_prototype_names_in_url_hash_select_nothing(browser, page_url):
    from selenium.webdriver.common.by import By

    def selected():
        return browser.execute_script(
            "return Array.prototype.map.call(document.querySelectorAll('button.cell.selected'),"
            " function (b) { return b.getAttribute('data-head'); });")

    for fragment in ("constructor", "__proto__", "toString", "hasOwnProperty", "%E0%A4%A"):
        _open(browser, page_url + "#" + fragment)
        assert browser.execute_script("return typeof window.interpLibViewer") == "object", fragment
        assert _severe(browser) == [], fragment
        assert selected() == [], fragment
        assert browser.find_element(By.ID, "detail-body").get_attribute("hidden") is not None
    # A real head label in the hash is still honoured.
    _open(browser, page_url + "#L1H1")
    assert selected() == ["L1H1"] and _severe(browser) == []
    # Stored ratings under prototype names are not heads: only the real one counts or exports.
    browser.execute_script(
        "localStorage.setItem('interp_lib_viewer:' + window.interpLibViewer.run, JSON.stringify("
        "{ratings: JSON.parse('{\"constructor\": {\"rating\": 2}, \"__proto__\": "
        "{\"rating\": 3}, \"L0H0\": {\"rating\": 4, \"comment\": \"\"}}')}));")
    browser.get("about:blank")
    browser.get(page_url + "#constructor")
    assert _severe(browser) == [] and selected() == []
    assert browser.find_element(By.ID, "rated-count").text == "rated 1 / 5"
    exported = json.loads(browser.execute_script("return window.interpLibViewer.exportRatings();"))
    assert [r["label"] for r in exported["ratings"]] == ["L0H0"]


def test_chromium_click_shows_head_with_attended_tokens(browser, page_url):
    from selenium.webdriver.common.by import By

    _open(browser, page_url)
    assert browser.find_element(By.ID, "detail-body").get_attribute("hidden") is not None
    _cell(browser, "L1H0").click()
    assert browser.find_element(By.ID, "detail-label").text == "L1H0"
    assert browser.find_element(By.ID, "detail-explanation").text.startswith("Induction: attends")
    assert "selected" in _cell(browser, "L1H0").get_attribute("class")
    scores = {row.get_attribute("data-scorer"): row.find_elements(By.TAG_NAME, "td")[1].text
              for row in browser.find_elements(By.CSS_SELECTOR, "#detail-scores tr[data-scorer]")}
    assert scores == {"simulation": "0.800", "contrastive": "0.700"}
    fields = browser.find_element(By.ID, "detail-fields").text
    assert "induction" in fields and "0.420" in fields and "attends 6 tokens back" in fields

    events = browser.find_elements(By.CSS_SELECTOR, "#detail-events .event")
    assert len(events) == 2
    first = events[0]
    attended = first.find_elements(By.CSS_SELECTOR, ".tok.attended")
    assert {(a.text, a.get_attribute("data-pos")) for a in attended} == {(" sat", "2"), (" cat", "1")}
    strong = next(a for a in attended if a.get_attribute("data-pos") == "2")
    assert float(strong.get_attribute("data-weight")) == pytest.approx(0.72)
    assert "attention 0.720" in strong.get_attribute("title")
    assert "0.72" in strong.value_of_css_property("background-color")
    query = first.find_element(By.CSS_SELECTOR, ".tok.query")
    assert (query.text, query.get_attribute("data-pos")) == (" cat", "8")

    _cell(browser, "L1H1").click()   # the failed head shows why it has no explanation
    assert "unparseable" in browser.find_element(By.ID, "detail-failure").text
    assert "failed" in _cell(browser, "L1H1").get_attribute("class")
    assert browser.find_element(By.ID, "detail-explanation").text == ""

    # keyboard: ArrowLeft from L1H1 -> L1H0, ArrowUp -> L0H0
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("\ue012")
    assert browser.find_element(By.ID, "detail-label").text == "L1H0"
    body.send_keys("\ue013")
    assert browser.find_element(By.ID, "detail-label").text == "L0H0"
    assert _severe(browser) == []


def test_chromium_rating_round_trips_through_export_and_reload(browser, page_url):
    from selenium.webdriver.common.by import By

    _open(browser, page_url)
    for old in browser.downloads.glob("ratings*.json"):
        old.unlink()
    _cell(browser, "L1H0").click()
    browser.find_element(By.CSS_SELECTOR, '.rate-btn[data-value="4"]').click()
    browser.find_element(By.ID, "rating-comment").send_keys("copies the next token")
    assert _cell(browser, "L1H0").text == "4"
    assert "rated 1 / 5" in browser.find_element(By.ID, "rated-count").text
    browser.find_element(By.ID, "export-btn").click()

    target = browser.downloads / "ratings.json"
    deadline = time.monotonic() + 20
    while not target.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert target.exists(), f"no download; directory holds {list(browser.downloads.iterdir())}"
    frame = read_ratings(target)
    assert frame.set_index("label")["rating"].to_dict() == {"L1H0": 4}
    assert frame.loc[0, "comment"] == "copies the next token"
    assert frame.attrs["run"] == viewer_run_id(make_records())
    assert json.loads(browser.execute_script("return window.interpLibViewer.exportRatings()")) \
        == json.loads(target.read_text())

    browser.refresh()   # localStorage keeps the rating; the URL hash keeps the selection
    assert browser.find_element(By.ID, "detail-label").text == "L1H0"
    pressed = browser.find_elements(By.CSS_SELECTOR, '.rate-btn[aria-pressed="true"]')
    assert [b.get_attribute("data-value") for b in pressed] == ["4"]
    assert browser.find_element(By.ID, "rating-comment").get_attribute("value") == "copies the next token"
    assert _cell(browser, "L1H0").text == "4"

    # the automation hook and the keyboard rate too
    browser.execute_script("window.interpLibViewer.select('L0H2')")
    browser.find_element(By.TAG_NAME, "body").send_keys("2")
    exported = json.loads(browser.execute_script("return window.interpLibViewer.exportRatings()"))
    assert {e["label"]: e["rating"] for e in exported["ratings"]} == {"L0H2": 2, "L1H0": 4}
    assert _severe(browser) == []


def test_chromium_color_toggle(browser, page_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(browser, page_url)

    def colours():
        return {label: _cell(browser, label).get_attribute("data-color")
                for label in ("L0H0", "L0H2", "L1H0", "L1H1", "L1H2")}

    family = colours()
    assert family["L1H1"] == family["L0H0"] == "#bdbdbd"          # none / unclustered: grey
    assert len({family["L1H0"], family["L0H2"], family["L1H2"]}) == 3
    assert "family 0: induction" in browser.find_element(By.ID, "legend").text

    Select(browser.find_element(By.ID, "color-by")).select_by_value("score:simulation")
    score = colours()
    assert score["L1H1"] == "missing"
    assert "missing" in _cell(browser, "L1H1").get_attribute("class")
    assert score["L1H0"] == "rgb(253,231,37)" and score["L0H0"] == "rgb(68,1,84)"  # max / min
    legend = browser.find_element(By.ID, "legend").text
    assert "0.200" in legend and "0.800" in legend and "no score" in legend

    Select(browser.find_element(By.ID, "color-by")).select_by_value("family")
    assert colours() == family
    assert _severe(browser) == []


# ----------------------------------------------------------------------------- what a reader sees

INDUCTION_TEXT = "Induction head: attends to the token after an earlier copy of the current token."


def _reader_records() -> list[HeadRecord]:
    from interp_lib.explain.records import RefinementStep

    toks = [" The", " cat", " sat", ".", " The", " cat"]
    same = Explanation(text=INDUCTION_TEXT, source="heuristic")
    return [
        HeadRecord(layer=0, head=0, explanation=same, heuristic=Explanation(text=INDUCTION_TEXT, source="heuristic"),
                   scores={"contrastive": ScoreResult("contrastive", -0.8, n=12),
                           "refined": ScoreResult("refined", -0.5, n=12, details={"scorer": "contrastive"})},
                   refinement=[RefinementStep(round=1, explanation=same, score=-0.5, previous_score=-0.8, kept=True)],
                   stats={"prev": 0.125, "mean_distance": 3.5, "causal_random": 0.0123},
                   top_events=[_event(0, 0, toks, 5, [(2, 0.8)])]),
        HeadRecord(layer=0, head=1, explanation=Explanation(text="Previous-token head: attends to the token before it."),
                   scores={"detection": ScoreResult("detection", 0.74, n=20)},
                   top_events=[_event(0, 1, toks, 3, [(2, 0.9)])]),
    ]


def test_score_verdict_uses_the_preferred_scorer_and_its_chance_level():
    contradicted, supported = (score_verdict(r) for r in _reader_records())
    # the refined held-out score judges, under the scorer refinement used (Cohen's d, chance 0)
    assert contradicted == {"scores_key": "refined", "scorer": "contrastive", "score": -0.5, "unit": "Cohen's d",
                            "chance": 0.0, "measures": SCORER_INFO["contrastive"][0], "contradicted": True}
    assert supported["scorer"] == "detection" and supported["chance"] == 0.5 and not supported["contradicted"]
    at_chance = HeadRecord(layer=1, head=0, explanation=Explanation(text="x y z"),
                           scores={"detection": ScoreResult("detection", 0.5, n=4)})
    assert score_verdict(at_chance)["contradicted"] is True
    unscored = HeadRecord(layer=1, head=1, explanation=Explanation(text="x y z"),
                          scores={"simulation": ScoreResult("simulation", None, failure="no events")})
    assert score_verdict(unscored) is None
    assert score_verdict(HeadRecord(layer=1, head=2, failure="no answer")) is None


def test_chromium_shows_the_explanation_once_with_verdict_units_and_legend(browser, tmp_path):
    from selenium.webdriver.common.by import By

    url = write_viewer(_reader_records(), tmp_path / "viewer.html", n_layers=1, n_heads=2).resolve().as_uri()
    _open(browser, url)
    _cell(browser, "L0H0").click()
    body = browser.find_element(By.ID, "detail-body").text
    assert body.count(INDUCTION_TEXT) == 1          # not again as heuristic baseline or refinement
    verdict = browser.find_element(By.ID, "detail-verdict")
    assert "contradicted" in verdict.get_attribute("class")
    assert "contradicts this explanation" in verdict.text and "contrastive" in verdict.text
    assert "Cohen's d" in verdict.text and "-0.500" in verdict.text
    fields = browser.find_element(By.ID, "detail-fields").text
    assert "attention on the previous token" in fields and "12.5%" in fields
    assert "mean query-key distance" in fields and "3.500 tokens" in fields and "0.012 nats" in fields
    assert "refinement round 1" in fields and "(the explanation above)" in fields
    units = [row.find_elements(By.TAG_NAME, "td")[2].text
             for row in browser.find_elements(By.CSS_SELECTOR, "#detail-scores tr[data-scorer]")]
    assert units == ["Cohen's d (0)", "Cohen's d (0)"]
    legend = browser.find_element(By.ID, "events-legend")
    assert legend.is_displayed() and "attends from" in legend.text and "darker = more attention" in legend.text
    assert legend.find_elements(By.CSS_SELECTOR, ".tok.query") and legend.find_elements(By.CSS_SELECTOR, ".tok.attended")

    _cell(browser, "L0H1").click()
    verdict = browser.find_element(By.ID, "detail-verdict")
    assert "contradicted" not in verdict.get_attribute("class")
    assert verdict.text.startswith("Scored by detection: 0.740 ROC AUC (chance 0.500")
    assert _severe(browser) == []


def test_chromium_neurons_and_heads_of_one_model_on_one_page(browser, tmp_path):
    """Neuron records (labels L0N17, ...) sit on the grid by their rank in their layer, after
    the heads' columns; clicking, arrow keys and the exported ratings use their labels."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    toks = [" The", " cat", " sat", " on", " the", " mat"]
    neurons = [HeadRecord(layer=layer, head=index, unit_kind="neuron",
                          explanation=Explanation(text=f"Fires on the token ' the' (neuron {index})"),
                          scores={"contrastive": ScoreResult("contrastive", 1.5, n=8)},
                          top_events=[Event(layer, index, 0, 4, 9.5, "top", toks, [], unit_kind="neuron")])
               for layer, index in ((0, 17), (0, 300), (1, 5))]
    records = make_records()[:2] + neurons
    data = viewer_data(records)
    assert data["columns"] == {"L1H0": 0, "L0H2": 2, "L0N17": 3, "L0N300": 4, "L1N5": 3}
    assert data["column_prefix"] == "#" and data["n_heads"] == 5
    path = write_viewer(records, tmp_path / "viewer.html")
    _open(browser, path.resolve().as_uri())
    _cell(browser, "L0N300").click()
    assert browser.find_element(By.ID, "detail-label").text == "L0N300"
    assert "Fires on the token" in browser.find_element(By.TAG_NAME, "body").text
    browser.find_element(By.CSS_SELECTOR, '.rate-btn[data-value="5"]').click()
    _cell(browser, "L0N300").send_keys(Keys.ARROW_LEFT)     # the column before: L0N17
    assert browser.find_element(By.ID, "detail-label").text == "L0N17"
    browser.find_element(By.TAG_NAME, "body").send_keys("3")
    exported = json.loads(browser.execute_script("return window.interpLibViewer.exportRatings()"))
    assert [(e["label"], e["rating"]) for e in exported["ratings"]] == [("L0N17", 3), ("L0N300", 5)]
    frame = read_ratings(exported)
    assert list(frame["label"]) == ["L0N17", "L0N300"] and list(frame["head"]) == [17, 300]
    assert _severe(browser) == []
