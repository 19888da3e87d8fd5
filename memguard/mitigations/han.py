"""Han et al. (NeurIPS 2025), "Adjusting Initial Noise to Mitigate Memorization in Text-to-Image Diffusion
Models": move each image's initial latents x_T, before sampling, to where the guidance term

    eps~(x) = out(x, T, condition) - out(x, T, null)        (the denoiser's raw outputs at the first timestep T)

is small, so that the trajectory leaves the attraction basin early and CFG can start early. Two methods, both
``mitigation.noise`` (:class:`memguard.mitigations.NoiseAdjustment`):

- :class:`HanBatchWise` (mitigation ``han``): ``iterations`` sharpness-aware steps on x_T, then CFG delayed by a
  few steps (:class:`memguard.guidance.DelayedStart`);
- :class:`HanPerSample` (mitigation ``han_per_sample``): AdamW on x_T until ``||eps~||`` is under a target, then
  CFG from the first step.

Reference code: hygnhan/init_noise_diffusion_memorization, commit 3a47d7a9f957cc6afc941b3c1283cbfd4847f2e1
(``local_sd_pipeline.py``, ``generate_images.py``); the line numbers cited below are of that commit.

Units: their code uses the UNet's raw output (SD 1.4, eps-prediction; ``generate_images.py`` line 128), which is
memguard's default (``units="raw"``); for a v-prediction model (SD 2.x) that is v. ``units="eps"`` takes
``eps_c - eps_u = a_T (out_c - out_u)`` instead (:class:`memguard.mitigations.Start`; the ``b x`` term cancels
in the difference), so the norm, ``gamma``'s step and ``target`` are in eps units. Where ``a_T = 0`` (flow
matching at ``sigma = 1``, a zero-terminal-SNR schedule) eps units carry nothing and are refused.

Model input: memguard evaluates the denoiser on ``scale_model_input(x_T)`` (:meth:`memguard.mitigations.Start.
model_input`), the input the sampling loop gives it. Their per-sample code does the same (``local_sd_pipeline.py``
line 326); their batch-wise code passes x_T unscaled (lines 246-253). With their DDIM sampler
(``generate_images.py`` line 57), and with DPM-Solver++, the scaling is the identity, so both coincide there.

Both are per image: an image's update reads only its own latents and conditions, so it is the same alone as in
any batch up to float rounding, and neither draws random numbers. (A batch changes the denoiser's outputs by
rounding, ~1e-7; AdamW's per-element normalisation turns that into latent differences of ~1e-5 over a few steps
on tiny components, tests/test_han.py; the batch-wise update keeps it at rounding.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from memguard.errors import UserError
from memguard.families import join
from memguard.mitigations import Conditions, Family, Info, NoiseAdjustment, Start, masked_step, select_rows

UNITS = ("raw", "eps")


def _check_units(units: str) -> None:
    if units not in UNITS:
        raise ValueError(f"units={units!r} must be raw (the denoiser's output, as Han et al.'s code) or eps")


def _check_positive(name: str, value: float) -> None:
    if not (value > 0 and value < float("inf")):  # also rejects NaN
        raise ValueError(f"{name}={value} must be a finite number > 0")


def _check_iterations(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"iterations={value} must be an integer >= 1 ({what}; 0 would leave x_T unchanged: "
                         "use mitigation=none or mitigation=stp for no adjustment)")


def guidance_term(family: Family, x: Tensor, start: Start, cond: Conditions, uncond: Conditions,
                  units: str = "raw", dtype: torch.dtype = torch.float32) -> Tensor:
    """``eps~ = out_c - out_u`` at latents ``x`` ``(B, C, h, w)`` and the first timestep: one denoiser call on
    ``[x, x]`` with ``[null, condition]``, as the sampling loop makes it (``units="eps"``: times ``start.a``).
    In ``dtype`` (float32 unless told), whatever the denoiser's; differentiable in ``x``."""
    x_in = start.model_input(torch.cat([x, x])).to(family.denoiser.dtype)
    out_u, out_c = family(x_in, start.t, join(uncond, cond)).to(dtype).chunk(2)
    difference = out_c - out_u
    return difference * start.a if units == "eps" else difference


def _norms(difference: Tensor) -> Tensor:
    """Per-sample L2 norm over all non-batch dimensions, ``(B,)``."""
    return difference.flatten(1).norm(dim=1)


PRECISIONS = ("float32", "model")


def working_dtype(precision: str, family: Family) -> torch.dtype:
    """The dtype of an optimisation's latents, guidance terms and optimiser state: ``float32`` (memguard's), or
    ``model``, the denoiser's own (their code's: the pipeline's bfloat16 under ``+protocol=authors``)."""
    _check_precision(precision)
    return torch.float32 if precision == "float32" else family.denoiser.dtype


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be float32 or model (the denoiser's dtype, as the authors' "
                         "code)")


def _check_eps_units(units: str, start: Start) -> None:
    if units == "eps" and start.a == 0:
        raise UserError("mitigation.noise.units=eps: the model's output carries no eps at the first timestep "
                        "(a_T = 0: flow matching at sigma = 1, or a zero-terminal-SNR schedule); use units=raw")


class _Han(NoiseAdjustment):
    """What both methods share: the units of ``eps~`` and the families those units serve."""

    units: str = "raw"

    @property
    def families(self) -> tuple[str, ...] | None:  # type: ignore[override]
        """Any family in raw units (each has a null condition); eps units need ``a_T > 0``, which sd3's flow at
        ``sigma = 1`` lacks."""
        return ("sd", "sdxl", "dit") if self.units == "eps" else None


class HanBatchWise(_Han):
    """Han et al.'s batch-wise adjustment (mitigation ``han``): ``iterations`` times (``M``), per image, at the
    first timestep T,

        g = eps~(x_T),    delta = rho * g / ||g||_2,    x_T <- x_T - gamma * (eps~(x_T + delta) - g)

    (a sharpness-aware step: the difference of the guidance term across a step of length ``rho`` along itself);
    sampling then runs with CFG delayed (the YAML's :class:`memguard.guidance.DelayedStart`). Defaults as their
    ``generate_images.py``: ``adj_iters`` 2 (line 153), ``rho`` 50 (line 151), ``gamma`` 0.7 (line 152); the update
    is ``local_sd_pipeline.py`` lines 245-274, called on the whole batch at lines 130-139. "Batch-wise" is their
    name for running a fixed ``M`` on every image at once; each image's update still reads only its own values
    (the norm is per sample, line 258). An image with ``g = 0`` is left where it is (their code divides by 0).

    Cost, per image: ``4 M`` denoiser evaluations (each iteration evaluates two CFG pairs; no backward pass),
    ``unet_evals_before``. Info per image: ``han_first_norm`` (``||g||`` at the original x_T, in ``units``),
    ``han_shift_norm`` (``||x_T' - x_T||_2``). The norm at the adjusted x_T is not evaluated (their code does not
    either): it is the sampling loop's step-0 ``sqrt(d)`` (``trajectories.csv``; eps units).
    Ranges: ``iterations >= 1``, ``rho > 0``, ``gamma > 0``; ``units`` raw or eps.

    ``precision``: ``float32`` (default) computes x_T, ``eps~`` and the update in float32; ``model`` in the
    denoiser's dtype, as their code does (``generate_images.py`` l. 41-55: the pipeline and so x_T in bfloat16;
    ``+protocol=authors`` sets it): the norm, ``delta`` and each update then round to bfloat16's 8 significant bits.
    """

    def __init__(self, iterations: int = 2, rho: float = 50.0, gamma: float = 0.7, units: str = "raw",
                 precision: str = "float32") -> None:
        _check_iterations(iterations, "M, the number of updates")
        _check_positive("rho", rho)
        _check_positive("gamma", gamma)
        _check_units(units)
        _check_precision(precision)
        self.iterations, self.rho, self.gamma, self.units = iterations, float(rho), float(gamma), units
        self.precision = precision

    @torch.no_grad()
    def __call__(self, family: Family, latents: Tensor, start: Start, cond: Conditions, uncond: Conditions, *,
                 prompts: Sequence[str], seeds: Sequence[int]) -> tuple[Tensor, Info]:
        _check_eps_units(self.units, start)
        dtype = working_dtype(self.precision, family)
        x = original = latents.to(dtype)
        first = None
        for _ in range(self.iterations):
            g = guidance_term(family, x, start, cond, uncond, self.units, dtype)
            norm = g.pow(2).flatten(1).sum(dim=1).sqrt()  # as theirs (l. 258): squares in x_T's dtype, then summed
            first = norm if first is None else first
            delta = self.rho * (g / norm.clamp_min(torch.finfo(dtype).tiny).view(-1, *[1] * (g.dim() - 1)))
            x = x - self.gamma * (guidance_term(family, x + delta, start, cond, uncond, self.units, dtype) - g)
        info = {"han_first_norm": first, "han_shift_norm": _norms(x - original),
                "unet_evals_before": torch.full((len(x),), 4 * self.iterations, device=x.device)}
        return x.to(latents.dtype), info

    # Their rho = 50 is a distance in SD 1.4's 4x64x64 latent space, where E||x_T|| = sqrt(16384) = 128 (their
    # code gives no procedure for it). memguard keeps its ratio to ||x_T|| on the model at hand.
    REFERENCE_NORM = 128.0

    @torch.no_grad()
    def calibration_scores(self, family: Family, start: Start, cond: Conditions, uncond: Conditions,
                           noise: Tensor) -> Tensor:
        """Per image ``rho ||x_T|| / 128``: the step length that is to this model's x_T what ``rho`` is to SD 1.4's
        (``memguard calibrate mitigation=han`` takes the median; the prompts do not enter)."""
        return self.rho * _norms(noise * start.sigma).float() / self.REFERENCE_NORM


class HanPerSample(_Han):
    """Han et al.'s per-sample optimisation (mitigation ``han_per_sample``): minimise, per image,

        L(x_T) = || eps~(x_T) ||_2        (at the first timestep T)

    over x_T with AdamW (``lr``; torch's default weight decay 0.01, which acts on a float32 x_T and does nothing on
    their bfloat16 one: ``precision`` below), stopping once
    ``L <= target`` or after ``iterations`` AdamW steps; then CFG from the first step (the YAML's
    :class:`memguard.guidance.Constant`). Their code: ``local_sd_pipeline.py`` lines 107-129 (one image at a
    time: a batch of one latent and its [null, prompt] embeddings), 318-357 (the loop: loss
    ``torch.norm(eps~, p=2).mean()`` of that one image, the stop check before each step, line 345); defaults
    ``generate_images.py`` lines 145-147: ``target_loss`` 0.9, ``lr`` 0.01, ``optim_iters`` 1000. Their call is
    per image, so their loss is this per-image norm. Here a batch's images are optimised together and each stops
    on its own (an image that reached its target is frozen: AdamW's momentum and decay do not move it), so an
    image's result is what it gets alone. ``target=None``: no early stop (all ``iterations`` steps).

    Evaluations: one forward per step, plus the stop check at the end. Their loop stops after its last step
    without evaluating; memguard evaluates once more (the final norm and whether the target was reached), so an
    image that uses every step costs one forward pair more than theirs; its latents are the same.
    ``unet_evals_before`` = ``2 (han_iterations + 1)`` per image: forward passes of the image through both
    branches; its backward passes, ``2 han_iterations``, are ``unet_backward_before``. Info per image:
    ``han_iterations`` (AdamW steps), ``han_first_norm``, ``han_final_norm`` (``L`` at the original and the
    final x_T, in ``units``), ``han_reached_target``, ``han_shift_norm`` (``||x_T' - x_T||_2``).
    Ranges: ``lr > 0``, ``iterations >= 1``, ``target >= 0`` or None; ``units`` raw or eps.

    ``precision``: ``float32`` (default): x_T, the loss and AdamW's state in float32, where the weight decay moves
    x_T by ``lr * 0.01`` of itself a step. ``model``: in the denoiser's dtype, as their code (x_T a bfloat16 leaf,
    so AdamW's moments are bfloat16 too; ``+protocol=authors`` sets it). In bfloat16 the decay is a no-op
    (``x (1 - 1e-4)`` rounds back to ``x``: 8 significant bits), and every step's update rounds to x_T's spacing.
    """

    def __init__(self, lr: float = 0.01, iterations: int = 1000, target: float | None = 0.9,
                 units: str = "raw", precision: str = "float32") -> None:
        _check_positive("lr", lr)
        _check_iterations(iterations, "the most AdamW steps per image")
        if target is not None and not target >= 0:
            raise ValueError(f"target={target} must be >= 0 (the norm to reach), or null for no early stop")
        _check_units(units)
        _check_precision(precision)
        self.lr, self.iterations, self.units, self.precision = float(lr), iterations, units, precision
        self.target = None if target is None else float(target)

    @torch.no_grad()
    def calibration_scores(self, family: Family, start: Start, cond: Conditions, uncond: Conditions,
                           noise: Tensor) -> Tensor:
        """``||eps~(x_T)||`` per image at its own noise, in ``units``: the norm the target cuts (``memguard
        calibrate mitigation=han_per_sample`` scores it on control prompts)."""
        _check_eps_units(self.units, start)
        x = (noise * start.sigma).to(working_dtype(self.precision, family))
        return _norms(guidance_term(family, x, start, cond, uncond, self.units, x.dtype)).float()

    def __call__(self, family: Family, latents: Tensor, start: Start, cond: Conditions, uncond: Conditions, *,
                 prompts: Sequence[str], seeds: Sequence[int]) -> tuple[Tensor, Info]:
        _check_eps_units(self.units, start)
        dtype = working_dtype(self.precision, family)
        original = latents.detach().to(dtype)
        x = original.clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([x], lr=self.lr)
        n, device = len(x), x.device
        active = torch.ones(n, dtype=torch.bool, device=device)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        first = torch.full((n,), float("nan"), device=device)
        final = first.clone()
        for k in range(self.iterations + 1):
            # 1. The loss of the images still optimised (the others are not evaluated again)
            rows = active.nonzero().squeeze(1)
            with torch.enable_grad():
                norms = _norms(guidance_term(family, x[rows], start, select_rows(cond, rows), select_rows(uncond, rows),
                                             self.units, dtype))
            final[rows] = norms.detach().float()
            if k == 0:
                first = final.clone()
            # 2. Stop where the target is reached, or at the cap
            if self.target is not None:
                active[rows] = norms.detach() > self.target
            if k == self.iterations or not active.any():
                break
            # 3. One AdamW step on the images still active
            with torch.enable_grad():  # also when the caller samples under torch.no_grad()
                (grad,) = torch.autograd.grad((norms * active[rows]).sum(), [x])
            x.grad = grad
            masked_step(optimizer, x, active)
            steps += active
        info = {"han_iterations": steps, "han_first_norm": first, "han_final_norm": final,
                "han_shift_norm": _norms(x.detach() - original), "unet_evals_before": 2 * (steps + 1),
                "unet_backward_before": 2 * steps}  # each step's gradient goes back through both branches
        if self.target is not None:
            info["han_reached_target"] = final <= self.target
        return x.detach().to(latents.dtype), info
