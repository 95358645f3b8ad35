"""JSON schemas for tool calls and structured output: check, grammar, validate, build.

Why: on the local backend a tool call or a structured answer is decoded under a GBNF grammar made
from its JSON schema, so what the model writes always parses and validates; a schema the grammar
cannot express is refused (``UnsupportedSchemaError``), never silently decoded unconstrained.

How: ``reader`` reads a schema into a small checked form (``nodes``; every keyword the grammar
cannot honour raises there, naming its JSON pointer); ``grammar`` writes that form as GBNF through
a subclass of llama-cpp-python's port of llama.cpp's JSON-schema converter, helped by ``patterns``
(the ``pattern`` regex subset), ``bounds`` (``minimum``/``maximum``) and ``gbnf`` (spelling and
primitive rules). ``validation`` checks values against schemas with jsonschema; ``python_types``
builds schemas from Python types and functions (``docstrings`` for descriptions) and values back
into those types.

``llama_cpp`` is imported lazily (only ``grammar_for``/``tool_call_grammar`` need it), so importing
this package loads no native library.
"""

from __future__ import annotations

from .grammar import grammar_for, tool_call_grammar
from .python_types import convert, function_schema, schema_of
from .reader import SUPPORTED_FORMATS, check_supported
from .validation import validate

__all__ = ["SUPPORTED_FORMATS", "check_supported", "convert", "function_schema", "grammar_for",
           "schema_of", "tool_call_grammar", "validate"]
