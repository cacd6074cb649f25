"""Headless Debian Chromium for the browser tests, driven with Selenium through chromium-driver.

Only the system's ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` are used (Selenium is given
both paths, so it never looks for or downloads a browser). When they are missing the tests are
skipped, unless ``LLAMAPROXY_REQUIRE_E2E=1`` (scripts/test.sh, CI), where that is a failure.
Screenshots go to ``artifacts/screenshots/`` (git-ignored; ``LLAMAPROXY_ARTIFACTS`` moves it),
which CI keeps as an artifact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest

CHROMIUM = os.environ.get("LLAMAPROXY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LLAMAPROXY_CHROMEDRIVER", "/usr/bin/chromedriver")

#: Flags for a quiet, sandbox-less headless Chromium that talks to nothing but our servers.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,1500",
)

_ROOT = Path(__file__).resolve().parents[2]


def artifacts_dir() -> Path:
    """Where screenshots are saved (created on demand)."""
    base = Path(os.environ.get("LLAMAPROXY_ARTIFACTS") or _ROOT / "artifacts")
    path = base / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _unavailable(why: str) -> None:
    if os.environ.get("LLAMAPROXY_REQUIRE_E2E") == "1":
        raise AssertionError(f"browser tests required but: {why}")
    raise SkipTest(why)


def chromium(javascript: bool = True) -> Any:
    """A new headless Chromium session (quit it when done) with a fresh profile directory."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            _unavailable(f"{path} not found (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")
    profile = tempfile.mkdtemp(prefix="llamaproxy-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    if not javascript:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    original_quit = driver.quit

    def quit_and_clean() -> None:
        try:
            original_quit()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit_and_clean  # type: ignore[method-assign]
    return driver


def screenshot(driver: Any, name: str) -> Path:
    """Save a screenshot of the whole page as ``artifacts/screenshots/<name>.png``."""
    path = artifacts_dir() / f"{name}.png"
    height = driver.execute_script("return document.documentElement.scrollHeight") or 1500
    driver.set_window_size(1280, min(max(int(height) + 40, 800), 4000))
    driver.save_screenshot(str(path))
    return path
