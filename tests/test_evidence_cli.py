"""The evidence commands through typer's CliRunner on an app that only has them registered
(cli.py adds them with one register() call)."""

from __future__ import annotations

import json
import os

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
    ev = json.loads(out.read_text())["evidence"]
    assert len(ev["speed"]) == 1 and ev["quality"][1]["kld_mean"] == 0.0
    assert [t["role"] for t in ev["tasks"]] == ["coder"]
    report_dir = tmp_path / "rep"
    result = runner.invoke(app, ["report", str(out), "-o", str(report_dir),
                                 "--require-decode", "coder=1"])
    assert result.exit_code == 0, result.output
    assert (report_dir / "report.md").exists() and (report_dir / "pareto.png").exists()
    worse = json.loads(out.read_text())
    worse["evidence"]["speed"][0]["decode_tps"] /= 3
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    result = runner.invoke(app, ["report", str(tmp_path / "worse.json"), "-o", str(report_dir),
                                 "--compare", str(out), "--fail-on-regression"])
    assert result.exit_code == 1 and "regression" in result.output
    cost = runner.invoke(app, ["cost", "--tokens-per-month", "1e6", "--results", str(out)])
    assert cost.exit_code == 0 and "measured for tiny-F16" in cost.output


def test_bad_require_decode_is_a_config_error(app, tmp_path):
    from tongyi_local.evidence import conclude
    from tongyi_local.evidence.results import Evidence, save

    path = save(conclude(Evidence()), tmp_path / "empty.json")
    result = runner.invoke(app, ["report", str(path), "-o", str(tmp_path), "--require-decode", "coder"])
    assert isinstance(result.exception, ConfigError)


def test_bench_resolves_roles_and_names_missing_files(app):
    from tongyi_local.errors import ModelNotFoundError

    unknown = runner.invoke(app, ["bench", "no-such-role"])
    assert isinstance(unknown.exception, ConfigError) and "unknown role" in str(unknown.exception)
    missing = runner.invoke(app, ["bench", "/nonexistent/model.gguf"])
    assert isinstance(missing.exception, ModelNotFoundError)



def test_bench_names_a_missing_corpus_before_any_work(app, f16, tmp_path):
    from tongyi_local.errors import EvidenceError

    result = runner.invoke(app, ["bench", str(f16), "--reference", str(f16), "--corpus",
                                 str(tmp_path / "none.txt"), "--no-tasks"])
    assert isinstance(result.exception, EvidenceError)
    assert "none.txt is not a file" in str(result.exception) and "speed" not in result.output


def test_bench_runs_from_an_installed_package_outside_any_checkout(f16, tmp_path):
    """The package alone (copied as an install would place it), run from an unrelated directory:
    the corpus comes from package data and the speed runs' child process finds the package."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import tongyi_local

    site = tmp_path / "site"
    shutil.copytree(Path(tongyi_local.__file__).parent, site / "tongyi_local",
                    ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-m", "tongyi_local", "bench", str(f16), "--no-tasks",
                          "--rounds", "1", "--reference", str(f16), "--quality-ctx", "128",
                          "--json", "ev.json"], cwd=elsewhere, capture_output=True, text=True,
                         env=dict(env, PYTHONPATH=str(site)), timeout=600)
    assert run.returncode == 0, run.stderr
    assert "quality vs tiny-F16.gguf: KLD mean 0.000000" in run.stdout
    ev = json.loads((elsewhere / "ev.json").read_text())["evidence"]
    assert ev["speed"][0]["model"] == "tiny-F16" and ev["quality"][0]["tokens"] > 0
