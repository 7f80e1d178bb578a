"""/demo in a real headless Chromium: the page personalizes itself through analytics.js and the JSON API.

Debian's chromium and chromium-driver, driven by selenium (.ci/run installs
them). The embedded demo runs with a 3 s window: three clicks to Pricing put
the visitor in high_intent_pricing and the banner appears (within 1 s of
the third view); with no further action the window lapses, the server's
timer moves them out, and the banner goes. A screenshot of each state is
saved in test-artifacts/ (or $QUALIFY_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import SMALL_DEMO, QualifyServer

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
VENDORED = Path(__import__("qualify.server.transport.http.demo", fromlist=["VENDOR"]).VENDOR) / "index.js"
WINDOW = 3.0
ARTIFACTS = Path(os.environ.get("QUALIFY_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, what in ((CHROMIUM, "chromium"), (DRIVER, "chromium-driver")):
        if not os.path.exists(path):
            return f"{what} is not installed (apt-get install chromium chromium-driver)"
    if not VENDORED.exists():
        return "analytics.js was not vendored (npm was missing at install time)"
    return None


@pytest.fixture
def browser(tmp_path):
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1000,700"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float, what: str) -> float:
    """Seconds until ``condition()``; fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} not within {timeout}s"
        time.sleep(0.02)
    return time.monotonic() - started


def test_the_demo_page_shows_the_offer_on_the_third_pricing_view_and_drops_it_when_the_window_lapses(
        tmp_path, browser):
    from selenium.webdriver.common.by import By

    server = QualifyServer(tmp_path, "--demo-people", str(SMALL_DEMO), "--demo-window", str(WINDOW)).start()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        browser.get(f"{server.http_url}/demo")
        wait_for(lambda: browser.execute_script("return document.body.dataset.ready") == "1", 10, "analytics.js ready")
        banner = browser.find_element(By.ID, "banner")
        pricing = browser.find_element(By.ID, "nav-pricing")
        for _ in range(2):
            pricing.click()
            time.sleep(0.15)
        assert not banner.is_displayed()
        browser.save_screenshot(str(ARTIFACTS / "demo-1-before.png"))
        pricing.click()
        third = time.monotonic()
        wait_for(banner.is_displayed, 1.0, "the banner after the third pricing view")
        browser.save_screenshot(str(ARTIFACTS / "demo-2-banner.png"))
        assert "20% off" in banner.text
        # No further action: the window lapses, the server's timer exits the visitor.
        wait_for(lambda: not banner.is_displayed(), WINDOW + 3.0, "the banner gone after the window")
        assert time.monotonic() - third >= WINDOW - 1.0  # not gone early (views 1-2 started the window)
        browser.save_screenshot(str(ARTIFACTS / "demo-3-gone.png"))
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe  # analytics.js loaded and sent everything here, nothing from a CDN
    finally:
        assert server.stop() == 0, server.log()
