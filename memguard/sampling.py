"""memguard's one sampling loop over diffusers components.

The stock ``StableDiffusionPipeline`` cannot run the paper's schedules: it re-derives
``do_classifier_free_guidance = scale > 1`` each step (zero or negative guidance drops the unconditional pass),
keeps one scale per batch, and never exposes ``eps_c``/``eps_u``. :func:`sample` always evaluates both branches
in one batched UNet call and asks a :class:`~memguard.guidance.GuidanceSchedule` for a scale per sample.
With a constant scale it computes what the pipeline computes (tested against it for several schedulers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING
from dataclasses import dataclass, field

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from memguard.components import Components
from memguard.guidance import GuidanceSchedule

if TYPE_CHECKING:
    from memguard.baselines import RenAttention

StepCallback = Callable[[dict[str, Tensor | int | float]], None]


@dataclass
class Trajectory:
    """What :func:`sample` returns: final latents and, per sample and step, ``d_t`` and the scale used."""

    latents: Tensor  # (B, C, h, w)
    timesteps: list[float]  # (steps,)
    d: Tensor  # (B, steps), float32, on the sampling device
    scale: Tensor  # (B, steps), float32
    norm_c: Tensor | None = None  # (B, steps): ||eps_c||_2 in eps units, as d is (Figures 3, 9, 10, 12 of the paper)
    norm_u: Tensor | None = None  # (B, steps): ||eps_u||_2
    info: dict[str, Tensor] = field(default_factory=dict)  # per-sample values an embedding adjustment reports
    unet_evals: int | None = None  # UNet evaluations per sample in the loop: 2 per step, 1 where a branch was skipped


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit Gaussian noise with one CPU generator per image, so an image depends on its seed, not its batch.

    Draws exactly what diffusers' ``randn_tensor`` draws for a list of CPU generators seeded with ``seeds``.
    """
    noise = [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.cat(noise).to(device=device, dtype=dtype)


@torch.no_grad()
def encode_prompts(components: Components, prompts: Sequence[str]) -> Tensor:
    """CLIP text embeddings ``(len(prompts), 77, dim)``, tokenized and encoded as StableDiffusionPipeline does."""
    tokenizer, encoder = components.tokenizer, components.text_encoder
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    mask = tokens.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
    return encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]


@torch.no_grad()
def sample(unet: torch.nn.Module, scheduler: SchedulerMixin, cond: Tensor, uncond: Tensor, noise: Tensor,
           schedule: GuidanceSchedule, steps: int, callback: StepCallback | None = None, start: int = 0,
           prefix: Trajectory | None = None, trajectory: str = "full") -> Trajectory:
    """Classifier-free guided sampling, Eq. (4) of Jain et al. with a per-sample, per-step scale.

    ``cond``/``uncond``: text embeddings ``(B, L, D)``; ``noise``: unit noise ``(B, C, h, w)``. The model's
    outputs are combined as they are (eps or v: CFG is linear, so both give the same update) and ``d_t`` is
    reported in eps units for either. The scheduler is reset (``set_timesteps``) and stepped in place.
    ``callback`` gets, per step, a dict with ``step``, ``timestep``, ``x`` (latents before the step), ``eps_u``,
    ``eps_c`` (the model's raw outputs), ``d`` and ``scale``.

    ``start > 0`` continues a trajectory from that step (a branch of a shared prefix): ``noise`` is then the
    latents before step ``start`` (the callback's ``x``), ``scheduler`` a copy (``copy.deepcopy``) of the
    scheduler as it was then, which is not reset, and ``prefix`` the trajectory whose ``d``, ``scale`` and norms of
    the steps before ``start`` are kept (the schedule sees them as its history).

    ``trajectory="full"`` (the paper's record) evaluates both branches at every step. ``"off"``: where the
    schedule does not read ``d`` (``needs_d`` false) and its scale is exactly 0 (1) for every sample of the
    batch, only the unconditional (conditional) branch is evaluated, which is what ``eps_hat`` then equals;
    ``d`` and the other branch's norm are NaN at those steps (and the callback's other ``eps`` None).
    """
    # 1. Timesteps and initial latents, as the pipeline prepares them
    device = noise.device
    if start == 0:
        scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    timestep_values = [float(t) for t in timesteps.cpu()]
    latents = noise * scheduler.init_noise_sigma if start == 0 else noise
    embeddings = torch.cat([uncond, cond]).to(dtype=unet.dtype)
    d = torch.zeros(noise.shape[0], len(timesteps), dtype=torch.float32, device=device)
    # d_t is measured in eps units: for a v-prediction model eps_c - eps_u = sqrt(abar_t) (v_c - v_u)
    v_prediction = scheduler.config.get("prediction_type") == "v_prediction"
    scales, norm_c, norm_u = torch.zeros_like(d), torch.zeros_like(d), torch.zeros_like(d)
    if prefix is not None:
        d[:, :start], scales[:, :start] = prefix.d[:, :start], prefix.scale[:, :start]
        norm_c[:, :start], norm_u[:, :start] = prefix.norm_c[:, :start], prefix.norm_u[:, :start]

    skip, single = trajectory == "off" and not schedule.needs_d, 0  # single: steps with one branch evaluated

    # 2. Denoising loop: one UNet call on [x, x] with [e_empty, e_prompt]
    for k, t in enumerate(timesteps):
        if k < start:
            continue
        if skip:  # the scale is known before the model call; 0 or 1 for the whole batch leaves one branch unused
            d[:, k], norm_c[:, k], norm_u[:, k] = float("nan"), float("nan"), float("nan")
            scales[:, k] = schedule(k, timestep_values[k], d[:, : k + 1])
            only = 0 if bool((scales[:, k] == 0).all()) else 1 if bool((scales[:, k] == 1).all()) else None
            if only is not None:
                x_t = scheduler.scale_model_input(latents, t)
                eps = unet(x_t, t, encoder_hidden_states=embeddings.chunk(2)[only], return_dict=False)[0]
                (norm_c if only else norm_u)[:, k] = _eps_norm(eps, x_t, scheduler, t, v_prediction)
                if callback is not None:
                    callback({"step": k, "timestep": timestep_values[k], "x": latents, "eps_u": None if only else eps,
                              "eps_c": eps if only else None, "d": d[:, k], "scale": scales[:, k]})
                latents = scheduler.step(eps, t, latents, return_dict=False)[0]
                single += 1
                continue
        x_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_u, eps_c = unet(x_in, t, encoder_hidden_states=embeddings, return_dict=False)[0].chunk(2)
        guidance = eps_c - eps_u
        d[:, k] = guidance.float().flatten(1).pow(2).sum(dim=1)
        if v_prediction:
            d[:, k] *= float(scheduler.alphas_cumprod[int(t)])
        x_t = x_in[: latents.shape[0]]
        norm_c[:, k] = _eps_norm(eps_c, x_t, scheduler, t, v_prediction)
        norm_u[:, k] = _eps_norm(eps_u, x_t, scheduler, t, v_prediction)
        scales[:, k] = schedule(k, timestep_values[k], d[:, : k + 1])
        eps = eps_u + scales[:, k].to(guidance.dtype).view(-1, *[1] * (guidance.dim() - 1)) * guidance
        if callback is not None:
            callback({"step": k, "timestep": timestep_values[k], "x": latents, "eps_u": eps_u, "eps_c": eps_c,
                      "d": d[:, k], "scale": scales[:, k]})
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]

    return Trajectory(latents=latents, timesteps=timestep_values, d=d, scale=scales, norm_c=norm_c, norm_u=norm_u,
                      unet_evals=2 * (len(timesteps) - start) - single)


def _eps_norm(output: Tensor, x: Tensor, scheduler: SchedulerMixin, t: Tensor, v_prediction: bool) -> Tensor:
    """Per-sample ``||eps||_2`` of a model output; for v-prediction ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``
    (``x``: the scaled model input, the variance-preserving ``x_t``)."""
    if v_prediction:
        abar = float(scheduler.alphas_cumprod[int(t)])
        output = abar ** 0.5 * output.float() + (1 - abar) ** 0.5 * x.float()
    return output.float().flatten(1).norm(dim=1)


@torch.no_grad()
def decode(components: Components, latents: Tensor) -> Tensor:
    """Decode latents with the VAE into images in ``[0, 1]``, shape ``(B, 3, H, W)``, float32 (a pixel-space
    model's latents are the images in ``[-1, 1]``)."""
    vae = components.vae
    if vae is None:
        return (latents.float() / 2 + 0.5).clamp(0, 1)
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


EmbeddingAdjustment = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def generate_images(components: Components, scheduler: SchedulerMixin, schedule: GuidanceSchedule,
                    prompts: Sequence[str], seeds: Sequence[int], steps: int, resolution: int | None = None,
                    adjust: EmbeddingAdjustment | None = None,
                    attention: RenAttention | None = None, trajectory: str = "full") -> tuple[Tensor, Trajectory]:
    """One batch from text to images: encode the prompts and the empty prompt, draw per-seed noise, sample,
    decode. Returns images ``(B, 3, H, W)`` in ``[0, 1]`` and the trajectory. ``resolution`` defaults to the
    model's own (UNet sample size times the VAE factor). ``adjust(unet, x_in, t, cond, uncond)`` (a baseline
    such as Wen et al.'s) may replace the prompt embeddings, seeing the first step's scaled model input; it also
    gets ``prompts``, ``seeds`` and ``model_input(seeds)`` (any seeds' first scaled input, for image sets).
    ``attention`` (Ren et al.'s :class:`~memguard.baselines.RenAttention`) replaces the UNet's cross-attention
    processors for this batch. ``trajectory``: see :func:`sample` (``off`` skips nothing under ``attention``,
    whose processors edit the conditional half of a two-branch batch)."""
    from memguard.errors import UserError

    factor = components.vae_scale_factor
    side = resolution or components.default_resolution
    if side % factor:
        raise UserError(f"resolution={side} must be a multiple of the VAE factor {factor}")
    cond = encode_prompts(components, prompts)
    uncond = encode_prompts(components, [""]).expand_as(cond)
    unet = components.unet
    noise = initial_noise(seeds, (unet.config.in_channels, side // factor, side // factor), unet.device, unet.dtype)
    info: dict[str, Tensor] = {}
    if adjust is not None:
        scheduler.set_timesteps(steps, device=noise.device)
        t = scheduler.timesteps[0]
        def model_input(set_seeds: Sequence[int]) -> Tensor:  # an image set's first input, drawn as ``noise``
            set_noise = initial_noise(set_seeds, tuple(noise.shape[1:]), noise.device, noise.dtype)
            return scheduler.scale_model_input(set_noise * scheduler.init_noise_sigma, t)

        cond, info = adjust(unet, scheduler.scale_model_input(noise * scheduler.init_noise_sigma, t), t, cond, uncond,
                            prompts=list(prompts), seeds=list(seeds), model_input=model_input)
    installed = nullcontext()
    if attention is not None:
        lengths = components.tokenizer(list(prompts), truncation=True, max_length=cond.shape[1],
                                       return_length=True).length
        installed = attention.installed(unet, torch.as_tensor(lengths, device=noise.device), cond.shape[1])
    with installed:
        trajectory = sample(unet, scheduler, cond, uncond, noise, schedule, steps,
                            trajectory=trajectory if attention is None else "full")
    trajectory.info = info
    return decode(components, trajectory.latents), trajectory
