"""Descriptions from docstrings: the summary and the per-parameter notes.

Why: a tool's description and its parameters' descriptions are what the model reads in the
prompt; they come from the function's (or class's) docstring in Google (``Args:``), Sphinx
(``:param x:``) or NumPy (``Parameters`` / ``----------``) style.
"""

from __future__ import annotations

import inspect
import re

_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params|Attributes|Keyword Args|"
                      r"Keyword Arguments|Other Parameters):\s*$")
_OTHER_SECTION = re.compile(r"^(Returns?|Yields?|Raises|Examples?|Notes?|See Also|Warnings?|"
                            r"Todo|References):\s*$")
_SPHINX_PARAM = re.compile(r"^:param\s+(?:[^:]*\s)?(\*{0,2}\w+)\s*:\s*(.*)$")
_GOOGLE_ENTRY = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_NUMPY_ENTRY = re.compile(r"^(\w+)\s*(?::.*)?$")


def _docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(first paragraph, {parameter: description}) from a Google, Sphinx or NumPy docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: list[str] = []
    for line in lines:
        stripped = line.strip()
        if not stripped or _SECTION.match(stripped) or _OTHER_SECTION.match(stripped) \
                or stripped.startswith(":"):
            break
        summary.append(stripped)
    notes: dict[str, str] = {}
    _google_notes(lines, notes)
    _sphinx_notes(lines, notes)
    _numpy_notes(lines, notes)
    return " ".join(summary), notes


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _google_notes(lines: list[str], notes: dict[str, str]) -> None:
    i = 0
    while i < len(lines):
        if not _SECTION.match(lines[i].strip()):
            i += 1
            continue
        header_indent = _indent(lines[i])
        i += 1
        entry_indent, current = None, None
        while i < len(lines):
            line = lines[i]
            if line.strip() and _indent(line) <= header_indent:
                break
            if line.strip():
                if entry_indent is None:
                    entry_indent = _indent(line)
                match = _GOOGLE_ENTRY.match(line.strip())
                if _indent(line) == entry_indent and match:
                    current = match.group(1).lstrip("*")
                    notes[current] = match.group(2).strip()
                elif current is not None:
                    notes[current] = (notes[current] + " " + line.strip()).strip()
            i += 1


def _sphinx_notes(lines: list[str], notes: dict[str, str]) -> None:
    current = None
    for line in lines:
        stripped = line.strip()
        match = _SPHINX_PARAM.match(stripped)
        if match:
            current = match.group(1).lstrip("*")
            notes[current] = match.group(2).strip()
        elif stripped.startswith(":") or not stripped:
            current = None
        elif current is not None and line.startswith((" ", "\t")):
            notes[current] = (notes[current] + " " + stripped).strip()


def _numpy_notes(lines: list[str], notes: dict[str, str]) -> None:
    for i in range(len(lines) - 1):
        if lines[i].strip() in ("Parameters", "Attributes") and \
                set(lines[i + 1].strip()) == {"-"}:
            base = _indent(lines[i])
            current = None
            for line in lines[i + 2:]:
                if not line.strip():
                    continue
                if _indent(line) == base:
                    match = _NUMPY_ENTRY.match(line.strip())
                    if not match:
                        break
                    current = match.group(1)
                    notes.setdefault(current, "")
                elif current is not None and _indent(line) > base:
                    notes[current] = (notes[current] + " " + line.strip()).strip()
