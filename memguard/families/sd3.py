"""The ``sd3`` family: Stable Diffusion 3 (``StableDiffusion3Pipeline``, e.g.
``stabilityai/stable-diffusion-3-medium-diffusers``), an MMDiT (``SD3Transformer2DModel``) trained by rectified flow
and sampled with ``FlowMatchEulerDiscreteScheduler`` (``sampler=flow``, which ``sampler=auto`` chooses).

Condition, as pipeline_stable_diffusion_3.py ``encode_prompt`` (lines 428-464): each CLIP encoder's penultimate
hidden state of the prompt (77 tokens), concatenated along features and zero-padded to T5's width, followed along
the sequence by T5's last hidden state (256 tokens, ``max_sequence_length``); pooled: the two CLIP projections
concatenated. Null condition: the same encoding of ``""`` (lines 466-519). Without ``text_encoder_3`` (allowed by
diffusers: ``model_index.json`` ``text_encoder_3: null``) the T5 part is zeros, as the pipeline makes it (lines
247-256); memguard does the same and says so once in the log.

**d_t in eps units.** Flow matching interpolates ``x_sigma = (1 - sigma) x0 + sigma eps`` and the model predicts
the velocity ``v = dx/dsigma = eps - x0`` (the scheduler steps ``x <- x + (sigma' - sigma) v``,
scheduling_flow_match_euler_discrete.py line 520;
its stochastic branch reads ``x0 = x - sigma v``, line 516). Given ``x_sigma`` and ``v``: ``x0 = x_sigma - sigma v`` and
``eps = x_sigma + (1 - sigma) v``, so

    eps_c - eps_u = (1 - sigma) (v_c - v_u),        d_t = (1 - sigma)^2 ||v_c - v_u||^2

(``a = 1 - sigma``, ``b = 1`` in :meth:`Family.eps_coefficients`); ``d_raw = ||v_c - v_u||^2`` is recorded
beside it. At the first step ``sigma = 1``, ``x`` is the noise itself and ``d_t = 0`` whatever the prompt.
Timesteps are the scheduler's own, ``t = 1000 sigma``: ``mitigation=stp mitigation.schedule.tau=500`` switches at
``sigma = 0.5``.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memguard.components import clip_tokenizer
from memguard.errors import UserError
from memguard.families import Conditions, Family, _flow_matching, null_entries
from memguard.families.dit import imagenet_classes

log = logging.getLogger(__name__)


class SD3(Family):
    """SD3's transformer, VAE, two CLIP and one T5 text encoders with their tokenizers, flow-matching scheduler."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    subfolders = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                  "text_encoder_3", "tokenizer_3", "scheduler")
    optional = ("text_encoder_3", "tokenizer_3")
    sampler = "flow"  # a velocity model: DPM-Solver++ cannot sample it
    max_sequence_length = 256  # T5 tokens (the pipeline's default)

    def __init__(self, transformer: torch.nn.Module, vae: Any, text_encoder: Any, tokenizer: Any, text_encoder_2: Any,
                 tokenizer_2: Any, text_encoder_3: Any, tokenizer_3: Any, scheduler: Any) -> None:
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2 = (
            text_encoder, tokenizer, text_encoder_2, tokenizer_2)
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        if text_encoder_3 is None:
            log.warning("model_index.json has text_encoder_3 null: the T5 part of every prompt's condition is "
                        "zeros, as StableDiffusion3Pipeline makes it; add text_encoder_3/ and tokenizer_3/ for the "
                        "full model")

    @property
    def denoiser(self) -> torch.nn.Module:  # type: ignore[override]
        return self.transformer

    @torch.no_grad()
    def _clip(self, prompts: list[str], tokenizer: Any, encoder: Any) -> tuple[Tensor, Tensor]:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    @torch.no_grad()
    def _t5(self, prompts: list[str]) -> Tensor:
        if self.text_encoder_3 is None:
            width = self.transformer.config.joint_attention_dim
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=self.transformer.device)
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        return self.text_encoder_3(ids.to(self.text_encoder_3.device))[0]

    def encode(self, prompts: Sequence[str], size: int | None = None) -> Conditions:
        prompts = list(prompts)
        hidden_1, pooled_1 = self._clip(prompts, self.tokenizer, self.text_encoder)
        hidden_2, pooled_2 = self._clip(prompts, self.tokenizer_2, self.text_encoder_2)
        t5 = self._t5(prompts)
        clip = torch.cat([hidden_1, hidden_2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        dtype = self.transformer.dtype
        return {"encoder_hidden_states": torch.cat([clip.to(dtype), t5.to(dtype)], dim=-2),
                "pooled_projections": torch.cat([pooled_1, pooled_2], dim=-1).to(dtype)}

    def null(self, n: int, size: int | None = None) -> Conditions:
        return {key: value.expand(n, *value.shape[1:]) for key, value in self.encode([""]).items()}

    def __call__(self, x: Tensor, t: Tensor, conditions: Conditions) -> Tensor:
        return self.transformer(hidden_states=x, timestep=t.expand(x.shape[0]),
                                encoder_hidden_states=conditions["encoder_hidden_states"],
                                pooled_projections=conditions["pooled_projections"], return_dict=False)[0]

    def eps_coefficients(self, scheduler: Any) -> tuple[list[float], list[float]]:
        """``eps = (1 - sigma_k) v + x_k`` (the module docstring derives it); ``sigma_k``: ``scheduler.sigmas``."""
        sigmas = [float(s) for s in scheduler.sigmas[: len(scheduler.timesteps)].cpu()]
        return [1.0 - s for s in sigmas], [1.0] * len(sigmas)

    @classmethod
    def check_scheduler(cls, scheduler: Any) -> None:
        if not _flow_matching(scheduler):
            raise UserError(f"sampler: {type(scheduler).__name__} cannot sample an sd3 model (rectified flow, velocity "
                            "prediction); use sampler=flow")
        if scheduler.config.get("use_dynamic_shifting"):
            raise UserError("sampler.scheduler: use_dynamic_shifting=true needs the pipeline's resolution-dependent "
                            "shift, which memguard does not compute; set +sampler.scheduler.use_dynamic_shifting=false")

    def pipeline(self, scheduler: Any = None) -> Any:
        # start-up: diffusers loads where a network is built or loaded, not where a folder is only read
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=scheduler or self.scheduler, vae=self.vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2, text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def random(cls, seed: int = 0, t5: bool = True) -> SD3:
        """A tiny SD3 after diffusers' tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py
        ``get_dummy_components`` (lines 48-117 at diffusers commit 58eb52c): a 1-layer MMDiT (4 heads of 8,
        joint width 32, pooled 64), two CLIP encoders with 32-d projections, a 2-layer T5 encoder of width 32, a VAE with SD3's shift and scaling
        factors. Unlike theirs, nothing comes from the hub: the CLIP tokenizers are the real CLIP BPE
        (:func:`~memguard.components.clip_tokenizer`), T5's is :func:`t5_tokenizer` (built here, no
        sentencepiece file); the CLIP encoders are 16 wide so their concatenation is T5's width (theirs, 64, is
        cropped to it by the pipeline's pad). 8x8 patches of 2 over 16x16 latents, 32 px images; SD3-medium's
        scheduler config (shift 3). ``t5=False``: without the third encoder (zeros, as diffusers allows)."""
        # start-up: diffusers loads where a network is built or loaded, not where a folder is only read
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        # start-up: as above
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        )
        clip_config = CLIPTextConfig(
            vocab_size=49408, hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407,
        )
        text_encoder = CLIPTextModelWithProjection(clip_config)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config)
        tokenizer_3 = t5_tokenizer() if t5 else None
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )) if t5 else None
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        return cls(transformer, vae, text_encoder, clip_tokenizer(), text_encoder_2, clip_tokenizer(pad_token="!"),
                   text_encoder_3, tokenizer_3, scheduler)

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype = torch.float32) -> SD3:
        # start-up: diffusers loads where a network is built or loaded, not where a folder is only read
        from diffusers import StableDiffusion3Pipeline

        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype, **null_entries(folder))
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"model.path={str(folder)!r} could not be loaded as an SD3 folder ({err}); it holds "
                            "model_index.json, transformer/, vae/, text_encoder(_2, _3)/, tokenizer(_2, _3)/, "
                            "scheduler/") from err
        return cls(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2,
                   pipe.tokenizer_2, pipe.text_encoder_3, pipe.tokenizer_3, pipe.scheduler)


def t5_tokenizer(words: Iterable[str] | None = None) -> Any:
    """A small T5 (Unigram, sentencepiece-style) tokenizer built offline, for random-weight SD3 models only.

    Pieces: ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2) as T5's, ``▁``, every ASCII letter, digit and punctuation
    mark, and ``▁word`` for each of ``words`` (default: the words of ImageNet's class names and a few common
    ones), so any ASCII text tokenizes and ``</s>`` ends it, as T5's tokenizer does. It is not T5's vocabulary:
    a real SD3 folder brings its own ``tokenizer_3``.
    """
    from transformers import T5Tokenizer  # start-up: transformers loads where a network is built or loaded

    if words is None:
        words = {w for name in imagenet_classes() for w in name.lower().replace("-", " ").split()}
        words |= {"a", "an", "the", "of", "on", "in", "photo", "image", "painting", "red", "green", "blue", "cat"}
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -8.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + w, -1.0) for w in sorted(set(words)) if w]
    return T5Tokenizer(vocab=pieces, extra_ids=0)
