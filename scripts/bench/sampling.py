"""Sampling throughput, measured side by side in one run.

Prints images/s and UNet evaluations per image of memguard's loop under `none`, `dtp`, `og_dtp` and `stp`
(tau 500; ratios to `none`: the cost of a schedule), of every mitigation named by `--mitigations` as its
`conf/mitigation/NAME.yaml` builds it (slots included: a noise search or an embedding optimisation counts in its
time and its UNet evaluations), of `stp` and `uncond` with trajectory=off vs full (the
branch a scale of 0 or 1 leaves unused is skipped), and of memguard `none` vs diffusers'
StableDiffusionPipeline on the same components, prompts, seeds and scheduler (DPM-Solver++; ratio memguard /
diffusers). Each timed call generates a whole batch: text encoding, sampling, VAE decoding. Methods are
interleaved round by round (the order rotates) and the median over rounds is reported; UNet evaluations are
counted by a hook on the UNet (samples per call, summed), so both pipelines are counted alike; backward passes (a
slot's optimisation: SAIL's search, Wen's and Han's per-sample steps) as the slot reports them (unet_backward_before);
`+backward` is the ratio of forward plus backward passes.

    python scripts/bench/sampling.py                         # tiny random components on the CPU, 50 steps
    python scripts/bench/sampling.py --sd15 --device cuda --dtype float16 --batch 8 --steps 50
    python scripts/bench/sampling.py --family sdxl           # another family's tiny random model vs its pipeline
    python scripts/bench/sampling.py --mitigations han,sail --rounds 3   # only these mitigations beside none
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

import memguard  # noqa: F401  (import order: makes the torch stack importable)
from memguard.components import random_components, sd15_sized_random_components
from memguard.families import Family, as_family, random_family
from memguard.guidance import Constant, DynamicTransition, GuidanceSchedule, StaticTransition
from memguard.mitigations import Baselines
from memguard.sampling import generate_images

MITIGATIONS = "han,han_per_sample,sail,prss,wen_l1_per_image,rand_word,ren"  # by their YAMLs (--mitigations)

PROMPTS = ["a red circle on a blue background", "a photo of an astronaut riding a horse", "a green square",
           "an oil painting of a harbour at dusk"]


def sampler(family: Family):
    """What ``sampler=auto`` takes (``Family.sampler``): DPM-Solver++ (the paper's), or flow-matching Euler for a
    flow model, from the model's scheduler config."""
    cls = FlowMatchEulerDiscreteScheduler if family.sampler == "flow" else DPMSolverMultistepScheduler
    return cls.from_config(family.scheduler.config)


BACKWARD = [0]  # samples sent back through the denoiser by a slot's optimisation (its unet_backward_before)


def memguard_generate(c: Family, schedule: GuidanceSchedule, prompts: list[str], seeds: list[int],
                      steps: int, trajectory: str = "full", baselines: Baselines | None = None) -> torch.Tensor:
    if baselines is not None and baselines.prompt is not None:
        prompts = [baselines.prompt(p, s, c.tokenizer) for p, s in zip(prompts, seeds)]
    images, traj = generate_images(c, sampler(c), schedule, prompts, seeds, steps, baselines=baselines,
                                   trajectory=trajectory)
    BACKWARD[0] += int(traj.info.get("unet_backward_before", torch.zeros(1)).sum())
    return images


def mitigation(name: str, family: Family, overrides: list[str]) -> tuple[GuidanceSchedule, Baselines] | None:
    """``conf/mitigation/NAME.yaml``'s schedule and slots as a run builds them (None, with a line saying why, where
    the family cannot take it or it needs an input the bench does not have)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from memguard.cli import CONF_DIR
    from memguard.errors import UserError
    from memguard.runner import build_baselines, build_schedule

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"mitigation={name}", *overrides])
    GlobalHydra.instance().clear()
    try:
        return (build_schedule(cfg, family.scheduler.config.num_train_timesteps),
                build_baselines(cfg, type(family)))
    except UserError as err:
        print(f"  (skipped {name}: {err})")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd15", action="store_true", help="SD-1.5-sized random components (use a GPU)")
    parser.add_argument("--family", default="sd", help="tiny random model of this family: sd, sdxl, sd3, dit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on 2 shared cores)")
    parser.add_argument("--mitigations", default=MITIGATIONS, help="comma-separated conf/mitigation names beside the "
                        "schedules ('' for none)")
    parser.add_argument("--override", action="append", default=[], help="a config override for --mitigations, "
                        "e.g. mitigation.attention.neurons=FILE (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    if args.sd15:
        components = as_family(sd15_sized_random_components())
    else:
        components = as_family(random_components()) if args.family == "sd" else random_family(args.family)
    components.to(args.device, None if dtype == torch.float32 else dtype)
    pipe = components.pipeline(sampler(components))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    if components.name == "dit":  # class-conditional: class ids (as text for memguard, as ints for the pipeline)
        prompts = [str(i % 1000) for i in range(args.batch)]
    seeds = list(range(args.batch))
    scale = 7.5

    def diffusers_generate() -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        first = [int(p) for p in prompts] if components.name == "dit" else prompts
        return pipe(first, num_inference_steps=args.steps, guidance_scale=scale, generator=generators,
                    output_type="pt").images

    def mg(schedule: GuidanceSchedule, trajectory: str = "full"):
        return lambda: memguard_generate(components, schedule, prompts, seeds, args.steps, trajectory)

    methods = {
        "memguard none": mg(Constant(scale)),
        "memguard dtp": mg(DynamicTransition(scale)),
        "memguard og_dtp": mg(DynamicTransition(scale, scale)),
        "memguard stp": mg(StaticTransition(500, scale)),
        "memguard stp off": mg(StaticTransition(500, scale), "off"),
        "memguard uncond": mg(Constant(0.0)),
        "memguard uncond off": mg(Constant(0.0), "off"),
        "diffusers pipeline": diffusers_generate,
    }
    for name in filter(None, args.mitigations.split(",")):
        built = mitigation(name, components, args.override)
        if built is not None:
            methods[f"memguard {name}"] = lambda built=built: memguard_generate(components, built[0], prompts, seeds,
                                                                                args.steps, baselines=built[1])
    evaluations = {name: 0 for name in methods}
    backward = {name: 0 for name in methods}
    current = [""]

    def count(module: torch.nn.Module, args_: tuple) -> None:
        evaluations[current[0]] += args_[0].shape[0]

    components.denoiser.register_forward_pre_hook(count)
    synchronize = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # rotate the order each round
            method = methods[name]
            current[0] = name
            synchronize()
            start = time.perf_counter()
            before = BACKWARD[0]
            with torch.no_grad():
                method()
            backward[name] += BACKWARD[0] - before
            synchronize()
            if round_:
                seconds[name].append(time.perf_counter() - start)

    rate = {name: args.batch / statistics.median(times) for name, times in seconds.items()}
    per_image = {name: n / (args.batch * (args.rounds + 1)) for name, n in evaluations.items()}
    back = {name: n / (args.batch * (args.rounds + 1)) for name, n in backward.items()}
    kind = "sd15-sized" if args.sd15 else f"tiny {args.family}"
    print(f"device={args.device} dtype={args.dtype} components={kind} "
          f"batch={args.batch} steps={args.steps} rounds={args.rounds} threads={args.threads}")
    for name, value in rate.items():
        spread = (min(seconds[name]), max(seconds[name]))
        print(f"  {name:28s} {value:8.3f} images/s  {per_image[name]:6.1f} UNet evals/image  {back[name]:6.1f} backward"
              f"/image   (per call: median "
              f"{args.batch / value:.3f} s, min {spread[0]:.3f} s, max {spread[1]:.3f} s)")
    best = {name: args.batch / min(times) for name, times in seconds.items()}
    print("ratios                                  images/s median   best   wall time   UNet evals   +backward")
    for label, a, b in (("memguard / diffusers (none)", "memguard none", "diffusers pipeline"),
                        ("dtp / none", "memguard dtp", "memguard none"),
                        ("og_dtp / none", "memguard og_dtp", "memguard none"),
                        ("stp / none", "memguard stp", "memguard none"),
                        ("stp trajectory=off / none", "memguard stp off", "memguard none"),
                        ("stp trajectory=off / full", "memguard stp off", "memguard stp"),
                        ("uncond trajectory=off / full", "memguard uncond off", "memguard uncond"),
                        *((f"{n.removeprefix('memguard ')} / none", n, "memguard none") for n in methods
                          if n.removeprefix("memguard ") in args.mitigations.split(","))):
        print(f"  {label:36s} {rate[a] / rate[b]:15.3f} {best[a] / best[b]:7.3f} {rate[b] / rate[a]:11.3f} "
              f"{per_image[a] / per_image[b]:12.3f} {(per_image[a] + back[a]) / (per_image[b] + back[b]):11.3f}")



if __name__ == "__main__":
    main()
