"""Baseline mitigations that change the prompt or its embedding rather than the guidance schedule; they compose
with any schedule (``mitigation.prompt`` / ``mitigation.embedding`` beside ``mitigation.schedule``).

A prompt transform maps (prompt, image seed) to the text the model is given. The run keeps the original prompt
(alignment is scored against it) and records the text the model saw (``model_prompt``). An embedding adjustment
changes the prompt's text embedding before sampling and reports per image what it did.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
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


class WenEmbeddingOptimization:
    """Wen et al. (ICLR 2024), inference-time mitigation: before sampling, at the first timestep T and the initial
    latents x_T, minimise per image

        L(e_p) = || eps(x_T, T, e_p) - eps(x_T, T, e_empty) ||_2        (= sqrt(d_T))

    over the prompt's text embedding e_p with AdamW (``lr``), until L <= ``l_target`` or ``max_iters``
    iterations; sampling then uses the optimised embedding. Each image stops on its own (an image that reached
    its target is frozen), so results do not depend on batch size. Returns per image the iterations used, the
    first and final L, and whether the target was reached.
    """

    def __init__(self, l_target: float, lr: float = 0.05, max_iters: int = 10) -> None:
        if l_target <= 0 or lr <= 0 or max_iters < 0:
            raise ValueError(f"l_target={l_target}, lr={lr} must be > 0 and max_iters={max_iters} >= 0")
        self.l_target, self.lr, self.max_iters = l_target, lr, max_iters

    def __call__(self, model: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], x_in: Tensor, t: Tensor,
                 cond: dict[str, Tensor], uncond: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``model(x, t, conditions)``: a family adapter (:mod:`memguard.families`); the prompt embedding optimised
        is ``cond["encoder_hidden_states"]`` (for SDXL and SD3 the token embeddings; their pooled embeddings stay
        as encoded)."""
        with torch.no_grad():
            eps_u = model(x_in, t, uncond)
        embedding = cond["encoder_hidden_states"].detach().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([embedding], lr=self.lr)
        active = torch.ones(len(embedding), dtype=torch.bool, device=embedding.device)
        iterations = torch.zeros(len(embedding), dtype=torch.long, device=embedding.device)
        first = final = None
        for k in range(self.max_iters + 1):
            with torch.enable_grad():
                out = model(x_in, t, {**cond, "encoder_hidden_states": embedding})
                norms = (out - eps_u).float().flatten(1).norm(dim=1)
            current = norms.detach()
            first = current.clone() if first is None else first
            final = current.clone() if final is None else torch.where(active, current, final)
            active &= current > self.l_target
            if k == self.max_iters or not active.any():
                break
            optimizer.zero_grad(set_to_none=True)
            (norms * active).sum().backward()
            frozen = embedding.detach().clone()
            optimizer.step()
            with torch.no_grad():  # AdamW's decay and momentum must not move images that are done
                embedding[~active] = frozen[~active]
            iterations += active
        info = {"wen_iterations": iterations, "wen_first_norm": first, "wen_final_norm": final,
                "wen_reached_target": final <= self.l_target}
        return {**cond, "encoder_hidden_states": embedding.detach()}, info


class RenAttention:
    """Ren et al. (ECCV 2024): in the conditional branch's cross-attention only, scale the pre-softmax logits of
    the first (start) token by ``c1`` and mask the tokens after the prompt's end token:

        s[:, 0] <- c1 * s[:, 0],      s[:, j] <- -inf  for j > position of <|endoftext|>

    so attention drawn by trigger tokens is diluted and the padding tokens (which carry the prompt's summary)
    are ignored. Installed on every cross-attention (``attn2``) module of the UNet for one batch, then removed.
    """

    def __init__(self, c1: float = 1.25, mask_trailing: bool = True) -> None:
        if c1 <= 0:
            raise ValueError(f"c1={c1} must be > 0")
        self.c1, self.mask_trailing = c1, mask_trailing

    @contextmanager
    def installed(self, unet: torch.nn.Module, lengths: Tensor, sequence: int) -> Iterator[None]:
        """Every ``attn2`` processor of ``unet`` replaced while the block runs, the original ones restored after;
        ``lengths``: each prompt's token count through its end token, ``sequence``: the padded length."""
        original = unet.attn_processors
        keep = self.keep_mask(lengths, sequence)
        unet.set_attn_processor({name: _RenProcessor(self.c1, keep) if ".attn2." in name else proc
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
    """diffusers' plain attention, with :class:`RenAttention`'s logit edit on the conditional half of the batch
    (the sampler's batches are ``[unconditional, conditional]``)."""

    def __init__(self, c1: float, keep: Tensor) -> None:
        self.c1, self.keep = c1, keep

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        heads = attn.heads
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key, value = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        logits = (query.float() @ key.float().transpose(1, 2) * attn.scale).view(batch, heads, query.shape[1], -1)
        cond = slice(batch // 2, batch)
        logits[cond, ..., 0] *= self.c1
        logits[cond] = logits[cond].masked_fill(~self.keep[:, None, None, :], float("-inf"))
        probs = logits.softmax(dim=-1).view(batch * heads, query.shape[1], -1).to(value.dtype)
        out = attn.batch_to_head_dim(probs @ value)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@dataclass
class Baselines:
    """A mitigation's non-schedule parts (``mitigation.prompt``, ``.embedding``, ``.attention``), each optional."""

    prompt: PromptTransform | None = None
    embedding: WenEmbeddingOptimization | None = None
    attention: RenAttention | None = None
