"""Grammar membership decided by llama.cpp itself, for tests.

Why: a grammar test should not trust a second GBNF implementation. This feeds a text byte by byte
(one token per byte of the tiny qwen2 vocabulary) through a real ``llama_sampler_init_grammar``
sampler: a byte the grammar forbids gets logit -inf from ``llama_sampler_apply``; the text is a
complete sentence of the grammar iff the end-of-generation token is still allowed at the end.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import llama_cpp as L

from tongyi_local.backends.runtime import ensure_runtime
from tongyi_local.testing import write_tiny_model


class ByteVocab:
    """A vocabulary loaded without weights, and the token id of each single byte."""

    def __init__(self, model: object, vocab: object, byte_tokens: dict[int, int],
                 eos: int) -> None:
        self.model, self.vocab, self.byte_tokens, self.eos = model, vocab, byte_tokens, eos

    def __repr__(self) -> str:
        return f"ByteVocab(eos={self.eos})"

    @classmethod
    def load(cls, directory: Path) -> ByteVocab:
        ensure_runtime()
        path = write_tiny_model(directory / "tiny-qwen2.gguf", "qwen2")
        params = L.llama_model_default_params()
        params.vocab_only = True
        model = L.llama_model_load_from_file(str(path).encode(), params)
        assert model, f"llama.cpp could not load {path}"
        vocab = L.llama_model_get_vocab(model)
        return cls(model, vocab, _byte_tokens(vocab), L.llama_vocab_eos(vocab))

    def close(self) -> None:
        if self.model:
            L.llama_model_free(self.model)
            self.model = None

    def sampler(self, grammar: str) -> GrammarSampler:
        return GrammarSampler(self, grammar)

    def accepts(self, grammar: str, text: str) -> bool:
        with self.sampler(grammar) as sampler:
            return sampler.feed(text.encode("utf-8")) and sampler.can_end()


def _byte_tokens(vocab: object) -> dict[int, int]:
    """For each byte, the token whose piece is exactly that byte."""
    found: dict[int, int] = {}
    buffer = ctypes.create_string_buffer(64)
    for token in range(L.llama_vocab_n_tokens(vocab)):
        n = L.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
        if n == 1:
            found.setdefault(buffer.raw[0], token)
    missing = sorted(set(range(256)) - set(found))
    assert not missing, f"no single-byte token for bytes {missing[:10]}"
    return found


class GrammarSampler:
    """One llama.cpp grammar sampler; a context manager that frees it."""

    def __init__(self, vocab: ByteVocab, grammar: str) -> None:
        self.vocab = vocab
        self.handle = L.llama_sampler_init_grammar(vocab.vocab, grammar.encode("utf-8"), b"root")
        self._data = (L.llama_token_data * 1)()
        self._array = L.llama_token_data_array(
            data=ctypes.cast(self._data, ctypes.POINTER(L.llama_token_data)), size=1,
            selected=-1, sorted=False)

    @property
    def parsed(self) -> bool:
        """llama.cpp accepted the grammar text (else ``llama_sampler_init_grammar`` is NULL)."""
        return bool(self.handle)

    def __enter__(self) -> GrammarSampler:
        assert self.handle, "llama.cpp rejected the grammar"
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.handle:
            L.llama_sampler_free(self.handle)
            self.handle = None

    def allows(self, token: int) -> bool:
        self._data[0] = L.llama_token_data(id=token, logit=0.0, p=0.0)
        self._array.size, self._array.selected, self._array.sorted = 1, -1, False
        L.llama_sampler_apply(self.handle, ctypes.byref(self._array))
        return not math.isinf(self._data[0].logit)

    def feed(self, data: bytes) -> bool:
        """Accept each byte in turn; False as soon as the grammar forbids one."""
        for byte in data:
            token = self.vocab.byte_tokens[byte]
            if not self.allows(token):
                return False
            L.llama_sampler_accept(self.handle, token)
        return True

    def can_end(self) -> bool:
        return self.allows(self.vocab.eos)


def grammar_parses(vocab: ByteVocab, grammar: str) -> bool:
    sampler = GrammarSampler(vocab, grammar)
    try:
        return sampler.parsed
    finally:
        sampler.close()
