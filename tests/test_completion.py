"""Shell completion, typer's: `vdeploy --install-completion` writes a script that calls vdeploy back
with _VDEPLOY_COMPLETE set; these are the answers that script gets."""

from __future__ import annotations

import subprocess
import sys

# The console script, as the shell calls it: the program is named vdeploy.
AS_VDEPLOY = "import sys; sys.argv[0] = 'vdeploy'; from vdeploy.cli import main; main()"


def complete(project, words: str) -> list[str]:
    """What bash completion offers for the last word of `words`."""
    env = project.env({
        "_VDEPLOY_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1),
    })
    done = subprocess.run([sys.executable, "-c", AS_VDEPLOY], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completes_commands_and_their_options(project):
    assert complete(project, "vdeploy lo") == ["lock"]
    assert complete(project, "vdeploy up --dr") == ["--dry-run"]
    assert complete(project, "vdeploy lock --lo") == ["--locked"]


def test_help_names_the_completion_options(project):
    _, out, _ = project.run_vdeploy("--help")
    assert "--install-completion" in out and "--show-completion" in out
