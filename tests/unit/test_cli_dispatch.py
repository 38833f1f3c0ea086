"""The top-level command line imports only the module of the command being run."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from driftless.cli import CONTRIBUTORS, build_parser, command_of, contributors_for


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["agent", "run", "--device-id", "x"], "agent"),
        (["--log-level", "debug", "--log-format", "console", "sim", "run"], "sim"),
        (["--log-level=debug", "hub", "serve"], "hub"),
        (["--log-level", "agent"], None),  # "agent" is the level here, not the command
        (["--help"], None),
        (["--log-l", "debug", "agent"], None),  # an abbreviation: the full parser decides
        ([], None),
    ],
)
def test_the_command_is_found_only_when_plain(argv: list[str], command: str | None) -> None:
    assert command_of(argv) == command


def _commands(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    (top,) = [a for a in parser._actions if a.dest == "command"]
    return tuple(top.choices or ())


def test_each_module_adds_exactly_the_commands_the_table_says() -> None:
    for module, commands in CONTRIBUTORS:
        assert _commands(build_parser([commands[0]])) == commands, module
    assert _commands(build_parser()) == tuple(c for _, cs in CONTRIBUTORS for c in cs)


def test_an_unknown_command_builds_every_parser_to_say_what_exists() -> None:
    assert contributors_for("agen") == tuple(module for module, _ in CONTRIBUTORS)
    done = subprocess.run(
        [sys.executable, "-m", "driftless.cli", "agen"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid choice: 'agen'" in done.stderr and "'sim'" in done.stderr


def test_agent_run_parses_without_the_other_packages_command_lines() -> None:
    code = (
        "import sys\n"
        "from driftless.cli import build_parser\n"
        "argv = ['--log-level', 'info', 'agent', 'run', '--device-id', 'd']\n"
        "assert build_parser(argv).parse_args(argv).agent_cmd == 'run'\n"
        "others = ('hub', 'simulator', 'devtools', 'firmware_bundles')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in others))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
    assert importlib.import_module("edge_agent.cli").add_subcommands  # the one it needs
