"""The status page shows each project's export command (with the live version), and says when there is none."""

from ml_backend.server.status_page import _export_section


def test_status_page_shows_the_export_command():
    html = _export_section(7, "v0003-20260101T000000Z", "ml-backend")
    assert "ml-backend export --project 7 --from-label-studio -o exports/project-7" in html
    assert "v0003-20260101T000000Z" in html
    assert "No live version" in _export_section(7, None, "ml-backend")
