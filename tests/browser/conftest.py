"""Headless Chromium for the browser tests: Debian's ``chromium`` driven by Playwright (no browser download).

``scripts/install_chromium.sh`` (run by ``scripts/test.sh``) installs it; where /usr/bin/chromium (or $CHROMIUM) is
missing, the browser tests are skipped with that message. Screenshots go to ``tests/artifacts/`` (git-ignored).
The real-server fixtures (``label_studio``, ``ls``) come from ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import ARTIFACTS, CHROMIUM_ARGS, chromium_executable


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless Chromium (Playwright Browser) for the session; skipped where chromium is not installed."""
    exe = chromium_executable()
    if not exe.is_file():
        pytest.skip(f"browser tests need Chromium at {exe}: run `bash scripts/install_chromium.sh` (apt chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need the `playwright` Python package (pip install playwright; no browser download)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(exe), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    """A fresh page (own cookies) at a desktop size, closed after the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """tests/artifacts/ (created): screenshots and page dumps of the browser tests."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
