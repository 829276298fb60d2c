"""The README as a new user follows it: its Python snippets and first CLI examples run from a
directory that is not the repository (the shipped model is found from anywhere), and the first
examples show the method doing something (a live tail changes the text; the inert one says so)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NEEDS_MORE = ("openai", "from_hf_gpt2")  # a running server, the Hugging Face hub: tested elsewhere


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def python_snippets() -> list[str]:
    return [b for b in blocks("python") if not any(word in b for word in NEEDS_MORE)]


def test_the_readme_has_python_snippets_to_run():
    assert len(python_snippets()) >= 2


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_a_python_snippet_runs_from_any_directory(index, tmp_path):
    p = subprocess.run([sys.executable, "-c", python_snippets()[index]], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip()


def first_cli_examples() -> list[list[str]]:
    """The Command line block's `tmfast generate "…" …` lines that need no file."""
    cli = next(b for b in blocks("bash") if b.lstrip().startswith('tmfast generate "'))
    out = []
    for line in cli.splitlines():
        command = line.split("  #")[0].strip()
        if command.startswith('tmfast generate "') and "--batch-file" not in command and "..." not in command:
            out.append(command)
    return out


def run_cli(command: str, cwd: Path) -> subprocess.CompletedProcess:
    import shlex
    args = shlex.split(command)[1:]
    return subprocess.run([sys.executable, "-m", "tmfast", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_first_cli_examples_run_and_the_live_tail_changes_the_text(tmp_path):
    commands = first_cli_examples()
    assert len(commands) >= 3, commands
    results = [run_cli(c, tmp_path) for c in commands]
    for c, r in zip(commands, results):
        assert r.returncode == 0, (c, r.stderr[-2000:])
        assert "note:" not in r.stderr, (c, r.stderr)  # no example passes a flag that does nothing
    defaults, live = results[0].stdout, results[1].stdout
    assert "--alpha-max" not in commands[0] and "--alpha-max" in commands[1]
    assert defaults != live  # the method does something at the second example's settings
    assert "⟨" in results[2].stderr  # the live view (plain lines on stderr when not a terminal)
