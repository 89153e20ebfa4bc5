"""Sampling parameters (vLLM's names) and the sampler: greedy, or temperature + top-p with a
generator per request, so a request's tokens do not depend on what it was batched with."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen.

    ``max_tokens``: tokens to generate at most. ``temperature``: 0 is greedy (argmax).
    ``top_p``: nucleus mass in (0, 1]. ``ignore_eos``: keep going past the model's EOS
    token(s). ``seed``: the request's generator seed (None: the engine's seed + the
    request's index). ``return_logits``: keep the fp32 logits row of every generated token
    in the output (tests and debugging).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    ignore_eos: bool = False
    seed: int | None = None
    return_logits: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of fp32 ``logits`` ``[n, vocab]``: argmax where temperature is 0
    (the first maximum, as torch and transformers pick), else a draw from the top-p
    renormalised softmax of ``logits / temperature`` with that row's generator."""
    out = logits.argmax(dim=-1).tolist()
    for i, sp in enumerate(params):
        if sp.temperature == 0:
            continue
        probs = torch.softmax(logits[i] / sp.temperature, dim=-1)
        if sp.top_p < 1:
            p, idx = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the top token always)
            drop = p.cumsum(0) - p >= sp.top_p
            probs = torch.zeros_like(probs).scatter_(0, idx, p.masked_fill(drop, 0.0))
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out
