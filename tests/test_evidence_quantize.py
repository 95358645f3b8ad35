"""Quantization through llama.cpp's own API (in-process), on a tiny F16 Qwen2 whose sizes are
multiples of 256 so the k-quants really apply."""

from __future__ import annotations

import warnings

import pytest

import tongyi_local
from tongyi_local.backends.quantize import QUANT_TYPES, is_quantized, quantize
from tongyi_local.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from tongyi_local.gguf_header import read_header
from tongyi_local.testing import write_tiny_model

LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
MAIN_TYPE = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K"}


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("q") / "tiny-f16.gguf", "qwen2", n_embd=256,
                            n_ff=512, dtype="f16", context_length=2048)


@pytest.mark.parametrize("qtype", LADDER)
def test_quantize_writes_a_loadable_file_of_the_requested_type(f16_model, tmp_path, qtype):
    seen = []
    result = quantize(f16_model, tmp_path / f"m-{qtype}.gguf", qtype,
                      on_progress=lambda done, total: seen.append((done, total)))
    header = read_header(result.output)
    assert header.file_type == qtype
    assert MAIN_TYPE[qtype] in {t.type for t in header.tensors}  # not silently a fallback type
    assert result.source_type == "F16" and not result.requantized and result.warning is None
    assert result.output_bytes == result.output.stat().st_size < result.source_bytes
    assert seen and seen[-1][0] == seen[-1][1] == result.output_bytes
    assert list(tmp_path.glob("*.partial")) == []
    with tongyi_local.load(result.output, n_ctx=128) as gen:
        assert gen.complete("hello world", max_tokens=3, temperature=0).usage.completion_tokens > 0


def test_requantizing_needs_the_flag_and_warns(f16_model, tmp_path):
    q8 = quantize(f16_model, tmp_path / "q8.gguf", "q8_0").output  # names are case-insensitive
    assert is_quantized(read_header(q8))
    with pytest.raises(InvalidRequestError, match="already quantized.*allow.requantize"):
        quantize(q8, tmp_path / "q4.gguf", "Q4_K_M")
    assert not (tmp_path / "q4.gguf").exists()
    result = quantize(q8, tmp_path / "q4.gguf", "Q4_K_M", allow_requantize=True)
    assert result.requantized and "quality cannot rise" in result.warning
    assert read_header(result.output).file_type == "Q4_K_M"


def test_bad_inputs_fail_before_any_work_and_leave_nothing(f16_model, tmp_path):
    with pytest.raises(InvalidRequestError, match="unknown quantization type 'Q9_X'"):
        quantize(f16_model, tmp_path / "x.gguf", "Q9_X")
    with pytest.raises(ModelNotFoundError):
        quantize(tmp_path / "missing.gguf", tmp_path / "x.gguf", "Q8_0")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        quantize(bad, tmp_path / "x.gguf", "Q8_0")
    with pytest.raises(InvalidRequestError, match="is the source"):
        quantize(f16_model, f16_model, "Q8_0")
    with pytest.raises(InvalidRequestError, match="does not exist"):
        quantize(f16_model, tmp_path / "nodir" / "x.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_quant_table_covers_the_ladder():
    assert set(LADDER) <= set(QUANT_TYPES)


@pytest.mark.slow
def test_importance_matrix_from_llama_imatrix_is_applied(f16_model, tmp_path, imatrix_tool, corpus_path):
    from tongyi_local.evidence.tools import make_imatrix
    from tongyi_local.hardware import this_machine_plan

    imatrix = make_imatrix(imatrix_tool, f16_model, corpus_path, tmp_path / "tiny.imatrix.gguf",
                           n_ctx=128, chunks=4, threads=this_machine_plan().threads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = quantize(f16_model, tmp_path / "iq.gguf", "Q4_K_M", imatrix=imatrix)
    plain = quantize(f16_model, tmp_path / "plain.gguf", "Q4_K_M")
    assert result.imatrix == imatrix
    assert read_header(result.output).file_type == "Q4_K_M"
    # the importance weights change which values the quantizer keeps: the bytes must differ
    assert result.output.read_bytes() != plain.output.read_bytes()
    with pytest.raises(InvalidRequestError, match="importance"):
        quantize(f16_model, tmp_path / "bad.gguf", "Q4_K_M", imatrix=f16_model)


@pytest.fixture(scope="module")
def imatrix_tool():
    from tongyi_local.evidence.tools import tool_paths

    return tool_paths(tools=("llama-perplexity", "llama-imatrix"))["llama-imatrix"]


@pytest.fixture(scope="module")
def corpus_path():
    """The packaged corpus as a file (llama.cpp's tools read a path)."""
    from importlib.resources import as_file

    from tongyi_local.evidence.quality import default_corpus

    with as_file(default_corpus()) as path:
        yield path


def test_progress_draws_a_tqdm_bar_to_its_end(f16_model, tmp_path, capsys):
    result = quantize(f16_model, tmp_path / "m-Q8_0.gguf", "Q8_0", progress=True)
    err = capsys.readouterr().err
    assert "quantizing to Q8_0" in err and err.rstrip().split("\r")[-1].count("100%") == 1
    assert result.output.is_file() and read_header(result.output).file_type == "Q8_0"
