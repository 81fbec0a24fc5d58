"""Writing results into BENCHMARKS.md: one way for every script in ``bench/``.

Each script owns one ``## `` section. A run either adds its block (a ``### `` dated heading, the machine, the
table, the reproducing command) at the end of that section, so that runs accumulate beside each other, or
replaces the section's body (``replace=True``) where only the latest run is meaningful. Other sections are
never touched; a missing section is created at the end of the file.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def reproduce_command(script: str, argv: Sequence[str] | None = None) -> str:
    """``.venv/bin/python bench/<script> <arguments>``: the command that reproduces this run."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    return " ".join([".venv/bin/python", f"bench/{Path(script).name}", *arguments])


def run_heading(command: str) -> str:
    """``### 2026-11-29 23:40 UTC — `command```: the heading of one run's block."""
    return f"### {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — `{command}`"


def machine() -> str:
    """``x86_64, CPython 3.11.7``: where a CPU result was measured (scripts add threads, GPU, load)."""
    return f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}"


def write_section(title: str, block: str, *, replace: bool = False, path: Path = BENCHMARKS) -> None:
    """Put ``block`` in the ``## {title}`` section of ``path``: at its end, or as its whole body (``replace``)."""
    heading = f"## {title}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = block.strip("\n") + "\n"
    start = _find_heading(text, heading)
    if start == -1:
        path.write_text(text.rstrip("\n") + f"\n\n{heading}\n\n{block}", encoding="utf-8")
        return
    body_start = start + len(heading)
    following = text.find("\n## ", body_start)
    body, tail = (text[body_start:], "") if following == -1 else (text[body_start:following], text[following:])
    body = "\n\n" + block if replace else body.rstrip("\n") + "\n\n" + block
    path.write_text(text[:start] + heading + body + tail, encoding="utf-8")


def _find_heading(text: str, heading: str) -> int:
    """Where the line ``heading`` starts in ``text`` (a whole line, not a prefix of a longer heading), or -1."""
    position = 0
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == heading:
            return position
        position += len(line)
    return -1
