"""Stable Diffusion components: loaded from a diffusers folder, or built small and random, offline.

Every model memguard samples from, the real SD 1.4 / 2.1 checkpoints and the tiny models of the tests alike,
goes through :func:`load_components`. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from memguard.errors import UserError

if TYPE_CHECKING:  # diffusers and transformers load in the functions that build or load networks (start-up: the
    # folder checks and constants here serve `memguard check`, which loads no network)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import CLIPTextModel, CLIPTokenizer

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FOLDER_HELP = (
    "a diffusers Stable Diffusion folder holds model_index.json and the subfolders "
    + ", ".join(f"{s}/" for s in SUBFOLDERS)
    + " (vae/ may be absent only where model_index.json sets vae to null: a pixel-space model)"
    + " (as written by StableDiffusionPipeline.save_pretrained, or fetched with "
    "`huggingface-cli download CompVis/stable-diffusion-v1-4 --local-dir DIR` on a machine with network)"
)


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that memguard's sampling loop uses."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | None  # None: a pixel-space model, whose UNet denoises images in [-1, 1]
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerMixin

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Components:
        for module in self.networks:
            module.to(device) if dtype is None else module.to(device, dtype)
        return self

    @property
    def networks(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder) if m is not None]


# dtype=NAME -> the denoiser's and text encoders' torch dtype
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_settings(cfg: DictConfig) -> None:
    """Reject bad top-level values, naming the key."""
    if OmegaConf.is_missing(cfg.model, "path"):
        raise UserError(f"model.path is not set; give model.path=DIR, where {FOLDER_HELP}")
    for key in ("guidance.scale", "guidance.og_scale"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or not value >= 0:
            raise UserError(f"{key}={value} must be a number >= 0 (opposite guidance is set by its strength, not a sign)")
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype={cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.batch_size != "auto" and (not isinstance(cfg.batch_size, int) or cfg.batch_size < 1):
        raise UserError(f"batch_size={cfg.batch_size} must be an integer >= 1 or auto")
    if not isinstance(cfg.sampler.steps, int) or cfg.sampler.steps < 1:
        raise UserError(f"sampler.steps={cfg.sampler.steps} must be an integer >= 1")
    if cfg.trajectory not in ("full", "off"):
        raise UserError(f"trajectory={cfg.trajectory!r} is not one of full (d_t at every step, the paper's record), "
                        "off (skip a branch the scale leaves unused)")


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` is CUDA where torch sees a GPU, else CPU; a device torch cannot use is a UserError."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"device={name!r} is not a torch device (auto, cpu, cuda, cuda:N, mps)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but torch sees no CUDA GPU; use device=cpu or device=auto")
    return device


def check_model_folder(path: str | Path, key: str = "model.path") -> Path:
    """Return ``path`` if it looks like a diffusers SD folder, else raise a UserError naming ``key``."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{key}={str(path)!r} is not a folder; {FOLDER_HELP}")
    missing = [f"{s}/" for s in SUBFOLDERS if not (folder / s).is_dir() and not (s == "vae" and _pixel_space(folder))]
    if missing:
        raise UserError(f"{key}={str(path)!r} lacks {', '.join(missing)}; {FOLDER_HELP}")
    return folder


def _pixel_space(folder: Path) -> bool:
    """Whether the folder's model_index.json declares no VAE (``"vae": [null, null]``)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "vae" in index and index["vae"] in (None, [None, None])


def load_components(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    key: str = "model.path") -> Components:
    """Load unet, vae, text encoder, tokenizer and scheduler from a local diffusers SD folder (no vae where
    ``model_index.json`` declares none: a pixel-space model such as the tiny scenario's)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # start-up: as at the top
    from transformers import CLIPTextModel  # start-up: as at the top
    from transformers.utils import logging as transformers_logging  # start-up: as at the top

    folder = check_model_folder(path, key)
    transformers_logging.disable_progress_bar()
    try:
        components = Components(
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
            vae=None if _pixel_space(folder) else AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype),
            tokenizer=load_tokenizer(folder / "tokenizer"),
            scheduler=load_scheduler(folder),
        )
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise UserError(f"{key}={str(path)!r} could not be loaded ({err}); {FOLDER_HELP}") from err
    for module in components.networks:
        module.requires_grad_(False).eval()
    return components.to(device)


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """The CLIP tokenizer saved in ``folder``, read once per process while its files are unchanged: a sweep's jobs
    (``memguard run -m``) share it instead of each parsing the 49408-entry vocabulary again (0.3 s). It is only
    read, never changed: every call passes its own padding and truncation."""
    stats = [(p.name, p.stat()) for p in sorted(Path(folder).iterdir()) if p.is_file()]
    return _read_tokenizer(str(Path(folder).resolve()), tuple((name, s.st_size, s.st_mtime_ns) for name, s in stats))


@functools.lru_cache(maxsize=4)
def _read_tokenizer(folder: str, files: tuple[tuple[str, int, int], ...]) -> CLIPTokenizer:
    """``files`` (name, size, mtime) is the cache key: a folder written again is read again."""
    from transformers import CLIPTokenizer  # start-up: as at the top

    return CLIPTokenizer.from_pretrained(folder)


def load_scheduler(folder: str | Path, key: str = "model.path") -> SchedulerMixin:
    """The folder's own scheduler class and config (e.g. PNDM for SD 1.4, DDIM for SD 2.1)."""
    import diffusers  # start-up: as at the top

    folder = Path(folder).expanduser()
    if not (folder / "scheduler").is_dir():  # any family's folder (sd, sdxl, sd3, dit) has one
        raise UserError(f"{key}={str(folder)!r} lacks scheduler/; {FOLDER_HELP}")
    try:
        config = diffusers.DDIMScheduler.load_config(folder, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise UserError(f"{key}={str(folder)!r}: scheduler/ could not be read ({err}); {FOLDER_HELP}") from err
    cls = getattr(diffusers, config.get("_class_name", "DDIMScheduler"), diffusers.DDIMScheduler)
    return cls.from_config(config)


def clip_tokenizer(folder: str | Path | None = None, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The real 49,408-token CLIP BPE tokenizer, built offline from the vocabulary inside open_clip_torch.

    It tokenizes exactly as SD 1.x's tokenizer (pad ``<|endoftext|>``; SD 2.x pads with ``!``), 77 tokens.
    If ``folder`` is given the tokenizer is also saved there (``save_pretrained``).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe  # start-up: open_clip for this function only
    from transformers import CLIPTokenizer  # start-up: as at the top

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [b + "</w>" for b in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token=pad_token, model_max_length=77
        )
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def random_components(seed: int = 0, sample_size: int = 16, width: int = 32) -> Components:
    """A tiny SD-shaped model with random weights (as diffusers' own tests build one), for tests and benchmarks.

    UNet with cross-attention (channels ``(width, 2 * width)``), a 2x VAE with 4 latent channels, a 2-layer
    CLIP text encoder over the real CLIP vocabulary, SD's scaled-linear DDIM scheduler. Images are
    ``2 * sample_size`` pixels square. It has learnt nothing: its images are noise-like.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel  # start-up: as at the top
    from transformers import CLIPTextConfig, CLIPTextModel  # start-up: as at the top

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width), norm_num_groups=min(32, width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(width, 2 * width),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=min(32, width), sample_size=2 * sample_size,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    return _assemble(unet, vae, text_encoder)


def sd15_sized_random_components(seed: int = 0) -> Components:
    """Random components with Stable Diffusion 1.5's architecture and sizes (860M-parameter UNet, 512 px).

    For benchmarks on a GPU: the compute of the real model, none of its knowledge.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel  # start-up: as at the top
    from transformers import CLIPTextConfig, CLIPTextModel  # start-up: as at the top

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    ))
    return _assemble(unet, vae, text_encoder)


def sd_scheduler(beta_schedule: str = "scaled_linear", prediction_type: str = "epsilon") -> DDIMScheduler:
    """Stable Diffusion's scheduler config over 1000 steps: by default SD 1.x's scaled-linear betas 0.00085 ..
    0.012 and eps-prediction; ``squaredcos_cap_v2`` gives the cosine schedule (Nichol & Dhariwal) instead, and
    ``v_prediction`` SD 2.x-768's parameterisation."""
    from diffusers import DDIMScheduler  # start-up: as at the top

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def _assemble(unet: UNet2DConditionModel, vae: AutoencoderKL | None, text_encoder: CLIPTextModel) -> Components:
    """Add the CLIP tokenizer and SD's scaled-linear scheduler; freeze the networks."""
    components = Components(unet, vae, text_encoder, clip_tokenizer(), sd_scheduler())
    for module in components.networks:
        module.requires_grad_(False).eval()
    return components


def save_components(components: Components, folder: str | Path) -> Path:
    """Write ``components`` as a diffusers SD folder that :func:`load_components` and diffusers both read."""
    from diffusers import StableDiffusionPipeline  # start-up: as at the top

    pipe = StableDiffusionPipeline(
        **vars(components), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder)
    return Path(folder)
