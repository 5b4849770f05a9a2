"""The README's code runs as written: every ```python block is executed (in a scratch folder), and
every `dyninfer ...` line of its bash blocks parses with the real command line (flags that drift fail)."""

import re
import shlex
from pathlib import Path

import pytest

from dyninfer.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_and_bash_blocks():
    assert blocks("python") and blocks("bash")


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes runs/...: keep the checkout clean
    exec(compile(blocks("python")[index], f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})


def commands() -> list[list[str]]:
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("python -m dyninfer "):
                line = line[len("python -m "):]
            if line.startswith("dyninfer ") and "..." not in line:
                found.append(shlex.split(line)[1:])
    return found


@pytest.mark.parametrize("argv", commands(), ids=lambda a: " ".join(a[:2]))
def test_readme_command_parses(argv):
    build_parser().parse_args(argv)
