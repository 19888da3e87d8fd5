"""The attraction basin, measured (Jain et al., Fig. 2, 4, 13): CFG started at each of a list of steps.

For each (prompt, seed) one trajectory runs without CFG (``s = -opposite``: zero guidance, or opposite guidance
for OG) and records ``d_t``; at each start step ``k`` a branch continues from that trajectory's latents and a
copy of the scheduler as it was at step ``k``, with ``s = lambda`` from ``k`` on. The prefix is shared, never
recomputed: the cost is one trajectory plus the branches' remaining steps, against ``len(starts)`` full runs.
A branch equals an independent run of ``StaticTransition(tau=t_k)`` (tests/test_sampling.py).

DTP's switch step (:func:`memguard.guidance.dtp_switch_step`) depends only on the prefix's ``d`` (it is decided
before any CFG is applied), so DTP's image is exactly the branch started at its switch step; its ``d`` after
the switch differs from the prefix's, which no longer matters to the schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from memguard.guidance import GuidanceSchedule
from memguard.sampling import Trajectory, sample


class CfgFrom(GuidanceSchedule):
    """CFG from a sampling step: ``s = -opposite`` for steps ``k < start``, ``s = scale`` for ``k >= start``.

    The step-indexed twin of :class:`~memguard.guidance.StaticTransition`; ``start >= steps`` never applies CFG
    (the basin's shared prefix). Ranges: ``scale >= 0``, ``opposite >= 0``.
    """

    def __init__(self, start: int, scale: float, opposite: float = 0.0) -> None:
        if not (scale >= 0 and opposite >= 0):
            raise ValueError(f"scale={scale}, opposite={opposite} must be >= 0")
        self.start, self.scale, self.opposite = int(start), float(scale), float(opposite)

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        return self._full(d, self.scale if step >= self.start else -self.opposite)


@dataclass
class Branches:
    """One batch's shared prefix and its branches (start step -> trajectory), and the UNet evaluations spent
    (per image: one batched call on ``[x, x]`` per step)."""

    prefix: Trajectory
    branches: dict[int, Trajectory]
    evaluations: int


def check_starts(starts: Sequence[int], steps: int) -> list[int]:
    """``basin.starts`` must be strictly increasing steps in ``[0, steps - 1]``."""
    from memguard.errors import UserError

    starts = [int(k) for k in starts]
    if not starts or any(b <= a for a, b in zip(starts, starts[1:])) or starts[0] < 0 or starts[-1] >= steps:
        raise UserError(f"basin.starts={starts} must be a non-empty, strictly increasing list of steps in "
                        f"[0, {steps - 1}] (sampler.steps={steps}); e.g. basin.starts='[0,5,10]'")
    return starts


@torch.no_grad()
def branch(unet: torch.nn.Module, scheduler: SchedulerMixin, cond: Tensor, uncond: Tensor, noise: Tensor,
           starts: Sequence[int], steps: int, scale: float, opposite: float = 0.0) -> Branches:
    """The prefix (``s = -opposite`` throughout) and, for every start ``k``, CFG ``scale`` from step ``k``,
    continued from the prefix's latents and scheduler state at ``k``."""
    wanted, kept, calls = set(starts), {}, [0]

    def snapshot(state: dict) -> None:
        calls[0] += 1
        if state["step"] in wanted:
            kept[state["step"]] = (state["x"].clone(), copy.deepcopy(scheduler))

    prefix = sample(unet, scheduler, cond, uncond, noise, CfgFrom(steps, scale, opposite), steps, callback=snapshot)
    branches = {}
    for k in starts:
        x, state = kept[k]

        def count(_: dict) -> None:
            calls[0] += 1

        branches[k] = sample(unet, state, cond, uncond, x, CfgFrom(k, scale, opposite), steps, callback=count,
                             start=k, prefix=prefix)
    return Branches(prefix, branches, calls[0] * noise.shape[0])


def empirical_transition(starts: Sequence[int], copies: Sequence[bool]) -> int | None:
    """The first start from which this and every later start gives no copy; None if the last start copies
    (in particular if all do); ``starts[0]`` (0 by default) if none does."""
    first = None
    for k, copied in zip(starts, copies):
        if copied:
            first = None
        elif first is None:
            first = k
    return first
