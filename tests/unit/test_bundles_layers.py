"""The package's layering: pure cores import no I/O, and nothing heavy reaches the agent."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "firmware_bundles"
IO_MODULES = {"os", "io", "socket", "pathlib", "time", "subprocess", "shutil", "tempfile", "paho"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def calls_open(path: Path) -> bool:
    return any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open"
        for node in ast.walk(ast.parse(path.read_text()))
    )


@pytest.mark.parametrize("module", ["trust.py", "canonical.py", "model.py", "errors.py"])
def test_pure_layers_do_no_io(module: str) -> None:
    path = PACKAGE / module
    assert imported_modules(path) & IO_MODULES == set()
    assert not calls_open(path)


def test_agent_side_imports_stay_light() -> None:
    # FIELD-NOTES: every device pays for pydantic/SQLModel/FastAPI if this package pulls them in.
    code = (
        "import sys\n"
        "import firmware_bundles.archive, firmware_bundles.trust, firmware_bundles.extract\n"
        "import firmware_bundles.cli\n"
        "heavy = {'pydantic', 'sqlmodel', 'fastapi', 'sqlalchemy', 'starlette', 'paho'}\n"
        "print(sorted(heavy & {name.split('.')[0] for name in sys.modules}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_cli_module_builds_its_parser_without_loading_the_library() -> None:
    # The main CLI imports this to build its parser for every subcommand, `agent run` included.
    code = (
        "import argparse, sys\n"
        "from firmware_bundles.cli import add_subcommands\n"
        "add_subcommands(argparse.ArgumentParser().add_subparsers())\n"
        "loaded = {'cryptography', 'msgspec', 'tarfile', 'firmware_bundles.archive'}\n"
        "print(sorted(loaded & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
