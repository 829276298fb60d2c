"""What `tmfast generate` shows while it runs: the `--show-tail` view and the batch progress bar.

On a terminal the tail view is a rich live table, one row per running sequence, redrawn in place
and cropped to the terminal's width and height; elsewhere it is plain lines, one per sequence
per step. The progress bar counts finished prompts; the caller puts it on stderr.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text


@dataclass
class Tick:
    """One running sequence after one engine step."""
    index: int  # position of the prompt in the input
    prompt: str
    step: int  # steps this sequence has run, from 0
    text: str  # committed text so far
    tail: list[str]  # the liquid tail's nearest tokens, decoded, front first (the committed slot left out)
    finished: bool


# control characters would move the cursor inside a table cell: show them as one visible cell
_ONE_LINE = {c: "·" for c in range(32)} | {ord("\n"): "⏎", ord("\t"): " ", 127: "·"}


def printable(s: str) -> str:
    """Text for one table cell: control characters shown as visible marks."""
    return s.translate(_ONE_LINE)


def crop_left(s: str, width: int) -> str:
    """The end of `s` in at most `width` terminal cells, with "…" in front when cut: the newest
    text is what a live view is for."""
    if width <= 0:
        return ""
    if cell_len(s) <= width:
        return s
    s = s[-width:]  # every character takes at least one cell
    while s and cell_len(s) > width - 1:
        s = s[1:]
    return "…" + s


def plain_line(t: Tick) -> str:
    """The line the view writes where stdout is not a terminal (unchanged from the first CLI)."""
    return f"[{t.step:4d}] {t.prompt}{t.text}  ⟨{' '.join(repr(s) for s in t.tail)}⟩"


class PlainTailView:
    """`--show-tail` where stdout is not a terminal: a line per running sequence per step."""

    def __init__(self, out):
        self.out = out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, ticks: list[Tick]) -> None:
        if ticks:
            self.out.write("".join(plain_line(t) + "\n" for t in ticks))
            self.out.flush()

    def print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()


def render_table(rows: list[Tick], status: str, width: int, height: int) -> Group:
    """A status line, a header and one line per running sequence (lowest index first), never
    wider than `width` cells nor taller than `height` lines; what does not fit is counted."""
    width, height = max(width, 20), max(height, 4)
    rows = sorted(rows, key=lambda t: t.index)
    idx_w = max([len("#")] + [len(str(t.index)) for t in rows])
    step_w = max([len("step")] + [len(str(t.step)) for t in rows])
    avail = max(width - idx_w - step_w - 3, 2)  # three one-cell gaps between four columns
    text_w = max(avail * 3 // 5, 1)
    tail_w = max(avail - text_w, 1)
    budget = height - 3  # status, header, and a spare line so the cursor never scrolls the view
    hidden = 0
    if len(rows) > budget:
        hidden, rows = len(rows) - (budget - 1), rows[:budget - 1]
    grid = Table.grid(padding=(0, 1))
    grid.add_column(justify="right", width=idx_w, no_wrap=True)
    grid.add_column(justify="right", width=step_w, no_wrap=True)
    grid.add_column(width=text_w, no_wrap=True, overflow="crop")
    grid.add_column(width=tail_w, no_wrap=True, overflow="ellipsis")
    grid.add_row(Text("#", style="bold"), Text("step", style="bold"), Text("committed text", style="bold"),
                 Text("liquid tail (nearest tokens)", style="bold"))
    for t in rows:
        text = crop_left(printable(t.prompt + t.text), text_w)
        tail = printable(" ".join(repr(s) for s in t.tail))
        grid.add_row(str(t.index), str(t.step), Text(text, no_wrap=True, overflow="crop"),
                     Text(tail, style="dim", no_wrap=True, overflow="ellipsis"))
    parts = [Text(printable(status), style="bold", no_wrap=True, overflow="ellipsis"), grid]
    if hidden:
        parts.append(Text(f"… {hidden} more running", style="dim", no_wrap=True, overflow="ellipsis"))
    return Group(*parts)


class LiveTailView:
    """`--show-tail` on a terminal: the running sequences redrawn in place (at most `fps` times a
    second), results printed above them as they finish, the view itself gone at the end."""

    def __init__(self, console: Console, status=lambda: "", fps: float = 20.0):
        self.console, self.status, self.min_gap = console, status, 1.0 / fps
        self.rows: dict[int, Tick] = {}
        self.live = Live(console=console, auto_refresh=False, transient=True, redirect_stdout=False,
                         redirect_stderr=False, vertical_overflow="crop", get_renderable=self.render)
        self.last_draw = 0.0

    def __enter__(self):
        self.live.start()
        return self

    def __exit__(self, *exc):
        self.live.stop()
        return False

    def render(self):
        return render_table(list(self.rows.values()), self.status(), self.console.width, self.console.height)

    def update(self, ticks: list[Tick]) -> None:
        for t in ticks:
            if t.finished:
                self.rows.pop(t.index, None)
            else:
                self.rows[t.index] = t
        now = time.monotonic()  # drawn at most fps times a second, and whenever a sequence left
        if now - self.last_draw >= self.min_gap or any(t.finished for t in ticks):
            self.live.refresh()
            self.last_draw = now

    def print(self, line: str) -> None:
        """A result line, above the view (rich keeps the view below what is printed)."""
        self.console.print(Text(line), soft_wrap=True, markup=False, highlight=False, emoji=False)


def make_progress(console: Console, total: int) -> tuple[Progress, object]:
    """A progress bar over `total` prompts (a TTY bar; on a non-terminal console, its final state)."""
    progress = Progress(TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("prompts"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console, transient=False, refresh_per_second=4,
                        redirect_stdout=False, redirect_stderr=False)
    return progress, progress.add_task("generate", total=total)
