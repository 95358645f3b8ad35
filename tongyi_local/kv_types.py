"""llama.cpp's KV-cache element types, by the names models.toml uses.

One list, so that what models.toml accepts (``config``), what the memory estimate prices
(``gguf_header``) and what the backend makes (``backends/llama``) stay the same set. The names
are ggml's own types, so the type id llama.cpp wants and the bytes per element come from gguf's
``GGMLQuantizationType`` rather than a second table.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType

KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")


def ggml_type(name: str) -> GGMLQuantizationType:
    """The ggml type of a KV-cache type name; its value is llama.cpp's ``ggml_type`` id."""
    return GGMLQuantizationType[name.upper()]
