"""One rich progress bar for every long job (training, LLC, studies); a no-op when disabled."""

from __future__ import annotations

from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["Bar"]


class Bar:
    """`with Bar(True, total, "train", columns=["loss {task.fields[loss]:.4g}"], loss=nan) as bar:
    bar.update(completed, loss=...)`. `columns` are rich format strings over the keyword `fields`.
    """

    def __init__(self, enabled: bool, total: int, label: str, completed: int = 0, columns: tuple[str, ...] = (),
                 **fields: Any):
        self.enabled, self.total, self.label, self.completed = enabled and total > 0, total, label, completed
        self.columns, self.fields = columns, fields
        self.progress = None

    def __enter__(self) -> Bar:
        if self.enabled:
            columns = [TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
                       *(TextColumn(c) for c in self.columns), TimeElapsedColumn(), TimeRemainingColumn()]
            self.progress = Progress(*columns)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total, completed=self.completed,
                                               **self.fields)
        return self

    def update(self, completed: int | None = None, advance: int = 0, total: int | None = None, **fields: Any
               ) -> None:
        """Set `completed` (or add `advance`); `total` replaces an estimated total."""
        if self.progress is not None:
            kw = {"completed": completed} if completed is not None else {"advance": advance}
            if total is not None:
                kw["total"] = total
            self.progress.update(self.task, **kw, **fields)

    def advance(self) -> None:
        self.update(advance=1)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __exit__(self, *exc: object) -> None:
        self.stop()
