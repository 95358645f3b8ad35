"""How results look in Jupyter and in a plain ``repr``, and streams that render in place.

Why one module: a completion, its timings, a tool call, a loaded model and an evidence result are
shown the same way wherever they appear (a notebook cell's HTML, Markdown, a terminal's repr),
and model output is untrusted text, so escaping is done here once: ``html.escape`` for HTML, a
fenced code block (longer than any backtick run in the text) for Markdown. Classes take the
``Rendered`` mixin and name their ``Renderer``; nothing here imports IPython until a stream is
shown inside a running kernel.
"""

from __future__ import annotations

import dataclasses
import html
import re
import sys
import time
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .evidence.results import Evidence, SuiteResult
    from .types import Chunk, Completion, Timings, ToolCall, Usage

TEXT_REPR_CHARS = 200   # a Completion's repr shows this much of its text
ARGS_REPR_CHARS = 120   # and of each tool call's arguments
UPDATES_PER_S = 20      # a streamed display is redrawn at most this often


@dataclass(frozen=True)
class Renderer:
    """The three faces of one type: HTML and Markdown for Jupyter, text for ``repr``."""

    html: Callable[[Any], str]
    markdown: Callable[[Any], str]
    text: Callable[[Any], str]


class Rendered:
    """``_repr_html_``, ``_repr_markdown_`` and ``__repr__`` by the class's ``_renderer``
    (dataclasses using it pass ``repr=False`` so their generated repr does not replace it).
    A repr never raises: a renderer that fails falls back to the type's name and the error."""

    __slots__ = ()
    _renderer: ClassVar[Renderer]

    def _repr_html_(self) -> str:
        return self._renderer.html(self)

    def _repr_markdown_(self) -> str:
        return self._renderer.markdown(self)

    def __repr__(self) -> str:
        try:
            return self._renderer.text(self)
        except Exception as exc:  # a repr that raises hides the real error in tracebacks
            return f"<{type(self).__name__} (repr failed: {type(exc).__name__})>"


# --- small pieces ---------------------------------------------------------------------------
_STYLE = "border-collapse:collapse;font-size:90%;margin-top:4px"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    """Headers and cells are plain text, escaped here."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table style="{_STYLE}"><tr>{head}</tr>{body}</table>'


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~!])")


def _md(value: object) -> str:
    """Inline Markdown for untrusted text: HTML escaped, inline Markdown punctuation
    backslashed, on one line (so it cannot end a table row). Callers put it mid-line, where
    block markers (``#``, ``-``, ``1.``) mean nothing."""
    one_line = " ".join(str(value).split())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(one_line, quote=False))


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_block(text: str, info: str = "") -> str:
    """``text`` verbatim in a fenced code block whose fence no backtick run inside can close."""
    runs = [len(r) for r in re.findall(r"`+", text)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"… [{len(text)} chars]"


def _ms(x: float) -> str:
    return f"{x:.0f} ms" if abs(x) >= 10 else f"{x:.1f} ms"


def _rate(x: float) -> str:
    return f"{x:.1f} t/s"


# --- timings ---------------------------------------------------------------------------------
def _timing_rows(t: Timings, usage: Usage | None = None) -> list[list[str]]:
    rows = [["TTFT", _ms(t.ttft_ms)],
            ["prompt", f"{_rate(t.prompt_tokens_per_s)} ({t.prompt_eval_tokens} tokens)"],
            ["decode", f"{_rate(t.decode_tokens_per_s)} ({t.decode_tokens} tokens)"]]
    if usage is not None:
        rows.append(["cached tokens", f"{usage.cached_prompt_tokens} of {usage.prompt_tokens}"])
    rows.append(["total", _ms(t.total_ms)])
    if t.load_ms:
        rows.append(["load", _ms(t.load_ms)])
    return rows


def timings_html(t: Timings) -> str:
    return _html_table(["timing", "value"], _timing_rows(t))


def timings_markdown(t: Timings) -> str:
    return _md_table(["timing", "value"], _timing_rows(t))


def timings_text(t: Timings) -> str:
    return (f"Timings(ttft={_ms(t.ttft_ms)}, prompt={_rate(t.prompt_tokens_per_s)} over "
            f"{t.prompt_eval_tokens} tokens, decode={_rate(t.decode_tokens_per_s)} over "
            f"{t.decode_tokens} tokens, total={_ms(t.total_ms)})")


TIMINGS = Renderer(timings_html, timings_markdown, timings_text)


# --- tool calls ------------------------------------------------------------------------------
def tool_call_html(call: ToolCall) -> str:
    return (f"<code>{_e(call.name)}</code>(<code>{_e(call.arguments_json)}</code>)"
            + (f' <small style="color:#888">id {_e(call.id)}</small>' if call.id else ""))


def tool_call_markdown(call: ToolCall) -> str:
    return f"**{_md(call.name)}**\n\n" + _md_block(call.arguments_json, "json")


def tool_call_text(call: ToolCall) -> str:
    return (f"ToolCall({call.name}({_shorten(call.arguments_json, ARGS_REPR_CHARS)})"
            + (f", id={call.id!r}" if call.id else "") + ")")


TOOL_CALL = Renderer(tool_call_html, tool_call_markdown, tool_call_text)


# --- completions -----------------------------------------------------------------------------
def _summary(c: Completion) -> list[str]:
    return [f"finish: {c.finish_reason}",
            f"{c.usage.prompt_tokens} prompt + {c.usage.completion_tokens} completion tokens"]


def completion_html(c: Completion) -> str:
    parts = ['<div class="tongyi-completion">',
             f'<pre style="white-space:pre-wrap;margin:0 0 4px 0">{_e(c.text)}</pre>']
    if c.tool_calls:
        parts.append("<div>tool calls:<ul style=\"margin:0\">"
                     + "".join(f"<li>{tool_call_html(t)}</li>" for t in c.tool_calls)
                     + "</ul></div>")
    meta = _summary(c) + ([f"model {c.model}"] if c.model else [])
    parts.append(f'<div style="color:#666;font-size:90%">{_e(" · ".join(meta))}</div>')
    parts.append(_html_table(["timing", "value"], _timing_rows(c.timings, c.usage)))
    return "".join(parts) + "</div>"


def completion_markdown(c: Completion) -> str:
    parts = [_md_block(c.text)]
    parts += [f"tool call {tool_call_markdown(t)}" for t in c.tool_calls]
    meta = _summary(c) + ([f"model {c.model}"] if c.model else [])
    parts.append(_md(" · ".join(meta)))
    parts.append(_md_table(["timing", "value"], _timing_rows(c.timings, c.usage)))
    return "\n\n".join(parts)


def completion_text(c: Completion) -> str:
    t, u = c.timings, c.usage
    fields = [repr(_shorten(c.text, TEXT_REPR_CHARS)), f"finish={c.finish_reason}",
              f"tokens={u.prompt_tokens}+{u.completion_tokens}"
              + (f" ({u.cached_prompt_tokens} cached)" if u.cached_prompt_tokens else ""),
              f"ttft={_ms(t.ttft_ms)}", f"prompt={_rate(t.prompt_tokens_per_s)}",
              f"decode={_rate(t.decode_tokens_per_s)}"]
    if c.tool_calls:
        fields.append("tool_calls=[" + ", ".join(tool_call_text(x) for x in c.tool_calls) + "]")
    if c.parsed is not None:
        fields.append(f"parsed={type(c.parsed).__name__}")
    if c.model:
        fields.append(f"model={c.model!r}")
    return f"Completion({', '.join(fields)})"


COMPLETION = Renderer(completion_html, completion_markdown, completion_text)


# --- loaded models (ps) -------------------------------------------------------------------
def _cell(name: str, value: object) -> str:
    """A ``ps`` field as people read it: bytes in MiB, seconds rounded, tuples joined."""
    if isinstance(value, bool):
        return str(value)
    if name.endswith("bytes") and isinstance(value, (int, float)):
        return f"{value / 2**20:.1f} MiB"
    if name.endswith("_s") and isinstance(value, (int, float)):
        return f"{value:.1f} s"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, (tuple, list, set, frozenset)):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _row(row: Any) -> tuple[list[str], list[str]]:
    """Every field of a dataclass row (new fields show up without a change here)."""
    fs = dataclasses.fields(row)
    return [f.name for f in fs], [_cell(f.name, getattr(row, f.name)) for f in fs]


def row_html(row: Any) -> str:
    headers, cells = _row(row)
    return _html_table(headers, [cells])


def row_markdown(row: Any) -> str:
    headers, cells = _row(row)
    return _md_table(headers, [cells])


def row_text(row: Any) -> str:
    headers, cells = _row(row)
    return f"{type(row).__name__}(" + ", ".join(f"{h}={c}" for h, c in zip(headers, cells)) + ")"


ROW = Renderer(row_html, row_markdown, row_text)


# --- evidence --------------------------------------------------------------------------------
def _markdown_to_html(text: str) -> str:
    """CommonMark with tables, raw HTML in the input escaped (model names are file names)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def suite_markdown(result: SuiteResult) -> str:
    from .evidence.report import markdown

    return markdown(result, None)


def suite_html(result: SuiteResult) -> str:
    return f'<div class="tongyi-evidence">{_markdown_to_html(suite_markdown(result))}</div>'


def _evidence_counts(ev: Evidence) -> str:
    sections = ("speed", "roofline", "thread_sweep", "presets", "quality", "crosscheck", "tasks")
    counts = [f"{len(getattr(ev, s))} {s}" for s in sections if getattr(ev, s)]
    return ", ".join(counts) or "no rows"


def suite_text(result: SuiteResult) -> str:
    decision = ", ".join(f"{r.role}→{r.model}" for r in result.decision) or "none"
    models = ", ".join(m.model for m in result.models) or "none"
    extra = ""
    if result.regressions is not None:
        extra = f", {len(result.regressions)} regression(s)"
    return (f"SuiteResult(models: {models}; rows: {_evidence_counts(result.evidence)}; "
            f"decision: {decision}{extra}; created {result.evidence.created})")


def _evidence_only(ev: Evidence) -> SuiteResult:
    from .evidence.decide import Rules
    from .evidence.results import SuiteResult

    return SuiteResult(evidence=ev, models=(), decision=(), rules=Rules())


def evidence_text(ev: Evidence) -> str:
    return f"Evidence({_evidence_counts(ev)}; created {ev.created})"


SUITE = Renderer(suite_html, suite_markdown, suite_text)
EVIDENCE = Renderer(lambda ev: suite_html(_evidence_only(ev)),
                    lambda ev: suite_markdown(_evidence_only(ev)), evidence_text)


# --- showing things --------------------------------------------------------------------------
def kernel_display() -> Callable[..., Any] | None:
    """IPython's ``display`` when running in a Jupyter kernel (not a terminal), else None.
    IPython is only looked up, never imported: in a kernel it is already loaded."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or getattr(shell, "kernel", None) is None:
        return None
    from IPython.display import display

    return display


class _Partial(Rendered):
    """The text so far of a stream being shown."""

    def __init__(self, text: str) -> None:
        self.text = text

    _renderer = Renderer(
        html=lambda p: ('<div class="tongyi-stream"><pre style="white-space:pre-wrap;margin:0">'
                        f'{_e(p.text)}▌</pre></div>'),
        markdown=lambda p: _md_block(p.text),
        text=lambda p: p.text)


class _Live:
    """Where a stream is shown: one updated output area in a kernel, stdout elsewhere."""

    def __init__(self) -> None:
        display = kernel_display()
        self._handle = display(_Partial(""), display_id=True) if display else None
        self._parts: list[str] = []
        self._drawn = 0.0
        self._completion: Completion | None = None

    def take(self, chunk: Chunk) -> None:
        if chunk.completion is not None:
            self._completion = chunk.completion
        if chunk.text:
            self.add(chunk.text)

    def add(self, text: str) -> None:
        if self._handle is None:
            print(text, end="", flush=True)
            return
        self._parts.append(text)
        now = time.monotonic()
        if now - self._drawn >= 1 / UPDATES_PER_S:
            self._handle.update(_Partial("".join(self._parts)))
            self._drawn = now

    def finish(self) -> Completion:
        if self._completion is None:
            from .errors import BackendError

            raise BackendError("the stream ended without a final result")
        if self._handle is None:
            print(flush=True)
        else:
            self._handle.update(self._completion)
        return self._completion


def show(stream: Iterable[Chunk]) -> Completion:
    """Show a stream as it arrives and return its ``Completion``.

    In Jupyter one output area is updated in place and ends as the completion's display (text,
    tool calls, timings); elsewhere the text is printed to stdout as it comes. Interrupting
    closes the stream, which cancels the request.
    """
    live = _Live()
    try:
        for chunk in stream:
            live.take(chunk)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return live.finish()


async def ashow(stream: AsyncIterable[Chunk]) -> Completion:
    """``show`` for ``astream``: ``await tongyi_local.ashow(model.astream(...))``."""
    live = _Live()
    try:
        async for chunk in stream:
            live.take(chunk)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    return live.finish()


@contextmanager
def progress_bar(description: str, unit: str = "B") -> Iterator[Callable[[int, int], None]]:
    """An ``on_progress(done, total)`` drawing a ``tqdm.auto`` bar: a widget in Jupyter, text on
    a terminal's stderr. Closed when the block ends."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=description, unit=unit, unit_scale=True, unit_divisor=1024, leave=True)
    try:
        def update(done: int, total: int) -> None:
            if total and bar.total != total:
                bar.total = total
            bar.n = min(done, total) if total else done
            bar.refresh()

        yield update
    finally:
        bar.close()


@contextmanager
def step_bar(total: int, description: str) -> Iterator[Callable[[str], None]]:
    """A ``progress(line)`` for work in ``total`` named steps: each line starts the next step
    of a ``tqdm.auto`` bar and becomes its label."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit="step", leave=True)
    started = False

    def step(line: str) -> None:
        nonlocal started
        if started:
            bar.update(1)
        started = True
        bar.set_postfix_str(line)

    try:
        yield step
        bar.update(max(total - bar.n, 0))
        bar.set_postfix_str("done")
    finally:
        bar.close()
