"""Tiny random-weight GGUF models that the real llama.cpp loads and generates from.

Why: tests and benchmarks must exercise the real loader, tokenizer, chat template and
compute graph (dense Qwen2.5 and Tongyi-DeepResearch's Qwen3-MoE layout) without
downloading gigabytes. Everything goes through the `gguf` package so key and tensor
names follow llama.cpp's own tables instead of hand-written binary.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

# Qwen-style ChatML; llama.cpp's template detector keys on "<|im_start|>".
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2.5-Instruct's own template (tools in the system turn, <tool_call>/<tool_response> blocks),
# so tiny models exercise the same Jinja rendering as the real Qwen GGUFs.
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ARCHS = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE}
N_MERGES = 320

# Training text for the merges: common English plus the project's vocabulary, so
# ordinary prompts ("hello world", chat turns) tokenize into fewer tokens than bytes.
_CORPUS = """
the of and to in is you that it he was for on are as with his they at be this have from
or one had by word but not what all were we when your can said there use an each which she
do how their if will up other about out many then them these so some her would make like him
into time has look two more write go see number no way could people my than first water been
call who its now find long down day did get come made may part hello world model local search
research answer question tool result user assistant system content message think thinking
deep query page source report summary information language generate token test benchmark
please thank write reading learning data using because between through where should these
There The This That What When Where Which How Hello World I It We You They A An In On
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (what llama.cpp's BPE expects)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _train_bpe(n_merges: int = N_MERGES) -> list[tuple[str, str]]:
    """Deterministic greedy BPE on `_CORPUS`, pre-split like Qwen2 (leading space kept)."""
    b2u = _bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for w in re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", " ".join(_CORPUS.split())):
        words[tuple(b2u[b] for b in w.encode("utf-8"))] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # tie-break on the pair: stable
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return merges


def build_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token_types, merges): 256 byte tokens, merge results, then the specials."""
    tokens = [_bytes_to_unicode()[b] for b in range(256)]
    merges = _train_bpe()
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    types = [int(gguf.TokenType.NORMAL)] * len(tokens) + [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    return tokens + list(SPECIAL_TOKENS), types, [f"{a} {b}" for a, b in merges]


def _tensor_plan(arch: str, n_layer, n_embd, n_head, n_head_kv, n_ff, n_expert, n_ff_exp, n_vocab):
    """[(MODEL_TENSOR, bid, suffix, numpy shape)] mirroring llama.cpp's load_arch_tensors.

    numpy shapes are ggml's `{ne0, ne1, ...}` reversed.
    """
    T = gguf.MODEL_TENSOR
    hd = n_embd // n_head
    q, kv = n_head * hd, n_head_kv * hd
    plan = [(T.TOKEN_EMBD, None, "weight", (n_vocab, n_embd)),
            (T.OUTPUT_NORM, None, "weight", (n_embd,)),
            (T.OUTPUT, None, "weight", (n_vocab, n_embd))]
    for i in range(n_layer):
        plan += [(T.ATTN_NORM, i, "weight", (n_embd,)),
                 (T.ATTN_Q, i, "weight", (q, n_embd)),
                 (T.ATTN_K, i, "weight", (kv, n_embd)),
                 (T.ATTN_V, i, "weight", (kv, n_embd))]
        if arch == "qwen2":  # Qwen2.5 keeps q/k/v biases; Qwen3 dropped them for q/k norms
            plan += [(T.ATTN_Q, i, "bias", (q,)), (T.ATTN_K, i, "bias", (kv,)), (T.ATTN_V, i, "bias", (kv,))]
        else:
            plan += [(T.ATTN_Q_NORM, i, "weight", (hd,)), (T.ATTN_K_NORM, i, "weight", (hd,))]
        plan += [(T.ATTN_OUT, i, "weight", (n_embd, q)), (T.FFN_NORM, i, "weight", (n_embd,))]
        if arch == "qwen2":
            plan += [(T.FFN_GATE, i, "weight", (n_ff, n_embd)),
                     (T.FFN_DOWN, i, "weight", (n_embd, n_ff)),
                     (T.FFN_UP, i, "weight", (n_ff, n_embd))]
        else:
            plan += [(T.FFN_GATE_INP, i, "weight", (n_expert, n_embd)),
                     (T.FFN_GATE_EXP, i, "weight", (n_expert, n_ff_exp, n_embd)),
                     (T.FFN_DOWN_EXP, i, "weight", (n_expert, n_embd, n_ff_exp)),
                     (T.FFN_UP_EXP, i, "weight", (n_expert, n_ff_exp, n_embd))]
    return plan


def write_tiny_model(path, arch: str = "qwen2", *, n_layer=2, n_embd=64, n_head=4, n_head_kv=2,
                     n_ff=128, n_expert=4, n_expert_used=2, n_ff_exp=64, context_length=1024,
                     dtype="f32", seed=0, chat_template=CHATML_TEMPLATE, name=None) -> Path:
    """Write a tiny random-weight `arch` model to `path` (atomically) and return the path.

    Same arguments -> same bytes. Weights are N(0, 0.02) and norms 1 so logits stay finite;
    "f16" stores matrices as F16 (norms, biases and the MoE router stay F32, as convert does).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    if n_embd % n_head or n_head % n_head_kv or (n_embd // n_head) % 2:
        raise ValueError("need n_embd % n_head == 0, n_head % n_head_kv == 0 and an even head size")
    if arch == "qwen3moe" and not 0 < n_expert_used <= n_expert:
        raise ValueError("need 0 < n_expert_used <= n_expert")

    path = Path(path)
    arch_name = gguf.MODEL_ARCH_NAMES[ARCHS[arch]]
    tokens, types, merges = build_vocab()
    special = {t: tokens.index(t) for t in SPECIAL_TOKENS}
    mat_dtype = np.float16 if dtype == "f16" else np.float32
    allowed = set(gguf.MODEL_TENSORS[ARCHS[arch]])

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch_name)
        w.add_name(name or f"tiny-{arch}-{dtype}")
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        w.add_context_length(context_length)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(1_000_000.0)
        if arch == "qwen3moe":  # Qwen3 states head_dim explicitly (it need not be n_embd/n_head)
            w.add_key_length(n_embd // n_head)
            w.add_value_length(n_embd // n_head)
            w.add_expert_count(n_expert)
            w.add_expert_used_count(n_expert_used)
            w.add_expert_feed_forward_length(n_ff_exp)

        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(special["<|endoftext|>"])  # Qwen: bos == pad == endoftext, never added
        w.add_eos_token_id(special["<|im_end|>"])
        w.add_pad_token_id(special["<|endoftext|>"])
        w.add_add_bos_token(False)
        if chat_template:
            w.add_chat_template(chat_template)

        rng = np.random.default_rng(seed)
        plan = _tensor_plan(arch, n_layer, n_embd, n_head, n_head_kv, n_ff, n_expert, n_ff_exp, len(tokens))
        for kind, bid, suffix, shape in plan:
            assert kind in allowed, f"{kind} not in gguf.MODEL_TENSORS[{arch}]"
            tname = gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + suffix
            is_norm = len(shape) == 1 and suffix == "weight"
            data = np.ones(shape, np.float32) if is_norm else rng.standard_normal(shape, dtype=np.float32) * 0.02
            if len(shape) > 1 and kind != gguf.MODEL_TENSOR.FFN_GATE_INP:
                data = data.astype(mat_dtype)
            w.add_tensor(tname, data)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
