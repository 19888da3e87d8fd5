"""Baseline mitigations that change the prompt rather than the guidance schedule; they compose with any schedule.

A prompt transform maps (prompt, image seed) to the text the model is given. The run keeps the original prompt
(alignment is scored against it) and records the text the model saw (``model_prompt``).
"""

from __future__ import annotations

import random

from transformers import PreTrainedTokenizerBase


class PromptTransform:
    """``transform(prompt, seed, tokenizer) -> str``: what the model is prompted with for this image."""

    def __call__(self, prompt: str, seed: int, tokenizer: PreTrainedTokenizerBase) -> str:
        raise NotImplementedError


class RandomTokens(PromptTransform):
    """Somepalli et al. (2023), "Understanding and mitigating copying": insert ``count`` random items, each at a
    uniformly random word position of the prompt (split on spaces).

    ``kind="word"``: a random CLIP token (id uniform in [0, 49400), decoded by the tokenizer);
    ``kind="number"``: a random integer in [0, 100000). Their DCR code inserts 2 (``count``'s default; Wen et
    al.'s reproduction uses 4). The draws are deterministic per (prompt, image seed, ``salt``), so a run
    resumes identically and does not depend on batch size.
    """

    def __init__(self, kind: str, count: int = 2, salt: int = 0) -> None:
        if kind not in ("word", "number"):
            raise ValueError(f"kind={kind!r} must be word or number")
        if count < 1:
            raise ValueError(f"count={count} must be >= 1")
        self.kind, self.count, self.salt = kind, count, salt

    def __call__(self, prompt: str, seed: int, tokenizer: PreTrainedTokenizerBase) -> str:
        rng = random.Random(f"{self.kind}|{self.salt}|{seed}|{prompt}")
        words = prompt.split(" ")
        for _ in range(self.count):
            item = tokenizer.decode([rng.randrange(49400)]) if self.kind == "word" else str(rng.randrange(100000))
            words.insert(rng.randint(0, len(words)), item)
        return " ".join(words)
