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
