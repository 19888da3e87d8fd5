"""The ``sdxl`` family: Stable Diffusion XL (``StableDiffusionXLPipeline``, e.g.
``stabilityai/stable-diffusion-xl-base-1.0``).

Condition, as pipeline_stable_diffusion_xl.py ``encode_prompt`` (lines 368-421) and ``__call__`` (lines 1126-1157)
build it: each of the two CLIP text encoders' penultimate hidden state (``hidden_states[-2]``) of the prompt,
concatenated along features; the pooled embedding of the first encoder that returns one (``text_encoder_2``'s
projection); and ``add_time_ids = (H, W, 0, 0, H, W)`` (original size, crop corner, target size). Null condition:
zeros for both embeddings where the folder's ``force_zeros_for_empty_prompt`` is true (SDXL base: true; lines
424-427), else the same encoding of ``""``; the same time ids. Denoiser: ``UNet2DConditionModel(x, t,
encoder_hidden_states, added_cond_kwargs={text_embeds, time_ids})``. Output: eps (or v), as ``sd``.

Not reproduced: ``guidance_rescale`` (0 by default), ``denoising_end``, negative prompts, the invisible watermark
(applied by the pipeline only where the ``invisible-watermark`` package is installed). Under ``dtype=float16`` the
VAE stays float32 where its config says ``force_upcast`` (SDXL's VAE overflows in fp16), as the pipeline decodes
(lines 1264-1267).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memguard.components import clip_tokenizer
from memguard.errors import UserError
from memguard.families import Conditions, Family, null_entries


class SDXL(Family):
    """SDXL's UNet, VAE, two CLIP text encoders and tokenizers, scheduler."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    subfolders = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    optional = ("text_encoder", "tokenizer")  # the refiner has the second encoder only
    cross_attention = True

    def __init__(self, unet: torch.nn.Module, vae: Any, text_encoder: Any, tokenizer: Any, text_encoder_2: Any,
                 tokenizer_2: Any, scheduler: Any, force_zeros_for_empty_prompt: bool = True) -> None:
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2 = (
            text_encoder, tokenizer, text_encoder_2, tokenizer_2)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @property
    def denoiser(self) -> torch.nn.Module:  # type: ignore[override]
        return self.unet

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SDXL:
        for module in self.networks:
            upcast = module is self.vae and dtype == torch.float16 and getattr(module.config, "force_upcast", False)
            module.to(device) if dtype is None or upcast else module.to(device, dtype)
        return self

    @torch.no_grad()
    def _embed(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        pairs = [(tok, enc) for tok, enc in ((self.tokenizer, self.text_encoder),
                                             (self.tokenizer_2, self.text_encoder_2)) if enc is not None]
        hidden, pooled = [], None
        for tokenizer, encoder in pairs:
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the pooled projection (text_encoder_2's), lines 409-411
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1).to(self.unet.dtype), pooled.to(self.unet.dtype)

    def _time_ids(self, n: int, size: int | None) -> Tensor:
        side = size or self.default_resolution
        ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=self.unet.dtype, device=self.unet.device)
        return ids.repeat(n, 1)

    def encode(self, prompts: Sequence[str], size: int | None = None) -> Conditions:
        embeds, pooled = self._embed(prompts)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": self._time_ids(len(prompts), size)}

    def null(self, n: int, size: int | None = None) -> Conditions:
        embeds, pooled = self._embed([""])
        if self.force_zeros_for_empty_prompt:
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return {"encoder_hidden_states": embeds.expand(n, -1, -1), "text_embeds": pooled.expand(n, -1),
                "time_ids": self._time_ids(n, size)}

    def __call__(self, x: Tensor, t: Tensor, conditions: Conditions) -> Tensor:
        added = {"text_embeds": conditions["text_embeds"], "time_ids": conditions["time_ids"]}
        return self.unet(x, t, encoder_hidden_states=conditions["encoder_hidden_states"], added_cond_kwargs=added,
                         return_dict=False)[0]

    def pipeline(self, scheduler: Any = None) -> Any:
        # start-up: diffusers loads where a network is built or loaded, not where a folder is only read
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=scheduler or self.scheduler,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def random(cls, seed: int = 0) -> SDXL:
        """A tiny SDXL after diffusers' tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py
        ``get_dummy_components`` (lines 84-154 at diffusers commit 58eb52c): UNet with ``text_time`` added
        conditioning (time-embedding 8 per id, 6 ids + the 32-d pooled projection = 80), cross-attention 64 = two 32-d encoders; here with the real
        CLIP tokenizer (tokenizer_2 pads with ``!``, as SDXL's), 2-layer encoders, 16x16 latents of a 2x VAE
        (32 px images), SDXL's Euler scheduler config."""
        # start-up: diffusers loads where a network is built or loaded, not where a folder is only read
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # start-up: as above

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        )
        config = CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407,
        )
        text_encoder = CLIPTextModel(config)
        text_encoder_2 = CLIPTextModelWithProjection(config)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                           beta_schedule="scaled_linear", timestep_spacing="leading")
        return cls(unet, vae, text_encoder, clip_tokenizer(), text_encoder_2, clip_tokenizer(pad_token="!"), scheduler)

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype = torch.float32) -> SDXL:
        # start-up: diffusers loads where a network is built or loaded, not where a folder is only read
        from diffusers import StableDiffusionXLPipeline

        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, add_watermarker=False,
                                                             **null_entries(folder))
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"model.path={str(folder)!r} could not be loaded as an SDXL folder ({err}); it holds "
                            "model_index.json, unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/") from err
        if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.to(torch.float32)
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2,
                   pipe.scheduler, bool(pipe.config.force_zeros_for_empty_prompt))
