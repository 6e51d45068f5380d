"""What a walkthrough prints, and keeps: numbered sections, named tensors with their shapes, tables that fit
100 columns. Every printed tensor is also kept by name (`Trace.values`), so a test can recompute it.

Numbers are printed with 4 decimals (-0.0000 is printed 0.0000, so a sign of rounding noise never differs
between machines); token pieces are printed as Python string literals, so a space or a newline is visible.
"""

from __future__ import annotations

import sys
import textwrap

import torch

WIDTH = 100  # every printed line fits a 100-column terminal


def num(v, decimals: int = 4) -> str:
    """A number with `decimals` decimals; -0.0000 -> 0.0000; ints and bools as they are."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    s = f"{v:.{decimals}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def piece(tok, token_id: int, width: int = 12) -> str:
    """One token as a quoted literal, e.g. ' is', '\\n', '<|im_end|>' (cut to `width` characters)."""
    s = repr(tok.decode([int(token_id)], skip_special=False))
    return s if len(s) <= width else s[: width - 2] + "..'"


class Trace:
    """Collects the lines of a walkthrough (printed as they come when echo) and the tensors it printed."""

    def __init__(self, echo: bool = True, out=None):
        self.lines: list[str] = []
        self.values: dict[str, object] = {}
        self.echo = echo
        self.out = out or sys.stdout
        self._section = 0

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    # ------------------------------------------------------------------------------------------ output

    def line(self, text: str = "") -> None:
        for ln in text.split("\n"):
            if len(ln) > WIDTH:
                ln = ln[: WIDTH - 3] + "..."
            self.lines.append(ln.rstrip())
            if self.echo:
                print(ln.rstrip(), file=self.out, flush=True)

    def note(self, text: str, indent: str = "  ") -> None:
        """A paragraph of explanation, wrapped to the width."""
        self.line(textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent))

    def section(self, title: str) -> None:
        self._section += 1
        head = f"-- {self._section}. {title} "
        self.line()
        self.line(head + "-" * max(0, WIDTH - len(head)))

    def keep(self, name: str, value) -> None:
        self.values[name] = value.detach().clone() if isinstance(value, torch.Tensor) else value

    def scalar(self, name: str, value, eq: str = "") -> None:
        """name = value   (eq)"""
        self.keep(name, value)
        head = f"  {name} = {num(value)}"
        if eq and len(head) + 6 + len(eq) > WIDTH:
            self.line(head)
            self.note(eq, "      ")
        else:
            self.line(head + (f"      {eq}" if eq else ""))

    def tensor(self, name: str, x: torch.Tensor, eq: str = "", k: int = 6) -> None:
        """name (shape): the first k values   eq"""
        self.keep(name, x)
        flat = x.detach().flatten()
        vals = ", ".join(num(v) for v in flat[:k].tolist()) + (", ..." if flat.numel() > k else "")
        head = f"  {name} {tuple(x.shape)}: [{vals}]"
        if eq and len(head) + 3 + len(eq) > WIDTH:
            self.line(head)
            self.line(f"      {eq}")
        else:
            self.line(head + (f"   {eq}" if eq else ""))

    def table(self, header: list[str], rows: list[list], indent: str = "  ") -> None:
        """Columns right-aligned (the first ones left-aligned when they hold text), numbers with 4 decimals."""
        cells = [[c if isinstance(c, str) else num(c) for c in row] for row in rows]
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
        text_col = [all(isinstance(row[i], str) for row in rows) and rows for i in range(len(header))]

        def fmt(row):
            return indent + "  ".join(c.ljust(w) if t else c.rjust(w) for c, w, t in zip(row, widths, text_col))

        self.line(fmt(header))
        self.line(indent + "  ".join("-" * w for w in widths))
        for row in cells:
            self.line(fmt(row))

    def text_block(self, label: str, text: str, width: int = WIDTH - 14) -> None:
        """label: a decoded text, wrapped, newlines shown as \\n."""
        body = text.replace("\n", "\\n")
        lines = textwrap.wrap(body, width, drop_whitespace=False) or [""]
        pad = " " * 12
        self.line(f"  {label:<10}{lines[0]}")
        for ln in lines[1:]:
            self.line(pad + ln)
