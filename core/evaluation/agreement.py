"""Agreement of a pruned model with the unpruned one: top-1 next-token agreement and mean KL(full || pruned),
measured teacher-forced on each example's agreement text."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def finite(logp: torch.Tensor) -> torch.Tensor:
    """Log-probs with -inf (a masked vocabulary entry) made the lowest finite value, so that a zero
    probability times it is 0 rather than NaN."""
    return logp.clamp(min=torch.finfo(logp.dtype).min)


@dataclass
class Reference:
    """The unpruned model on one agreement text: next-token probabilities P (fp16, the cache's precision),
    its top-1 tokens and the text's sum of P log p, so that KL(full || pruned) over the text costs one dot
    product. Built the same way whether or not it is cached, so agreement never depends on the cache."""

    probs: torch.Tensor   # [T, V] fp16
    top1: torch.Tensor    # [T]
    plogp: float          # sum over positions and vocabulary of P * log p (log p in fp32)

    @classmethod
    def of(cls, logp: torch.Tensor) -> Reference:
        probs = logp.exp().half()
        return cls(probs, logp.argmax(-1), float((probs.float() * finite(logp)).sum()))


@dataclass
class Agreement:
    """Running top-1 agreement and KL(full || pruned) over tokens."""

    agree: float = 0.0
    kl: float = 0.0
    tokens: int = 0
    seconds: float = 0.0  # spent on agreement alone, which tokens/s leaves out

    def add(self, full: Reference, pruned: torch.Tensor) -> None:
        """``pruned``: the pruned model's log-probs [T, V] on the same positions as ``full``. Top-1 agrees where
        the full model's top token is (one of) the pruned model's most likely; only sums over positions are
        kept, so the KL's cross term is one dot product over the whole text (an elementwise product and
        argmax took ~8x as long on code-sized inputs)."""
        start = time.perf_counter()
        at_full_top1 = pruned.gather(-1, full.top1[:, None]).squeeze(-1)
        self.agree += float((at_full_top1 >= pruned.amax(-1)).sum())
        cross = torch.dot(full.probs.reshape(-1).float(), pruned.reshape(-1))  # sum of P log p_pruned
        if not torch.isfinite(cross):  # a -inf log-prob: 0 * -inf gave NaN; count it as the lowest finite value
            cross = (full.probs.float() * finite(pruned)).sum()
        self.kl += full.plogp - float(cross)
        self.tokens += len(pruned)
        self.seconds += time.perf_counter() - start

    def result(self) -> dict[str, float]:
        return {"top1_agreement": self.agree / self.tokens, "mean_kl": self.kl / self.tokens}
