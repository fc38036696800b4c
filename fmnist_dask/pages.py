"""The HTML pages' building blocks: Jinja2 templates (``templates/``) and the data they draw.

The run report (``stages/report.py``) and the comparison page (``compare.py``) hand plain
data to their templates: tables as :class:`Table`, figures as :class:`Figure`, text as
strings, which the templates escape (autoescape); markup built in Python is a
:class:`~markupsafe.Markup`. Both pages share ``base.html.j2`` and ``style.css``.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup


@cache
def environment() -> jinja2.Environment:
    """The templates of this package, every value escaped unless it is ``Markup``."""
    return jinja2.Environment(loader=jinja2.PackageLoader("fmnist_dask", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True)


def render(template: str, **context: Any) -> str:
    """``template`` (a file in ``templates/``) filled with ``context``."""
    return environment().get_template(template).render(**context)


def num(value: Any, digits: int = 4) -> str:
    """A score with ``digits`` decimals, large values with thousands separators, blanks as –."""
    if value is None or isinstance(value, str):
        return "–" if value in (None, "") else value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "–"
    if float(number).is_integer() and abs(number) >= 1:
        return f"{int(number):,}"
    if abs(number) >= 1000:
        return f"{number:,.1f}"
    return f"{number:.{digits}f}"


@dataclass
class Cell:
    value: Any
    tag: str = "td"
    text: bool = False  # left-aligned text rather than a number


@dataclass
class Row:
    cells: list[Cell]
    cls: str = ""


@dataclass
class Head:
    value: Any
    text: bool = False
    attrs: Markup | str = ""


@dataclass
class Table:
    """An HTML table with ``<th scope>`` headers, drawn by the ``table`` macro."""

    head: list[Head]
    body: list[Row]
    caption: str | None = None
    attrs: Markup | str = ""


def table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], caption: str | None = None,
          row_headers: bool = True, text_columns: Sequence[int] = (0,), attrs: str = "",
          row_classes: Sequence[str] | None = None, header_attrs: Sequence[str] = ()) -> Table:
    """A table; the first cell of a row heads that row (``row_headers``).

    ``attrs`` and ``header_attrs`` are attribute markup written as given (``id="runs"``).
    """
    head = [Head(h, i in text_columns,
                 Markup(header_attrs[i]) if i < len(header_attrs) and header_attrs[i] else "")
            for i, h in enumerate(headers)]
    body = [Row([Cell(cell, "th" if i == 0 and row_headers else "td", i in text_columns)
                 for i, cell in enumerate(row)],
                row_classes[r] if row_classes else "")
            for r, row in enumerate(rows)]
    return Table(head, body, caption, Markup(attrs) if attrs else "")


@dataclass
class Figure:
    """A PNG of the run directory, embedded as a data URI (``src`` None: not produced)."""

    relative: str
    alt: str
    caption: str | None
    src: str | None
    size: tuple[int, int] | None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return None
    return struct.unpack(">II", data[16:24])


def figure(run_dir: Path, relative: str, alt: str, caption: str | None = None) -> Figure:
    """The figure ``run_dir/relative``, read now; drawn by the ``figure`` macro."""
    path = run_dir / relative
    if not path.is_file():
        return Figure(relative, alt, caption, None, None)
    data = path.read_bytes()
    encoded = base64.b64encode(data).decode("ascii")
    return Figure(relative, alt, caption, f"data:image/png;base64,{encoded}", _png_size(data))
