"""The README's commands are the ones that run: CI runs the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fenced_commands(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    commands = fenced_commands((ROOT / "README.md").read_text())
    test_commands = [c for c in commands if "pytest" in c]
    assert len(test_commands) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_commands[0] in [line.strip() for line in ci]


def test_readme_installs_the_cpu_torch_before_anything_else():
    for command in fenced_commands((ROOT / "README.md").read_text()):
        first = command.split("&&")[0].strip()
        assert first == "python -m pip install torch==2.13.0"
