"""The page in a real browser: headless Chromium (Debian's package `chromium`; .ci/run installs it) driven by
Playwright. Upload a real sample and read the label, the measurements and a non-blank overlay; switch views and
move the threshold; a bad file's message, then a good upload that still works; drag a box and get a mask.
Screenshots of every state go to private/app_screenshots/ (git-ignored: they hold BUSI pixels)."""
from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from conftest import ROOT

import app

sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed "
                                                              "(requirements-dev.txt)")

SHOTS = ROOT / "private" / "app_screenshots"
CHECKPOINT = ROOT / "checkpoints" / "busi_unet_resnet18.safetensors"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    """$CHROMIUM, else Debian's chromium on the PATH or in /usr/bin."""
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found ($CHROMIUM, chromium on the PATH, "
                                                          "/usr/bin/chromium): apt-get install chromium")


@pytest.fixture(scope="module")
def server_url():
    cfg = app.default_settings(port=0, checkpoint=str(CHECKPOINT), max_files=3)
    with app.running(cfg) as (url, _server):
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")),
                                                   executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                   viewport={"width": 1280, "height": 1000})
        yield ctx
        ctx.close()


@pytest.fixture()
def page(browser, server_url):
    """The page, loaded; page.outside lists every request that went anywhere but this server."""
    page = browser.new_page()
    page.set_default_timeout(180_000)
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((server_url, "data:", "blob:")) else outside.append(r.url))
    page.goto(server_url)
    page.wait_for_selector("body[data-ready='1']")
    yield page, outside
    assert outside == [], f"the page asked for something outside this server: {outside}"
    page.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True)


def image_spread(page, card: int) -> float:
    """Standard deviation of the grey values of the shown result picture (0 for a blank picture)."""
    return page.evaluate("""(i) => {
        const img = document.querySelectorAll('article.card')[i].querySelector('img.scan');
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data; let s = 0, s2 = 0, n = d.length / 4;
        for (let k = 0; k < d.length; k += 4) { const v = (d[k] + d[k + 1] + d[k + 2]) / 3; s += v; s2 += v * v; }
        return Math.sqrt(s2 / n - (s / n) ** 2); }""", card)


def card_text(page, card: int, selector: str) -> str:
    return page.locator("article.card").nth(card).locator(selector).first.inner_text()


def wait_status(page, card: int, status: str) -> None:
    page.wait_for_function("([i, s]) => { const c = document.querySelectorAll('article.card')[i];"
                           " return c && c.querySelector('.status').textContent === s; }", arg=[card, status])


def test_upload_a_real_sample_read_the_result_switch_views_and_threshold(page):
    page, _ = page
    sample = ROOT / "samples" / "malignant (32).png"
    page.set_input_files("#files", str(sample))
    wait_status(page, 0, "done")
    assert card_text(page, 0, ".label").strip().lower().startswith(("benign", "malignant", "normal"))
    lesion = card_text(page, 0, ".lesions li")
    assert lesion.startswith("#1") and " px" in lesion and ("oval" in lesion or "round" in lesion
                                                            or "irregular" in lesion)
    assert "malignancy probability" in card_text(page, 0, "table.facts")
    assert "uncertainty" in card_text(page, 0, "table.facts")
    assert image_spread(page, 0) > 10
    shot(page, "01_result_outline.png")
    views = {}
    for view in ("filled", "uncertainty", "outline"):
        page.check(f"input[name=view][value={view}]")
        views[view] = page.locator("img.scan").first.get_attribute("src")
        assert image_spread(page, 0) > 10
        if view != "outline":
            shot(page, f"02_view_{view}.png")
    assert len(set(views.values())) == 3
    page.locator("#threshold").fill("0.2")
    page.wait_for_function("() => document.querySelector('table.facts').textContent.includes(', 0.20')")
    assert page.locator("#thr-out").inner_text() == "0.20"
    shot(page, "03_threshold_0.20.png")


def test_bad_files_get_a_message_and_a_good_upload_still_works(page):
    page, _ = page
    sample = ROOT / "samples" / "benign (10).png"
    good = {"name": sample.name, "mimeType": "image/png", "buffer": sample.read_bytes()}
    page.set_input_files("#files", [{"name": "notes.png", "mimeType": "image/png", "buffer": b"not a scan\n"},
                                    {"name": "empty.png", "mimeType": "image/png", "buffer": b""},
                                    good, good])  # the 4th is over max_files (3 here)
    wait_status(page, 2, "done")
    assert "notes.png: not an image file" in card_text(page, 0, ".message")
    assert "empty.png: empty file (0 bytes)" in card_text(page, 1, ".message")
    assert "at most 3 files at once" in card_text(page, 3, ".message")
    assert image_spread(page, 2) > 10
    page.set_input_files("#files", str(sample))
    wait_status(page, 4, "done")
    shot(page, "04_bad_files_then_good.png")


def drop_file(page, path: Path) -> None:
    """Drop a file on the drop zone as a user's drag and drop does (a DataTransfer with a File)."""
    page.evaluate("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
        const dt = new DataTransfer(); dt.items.add(new File([bytes], name, { type: 'image/png' }));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true }));
    }""", [path.name, base64.b64encode(path.read_bytes()).decode()])


def test_drag_a_box_and_a_mask_appears(page):
    page, _ = page
    drop_file(page, ROOT / "samples" / "benign (1).png")
    wait_status(page, 0, "done")
    r0, c0, r1, c1 = page.evaluate("state.cards[0].result.lesions[0].bbox_row_col")
    width = page.evaluate("state.cards[0].result.width")
    img = page.locator("img.scan").first.bounding_box()
    k = img["width"] / width
    x0, y0 = img["x"] + (c0 - 12) * k, img["y"] + (r0 - 12) * k
    x1, y1 = img["x"] + (c1 + 12) * k, img["y"] + (r1 + 12) * k
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=4)
    page.mouse.move(x1, y1, steps=4)
    page.mouse.up()
    wait_status(page, 0, "box prompt")
    assert "LiteMedSAM box prompt" in card_text(page, 0, "table.facts")
    assert card_text(page, 0, ".lesions li").startswith("#1")
    area = page.evaluate("state.cards[0].result.lesion_area_px")
    assert area > 300 and image_spread(page, 0) > 10
    shot(page, "05_box_prompt.png")
    page.click("button.unbox")
    wait_status(page, 0, "done")
    assert "network" in card_text(page, 0, "table.facts")
