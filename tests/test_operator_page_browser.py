"""The operator page in a real headless browser: Debian's chromium (``/usr/bin/chromium``) driven by Playwright,
nothing downloaded at run time. Skips, saying why, where the browser or Playwright is missing.

``REVERIE_SCREENSHOT=path`` keeps the phone-sized screenshot there (``bench/results/operator_page.png`` is one).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from bot.server import http_server
from storage import Store
from tests.operator_fixtures import ADMIN_TOKEN, runtime_with_history

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (Debian: apt-get install chromium)"
)


async def test_the_page_loads_in_a_browser_and_rollback_needs_the_token(sqlite_store: Store, tmp_path: Path) -> None:
    playwright_api = pytest.importorskip("playwright.async_api", reason="the playwright package is not installed")
    runtime = await runtime_with_history(sqlite_store, tmp_path)
    url = f"http://127.0.0.1:{runtime.settings.http_port}/"
    screenshot = Path(os.environ.get("REVERIE_SCREENSHOT") or tmp_path / "operator_page.png")
    async with http_server(runtime, asyncio.Event()), playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            # A phone: 390 px wide, touch, high density.
            context = await browser.new_context(
                viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
            )
            page = await context.new_page()
            await page.goto(url)
            assert await page.title() == "Reverie — operator"
            assert await page.locator("#versions tr").count() == 1 + 3
            assert await page.locator("svg.chart").count() == 2
            assert await page.locator("svg.chart circle").count() == 4
            assert (await page.locator("#serving").inner_text()) == "v3"
            # Nothing sticks out sideways on a phone but the tables' own scrolling boxes.
            assert await page.evaluate("document.documentElement.scrollWidth") <= 390
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(screenshot), full_page=True)

            await page.click("#rollback")  # no token typed
            assert "Refused" in await page.locator("#notice").inner_text()
            assert runtime.policies.version_id == 3

            await page.goto(url)
            await page.fill("input[name=token]", ADMIN_TOKEN)
            await page.click("#rollback")
            assert "Refused" not in await page.locator("#notice").inner_text()
            assert (await page.locator("#serving").inner_text()) == "v2"
            assert runtime.policies.version_id == 2
        finally:
            await browser.close()
    assert screenshot.stat().st_size > 10_000
