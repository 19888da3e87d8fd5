"""Guidance schedules: the classifier-free guidance scale per sample and per step.

Every schedule feeds the same combination (Eq. (4) of Jain et al., CVPR 2025)::

    eps_hat = eps_u + s * (eps_c - eps_u),        d_t = ||eps_c - eps_u||_2^2  (per sample, all non-batch dims)

A schedule is called once per sampling step with the step index ``k`` (0 = first step), that step's timestep
``t`` and the history ``d[:, :k + 1]`` of the guidance magnitude of every sample up to and including step ``k``.
It returns ``s`` as a float tensor of shape ``(batch,)``. Schedules hold no state between calls: a per-sample
switch is recomputed from the history, so a schedule can never look at future steps and a batch never leaks
into another.

``lambda`` is the CFG scale (7.5 in the paper). ``opposite`` is the opposite-guidance strength ``lambda_og``
(Eq. (5)): before the transition ``s = -opposite``; ``opposite = 0`` is zero guidance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name}={value} is negative; use a guidance strength >= 0")


def _check_timestep(name: str, value: float, num_train_timesteps: int) -> None:
    if not 0 <= value <= num_train_timesteps - 1:
        raise ValueError(
            f"{name}={value} is outside the scheduler's timestep range [0, {num_train_timesteps - 1}]"
        )


class GuidanceSchedule:
    """Base class. Subclasses state their rule for ``s`` in their docstring."""

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        raise NotImplementedError

    def check_timesteps(self, num_train_timesteps: int) -> None:
        """Raise ValueError if a timestep parameter lies outside ``[0, num_train_timesteps - 1]``."""

    @staticmethod
    def _full(d: Tensor, value: float) -> Tensor:
        return torch.full((d.shape[0],), value, dtype=torch.float32, device=d.device)


class Constant(GuidanceSchedule):
    """``s = scale`` at every step.

    ``scale = lambda`` is standard CFG (mitigation ``none``); ``scale = 0`` samples with the unconditional
    prediction only (mitigation ``uncond``), which shows the zero-guidance trajectory of ``d_t``.
    Range: ``scale >= 0``.
    """

    def __init__(self, scale: float) -> None:
        _check_non_negative("scale", scale)
        self.scale = float(scale)

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        return self._full(d, self.scale)


class StaticTransition(GuidanceSchedule):
    """Static transition point (STP, Sec. 5): ``s = -opposite`` while ``t > tau``, ``s = scale`` once ``t <= tau``.

    ``opposite = 0`` gives zero guidance before the transition (mitigation ``stp``); ``opposite = lambda_og``
    gives opposite guidance, Eq. (5), before it (``og_stp``). The paper uses ``tau = 500`` for SD 2.1
    fine-tuned on LAION-10k. Ranges: ``0 <= tau <= num_train_timesteps - 1``, ``scale >= 0``, ``opposite >= 0``.
    """

    def __init__(self, tau: float, scale: float, opposite: float = 0.0) -> None:
        _check_non_negative("scale", scale)
        _check_non_negative("opposite", opposite)
        self.tau, self.scale, self.opposite = float(tau), float(scale), float(opposite)

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        return self._full(d, self.scale if timestep <= self.tau else -self.opposite)

    def check_timesteps(self, num_train_timesteps: int) -> None:
        _check_timestep("tau", self.tau, num_train_timesteps)


class Interval(GuidanceSchedule):
    """Guidance in a timestep interval: ``s = scale`` for ``t_lo <= t <= t_hi``, else ``s = 0``.

    Table 2 of the paper writes the interval as ``[t_hi, t_lo]``: ``[700, 0]`` and ``[600, 0]``.
    Ranges: ``0 <= t_lo <= t_hi <= num_train_timesteps - 1``, ``scale >= 0``.
    """

    def __init__(self, t_hi: float, t_lo: float, scale: float) -> None:
        _check_non_negative("scale", scale)
        if t_lo > t_hi:
            raise ValueError(f"t_lo={t_lo} is greater than t_hi={t_hi}; the interval is [t_hi, t_lo] with t_hi >= t_lo")
        self.t_hi, self.t_lo, self.scale = float(t_hi), float(t_lo), float(scale)

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        return self._full(d, self.scale if self.t_lo <= timestep <= self.t_hi else 0.0)

    def check_timesteps(self, num_train_timesteps: int) -> None:
        _check_timestep("t_hi", self.t_hi, num_train_timesteps)
        _check_timestep("t_lo", self.t_lo, num_train_timesteps)


def dtp_switch_step(d: Sequence[float]) -> int | None:
    """The step at which Algorithm 1 first applies CFG, or None if it never switches.

    ``d`` holds one trajectory's ``d_t`` in sampling order (index 0 = first step). Algorithm 1 starts with
    ``d_{T+2} = d_{T+1} = -inf`` and switches to ``s = lambda`` at the first step ``k`` with
    ``d[k-2] > d[k-1] < d[k]`` (strict: equal neighbours are no minimum), i.e. one step after the first local
    minimum; the switch applies to step ``k`` itself. The padding means ``k >= 2``.
    """
    for k in range(2, len(d)):
        if d[k - 2] > d[k - 1] < d[k]:
            return k
    return None


class DynamicTransition(GuidanceSchedule):
    """Dynamic transition point (DTP), Algorithm 1: per sample, ``s = -opposite`` until the first local minimum
    of ``d_t`` has been seen, then ``s = scale`` for the rest of the trajectory.

    At step ``k`` the sample has switched iff some ``j <= k`` has ``d[j-2] > d[j-1] < d[j]``; the switch
    step is :func:`dtp_switch_step`. ``opposite = 0`` is Algorithm 1 with ``v_OG = 0`` (mitigation ``dtp``);
    ``opposite = lambda`` is ``v_OG = 1`` (``og_dtp``). Ranges: ``scale >= 0``, ``opposite >= 0``.
    """

    def __init__(self, scale: float, opposite: float = 0.0) -> None:
        _check_non_negative("scale", scale)
        _check_non_negative("opposite", opposite)
        self.scale, self.opposite = float(scale), float(opposite)

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        before = self._full(d, -self.opposite)
        if d.shape[1] < 3:
            return before
        minima = (d[:, :-2] > d[:, 1:-1]) & (d[:, 1:-1] < d[:, 2:])
        return torch.where(minima.any(dim=1), self._full(d, self.scale), before)


def transition_step(scales: Sequence[float]) -> int | None:
    """The first step at which positive guidance (``s > 0``) is applied, or None if it never is.

    For ``none`` this is 0; for ``uncond`` None; for ``stp``/``og_stp`` the first step with ``t <= tau``; for
    ``interval`` the first step inside the interval; for ``dtp``/``og_dtp`` the switch step of Algorithm 1.
    """
    return next((k for k, s in enumerate(scales) if s > 0), None)
