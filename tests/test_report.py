"""The HTML report: per-photo CIDEr-D, escaping of the user's data, the attention decoder's heat
maps under each caption, and the page in a real browser (headless Chromium through playwright: it
renders, thumbnails and heat maps load, sorting and filtering work, and hostile file names and
captions stay text)."""

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decoder.inference import Inputs, crop_policy
from evaluation.heatmaps import seen_picture
from evaluation.metrics import score_captions
from evaluation.report import (
    HEATMAP_SIDE,
    ReportRow,
    image_data_uri,
    per_image_cider,
    render,
    saved_scores,
    word_heatmaps,
    write_report,
)
from legende import Captioner
from store.images import open_image
from store.rundir import RunDir
from tests.helpers import TINY, run_cli

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; playwright must never download a browser
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOSTILE_NAME = "<img src=x onerror=alert(1)>.png"
HOSTILE = {
    "name": '"><svg onload=alert(2)>',
    "caption": "</script><script>alert(3)</script> a dog",
    "references": ["<!-- a cat <script>alert(4)</script>", "a dog on <b>grass</b>"],
    "error": "</td></tr><img src=x onerror=alert(5)>",
}


def hostile_rows(photo: Path) -> list[ReportRow]:
    return [
        ReportRow(HOSTILE["name"], photo, HOSTILE["caption"], references=HOSTILE["references"], cider=0.25),
        ReportRow(HOSTILE_NAME, None, error=HOSTILE["error"], references=["a dog"], cider=None),
        ReportRow("plain.png", photo, "a dog runs", references=["a dog runs"], cider=1.5),
    ]


def hostile_page(photo: Path) -> str:
    return render(
        hostile_rows(photo),
        title=HOSTILE["caption"],
        details={"run": HOSTILE_NAME},
        scores=[(HOSTILE["name"], {"CIDEr-D": 0.5})],
        notes=[HOSTILE["error"]],
        plots=[],
    )


def test_per_image_cider_is_pycocoevalcaps_and_its_mean_the_corpus_score():
    from pycocoevalcap.cider.cider import Cider

    refs = [["a red circle above a blue square", "a red circle and a blue square"], ["a green triangle"], ["a cat"]]
    hyps = ["a red circle above a square", "a green triangle", ""]
    scores = per_image_cider(refs, hyps)
    ids = [str(i) for i in range(len(refs))]
    corpus, _ = score_captions(dict(zip(ids, refs, strict=True)), dict(zip(ids, hyps, strict=True)), use_java=False)
    assert sum(scores) / len(scores) == pytest.approx(corpus["CIDEr-D"], abs=1e-9)
    gts = dict(zip(ids, refs, strict=True))
    res = {i: [h or "<unk>"] for i, h in zip(ids, hyps, strict=True)}
    assert scores == pytest.approx(list(Cider().compute_score(gts, res)[1]), abs=1e-6)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attributes = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [name for name, _ in attrs]


def test_user_data_is_text_in_the_page(tmp_path):
    """The page's tags are the page's own whatever the data holds: one script, no svg, no handler."""
    photo = tmp_path / "p.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(photo)
    page = hostile_page(photo)
    parsed = _Tags()
    parsed.feed(page)
    assert parsed.tags.count("script") == 1 and "svg" not in parsed.tags and "b" not in parsed.tags
    assert not [a for a in parsed.attributes if a.startswith("on")]
    assert page.count("<img") == 2  # the two thumbnails
    assert "&lt;/script&gt;&lt;script&gt;alert(3)" in page and "&lt;!-- a cat" in page


def test_a_row_with_attention_shows_a_heat_map_per_word(tmp_path):
    heat = image_data_uri(Image.new("L", (8, 8), 128))
    row = ReportRow("p.png", None, "a dog", attention=[("a", heat), ("<dog>", heat)])
    page = render([row], title="t", details={}, scores=[], notes=[], plots=[])
    assert page.count('<div class="attention">') == 1 and page.count(f'<img class="heat" src="{heat}"') == 2
    assert page.index('alt="a"') < page.index('alt="&lt;dog&gt;"') and "<figcaption>&lt;dog&gt;</figcaption>" in page


def _decode(uri: str) -> np.ndarray:
    import base64
    import io

    assert uri.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("L"), dtype=np.float32)


def test_a_words_heat_map_is_bright_where_it_looked():
    """Over a grey picture, each word's map is brightest on the region its weights favour: the
    weights are the 2x2 regions' (row-major), each map scaled to its own maximum."""
    picture = Image.new("RGB", (300, 300), (128, 128, 128))
    weights = [[0.97, 0.01, 0.01, 0.01], [0.0, 0.0, 0.1, 0.9]]
    [(w1, top_left), (w2, bottom_right)] = word_heatmaps(picture, ["a", "dog"], weights)
    assert (w1, w2) == ("a", "dog")
    first, second = _decode(top_left), _decode(bottom_right)
    assert first.shape == second.shape == (HEATMAP_SIDE, HEATMAP_SIDE)
    half = HEATMAP_SIDE // 2
    quarters = [(slice(0, half), slice(0, half)), (slice(0, half), slice(half, None))]
    quarters += [(slice(half, None), slice(0, half)), (slice(half, None), slice(half, None))]
    assert int(np.argmax([first[q].mean() for q in quarters])) == 0
    assert int(np.argmax([second[q].mean() for q in quarters])) == 3
    assert second[quarters[3]].mean() > second[quarters[0]].mean() + 60  # bright against dark, not a tint


def test_a_caption_page_shows_the_evaluations_the_run_keeps(tmp_path):
    run = RunDir(tmp_path / "run")
    run.eval.mkdir(parents=True)
    result = {"split": "val", "checkpoint": "x/best.pt", "epoch": 3, "beam": 2, "alpha": 0.0, "tta": False}
    run.eval_json("val").write_text(json.dumps({**result, "rerank": 4, "candidates": 5, "scores": {"CIDEr-D": 0.5}}))
    (run.eval / "notes.json").write_text("[1, 2]")  # not an evaluation: left out
    [(label, scores)] = saved_scores(run)
    assert scores == {"CIDEr-D": 0.5}
    assert label == "val split, best.pt (epoch 3), beam 2, alpha 0.0, centre crop, re-ranked among 5 by 4 neighbours"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra: make install")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_report(browser, path: Path):
    """The page at `path`, and the lists its dialogs, script errors and console errors land in
    (a script or handler the Content-Security-Policy blocked would be a console error)."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    events = {"dialogs": [], "errors": [], "console": []}
    page.on("dialog", lambda d: (events["dialogs"].append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: events["errors"].append(str(e)))
    page.on("console", lambda m: m.type == "error" and events["console"].append(m.text))
    page.goto(path.as_uri())
    return page, events


def check_safe_and_loaded(page, events, rows: int) -> None:
    """Rendered, every thumbnail and heat map decoded, nothing run or injected."""
    assert page.title().startswith("légende: ")
    assert page.locator("#photos tbody tr").count() == rows
    assert page.inner_text("#count") == f"{rows} of {rows} photos"  # the page's script ran
    widths = page.eval_on_selector_all("img.thumb, img.heat", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert widths and all(w > 0 for w in widths)
    assert page.locator("script").count() == 1
    assert page.locator("svg, b, img:not(.thumb):not(.plot):not(.heat)").count() == 0
    handlers = "[...document.querySelectorAll('*')].flatMap(e => [...e.attributes].map(a => a.name))"
    assert not [a for a in page.evaluate(handlers) if a.startswith("on")]
    assert events == {"dialogs": [], "errors": [], "console": []}


def visible(page, cell: str) -> list[str]:
    return page.eval_on_selector_all(f"#photos tbody tr:not([hidden]) {cell}", "cells => cells.map(c => c.textContent)")


def test_the_report_in_a_browser(browser, trained, featurized, tmp_path, monkeypatch):
    """A real tiny run's pages (evaluate and caption), and one of hostile data, in headless Chromium.

    The evaluation runs without Java: it would add METEOR and ~8 s of JVM start-ups, nothing to the page."""
    monkeypatch.setattr("evaluation.metrics.java_available", lambda: False)
    result = Captioner.load(trained).evaluate("val", report=True, write=False)
    page, events = open_report(browser, result["report"])
    check_safe_and_loaded(page, events, result["images"])
    assert page.locator("img.plot").count() == 2  # the run's batch and epoch loss plots
    scores = [float(s) for s in visible(page, "td.cider")]
    assert scores == sorted(scores)  # worst first
    page.select_option("#sort", "best")
    assert [float(s) for s in visible(page, "td.cider")] == sorted(scores, reverse=True)
    page.select_option("#sort", "name")
    names = visible(page, "td.name")
    assert names == sorted(names)
    page.fill("#filter", names[2])
    assert visible(page, "td.name") == [names[2]] and page.inner_text("#count") == f"1 of {len(names)} photos"
    page.fill("#filter", "circle")
    shown = page.eval_on_selector_all("#photos tbody tr:not([hidden])", "rows => rows.map(r => r.textContent)")
    assert 0 < len(shown) < len(names) and all("circle" in text.lower() for text in shown)
    page.fill("#filter", "")
    assert len(visible(page, "td.name")) == len(names)
    page.screenshot(path=tmp_path / "evaluate-report.png", full_page=True)

    photos = tmp_path / "photos"
    photos.mkdir()
    images = sorted((featurized.parent / "synth" / "images").glob("*.png"))
    shutil.copy(images[0], photos / HOSTILE_NAME)
    shutil.copy(images[1], photos / "b.png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    run_cli("caption", photos, "--run", trained, "--report", tmp_path / "photos.html", "--workers", 0)
    page, events = open_report(browser, tmp_path / "photos.html")
    check_safe_and_loaded(page, events, 3)
    assert page.locator("text=cannot decode").count() == 1
    assert visible(page, "td.name") == sorted([HOSTILE_NAME, "b.png", "broken.jpg"])
    page.screenshot(path=tmp_path / "caption-report.png", full_page=True)

    page, events = open_report(browser, write_report(tmp_path / "hostile.html", hostile_page(images[0])))
    check_safe_and_loaded(page, events, 3)
    assert visible(page, "td.name") == [HOSTILE["name"], "plain.png", HOSTILE_NAME]  # no score: last
    assert visible(page, "td.caption") == [HOSTILE["caption"], "a dog runs", HOSTILE["error"]]
    assert visible(page, "td.references li")[:2] == HOSTILE["references"]
    assert page.title() == "légende: " + HOSTILE["caption"]


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory) -> Path:
    """A tiny attention decoder trained for 1 epoch on 12 synthetic scenes, whose store keeps the
    centre crop's 3x3 feature map (crops of 139 px): RUNDIR."""
    root = tmp_path_factory.mktemp("attention")
    run_cli("synth", root / "synth", "--n", 12, "--seed", 2, "--size", 120)
    run_cli("prepare", root / "synth", "--out", root / "work", "--min-word-count", 1)
    run_cli(
        "featurize", root / "work", "--weights", "none", "--workers", 0, "--resize", 150, "--crop-size", 139,
        "--maps", "centre", "--precision", "fp32",
    )  # fmt: skip
    run_cli("train", root / "work", "--run", root / "run", "--epochs", 1, "--decoder", "attention", *TINY)
    return root / "run"


def test_a_caption_page_shows_where_each_word_looked(browser, attention_run, tmp_path):
    """`caption --report --attention`: under each caption, one heat map per word, in the caption's
    order, each drawn from that photo's own weights; a photo that could not be read has none."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in sorted((attention_run.parent / "synth" / "images").glob("*.png"))[:2]:
        shutil.copy(image, photos / image.name)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    cap = Captioner.load(attention_run, workers=0)
    results = cap.caption_folder(photos, report=tmp_path / "photos.html", attention=tmp_path / "heat")
    by_name = {Path(r.image).name: r for r in results}
    assert by_name["broken.jpg"].error.startswith("cannot decode") and sum(r.error is None for r in results) == 2
    policy, full_view = crop_policy(cap.loaded.state), Inputs.of(cap.loaded.state).full_view
    expected = {  # drawn over what the CNN saw of each photo: its centre crop
        Path(r.image).name: word_heatmaps(
            seen_picture(open_image(Path(r.image)), policy, full_view), r.caption.split(), r.attention
        )
        for r in results
        if r.error is None
    }
    assert all(len(strip) == len(by_name[name].caption.split()) > 0 for name, strip in expected.items())

    page, events = open_report(browser, tmp_path / "photos.html")
    check_safe_and_loaded(page, events, 3)
    shown = page.eval_on_selector_all(
        "#photos tbody tr",
        "rows => rows.map(r => [r.querySelector('.name').textContent,"
        " [...r.querySelectorAll('img.heat')].map(i => [i.alt, i.getAttribute('src'), i.naturalWidth])])",
    )
    assert {name: [(alt, src) for alt, src, _ in heat] for name, heat in shown} == {"broken.jpg": [], **expected}
    assert all(0 < width <= HEATMAP_SIDE for _, heat in shown for _, _, width in heat)
    page.screenshot(path=tmp_path / "attention-report.png", full_page=True)
