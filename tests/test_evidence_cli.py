"""The evidence commands through typer's CliRunner on an app that only has them registered
(cli.py adds them with one register() call)."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from tongyi_local.cli_evidence import register
from tongyi_local.errors import ConfigError, InvalidRequestError
from tongyi_local.gguf_header import read_header
from tongyi_local.testing import write_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    return app


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny-F16.gguf", "qwen2", n_embd=256,
                            n_ff=512, dtype="f16", context_length=4096)


def test_commands_are_registered(app):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("bench", "quantize", "report", "cost"):
        assert name in result.output


def test_quantize_command_and_the_requantize_flag(app, f16, tmp_path):
    q6 = tmp_path / "q6.gguf"
    result = runner.invoke(app, ["quantize", str(f16), str(q6), "--type", "Q6_K"])
    assert result.exit_code == 0, result.output
    assert "Q6_K from F16" in result.output and read_header(q6).file_type == "Q6_K"
    refused = runner.invoke(app, ["quantize", str(q6), str(tmp_path / "q4.gguf"), "--type", "Q4_K_M"])
    assert isinstance(refused.exception, InvalidRequestError)  # cli.main turns it into exit 1
    ok = runner.invoke(app, ["quantize", str(q6), str(tmp_path / "q4.gguf"), "--type", "Q4_K_M",
                             "--allow-requantize"])
    assert ok.exit_code == 0 and "quality cannot rise" in ok.output


def test_cost_command_prints_break_even_and_table(app):
    result = runner.invoke(app, ["cost", "--tokens-per-month", "50000000", "--tps", "40"])
    assert result.exit_code == 0, result.output
    assert "API $100.00" in result.output and "break-even:" in result.output
    for volume in ("1M", "10M", "100M", "1B"):
        assert volume in result.output
    missing = runner.invoke(app, ["cost", "--tokens-per-month", "5"])
    assert isinstance(missing.exception, ConfigError)


def test_bench_then_report_then_compare(app, f16, tmp_path):
    out = tmp_path / "ev.json"
    result = runner.invoke(app, ["bench", str(f16), "--rounds", "1", "--ctx", "4096",
                                 "--role", "coder", "--iterations", "1", "--reference", str(f16),
                                 "--quality-ctx", "128", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "roofline:" in result.output and "% of it" in result.output
    ev = json.loads(out.read_text())
    assert len(ev["speed"]) == 1 and ev["quality"][1]["kld_mean"] == 0.0
    assert [t["role"] for t in ev["tasks"]] == ["coder"]
    report_dir = tmp_path / "rep"
    result = runner.invoke(app, ["report", str(out), "-o", str(report_dir),
                                 "--require-decode", "coder=1"])
    assert result.exit_code == 0, result.output
    assert (report_dir / "report.md").exists() and (report_dir / "pareto.png").exists()
    worse = json.loads(out.read_text())
    worse["speed"][0]["decode_tps"] /= 3
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    result = runner.invoke(app, ["report", str(tmp_path / "worse.json"), "-o", str(report_dir),
                                 "--compare", str(out), "--fail-on-regression"])
    assert result.exit_code == 1 and "regression" in result.output
    cost = runner.invoke(app, ["cost", "--tokens-per-month", "1e6", "--results", str(out)])
    assert cost.exit_code == 0 and "measured for tiny-F16" in cost.output


def test_bad_require_decode_is_a_config_error(app, tmp_path):
    from tongyi_local.evidence.results import new_evidence, save_evidence

    path = save_evidence(new_evidence(), tmp_path / "empty.json")
    result = runner.invoke(app, ["report", str(path), "-o", str(tmp_path), "--require-decode", "coder"])
    assert isinstance(result.exception, ConfigError)


def test_bench_resolves_roles_and_names_missing_files(app):
    from tongyi_local.errors import ModelNotFoundError

    unknown = runner.invoke(app, ["bench", "no-such-role"])
    assert isinstance(unknown.exception, ConfigError) and "unknown role" in str(unknown.exception)
    missing = runner.invoke(app, ["bench", "/nonexistent/model.gguf"])
    assert isinstance(missing.exception, ModelNotFoundError)
