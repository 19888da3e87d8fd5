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
from dataclasses import dataclass, field

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from memguard.components import Components
from memguard.errors import UserError
from memguard.families import Conditions, Family, as_family, join
from memguard.families.sd import SD
from memguard.guidance import GuidanceSchedule
from memguard.mitigations import Baselines, Branches, Start

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
    d_raw: Tensor | None = None  # (B, steps): ||out_c - out_u||_2^2 in the model's own units (v, velocity; = d for eps)
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
def sample(model: Family | torch.nn.Module, scheduler: SchedulerMixin, cond: Conditions | Tensor,
           uncond: Conditions | Tensor, noise: Tensor, schedule: GuidanceSchedule, steps: int,
           callback: StepCallback | None = None, start: int = 0, prefix: Trajectory | None = None,
           trajectory: str = "full", branches: Branches | None = None, extra: Sequence[Conditions] = ()) -> Trajectory:
    """Classifier-free guided sampling, Eq. (4) of Jain et al. with a per-sample, per-step scale.

    ``model``: a family adapter (:mod:`memguard.families`); ``cond``/``uncond``: its conditions for the batch
    (a bare UNet with text-embedding tensors ``(B, L, D)`` is taken as the sd family). ``noise``: unit noise
    ``(B, C, h, w)``. The model's outputs are combined as they are (eps, v or a flow velocity: CFG is linear, so
    each gives the same update) and ``d_t`` is reported in eps units for each (``d_raw``: in the model's own
    units). The scheduler is reset (``set_timesteps``) and stepped in place. ``callback`` gets, per step, a dict
    with ``step``, ``timestep``, ``x`` (latents before the step), ``eps_u``, ``eps_c`` (the model's raw outputs),
    ``d``, ``d_raw`` and ``scale``.

    ``start > 0`` continues a trajectory from that step (a branch of a shared prefix): ``noise`` is then the
    latents before step ``start`` (the callback's ``x``), ``scheduler`` a copy (``copy.deepcopy``) of the
    scheduler as it was then, which is not reset, and ``prefix`` the trajectory whose ``d``, ``scale`` and norms of
    the steps before ``start`` are kept (the schedule sees them as its history).

    ``trajectory="full"`` (the paper's record) evaluates both branches at every step. ``"off"``: where the
    schedule does not read ``d`` (``needs_d`` false) and its scale is exactly 0 (1) for every sample of the
    batch, only the unconditional (conditional) branch is evaluated, which is what ``eps_hat`` then equals;
    ``d`` and the other branch's norm are NaN at those steps (and the callback's other ``eps`` None).

    ``branches`` (:class:`memguard.mitigations.Branches`) with its ``extra`` conditions: every step evaluates
    ``[null, condition, *extra]`` in one call and steps with ``branches.combine`` (``trajectory`` is then full).
    """
    # 1. Timesteps and initial latents, as the pipeline prepares them
    model, cond, uncond = _adapter(model, scheduler, cond, uncond)
    device = noise.device
    if start == 0:
        scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    timestep_values = [float(t) for t in timesteps.cpu()]
    latents = noise * getattr(scheduler, "init_noise_sigma", 1.0) if start == 0 else noise  # flow: unit noise
    embeddings = join(uncond, cond, *extra)
    n_branches = 2 + len(extra)
    d = torch.zeros(noise.shape[0], len(timesteps), dtype=torch.float32, device=device)
    # d_t is measured in eps units: eps = a_k out + b_k x_k, so eps_c - eps_u = a_k (out_c - out_u) (eps: a = 1;
    # v-prediction: a = sqrt(abar_t); rectified flow: a = 1 - sigma_t; see the family's eps_coefficients)
    a, b = model.eps_coefficients(scheduler)
    scales, norm_c, norm_u, d_raw = torch.zeros_like(d), torch.zeros_like(d), torch.zeros_like(d), torch.zeros_like(d)
    if prefix is not None:
        for mine, theirs in ((d, prefix.d), (scales, prefix.scale), (norm_c, prefix.norm_c), (norm_u, prefix.norm_u),
                             (d_raw, prefix.d_raw)):
            mine[:, :start] = theirs[:, :start]
    scale_input = hasattr(scheduler, "scale_model_input")  # flow-matching schedulers take x as it is
    skip, single = trajectory == "off" and not schedule.needs_d and branches is None, 0  # single: steps with one branch evaluated
    if branches is not None:
        branches.begin(len(timesteps))

    # 2. Denoising loop: one model call on [x, x] with [null condition, condition]
    for k, t in enumerate(timesteps):
        if k < start:
            continue
        if skip:  # the scale is known before the model call; 0 or 1 for the whole batch leaves one branch unused
            d[:, k], d_raw[:, k], norm_c[:, k], norm_u[:, k] = (float("nan"),) * 4
            scales[:, k] = schedule(k, timestep_values[k], d[:, : k + 1])
            only = 0 if bool((scales[:, k] == 0).all()) else 1 if bool((scales[:, k] == 1).all()) else None
            if only is not None:
                x_t = scheduler.scale_model_input(latents, t) if scale_input else latents
                eps = model(x_t, t, uncond if only == 0 else cond)
                (norm_c if only else norm_u)[:, k] = _eps_norm(eps, x_t, a[k], b[k])
                if callback is not None:
                    callback({"step": k, "timestep": timestep_values[k], "x": latents, "eps_u": None if only else eps,
                              "eps_c": eps if only else None, "d": d[:, k], "d_raw": d_raw[:, k],
                              "scale": scales[:, k]})
                latents = scheduler.step(eps, t, latents, return_dict=False)[0]
                single += 1
                continue
        x_in = torch.cat([latents] * n_branches)
        x_in = scheduler.scale_model_input(x_in, t) if scale_input else x_in
        eps_u, eps_c, *others = model(x_in, t, embeddings).chunk(n_branches)
        guidance = eps_c - eps_u
        d_raw[:, k] = guidance.float().flatten(1).pow(2).sum(dim=1)
        d[:, k] = d_raw[:, k] * a[k] ** 2
        x_t = x_in[: latents.shape[0]]
        norm_c[:, k] = _eps_norm(eps_c, x_t, a[k], b[k])
        norm_u[:, k] = _eps_norm(eps_u, x_t, a[k], b[k])
        scales[:, k] = schedule(k, timestep_values[k], d[:, : k + 1])
        if branches is None:
            eps = eps_u + scales[:, k].to(guidance.dtype).view(-1, *[1] * (guidance.dim() - 1)) * guidance
        else:
            eps = branches.combine(eps_u, eps_c, others, scales[:, k], k, a[k])
        if callback is not None:
            callback({"step": k, "timestep": timestep_values[k], "x": latents, "eps_u": eps_u, "eps_c": eps_c,
                      "d": d[:, k], "d_raw": d_raw[:, k], "scale": scales[:, k]})
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]

    return Trajectory(latents=latents, timesteps=timestep_values, d=d, scale=scales, norm_c=norm_c, norm_u=norm_u,
                      d_raw=d_raw, unet_evals=n_branches * (len(timesteps) - start) - single)


def _eps_norm(output: Tensor, x: Tensor, a: float, b: float) -> Tensor:
    """Per-sample ``||eps||_2`` of a model output, ``eps = a out + b x`` (``x``: the model input, ``x_t``)."""
    if b:
        output = a * output.float() + b * x.float()
    elif a != 1:
        output = a * output.float()
    return output.float().flatten(1).norm(dim=1)


def _adapter(model: Family | torch.nn.Module, scheduler: SchedulerMixin, cond: Conditions | Tensor,
             uncond: Conditions | Tensor) -> tuple[Family, Conditions, Conditions]:
    """A family adapter and its conditions; a bare UNet with embedding tensors is the sd family."""
    if isinstance(model, Family):
        return model, cond, uncond
    return (SD(Components(model, None, None, None, scheduler)), {"encoder_hidden_states": cond.to(model.dtype)},
            {"encoder_hidden_states": uncond.to(model.dtype)})


@torch.no_grad()
def decode(model: Family | Components, latents: Tensor) -> Tensor:
    """Decode latents with the VAE into images in ``[0, 1]``, shape ``(B, 3, H, W)``, float32 (a pixel-space
    model's latents are the images in ``[-1, 1]``). Latents are unscaled as the family's pipeline does:
    ``/ scaling_factor``, then ``+ shift_factor`` where the VAE has one (SD3), or ``* std / scaling_factor + mean``
    where it has ``latents_mean``/``latents_std`` (pipeline_stable_diffusion_xl.py lines 1277-1289)."""
    vae = model.vae
    if vae is None:
        return (latents.float() / 2 + 0.5).clamp(0, 1)
    config, latents = vae.config, latents.to(vae.dtype)
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
    images = vae.decode(latents, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def prepare_batch(family: Family, prompts: Sequence[str], seeds: Sequence[int],
                  resolution: int | None = None) -> tuple[Conditions, Conditions, Tensor]:
    """One batch's conditions, null conditions and per-seed unit noise (:func:`initial_noise`) on the denoiser's
    device and dtype, for images ``resolution`` pixels square (default: the model's own, denoiser sample size
    times the VAE factor)."""
    factor = family.vae_scale_factor
    side = resolution or family.default_resolution
    if side % factor:
        raise UserError(f"resolution={side} must be a multiple of the VAE factor {factor}")
    denoiser = family.denoiser
    noise = initial_noise(seeds, (family.latent_channels, side // factor, side // factor), denoiser.device,
                          denoiser.dtype)
    return family.encode(prompts, side), family.null(len(prompts), side), noise


def generate_images(model: Family | Components, scheduler: SchedulerMixin, schedule: GuidanceSchedule,
                    prompts: Sequence[str], seeds: Sequence[int], steps: int, resolution: int | None = None,
                    baselines: Baselines | None = None, trajectory: str = "full",
                    original: Sequence[str] | None = None) -> tuple[Tensor, Trajectory]:
    """One batch from prompts to images: encode the prompts and the null condition, draw per-seed noise, sample,
    decode. ``model``: a family adapter (:mod:`memguard.families`; SD components are the sd family). Returns
    images ``(B, 3, H, W)`` in ``[0, 1]`` and the trajectory. ``resolution`` defaults to the model's own
    (denoiser sample size times the VAE factor). ``prompts``: the texts the model is given; ``original``: the
    images' own prompts where a ``mitigation.prompt`` rewrote them (default: ``prompts``).

    ``baselines``: a mitigation's slots (:mod:`memguard.mitigations`), each called here at its one place, in this
    order: ``noise`` adjusts x_T; ``embedding`` (Wen et al.'s) replaces the prompt's conditions, seeing the first
    step's scaled model input (``adjust(model, x_in, t, cond, uncond, prompts=, seeds=, model_input=)``, where
    ``model_input(seeds)`` is any seeds' first input, for image sets); ``branches`` adds conditions the loop
    evaluates and combines (its ``info()`` joins the slots' info after sampling); ``attention`` hooks the
    denoiser's modules while the batch is sampled. ``trajectory``: see :func:`sample` (a hook or extra branches
    make it ``full``). The slots' per-image ``info`` is the trajectory's ``info`` (their ``unet_evals_before``
    summed)."""
    baselines = baselines or Baselines()
    family = as_family(model)
    cond, uncond, noise = prepare_batch(family, prompts, seeds, resolution)
    info: dict[str, Tensor] = {}
    if baselines.noise is not None or baselines.embedding is not None:
        scheduler.set_timesteps(steps, device=noise.device)
        t = scheduler.timesteps[0]
        a, b = family.eps_coefficients(scheduler)
        start = Start(scheduler, t, float(getattr(scheduler, "init_noise_sigma", 1.0)), a[0], b[0])
    if baselines.noise is not None:
        latents, info = baselines.noise(family, noise * start.sigma, start, cond, uncond, prompts=list(prompts),
                                        seeds=list(seeds))
        noise = (latents / start.sigma).to(noise.dtype)
    if baselines.embedding is not None:
        def model_input(set_seeds: Sequence[int]) -> Tensor:  # an image set's first input, drawn as ``noise``
            unit = initial_noise(set_seeds, tuple(noise.shape[1:]), noise.device, noise.dtype)
            return start.model_input(unit * start.sigma)

        cond, adjusted = baselines.embedding(family, start.model_input(noise * start.sigma), start.t, cond, uncond,
                                             prompts=list(prompts), seeds=list(seeds), model_input=model_input)
        for key, value in adjusted.items():  # a cost is summed over the slots, anything else reported as it is
            summed = key in ("unet_evals_before", "unet_backward_before") and key in info
            info[key] = info[key] + value if summed else value
    extra = [] if baselines.branches is None else baselines.branches.conditions(
        family, list(original or prompts), resolution or family.default_resolution)
    installed = nullcontext() if baselines.attention is None else \
        baselines.attention.installed(family, list(prompts), 2 + len(extra))
    with installed:
        trajectory = sample(family, scheduler, cond, uncond, noise, schedule, steps,
                            trajectory=trajectory if baselines.attention is None else "full",
                            branches=baselines.branches, extra=extra)
    trajectory.info = info if baselines.branches is None else {**info, **baselines.branches.info()}
    return decode(family, trajectory.latents), trajectory
