"""The issue-12 settings (uncertainty layer, suggested region, status page): parsed and checked at start-up, and
documented in README's configuration table with their real defaults."""

from __future__ import annotations

import pytest
from server_helpers import REPO

from ml_backend.config import ConfigError, Settings

NEW = [
    "UNCERTAINTY_THRESHOLDS", "UNCERTAINTY_MIN_PIXELS", "SUGGEST_MIN_TILE", "SUGGEST_WINDOW", "SUGGEST_STRIDE",
    "SUGGEST_REGION_COST", "SUGGEST_MAX_PIXELS", "STATUS_LS_TIMEOUT_S", "STATUS_ERRORS_KEPT", "BACKEND_PUBLIC_URL",
]  # fmt: skip


def test_new_settings_are_in_the_readme_table_with_their_defaults():
    readme = (REPO / "README.md").read_text()
    defaults = dict(Settings.documented())
    for var in NEW:
        default = defaults[var]
        cell = f"`{default}`" if default else "(empty)"
        assert f"| `{var}` | {cell} |" in readme, var


def test_thresholds_parse_from_the_environment(monkeypatch):
    monkeypatch.setenv("UNCERTAINTY_THRESHOLDS", "0.4, 0.7")
    assert Settings.from_env().uncertainty_levels == (0.4, 0.7)
    for bad in ("0.7,0.4", "0", "1.5", "high", ","):
        monkeypatch.setenv("UNCERTAINTY_THRESHOLDS", bad)
        with pytest.raises(ConfigError, match="UNCERTAINTY_THRESHOLDS"):
            Settings.from_env()
