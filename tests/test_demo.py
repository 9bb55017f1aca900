"""neverfade demo: the page in headless Chromium (Debian's chromium driven by Playwright), and bad requests.

Screenshots go to artifacts/demo/ (git-ignored)."""

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import neverfade
from neverfade.demo.server import DemoApp, make_server
from neverfade.methods import BASELINE, METHODS
from neverfade.scenes import make_scene

# The test extra brings Playwright; a GPU machine running only `-m gpu` may lack it, and must still collect this file.
sync_playwright = pytest.importorskip(
    "playwright.sync_api", reason="Playwright comes with the test extra"
).sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "demo"
TOKENS = 60


@pytest.fixture(scope="module")
def server():
    app = DemoApp(neverfade.load(None, device="cpu"), max_new_tokens=TOKENS, samples=4)
    httpd = make_server(app, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server)
    page.wait_for_selector("#methods input")
    yield page
    page.close()


def post(url, body=b"", content_type="application/octet-stream"):
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def events(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.decode().splitlines()]


def overlay_pixels(page, pane) -> int:
    """Non-transparent pixels of the pane's heatmap overlay (the image is on a canvas of its own, below)."""
    return page.evaluate(
        """(pane) => {
        const c = pane.querySelector('canvas.heat-overlay');
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
        return n;
    }""",
        pane,
    )


def test_upload_run_captions_and_heatmap(page, server, tmp_path):
    scene = tmp_path / "scene.png"
    make_scene(2).image.save(scene)
    page.set_input_files("#file", str(scene))
    page.uncheck("#methods input[value=baseline]")
    for name in ("baseline", "sparc", "locore"):
        page.check(f"#methods input[value={name}]")
    page.click("#run")
    page.wait_for_selector("#panes .pane.running")  # panes appear while the captions stream
    page.wait_for_function("document.querySelectorAll('#panes .pane.done').length === 3", timeout=120_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "upload_three_methods.png"), full_page=True)

    panes = page.query_selector_all("#panes .pane")
    assert [p.query_selector("h3 .label").inner_text() for p in panes] == ["baseline", "locore", "sparc"]
    for pane in panes:
        assert len(pane.query_selector(".caption").inner_text().split()) > 5
    # the uploaded scene's ground truth is unknown to the server: object words are marked, not judged
    assert page.query_selector_all("#panes .obj.unknown")
    assert not page.query_selector_all("#panes .obj.present, #panes .obj.hallucinated")

    # the same request again, straight to the server: the heatmap shows every cell SPARC selected
    with scene.open("rb") as f:
        status, body = post(f"{server}/api/caption?methods=sparc", f.read())
    assert status == 200
    [done] = [e for e in events(body) if e["event"] == "done"]
    heat = done["heatmap"]
    assert (heat["rows"], heat["cols"]) == (12, 12)
    selected_cells = sum(1 for n in heat["counts"] if n > 0)
    assert selected_cells > 0
    sparc = panes[2]
    assert done["caption"] == sparc.query_selector(".caption").inner_text()
    assert overlay_pixels(page, sparc) == selected_cells * (288 // 12) ** 2
    assert not panes[0].query_selector("canvas"), "only SPARC panes have a heatmap"

    word = next(i for i, w in enumerate(done["words"]) if w["cells"])  # hover a word SPARC selected tokens for
    sparc.query_selector(f".caption .w[data-word='{word}']").hover()
    assert overlay_pixels(page, sparc) == len(done["words"][word]["cells"]) * (288 // 12) ** 2
    assert "While writing" in sparc.query_selector(".heat-caption").inner_text()
    page.screenshot(path=str(ARTIFACTS / "hover_word.png"), full_page=True)


def test_sample_scene_marks_objects_right_and_wrong(page):
    page.click("#samples img[data-id='scene-00001']")
    page.click("#run")  # baseline and sparc are checked by default
    page.wait_for_function("document.querySelectorAll('#panes .pane.done').length === 2", timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "sample_scene.png"), full_page=True)
    objects = set(make_scene(1).kinds)
    marked = page.query_selector_all("#panes .obj")
    assert marked
    for span in marked:
        kind = span.get_attribute("title").split(":")[0]
        assert ("present" in span.get_attribute("class")) == (kind in objects)
    for missed in page.query_selector_all(".missed"):
        assert missed.inner_text().startswith("Missed:")


@pytest.mark.parametrize(
    "choose, expected",
    [
        (None, "no image: upload an image file or pick a sample"),
        ("text", "the file is not an image (PNG, JPEG, GIF, BMP or WebP expected)"),
        ("huge", "the file is 50.0 MB; the limit is 20 MB"),
    ],
)
def test_bad_uploads_show_a_clear_message_on_the_page(page, tmp_path, choose, expected):
    if choose == "text":
        path = tmp_path / "notes.png"
        path.write_text("these are notes, not pixels")
        page.set_input_files("#file", str(path))
    elif choose == "huge":
        path = tmp_path / "huge.png"
        path.write_bytes(b"\0" * (50 * 1024 * 1024))
        page.set_input_files("#file", str(path))
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == expected
    assert not page.query_selector_all("#panes .pane")
    if choose == "huge":
        page.screenshot(path=str(ARTIFACTS / "error_too_large.png"))


def test_bad_requests_get_a_clear_message_and_status(server):
    def check(url, body, status, message):
        got_status, got = post(url, body)
        assert (got_status, json.loads(got)) == (status, {"error": message})

    known = ", ".join([BASELINE, *METHODS])
    check(f"{server}/api/caption?methods=baseline", b"", 400, "no image: upload an image file or pick a sample")
    check(
        f"{server}/api/caption?methods=baseline",
        b"x" * (50 * 1024 * 1024),
        413,
        "the file is 50.0 MB; the limit is 20 MB",
    )
    check(
        f"{server}/api/caption?methods=baseline",
        b"%PDF-1.4 not an image",
        415,
        "the file is not an image (PNG, JPEG, GIF, BMP or WebP expected)",
    )
    check(
        f"{server}/api/caption?methods=baseline,telepathy&sample=scene-00000",
        b"",
        400,
        f"unknown method 'telepathy'; known: {known}",
    )
    check(f"{server}/api/caption?methods=&sample=scene-00000", b"", 400, "choose at least one method")
    check(
        f"{server}/api/caption?methods=baseline&sample=scene-99999",
        b"",
        404,
        "no sample named 'scene-99999'; pick one of the samples shown",
    )
    check(f"{server}/api/nothing", b"", 404, "not found: /api/nothing")


def test_serves_only_on_loopback(server):
    assert server.startswith("http://127.0.0.1:")


def test_methods_with_their_own_decoding_loop_stream_too(server):
    """VCD and SGRS run their own loops (generate(custom_generate=...)): their captions still arrive word by word,
    and the words add up to the caption. OPERA, a beam search, sends its caption whole."""
    status, body = post(f"{server}/api/caption?methods=vcd,sgrs,opera&sample=scene-00003")
    assert status == 200
    stream = events(body)
    assert stream[-1] == {"event": "end"} and not [e for e in stream if e["event"] == "error"]
    for run, label in enumerate(["vcd", "sgrs", "opera"]):
        chunks = [e["text"] for e in stream if e["event"] == "text" and e["run"] == run]
        [done] = [e for e in stream if e["event"] == "done" and e["run"] == run]
        assert done["caption"]
        if label == "opera":
            assert chunks == []
        else:
            assert len(chunks) > 10 and "".join(chunks).strip() == done["caption"]
            first_text = next(i for i, e in enumerate(stream) if e["event"] == "text" and e["run"] == run)
            assert first_text < stream.index(done), "text streams before the caption is done"
