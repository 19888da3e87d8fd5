"""The ``dit`` family: class-conditional DiT (``DiTPipeline``, e.g. ``facebook/DiT-XL-2-256``), ImageNet's 1000
classes.

Condition: the class id; null condition: the null class ``num_embeds_ada_norm`` (1000; pipeline_dit.py line 175
writes it as a constant). A prompt names its class (:meth:`DiT.class_id`): an id, a label of the folder's
``model_index.json`` ``id2label`` (any of its comma-separated names, as ``DiTPipeline.labels``, lines 69-74), or
text ending in one (Scenario 2's ``An image of tench`` is class 0), so an Imagenette scenario runs on a
class-conditional model. Denoiser: ``DiTTransformer2DModel(x, t, class_labels)``; its output holds eps and,
with learned variance (``out_channels = 2 * in_channels``, DiT-XL), the variance channels, which the pipeline
drops after guidance (lines 207-220) and memguard drops before: guidance is applied to eps alone either way.

Differences from ``DiTPipeline`` (none under its own DDIM or DPM-Solver schedulers, where the equality is
tested): the pipeline neither scales the initial noise by ``init_noise_sigma`` nor steps the unscaled latents
(it steps ``scale_model_input``'s output, line 223); memguard does both, as the text pipelines do, which only
differs for schedulers whose ``init_noise_sigma`` is not 1 (Euler). The pipeline also steps both halves of its
doubled batch; memguard steps the latents once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memguard.errors import UserError
from memguard.families import Conditions, Family, null_entries


class DiT(Family):
    """DiT transformer, VAE and scheduler, with the class labels of ``model_index.json``."""

    name = "dit"
    pipeline_class = "DiTPipeline"
    subfolders = ("transformer", "vae", "scheduler")
    text = False

    def __init__(self, transformer: torch.nn.Module, vae: Any, scheduler: Any,
                 id2label: dict[int | str, str] | None = None) -> None:
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.id2label = {int(k): v for k, v in (id2label or {}).items()}
        self.labels = labels_of(self.id2label)

    @property
    def denoiser(self) -> torch.nn.Module:  # type: ignore[override]
        return self.transformer

    @property
    def null_class(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    def class_id(self, prompt: str) -> int:
        """The class a prompt names (:func:`class_id`)."""
        return class_id(prompt, self.labels, self.null_class)

    def encode(self, prompts: Sequence[str], size: int | None = None) -> Conditions:
        ids = [self.class_id(p) for p in prompts]
        return {"class_labels": torch.tensor(ids, dtype=torch.long, device=self.transformer.device)}

    def null(self, n: int, size: int | None = None) -> Conditions:
        return {"class_labels": torch.full((n,), self.null_class, dtype=torch.long, device=self.transformer.device)}

    def __call__(self, x: Tensor, t: Tensor, conditions: Conditions) -> Tensor:
        timestep = t.reshape(1).to(x.device).expand(x.shape[0])  # as pipeline_dit.py lines 186-200
        out = self.transformer(x, timestep=timestep, class_labels=conditions["class_labels"], return_dict=False)[0]
        channels = self.transformer.config.in_channels
        return out[:, :channels] if self.transformer.config.out_channels // 2 == channels else out

    def pipeline(self, scheduler: Any = None) -> Any:
        # start-up: diffusers loads where a network is built or loaded, not where a folder is only read
        from diffusers import DiTPipeline

        pipe = DiTPipeline(self.transformer, self.vae, scheduler or self.scheduler, id2label=self.id2label)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def random(cls, seed: int = 0) -> DiT:
        """A tiny DiT after diffusers' tests/pipelines/dit/test_dit.py ``get_dummy_components`` (lines 55-74 at
        diffusers commit 58eb52c): 2 layers, 2 heads of 8, learned variance (8 output channels), 1000 classes +
        the null class, DDIM scheduler with its defaults; here patch 2 over 8x8 latents of a small 2x VAE (16 px
        images; theirs: patch 4 over 16x16 latents of the default VAE) and ImageNet's class names."""
        # start-up: diffusers loads where a network is built or loaded, not where a folder is only read
        from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
            out_channels=8, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero", norm_elementwise_affine=False,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, sample_size=16,
        )
        return cls(transformer, vae, DDIMScheduler(), dict(enumerate(imagenet_classes())))

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype = torch.float32) -> DiT:
        # start-up: diffusers loads where a network is built or loaded, not where a folder is only read
        from diffusers import DiTPipeline

        try:
            pipe = DiTPipeline.from_pretrained(folder, dtype=dtype, id2label=None,  # labels: read below
                                               **null_entries(folder))
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"model.path={str(folder)!r} could not be loaded as a DiT folder ({err}); it holds "
                            "model_index.json, transformer/, vae/, scheduler/") from err
        id2label = json.loads((folder / "model_index.json").read_text()).get("id2label")  # None: prompts are ids
        return cls(pipe.transformer, pipe.vae, pipe.scheduler, id2label)

    def save(self, folder: str | Path) -> Path:
        """The pipeline's folder, with ``id2label`` added to model_index.json (``DiTPipeline.save_pretrained``
        does not write it; ``from_pretrained`` reads it, as from the hub's folders)."""
        self.pipeline().save_pretrained(folder)
        index_file = Path(folder) / "model_index.json"
        index = json.loads(index_file.read_text())
        index["id2label"] = {str(k): v for k, v in self.id2label.items()}
        index_file.write_text(json.dumps(index, indent=2) + "\n")
        return Path(folder)


def labels_of(id2label: dict[int | str, str] | None) -> dict[str, int]:
    """Label -> class id as ``DiTPipeline`` builds it: every comma-separated name of every class (pipeline_dit.py
    lines 69-74; a name two classes share, such as ImageNet's "crane", goes to the later class, as there)."""
    return {name.strip(): int(i) for i, names in (id2label or {}).items() for name in names.split(",")}


def class_id(prompt: str, labels: dict[str, int], n_classes: int) -> int:
    """The class a prompt names: an id ``0 .. n_classes - 1``, a label, or text ending in a label (the longest
    such label, at a word boundary: "An image of French horn" is "French horn", not "horn"). Else a UserError."""
    text = prompt.strip()
    if text.isdigit() and int(text) < n_classes:
        return int(text)
    if text in labels:
        return labels[text]
    endings = [label for label in labels
               if text.endswith(label) and (len(text) == len(label) or text[-len(label) - 1] == " ")]
    if endings:
        return labels[max(endings, key=len)]
    example = next(iter(labels), "tench")
    raise UserError(f"prompts: {prompt!r} names no class of this class-conditional model (model_index.json id2label, "
                    f"{len(set(labels.values()))} classes); give a class id 0..{n_classes - 1}, a label (e.g. "
                    f"{example!r}) or text ending in one (e.g. 'An image of {example}')")


def imagenet_classes() -> list[str]:
    """ImageNet-1k's 1000 class names in class-id order (torchvision's list: the first name of each synset)."""
    from torchvision.models import ResNet50_Weights  # start-up: torchvision loads only for ImageNet's class names

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
