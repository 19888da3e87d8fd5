"""SAIL (Jeon, Kim, No, ICML 2025, "Understanding and Mitigating Memorization in Generative Models via Sharpness
of Probability Landscapes"): start sampling from an initial latent in a flat region, then plain CFG.

Reference code: Dongjae0324/sharpness_memorization_diffusion at commit f4ee4b8 (``local_model/pipe.py`` lines
505-584, the mitigation block; defaults in ``mitigate_mem.py``). Candidates ``z`` (unit noise, ``budget`` of them)
are optimised with Adam on, per candidate,

    L(z) = || Delta(z + u) ||_2 + gamma ||z||_2,     u = Delta(z') / ||Delta(z')||_2,     Delta = eps_c - eps_u

at the first timestep ``T`` (the sharpness proxy plus a Gaussianity penalty), where ``z'`` is the point the
direction is taken at (see ``direction``). A candidate is taken as soon as ``L <= threshold`` (checked before each
Adam step); after ``max_steps`` steps without one the round has failed; after every 3rd failed round the threshold
rises by 0.1 and the candidates are drawn from a new seed. Rounds 1-3 of a threshold draw the same candidates, as
theirs (``torch.manual_seed(seed)`` at every round, pipe.py line 520; the seed changes only with the threshold,
lines 575-577), so on deterministic hardware rounds 2 and 3 repeat round 1's search: its cost, not a new chance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from memguard.mitigations import Conditions, Family, Info, NoiseAdjustment, Start, select_rows


@dataclass
class Pick:
    """One latent that met the threshold: unit-noise scale ``z``, its loss, the round (1-based) and the step of
    that round (0-based: Adam updates before it) at which it met ``threshold``."""

    z: Tensor
    loss: float
    round: int
    step: int
    threshold: float


@dataclass
class Search:
    """A pool's search: the picks in the order found, the denoiser evaluations spent (samples through the network,
    forward passes), whether ``max_rounds`` stopped it, and per round the (threshold, seed) it ran with."""

    picks: list[Pick]
    evals: int
    capped: bool
    rounds: list[tuple[float, int]] = field(default_factory=list)
    backward: int = 0  # samples through the network backward: 4 budget per Adam step (both calls, both branches)


class SAIL(NoiseAdjustment):
    """SAIL's initial-latent search (``mitigation.noise``), then plain CFG (the YAML's ``Constant`` schedule).

    Per image (``pool=image``, memguard's default): each image searches its own pool of ``budget`` candidates,
    drawn from a CPU generator seeded with the image's seed, and takes the first candidate that meets the
    threshold (several at one step: the lowest index). Their code's pool (``pool=prompt``) searches ONE pool per prompt,
    seeded with one seed (``gen_seed`` 42, mitigate_mem.py line 65, the same for every prompt) and keeps the first
    ``images_per_prompt`` latents found (pipe.py lines 550-560, 583); here the pool's seed is the first seed of the
    prompt's image set and the image with the k-th seed of the set gets the k-th latent. Two quirks of theirs are
    kept there: the list is not reset between rounds, so a repeated round (same seed) adds the same latents again;
    and it holds views of the optimised tensor (line 555, ``lat[i].detach()``), so a latent found before its round
    ends is taken at the round's end (the break, or after the last Adam step of a failed round), its
    ``sail_final_loss`` being the loss with which it met the threshold. With one image per prompt both pools are
    the same search.

    Draws: round r's candidates are ``randn((budget, C, h, w))`` from ``Generator("cpu").manual_seed(s)``; the
    next seed after a raise is ``randint(0, 50000)`` from the same generator after those candidates, which is what
    their ``torch.manual_seed(seed); torch.randn(...); torch.randint(0, 50000, (1,))`` gives on a CPU (pipe.py
    lines 520-521, 577; on CUDA their candidates come from the CUDA generator). Never the global RNG, so an image is
    the same alone or in any batch. Candidates are unit noise as theirs (line 521: ``torch.randn``, not scaled by
    ``init_noise_sigma``); here x_T = ``init_noise_sigma`` z and the model input ``scale_model_input(x_T)``, which
    is z itself for their DDIM (and DPM-Solver: sigma 1, identity), and the penalty is on z. Both calls take
    ``scale_model_input`` (their perturbed call, line 535-536, skips it: the same for their DDIM).

    ``direction="first"`` (default, their code as it runs): ``u`` is taken at the round's first draw ``z_0`` and
    the gradient flows through it at ``z_0``: pipe.py line 523 builds ``lat_single = torch.cat([lat_out] * 2)`` once
    per round, before the step loop, and ``torch.cat`` copies, so line 530 evaluates the UNet at the initial
    candidates at every step while line 535 perturbs the current ones. ``"current"``: ``u`` at the current ``z``
    (the proxy as their line 538 comment and the paper's Algorithm 2 state it).

    v-prediction: eps = ``a out + b x_in`` (:class:`~memguard.mitigations.Start`, ``a = sqrt(abar_T)``,
    ``b = sqrt(1 - abar_T)``; ``v_units="eps"``). Their code (lines 531, 545) converts with
    ``(x_in - sqrt(abar) out) / sqrt(1 - abar)``, which is eps only if ``out`` were x0: for ``Delta`` it gives
    ``-Delta_eps / sqrt(1 - abar_T)``, so their direction ``u`` is the opposite one and their proxy is scaled by
    ``1 / sqrt(1 - abar_T)`` (1.0029 for SD 2's scaled-linear betas at their DDIM's t = 981);
    ``v_units="their_code"`` uses their conversion. ``precision``: ``float32`` or ``model`` (their bfloat16 under
    ``+protocol=authors``; see :meth:`dtype`).

    ``gaussianity`` (gamma): null takes theirs by prediction type, 0.05 for eps models (their SD 1.4, line 543)
    and 0.01 for v models (their SD 2, the 768-v model, line 548). ``max_rounds`` is memguard's addition (their loop,
    line 519, ends only when enough latents are found; a NaN loss would never end it): a search that hits it takes
    the candidates with the lowest loss at its last evaluation and reports ``sail_capped``.

    Per image ``info``: ``sail_rounds``, ``sail_steps`` (round and Adam steps at which its latent met the threshold),
    ``sail_final_loss`` (that latent's L), ``sail_threshold`` (the threshold it met), ``sail_capped``, and
    ``unet_evals_before``: each evaluation of L takes ``2 calls x 2 branches x budget`` samples through the
    denoiser, ``4 budget`` per step evaluated; ``unet_backward_before``: the backward passes, ``4 budget`` per Adam
    step (the gradient goes back through both calls' both branches); a prompt's pool is shared out over its images (whole evaluations, the remainder to the first seeds).
    """

    families: ClassVar[tuple[str, ...]] = ("sd", "sdxl", "dit")  # eps or v models with a null condition
    RAISE_EVERY: ClassVar[int] = 3  # failed rounds per threshold raise and re-seed (pipe.py line 575)
    RAISE_BY: ClassVar[float] = 0.1  # pipe.py line 576
    SEED_RANGE: ClassVar[int] = 50000  # the new seed, randint(0, 50000) (pipe.py line 577)

    def __init__(self, threshold: float = 8.2, budget: int = 8, lr: float = 0.05, max_steps: int = 10,
                 gaussianity: float | None = None, max_rounds: int = 90, direction: str = "first",
                 pool: str = "image", v_units: str = "eps", precision: str = "float32") -> None:
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget={budget} must be an integer >= 1 (candidate latents per search)")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be an integer >= 1 (Adam steps per round)")
        if not isinstance(max_rounds, int) or max_rounds < 1:
            raise ValueError(f"max_rounds={max_rounds} must be an integer >= 1 (rounds before the search stops)")
        if not lr > 0:
            raise ValueError(f"lr={lr} must be > 0 (Adam's learning rate)")
        if not threshold >= 0:
            raise ValueError(f"threshold={threshold} must be >= 0 (the loss a latent must reach)")
        if gaussianity is not None and not gaussianity >= 0:
            raise ValueError(f"gaussianity={gaussianity} must be >= 0, or null (0.05 for eps, 0.01 for v models)")
        for key, value, allowed in (("direction", direction, ("first", "current")), ("pool", pool, ("image", "prompt")),
                                    ("v_units", v_units, ("eps", "their_code")),
                                    ("precision", precision, ("float32", "model"))):
            if value not in allowed:
                raise ValueError(f"{key}={value!r} must be one of {', '.join(allowed)}")
        self.threshold, self.budget, self.lr, self.max_steps = float(threshold), budget, float(lr), max_steps
        self.gaussianity, self.max_rounds, self.direction = gaussianity, max_rounds, direction
        self.pool, self.v_units, self.precision = pool, v_units, precision
        self.image_set: Callable[[int], Sequence[int]] | None = None  # pool=prompt: the runner sets it
        self._cache: dict[tuple, tuple[Search, list[int], list[int]]] = {}

    # -- the slot -------------------------------------------------------------------------------------------------
    def __call__(self, family: Family, latents: Tensor, start: Start, cond: Conditions, uncond: Conditions, *,
                 prompts: Sequence[str], seeds: Sequence[int]) -> tuple[Tensor, Info]:
        """Each image's x_T = ``start.sigma`` times its chosen latent, and its info (see the class docstring)."""
        shape = tuple(latents.shape[1:])
        chosen, rows = [], []
        for i, seed in enumerate(seeds):
            one = select_rows(cond, slice(i, i + 1)), select_rows(uncond, slice(i, i + 1))
            if self.pool == "image":
                search, rank, shares = self.search(family, start, *one, int(seed), 1, shape), 0, [None]
                backward_shares = [search.backward]
            else:
                image_set = [int(s) for s in (self.image_set(int(seed)) if self.image_set is not None else
                                              [s for p, s in zip(prompts, seeds) if p == prompts[i]])]
                key = (prompts[i], tuple(image_set), float(start.t), shape, str(latents.device))
                if key not in self._cache:
                    found = self.search(family, start, *one, image_set[0], len(image_set), shape)
                    self._cache[key] = found, self._shares(found.evals, len(image_set)), \
                        self._shares(found.backward, len(image_set))
                search, shares, backward_shares = self._cache[key]
                rank = image_set.index(int(seed))
            pick = search.picks[rank]
            chosen.append(pick.z)
            rows.append({"sail_rounds": pick.round, "sail_steps": pick.step, "sail_final_loss": pick.loss,
                         "sail_threshold": pick.threshold, "sail_capped": search.capped,
                         "unet_evals_before": search.evals if shares[rank] is None else shares[rank],
                         "unet_backward_before": backward_shares[rank]})
        info = {k: torch.tensor([row[k] for row in rows], device=latents.device,
                                dtype=torch.float64 if isinstance(rows[0][k], float) else None) for k in rows[0]}
        return start.sigma * torch.stack(chosen).to(latents.device), info

    # -- calibration (memguard calibrate mitigation=sail) ----------------------------------------------------------
    @torch.no_grad()
    def calibration_scores(self, family: Family, start: Start, cond: Conditions, uncond: Conditions,
                           noise: Tensor) -> Tensor:
        """``L(z)`` per image at its own unit noise ``z`` (the search's first candidate: what it keeps when ``L <=
        threshold``), ``(B,)``: the quantity the threshold cuts, scored on control prompts by ``memguard
        calibrate``."""
        z = noise.to(self.dtype(family))
        return self.loss(family, start, z, z, {k: torch.cat([uncond[k], cond[k]]) for k in cond},
                         self.coefficient(start)).float()

    # -- the search -----------------------------------------------------------------------------------------------
    def search(self, family: Family, start: Start, cond: Conditions, uncond: Conditions, seed: int, wanted: int,
               shape: tuple[int, ...]) -> Search:
        """One pool's search (their ``while True`` loop, pipe.py lines 519-580) for one condition (``cond``,
        ``uncond``: one row each) until ``wanted`` latents met the threshold or ``max_rounds`` rounds ran."""
        device, dtype = family.denoiser.device, self.dtype(family)
        conditions = {k: torch.cat([uncond[k].expand(self.budget, *uncond[k].shape[1:]),
                                    cond[k].expand(self.budget, *cond[k].shape[1:])]) for k in cond}
        gamma = self.coefficient(start)
        threshold, picks, evals, rounds, backward = self.threshold, [], 0, [], 0
        for round_ in range(1, self.max_rounds + 1):
            # 1. This round's candidates, from the current seed (the same seed for RAISE_EVERY rounds)
            generator = torch.Generator("cpu").manual_seed(seed)
            drawn = torch.randn((self.budget, *shape), generator=generator)
            next_seed = int(torch.randint(0, self.SEED_RANGE, (1,), generator=generator))
            rounds.append((threshold, seed))
            z = drawn.to(device, dtype).requires_grad_(True)
            first = z.detach().clone()
            optimizer = torch.optim.Adam([z], lr=self.lr)
            taken: set[int] = set()  # their indice_record: reset every round, while the picks are kept
            # 2. Adam steps; the threshold is checked before each step
            for step in range(self.max_steps):
                with torch.enable_grad():
                    loss = self.loss(family, start, z, first, conditions, gamma)
                evals += 4 * self.budget
                last, last_loss = z.detach().clone(), loss.detach().float()
                new = [i for i in torch.nonzero(loss.detach() <= threshold).flatten().tolist() if i not in taken]
                # a view of z, as their lat[i].detach() (line 555): later steps of the round still move it
                picks += [Pick(z[i].detach(), float(loss[i].detach()), round_, step, threshold) for i in new]
                taken.update(new)
                if new and len(picks) >= wanted:
                    return Search(picks, evals, False, rounds, backward)
                with torch.enable_grad():  # also when the caller samples under torch.no_grad()
                    (z.grad,) = torch.autograd.grad(loss.sum(), [z])
                backward += 4 * self.budget
                optimizer.step()
            # 3. A failed round: every RAISE_EVERY-th raises the threshold and re-seeds
            if round_ % self.RAISE_EVERY == 0:
                threshold, seed = threshold + self.RAISE_BY, next_seed
        # 4. Capped: the candidates of the last evaluation, lowest loss first (a NaN loss last), with the last
        # round's threshold (not a raise that no round ran with)
        order = sorted(range(self.budget), key=lambda i: (float(last_loss[i].nan_to_num(float("inf"))), i))
        while len(picks) < wanted:
            picks += [Pick(last[i], float(last_loss[i]), self.max_rounds, self.max_steps - 1, rounds[-1][0])
                      for i in order]
        return Search(picks, evals, True, rounds, backward)

    def dtype(self, family: Family) -> torch.dtype:
        """The candidates' dtype, which is also Adam's state's: float32 (or the denoiser's if wider), or with
        ``precision=model`` the denoiser's own, as theirs (``mitigate_mem.py`` l. 11: ``torch.set_default_dtype(
        torch.bfloat16)``, so ``torch.randn`` at pipe.py l. 521 draws bfloat16 candidates; on a CPU those equal the
        float32 draw rounded, which is what this takes). In bfloat16 the loss, the Gaussianity term and every Adam
        update round to 8 significant bits, so candidates move in steps of their spacing and the threshold test
        reads a rounded loss."""
        if self.precision == "model":
            return family.denoiser.dtype
        return torch.promote_types(torch.float32, family.denoiser.dtype)

    def loss(self, family: Family, start: Start, z: Tensor, first: Tensor, conditions: Conditions,
             gamma: float) -> Tensor:
        """``L(z) = ||Delta(z + u)|| + gamma ||z||`` per candidate ``(budget,)``, ``u = Delta(z') / ||Delta(z')||``
        with ``z'`` the round's first draw (``direction=first``: its value, with the gradient passed through to
        ``z`` as their stale ``lat_single`` passes it) or ``z`` itself (``current``)."""
        at = first + (z - z.detach()) if self.direction == "first" else z
        delta = self.difference(family, start, at, conditions)
        unit = delta / delta.flatten(1).norm(dim=1).view(-1, *[1] * (delta.dim() - 1))
        sharpness = self.difference(family, start, z + unit, conditions).flatten(1).norm(dim=1)
        return sharpness + gamma * z.flatten(1).norm(dim=1)

    def difference(self, family: Family, start: Start, z: Tensor, conditions: Conditions) -> Tensor:
        """``eps_c - eps_u`` at x_T = ``sigma z`` (in ``z``'s dtype: float32, or float64 for a float64 model), from
        one call on the ``[null, condition]`` batch."""
        x = torch.cat([z, z]) * start.sigma
        out = family(start.model_input(x).to(family.denoiser.dtype), start.t, conditions).to(z.dtype)
        if self.v_units == "their_code" and start.b:  # (x_in - sqrt(abar) out) / sqrt(1 - abar), pipe.py line 531
            eps = (start.model_input(x) - start.a * out) / start.b
        else:
            eps = start.eps(out, x)
        eps_u, eps_c = eps.chunk(2)
        return eps_c - eps_u

    def coefficient(self, start: Start) -> float:
        """gamma: ``gaussianity``, or theirs by prediction type (0.01 for v models, else 0.05)."""
        if self.gaussianity is not None:
            return float(self.gaussianity)
        return 0.01 if start.scheduler.config.get("prediction_type") == "v_prediction" else 0.05

    @staticmethod
    def _shares(evals: int, n: int) -> list[int]:
        """A pool's evaluations shared out over its ``n`` images: whole evaluations, the remainder to the first."""
        return [evals // n + (k < evals % n) for k in range(n)]
