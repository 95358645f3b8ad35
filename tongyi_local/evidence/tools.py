"""llama.cpp's own tools, built from the same source and preset: the yardsticks for our figures.

Why: a figure measured by the library is only trusted when llama.cpp's reference program,
compiled from the very llama.cpp the runtime vendors, agrees with it — llama-bench for speed,
llama-perplexity for KL divergence; llama-imatrix makes importance matrices for quantization.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import EvidenceError

QUALITY_TOOLS = ("llama-perplexity", "llama-quantize", "llama-imatrix")


def tool_paths(preset_name: str | None = None,
               tools: tuple[str, ...] = ("llama-bench",)) -> dict[str, Path]:
    """Build (once; cached per preset) and return llama.cpp tools for a preset (default: installed)."""
    from .. import build

    record = build.installed_build() or {}
    preset = build.select_preset(preset_name or record.get("preset"))
    return build.build_tools(preset, tools=tools)


def _run(cmd: list[str], what: str, timeout: float | None = None,
         env: dict[str, str] | None = None) -> tuple[str, str]:
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ, **env) if env else None)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EvidenceError(f"{what} could not run: {exc}") from exc
    if run.returncode != 0:
        tail = "\n".join((run.stderr or run.stdout).splitlines()[-8:])
        raise EvidenceError(f"{what} failed (exit {run.returncode}):\n{tail}")
    return run.stdout, run.stderr


def llama_bench(binary: Path, model: Path, *, threads: int, pp: int = 512, tg: int = 128,
                repetitions: int = 2, cpu_mask: str | None = None) -> dict[str, float | str]:
    """One llama-bench run: ``pp<N>``/``tg<N>`` tokens/s plus the build commit it reports."""
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-p", str(pp), "-n", str(tg),
           "-r", str(repetitions), "-o", "json"]
    if cpu_mask:
        cmd += ["-C", cpu_mask, "--cpu-strict", "1"]
    stdout, _ = _run(cmd, f"llama-bench on {model.name}")
    try:
        rows = json.loads(stdout)
    except ValueError as exc:
        raise EvidenceError(f"llama-bench on {model.name} printed no JSON: {exc}") from exc
    out: dict[str, float | str] = {"build_commit": rows[0].get("build_commit", "unknown")}
    for row in rows:
        key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        out[key] = float(row["avg_ts"])
    return out


@dataclass(frozen=True)
class PerplexityKLD:
    """What llama-perplexity --kl-divergence printed (KLD in nats, agreement as a fraction).

    ``kld_median``/``kld_p99`` come from the final statistics block, None when it was lost.
    """

    kld_mean: float
    top1_agreement: float
    ppl: float
    ppl_reference: float
    tokens: int
    kld_median: float | None = None
    kld_p99: float | None = None


# A progress row: chunk, PPL(Q) ± u, ln(PPL(Q)/PPL(base)) ± u, KLD ± u, Δp RMS ± u %, same top ± u %
# (each figure a running value over the chunks so far).
_NUM = r"(-?[\d.]+)\s*±\s*[\d.]+"
_CHUNK_ROW = re.compile(rf"^\s*(\d+)\s+{_NUM}\s+{_NUM}\s+{_NUM}\s+{_NUM}\s*%\s+{_NUM}\s*%", re.M)
_FINAL = {"kld_median": r"Median\s+KLD:\s+([-\d.eE+]+)", "kld_p99": r"99\.0%\s+KLD:\s+([-\d.eE+]+)"}


def parse_kld_output(text: str, n_ctx: int, chunks: int) -> PerplexityKLD:
    """Figures over the first ``chunks`` chunks, from llama-perplexity's running progress row."""
    rows = {int(m.group(1)): m for m in _CHUNK_ROW.finditer(text)}
    row = rows.get(chunks)
    if row is None:
        raise EvidenceError(f"llama-perplexity printed no progress row for chunk {chunks} "
                            f"(rows seen: {sorted(rows) or 'none'})")
    ppl, log_ratio, kld, _, same_top = (float(row.group(i)) for i in range(2, 7))
    extra = {}
    if chunks == max(rows):  # the final block describes exactly these chunks
        for key, pattern in _FINAL.items():
            match = re.search(pattern, text)
            extra[key] = float(match.group(1)) if match else None
    return PerplexityKLD(kld_mean=kld, top1_agreement=same_top / 100, ppl=ppl,
                         ppl_reference=ppl / math.exp(log_ratio),
                         tokens=chunks * (n_ctx - 1 - n_ctx // 2), **extra)


def llama_perplexity_kld(binary: Path, reference: Path, candidate: Path, corpus: Path, *,
                         n_ctx: int, chunks: int, threads: int) -> PerplexityKLD:
    """llama.cpp's own KLD of ``candidate`` from ``reference`` over ``corpus`` (two runs).

    llama.cpp's logger prints from a thread it never joins (llama.cpp issue 22142): on a busy
    machine the process exits before its last lines reach stdout. So the reference logits cover
    one chunk more than asked (when the corpus has it) and the figures are read from the running
    progress row of the asked chunk, printed a chunk's compute time before the end; the comparison
    leaves the logger a core (OpenMP threads sleep instead of spinning) and is run again if even
    that row was lost.
    """
    common = ["-c", str(n_ctx), "-b", str(n_ctx)]
    with tempfile.TemporaryDirectory(prefix="tongyi-ppl-") as tmp:
        base = Path(tmp) / "base.kld"
        _run([str(binary), "-m", str(reference), "-f", str(corpus), *common, "--chunks",
              str(chunks + 1), "-t", str(threads), "--kl-divergence-base", str(base)],
             "llama-perplexity (reference logits)")
        cmd = [str(binary), "-m", str(candidate), *common, "-t", str(threads),
               "--kl-divergence-base", str(base), "--kl-divergence"]
        for attempt in range(5):
            out, err = _run(cmd, "llama-perplexity --kl-divergence",
                            env={"OMP_WAIT_POLICY": "PASSIVE"})
            try:
                return parse_kld_output(out + err, n_ctx, chunks)
            except EvidenceError:
                if attempt == 4:
                    raise
    raise AssertionError("unreachable")


def make_imatrix(binary: Path, model: Path, corpus: Path, output: Path, *, n_ctx: int = 512,
                 chunks: int = 8, threads: int) -> Path:
    """An importance matrix (GGUF) for ``model`` from ``corpus`` with llama-imatrix."""
    if output.suffix != ".gguf":
        raise EvidenceError(f"imatrix output {output} must end in .gguf (the format quantize reads)")
    _run([str(binary), "-m", str(model), "-f", str(corpus), "-o", str(output), "-c", str(n_ctx),
          "-b", str(n_ctx), "--chunks", str(chunks), "-t", str(threads)], "llama-imatrix")
    if not output.exists():
        raise EvidenceError(f"llama-imatrix finished but wrote no {output}")
    return output
