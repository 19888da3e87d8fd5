"""``memguard nemo-localize``: NeMo's localization of memorization neurons (Hintersdorf et al., NeurIPS 2024), per
prompt, into the neuron file ``mitigation=nemo`` reads (:mod:`memguard.mitigations.nemo`).

Their code: ml-research/localizing_memorization_in_diffusion_models, commit f952ede (below ``detect`` is
``3_detect_memorized_neurons.py``, ``detection`` is ``utils/activation_detection.py``). For each prompt:

1. **Value activations** (no denoiser call). For each localized value projection ``m`` (``transformer_blocks.0.
   attn2.to_v`` of every attention of the down blocks and of the mid block: for SD 1.x their seven layers,
   ``detection`` l. 51-58), ``a_m = mean_j |W_m e_j|`` over the prompt's tokens ``j`` (``detection`` l. 80: the
   hook's first row, ``abs().mean(dim=0)``). ``to_v`` sees only the text embedding, so this is what their hooked
   UNet call returns (``1_compute_activations_statistics.py`` l. 46-47 computes it directly, as here).
2. **Noise differences.** ``samples`` (10) initial noises ``x`` drawn in one ``torch.randn`` from seed ``seed``
   (1) (``detection`` l. 12, 23; ``detect`` l. 124-125); the denoiser's prediction ``eps`` at the second
   timestep of a 50-step DDIM schedule (``noise_step`` 1: their loop stops at ``i >= early_stopping = 1`` without
   stepping the latents, ``detection`` l. 155-189) on ``x`` itself, guidance 0 (the conditional branch alone,
   ``detect`` l. 132); ``D = eps - x``, min-max scaled per sample and channel over the latent pixels (l. 181-184).
3. **Memorized?** Per sample the largest MS-SSIM to any other sample (``detection`` l. 117-129; MS-SSIM of
   torchmetrics with gaussian sigma 1.5 (``kernel_size=11``), ``betas=(0.33,)*3``, l. 122). Samples above
   ``pairwise_threshold`` (0.428, ``detect`` l. 128; their README l. 41: mean + 1 std of unmemorized prompts'
   pairwise SSIM) are looked at; none: not memorized, no neurons (``detect`` l. 53-68).
4. **Initial selection** (``detection`` l. 87-114, ``detect`` l. 70-97): neurons with
   ``|a_m - mu_m| / sigma_m > theta`` (``mu``, ``sigma``: the statistics file) plus the ``k`` largest ``a_m`` per
   layer; starting at ``theta`` 5, ``k`` 0, while ``max MS-SSIM(D, D_blocked) > initial_threshold`` (0.428) over
   the looked-at samples: ``theta -= 0.25`` (down to ``min_theta`` 1) and ``k += 1``; at ``theta == min_theta``
   or ``k >= max_k`` (1280) it stops and that SSIM becomes the refinement threshold.
5. **Refinement** (``detection`` l. 193-258): layers from the last to the first, a layer whose neurons, all
   unblocked, keep ``max MS-SSIM(D, D_blocked) < refinement_threshold`` is dropped; then neuron by neuron the
   same test. What remains is written.

Deviations (docs/protocol.md): the noises of step 2 and the activations are computed once per prompt and reused
(their loop recomputes identical values: activations at every iteration, ``D`` in the refinement,
``detection`` l. 195); a call evaluates the denoiser at the noise step only and on the looked-at samples only
(theirs: also at step 0, discarded, and on every sample, l. 155-189); a neuron that is both beyond ``theta`` and
among the top ``k`` is listed once (theirs: twice, l. 105-108); ``theta`` stops at ``min_theta`` (theirs: at the
literal 1, ``detect`` l. 95, the same for the default); ``guidance > 0`` combines ``eps_u + g (eps_c - eps_u)``
(theirs swap the halves, ``detection`` l. 36 vs l. 172: not used by default); the relative refinement threshold
(``--rel_threshold_refinement``, default None) is not offered; dtype is the run's (theirs: float16 autocast).

The statistics: NeMo's ``statistics/statistics_additional_laion_prompts_v1_4.pt`` (a tuple of 7 means and 7 stds,
SD 1.x's layer widths 320, 320, 640, 640, 1280, 1280, 1280; ``memguard fetch`` brings it:
``sources.nemo_statistics``), or statistics memguard computes from non-memorized prompts
(``nemo.statistics_prompts``): per layer the mean and the (Bessel-corrected) std over prompts of ``a_m``, as
``1_compute_activations_statistics.py`` l. 37-63. A file names its model (:func:`check_statistics_model`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from memguard.components import DTYPES, check_settings, resolve_device
from memguard.errors import UserError
from memguard.families import family_class, join, load_family
from memguard.fetch.manifest import sha256_of
from memguard.mitigations.calibration import model_geometry, read_calibration
from memguard.mitigations.nemo import channel_scale, scaled_channels, value_projections
from memguard.runs.prompt_files import read_prompts_file
from memguard.runs.prompts import load_prompts

log = logging.getLogger(__name__)

FORMAT = "memguard nemo neurons 1"
STATISTICS_FORMAT = "memguard nemo statistics 1"
NEMO_TEXT_WIDTH = 768  # NeMo's file is SD 1.4's (README l. 33): its value layers read CLIP ViT-L/14's 768-wide text
PROBE = "a photograph"  # a memguard file's model check: the value activations of this prompt, kept beside its statistics


# ---------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    """The ``nemo`` config node, typed; defaults: ``3_detect_memorized_neurons.py`` (``detect``) of commit f952ede."""

    seed: int = 1  # detect l. 124
    samples: int = 10  # detect l. 125
    steps: int = 50  # detect l. 126 (DDIM, utils/stable_diffusion.py l. 22)
    noise_step: int = 1  # detection l. 134 (early_stopping=1), l. 176
    guidance: float = 0.0  # detect l. 132
    pairwise_threshold: float = 0.428  # detect l. 128
    initial_threshold: float = 0.428  # detect l. 129
    refinement_threshold: float = 0.428  # detect l. 130
    theta: float = 5.0  # detect l. 136
    theta_step: float = 0.25  # detect l. 133
    min_theta: float = 1.0  # detect l. 134
    k: int = 0  # detect l. 138
    max_k: int = 1280  # detect l. 95
    factor: float = 0.0  # detect l. 127
    ssim_sigma: float = 1.5  # the gaussian of torchmetrics' MS-SSIM; 1.5 makes their kernel_size=11 (detection l. 122)
    ssim_betas: tuple[float, ...] = (0.33, 0.33, 0.33)  # detection l. 122

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> Settings:
        """The settings of ``nemo.*``; a UserError naming the key for a value out of range."""
        names = {f for f in cls.__dataclass_fields__}
        values = {k: (tuple(float(b) for b in v) if k == "ssim_betas" else v) for k, v in node.items() if k in names}
        settings = cls(**values)
        checks = [("seed", settings.seed >= 0, "an integer >= 0"), ("samples", settings.samples >= 2, "an integer >= 2"),
                  ("steps", settings.steps >= 2, "an integer >= 2"),
                  ("noise_step", 0 <= settings.noise_step < settings.steps, f"a step in [0, nemo.steps={settings.steps})"),
                  ("guidance", settings.guidance >= 0, "a number >= 0"),
                  ("theta_step", settings.theta_step > 0, "a number > 0"),
                  ("min_theta", settings.min_theta <= settings.theta, f"at most nemo.theta={settings.theta}"),
                  ("k", settings.k >= 0, "an integer >= 0"), ("max_k", settings.max_k >= 1, "an integer >= 1"),
                  ("ssim_sigma", settings.ssim_sigma > 0, "a number > 0"),
                  ("ssim_betas", len(settings.ssim_betas) >= 1, "a non-empty list")]
        for key, ok, what in checks:
            if not ok:
                raise UserError(f"nemo.{key}={getattr(settings, key)} must be {what}")
        return settings


# ---------------------------------------------------------------------------------------------------------------
# Layers, activations, statistics


def value_modules(denoiser: torch.nn.Module) -> list[str]:
    """The localized value projections: ``transformer_blocks.0.attn2.to_v`` of every attention of the down blocks,
    in order, then of the mid block (SD 1.x: their seven, ``detection`` l. 51-58)."""
    names = value_projections(denoiser)
    wanted = [n for n in names if n.startswith("down_blocks.") and ".transformer_blocks.0.attn2.to_v" in n]
    wanted += [n for n in names if n.startswith("mid_block.") and ".transformer_blocks.0.attn2.to_v" in n]
    return wanted


@torch.no_grad()
def value_activations(family: Any, prompts: Sequence[str], modules: Sequence[str], size: int | None = None,
                      batch_size: int = 32) -> list[Tensor]:
    """Per module, ``(P, C)`` float32: each prompt's ``mean_j |to_v(e)_j|`` over its tokens ``j`` (the text
    embedding as the denoiser gets it, normalised first where the attention has ``norm_cross``)."""
    denoiser = family.denoiser
    out: list[list[Tensor]] = [[] for _ in modules]
    for first in range(0, len(prompts), batch_size):
        context = family.encode(list(prompts[first : first + batch_size]), size)["encoder_hidden_states"]
        for i, name in enumerate(modules):
            attention = denoiser.get_submodule(name.removesuffix(".to_v"))
            seen = attention.norm_encoder_hidden_states(context) if attention.norm_cross else context
            out[i].append(denoiser.get_submodule(name)(seen).abs().float().mean(dim=1).cpu())
    return [torch.cat(rows) for rows in out]


@dataclass
class Statistics:
    """Per localized module, the mean and std of the value activations over non-memorized prompts."""

    mean: list[Tensor]
    std: list[Tensor]


def compute_statistics(family: Any, prompts: Sequence[str], modules: Sequence[str], size: int | None = None,
                       batch_size: int = 32) -> Statistics:
    """``1_compute_activations_statistics.py`` l. 37-63: per module, the mean and the Bessel-corrected std over
    the prompts of :func:`value_activations`."""
    if len(prompts) < 2:
        raise UserError(f"nemo.statistics_prompts holds {len(prompts)} prompt(s); a std needs at least 2 "
                        "(NeMo's file: 50,000 LAION prompts)")
    acts = value_activations(family, prompts, modules, size, batch_size)
    return Statistics([a.mean(dim=0) for a in acts], [a.std(dim=0) for a in acts])


def save_statistics(path: Path, stats: Statistics, modules: Sequence[str], prompts: Sequence[str],
                    model: str = "", probe: Sequence[Tensor] = ()) -> None:
    """memguard's statistics file: the modules by name, their means and stds, the prompts' digest, the model (its
    path, and ``probe``: its value activations of :data:`PROBE`, :func:`value_activations`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    torch.save({"format": STATISTICS_FORMAT, "modules": list(modules), "mean": stats.mean, "std": stats.std,
                "n_prompts": len(prompts), "prompts_sha256": _digest(prompts), "model": model,
                "probe": list(probe)}, tmp)
    os.replace(tmp, path)


def check_statistics_model(path: Path, family: Any, modules: Sequence[str], model: str,
                           key: str = "nemo.statistics") -> None:
    """The statistics were computed on this model, as far as the file says: NeMo's file (no model recorded) is
    SD 1.4's, refused in one line for a model whose value layers read another text width (SD 2.x) and taken with
    a one-line warning otherwise (a fine-tune of SD 1.x has the same shapes); memguard's file keeps its model's
    activations of :data:`PROBE`, and a model whose own differ by more than 2% gets a one-line warning. Each names
    the fix, ``nemo.statistics_prompts``."""
    fix = "compute this model's with nemo.statistics_prompts=FILE (non-memorized prompts) and nemo.statistics=NEW_FILE"
    own = _own_statistics(path)
    if own is None:
        width = family.denoiser.get_submodule(modules[0]).in_features
        if width != NEMO_TEXT_WIDTH:
            raise UserError(f"{key}={str(path)!r} holds NeMo's statistics of SD 1.4 (value layers reading "
                            f"{NEMO_TEXT_WIDTH}-wide text embeddings); model.path={model!r} reads {width}-wide "
                            f"ones (another text encoder, e.g. SD 2.x): {fix}")
        log.warning("%s=%r holds NeMo's statistics of SD 1.4; model.path=%r is used with them as it is: if it is not "
                    "SD 1.4 (a fine-tune), %s", key, str(path), model, fix)
        return
    if not own.get("probe"):
        return  # written before memguard kept the probe: nothing to compare
    mine = value_activations(family, [PROBE], modules)
    gap = max(float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
              for a, b in zip(mine, own["probe"], strict=True))
    if gap > 0.02:
        log.warning("%s=%r was computed on model %r; model.path=%r differs (its value activations of %r differ by "
                    "%.0f%%): %s", key, str(path), own.get("model", ""), model, PROBE, 100 * gap, fix)


def _own_statistics(path: Path) -> dict[str, Any] | None:
    """The contents of a statistics file memguard wrote, else None (absent, NeMo's, or not a torch file)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    except Exception:  # noqa: BLE001  (not a torch file: not one of memguard's)
        return None
    return data if isinstance(data, dict) and data.get("format") == STATISTICS_FORMAT else None


def load_statistics(path: Path, modules: Mapping[str, int], key: str = "nemo.statistics") -> Statistics:
    """A statistics file for the localized ``modules`` (name -> width): memguard's (modules by name) or NeMo's
    tuple ``(means, stds)`` (one per module, in :func:`value_modules`' order). A file of other layers is
    refused in one line."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file torch cannot read: say which and why
        raise UserError(f"{key}={str(path)!r} cannot be read as a statistics file ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:120] if str(err) else ''})") from err
    if isinstance(data, dict) and data.get("format") == STATISTICS_FORMAT:
        names, mean, std = list(data["modules"]), list(data["mean"]), list(data["std"])
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(x, (tuple, list)) for x in data):
        names, (mean, std) = None, (list(data[0]), list(data[1]))
    else:
        raise UserError(f"{key}={str(path)!r} is neither NeMo's statistics file (a tuple of means and stds per "
                        "layer) nor one memguard nemo-localize wrote")
    widths = [int(m.numel()) for m in mean]
    want = list(modules.values())
    if (names is not None and names != list(modules)) or widths != want or [int(s.numel()) for s in std] != want:
        raise UserError(f"{key}={str(path)!r} holds statistics of {len(widths)} value layers of widths "
                        f"{', '.join(map(str, widths))}, this model's {len(want)} localized layers have "
                        f"{', '.join(map(str, want))}: it was computed for another model (NeMo's file fits SD 1.x); "
                        "compute this model's with nemo.statistics_prompts=FILE (non-memorized prompts) and "
                        "nemo.statistics=NEW_FILE")
    return Statistics([m.float().flatten() for m in mean], [s.float().flatten() for s in std])


def _digest(texts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Noise differences and their similarity


def ms_ssim(a: Tensor, b: Tensor, settings: Settings) -> Tensor:
    """Per sample MS-SSIM of two ``(N, C, h, w)`` batches, torchmetrics' as their code calls it (``detection``
    l. 122: ``kernel_size=11``, which its gaussian kernel takes from sigma 1.5, ``betas=(0.33,)*3``)."""
    # start-up: torchmetrics loads only when a prompt is localized
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    kernel = int(3.5 * settings.ssim_sigma + 0.5) * 2 + 1
    try:
        return multiscale_structural_similarity_index_measure(
            a.float(), b.float(), sigma=settings.ssim_sigma, kernel_size=kernel, betas=settings.ssim_betas,
            reduction="none")
    except (ValueError, RuntimeError) as err:
        raise UserError(f"nemo.ssim_sigma={settings.ssim_sigma}, nemo.ssim_betas={list(settings.ssim_betas)}: MS-SSIM "
                        f"cannot be computed on {a.shape[-2]}x{a.shape[-1]} latents ({str(err).splitlines()[0]}); "
                        "small latents need fewer scales and a narrower kernel, e.g. nemo.ssim_betas='[0.5,0.5]' "
                        "nemo.ssim_sigma=0.5") from err


def max_pairwise(diffs: Tensor, settings: Settings) -> Tensor:
    """Per sample, its largest MS-SSIM to any other sample (``detection`` l. 117-129)."""
    pairs = torch.combinations(torch.arange(len(diffs), device=diffs.device), r=2)
    ssim = ms_ssim(diffs[pairs[:, 0]], diffs[pairs[:, 1]], settings)
    return torch.stack([ssim[(pairs == i).any(dim=1)].max() for i in range(len(diffs))])


class NoiseDiffs:
    """One prompt's scaled noise differences ``D`` (module docstring, step 2) with given neurons blocked, counting
    the denoiser evaluations (samples through the network, per branch)."""

    def __init__(self, family: Any, prompt: str, settings: Settings, size: int | None = None,
                 batch_size: int = 16) -> None:
        from diffusers import DDIMScheduler  # start-up: diffusers loads only when a prompt is localized

        self.family, self.settings, self.batch_size = family, settings, batch_size
        scheduler = DDIMScheduler.from_config(family.scheduler.config)  # theirs: the model's DDIM config
        denoiser = family.denoiser
        scheduler.set_timesteps(settings.steps, device=denoiser.device)
        self.scheduler, self.t = scheduler, scheduler.timesteps[settings.noise_step]
        a, b = family.eps_coefficients(scheduler)
        self.a, self.b = a[settings.noise_step], b[settings.noise_step]
        side = (size or family.default_resolution) // family.vae_scale_factor
        generator = torch.Generator("cpu").manual_seed(settings.seed)  # one draw for the set, as their latents
        self.x = torch.randn((settings.samples, family.latent_channels, side, side), generator=generator).to(
            denoiser.device, denoiser.dtype)
        self.cond = family.encode([prompt], size)
        self.uncond = family.null(1, size) if settings.guidance else None
        self.evaluations = 0

    @torch.no_grad()
    def __call__(self, blocked: Mapping[str, Sequence[int]] | None = None, rows: Tensor | None = None) -> Tensor:
        """``D`` ``(n, C, h, w)`` float32 of the samples ``rows`` (a bool mask; all by default) with ``blocked``
        (module -> channels) times ``factor`` in every row of the denoiser's batch."""
        x = self.x if rows is None else self.x[rows.to(self.x.device)]
        denoiser = self.family.denoiser
        modules = value_projections(denoiser)
        scales = {name: channel_scale(modules[name].out_features, channels, self.settings.factor,
                                      denoiser.device)[None] for name, channels in (blocked or {}).items() if channels}
        outputs = []
        with scaled_channels(denoiser, scales):
            for first in range(0, len(x), self.batch_size):
                chunk = x[first : first + self.batch_size]
                n = len(chunk)
                x_in = self.scheduler.scale_model_input(chunk, self.t)
                cond = {k: v.expand(n, *v.shape[1:]) for k, v in self.cond.items()}
                if self.uncond is None:
                    out = self.family(x_in, self.t, cond)
                    self.evaluations += n
                else:
                    uncond = {k: v.expand(n, *v.shape[1:]) for k, v in self.uncond.items()}
                    eps_u, eps_c = self.family(torch.cat([x_in, x_in]), self.t, join(uncond, cond)).chunk(2)
                    out = eps_u + self.settings.guidance * (eps_c - eps_u)
                    self.evaluations += 2 * n
                outputs.append(self.a * out.float() + self.b * x_in.float())  # eps (eps models: the output)
        diff = torch.cat(outputs) - x.float()
        low, high = diff.amin(dim=(2, 3), keepdim=True), diff.amax(dim=(2, 3), keepdim=True)
        return (diff - low) / (high - low)


# ---------------------------------------------------------------------------------------------------------------
# The search


def initial_selection(acts: Sequence[Tensor], stats: Statistics, modules: Sequence[str], theta: float,
                      k: int) -> dict[str, list[int]]:
    """``detection`` l. 101-112: per module the channels with ``|a - mu| / sigma > theta``, then the ``k``
    largest ``a`` (each channel once; ``acts``: per module ``(C,)``)."""
    selected = {}
    for name, a, mu, sigma in zip(modules, acts, stats.mean, stats.std):
        channels = ((a - mu).abs() / sigma > theta).nonzero().flatten().tolist()
        channels += a.abs().topk(k=min(k, a.numel())).indices.tolist()
        selected[name] = list(dict.fromkeys(channels))
    return selected


def _drop(blocked: Mapping[str, list[int]]) -> dict[str, list[int]]:
    return {name: list(channels) for name, channels in blocked.items() if channels}


@dataclass
class Result:
    """One prompt's localization, as the neuron file records it."""

    neurons: dict[str, list[int]]
    memorized: bool
    max_pairwise_ssim: list[float]
    initial: dict[str, list[int]] = field(default_factory=dict)
    initial_ssim: float | None = None
    theta: float | None = None
    k: int | None = None
    refinement_threshold: float | None = None
    refined_ssim: float | None = None
    unet_evals: int = 0

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "neurons"}


def localize_prompt(family: Any, prompt: str, stats: Statistics, modules: Sequence[str], settings: Settings,
                    size: int | None = None, batch_size: int = 16) -> Result:
    """Steps 1-5 of the module docstring for one prompt."""
    # 1-3. Activations, noise differences unblocked, which samples look memorized
    diffs = NoiseDiffs(family, prompt, settings, size, batch_size)
    unblocked = diffs()
    pairwise = max_pairwise(unblocked, settings)
    rows = pairwise > settings.pairwise_threshold
    if not bool(rows.any()):
        return Result({}, False, pairwise.tolist(), unet_evals=diffs.evaluations)
    unblocked = unblocked[rows]
    acts = [a[0] for a in value_activations(family, [prompt], modules, size)]

    def ssim(blocked: Mapping[str, Sequence[int]]) -> float:  # the largest MS-SSIM to the unblocked D
        return float(ms_ssim(unblocked, diffs(blocked, rows), settings).max())

    # 4. Initial selection: theta down, k up, until blocking breaks the similarity
    theta, k, threshold = settings.theta, settings.k, settings.refinement_threshold
    while True:
        initial = initial_selection(acts, stats, modules, theta, k)
        similarity = ssim(initial)
        if similarity > settings.initial_threshold:
            theta = theta - settings.theta_step if theta > settings.min_theta else theta
            k += 1
        if theta <= settings.min_theta or k >= settings.max_k:
            threshold = similarity
            break
        if similarity <= settings.initial_threshold:
            break

    # 5. Refinement: whole layers, then single neurons, from the last layer to the first
    blocked = {name: list(channels) for name, channels in initial.items()}
    for name in reversed(modules):
        if blocked[name] and ssim({**blocked, name: []}) < threshold:
            blocked[name] = []
    for name in reversed(modules):
        for channel in list(blocked[name]):
            trial = [c for c in blocked[name] if c != channel]
            if ssim({**blocked, name: trial}) < threshold:
                blocked[name] = trial
    refined = _drop(blocked)
    return Result(refined, True, pairwise.tolist(), _drop(initial), similarity, theta, k, threshold, ssim(refined),
                  diffs.evaluations)


def calibration_scores(cfg: Any, prompts: Sequence[str]) -> Tensor:
    """``memguard calibrate mitigation=nemo``: each control prompt's samples' largest pairwise MS-SSIM (step 3),
    pooled; their README l. 41 sets the thresholds to the mean + 1 std of these for unmemorized prompts."""
    settings = Settings.from_config(OmegaConf.to_container(cfg.nemo, resolve=True))
    family = load_family(cfg.model.path, resolve_device(cfg.device), DTYPES[cfg.dtype], cfg.model.get("family"))
    side = cfg.resolution or family.default_resolution
    batch = cfg.batch_size if isinstance(cfg.batch_size, int) else settings.samples
    return torch.cat([max_pairwise(NoiseDiffs(family, p, settings, side, batch)(), settings).cpu()
                      for p in dict.fromkeys(prompts)])


def apply_nemo_calibration(cfg: Any) -> dict[str, Any] | None:
    """The thresholds ``memguard calibrate mitigation=nemo`` wrote to ``nemo.calibration`` for this model, set in
    ``cfg.nemo``; without one, a model other than SD 1.x (NeMo's) gets one warning naming the fix."""
    path = cfg.nemo.get("calibration")
    if path and Path(str(path)).is_file():
        calibration = read_calibration(path, cfg.model.path)
        for key, value in calibration["values"].items():
            OmegaConf.update(cfg, key, value)
        log.info("nemo-localize: thresholds from %s: %s", path, calibration["values"])
        return calibration
    if model_geometry(Path(str(cfg.model.path))).get("cross_attention_dim") != NEMO_TEXT_WIDTH:
        log.warning("nemo-localize runs NeMo's MS-SSIM thresholds (%s), set for SD 1.4, uncalibrated on model.path=%s; "
                    "calibrate them on this model: memguard calibrate mitigation=nemo (same scenario and model)",
                    cfg.nemo.pairwise_threshold, cfg.model.path)
    return None


# ---------------------------------------------------------------------------------------------------------------
# The task: `memguard nemo-localize`


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _statistics(cfg: Any, family: Any, modules: dict[str, int], size: int | None, batch: int) -> tuple[Statistics, Path]:
    """``nemo.statistics``, computed first from ``nemo.statistics_prompts`` where given, unless the file holds
    memguard's statistics of the same prompts and model already; a file memguard did not write is not replaced."""
    if cfg.nemo.statistics is None:
        raise UserError("nemo.statistics is not set; give NeMo's SD 1.x file (scenario=nemo500 sets it and `memguard "
                        "fetch` brings it), or nemo.statistics_prompts=FILE of non-memorized prompts with "
                        "nemo.statistics=NEW_FILE to compute them for this model")
    path = Path(str(cfg.nemo.statistics)).expanduser()
    if cfg.nemo.get("statistics_prompts") is not None:
        source = Path(str(cfg.nemo.statistics_prompts)).expanduser()
        if not source.is_file():
            raise UserError(f"nemo.statistics_prompts={str(source)!r} is not a file; give a prompt file of "
                            "non-memorized prompts (text, .csv, .jsonl or .parquet)")
        prompts = read_prompts_file(source).texts
        old = _own_statistics(path)
        if path.exists() and old is None:
            raise UserError(f"nemo.statistics={str(path)!r} exists and was not computed by memguard; give another "
                            "file for the statistics computed from nemo.statistics_prompts")
        if old is None or (old.get("prompts_sha256"), old.get("model")) != (_digest(prompts), str(cfg.model.path)):
            log.info("nemo-localize: statistics of %d prompts from %s -> %s", len(prompts), source, path)
            save_statistics(path, compute_statistics(family, prompts, list(modules), size, batch), list(modules),
                            prompts, str(cfg.model.path), value_activations(family, [PROBE], list(modules), size))
    elif not path.is_file():
        raise UserError(f"nemo.statistics={str(path)!r} is not a file; `memguard fetch` (the same overrides) brings "
                        "NeMo's (sources.nemo_statistics), or compute one with nemo.statistics_prompts=FILE")
    stats = load_statistics(path, modules)
    check_statistics_model(path, family, list(modules), str(cfg.model.path))
    return stats, path


def localize(cfg: Any) -> dict[str, Any]:
    """Localize every prompt of ``cfg`` (resuming) into ``nemo.output``; the summary it logs."""
    # 1. Inputs
    check_settings(cfg)
    apply_nemo_calibration(cfg)
    settings = Settings.from_config(OmegaConf.to_container(cfg.nemo, resolve=True))
    family_type = family_class(cfg.model.path, cfg.model.get("family"))
    if family_type.name not in ("sd", "sdxl"):
        raise UserError(f"memguard nemo-localize finds neurons of the attn2 cross-attention value projections of sd and "
                        f"sdxl models; model.path={cfg.model.path!r} is a {family_type.name} model")
    prompts = list(dict.fromkeys(load_prompts(cfg).texts))
    batch = cfg.batch_size if isinstance(cfg.batch_size, int) else settings.samples
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    family = load_family(cfg.model.path, resolve_device(cfg.device), DTYPES[cfg.dtype], cfg.model.get("family"))
    projections = value_projections(family.denoiser)
    modules = {name: projections[name].out_features for name in value_modules(family.denoiser)}
    side = cfg.resolution or family.default_resolution
    latent = side // family.vae_scale_factor
    probe = torch.linspace(0, 1, 2 * family.latent_channels * latent * latent).view(2, -1, latent, latent)
    ms_ssim(probe, probe.flip(0), settings)  # the MS-SSIM settings fit the latents, before any denoiser call
    stats, stats_path = _statistics(cfg, family, modules, side, batch)

    # 2. The output: same settings as before (resume), or new
    output = Path(str(cfg.nemo.output)).expanduser()
    record = {"model": str(cfg.model.path), "family": family_type.name, "dtype": cfg.dtype, "resolution": side,
              "modules": list(modules), "statistics": str(stats_path), "statistics_sha256": sha256_of(stats_path),
              **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}}
    data = {"format": FORMAT, "settings": record, "neurons": {}, "prompts": {}}
    if output.is_file():
        old = json.loads(output.read_text(encoding="utf-8"))
        changed = [f"{k}: {old.get('settings', {}).get(k)!r} -> {v!r}" for k, v in record.items()
                   if k != "statistics" and old.get("settings", {}).get(k) != v]  # the file by its hash
        if old.get("format") != FORMAT or changed:
            raise UserError(f"nemo.output={str(output)!r} was localized with other settings ({'; '.join(changed[:3])}); "
                            "resume with the same settings, or write elsewhere with nemo.output=FILE")
        data.update(neurons=old["neurons"], prompts=old["prompts"])

    # 3. Per prompt; the file is rewritten after each, so an interrupted run resumes
    started, done = time.perf_counter(), 0
    for prompt in prompts:
        if prompt in data["neurons"]:
            continue
        result = localize_prompt(family, prompt, stats, list(modules), settings, side, batch)
        data["neurons"][prompt], data["prompts"][prompt] = result.neurons, result.record()
        _write(output, data)
        done += 1
        log.info("nemo-localize: %d/%d %r: %s, %d neurons, %d denoiser evaluations", len(data["neurons"]),
                 len(prompts), prompt[:60], "memorized" if result.memorized else "not memorized",
                 sum(map(len, result.neurons.values())), result.unet_evals)
    if not done and not output.is_file():
        _write(output, data)
    seconds = time.perf_counter() - started
    rows = [data["prompts"][p] for p in prompts]
    summary = {"output": str(output), "n_prompts": len(prompts), "localized_now": done,
               "memorized": sum(r["memorized"] for r in rows),
               "neurons_mean": sum(sum(map(len, data["neurons"][p].values())) for p in prompts) / len(prompts),
               "unet_evals_per_prompt": sum(r["unet_evals"] for r in rows) / len(prompts),
               "seconds": round(seconds, 3)}
    print(f"memguard nemo-localize: {summary['memorized']} of {len(prompts)} prompts memorized, "
          f"{summary['neurons_mean']:.2f} neurons per prompt on average, {summary['unet_evals_per_prompt']:.1f} denoiser "
          f"evaluations per prompt; written to {output}; use it with mitigation=nemo "
          f"mitigation.attention.neurons={output}", flush=True)
    return summary
