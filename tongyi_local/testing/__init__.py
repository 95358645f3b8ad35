"""Test/benchmark helpers: tiny GGUF models the real llama.cpp can load in milliseconds."""

from .tiny_gguf import CHATML_TEMPLATE, QWEN25_TEMPLATE, write_tiny_model

__all__ = ["CHATML_TEMPLATE", "QWEN25_TEMPLATE", "write_tiny_model"]
