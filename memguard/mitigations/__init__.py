"""The loop's extension points: what a mitigation may change besides the guidance scale, one small interface each.

A mitigation (``conf/mitigation/NAME.yaml``) is a guidance schedule (``mitigation.schedule``,
:mod:`memguard.guidance`) plus any of these slots, each instantiated from the YAML and called by
:func:`memguard.sampling.generate_images` at one fixed place; no method's code is inside the loop.

=====================  ==================================  ===============================================
slot                   interface (called)                  methods
=====================  ==================================  ===============================================
``mitigation.prompt``  :class:`PromptTransform` (per      random words / numbers (Somepalli et al.)
                       image, on the text)
``mitigation.noise``   :class:`NoiseAdjustment` (once per  Han et al. (``han``, ``han_per_sample``), SAIL
                       batch, before sampling, on x_T)
``mitigation.          ``adjust(...)`` (once per batch,    Wen et al. (``wen_l1``, ``wen_l3``, per image),
embedding``            before sampling, on the prompt      PRSS's semantic search (``prss_ss``)
                       embedding; the sibling of
                       ``noise``; see :func:`memguard.
                       sampling.generate_images`)
``mitigation.          :class:`Branches` (every step: more PRSS (``prss``, ``prss_ss``), GUARD (``guard``)
branches``             conditions in the one model call,
                       and their combination)
``mitigation.          :class:`DenoiserHook` (around the   Ren et al. (``ren``), NeMo (``nemo``), GUARD's
attention``            batch's sampling: module hooks on   spike attenuation (``guard``, ``guard_ca``)
                       the denoiser)
=====================  ==================================  ===============================================

Every slot is per sample: a batch's images get what they would get alone (their draws derive from the image's
seed), so results never depend on batch size or sharding. A slot object may set ``families`` (the family names
it serves, :mod:`memguard.families`); a run on another family is refused in one line.

Per-image side results go into the ``info`` dict a slot returns: ``{name: tensor (B,)}``, recorded per image in
``generations.csv`` and averaged in ``metrics.json``. The key ``unet_evals_before`` holds the denoiser evaluations
(samples through the network, forward passes; one per sample per branch) the slot spent before sampling; it is
added to the loop's own count, so ``unet_evals_per_image`` is a method's whole cost. ``unet_backward_before``
counts, in the same units, the samples a slot's optimisation sends back through the denoiser (gradients);
``metrics.json`` reports its mean as ``unet_backward_per_image``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import PreTrainedTokenizerBase

# memguard.families imports this package (its refusals read ``families``), so its types are named here, not imported
Family = Any  # a family adapter, memguard.families.Family
Conditions = dict[str, Tensor]  # memguard.families.Conditions: the denoiser's keyword arguments, batch-first
Info = dict[str, Tensor]  # per-image side results, each (B,)
SLOTS = ("prompt", "noise", "embedding", "branches", "attention")  # mitigation.<slot>, in the order they act


@dataclass
class Start:
    """The first sampling step as the loop takes it: the scheduler (timesteps set), its first timestep ``t``,
    ``sigma = init_noise_sigma`` (x_T = sigma * unit noise), and ``a``, ``b`` with ``eps = a out + b x_in`` at this
    step (:meth:`memguard.families.Family.eps_coefficients`; eps models: 1, 0)."""

    scheduler: SchedulerMixin
    t: Tensor
    sigma: float
    a: float = 1.0
    b: float = 0.0

    def model_input(self, latents: Tensor) -> Tensor:
        """The model input at the first step for latents ``x_T`` (``scale_model_input``; identity for DDIM, DPM)."""
        if hasattr(self.scheduler, "scale_model_input"):
            return self.scheduler.scale_model_input(latents, self.t)
        return latents

    def eps(self, output: Tensor, latents: Tensor) -> Tensor:
        """The model's output at the first step in eps units (v-prediction: ``sqrt(abar) v + sqrt(1-abar) x``)."""
        if self.a == 1 and not self.b:
            return output
        return self.a * output + self.b * self.model_input(latents)


class PromptTransform:
    """``mitigation.prompt``: ``transform(prompt, seed, tokenizer) -> str``, what the model is prompted with for
    this image (random tokens). The run keeps the original prompt (alignment is scored against it) and records the
    text the model saw (``model_prompt``)."""

    def __call__(self, prompt: str, seed: int, tokenizer: PreTrainedTokenizerBase) -> str:
        raise NotImplementedError


# ``mitigation.embedding``: ``adjust(model, x_in, t, cond, uncond, prompts=..., seeds=..., model_input=...) ->
# (cond, info)``, the prompt's conditions replaced before sampling (Wen et al., PRSS's semantic search)
EmbeddingAdjustment = Callable[..., tuple[Conditions, Info]]


class NoiseAdjustment:
    """``mitigation.noise``: changes each image's initial latents before sampling (Han et al., SAIL).

    ``adjust(family, latents, start, cond, uncond, prompts=..., seeds=...) -> (latents, info)``: ``latents`` is
    x_T as the loop starts from it (``start.sigma`` times the image's unit noise, ``(B, C, h, w)``), ``cond`` and
    ``uncond`` the batch's conditions (``family(start.model_input(x), start.t, cond)`` evaluates the denoiser);
    ``prompts`` the texts the model is given and ``seeds`` the images' seeds (any random draw of the method derives
    from them). Returns the adjusted x_T and per-image info (``unet_evals_before``: its denoiser evaluations).
    """

    families: ClassVar[tuple[str, ...] | None] = None

    def __call__(self, family: Family, latents: Tensor, start: Start, cond: Conditions, uncond: Conditions, *,
                 prompts: Sequence[str], seeds: Sequence[int]) -> tuple[Tensor, Info]:
        raise NotImplementedError


class Branches:
    """``mitigation.branches``: more than the two CFG branches per step (PRSS's prompt re-anchoring).

    :meth:`conditions` gives, once per batch, the extra conditions (each with one row per sample); the loop
    evaluates them in the same model call as ``[null, condition]``, as ``[null, condition, extra_1, ...]``, and
    :meth:`combine` turns the outputs into the one prediction the scheduler steps with (in place of
    ``eps_u + s (eps_c - eps_u)``). ``d_t`` stays ``||eps_c - eps_u||^2`` of the condition the model is given.
    """

    families: ClassVar[tuple[str, ...] | None] = None

    def conditions(self, family: Family, prompts: Sequence[str], size: int | None) -> list[Conditions]:
        """The extra branches' conditions for the batch; ``prompts``: the images' original prompts (before any
        ``mitigation.prompt`` rewrote them), ``size``: the image side in pixels."""
        raise NotImplementedError

    def begin(self, steps: int) -> None:
        """Called by the loop before a batch's steps with their number (the scheduler's timesteps); a method whose
        weights follow the progress ``step / steps`` keeps it. Nothing by default."""

    def combine(self, eps_u: Tensor, eps_c: Tensor, extra: list[Tensor], scale: Tensor, step: int,
                a: float = 1.0) -> Tensor:
        """The prediction to step with, from the branches' raw outputs (each ``(B, C, h, w)``) and the schedule's
        scale ``(B,)`` at sampling step ``step``; ``a``: the step's eps coefficient (``eps_c - eps_u = a (out_c -
        out_u)``, :meth:`memguard.families.Family.eps_coefficients`), for a method whose thresholds are in eps
        units on a v or flow model."""
        raise NotImplementedError

    def info(self) -> Info:
        """Per-image side results of the batch just sampled (``{name: (B,)}``, read once after its last step and
        recorded as a slot's ``info``); none by default."""
        return {}


class DenoiserHook:
    """``mitigation.attention``: edits the denoiser's modules while one batch is sampled (Ren et al.'s attention
    processors, NeMo's value-neuron masks), then restores them.

    ``installed(family, prompts, branches)`` is a context manager; the batches the denoiser sees inside it are
    ``branches`` blocks of the batch's samples, in the loop's order (``[null, condition, extra...]``), so row
    ``j * B + i`` is sample ``i``'s branch ``j``. ``prompts``: the texts the model is given.
    """

    families: ClassVar[tuple[str, ...] | None] = None
    blocks_branches: ClassVar[bool] = False  # True: needs exactly the two CFG branches (and both evaluated)

    def installed(self, family: Family, prompts: Sequence[str], branches: int) -> AbstractContextManager[None]:
        raise NotImplementedError


def attention_logits(attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None,
                     dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """diffusers' plain attention (``AttnProcessor``) up to its softmax, for a :class:`DenoiserHook` that edits
    the logits: ``(logits, value)``, the logits ``(B, heads, Q, K)`` in ``dtype`` (default: the query's dtype
    promoted to at least float32) and the values ``(B heads, K, d)``. :func:`attention_output` finishes it."""
    batch = hidden_states.shape[0]
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if attn.norm_cross and encoder_hidden_states is not None:
        context = attn.norm_encoder_hidden_states(context)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key, value = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
    dtype = dtype or torch.promote_types(query.dtype, torch.float32)
    logits = query.to(dtype) @ key.to(dtype).transpose(1, 2) * attn.scale
    return logits.view(batch, attn.heads, query.shape[1], -1), value


def attention_output(attn: Any, logits: Tensor, value: Tensor) -> Tensor:
    """The rest of diffusers' plain attention after :func:`attention_logits`: the softmax over the keys, the
    values' weighted sum and the output projection."""
    batch, heads, queries, keys = logits.shape
    probs = logits.softmax(dim=-1).view(batch * heads, queries, keys).to(value.dtype)
    out = attn.batch_to_head_dim(probs @ value)
    return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def select_rows(conditions: Conditions, index: Tensor | slice) -> Conditions:
    """The conditions of some samples of a batch: each tensor indexed by ``index`` (a mask, indices, or a slice,
    e.g. ``slice(i, i + 1)`` for sample ``i`` alone)."""
    return {key: value[index] for key, value in conditions.items()}


def repeat_rows(mask: Tensor, branches: int) -> Tensor:
    """A per-sample tensor ``(B, ...)`` repeated for a denoiser batch of ``branches`` blocks ``(branches * B, ...)``."""
    return torch.cat([mask] * branches)


def masked_step(optimizer: torch.optim.Optimizer, param: Tensor, active: Tensor) -> None:
    """One optimiser step on the rows of ``param`` where ``active`` (``(B,)``); the other rows are restored, so an
    optimiser's decay and momentum never move an image that is done (per-image optimisation in a batch, as alone)."""
    frozen = param.detach().clone()
    optimizer.step()
    with torch.no_grad():
        param[~active] = frozen[~active]


@dataclass
class Baselines:
    """A mitigation's non-schedule parts, each optional: the slots above, in the order they act."""

    prompt: PromptTransform | None = None
    noise: NoiseAdjustment | None = None
    embedding: EmbeddingAdjustment | None = None
    branches: Branches | None = None
    attention: DenoiserHook | None = None
