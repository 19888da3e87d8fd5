"""Random tokens (Somepalli et al., 2023): words or numbers inserted into the prompt, per image
(``mitigation.prompt``, ``conf/mitigation/rand_word.yaml`` and ``rand_numb.yaml``)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from memguard.mitigations import PromptTransform

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class RandomTokens(PromptTransform):
    """Somepalli et al. (2023), "Understanding and mitigating copying": insert ``count`` random items, each at a
    uniformly random word position of the prompt (split on spaces).

    ``kind="word"``: a random CLIP token (id uniform in [0, 49400), decoded by the tokenizer);
    ``kind="number"``: a random integer in [0, 100000). At inference the reference code inserts 4
    (``count``'s default): somepago/DCR ``sd_mitigation.py`` line 126 (``--rand_aug_repeats`` default 4),
    SonyResearch/mitigating_memorization ``generate_test_dataset_stp.py`` line 204 (``repeat_num=4``) and
    YuxinWenRick/diffusion_memorization ``README.md`` line 67 (``--repeat_num 4``). The 2 found in
    ``prompt_augmentation``'s signature (DCR ``sd_mitigation.py`` line 14) is the training-time augmentation's
    default.

    ``per="image"``: the draws are deterministic per (prompt, image seed, ``salt``): each image of a prompt gets its
    own augmented prompt. ``per="prompt"``: per (prompt, ``salt``), one augmented prompt for all the prompt's images,
    as Wen et al.'s code draws it (YuxinWenRick/diffusion_memorization ``inference_mem.py``, commit c8fe471,
    l. 80-86: ``prompt_augmentation`` once per prompt, then l. 113-118 one pipeline call with
    ``num_images_per_prompt``). Either way a run resumes identically and does not depend on batch size.
    """

    def __init__(self, kind: str, count: int = 4, salt: int = 0, per: str = "image") -> None:
        if kind not in ("word", "number"):
            raise ValueError(f"kind={kind!r} must be word or number")
        if count < 1:
            raise ValueError(f"count={count} must be >= 1")
        if per not in ("image", "prompt"):
            raise ValueError(f"per={per!r} must be image (a draw per image) or prompt (one per prompt, as Wen et "
                             "al.'s code)")
        self.kind, self.count, self.salt, self.per = kind, count, salt, per

    def __call__(self, prompt: str, seed: int, tokenizer: PreTrainedTokenizerBase) -> str:
        key = f"{self.kind}|{self.salt}|{seed}|{prompt}" if self.per == "image" else f"{self.kind}|{self.salt}|{prompt}"
        rng = random.Random(key)
        words = prompt.split(" ")
        for _ in range(self.count):
            item = tokenizer.decode([rng.randrange(49400)]) if self.kind == "word" else str(rng.randrange(100000))
            words.insert(rng.randint(0, len(words)), item)
        return " ".join(words)
