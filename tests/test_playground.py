"""The playground at GET / on the HTTP port, in a real headless browser (Debian's chromium
driven by Playwright): an image and a question give an answer that arrives in pieces, then
usage; Cancel stops a long answer and the server ends its generation. And the bundled
script is what `make web` builds from the client's sources now."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import factory
import pytest
from conftest import ROOT, make_engine
from harness import RunningServer, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ESBUILD = ROOT / "clients/ts/node_modules/.bin/esbuild"


@pytest.mark.skipif(not ESBUILD.exists(), reason="clients/ts/node_modules (npm ci) is needed")
def test_the_bundled_script_is_current(tmp_path: Path) -> None:
    flags = next(line for line in (ROOT / "Makefile").read_text().splitlines()
                 if line.startswith("ESBUILD_FLAGS :=")).split(":=", 1)[1].split()
    out = tmp_path / "playground.js"
    subprocess.run([str(ESBUILD), *flags, "clients/ts/playground/main.ts", f"--outfile={out}"],
                   cwd=ROOT, check=True, timeout=60)
    assert out.read_bytes() == (ROOT / "service/static/playground.js").read_bytes(), (
        "service/static/playground.js is stale: run `make web`")


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("no chromium (Debian's `chromium` package): .ci/run installs it")
    with playwright.sync_playwright() as p:
        # --no-sandbox: the suite may run as root, where Chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def test_the_playground_streams_an_answer_about_an_image_and_cancels(tiny, browser,
                                                                     tmp_path) -> None:
    port = free_port()
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(factory.encode(factory.photo(1000, 500), "JPEG"))
    engine = make_engine(tiny)
    try:
        with RunningServer(engine, http_port=port) as srv:
            page = browser.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#model:not(:empty)")
            assert page.text_content("#model").startswith("Model: ")
            page.set_input_files("#media", str(photo))
            page.wait_for_selector("#preview img")
            page.fill("#prompt", "Describe the image.")
            page.fill("#maxNewTokens", "48")
            page.fill("#maxTiles", "2")
            page.check("#ignoreEos")
            # pieces counted while streaming, before the usage line appears
            page.evaluate("""() => { window.seen = [];
                new MutationObserver(() => window.seen.push([
                    document.getElementById('output').dataset.pieces,
                    document.getElementById('stats').textContent]))
                .observe(document.getElementById('output'), {childList: true,
                         characterData: true, subtree: true}); }""")
            page.click("#send")
            page.wait_for_selector("#output[data-state=done]", timeout=60_000)
            seen = page.evaluate("window.seen")
            streaming = [p for p, stats in seen if stats == ""]
            assert len(set(streaming)) > 1, seen  # the text grew while usage was not there
            assert int(page.get_attribute("#output", "data-pieces")) > 1
            stats = page.text_content("#stats")
            assert stats.startswith("length · ") and "(3 tiles" in stats
            assert " 48 generated · " in stats
            assert page.text_content("#output")
            # a long answer, cancelled from the page: the server ends the generation
            cancelled = srv.app.metrics.requests.labels("StreamChat", "CANCELLED", "default")
            before = cancelled._value.get()
            page.fill("#maxNewTokens", "4000")
            page.click("#send")
            end = time.monotonic() + 30  # polled from here: the page's CSP forbids eval
            while int(page.get_attribute("#output", "data-pieces")) < 3:
                assert time.monotonic() < end, page.text_content("#error")
                time.sleep(0.02)
            page.click("#cancel")
            page.wait_for_selector("#output[data-state=cancelled]", timeout=10_000)
            assert page.text_content("#error") == "cancelled"
            end = time.monotonic() + 10
            while (srv.app.servicer.active or cancelled._value.get() == before) and \
                    time.monotonic() < end:
                time.sleep(0.05)
            assert srv.app.servicer.active == 0 and cancelled._value.get() == before + 1
            assert engine.stats()["in_flight"] == 0
            assert problems == []  # no script error, no CSP violation
            page.close()
    finally:
        engine.drain(0)
