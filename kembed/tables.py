"""Results tables in two forms from the same cells: GitHub Markdown (full headers, one table) and
the console (short headers, a legend, split into as many tables as the terminal width needs).

In the console form numeric columns are never wrapped, so a number or an interval stays on one
line; text columns (model names, modes) wrap between words. When the whole table is wider than
the console, its column groups (for example one group per evaluation mode) are packed into
consecutive tables, each repeating the key columns (the model), in the order given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table: one header row, then one row per list of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


class ConsoleTables:
    """A rich renderable: the table, or the fewest consecutive tables that fit the console width.

    Args:
        title: printed above each table.
        header: short column headers (the legend explains them).
        body: one list of cells per row, as long as ``header``.
        numbers: indices of numeric columns: right-aligned and never wrapped.
        key: the first ``key`` columns (e.g. the model) start every table.
        groups: lists of column indices (after the key columns) kept in one table; default: each
            column alone. Together they must name every non-key column.
        legend: lines printed under the last table.
    """

    def __init__(self, title: str, header: Sequence[str], body: Sequence[Sequence[str]], *,
                 numbers: Iterable[int] = (), key: int = 1, groups: Sequence[Sequence[int]] | None = None,
                 legend: Sequence[str] = ()):
        self.title, self.header, self.body = title, list(header), [list(r) for r in body]
        self.numbers, self.key, self.legend = set(numbers), key, list(legend)
        self.groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(key, len(header))]

    def min_width(self, col: int) -> int:
        """Characters column ``col`` needs: its longest cell (header included) when numeric, else
        its longest word."""
        texts = [self.header[col], *(row[col] for row in self.body)]
        if col in self.numbers:
            return max(len(t) for t in texts)
        return max((len(w) for t in texts for w in t.split()), default=1)

    def pack(self, width: int) -> list[list[int]]:
        """Column indices of each table: the key columns, then groups in order while the table
        fits ``width`` with every column at :meth:`min_width`; a group too wide on its own still
        gets a table."""
        keys = list(range(self.key))
        tables = [keys.copy()]
        for group in self.groups:
            cols = tables[-1] + group
            if len(tables[-1]) > len(keys) and sum(map(self.min_width, cols)) + _border(len(cols)) > width:
                tables.append(keys.copy())
            tables[-1] += group
        return tables

    def widths(self, cols: list[int], width: int) -> list[int]:
        """Content width of each column of a table of ``cols``: its longest cell, less for text
        columns (the widest first, never under :meth:`min_width`) until the table fits ``width``.
        Rich's own shrinking ignores word lengths, so the widths are fixed here."""
        want = {c: max(len(t) for t in [self.header[c], *(row[c] for row in self.body)]) for c in cols}
        room = width - _border(len(cols))
        while sum(want.values()) > room:
            text = [c for c in cols if c not in self.numbers and want[c] > self.min_width(c)]
            if not text:
                break
            want[max(text, key=want.__getitem__)] -= 1
        return [want[c] for c in cols]

    def __rich_console__(self, console, options):
        from rich.table import Table
        from rich.text import Text

        for cols in self.pack(options.max_width):
            table = Table(title=self.title, title_justify="left")
            for c, w in zip(cols, self.widths(cols, options.max_width)):
                number = c in self.numbers
                table.add_column(Text(self.header[c]), justify="right" if number else "left", no_wrap=number,
                                 overflow="fold", width=w)
            for row in self.body:
                table.add_row(*(Text(row[c]) for c in cols))  # Text: brackets are not markup
            yield table
        for line in self.legend:
            yield Text(line, style="dim")


def _border(columns: int) -> int:
    """Characters a rich table of ``columns`` columns adds to its cells: one space of padding
    each side of a cell and one line between and around the columns."""
    return 3 * columns + 1
