"""The CLI builds only the command a call names (cli.keep_only_the_command_named): what a user
sees must not change with it. Every command still answers by name, `--help` still lists them all,
and a mistyped name is still told what exists."""

from __future__ import annotations

import subprocess
import sys

import typer.main

from vdeploy.cli import app

VDEPLOY = [sys.executable, "-m", "vdeploy"]


def every_command_name() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


def test_help_lists_every_command_and_each_answers_by_name():
    names = every_command_name()
    assert {"lock", "up", "run", "check", "diff", "push", "pull", "engine"} <= set(names)
    listing = subprocess.run([*VDEPLOY, "--help"], capture_output=True, text=True, check=True).stdout
    for name in names:
        assert f" {name} " in listing, name
        usage = subprocess.run([*VDEPLOY, name, "--help"], capture_output=True, text=True)
        assert usage.returncode == 0 and f"vdeploy {name} [OPTIONS]" in usage.stdout, (name, usage.stdout, usage.stderr)


def test_a_mistyped_command_is_named_and_told_what_is_close():
    done = subprocess.run([*VDEPLOY, "verfy"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "No such command 'verfy'" in done.stderr and "verify" in done.stderr
