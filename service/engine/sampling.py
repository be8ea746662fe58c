"""Next-token choice per job: repetition penalty, format mask, temperature, top-k, top-p,
seeded draws, and the log probabilities of the distribution the token came from."""
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
        """Greedy with no penalty, format or logprobs: the batch's argmax alone decides."""
        p = self.params
        return (p.greedy and p.repetition_penalty == 1.0 and p.response_format is None
                and not p.logprobs)

    def distribution(self, logits: torch.Tensor, seen: torch.Tensor | None,
                     allowed: torch.Tensor | None = None) -> torch.Tensor:
        """logits (vocab,) -> the logits the token is drawn from: after the repetition penalty,
        the format's mask (`allowed`, (vocab_limit,) bool) and the temperature (1 when greedy),
        before top-k and top-p truncation. Logprobs are the log-softmax of this."""
        p = self.params
        logits = logits[: self.vocab_limit].float()
        if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
            picked = logits[seen]
            logits = logits.scatter(0, seen, torch.where(picked > 0, picked / p.repetition_penalty,
                                                         picked * p.repetition_penalty))
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        return logits if p.greedy else logits / p.temperature

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None,
                 allowed: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """The chosen id, and the distribution it came from (see `distribution`)."""
        p = self.params
        dist = self.distribution(logits, seen, allowed)
        if p.greedy:
            return int(torch.argmax(dist)), dist
        logits = dist
        if 0 < p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p  # keep the first past top_p
            logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(logits, -1)
        return int(torch.multinomial(probs, 1, generator=self.generator)), dist


def logprobs_of(dist: torch.Tensor, token: int, top: int
                ) -> tuple[float, list[tuple[int, float]]]:
    """The token's log probability under `dist` and the `top` most likely (id, logprob),
    most likely first; tokens a format rules out (-inf) are never listed."""
    lp = torch.log_softmax(dist.float(), -1)
    if not top:
        return float(lp[token]), []
    values, ids = torch.topk(lp, min(top, lp.shape[0]))
    return float(lp[token]), [(i, v) for i, v in zip(ids.tolist(), values.tolist())
                              if v != float("-inf")]
