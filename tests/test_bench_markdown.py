"""bench/benchmarks_md.py: every bench script writes BENCHMARKS.md the same way, without touching other sections."""

from __future__ import annotations

from pathlib import Path

from bench.benchmarks_md import reproduce_command, write_section

BEFORE = "# Benchmarks\n\n## Load\n\nold load run\n\n## Load (quick)\n\nquick run\n\n## Decode\n\nold decode run\n"


def test_runs_accumulate_in_their_own_section(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(BEFORE, encoding="utf-8")
    write_section("Load", "### new load run\n\n| a |\n", path=path)
    text = path.read_text(encoding="utf-8")
    assert text.index("old load run") < text.index("### new load run") < text.index("## Load (quick)")
    assert "quick run" in text and text.endswith("old decode run\n")


def test_replace_rewrites_one_section_and_a_missing_one_is_created_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(BEFORE, encoding="utf-8")
    write_section("Decode", "fresh decode run", replace=True, path=path)
    write_section("Load (quick)", "second quick run", replace=True, path=path)
    write_section("Imagination", "first imagination run", path=path)
    text = path.read_text(encoding="utf-8")
    assert "old decode run" not in text and "fresh decode run" in text
    assert "\nquick run\n" not in text and "## Load (quick)\n\nsecond quick run\n" in text
    assert "old load run" in text  # "Load" is a prefix of "Load (quick)": only the exact heading was replaced
    assert text.endswith("## Imagination\n\nfirst imagination run\n")


def test_the_reproducing_command_names_the_script_and_its_arguments() -> None:
    command = reproduce_command("/somewhere/bench/decode.py", ["--threads", "1"])
    assert command == ".venv/bin/python bench/decode.py --threads 1"
