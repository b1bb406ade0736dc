"""Helpers of the browser tests (imported by name: tests/browser is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def chromium_executable() -> Path:
    """$CHROMIUM, else Debian's /usr/bin/chromium."""
    return Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))


def login(page: Any, server: Any) -> None:
    """Log in to Label Studio through its login form as the admin of the ``label_studio`` fixture."""
    page.goto(server.url + "/user/login/")
    page.fill("input[name=email]", server.username)
    page.fill("input[name=password]", server.password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url)


def region_titles(page: Any, at_least: int, timeout_ms: int = 60_000) -> list[str]:
    """The titles in the editor's Regions list once it holds ``at_least`` entries, read in the page in one go: Label
    Studio re-renders the list as layers and images load, so a wait followed by a separate read can see it empty."""
    return page.wait_for_function(
        """(n) => {
            const t = [...document.querySelectorAll('.lsf-outliner-item__title')].map(e => e.innerText.trim());
            return t.length >= n ? t : null;
        }""",
        arg=at_least,
        timeout=timeout_ms,
    ).json_value()
