"""The ``ml-backend`` console script reaches every command, including those whose module has its own parser."""

import pytest

from ml_backend.cli import build_parser, main


@pytest.mark.parametrize(
    ("command", "usage"),
    [("benchmark", "--synthetic"), ("import", "--project"), ("setup", "--backend-url"), ("label-studio", "--port")],
)
def test_delegated_subcommands_run_their_module_parser(command, usage, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert usage in capsys.readouterr().out


def test_every_subcommand_is_listed():
    text = build_parser().format_help()
    for name in ("versions", "rollback", "status", "prune", "train", "worker", "benchmark", "import", "setup"):
        assert name in text
