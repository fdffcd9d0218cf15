"""Open a page in headless Chromium (Debian's chromium, driven by Playwright)."""

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def page_report(path) -> dict:
    """Load ``path`` and report its images (loaded or not), console errors, text and links."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium for this test")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    errors = []
    with sync_playwright() as p:            # Playwright gives each launch a fresh, empty profile
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"file://{os.path.abspath(path)}", wait_until="load", timeout=30000)
            images = page.evaluate("""Array.from(document.images).map(i => ({
                alt: i.alt, loaded: i.complete && i.naturalWidth > 0}))""")
            text = page.evaluate("document.body.innerText")
            links = page.evaluate("Array.from(document.links).map(a => ({href: a.href, text: a.textContent}))")
        finally:
            browser.close()
    return {"images": images, "errors": errors, "text": text, "links": links}
