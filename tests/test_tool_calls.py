"""Tool definitions, tool-call parsing, the streaming call-text filter and chat rendering with
tools: pure Python, no model (the real-model paths are in test_agents_local.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tongyi_local import chat_format
from tongyi_local.errors import InvalidRequestError, OutputParseError
from tongyi_local.testing import QWEN25_TEMPLATE
from tongyi_local.tool_calls import OPEN, CallTextFilter, parse_tool_calls
from tongyi_local.types import Message, Request, Sampling, Tool, ToolCall, ToolChoice

WEATHER = Tool("get_weather", "Weather for a city", {
    "type": "object", "properties": {"city": {"type": "string"},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city"], "additionalProperties": False})
SEARCH = Tool("search", "Search the web", {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]})
TOOLS = (WEATHER, SEARCH)

# Raw answers as models write them -> (content, [(name, arguments)]) or the error's words.
WILD = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "", [("get_weather", {"city": "Paris"})]),
    ('I will look that up.\n<tool_call>\n{"name": "search", "arguments": {"q": "llama"}}\n'
     '</tool_call>', "I will look that up.", [("search", {"q": "llama"})]),
    ('<tool_call>\n{"name": "search", "arguments": {"q": "a"}}\n</tool_call>\nDone, thanks.',
     "Done, thanks.", [("search", {"q": "a"})]),
    ('<tool_call>\n{"name": "search", "arguments": {"q": "a"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>',
     "", [("search", {"q": "a"}), ("get_weather", {"city": "Oslo", "days": 3})]),
    # no closing tag at the very end (the model stopped there): forgiven
    ('<tool_call>\n{"name": "search", "arguments": {"q": "x"}}', "", [("search", {"q": "x"})]),
    # arguments encoded as a JSON string, as some models do
    ('<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"y\\"}"}</tool_call>', "",
     [("search", {"q": "y"})]),
    ("Just text, no call.", "Just text, no call.", []),
]
BROKEN = [
    ('<tool_call>\n{"name": "search", "arguments": {"q": }\n</tool_call>', "not valid JSON"),
    ('<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>', "was not offered"),
    ('<tool_call>\n{"arguments": {"q": "x"}}\n</tool_call>', '"name"'),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": 3}}\n</tool_call>', "city"),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "x", "days": 9}}\n</tool_call>',
     "days"),
    ('<tool_call>\n{"name": "search", "arguments": [1, 2]}\n</tool_call>', "JSON object"),
]


@pytest.mark.parametrize(("raw", "content", "calls"), WILD)
def test_tool_calls_seen_in_the_wild_parse(raw, content, calls):
    got_content, got = parse_tool_calls(raw, TOOLS)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)


@pytest.mark.parametrize(("raw", "words"), BROKEN)
def test_broken_tool_calls_are_a_clear_error(raw, words):
    with pytest.raises(OutputParseError, match=words):
        parse_tool_calls(raw, TOOLS)


@settings(max_examples=300, deadline=None)
@given(before=st.text(alphabet="ab<>_/tolc \n", max_size=40),
       after=st.text(max_size=30), cuts=st.lists(st.integers(0, 120), max_size=8),
       with_call=st.booleans())
def test_call_text_filter_streams_exactly_the_content_before_the_first_call(before, after, cuts,
                                                                          with_call):
    text = before + (OPEN + after if with_call else "")
    content = text[:text.find(OPEN)] if OPEN in text else text
    pieces, last = [], 0
    for cut in sorted(set(c for c in cuts if c <= len(text))) + [len(text)]:
        pieces.append(text[last:cut])
        last = cut
    stream = CallTextFilter()
    shown = "".join(stream.feed(p) for p in pieces)
    assert OPEN not in shown and content.startswith(shown)
    if OPEN not in text:  # all content arrives, the held-back tail with the final chunk
        assert shown + stream.rest(content) == content
    else:
        assert shown == content


def test_tools_from_dicts_and_functions():
    def lookup(city: str, days: int = 1) -> str:
        """Weather for a city.

        Args:
            city: The city name.
            days: How many days ahead.
        """
        return f"{city}:{days}"

    tool = Tool.coerce(lookup)
    assert tool.name == "lookup" and tool.description.startswith("Weather for a city")
    assert tool.parameters["required"] == ["city"] and tool.function is lookup
    assert Tool.coerce({"type": "function", "function": {
        "name": "search", "description": "Search the web",
        "parameters": SEARCH.parameters}}) == SEARCH
    assert Tool.coerce(SEARCH.to_openai()["function"]) == SEARCH


@pytest.mark.parametrize(("tool", "words"), [
    ({"type": "function", "function": {"name": "bad name!", "parameters": {"type": "object"}}},
     "tool name"),
    ({"type": "function", "function": {"name": "x", "parameters": {"type": "array"}}},
     "type 'object'"),
    ({"type": "function", "function": {"name": "x", "parameters": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}, "invalid JSON schema"),
    ({"type": "function", "function": {"name": "x", "params": {}}}, "unknown field"),
    ({"type": "retrieval"}, "a tool must be"),
    (42, "a tool must be"),
])
def test_invalid_tools_are_refused_before_any_work(tool, words):
    with pytest.raises(InvalidRequestError, match=words):
        Request.build(Sampling(), messages=(Message("user", "hi"),), tools=[tool])


@pytest.mark.parametrize(("choice", "words"), [
    ("sometimes", "tool_choice must be"),
    ({"name": "get_time"}, "not one of the tools"),
    ({"type": "function", "function": {}}, "must name a tool"),
])
def test_unknown_tool_choice_is_refused(choice, words):
    with pytest.raises(InvalidRequestError, match=words):
        ToolChoice.coerce(choice, TOOLS)


def test_required_tool_choice_needs_tools():
    with pytest.raises(InvalidRequestError, match="needs tools"):
        Request.build(Sampling(), messages=(Message("user", "hi"),), tool_choice="required")


def test_a_tool_result_must_answer_an_earlier_call():
    from tongyi_local.types import coerce_messages

    call = {"id": "call_1", "type": "function",
            "function": {"name": "search", "arguments": '{"q": "x"}'}}
    ok = coerce_messages([{"role": "user", "content": "find x"},
                          {"role": "assistant", "content": "", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "found"}])
    assert ok[1].tool_calls == (ToolCall("call_1", "search", {"q": "x"}),)
    with pytest.raises(InvalidRequestError, match="call_9"):
        coerce_messages([{"role": "user", "content": "find x"},
                         {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call_9", "content": "found"}])


def test_qwen_template_renders_tools_calls_and_results():
    messages = (Message("system", "Be brief."), Message("user", "Weather in Paris?"),
                Message("assistant", "", (ToolCall("call_1", "get_weather", {"city": "Paris"}),)),
                Message("tool", "sunny <b>", tool_call_id="call_1"))
    text = chat_format.render(QWEN25_TEMPLATE, messages, TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert json.dumps(WEATHER.to_openai()) in text  # tojson is plain JSON, not HTML-escaped
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            in text)
    assert "<|im_start|>user\n<tool_response>\nsunny <b>\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_template_without_tools_gets_the_documented_tool_prompt():
    plain = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = (Message("user", "Weather?"),
                Message("assistant", "", (ToolCall("c1", "get_weather", {"city": "Rome"}),)),
                Message("tool", "rain", tool_call_id="c1"))
    text = chat_format.render(plain, messages, TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools")
    assert "<tools>\n" + json.dumps(WEATHER.to_openai()) in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather"' in text
    assert "<|im_start|>user\n<tool_response>\nrain\n</tool_response><|im_end|>" in text


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for m in messages %}{{ m.update({'role': 'x'}) }}{% endfor %}",
])
def test_a_template_reaching_for_python_internals_is_refused(template):
    with pytest.raises(InvalidRequestError, match="sandbox forbids"):
        chat_format.render(template, (Message("user", "hi"),), model="evil.gguf")


def test_template_errors_name_the_model():
    with pytest.raises(InvalidRequestError, match="m.gguf.*alternate"):
        chat_format.render("{{ raise_exception('roles must alternate') }}",
                           (Message("user", "hi"),), model="m.gguf")
    with pytest.raises(InvalidRequestError, match="not valid Jinja"):
        chat_format.render("{% for %}", (Message("user", "hi"),), model="m.gguf")
