"""Headless Chromium for the page tests: Debian's ``chromium`` driven by Playwright (no browser download).

``open_page(path)`` opens a self-contained HTML file from disk and collects every console error and
page error, so a test can assert that a page loads cleanly, click in it and read its data back.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def open_page(path: Path, width: int = 1400, height: int = 900):
    """Yield (page, errors): ``path`` loaded in headless Chromium; ``errors`` collects console and page errors."""
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        raise RuntimeError("the page tests need Debian's chromium: run `bash setup.sh`")
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required", "--mute-audio"],
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(Path(path).resolve().as_uri())
            page.wait_for_load_state("load")
            yield page, errors
        finally:
            browser.close()


def screenshot(page_path: Path, out: Path, click_token: int | None = None, width: int = 1400) -> Path:
    """A full-page PNG (256 colours) of a page, once its data is decoded; on an explorer page, token
    ``click_token`` selected first."""
    with open_page(page_path, width=width) as (page, errors):
        page.wait_for_function("!window.explorer || window.explorer.ready", timeout=60_000)
        if click_token is not None:
            page.click(f'#transcript .tok[data-token="{click_token}"]')
        page.screenshot(path=str(out), full_page=True)
        if errors:
            raise RuntimeError(f"the page logged errors: {errors}")
    from PIL import Image

    Image.open(out).convert("RGB").quantize(256).save(out, optimize=True)  # a palette PNG: a third of the size
    return out


if __name__ == "__main__":  # python -m tests.browser PAGE.html OUT.png [TOKEN]
    import sys

    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None))
