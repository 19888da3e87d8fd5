"""Baseline mitigations that change the prompt or its embedding rather than the guidance schedule; they compose
with any schedule (``mitigation.prompt`` / ``mitigation.embedding`` beside ``mitigation.schedule``).

A prompt transform maps (prompt, image seed) to the text the model is given. The run keeps the original prompt
(alignment is scored against it) and records the text the model saw (``model_prompt``). An embedding adjustment
changes the prompt's text embedding before sampling and reports per image what it did.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from memguard.mitigations import Branches, DenoiserHook, NoiseAdjustment, masked_step, select_rows


class PromptTransform:
    """``transform(prompt, seed, tokenizer) -> str``: what the model is prompted with for this image."""

    def __call__(self, prompt: str, seed: int, tokenizer: PreTrainedTokenizerBase) -> str:
        raise NotImplementedError


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


class WenEmbeddingOptimization:
    """Wen et al. (ICLR 2024), inference-time mitigation: before sampling, at the first timestep T and the initial
    latents x_T, minimise per image

        L(e_p) = || eps(x_T, T, e_p) - eps(x_T, T, e_empty) ||_2        (= sqrt(d_T))

    over the prompt's text embedding e_p with AdamW (``lr``), until L <= ``l_target`` or ``max_iters``
    iterations; sampling then uses the optimised embedding. The start token's gradient is zeroed, as in Wen et
    al.'s code (see :class:`WenSharedEmbedding`). Each image stops on its own (an image that reached its target
    is frozen), so results do not depend on batch size. Returns per image the iterations used, the first and
    final L, whether the target was reached, and ``unet_evals_before``: its forward passes, ``iterations + 1``
    conditional and 1 unconditional (what the image costs alone: a batch also evaluates its finished images until
    its last one stops; the backward passes are not counted).
    """

    def __init__(self, l_target: float, lr: float = 0.05, max_iters: int = 10) -> None:
        if l_target <= 0 or lr <= 0 or max_iters < 0:
            raise ValueError(f"l_target={l_target}, lr={lr} must be > 0 and max_iters={max_iters} >= 0")
        self.l_target, self.lr, self.max_iters = l_target, lr, max_iters

    def __call__(self, model: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], x_in: Tensor, t: Tensor,
                 cond: dict[str, Tensor], uncond: dict[str, Tensor], **_: object) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
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
            with torch.enable_grad():  # also when the caller samples under torch.no_grad()
                (norms * active).sum().backward()
            embedding.grad[:, 0] = 0  # the start token is not optimised (as WenSharedEmbedding)
            masked_step(optimizer, embedding, active)
            iterations += active
        info = {"wen_iterations": iterations, "wen_first_norm": first, "wen_final_norm": final,
                "wen_reached_target": final <= self.l_target, "unet_evals_before": iterations + 2}
        return {**cond, "encoder_hidden_states": embedding.detach()}, info


class WenSharedEmbedding:
    """Wen et al. (ICLR 2024) as their code runs it: ONE text embedding per prompt, shared by the prompt's whole
    image set (all the prompt's seeds), optimised with AdamW (``lr``) on one L2 norm over the set,

        L(e_p) = || stack_i [eps(x_T^i, T, e_p) - eps(x_T^i, T, e_empty)] ||_2,

    stopping (the whole set together) once L <= ``l_target`` or after ``max_iters`` steps; the start token's
    gradient is zeroed. YuxinWenRick/diffusion_memorization ``local_sd_pipeline.py`` (commit c8fe471): one
    embedding repeated over ``num_images_per_prompt`` (lines 556 and 598-605), ``torch.norm(noise_pred_text,
    p=2)`` over the stacked set (line 618), the stop check before each step (lines 640-644),
    ``grad[:, [0]] * 0`` (lines 649-651).
    As there, AdamW's decoupled weight decay (its default 0.01) still acts on the start token.

    The set's initial latents are drawn again from the image's set of seeds, ``image_set(seed)`` (the runner
    sets it: every seed of the run, or under ``seed_scheme=per_prompt`` the prompt's own; without it, the
    batch's seeds), so the embedding does not depend on which batch an image lands in; it is computed once per
    prompt and cached.
    Returns, per image, its set's iterations, first and final L, whether the target was reached, and
    ``unet_evals_before``: the set's forward passes per image, ``iterations + 2`` (``N`` null and ``N (iterations
    + 1)`` conditional evaluations shared by its ``N`` images; backward passes not counted).
    """

    def __init__(self, l_target: float, lr: float = 0.05, max_iters: int = 10) -> None:
        if l_target <= 0 or lr <= 0 or max_iters < 0:
            raise ValueError(f"l_target={l_target}, lr={lr} must be > 0 and max_iters={max_iters} >= 0")
        self.l_target, self.lr, self.max_iters = l_target, lr, max_iters
        self.image_set: Callable[[int], Sequence[int]] | None = None
        self._cache: dict[tuple, tuple[Tensor, dict[str, float]]] = {}

    def __call__(self, model: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], x_in: Tensor, t: Tensor,
                 cond: dict[str, Tensor], uncond: dict[str, Tensor], prompts: Sequence[str] = (),
                 seeds: Sequence[int] = (), model_input: Callable[[Sequence[int]], Tensor] | None = None,
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``model(x, t, conditions)``: a family adapter (:mod:`memguard.families`), whose
        ``cond["encoder_hidden_states"]`` is optimised (SDXL's and SD3's pooled embeddings stay as encoded);
        ``model_input(seeds)``: the first step's scaled model input for those seeds (as ``x_in`` is drawn)."""
        embeddings = cond["encoder_hidden_states"]
        if model_input is None or len(prompts) != len(embeddings) or len(seeds) != len(prompts):
            raise ValueError("WenSharedEmbedding needs the batch's prompts, their seeds and a model_input(seeds) "
                             "function")
        rows, infos = [], []
        for i, prompt in enumerate(prompts):
            image_set = list(self.image_set(seeds[i]) if self.image_set is not None else seeds)
            key = (prompt, tuple(image_set), float(t), tuple(x_in.shape[1:]))
            if key not in self._cache:
                one = select_rows(cond, slice(i, i + 1)), select_rows(uncond, slice(i, i + 1))
                self._cache[key] = self.optimise(model, model_input(image_set), t, *one)
            rows.append(self._cache[key][0])
            infos.append(self._cache[key][1])
        info = {k: torch.tensor([row[k] for row in infos], device=embeddings.device) for k in infos[0]}
        return {**cond, "encoder_hidden_states": torch.cat(rows).to(embeddings.dtype)}, info

    def optimise(self, model: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], x_set: Tensor, t: Tensor,
                 cond: dict[str, Tensor], uncond: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """One prompt's shared embedding ``(1, L, D)`` for the set's model inputs ``x_set`` ``(N, C, h, w)``
        (``cond``, ``uncond``: that prompt's conditions, one row each)."""
        n = len(x_set)
        repeat = lambda conditions: {k: v.expand(n, *v.shape[1:]) for k, v in conditions.items()}
        with torch.no_grad():
            eps_u = model(x_set, t, repeat(uncond))
        embedding = cond["encoder_hidden_states"].detach().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([embedding], lr=self.lr)
        first = current = None
        iterations = 0
        for k in range(self.max_iters + 1):
            with torch.enable_grad():
                eps_c = model(x_set, t, repeat({**cond, "encoder_hidden_states": embedding}))
                loss = (eps_c - eps_u).float().norm(p=2)
            current = float(loss.detach())
            first = current if first is None else first
            if k == self.max_iters or current <= self.l_target:
                break
            optimizer.zero_grad(set_to_none=True)
            (grad,) = torch.autograd.grad(loss, [embedding])
            grad[:, 0] = 0
            embedding.grad = grad
            optimizer.step()
            iterations += 1
        info = {"wen_iterations": iterations, "wen_first_norm": first, "wen_final_norm": current,
                "wen_reached_target": current <= self.l_target,
                "unet_evals_before": iterations + 2}  # the set's forward passes, N (iterations + 2), per image
        return embedding.detach(), info


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
        if self.both:
            logits = logits.masked_fill(~self.keep.repeat(2, 1)[:, None, None, :], float("-inf"))
        else:
            logits[cond] = logits[cond].masked_fill(~self.keep[:, None, None, :], float("-inf"))
        probs = logits.softmax(dim=-1).view(batch * heads, query.shape[1], -1).to(value.dtype)
        out = attn.batch_to_head_dim(probs @ value)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@dataclass
class Baselines:
    """A mitigation's non-schedule parts, each optional: the slots of :mod:`memguard.mitigations`."""

    prompt: PromptTransform | None = None
    noise: NoiseAdjustment | None = None
    embedding: WenEmbeddingOptimization | WenSharedEmbedding | None = None
    branches: Branches | None = None
    attention: DenoiserHook | None = None
