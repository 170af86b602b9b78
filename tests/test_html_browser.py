"""The HTML report in a real browser: headless Chromium loads it offline without a console message
and draws a page that is not blank, in the light and the dark scheme.

Skipped only when no Chromium is installed (``apt-get install chromium``); CI installs it and sets
BNCHECK_REQUIRE_BROWSER=1, which turns the skip into a failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from bncheck.render import OutputFormat, RenderOptions, renderer_for

from test_render_golden import forward_ordered_report, inspection, recalibration
from test_render_html import many_layers

HTML = renderer_for(OutputFormat.HTML)(RenderOptions())
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Offline and quiet: no network services, no first-run or sync traffic.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0")


@pytest.fixture(scope="module")
def chromium() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found is None:
        message = "chromium is not installed (apt-get install chromium): the HTML report's browser test needs it"
        if os.environ.get("BNCHECK_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def screenshot(chromium: str, page, tmp_path, *, dark: bool = False, size: str = "1280,2000"):
    """Load ``page`` from a file; return the PNG's pixels and the browser's console messages."""
    from PIL import Image

    html = tmp_path / "report.html"
    html.write_text(page, encoding="utf-8")
    png = tmp_path / "shot.png"
    scheme = ["--blink-settings=preferredColorScheme=0"] if dark else []  # 0 is dark, 1 light
    done = subprocess.run([chromium, *FLAGS, *scheme, f"--user-data-dir={tmp_path / 'profile'}",
                           f"--screenshot={png}", f"--window-size={size}", html.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and png.exists(), done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    with Image.open(png) as image:
        return image.convert("RGB"), console


def colours(image) -> set[tuple[int, int, int]]:
    return {colour for _, colour in image.getcolors(maxcolors=1 << 24)}


PAGES = {
    "diagnosis": lambda: HTML.diagnosis(forward_ordered_report()),
    "300-layers": lambda: HTML.diagnosis(many_layers()),
    "inspection": lambda: HTML.inspection(inspection()),
    "recalibration": lambda: HTML.recalibration(recalibration()),
}


@pytest.mark.parametrize("name", sorted(PAGES))
def test_page_loads_without_console_messages_and_is_drawn(chromium, tmp_path, name):
    image, console = screenshot(chromium, PAGES[name](), tmp_path)
    assert console == []
    seen = colours(image)
    assert len(seen) > 100, f"{len(seen)} colours: the page looks blank"
    assert (255, 255, 255) in seen  # the light background
    if name in ("diagnosis", "300-layers"):
        assert (0xFB, 0xE7, 0xE5) in seen  # the fail panel
        assert (0xCC, 0x3A, 0x2F) in seen  # red: the FAIL heading and the bars over the threshold


def test_dark_scheme_is_followed(chromium, tmp_path):
    image, console = screenshot(chromium, PAGES["diagnosis"](), tmp_path, dark=True)
    assert console == []
    assert image.getpixel((5, 5)) == (0x14, 0x18, 0x1D)  # the dark background
    assert len(colours(image)) > 100


def test_an_external_load_would_be_blocked_and_reported(chromium, tmp_path):
    """The check above can fail: a fetch the page's policy blocks shows up on the console."""
    page = PAGES["diagnosis"]().replace("</main>", '<img src="https://example.invalid/pixel.png" alt=""></main>')
    _, console = screenshot(chromium, page, tmp_path, size="800,600")
    assert any("Content Security Policy" in line for line in console), console
