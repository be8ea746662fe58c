"""Next-token choice per job: repetition penalty, temperature, top-k, top-p, seeded draws."""
from __future__ import annotations

import torch

from service.engine.job import SamplingParams


class Sampler:
    """One job's sampler; holds its own generator so seeded runs are reproducible."""

    def __init__(self, params: SamplingParams, vocab_limit: int, device: torch.device) -> None:
        self.params = params
        self.vocab_limit = vocab_limit  # ids past the tokenizer's vocabulary are never chosen
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalty: the argmax alone decides."""
        return self.params.greedy and self.params.repetition_penalty == 1.0

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None) -> int:
        """logits (vocab,) float -> the chosen id. `seen` holds prompt+reply ids for the penalty."""
        p = self.params
        logits = logits[: self.vocab_limit].float()
        if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
            picked = logits[seen]
            logits = logits.scatter(0, seen, torch.where(picked > 0, picked / p.repetition_penalty,
                                                         picked * p.repetition_penalty))
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p  # keep the first past top_p
            logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(logits, -1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
