"""Headless Debian Chromium driven by selenium, shared by the browser tests (viewer, render)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BASE_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync")


def headless_chromium(profile: Path, extra_args: Iterable[str] = (), prefs: dict | None = None,
                      capabilities: dict | None = None):
    """A selenium Chrome driver on Debian's chromium with its own profile folder; skips the test
    (with the packages to install) where chromium or chromedriver is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"headless Chromium tests need {' and '.join(missing)} (Debian packages "
                    "chromium and chromium-driver; CI installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (*BASE_ARGS, *extra_args, f"--user-data-dir={profile}"):
        options.add_argument(arg)
    if prefs:
        options.add_experimental_option("prefs", prefs)
    for name, value in (capabilities or {}).items():
        options.set_capability(name, value)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
