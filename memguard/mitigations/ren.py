"""Ren et al. (ECCV 2024), "Unveiling and Mitigating Memorization in Text-to-image Diffusion Models through Cross
Attention": the cross-attention edit installed on the denoiser while a batch is sampled (``mitigation.attention``,
``conf/mitigation/ren.yaml``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor

from memguard.mitigations import DenoiserHook, attention_logits, attention_output


class RenAttention(DenoiserHook):
    """Ren et al. (ECCV 2024): in the cross-attention, scale the conditional branch's pre-softmax logits of the
    first (start) token by ``c1`` and mask the tokens after the prompt's end token:

        s_cond[:, 0] <- c1 * s_cond[:, 0],      s[:, j] <- -inf  for j > position of <|endoftext|>

    so attention drawn by trigger tokens is diluted and the padding tokens (which carry the prompt's summary)
    are ignored. Installed on every cross-attention (``attn2``) module of the UNet for one batch, then removed.

    ``mask_branches="both"`` (default) masks both halves of the guidance batch with the conditional prompt's
    length, as renjie3/MemAttn does: ``refactored_classes/refactored_attention_processor.py`` lines 1247-1257
    build one mask of ``prompt_length`` (start through end token, ``MemAttn.py`` line 138) repeated over the
    batch (``repeat(2, ...)``) and applied to every row (line 1190), while ``c1`` scales only the conditional
    rows (``attn_weight[1::2]``, line 1198). ``"conditional"`` masks the conditional half only.
    """

    def __init__(self, c1: float = 1.25, mask_trailing: bool = True, mask_branches: str = "both") -> None:
        if c1 <= 0:
            raise ValueError(f"c1={c1} must be > 0")
        if mask_branches not in ("both", "conditional"):
            raise ValueError(f"mask_branches={mask_branches!r} must be both or conditional")
        self.c1, self.mask_trailing, self.mask_branches = c1, mask_trailing, mask_branches

    families = ("sd", "sdxl")
    blocks_branches = True  # its processors edit the conditional half of a [null, condition] batch

    def installed(self, family, prompts: Sequence[str], branches: int) -> AbstractContextManager[None]:
        """The :class:`memguard.mitigations.DenoiserHook` entry: the prompts' token counts from the family's
        tokenizer, the padded length from its text encoder's."""
        if branches != 2:
            raise ValueError(f"Ren et al.'s attention edits a [null, condition] batch, not {branches} branches")
        sequence = family.tokenizer.model_max_length
        lengths = family.tokenizer(list(prompts), truncation=True, max_length=sequence, return_length=True).length
        return self.installed_on(family.denoiser, torch.as_tensor(lengths, device=family.denoiser.device), sequence)

    @contextmanager
    def installed_on(self, unet: torch.nn.Module, lengths: Tensor, sequence: int) -> Iterator[None]:
        """Every ``attn2`` processor of ``unet`` replaced while the block runs, the original ones restored after;
        ``lengths``: each prompt's token count through its end token, ``sequence``: the padded length."""
        original = unet.attn_processors
        keep = self.keep_mask(lengths, sequence)
        unet.set_attn_processor({name: _RenProcessor(self.c1, keep, self.mask_branches == "both")
                                 if ".attn2." in name else proc
                                 for name, proc in original.items()})
        try:
            yield
        finally:
            unet.set_attn_processor(original)

    def keep_mask(self, lengths: Tensor, sequence: int) -> Tensor:
        """``(B, L)``: True for the start token through the end token of each prompt (all, without masking)."""
        mask = torch.arange(sequence, device=lengths.device)[None] < lengths[:, None]
        return mask if self.mask_trailing else torch.ones_like(mask)


class _RenProcessor:
    """diffusers' plain attention, with :class:`RenAttention`'s logit edit: ``c1`` on the conditional half of the
    batch (the sampler's batches are ``[unconditional, conditional]``), the mask on that half or on both."""

    def __init__(self, c1: float, keep: Tensor, both: bool = False) -> None:
        self.c1, self.keep, self.both = c1, keep, both

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        logits, value = attention_logits(attn, hidden_states, encoder_hidden_states, torch.float32)
        batch = logits.shape[0]
        cond = slice(batch // 2, batch)
        logits[cond, ..., 0] *= self.c1
        if self.both:
            logits = logits.masked_fill(~self.keep.repeat(2, 1)[:, None, None, :], float("-inf"))
        else:
            logits[cond] = logits[cond].masked_fill(~self.keep[:, None, None, :], float("-inf"))
        return attention_output(attn, logits, value)
