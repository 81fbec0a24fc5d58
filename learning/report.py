"""Evaluation reports: ``report.md`` (tables, transcripts), ``report.png`` (bar chart), ``report.json``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt

from learning.evaluation import EpisodeResult, EvaluationReport, PolicyResult, wilson_interval

SAMPLE_TRANSCRIPTS = 3


@dataclass(frozen=True, slots=True)
class ReportFiles:
    """Where :func:`write_report` wrote its files."""

    markdown: Path
    plot: Path
    json: Path


def write_report(report: EvaluationReport, out_dir: str | Path) -> ReportFiles:
    """Write ``report.md``, ``report.png`` and ``report.json`` into ``out_dir`` (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(markdown=out / "report.md", plot=out / "report.png", json=out / "report.json")
    files.plot.write_bytes(b"")  # claim the name early: a failing plot leaves an obvious empty file
    plot_report(report, files.plot)
    files.markdown.write_text(render_markdown(report, plot_name=files.plot.name), encoding="utf-8")
    files.json.write_text(report.to_json() + "\n", encoding="utf-8")
    return files


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def render_markdown(report: EvaluationReport, *, plot_name: str = "report.png") -> str:
    """The report as Markdown: summary table, per-persona breakdown, outcomes, sample transcripts."""
    lines = [
        f"# Evaluation: {report.task} with {report.users} users",
        "",
        f"{report.episodes} episodes per policy, the same hidden personas for every policy (seed {report.seed}); "
        f"{report.started_at:%Y-%m-%d %H:%M} – {report.finished_at:%H:%M} UTC.",
        "",
        f"![success rates]({plot_name})",
        "",
        "| policy | success rate | 95 % CI (Wilson) | mean reward | mean agent turns | episodes | time |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for result in report.results:
        low, high = result.interval
        lines.append(
            f"| {result.name} | {_percent(result.success_rate)} | {_percent(low)} – {_percent(high)} | "
            f"{result.mean_reward:.3f} | {result.mean_turns:.2f} | {result.n} | {result.seconds:.1f} s |"
        )
    errors = [r for r in report.results if r.error]
    if errors:
        lines += ["", *[f"**{r.name} failed:** `{r.error}` (its unfinished episodes scored 0)" for r in errors]]
    lines += ["", *_breakdown_table(report), "", *_outcome_table(report), "", "## Sample transcripts", ""]
    for result in report.results:
        for episode in result.episodes[:SAMPLE_TRANSCRIPTS]:
            lines += _transcript(result, episode)
    return "\n".join(lines) + "\n"


def _breakdown_table(report: EvaluationReport) -> list[str]:
    types = sorted({key for result in report.results for key in result.by_persona_type()})
    lines = [
        "## Success by persona type",
        "",
        "| persona type | " + " | ".join(r.name for r in report.results) + " |",
        "|---|" + "---:|" * len(report.results),
    ]
    for persona_type in types:
        cells = []
        for result in report.results:
            successes, n = result.by_persona_type().get(persona_type, (0, 0))
            cells.append(f"{_percent(successes / n) if n else '–'} ({successes}/{n})")
        lines.append(f"| {persona_type} | " + " | ".join(cells) + " |")
    return lines


def _outcome_table(report: EvaluationReport) -> list[str]:
    kinds = sorted({kind for result in report.results for kind in result.outcomes()})
    lines = [
        "## How episodes ended",
        "",
        "| policy | " + " | ".join(kinds) + " |",
        "|---|" + "---:|" * len(kinds),
    ]
    for result in report.results:
        outcomes = result.outcomes()
        lines.append(f"| {result.name} | " + " | ".join(str(outcomes.get(kind, 0)) for kind in kinds) + " |")
    return lines


def _transcript(result: PolicyResult, episode: EpisodeResult) -> list[str]:
    persona = ", ".join(f"{key}={value}" for key, value in episode.persona.items())
    verdict = "success" if episode.success else "failure"
    lines = [f"### {result.name}, episode {episode.index}: {verdict} (reward {episode.reward:g}, {episode.outcome})"]
    lines += ["", f"Hidden persona: {persona}", ""]
    for role, text in episode.turns:
        speaker = "**Agent**" if role == "agent" else "*User*"
        lines.append(f"> {speaker}: {text.strip() or '(empty)'}  ")
    lines.append("")
    return lines


def plot_report(report: EvaluationReport, path: str | Path) -> None:
    """Bar chart: success rate per policy with 95 % Wilson error bars, and per persona type beside it."""
    results = report.results
    names = [r.name for r in results]
    rates = [r.success_rate for r in results]
    errors = [
        [max(0.0, r.success_rate - r.interval[0]) for r in results],
        [max(0.0, r.interval[1] - r.success_rate) for r in results],
    ]
    types = sorted({key for r in results for key in r.by_persona_type()})
    figure, (overall, breakdown) = plt.subplots(
        1, 2, figsize=(6 + 1.0 * len(results) + 0.6 * len(types), 4.2), gridspec_kw={"width_ratios": [1, 1.6]}
    )
    colours = plt.get_cmap("tab10").colors
    bars = overall.bar(names, rates, yerr=errors, capsize=6, color=colours[: len(names)], edgecolor="black")
    for bar, result in zip(bars, results, strict=True):
        overall.annotate(
            f"{100 * result.success_rate:.0f}%",
            (bar.get_x() + bar.get_width() / 2, result.interval[1]),  # above the error bar's cap
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=9,
        )
    overall.set_ylim(0, 1.12)
    overall.set_ylabel("success rate (95 % Wilson CI)")
    overall.set_title(f"{report.task}: {report.episodes} episodes, {report.users} users")
    overall.tick_params(axis="x", rotation=20)
    width = 0.8 / max(1, len(results))
    for position, result in enumerate(results):
        by_type = result.by_persona_type()
        xs = [index + (position - (len(results) - 1) / 2) * width for index in range(len(types))]
        values, low, high = [], [], []
        for persona_type in types:
            successes, n = by_type.get(persona_type, (0, 0))
            rate = successes / n if n else 0.0
            ci = wilson_interval(successes, n)
            values.append(rate)
            low.append(max(0.0, rate - ci[0]))
            high.append(max(0.0, ci[1] - rate))
        breakdown.bar(xs, values, width, yerr=[low, high], capsize=2, label=result.name, color=colours[position % 10])
    breakdown.set_xticks(range(len(types)), types)
    breakdown.set_ylim(0, 1.08)
    breakdown.set_title("by persona type")
    breakdown.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for axis in (overall, breakdown):
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


__all__ = ["ReportFiles", "plot_report", "render_markdown", "write_report"]
