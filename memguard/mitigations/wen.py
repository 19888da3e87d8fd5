"""Wen et al. (ICLR 2024), "Detecting, Explaining, and Mitigating Memorization in Diffusion Models": the
inference-time mitigation that optimises the prompt's text embedding before sampling (``mitigation.embedding``;
``conf/mitigation/wen_l1.yaml``, ``wen_l3.yaml`` share one embedding per prompt as their code does,
``wen_l*_per_image.yaml`` optimise each image alone)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from memguard.mitigations import masked_step, select_rows


class WenEmbeddingOptimization:
    """Wen et al. (ICLR 2024), inference-time mitigation: before sampling, at the first timestep T and the initial
    latents x_T, minimise per image

        L(e_p) = || eps(x_T, T, e_p) - eps(x_T, T, e_empty) ||_2

    (``eps``: the denoiser's raw output, as Wen et al.'s code takes it) over the prompt's text embedding e_p with
    AdamW (``lr``), until L <= ``l_target`` or ``max_iters`` iterations; sampling then uses the optimised
    embedding. The start token's gradient is zeroed, as in Wen et al.'s code (see :class:`WenSharedEmbedding`).
    Each image stops on its own (an image that reached its target is frozen), so results do not depend on batch
    size. Returns per image the iterations used, the first and
    final L, whether the target was reached, and ``unet_evals_before``: its forward passes, ``iterations + 1``
    conditional and 1 unconditional (what the image costs alone: a batch also evaluates its finished images until
    its last one stops; its backward passes, one per iteration, are ``unet_backward_before``).

    ``L = sqrt(d_T)`` (the paper's d at the first step) holds for eps-prediction models only: on a v or flow model
    the raw outputs differ from eps by the step's coefficient ``a_T``
    (:meth:`memguard.families.Family.eps_coefficients`), so ``L = sqrt(d_T) / |a_T|`` and ``l_target`` is in the
    model's own output units.
    """

    def __init__(self, l_target: float, lr: float = 0.05, max_iters: int = 10) -> None:
        if l_target <= 0 or lr <= 0 or max_iters < 0:
            raise ValueError(f"l_target={l_target}, lr={lr} must be > 0 and max_iters={max_iters} >= 0")
        self.l_target, self.lr, self.max_iters = l_target, lr, max_iters

    def __call__(self, model: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], x_in: Tensor, t: Tensor,
                 cond: dict[str, Tensor], uncond: dict[str, Tensor], **_: object) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``model(x, t, conditions)``: a family adapter (:mod:`memguard.families`); the prompt embedding optimised
        is ``cond["encoder_hidden_states"]`` (for SDXL and SD3 the token embeddings; their pooled embeddings stay
        as encoded)."""
        with torch.no_grad():
            eps_u = model(x_in, t, uncond)
        embedding = cond["encoder_hidden_states"].detach().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([embedding], lr=self.lr)
        active = torch.ones(len(embedding), dtype=torch.bool, device=embedding.device)
        iterations = torch.zeros(len(embedding), dtype=torch.long, device=embedding.device)
        first = final = None
        for k in range(self.max_iters + 1):
            with torch.enable_grad():
                out = model(x_in, t, {**cond, "encoder_hidden_states": embedding})
                norms = (out - eps_u).float().flatten(1).norm(dim=1)
            current = norms.detach()
            first = current.clone() if first is None else first
            final = current.clone() if final is None else torch.where(active, current, final)
            active &= current > self.l_target
            if k == self.max_iters or not active.any():
                break
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():  # also when the caller samples under torch.no_grad()
                (norms * active).sum().backward()
            embedding.grad[:, 0] = 0  # the start token is not optimised (as WenSharedEmbedding)
            masked_step(optimizer, embedding, active)
            iterations += active
        info = {"wen_iterations": iterations, "wen_first_norm": first, "wen_final_norm": final,
                "wen_reached_target": final <= self.l_target, "unet_evals_before": iterations + 2,
                "unet_backward_before": iterations.clone()}  # one backward pass through the conditional call per step
        return {**cond, "encoder_hidden_states": embedding.detach()}, info


class WenSharedEmbedding:
    """Wen et al. (ICLR 2024) as their code runs it: ONE text embedding per prompt, shared by the prompt's whole
    image set (all the prompt's seeds), optimised with AdamW (``lr``) on one L2 norm over the set,

        L(e_p) = || stack_i [eps(x_T^i, T, e_p) - eps(x_T^i, T, e_empty)] ||_2,

    stopping (the whole set together) once L <= ``l_target`` or after ``max_iters`` steps; the start token's
    gradient is zeroed. YuxinWenRick/diffusion_memorization ``local_sd_pipeline.py`` (commit c8fe471): one
    embedding repeated over ``num_images_per_prompt`` (lines 556 and 598-605), ``torch.norm(noise_pred_text,
    p=2)`` over the stacked set (line 618), the stop check before each step (lines 640-644),
    ``grad[:, [0]] * 0`` (lines 649-651).
    As there, AdamW's decoupled weight decay (its default 0.01) still acts on the start token.

    The set's initial latents are drawn again from the image's set of seeds, ``image_set(seed)`` (the runner
    sets it: every seed of the run, or under ``seed_scheme=per_prompt`` the prompt's own; without it, the
    batch's seeds), so the embedding does not depend on which batch an image lands in; it is computed once per
    prompt and cached.
    Returns, per image, its set's iterations, first and final L, whether the target was reached, and
    ``unet_evals_before``: the set's forward passes per image, ``iterations + 2`` (``N`` null and ``N (iterations
    + 1)`` conditional evaluations shared by its ``N`` images; its backward passes, ``iterations`` per image, ``unet_backward_before``).
    """

    def __init__(self, l_target: float, lr: float = 0.05, max_iters: int = 10) -> None:
        if l_target <= 0 or lr <= 0 or max_iters < 0:
            raise ValueError(f"l_target={l_target}, lr={lr} must be > 0 and max_iters={max_iters} >= 0")
        self.l_target, self.lr, self.max_iters = l_target, lr, max_iters
        self.image_set: Callable[[int], Sequence[int]] | None = None
        self._cache: dict[tuple, tuple[Tensor, dict[str, float]]] = {}

    def __call__(self, model: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], x_in: Tensor, t: Tensor,
                 cond: dict[str, Tensor], uncond: dict[str, Tensor], prompts: Sequence[str] = (),
                 seeds: Sequence[int] = (), model_input: Callable[[Sequence[int]], Tensor] | None = None,
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``model(x, t, conditions)``: a family adapter (:mod:`memguard.families`), whose
        ``cond["encoder_hidden_states"]`` is optimised (SDXL's and SD3's pooled embeddings stay as encoded);
        ``model_input(seeds)``: the first step's scaled model input for those seeds (as ``x_in`` is drawn)."""
        embeddings = cond["encoder_hidden_states"]
        if model_input is None or len(prompts) != len(embeddings) or len(seeds) != len(prompts):
            raise ValueError("WenSharedEmbedding needs the batch's prompts, their seeds and a model_input(seeds) "
                             "function")
        rows, infos = [], []
        for i, prompt in enumerate(prompts):
            image_set = list(self.image_set(seeds[i]) if self.image_set is not None else seeds)
            key = (prompt, tuple(image_set), float(t), tuple(x_in.shape[1:]))
            if key not in self._cache:
                one = select_rows(cond, slice(i, i + 1)), select_rows(uncond, slice(i, i + 1))
                self._cache[key] = self.optimise(model, model_input(image_set), t, *one)
            rows.append(self._cache[key][0])
            infos.append(self._cache[key][1])
        info = {k: torch.tensor([row[k] for row in infos], device=embeddings.device) for k in infos[0]}
        return {**cond, "encoder_hidden_states": torch.cat(rows).to(embeddings.dtype)}, info

    def optimise(self, model: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], x_set: Tensor, t: Tensor,
                 cond: dict[str, Tensor], uncond: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """One prompt's shared embedding ``(1, L, D)`` for the set's model inputs ``x_set`` ``(N, C, h, w)``
        (``cond``, ``uncond``: that prompt's conditions, one row each)."""
        n = len(x_set)
        repeat = lambda conditions: {k: v.expand(n, *v.shape[1:]) for k, v in conditions.items()}
        with torch.no_grad():
            eps_u = model(x_set, t, repeat(uncond))
        embedding = cond["encoder_hidden_states"].detach().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([embedding], lr=self.lr)
        first = current = None
        iterations = 0
        for k in range(self.max_iters + 1):
            with torch.enable_grad():
                eps_c = model(x_set, t, repeat({**cond, "encoder_hidden_states": embedding}))
                loss = (eps_c - eps_u).float().norm(p=2)
            current = float(loss.detach())
            first = current if first is None else first
            if k == self.max_iters or current <= self.l_target:
                break
            optimizer.zero_grad(set_to_none=True)
            (grad,) = torch.autograd.grad(loss, [embedding])
            grad[:, 0] = 0
            embedding.grad = grad
            optimizer.step()
            iterations += 1
        info = {"wen_iterations": iterations, "wen_first_norm": first, "wen_final_norm": current,
                "wen_reached_target": current <= self.l_target,
                "unet_evals_before": iterations + 2,  # the set's forward passes, N (iterations + 2), per image
                "unet_backward_before": iterations}  # and its backward passes, N iterations, per image
        return embedding.detach(), info
