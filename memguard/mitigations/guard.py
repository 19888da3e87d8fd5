"""GUARD (Zhao, Triantafillou, Triantafillou, ICML 2026, "You Don't Need All That Attention: Surgical
Memorization Mitigation in Text-to-Image Diffusion Models"), and its attenuation alone ("CA attenuation").

Their code: kairanzhao/GUARD, commit 3a49daf (``local_sd_pipeline.py``, ``inference_mem.py``, ``README.md``, MIT);
line numbers below are of that commit.

**Spike attenuation** (:class:`SpikeAttenuation`, slot ``mitigation.attention``). In the cross-attention
(``attn2``) of the listed blocks, for each sample and head of the attenuated branch, with ``s`` the pre-softmax
logits ``(Q, K)`` (queries: latent positions, keys: the 77 text tokens), ``m_j = max_q s[q, j]`` and ``mu``,
``sd`` the mean and (unbiased) standard deviation of ``m_1 .. m_{K-1}`` (the start token left out), a token ``j``
is a spike where ``(m_j - mu) / (sd + 1e-6) > threshold`` (never the start token), and a spike's column of logits
is multiplied by ``scale`` before the softmax (``local_sd_pipeline.py`` l. 775-832). Their hook replaces every
cross-attention's forward (l. 732-984); it edits the blocks of ``--intervention_blocks`` (l. 745) and the second
half of a ``[null, condition]`` batch (l. 794-798), or the positive rows of GUARD's three-branch batch
(l. 785-791). Here: the last branch of the loop's batch, which is the condition in plain CFG and GUARD's
attenuated branch below.

**GUARD** (:class:`Guard`, slot ``mitigation.branches``; their ``dual_guidance_call``, l. 1963-2408). Each step
evaluates the null prompt ``eps_u``, the prompt ``eps_c`` (the repulsive branch; what the loop conditions on) and
the prompt again with its cross-attention spikes attenuated ``eps_a`` (the positive branch), in one call
(l. 2268-2287). With ``v_gt = eps_c - eps_u``, ``v_a = eps_a - eps_u``, the schedule's scale ``g`` and the step's
progress ``p = k / steps`` (``k = 0`` first):

    cos   = <v_a, v_gt> / (|v_a| |v_gt|)                                    (per sample, l. 2303-2318)
    v_eff = v_a - [cos > 0.9] clip(<v_a, v_gt> / |v_gt|^2, -2, 2) v_gt
    w     = repulsion cos(p pi / 2)                                         (l. 2322-2325, "cosine")
    eps   = eps_u + g v_eff - w v_gt                                        (l. 2346)

The orthogonalisation is on because ``inference_mem.py`` leaves ``orthogonalize_neighbors`` at its default
(l. 849 is commented out; ``local_sd_pipeline.py`` l. 1979-1981: True, 0.9, 2.0); their neighbour gating is
``none`` (l. 844: weight 1) and the positive schedule ``none`` (l. 845). The README's GUARD command
(``--repulsion_scale 2.0 --spike_scale 0.3 --spike_threshold 0.1 --intervention_blocks BLOCKS_EARLY``) gives the
defaults; its CA attenuation command uses ``--spike_threshold 0.01``. The paraphrase their command loads
(``--prompt_aug_style neighbor_replace``) is not what is sampled: with ``--xattn_rescale`` the positive prompt is
the prompt itself (``inference_mem.py`` l. 817), so none is needed here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor

from memguard.errors import UserError
from memguard.mitigations import (Branches, Conditions, DenoiserHook, Family, Info, attention_logits,
                                  attention_output)

log = logging.getLogger(__name__)

# inference_mem.py l. 886-921: the attn2 modules of SD 1.x / 2.x UNets, in their five groups
_DOWN_EARLY = [f"down_blocks.{b}.attentions.{a}" for b in (0, 1) for a in (0, 1)]
_DOWN_LATE = [f"down_blocks.{b}.attentions.{a}" for b, n in ((2, 2), (3, 3)) for a in range(n)]
_MID = ["mid_block.attentions.0"]
_UP_EARLY = [f"up_blocks.{b}.attentions.{a}" for b in (0, 1) for a in range(3)]
_UP_LATE = [f"up_blocks.{b}.attentions.{a}" for b in (2, 3) for a in range(3)]
# l. 923-939 (--intervention_blocks BLOCKS_ALL, BLOCKS_SEMANTIC, ...): name -> their module names
BLOCK_GROUPS: dict[str, list[str]] = {
    name: [f"{block}.transformer_blocks.0.attn2" for block in blocks] for name, blocks in {
        "all": _DOWN_EARLY + _DOWN_LATE + _MID + _UP_EARLY + _UP_LATE,
        "semantic": _DOWN_LATE + _MID + _UP_EARLY,
        "detail": _DOWN_EARLY + _UP_LATE,
        "mid": _MID,
        "early": _DOWN_EARLY + _DOWN_LATE + _MID,
        "late": _MID + _UP_EARLY + _UP_LATE,
        "middetail": _MID + _DOWN_EARLY + _UP_LATE,
    }.items()}
DECAYS = ("cosine", "linear", "sine", "constant")  # local_sd_pipeline.py l. 2322-2329


def block_names(blocks: str | Sequence[str]) -> list[str]:
    """The attn2 module names of a group of :data:`BLOCK_GROUPS` or of a list of names."""
    if isinstance(blocks, str):
        if blocks not in BLOCK_GROUPS:
            raise ValueError(f"blocks={blocks!r} must be one of {', '.join(BLOCK_GROUPS)} or a list of attn2 "
                             "module names (down_blocks.0.attentions.0.transformer_blocks.0.attn2, ...)")
        return BLOCK_GROUPS[blocks]
    return [str(name) for name in blocks]


class SpikeAttenuation(DenoiserHook):
    """Cross-attention spike attenuation (their "CA attenuation"; formula: module docstring) on the last branch of
    the loop's batch. ``scale`` (``--spike_scale``, 0.3), ``threshold`` (``--spike_threshold``: 0.01 in the README's
    CA attenuation command, 0.1 in its GUARD command), ``blocks`` (``--intervention_blocks BLOCKS_EARLY``: every
    down block and the mid block; a :data:`BLOCK_GROUPS` name or a list of module names).

    The logits are computed in float32 (or the model's dtype if wider); theirs are in the model's bfloat16
    (``torch.bmm`` on the bf16 query and key, l. 772-773), where the z-scores of near-tied tokens round."""

    families = ("sd",)  # their block names are of the SD 1.x / 2.x UNet (SDXL's differ)

    def __init__(self, scale: float = 0.3, threshold: float = 0.1, blocks: str | Sequence[str] = "early") -> None:
        if scale <= 0:
            raise ValueError(f"scale={scale} must be > 0 (their --spike_scale; 1: no attenuation)")
        self.scale, self.threshold, self.blocks = scale, threshold, block_names(blocks)
        self._warned = False

    def installed(self, family: Family, prompts: Sequence[str], branches: int) -> AbstractContextManager[None]:
        if not self._warned:  # once per run: their numbers are SD 1.4's, not this model's
            log.warning("mitigation.attention: GUARD's threshold=%s, scale=%s are their README's for SD 1.4, not "
                        "calibrated on this model; tune mitigation.attention.threshold and .scale for it",
                        self.threshold, self.scale)
            self._warned = True
        return self.installed_on(family.denoiser, branches)

    @contextmanager
    def installed_on(self, unet: torch.nn.Module, branches: int) -> Iterator[None]:
        """The listed attn2 processors of ``unet`` replaced while the block runs (the last of ``branches`` blocks of
        the batch attenuated), the original ones restored after."""
        original = unet.attn_processors
        chosen = {f"{name}.processor" for name in self.blocks} & set(original)
        if not chosen:
            raise UserError(f"mitigation.attention.blocks: none of {', '.join(self.blocks[:2])}, ... is an attn2 "
                            f"module of this denoiser (it has {', '.join(sorted(original)[:2])}, ...); name its "
                            "modules in mitigation.attention.blocks")
        unet.set_attn_processor({name: _SpikeProcessor(self.scale, self.threshold, branches) if name in chosen
                                 else processor for name, processor in original.items()})
        try:
            yield
        finally:
            unet.set_attn_processor(original)


class _SpikeProcessor:
    """diffusers' plain attention with :class:`SpikeAttenuation`'s logit edit on the last of ``branches`` blocks of
    the batch."""

    def __init__(self, scale: float, threshold: float, branches: int) -> None:
        self.scale, self.threshold, self.branches = scale, threshold, branches

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        logits, value = attention_logits(attn, hidden_states, encoder_hidden_states)
        batch, keys = logits.shape[0], logits.shape[-1]
        rows = slice(batch - batch // self.branches, batch)
        logits[rows] = attenuate_spikes(logits[rows], self.scale, self.threshold)
        if attention_mask is not None:  # after the edit, as theirs (l. 904-905); diffusers' (B heads, 1, K) bias
            mask = attn.prepare_attention_mask(attention_mask, keys, batch)
            logits = logits + mask.view(batch, attn.heads, -1, keys).to(logits.dtype)
        return attention_output(attn, logits, value)


def attenuate_spikes(logits: Tensor, scale: float, threshold: float) -> Tensor:
    """``logits`` ``(..., Q, K)`` with each spike token's column times ``scale`` (their l. 799-832)."""
    peak = logits.amax(dim=-2)  # (..., K): the token's largest logit over the queries
    content = peak[..., 1:]
    z = (peak - content.mean(dim=-1, keepdim=True)) / (content.std(dim=-1, keepdim=True) + 1e-6)
    spike = z > threshold
    spike[..., 0] = False
    return torch.where(spike.unsqueeze(-2), logits * scale, logits)


class Guard(Branches):
    """GUARD's guidance (formula: module docstring): towards the attenuated prompt, away from the plain one.

    ``repulsion`` (``--repulsion_scale``: 2.0 in the README's command, 3.0 their argparse default,
    ``inference_mem.py`` l. 1260) and its ``decay`` over the steps (``cosine``, ``inference_mem.py`` l. 842);
    ``orthogonalize``, ``cos_threshold``, ``clip``: the projection of ``v_gt`` out of ``v_a`` (their defaults).
    Three denoiser evaluations per step (theirs: the same, one call on ``[null, positive, repulsive]``). Their
    ``dual_guidance_call`` uses its guidance scale at every step, whatever its value; so does this (``g <= 1``
    included). Per image: ``guard_steps_projected`` (steps where ``cos > cos_threshold``)."""

    families = ("sd",)

    def __init__(self, repulsion: float = 2.0, decay: str = "cosine", orthogonalize: bool = True,
                 cos_threshold: float = 0.9, clip: float = 2.0) -> None:
        if repulsion < 0:
            raise ValueError(f"repulsion={repulsion} must be >= 0 (their --repulsion_scale)")
        if decay not in DECAYS:
            raise ValueError(f"decay={decay!r} must be one of {', '.join(DECAYS)}")
        if clip < 0:
            raise ValueError(f"clip={clip} must be >= 0")
        self.repulsion, self.decay, self.orthogonalize = repulsion, decay, orthogonalize
        self.cos_threshold, self.clip = cos_threshold, clip
        self.steps, self._projected = 1, None

    def conditions(self, family: Family, prompts: Sequence[str], size: int | None) -> list[Conditions]:
        """The images' prompts once more: the branch :class:`SpikeAttenuation` attenuates."""
        self._projected = None
        return [family.encode(prompts, size)]

    def begin(self, steps: int) -> None:
        self.steps = steps

    def weight(self, step: int) -> float:
        """The repulsion's weight at sampling step ``step`` (their ``progress = i / len(timesteps)``)."""
        progress = step / self.steps
        factor = {"cosine": math.cos(progress * math.pi / 2), "linear": 1 - progress,
                  "sine": math.sin(progress * math.pi / 2), "constant": 1.0}[self.decay]
        return self.repulsion * factor

    def combine(self, eps_u: Tensor, eps_c: Tensor, extra: list[Tensor], scale: Tensor, step: int,
                a: float = 1.0) -> Tensor:
        """The outputs are combined as they are: every term is a difference of two outputs, and ``cos`` and the
        projection's coefficient are ratios, so a v-prediction model's combined v gives the combined eps."""
        (eps_a,) = extra
        v_gt, v_a = eps_c - eps_u, eps_a - eps_u
        projected = torch.zeros(len(eps_u), dtype=torch.bool, device=eps_u.device)
        if self.orthogonalize:
            v_a, projected = self.project(v_a, v_gt)
        if step == 0 or self._projected is None:
            self._projected = torch.zeros(len(eps_u), dtype=torch.long, device=eps_u.device)
        self._projected += projected
        g = scale.to(eps_c.dtype).view(-1, *[1] * (eps_c.dim() - 1))
        return eps_u + g * v_a - self.weight(step) * v_gt

    def project(self, v_a: Tensor, v_gt: Tensor) -> tuple[Tensor, Tensor]:
        """``v_a`` less its clipped projection on ``v_gt`` where their cosine exceeds ``cos_threshold``, per sample,
        in float32 or wider (theirs: float32 from bf16, ``.float()`` l. 2304-2305), and where it was applied."""
        wide = torch.promote_types(v_a.dtype, torch.float32)
        a, b = v_a.to(wide).flatten(1), v_gt.to(wide).flatten(1)
        dot = (a * b).sum(dim=1)
        coef = (dot / ((b * b).sum(dim=1) + 1e-8)).clamp(-self.clip, self.clip)
        cos = (dot / (((a * a).sum(dim=1) + 1e-8).sqrt() * ((b * b).sum(dim=1) + 1e-8).sqrt())).clamp(-1, 1)
        projected = cos > self.cos_threshold
        shape = (-1, *[1] * (v_a.dim() - 1))
        removed = (projected.to(wide) * coef).view(shape) * v_gt.to(wide)
        return (v_a.to(wide) - removed).to(v_a.dtype), projected

    def info(self) -> Info:
        return {} if self._projected is None else {"guard_steps_projected": self._projected.clone()}
