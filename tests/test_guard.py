"""GUARD (memguard.mitigations.guard) against a reference written from the authors' code (kairanzhao/GUARD, commit
3a49daf): their cross-attention wrapper (``local_sd_pipeline.py`` ``_XAttnLogger.attach``, l. 732-984, the parts
their README's commands switch on) installed as they install it, their ``dual_guidance_call`` step (l. 2263-2349)
and their CFG step with attenuation (``__call__``, l. 1340-1398). Negative controls: the reference with the
repulsion's sign flipped, or with another block list, must not match, so the comparison can fail.

The reference comparisons run in float64 (agreement to ~1e-10 on any CPU).
"""

from __future__ import annotations

import copy
import math
import types

import pandas as pd
import pytest
import torch
from torch import Tensor

from memguard.mitigations import Baselines
from memguard.errors import UserError
from memguard.families import as_family
from memguard.guidance import Constant
from memguard.mitigations.guard import BLOCK_GROUPS, Guard, SpikeAttenuation, attenuate_spikes
from memguard.runner import run
from memguard.sampling import initial_noise, sample
from tests.test_run import config

PROMPT, G, STEPS = "a red circle", 7.5, 4


@pytest.fixture(scope="module")
def tiny64(tiny_components):
    return as_family(copy.deepcopy(tiny_components).to("cpu", torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# The reference: their wrapper and their steps, transcribed


class TheirLogger:
    """The part of their ``_XAttnLogger`` that edits attention with ``spike_penalty=0``, ``bias_schedule="constant"``
    (scaler 1), no hot maps, no gates: ``attach`` wraps the forward of every cross-attention module (l. 732-743)."""

    def __init__(self, intervention_blocks: list[str], spike_threshold: float, spike_scale: float) -> None:
        self.intervention_blocks = set(intervention_blocks)
        self.spike_threshold, self.spike_scale = spike_threshold, spike_scale
        self._batch_comp: dict[str, int] | None = None
        self._orig: dict[str, object] = {}

    def attach(self, unet) -> None:
        for name, module in unet.named_modules():
            if hasattr(module, "to_q") and getattr(module, "is_cross_attention", False):
                self._orig[name] = module.forward
                module.forward = types.MethodType(self._wrapped(name), module)

    def detach(self, unet) -> None:
        for name, module in unet.named_modules():
            if name in self._orig:
                module.forward = self._orig.pop(name)

    def _wrapped(self, block_name: str):
        def wrapped(self_attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            is_intervention_block = block_name in self.intervention_blocks
            bsz, q_len, _ = hidden_states.shape
            q = self_attn.to_q(hidden_states)
            k = self_attn.to_k(encoder_hidden_states)
            v = self_attn.to_v(encoder_hidden_states)

            def head_to_batch(x):
                b, l, c = x.shape
                return x.view(b, l, self_attn.heads, -1).permute(0, 2, 1, 3).reshape(b * self_attn.heads, l, -1)

            q, k, v = head_to_batch(q), head_to_batch(k), head_to_batch(v)
            attn_scores = torch.bmm(q, k.transpose(1, 2)) * (1.0 / math.sqrt(q.shape[-1]))
            if is_intervention_block and self.spike_threshold > 0.0:
                H = self_attn.heads
                if self._batch_comp:  # l. 785-791: the positive rows of [uncond, positive, negative]
                    start = self._batch_comp["uncond"] * H
                    target = (start, start + self._batch_comp["pos"] * H)
                else:  # l. 793-798: the second half of [uncond, cond]
                    target = (attn_scores.shape[0] // 2, attn_scores.shape[0])
                s0, s1 = target
                target_scores = attn_scores[s0:s1]
                token_max_scores = target_scores.max(dim=1).values
                content_scores = token_max_scores[:, 1:]
                mu = content_scores.mean(dim=-1, keepdim=True)
                std = content_scores.std(dim=-1, keepdim=True)
                z_scores = (token_max_scores - mu) / (std + 1e-6)
                is_spike = z_scores > self.spike_threshold
                is_spike[:, 0] = False
                if is_spike.any():
                    spike_mask = is_spike.unsqueeze(1)
                    current = attn_scores[s0:s1]
                    attn_scores[s0:s1] = torch.where(spike_mask, current * self.spike_scale, current)
            attn_probs = torch.softmax(attn_scores, dim=-1)
            out = torch.bmm(attn_probs, v)
            out = out.view(bsz, self_attn.heads, q_len, -1).permute(0, 2, 1, 3).reshape(bsz, q_len, -1)
            return self_attn.to_out[1](self_attn.to_out[0](out))

        return wrapped


def _their_dual_step(family, logger: TheirLogger, latents: Tensor, t: Tensor, i: int, steps: int,
                     repulsion: float, sign: float = 1.0) -> Tensor:
    """One step of their ``dual_guidance_call`` with one positive prompt (the prompt itself), gating ``none``, the
    positive schedule ``none``, ``cosine`` decay and the orthogonalisation at its defaults (0.9, clip 2)."""
    N = len(latents)
    embed = lambda p: family.encode([p])["encoder_hidden_states"]
    uncond, positive, negative = embed(""), embed(PROMPT), embed(PROMPT)
    batch = torch.cat([uncond.repeat(N, 1, 1), positive.repeat_interleave(N, dim=0), negative.repeat(N, 1, 1)])
    logger._batch_comp = {"uncond": N, "pos": N, "neg": N}
    x = family.scheduler.scale_model_input(torch.cat([latents] * 3), t)
    noise_pred = family.denoiser(x, t, encoder_hidden_states=batch, return_dict=False)[0]
    noise_pred_uncond, rest = torch.split(noise_pred, [N, 2 * N])
    noise_pred_positive, noise_pred_negative = torch.split(rest, [N, N])
    v_u, v_gt = noise_pred_uncond, noise_pred_negative - noise_pred_uncond
    v_nb = (noise_pred_positive - noise_pred_uncond).view(1, *v_u.shape).mean(dim=0)
    vn32, vg32 = v_nb.float().reshape(N, -1), v_gt.float().reshape(N, -1)
    if family.denoiser.dtype == torch.float64:  # the reference in float64 throughout (theirs: bf16 -> float32)
        vn32, vg32 = v_nb.reshape(N, -1), v_gt.reshape(N, -1)
    dot = (vn32 * vg32).sum(dim=1, keepdim=True)
    coef = dot / ((vg32 * vg32).sum(dim=1, keepdim=True) + 1e-8)
    vn_norm = torch.sqrt((vn32 * vn32).sum(dim=1, keepdim=True) + 1e-8)
    vg_norm = torch.sqrt((vg32 * vg32).sum(dim=1, keepdim=True) + 1e-8)
    cos = (dot / (vn_norm * vg_norm)).clamp(-1.0, 1.0)
    mask = (cos > 0.9).float().to(coef.dtype)
    coef = coef.clamp(min=-2.0, max=2.0)
    v_n_eff = (v_nb - mask.view(N, 1, 1, 1) * (coef.view(N, 1, 1, 1) * v_gt)).to(v_nb.dtype)
    current_w_neg = repulsion * math.cos(i / steps * math.pi / 2)
    return v_u + G * 1.0 * v_n_eff - sign * current_w_neg * v_gt


def _their_cfg_step(family, logger: TheirLogger, latents: Tensor, t: Tensor) -> Tensor:
    """One step of their ``__call__`` with ``xattn_rescale`` (the logger without a batch composition, l. 1225)."""
    N = len(latents)
    embed = lambda p: family.encode([p])["encoder_hidden_states"]
    logger._batch_comp = None
    x = family.scheduler.scale_model_input(torch.cat([latents] * 2), t)
    batch = torch.cat([embed("").repeat(N, 1, 1), embed(PROMPT).repeat(N, 1, 1)])
    uncond, text = family.denoiser(x, t, encoder_hidden_states=batch, return_dict=False)[0].chunk(2)
    return uncond + G * (text - uncond)


class Recording(Guard):
    """GUARD that keeps each step's combined prediction."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[Tensor] = []

    def combine(self, *args) -> Tensor:
        self.seen.append(super().combine(*args).clone())
        return self.seen[-1]


def _ours(family, seeds: list[int], guard: Guard | None, hook: SpikeAttenuation, seen: list[Tensor]):
    """Sample with memguard's slots; returns each step's (latents, timestep) and fills ``seen`` without GUARD."""
    noise = initial_noise(seeds, (4, 16, 16), dtype=torch.float64)
    steps: list[tuple[Tensor, Tensor]] = []
    extra = [] if guard is None else guard.conditions(family, [PROMPT] * len(seeds), None)

    def record(step: dict) -> None:
        steps.append((step["x"].clone(), family.scheduler.timesteps[step["step"]]))
        if guard is None:
            seen.append(step["eps_u"] + G * (step["eps_c"] - step["eps_u"]))

    with hook.installed(family, [PROMPT] * len(seeds), 2 + len(extra)):
        sample(family, family.scheduler, family.encode([PROMPT] * len(seeds)), family.null(len(seeds)), noise,
               Constant(G), STEPS, record, branches=guard, extra=extra)
    return steps


def _reference(family, steps, blocks: str, threshold: float, dual: bool, sign: float = 1.0) -> list[Tensor]:
    logger = TheirLogger(BLOCK_GROUPS[blocks], threshold, 0.3)
    logger.attach(family.denoiser)
    try:
        with torch.no_grad():
            return [_their_dual_step(family, logger, x, t, i, STEPS, 2.0, sign) if dual
                    else _their_cfg_step(family, logger, x, t) for i, (x, t) in enumerate(steps)]
    finally:
        logger.detach(family.denoiser)


def _close(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=0, atol=1e-10) for x, y in zip(a, b, strict=True))


def test_guard_matches_their_dual_guidance_and_the_controls_do_not(tiny64) -> None:
    guard = Recording()
    steps = _ours(tiny64, [3, 4], guard, SpikeAttenuation(threshold=0.1), [])
    for k, (got, want) in enumerate(zip(guard.seen, _reference(tiny64, steps, "early", 0.1, dual=True))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"step {k}")
    assert not _close(guard.seen, _reference(tiny64, steps, "early", 0.1, dual=True, sign=-1.0))  # sign flipped
    assert not _close(guard.seen, _reference(tiny64, steps, "late", 0.1, dual=True))  # another block list
    assert not _close(guard.seen, _reference(tiny64, steps, "early", 1e9, dual=True))  # no attenuation at all


def test_ca_attenuation_matches_their_cfg_call_and_the_controls_do_not(tiny64) -> None:
    seen: list[Tensor] = []
    steps = _ours(tiny64, [5], None, SpikeAttenuation(threshold=0.01), seen)
    for k, (got, want) in enumerate(zip(seen, _reference(tiny64, steps, "early", 0.01, dual=False))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"step {k}")
    assert not _close(seen, _reference(tiny64, steps, "late", 0.01, dual=False))
    assert not _close(seen, _reference(tiny64, steps, "early", 1e9, dual=False))


def test_spikes_are_attenuated_per_sample_and_head_never_the_start_token() -> None:
    logits = torch.zeros(2, 1, 3, 6, dtype=torch.float64)
    logits[0, 0, 1, 4] = 5.0  # sample 0: token 4 peaks; sample 1: flat (no spike)
    logits[0, 0, 2, 0] = 9.0  # the start token, never attenuated
    out = attenuate_spikes(logits, 0.3, 1.0)
    assert out[0, 0, 1, 4] == pytest.approx(1.5) and out[0, 0, 2, 0] == 9.0
    torch.testing.assert_close(out[1], logits[1])


def test_the_projection_and_the_repulsion_follow_their_weights() -> None:
    """A positive direction parallel to the repulsive one is projected out (clipped at 2); the repulsion decays as
    cos(pi/2 k/steps)."""
    guard = Guard()
    guard.begin(4)
    assert [guard.weight(k) for k in range(4)] == pytest.approx([2 * math.cos(k / 4 * math.pi / 2) for k in range(4)])
    eps_u = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    eps_c = torch.ones_like(eps_u)
    eps_a = 3 * eps_c  # cos 1, coefficient 3, clipped to 2: v_eff = 3 - 2 = 1 (times v_gt)
    out = guard.combine(eps_u, eps_c, [eps_a], torch.tensor([G]), 1)
    torch.testing.assert_close(out, (G - guard.weight(1)) * eps_c)
    assert guard.info()["guard_steps_projected"].tolist() == [1]


# ---------------------------------------------------------------------------------------------------------------
# The run path


def test_guard_runs_with_three_evaluations_per_step(tiny_model_dir, tmp_path) -> None:
    metrics = run(config(tiny_model_dir, tmp_path / "g", "mitigation=guard"))
    rows = pd.read_csv(tmp_path / "g" / "generations.csv")
    assert metrics["unet_evals_per_image"] == 3 * 6 and rows.guard_steps_projected.between(0, 6).all()
    assert run(config(tiny_model_dir, tmp_path / "ca", "mitigation=guard_ca"))["unet_evals_per_image"] == 2 * 6


def test_protocol_authors_runs_guard_under_ddim_in_bfloat16() -> None:
    from memguard.protocol import apply_protocol
    from tests.test_configs import compose_config

    for name in ("guard", "guard_ca"):
        cfg = compose_config(["+protocol=authors", f"mitigation={name}", "sampler=dpm"])
        apply_protocol(cfg, v_prediction=False)
        assert (cfg.sampler.name, cfg.dtype, cfg.sampler.steps) == ("ddim", "bfloat16", 50)


def test_bad_input_and_other_families_are_refused_in_one_line(tiny_model_dir, tmp_path) -> None:
    from memguard.families.sdxl import SDXL

    with pytest.raises(UserError) as caught:
        run(config(tiny_model_dir, tmp_path / "b", "mitigation=guard_ca", "mitigation.attention.blocks=[no.attn2]"))
    assert "\n" not in str(caught.value) and str(caught.value).startswith(
        "mitigation.attention.blocks: none of no.attn2, ... is an attn2 module of this denoiser")
    with pytest.raises(UserError) as caught:
        run(config(tiny_model_dir, tmp_path / "c", "mitigation=guard", "mitigation.attention.blocks=early2"))
    assert "blocks='early2' must be one of all, semantic" in str(caught.value)
    with pytest.raises(UserError, match=r"^mitigation=guard: mitigation.branches serves the sd family, not sdxl"):
        SDXL.check_baselines(Baselines(branches=Guard(), attention=SpikeAttenuation()), "guard")


def test_with_scale_1_the_processor_is_diffusers_plain_attention_mask_included() -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from memguard.mitigations.guard import _SpikeProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    hidden, context = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    mask = torch.zeros(2, 1, 7)
    mask[:, :, 5:] = -1e4
    for kwargs in ({}, {"attention_mask": mask}):
        plain = AttnProcessor()(attn, hidden, context, **kwargs)
        torch.testing.assert_close(_SpikeProcessor(1.0, 0.1, 2)(attn, hidden, context, **kwargs), plain)
        assert not torch.allclose(_SpikeProcessor(0.3, 0.1, 2)(attn, hidden, context, **kwargs), plain)
