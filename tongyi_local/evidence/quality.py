"""Quality of a quantized file against a reference: KL divergence, top-1 agreement, perplexity.

Why these: perplexity alone hides what quantization does (a model can keep its perplexity while
changing which token it would pick); KLD from the highest-precision file measures the whole
distribution shift and top-1 agreement says how often greedy output would differ.

The corpus is cut into chunks of ``n_ctx`` tokens and only the second half of each chunk is scored,
exactly as ``llama-perplexity --kl-divergence`` does, so the two can be checked against each other.
The reference's log-probabilities are kept in full float32 (a temporary memory-mapped file), not
llama.cpp's 16-bit packing, so a model against itself gives exactly 0.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np

from ..backends.logits import LogitsEvaluator
from ..errors import EvidenceError

_ROWS = 32  # positions processed at once: bounds memory on 150k-262k vocabularies


def default_corpus() -> Traversable:
    """The packaged CC0 corpus (``corpus/README.md``): present in a wheel install as in a checkout."""
    return files(__package__) / "corpus" / "corpus.txt"


@dataclass(frozen=True)
class QualityResult:
    """One file's figures against the reference (``kld_*`` in nats per token)."""

    model: str
    path: str
    file_type: str
    size_bytes: int
    reference: str
    n_ctx: int
    chunks: int
    tokens: int
    kld_mean: float
    kld_median: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    ppl: float
    ppl_reference: float


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1, keepdims=True)
    shifted = logits.astype(np.float64) - top
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _chunks(tokens: list[int], n_ctx: int, n_chunks: int, bos: int | None) -> Iterator[list[int]]:
    for c in range(n_chunks):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        if bos is not None:
            chunk[0] = bos  # llama-perplexity starts every chunk with BOS when the vocab adds one
        yield chunk


class Reference:
    """The reference model's log-probabilities over the scored positions of a corpus."""

    def __init__(self, path: str | Path, text: str, *, n_ctx: int = 512, max_chunks: int = 8,
                 threads: int | None = None, workdir: str | Path | None = None) -> None:
        if text.endswith("\n"):
            text = text[:-1]  # llama-perplexity -f drops one trailing newline; stay comparable
        self.path, self.n_ctx, self.threads = Path(path), n_ctx, threads
        self.first = n_ctx // 2
        self.scored = n_ctx - 1 - self.first
        self._dir = Path(tempfile.mkdtemp(prefix="tongyi-kld-", dir=workdir))
        try:
            with LogitsEvaluator(path, n_ctx, threads=threads) as ev:
                self.tokens = ev.tokenize(text)
                self.n_chunks = min(len(self.tokens) // n_ctx, max_chunks)
                if self.n_chunks < 1:
                    raise EvidenceError(
                        f"the corpus is {len(self.tokens)} tokens for {self.path.name}; at least "
                        f"n_ctx={n_ctx} are needed: give a longer corpus or a smaller n_ctx")
                self.n_vocab, self.file_type, self.size_bytes = ev.n_vocab, ev.file_type, ev.size_bytes
                self.bos = ev.bos if ev.add_bos else None
                shape = (self.n_chunks, self.scored, self.n_vocab)
                self.logp = np.lib.format.open_memmap(self._dir / "ref.npy", mode="w+",
                                                      dtype=np.float32, shape=shape)
                self.argmax = np.empty(shape[:2], dtype=np.int64)
                self.nll = np.empty(shape[:2], dtype=np.float64)
                for c, chunk in enumerate(_chunks(list(self.tokens), n_ctx, self.n_chunks, self.bos)):
                    logits = ev.chunk_logits(chunk, self.first)[:-1]
                    targets = self.targets(c)
                    for r in range(0, self.scored, _ROWS):
                        lp = _log_softmax(logits[r:r + _ROWS])
                        self.logp[c, r:r + len(lp)] = lp
                        self.argmax[c, r:r + len(lp)] = logits[r:r + _ROWS].argmax(axis=1)
                        self.nll[c, r:r + len(lp)] = -lp[np.arange(len(lp)), targets[r:r + len(lp)]]
                self.logp.flush()
        except BaseException:
            self.close()
            raise

    def targets(self, chunk: int) -> np.ndarray:
        start = chunk * self.n_ctx + self.first + 1
        return np.asarray(self.tokens[start:start + self.scored])

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))

    def compare(self, path: str | Path, name: str | None = None) -> QualityResult:
        """Score ``path`` on the same positions: KLD from the reference, top-1 agreement, PPL."""
        kld = np.empty((self.n_chunks, self.scored))
        agree = np.empty((self.n_chunks, self.scored), dtype=bool)
        nll = np.empty((self.n_chunks, self.scored))
        with LogitsEvaluator(path, self.n_ctx, threads=self.threads) as ev:
            if ev.n_vocab != self.n_vocab:
                raise EvidenceError(f"{Path(path).name} has a vocabulary of {ev.n_vocab} tokens but "
                                    f"the reference {self.path.name} has {self.n_vocab}: they are "
                                    "not quantizations of the same model")
            for c, chunk in enumerate(_chunks(list(self.tokens), self.n_ctx, self.n_chunks, self.bos)):
                logits = ev.chunk_logits(chunk, self.first)[:-1]
                targets = self.targets(c)
                for r in range(0, self.scored, _ROWS):
                    # rounded to float32 as the stored reference is: identical files give 0 exactly
                    lq = _log_softmax(logits[r:r + _ROWS]).astype(np.float32).astype(np.float64)
                    rows = slice(r, r + len(lq))
                    lp = self.logp[c, rows].astype(np.float64)
                    kld[c, rows] = (np.exp(lp) * (lp - lq)).sum(axis=1)
                    agree[c, rows] = logits[rows].argmax(axis=1) == self.argmax[c, rows]
                    nll[c, rows] = -lq[np.arange(len(lq)), targets[rows]]
            file_type, size = ev.file_type, ev.size_bytes
        flat = np.maximum(kld.reshape(-1), 0.0)  # rounding can leave -1e-17 where equal
        return QualityResult(
            model=name or Path(path).stem, path=str(path), file_type=file_type, size_bytes=size,
            reference=self.path.name, n_ctx=self.n_ctx, chunks=self.n_chunks, tokens=flat.size,
            kld_mean=float(flat.mean()), kld_median=float(np.median(flat)),
            kld_p99=float(np.percentile(flat, 99)), kld_max=float(flat.max()),
            top1_agreement=float(agree.mean()), ppl=math.exp(float(nll.mean())),
            ppl_reference=self.ppl)

    def close(self) -> None:
        self.logp = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def quality_ladder(reference: str | Path, candidates: Sequence[str | Path], text: str, *,
                   n_ctx: int = 512, max_chunks: int = 8, threads: int | None = None,
                   workdir: str | Path | None = None) -> list[QualityResult]:
    """The reference against itself (all zeros: a sanity row), then every candidate."""
    with Reference(reference, text, n_ctx=n_ctx, max_chunks=max_chunks, threads=threads,
                   workdir=workdir) as ref:
        return [ref.compare(reference)] + [ref.compare(c) for c in candidates]


def pick_reference(paths: Sequence[str | Path]) -> Path:
    """The highest-precision file among quantizations of one model (F32 > BF16/F16 > Q8_0 > ...)."""
    from ..gguf_header import read_header

    def bits(p: str | Path) -> float:
        header = read_header(p)
        weights = sum(t.n_elements for t in header.tensors)
        return 8 * sum(t.n_bytes for t in header.tensors) / max(weights, 1)

    if not paths:
        raise EvidenceError("no model files to choose a reference from")
    return Path(max(paths, key=bits))


# llama.cpp prints KLD with 6 decimals and packs reference log-probs into 16 bits (dropping those
# below e^-16); measured differences on the starter model are ~0.05 % of the KLD. Allow 1e-5 + 1 %.
KLD_ABS_TOLERANCE = 1e-5
KLD_REL_TOLERANCE = 0.01
TOP1_TOLERANCE = 0.005


@dataclass(frozen=True)
class CrossCheck:
    """This module's figures against llama-perplexity's on one pair, and whether they agree."""

    pair: str
    n_ctx: int
    chunks: int
    tokens: int
    ours_kld_mean: float
    llama_kld_mean: float
    ours_kld_p99: float
    llama_kld_p99: float | None
    ours_top1: float
    llama_top1: float
    ours_ppl: float
    llama_ppl: float
    tolerance: float
    within: bool


def crosscheck(reference: str | Path, candidate: str | Path, corpus: str | Path, *,
               binary: Path, n_ctx: int = 256, chunks: int = 4,
               threads: int | None = None) -> CrossCheck:
    """This module's KLD and top-1 vs ``llama-perplexity --kl-divergence`` on the same pair."""
    from ..hardware import this_machine_plan
    from .tools import llama_perplexity_kld

    n_threads = threads or this_machine_plan().threads
    theirs = llama_perplexity_kld(binary, Path(reference), Path(candidate), Path(corpus),
                                  n_ctx=n_ctx, chunks=chunks, threads=n_threads)
    with Reference(reference, Path(corpus).read_text(), n_ctx=n_ctx, max_chunks=chunks,
                   threads=n_threads) as ref:
        ours = ref.compare(candidate)
    tolerance = KLD_ABS_TOLERANCE + KLD_REL_TOLERANCE * theirs.kld_mean
    within = (abs(ours.kld_mean - theirs.kld_mean) <= tolerance
              and abs(ours.top1_agreement - theirs.top1_agreement) <= TOP1_TOLERANCE)
    return CrossCheck(pair=f"{Path(candidate).stem} vs {Path(reference).stem}", n_ctx=n_ctx,
                      chunks=chunks, tokens=ours.tokens, ours_kld_mean=ours.kld_mean,
                      llama_kld_mean=theirs.kld_mean, ours_kld_p99=ours.kld_p99,
                      llama_kld_p99=theirs.kld_p99, ours_top1=ours.top1_agreement,
                      llama_top1=theirs.top1_agreement, ours_ppl=ours.ppl, llama_ppl=theirs.ppl,
                      tolerance=tolerance, within=within)
