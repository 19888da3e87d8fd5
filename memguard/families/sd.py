"""The ``sd`` family: Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``), eps or v prediction, and memguard's
own tiny pixel-space model (a UNet without VAE).

Condition: the CLIP text encoder's last hidden state of the prompt, 77 tokens; null condition: the same of ``""``
(pipeline_stable_diffusion.py ``encode_prompt``). Denoiser: ``UNet2DConditionModel(x, t, encoder_hidden_states)``.
Output: eps, or v for a ``v_prediction`` scheduler (``eps_c - eps_u = sqrt(abar_t) (v_c - v_u)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memguard.components import Components, load_components, random_components, save_components
from memguard.families import Conditions, Family


@torch.no_grad()
def encode_prompts(components: Components, prompts: Sequence[str]) -> Tensor:
    """CLIP text embeddings ``(len(prompts), 77, dim)``, tokenized and encoded as StableDiffusionPipeline does."""
    tokenizer, encoder = components.tokenizer, components.text_encoder
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    mask = tokens.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
    return encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]


class SD(Family):
    """Stable Diffusion 1.x / 2.x components (:class:`~memguard.components.Components`) as a family adapter."""

    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    subfolders = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    optional = ("vae",)  # a pixel-space model (memguard's tiny scenario) declares none
    cross_attention = True

    def __init__(self, components: Components) -> None:
        self.components = components

    @property
    def denoiser(self) -> torch.nn.Module:  # type: ignore[override]
        return self.components.unet

    @property
    def vae(self) -> Any:  # type: ignore[override]
        return self.components.vae

    @property
    def scheduler(self) -> Any:  # type: ignore[override]
        return self.components.scheduler

    @property
    def tokenizer(self) -> Any:  # type: ignore[override]
        return self.components.tokenizer

    @property
    def networks(self) -> list[torch.nn.Module]:
        return self.components.networks

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SD:
        self.components.to(device, dtype)
        return self

    def encode(self, prompts: Sequence[str], size: int | None = None) -> Conditions:
        return {"encoder_hidden_states": encode_prompts(self.components, prompts).to(self.denoiser.dtype)}

    def null(self, n: int, size: int | None = None) -> Conditions:
        return {key: value.expand(n, *value.shape[1:]) for key, value in self.encode([""]).items()}

    def __call__(self, x: Tensor, t: Tensor, conditions: Conditions) -> Tensor:
        return self.components.unet(x, t, encoder_hidden_states=conditions["encoder_hidden_states"],
                                    return_dict=False)[0]

    def pipeline(self, scheduler: Any = None) -> Any:
        # start-up: diffusers loads where a network is built or loaded, not where a folder is only read
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(**{**vars(self.components), "scheduler": scheduler or self.scheduler},
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def random(cls, seed: int = 0) -> SD:
        return cls(random_components(seed=seed))

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype = torch.float32) -> SD:
        return cls(load_components(folder, "cpu", dtype))

    def save(self, folder: str | Path) -> Path:
        return save_components(self.components, folder)
