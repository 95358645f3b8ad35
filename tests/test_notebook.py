"""examples/quickstart.ipynb, executed top to bottom in a real Jupyter kernel (ipykernel, driven
by nbclient) on the packaged chat model, as a user runs it; and kept without outputs in git."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
KERNEL = "tongyi-local-test"


class RecordingClient(NotebookClient):
    """Counts each cell's kernel messages by type (``update_display_data`` leaves no output
    of its own: it rewrites the output it updates)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.messages: dict[int, Counter] = {}

    def process_message(self, msg, cell, cell_index):
        self.messages.setdefault(cell_index, Counter())[msg["msg_type"]] += 1
        return super().process_message(msg, cell, cell_index)


@pytest.fixture(scope="module")
def executed(tmp_path_factory, chat_model_path):
    """The notebook after a run in a kernel of this interpreter that imports this checkout."""
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec = jupyter / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tongyi-local test", "language": "python",
        "env": {"PYTHONPATH": str(ROOT)}}))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(jupyter))
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = RecordingClient(nb, kernel_name=KERNEL, timeout=600,
                                 resources={"metadata": {"path": str(NOTEBOOK.parent)}})
        client.execute()
    finally:
        mp.undo()
    return nb, client


def _code_cell(nb, needle: str) -> tuple[int, dict]:
    found = [(i, c) for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and needle in c.source]
    assert len(found) == 1, f"one code cell should contain {needle!r}"
    return found[0]


def _data(cell, mime: str) -> list[str]:
    return [o["data"][mime] for o in cell.outputs
            if o.output_type in ("display_data", "execute_result") and mime in o.get("data", {})]


def test_every_cell_runs_without_an_error(executed):
    nb, _ = executed
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors[0]["ename"] + ": " + errors[0]["evalue"]
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")


def test_the_packaged_chat_model_loads(executed):
    nb, _ = executed
    _, cell = _code_cell(nb, "model.name")
    assert _data(cell, "text/plain") == ["'SmolLM2-135M-Instruct.Q4_1'"]


def test_completions_display_as_html_with_timings(executed):
    nb, _ = executed
    for needle in ("reply = model.chat", "await model.achat", 'for_role("coder"'):
        _, cell = _code_cell(nb, needle)
        [page] = _data(cell, "text/html")
        assert 'class="tongyi-completion"' in page and "TTFT" in page and "decode" in page
        assert "cached tokens" in page
        assert _data(cell, "text/markdown"), "the Markdown form is offered too"
    _, cell = _code_cell(nb, "print(repr(reply))")
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    assert text.startswith("Completion(") and "finish=" in text and "decode=" in text


def test_the_stream_renders_in_one_updated_output_area(executed):
    nb, client = executed
    index, cell = _code_cell(nb, "tongyi_local.show(")
    [page] = _data(cell, "text/html")  # one area: every update rewrote it
    assert 'class="tongyi-completion"' in page and "TTFT" in page  # it ended as the completion
    assert client.messages[index]["display_data"] == 1
    assert client.messages[index]["update_display_data"] >= 2  # partial text, then the final
    assert _data(cell, "text/plain")[-1] in ("'length'", "'stop'")


def test_the_tool_call_parses_and_runs(executed):
    nb, _ = executed
    _, cell = _code_cell(nb, "tools=[get_weather]")
    [page] = _data(cell, "text/html")
    assert "tool calls:" in page and "<code>get_weather</code>" in page
    _, cell = _code_cell(nb, "get_weather(**tool_call.arguments)")
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    assert text.startswith("ToolCall(get_weather(") and "-> Sunny and 21 °C in" in text


def test_the_bench_shows_its_tables_and_its_chart(executed):
    nb, _ = executed
    _, cell = _code_cell(nb, "run_suite(plan")
    [page] = _data(cell, "text/html")
    assert "<table>" in page and "Quality against the reference" in page and "Q4_0" in page
    _, cell = _code_cell(nb, "result.show()")
    [chart] = _data(cell, "image/png")
    assert len(chart) > 5000  # base64 PNG
    assert _data(cell, "text/html"), "show() displays the tables before the chart"


def test_the_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert all(not c.metadata for c in nb.cells), "no cell metadata (execution times, ...)"
