"""Every position's logits over fixed chunks of text, for measuring quality (KLD, perplexity).

Why a module of its own: generation (``llama.py``) keeps one output row per step and a decode loop
tuned for speed; measuring quality needs the opposite — every position's logits in a context owned
here, each chunk from an empty cache as llama-perplexity does. Everything numeric is done by
``tongyi_local.evidence.quality`` on the arrays returned here.
"""

from __future__ import annotations

import os
import weakref

import numpy as np

from ..errors import BackendError, InvalidRequestError, ModelLoadError
from ..gguf_header import read_header
from ..hardware import this_machine_plan
from .llama import tokenize
from .runtime import L, captured, ensure_runtime


def _free(ctx: object, model: object, batch: object) -> None:
    if batch is not None:
        L.llama_batch_free(batch)
    if ctx:
        L.llama_free(ctx)
    if model:
        L.llama_model_free(model)


class LogitsEvaluator:
    """A model with its own context of ``n_ctx`` positions that returns every position's logits.

    Each chunk is evaluated from an empty cache in one batch, as llama-perplexity does, so the
    figures computed from it are comparable with llama.cpp's own.
    """

    def __init__(self, path: str | os.PathLike[str], n_ctx: int, *, threads: int | None = None):
        header = read_header(path)
        ensure_runtime()
        if n_ctx < 8:
            raise InvalidRequestError(f"n_ctx must be >= 8 for quality evaluation (got {n_ctx})")
        self.path, self.n_ctx = header.path, n_ctx
        self.file_type, self.size_bytes = header.file_type, header.size_bytes
        with captured() as capture:
            mparams = L.llama_model_default_params()
            model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
            if not model:
                raise ModelLoadError(self.path, capture.reason("llama.cpp could not load the model"))
            cparams = L.llama_context_default_params()
            cparams.n_ctx = cparams.n_batch = n_ctx
            cparams.n_ubatch = min(n_ctx, 512)
            cparams.n_seq_max = 1
            cparams.n_outputs_max = 0  # = n_batch: every position may be an output
            cparams.n_threads = cparams.n_threads_batch = this_machine_plan(threads=threads).threads
            cparams.no_perf = True
            ctx = L.llama_init_from_model(model, cparams)
            if not ctx:
                L.llama_model_free(model)
                raise ModelLoadError(self.path, capture.reason(
                    f"could not create a context of {n_ctx} tokens (out of memory?)"))
        self._model, self._ctx = model, ctx
        self._batch = L.llama_batch_init(n_ctx, 0, 1)
        self._finalizer = weakref.finalize(self, _free, ctx, model, self._batch)
        self._vocab = L.llama_model_get_vocab(model)
        self.n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self._vocab))
        self.bos = L.llama_vocab_bos(self._vocab)

    def tokenize(self, text: str) -> list[int]:
        """As llama-perplexity does: special tokens added (BOS), special text not parsed."""
        return tokenize(self._vocab, text, add_special=True, parse_special=False)

    def chunk_logits(self, tokens: list[int], first: int) -> np.ndarray:
        """Logits (float32, one row per position ``first .. len(tokens)-1``) for one chunk."""
        n = len(tokens)
        if not 0 <= first < n <= self.n_ctx:
            raise InvalidRequestError(f"chunk of {n} tokens (scored from {first}) does not fit "
                                      f"n_ctx={self.n_ctx}")
        L.llama_memory_clear(L.llama_get_memory(self._ctx), True)
        b = self._batch
        for i, token in enumerate(tokens):
            b.token[i] = token
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i >= first
        b.n_tokens = n
        rc = L.llama_decode(self._ctx, b)
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc} while scoring {self.path.name}")
        rows = n - first
        view = np.ctypeslib.as_array(L.llama_get_logits(self._ctx), shape=(rows * self.n_vocab,))
        return view.reshape(rows, self.n_vocab).copy()

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> LogitsEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
