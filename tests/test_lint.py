"""The code style CI holds the repository to: ruff's rules in pyproject.toml (line length,
import order, likely bugs), over every Python file. Fix with ``ruff check --fix .``."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "ruff")
    return [exe] if os.path.exists(exe) else [shutil.which("ruff") or "ruff"]


def test_ruff_finds_nothing():
    p = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format=concise", ROOT],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
