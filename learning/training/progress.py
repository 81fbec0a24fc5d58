"""The run's clock (time limit) and its rich progress bar."""

from __future__ import annotations

import math
import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Clock:
    """The run's wall clock since it started and its deadline (``time_limit_minutes``; none: never expires)."""

    def __init__(self, limit_minutes: float | None) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + limit_minutes * 60 if limit_minutes else math.inf

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return time.monotonic() > self.deadline


def progress_bar(enabled: bool) -> Progress:
    """The training bar: stage, steps done, elapsed, ETA and the latest loss terms (hidden when not ``enabled``)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[terms]}"),
        disable=not enabled,
        transient=False,
    )


def format_terms(terms: dict[str, float], tokens_per_s: float | None = None) -> str:
    """``name=value`` pairs for the bar and the log, with the token rate when given."""
    text = " ".join(f"{k}={v:.3f}" for k, v in terms.items())
    return f"{text} tok/s={tokens_per_s:.0f}" if tokens_per_s is not None else text
