"""The GPU path of a run: the VAE's dtype, ``torch.compile`` of the denoiser, and ``batch_size=auto``.

Attention needs nothing here: diffusers' ``Attention`` modules default to ``AttnProcessor2_0``, which calls
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on a GPU) wherever torch
has it (diffusers ``models/attention_processor.py``, ``Attention.__init__``: ``AttnProcessor2_0() if
hasattr(F, "scaled_dot_product_attention") and self.scale_qk else AttnProcessor()``); the tests check that the
loaded UNet uses it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from memguard.errors import UserError
from memguard.families import Family, join

log = logging.getLogger(__name__)
VAE_DTYPES = ("float32", "float16", "bfloat16")
CPU_AUTO_BATCH = 8  # batch_size=auto off CUDA: memory is not what limits a CPU run, and larger batches are no faster
_found: dict[tuple, int] = {}  # batch_size=auto per (model, resolution, dtypes, device): probed once per process


def check_gpu_settings(cfg: DictConfig, device: torch.device) -> None:
    """Reject bad ``vae_dtype`` and ``compile`` values, naming the key, before anything runs."""
    if cfg.vae_dtype is not None and cfg.vae_dtype not in VAE_DTYPES:
        raise UserError(f"vae_dtype={cfg.vae_dtype!r} is not one of null (dtype, or float32 where the VAE needs it), "
                        f"{', '.join(VAE_DTYPES)}")
    if cfg.compile not in (True, False):
        raise UserError(f"compile={cfg.compile!r} must be true or false")
    if cfg.compile:
        check_compiler(device)


def check_compiler(device: torch.device) -> None:
    """``torch.compile`` needs dynamo support and a backend compiler: triton on CUDA, a C++ compiler on the CPU."""
    fix = "install it, or run without compile=true"
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        raise UserError(f"compile=true but torch {torch.__version__} has no torch.compile for this Python; "
                        "upgrade torch, or run without compile=true")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError(f"compile=true on {device} needs triton (torch.compile's GPU code generator); {fix}")
    if device.type == "cpu":
        try:
            # start-up: inductor loads only where a compiler is checked
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as err:
            raise UserError("compile=true on the CPU needs a C++ compiler for torch.compile's inductor backend "
                            f"(g++, or CXX=...; {type(err).__name__}); {fix}") from err


def vae_dtype(name: str | None, dtype: torch.dtype, family: Family) -> torch.dtype | None:
    """The VAE's dtype: ``name`` if given; else ``dtype``, except float32 where ``dtype`` is float16 and the VAE's
    config sets ``force_upcast`` (diffusers' rule, ``pipeline_stable_diffusion_xl.py`` ``needs_upcasting =
    self.vae.dtype == torch.float16 and self.vae.config.force_upcast``; SD 1.x/2.x VAE configs get diffusers'
    default ``force_upcast=True``). None for a pixel-space model."""
    if family.vae is None:
        return None
    if name is not None:
        return getattr(torch, name)
    return torch.float32 if dtype == torch.float16 and family.vae.config.get("force_upcast", True) else dtype


def prepare_model(family: Family, cfg: DictConfig, images: int) -> tuple[Family, int]:
    """Set the VAE's dtype, find the batch size (:func:`batch_size_for`) and, with ``compile=true``, compile the
    denoiser in place (``nn.Module.compile``: the module and its attributes stay; the first batch of each shape
    pays the compile time). Returns the family adapter and the batch size."""
    target = vae_dtype(cfg.vae_dtype, getattr(torch, cfg.dtype), family)
    if target is not None and family.vae.dtype != target:
        family.vae.to(target)
        log.info("VAE in %s (dtype=%s)", str(target).removeprefix("torch."), cfg.dtype)
    batch_size = batch_size_for(cfg, family, images)  # probed before compiling: no compile per probe shape
    if cfg.compile:
        family.denoiser.compile()
    return family, batch_size


def largest_power_of_two(fits: Callable[[int], bool], cap: int) -> int:
    """The largest ``n = 2^k <= cap`` with ``fits(n)``, trying 1, 2, 4, ... and stopping at the first that fails
    (1 is taken to fit: a run that cannot make one image fails on its own)."""
    n = 1
    while 2 * n <= cap and fits(2 * n):
        n *= 2
    return n


def cuda_fits(family: Family, side: int, headroom: float = 0.9) -> Callable[[int], bool]:
    """Whether ``n`` images fit: one denoiser call on both branches (``2n`` samples, the family's null condition
    in both) and one VAE decode of ``n``, with the peak under ``headroom`` of the device's memory (sampling holds
    a few more tensors than the probe)."""
    denoiser, vae = family.denoiser, family.vae
    device, latent = denoiser.device, side // family.vae_scale_factor
    total = torch.cuda.get_device_properties(device).total_memory

    @torch.no_grad()
    def fits(n: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            x = torch.randn(2 * n, family.latent_channels, latent, latent, device=device, dtype=denoiser.dtype)
            null = family.null(n, side)
            family(x, torch.tensor(500.0, device=device), join(null, null))
            if vae is not None:
                vae.decode(x[:n].to(vae.dtype), return_dict=False)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) <= headroom * total
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    return fits


def batch_size_for(cfg: DictConfig, family: Family, images: int) -> int:
    """``cfg.batch_size``, or for ``auto`` the largest power of two that fits the device (probed once per model,
    resolution, dtype and device in this process; at most the next power of two above ``images``, 1024)."""
    if cfg.batch_size != "auto":
        return int(cfg.batch_size)
    device = family.denoiser.device
    if device.type != "cuda":
        log.info("batch_size=auto on %s: %d (no memory probe off CUDA)", device, CPU_AUTO_BATCH)
        return CPU_AUTO_BATCH
    side = cfg.resolution or family.default_resolution
    cap = min(1024, 2 ** math.ceil(math.log2(max(images, 1))))
    key = (str(cfg.model.path), side, cfg.dtype, cfg.vae_dtype, str(device), cap)
    if key not in _found:
        _found[key] = largest_power_of_two(cuda_fits(family, side), cap)
        log.info("batch_size=auto on %s: %d (the largest power of two whose UNet call on both branches and VAE "
                 "decode fit in 90%% of its memory, up to %d)", device, _found[key], cap)
    return _found[key]
