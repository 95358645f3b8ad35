"""Reproducible greedy text under concurrency: ``deterministic=True`` runs a request alone on an
emptied KV cache, so what else the model serves cannot change its text (llama.cpp's quantized
kernels are not batch-invariant: see test_batching's near-tie test for the default)."""

from __future__ import annotations

import threading

import pytest

import tongyi_local
from tongyi_local.errors import InvalidRequestError

PROMPTS = ["The history of the printing press", "A recipe for bread starts with",
           "In distributed systems, consensus", "def fibonacci(n):"]


def test_deterministic_greedy_text_is_the_same_whatever_else_runs(starter_path):
    with tongyi_local.load(starter_path, n_ctx=1024, slots=4) as model:
        solo = {p: model.complete(p, max_tokens=16, temperature=0, deterministic=True).text
                for p in PROMPTS}
        got: list[tuple[str, str]] = []
        errors: list[BaseException] = []

        def reproducible(offset: int) -> None:
            try:
                for i in range(len(PROMPTS)):
                    p = PROMPTS[(i + offset) % len(PROMPTS)]
                    got.append((p, model.complete(p, max_tokens=16, temperature=0,
                                                  deterministic=True).text))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def noise() -> None:
            try:
                for p in PROMPTS:  # shares prefixes and batches with whatever runs
                    model.complete(p + " and", max_tokens=16, temperature=0.7, seed=1)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=reproducible, args=(k,)) for k in range(2)]
        threads += [threading.Thread(target=noise) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors and len(got) == 2 * len(PROMPTS)
        differing = [p for p, text in got if text != solo[p]]
        assert differing == []


def test_deterministic_is_a_flag():
    with pytest.raises(InvalidRequestError, match="deterministic"):
        tongyi_local.Sampling(deterministic="yes")
