"""`train.py COMMAND --help`: fast because nothing heavy is imported before argparse answers (torch, accelerate,
transformers load only when a command runs), and its text shows each default once, never "(default: None)"."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "accelerate", "transformers")

# every subcommand's --help in one fresh interpreter, as `python train.py COMMAND --help` runs it: its text and the
# heavy modules loaded by then
_WRAPPER = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, {repo!r})
from train import COMMANDS
found = {{}}
for command in [None, *COMMANDS]:
    sys.argv = ["train.py", *([command] if command else []), "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path({script!r}, run_name="__main__")
        except SystemExit as e:
            code = e.code
    found[command or ""] = {{"code": code, "help": out.getvalue(),
                             "heavy": [m for m in {heavy!r} if m in sys.modules]}}
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def helps() -> dict[str, dict]:
    code = _WRAPPER.format(repo=str(REPO), script=str(REPO / "train.py"), heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "120"}, check=True)
    return json.loads(done.stdout)


def test_help_imports_no_heavy_module(helps):
    import train

    assert set(helps) == {"", *train.COMMANDS}
    for command, found in helps.items():
        assert found["code"] == 0 and "usage: train.py" in found["help"], command
        assert found["heavy"] == [], f"train.py {command} --help imported {found['heavy']}"


def _options(text: str) -> list[str]:
    """The help text of each option: an entry starts at a line indented two spaces and a dash."""
    entries: list[str] = []
    for line in text.splitlines():
        if re.match(r"  -", line):
            entries.append(line)
        elif entries and line.startswith("   "):
            entries[-1] += " " + line.strip()
        elif not line.startswith("   "):
            entries.append("")  # a group heading or blank line ends the entry
    return [e for e in entries if e]


def test_help_shows_each_default_once_and_no_none(helps):
    for command, found in helps.items():
        assert "(default: None)" not in found["help"], command
        for entry in _options(found["help"]):
            assert entry.count("(default:") <= 1, f"{command}: {entry}"
            before, note, _ = entry.partition("(default:")
            assert not note or "default" not in before, f"{command}: the default twice: {entry}"


def test_sft_template_choices_include_qwen(helps):
    entry = next(e for e in _options(helps["sft"]["help"]) if e.startswith("  --template"))
    assert "qwen" in re.search(r"\{(.*?)\}", entry).group(1).split(",")
