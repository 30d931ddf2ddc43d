"""Choosing the next token: greedy argmax, or a per-sequence seeded sample by the Gumbel-max trick.

Sampling does not use torch's global RNG, whose stream is shared by all rows of a batch, so a completion would
depend on its batch mates. Each sequence gets its own generator seeded from (seed, prompt, sample index), and
argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T) (after top-p filtering). A completion is
then a function of its prompt and the seed only: reproducible across batch sizes, chunks and resumed runs.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import TopPLogitsWarper


def row_seed(seed: int, prompt_ids: list[int], sample_index: int) -> int:
    """Seed of one sampled sequence: a function of the run seed, the prompt tokens and the sample number."""
    digest = hashlib.sha256(f"{seed}|{sample_index}|{','.join(map(str, prompt_ids))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Sampler:
    """Temperature, top-p, then per-row seeded Gumbel noise, so that argmax is a sample (Gumbel-max trick).

    Each row draws from its own ``torch.Generator``, one draw per decoding step, so its noise sequence does not
    depend on which other rows share the batch (or were dropped from it).
    """

    def __init__(self, temperature: float, top_p: float, seeds: list[int]):
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        scores = logits / self.temperature
        if self.top_p is not None:
            scores = self.top_p(None, scores)
        # -inf (top-p filtered) stays -inf, so a filtered token is never picked.
        return scores.double().cpu() + gumbel_noise([self.generators[int(r)] for r in rows], scores.shape[-1])


def gumbel_noise(generators: list[torch.Generator], vocab: int) -> torch.Tensor:
    """One row of standard Gumbel noise per generator (float64; u kept off 0 and 1 so the double log is finite)."""
    uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in generators])
    return -torch.log(-torch.log(uniform.clamp_(1e-12, 1.0 - 1e-12)))


def next_tokens(logits: torch.Tensor, rows: list[int], sampler: Sampler | None) -> list[int]:
    """Each row's next token: the argmax of ``logits`` (greedy, ``sampler`` None) or of its sampled scores;
    ``rows``: the sequence number of each logits row (which generator it draws from)."""
    scores = sampler(logits, torch.tensor(rows)) if sampler is not None else logits
    return scores.argmax(-1).tolist()
