"""The seeds of a run's images (``seeds``, ``images_per_prompt``, ``seed_scheme``): one seed per image, each image's
noise drawn from its own seed."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from memguard.errors import UserError

SEED_SCHEMES = ("shared", "per_prompt")
SEED_STRIDE = 1_000_000  # seed_scheme=per_prompt: prompt i's image for base seed s has seed i * SEED_STRIDE + s


@dataclass(frozen=True)
class Seeds:
    """The seeds of a run's images. ``base``: ``seeds`` or ``0 .. images_per_prompt - 1``. ``scheme``:

    - ``shared``: every prompt's images have the seeds ``base``, so prompt i and prompt j start from the same
      noises;
    - ``per_prompt``: prompt i's image for base seed s has seed ``i * 1_000_000 + s``, so no two prompts share
      an initial noise. The seed is a function of (prompt index, s) alone: images never depend on the batch
      size or the shard, a folder resumes, and more images per prompt add seeds without changing the others.

    Each image's noise is drawn from its own seed (:func:`memguard.sampling.initial_noise`)."""

    base: tuple[int, ...]
    scheme: str = "shared"

    def __len__(self) -> int:
        """Images per prompt."""
        return len(self.base)

    def of(self, prompt_idx: int) -> list[int]:
        """The seeds of prompt ``prompt_idx``'s images, in order."""
        if self.scheme == "per_prompt":
            return [prompt_idx * SEED_STRIDE + s for s in self.base]
        return list(self.base)

    def pairs(self, n_prompts: int) -> list[tuple[int, int]]:
        """Every image of ``n_prompts`` prompts as ``(prompt_idx, seed)``, prompt by prompt."""
        return [(i, s) for i in range(n_prompts) for s in self.of(i)]

    def image_set(self, seed: int) -> list[int]:
        """The seeds of the prompt whose image has seed ``seed`` (all of ``base`` where seeds are shared)."""
        return self.of(seed // SEED_STRIDE) if self.scheme == "per_prompt" else list(self.base)


def load_seeds(cfg: DictConfig) -> Seeds:
    """``seeds`` if given, else ``0 .. images_per_prompt - 1``, under ``seed_scheme`` (:class:`Seeds`)."""
    scheme = cfg.get("seed_scheme") or "shared"
    if scheme not in SEED_SCHEMES:
        raise UserError(f"seed_scheme={scheme!r} is not one of shared (every prompt gets the same seeds), per_prompt "
                        f"(prompt i's image for seed s gets seed i * {SEED_STRIDE} + s)")
    if cfg.seeds is not None:
        seeds = [int(s) for s in ([cfg.seeds] if isinstance(cfg.seeds, int) else cfg.seeds)]
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise UserError(f"seeds={seeds} must be a non-empty list of distinct integers >= 0")
        if scheme == "per_prompt" and max(seeds) >= SEED_STRIDE:
            raise UserError(f"seeds={seeds} must be below {SEED_STRIDE} with seed_scheme=per_prompt (prompt i's image "
                            f"for seed s gets seed i * {SEED_STRIDE} + s)")
        return Seeds(tuple(seeds), scheme)
    if not isinstance(cfg.images_per_prompt, int) or cfg.images_per_prompt < 1:
        raise UserError(f"images_per_prompt={cfg.images_per_prompt} must be an integer >= 1")
    if scheme == "per_prompt" and cfg.images_per_prompt > SEED_STRIDE:
        raise UserError(f"images_per_prompt={cfg.images_per_prompt} must be at most {SEED_STRIDE} with "
                        "seed_scheme=per_prompt")
    return Seeds(tuple(range(cfg.images_per_prompt)), scheme)
