"""Mean zero-guidance d_t per step on each family's tiny random model: the units, not memorization.

    python scripts/probes/family_dt.py --steps 20

Random weights say nothing about memorization; this shows what d_t (eps units) and d_raw (the model's own
units) look like per family, e.g. SD3's (1 - sigma)^2 factor.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

import memguard  # noqa: F401
from memguard.families import FAMILIES, random_family
from memguard.guidance import Constant
from memguard.sampling import generate_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in FAMILIES:
        family = random_family(name)
        cls = FlowMatchEulerDiscreteScheduler if name == "sd3" else DPMSolverMultistepScheduler
        prompts = ["17", "417"] if name == "dit" else ["a red circle", "a photo of an astronaut riding a horse"]
        _, traj = generate_images(family, cls.from_config(family.scheduler.config), Constant(0.0), prompts, [0, 1],
                                  args.steps)
        print(f"{name:5s} d_t:   " + " ".join(f"{v:.3g}" for v in traj.d.mean(0).tolist()))
        print(f"{'':5s} d_raw: " + " ".join(f"{v:.3g}" for v in traj.d_raw.mean(0).tolist()))


if __name__ == "__main__":
    main()
