"""How results show themselves (display.py): escaped HTML and Markdown for any model output, a
repr that never raises, streams shown as they arrive, progress bars, and the synchronous API
called from inside a running event loop (as in a notebook cell)."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

import tongyi_local
from tongyi_local import display
from tongyi_local.display import progress_bar, step_bar
from tongyi_local.evidence.results import Evidence
from tongyi_local.pool import LoadedModel
from tongyi_local.types import Completion, Timings, ToolCall, Usage

OUR_TAGS = {"div", "pre", "ul", "li", "code", "small", "table", "tr", "th", "td"}


class Page(HTMLParser):
    """The tags of an HTML fragment and the text of each ``<pre>``, entities decoded."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.pre: list[str] = []
        self.data: list[str] = []
        self._in_pre = False
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        self.data.append(data)
        if self._in_pre:
            self.pre[-1] += data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8)
tool_calls = st.builds(ToolCall, id=st.text(max_size=20), name=st.text(max_size=30),
                       arguments=st.dictionaries(st.text(), json_values, max_size=4))
counts = st.integers(min_value=0, max_value=10**9)
any_float = st.floats(allow_nan=True, allow_infinity=True)
timings = st.builds(Timings, load_ms=any_float, prompt_eval_ms=any_float,
                    prompt_eval_tokens=counts, ttft_ms=any_float, decode_ms=any_float,
                    decode_tokens=counts, total_ms=any_float)
completions = st.builds(
    Completion, text=st.text(), finish_reason=st.sampled_from(["stop", "length", "tool_calls"]),
    usage=st.builds(Usage, counts, counts, counts), timings=timings, model=st.text(max_size=30),
    tool_calls=st.lists(tool_calls, max_size=3).map(tuple))


@settings(max_examples=300, deadline=None)
@given(completions)
def test_any_completion_is_valid_html_with_its_text_escaped(c):
    page = Page(c._repr_html_())
    assert set(page.tags) <= OUR_TAGS, "model output never becomes markup"
    assert page.pre[0] == c.text
    shown = "".join(page.data)
    for call in c.tool_calls:
        assert call.name in shown and call.arguments_json in shown
    assert "TTFT" in shown and "cached tokens" in shown


def _markdown_tokens(text: str):
    tokens = MarkdownIt("commonmark").enable("table").parse(text)  # raw HTML on, as Jupyter
    flat = [t for tok in tokens for t in (tok, *(tok.children or ()))]
    return tokens, flat


@settings(max_examples=300, deadline=None)
@given(completions)
def test_any_completion_is_markdown_whose_text_stays_literal(c):
    tokens, flat = _markdown_tokens(c._repr_markdown_())
    assert not [t for t in flat if t.type in ("html_inline", "html_block")]
    fences = [t for t in tokens if t.type == "fence"]
    block = c.text + "\n"  # Markdown has one kind of line end: \r\n and \r read as \n
    assert fences[0].content == block.replace("\r\n", "\n").replace("\r", "\n").replace(
        "\0", "\ufffd")
    assert [f.content for f in fences[1:]] == [t.arguments_json + "\n" for t in c.tool_calls]


@settings(max_examples=300, deadline=None)
@given(completions)
def test_repr_never_raises_and_shows_the_start_of_the_text(c):
    text = repr(c)
    assert text.startswith("Completion(") and f"finish={c.finish_reason}" in text
    assert repr(c.text[:200])[:-1] in text  # up to the quote or the "… [N chars]" after it
    assert all(repr(t) in text for t in c.tool_calls)
    repr(c.timings), c.timings._repr_html_(), c.timings._repr_markdown_()


def test_a_script_in_the_output_is_shown_as_text():
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    c = Completion(evil, "tool_calls", Usage(3, 4, 1), Timings(ttft_ms=12.5),
                   model="<b>m</b>", tool_calls=(ToolCall("1", "<i>f</i>", {"q": evil}),))
    page = c._repr_html_()
    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    md = c._repr_markdown_()
    assert "<i>" not in md and "&lt;b&gt;m&lt;/b&gt;" in md


def test_a_long_completion_repr_is_short_and_names_the_figures():
    c = Completion("word " * 1000, "length", Usage(120, 400, 100),
                   Timings(prompt_eval_ms=100, prompt_eval_tokens=20, ttft_ms=110,
                           decode_ms=2000, decode_tokens=399, total_ms=2110),
                   model="m", tool_calls=(ToolCall("c1", "search", {"q": "x" * 500}),))
    text = repr(c)
    assert len(text) < 600
    assert "… [5000 chars]" in text and "tokens=120+400 (100 cached)" in text
    assert "ttft=110 ms" in text and "prompt=200.0 t/s" in text and "decode=199.5 t/s" in text
    assert 'ToolCall(search({"q": "xxx' in text and "finish=length" in text
    assert repr(c.timings) == ("Timings(ttft=110 ms, prompt=200.0 t/s over 20 tokens, "
                               "decode=199.5 t/s over 399 tokens, total=2110 ms)")


def test_a_renderer_that_fails_still_gives_a_repr():
    odd = ToolCall("1", "f", {"x": {1, 2}})  # a set: not JSON, the renderer's json.dumps fails
    assert repr(odd) == "<ToolCall (repr failed: TypeError)>"


def test_loaded_models_show_every_field_readably():
    row = LoadedModel("qwen-7b", 3 * 2**30, ("coder", "tester"), 2, 1.25, 60.0)
    assert repr(row) == ("LoadedModel(name=qwen-7b, memory_bytes=3072.0 MiB, roles=coder, tester, "
                         "in_flight=2, idle_s=1.2 s, loaded_s=60.0 s)")
    page = Page(row._repr_html_())
    assert page.tags.count("th") == len(row.__dataclass_fields__)
    assert "3072.0 MiB" in page.data and "coder, tester" in page.data
    assert "| 3072.0 MiB | coder, tester |" in row._repr_markdown_()


def test_empty_evidence_has_a_short_repr_and_a_report():
    ev = Evidence(created="2026-01-01T00:00:00+0000")
    assert repr(ev) == "Evidence(no rows; created 2026-01-01T00:00:00+0000)"
    assert "<h1>tongyi-local evidence report</h1>" in ev._repr_html_()


def test_show_prints_a_stream_outside_jupyter_and_returns_the_completion(chat_model, capsys):
    messages = [{"role": "user", "content": "Name a colour."}]
    done = tongyi_local.show(chat_model.stream(messages, max_tokens=12, temperature=0))
    assert isinstance(done, Completion) and done.text
    assert capsys.readouterr().out == done.text + "\n"
    again = asyncio.run(tongyi_local.ashow(chat_model.astream(messages, max_tokens=12,
                                                              temperature=0)))
    assert again.text == done.text and capsys.readouterr().out == done.text + "\n"


def test_an_interrupted_show_closes_the_stream(chat_model, monkeypatch):
    """Interrupting a notebook cell raises KeyboardInterrupt wherever ``show`` is: the stream
    is closed then (which cancels the request), not left to the garbage collector."""
    closed, shown = [], []

    def chunks():
        try:
            yield from chat_model.stream("Count to ten:", max_tokens=40, temperature=0)
        finally:
            closed.append(True)

    def add(self, text):
        shown.append(text)
        if len(shown) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(display._Live, "add", add)
    try:
        tongyi_local.show(chunks())
    except KeyboardInterrupt:
        closed_by_then = list(closed)  # the traceback still holds the stream: not collected
    assert closed_by_then == [True]


def test_a_stream_without_a_final_result_is_an_error():
    from tongyi_local.types import Chunk

    with pytest.raises(tongyi_local.BackendError, match="without a final result"):
        tongyi_local.show(iter([Chunk("partial")]))


def test_the_sync_api_works_inside_a_running_event_loop(chat_model, outside_any_project):
    """A notebook cell runs inside the kernel's event loop: nothing synchronous may start one."""
    messages = [{"role": "user", "content": "Say hi."}]

    async def cell():
        assert asyncio.get_running_loop().is_running()
        chat = chat_model.chat(messages, max_tokens=6, temperature=0)
        text = chat_model.complete("Hello", max_tokens=4, temperature=0).text
        streamed = "".join(c.text for c in chat_model.stream(messages, max_tokens=6,
                                                              temperature=0))
        shown = tongyi_local.show(chat_model.stream(messages, max_tokens=6, temperature=0))
        with tongyi_local.for_role("coder", profile="starter") as coder:
            role = coder.chat(messages, max_tokens=6, temperature=0)
        awaited = await chat_model.achat(messages, max_tokens=6, temperature=0)
        return chat, text, streamed, shown, role, awaited

    chat, text, streamed, shown, role, awaited = asyncio.run(cell())
    assert chat.text and text and role.text
    assert streamed == chat.text == shown.text == awaited.text


def test_progress_bars_draw_with_tqdm_auto(capsys):
    with progress_bar("copying") as update:
        for done in (0, 512, 2048):
            update(done, 2048)
    err = capsys.readouterr().err
    assert "copying" in err and "100%" in err and "2.00k/2.00k" in err
    with step_bar(3, "steps") as step:
        step("first")
        step("second")
    err = capsys.readouterr().err
    assert "3/3" in err and "second" in err and "done" in err


def test_importing_the_library_does_not_import_ipython():
    import subprocess

    code = ("import sys, tongyi_local, tongyi_local.display; "
            "tongyi_local.Completion; print('IPython' in sys.modules, 'tqdm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_timings_rates_survive_odd_figures():
    t = Timings(prompt_eval_ms=math.inf, prompt_eval_tokens=3, decode_ms=0.0, decode_tokens=5)
    assert "decode=0.0 t/s over 5 tokens" in repr(t)
    assert json.loads(ToolCall("1", "f", {"a": [1]}).arguments_json) == {"a": [1]}
