"""Rich progress bars that count tokens and show tokens per second (for every evaluation)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class TokensPerSecondColumn(ProgressColumn):
    """The task's recent speed, in tokens per second (tasks advance by tokens processed)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "- tok/s", style="progress.data.speed")


def token_progress() -> Progress:
    """A progress display on stderr: description, bar, tokens done/total, tok/s, elapsed, ETA.

    Use as a context manager; `add_task(description, total=tokens)`, then `advance(task, n)`.
    """
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TokensPerSecondColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
