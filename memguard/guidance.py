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

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from memguard.errors import UserError


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name}={value} is negative; use a guidance strength >= 0")


def _check_timestep(name: str, value: float, num_train_timesteps: int) -> None:
    if not 0 <= value <= num_train_timesteps - 1:
        raise ValueError(
            f"{name}={value} is outside the scheduler's timestep range [0, {num_train_timesteps - 1}]"
        )


class GuidanceSchedule:
    """Base class. Subclasses state their rule for ``s`` in their docstring.

    ``needs_d``: whether the scale depends on ``d`` (True unless a subclass says otherwise). A schedule that does
    not read ``d`` can be asked for its scale before the model is called (``d`` then holds NaN for the steps not
    measured), which lets ``trajectory=off`` skip a branch whose output the scale leaves unused.
    """

    needs_d = True

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        raise NotImplementedError

    def check_timesteps(self, num_train_timesteps: int) -> None:
        """Raise ValueError if a timestep parameter lies outside ``[0, num_train_timesteps - 1]``."""

    def decisions(self, d: Tensor) -> list[str | None]:
        """Per sample, what a deciding schedule chose given the whole recorded ``d``; None for the others."""
        return [None] * d.shape[0]

    @staticmethod
    def _full(d: Tensor, value: float) -> Tensor:
        return torch.full((d.shape[0],), value, dtype=torch.float32, device=d.device)


class Constant(GuidanceSchedule):
    """``s = scale`` at every step.

    ``scale = lambda`` is standard CFG (mitigation ``none``); ``scale = 0`` samples with the unconditional
    prediction only (mitigation ``uncond``), which shows the zero-guidance trajectory of ``d_t``.
    Range: ``scale >= 0``.
    """

    needs_d = False

    def __init__(self, scale: float) -> None:
        _check_non_negative("scale", scale)
        self.scale = float(scale)

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        return self._full(d, self.scale)


class StaticTransition(GuidanceSchedule):
    """Static transition point (STP, Sec. 5): ``s = -opposite`` while ``t > tau``, ``s = scale`` once ``t <= tau``.

    ``opposite = 0`` gives zero guidance before the transition (mitigation ``stp``); ``opposite = lambda_og``
    gives opposite guidance, Eq. (5), before it (``og_stp``). The paper uses ``tau = 500`` for SD 2.1
    fine-tuned on LAION-10k. ``tau`` is in the scheduler's timesteps (SD3's are ``1000 sigma``); with
    ``fraction = True`` it is a fraction of their range, ``t / num_train_timesteps`` (0.5: timestep 500, SD3's
    ``sigma = 0.5``), resolved by :meth:`check_timesteps`. Ranges: ``0 <= tau <= num_train_timesteps - 1``
    (fraction: ``0 <= tau <= 1``), ``scale >= 0``, ``opposite >= 0``.
    """

    needs_d = False

    def __init__(self, tau: float, scale: float, opposite: float = 0.0, fraction: bool = False) -> None:
        _check_non_negative("scale", scale)
        _check_non_negative("opposite", opposite)
        self.tau, self.scale, self.opposite = float(tau), float(scale), float(opposite)
        self.fraction, self._t = fraction, _fraction_or_timestep("tau", self.tau, fraction)

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        return self._full(d, self.scale if timestep <= _resolved(self._t) else -self.opposite)

    def check_timesteps(self, num_train_timesteps: int) -> None:
        if self.fraction:
            self._t = self.tau * num_train_timesteps
        else:
            _check_timestep("tau", self.tau, num_train_timesteps)


class Interval(GuidanceSchedule):
    """Guidance in a timestep interval: ``s = scale`` for ``t_lo <= t <= t_hi``, else ``s = 0``.

    Table 2 of the paper writes the interval as ``[t_hi, t_lo]``: ``[700, 0]`` and ``[600, 0]``. ``fraction =
    True``: both are fractions of the timestep range, as :class:`StaticTransition`'s ``tau``.
    Ranges: ``0 <= t_lo <= t_hi <= num_train_timesteps - 1`` (fraction: ``<= 1``), ``scale >= 0``.
    """

    needs_d = False

    def __init__(self, t_hi: float, t_lo: float, scale: float, fraction: bool = False) -> None:
        _check_non_negative("scale", scale)
        if t_lo > t_hi:
            raise ValueError(f"t_lo={t_lo} is greater than t_hi={t_hi}; the interval is [t_hi, t_lo] with t_hi >= t_lo")
        self.t_hi, self.t_lo, self.scale, self.fraction = float(t_hi), float(t_lo), float(scale), fraction
        self._hi = _fraction_or_timestep("t_hi", self.t_hi, fraction)
        self._lo = _fraction_or_timestep("t_lo", self.t_lo, fraction)

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        return self._full(d, self.scale if _resolved(self._lo) <= timestep <= _resolved(self._hi) else 0.0)

    def check_timesteps(self, num_train_timesteps: int) -> None:
        if self.fraction:
            self._hi, self._lo = self.t_hi * num_train_timesteps, self.t_lo * num_train_timesteps
        else:
            _check_timestep("t_hi", self.t_hi, num_train_timesteps)
            _check_timestep("t_lo", self.t_lo, num_train_timesteps)


class DelayedStart(GuidanceSchedule):
    """CFG from a fixed sampling step on: ``s = 0`` for steps ``k <= step``, ``s = scale`` for ``k > step``.

    Counts sampling steps (``k = 0`` is the first), not timesteps, so unlike :class:`StaticTransition` and
    :class:`Interval` the switch does not move with the sampler's timestep spacing. Han et al.'s batch-wise
    method (mitigation ``han``) delays CFG this way: the unconditional prediction alone while
    ``i <= apply_cfg_step`` (hygnhan/init_noise_diffusion_memorization ``local_sd_pipeline.py`` lines 167-171,
    commit 3a47d7a). Ranges: ``step`` an integer ``>= 0``, ``scale >= 0``.
    """

    needs_d = False

    def __init__(self, step: int, scale: float) -> None:
        _check_non_negative("scale", scale)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step} must be an integer >= 0 (the last sampling step without CFG; "
                             "0 = only the first); for CFG from the first step use mitigation=none")
        self.step, self.scale = step, float(scale)

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        return self._full(d, self.scale if step > self.step else 0.0)


def _fraction_or_timestep(name: str, value: float, fraction: bool) -> float | None:
    """The timestep itself, or None for a fraction (resolved by ``check_timesteps``), checked to lie in [0, 1]."""
    if fraction and not 0 <= value <= 1:
        raise ValueError(f"{name}={value} is outside [0, 1]; with fraction=true it is a fraction of the timestep range")
    return None if fraction else value


def _resolved(timestep: float | None) -> float:
    if timestep is None:
        raise ValueError("a fraction=true schedule needs check_timesteps(num_train_timesteps) before it is called")
    return timestep


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


def detection_score(d: Tensor, steps: int = 1) -> Tensor:
    """Wen et al.'s memorization score per sample: the mean of ``||eps_c - eps_u||_2 = sqrt(d_t)`` over the first
    ``steps`` sampling steps (``steps = 1``: the first step alone). ``d``: ``(B, >= steps)``.

    Wen et al. (ICLR 2024) record ``noise_pred_text - noise_pred_uncond`` and its per-image L2 norm at every step
    (YuxinWenRick/diffusion_memorization, local_sd_pipeline.py lines 173 and 195) and average it over steps
    ``start:end`` and the generations of a prompt (examples/det_mem_viz.ipynb, the aggregation cell). memguard
    scores each image on its own; averaging over a prompt's seeds is the same mean taken over more rows.
    """
    return d[:, :steps].clamp(min=0).sqrt().mean(dim=1)


def calibrated_threshold(path: str | None, detect_step: int) -> float:
    """The threshold ``memguard calibrate`` wrote to ``path`` (JSON), for the same ``detect_step``."""
    if path is None or not Path(path).is_file():
        raise UserError(f"mitigation.auto.threshold is not set and no calibration exists at "
                        f"mitigation.auto.calibration={path}; give mitigation.auto.threshold=X, or calibrate it: "
                        "memguard run mitigation=none (prompts not memorized), then memguard calibrate RUN_DIR --fpr 0.01")
    calibration = json.loads(Path(path).read_text())
    if calibration.get("detect_step") != detect_step:
        raise UserError(f"mitigation.auto.calibration={path} was made for detect_step={calibration.get('detect_step')}, "
                        f"not mitigation.auto.detect_step={detect_step}; calibrate again with --detect-step {detect_step}")
    return float(calibration["threshold"])


class Auto(GuidanceSchedule):
    """Detect, then mitigate, in one pass (the paper's stated limitation, Sec. 6, closed as it suggests).

    Per sample: plain CFG ``s = scale`` up to and including step ``detect_step``; there the detection score
    :func:`detection_score` over steps ``0 .. detect_step`` is compared with ``threshold``. A sample above it
    (flagged as memorized) follows ``inner`` (default ``og_dtp``'s :class:`DynamicTransition`) from step
    ``detect_step`` on; any other keeps ``s = scale``. CFG before the decision keeps the score comparable with a
    threshold calibrated on a standard-CFG run (Wen et al. detect on CFG trajectories too). With
    ``detect_step = 0`` the decision is made on the first step's ``d`` and a flagged sample is under ``inner``
    from its first step. No extra model evaluation: ``d`` is what the sampler measures anyway. Stateless: the
    decision is recomputed from the history at every call. Ranges: ``detect_step >= 0``, ``threshold >= 0``.
    """

    def __init__(self, inner: GuidanceSchedule, scale: float, threshold: float | None, detect_step: int = 0,
                 calibration: str | None = None) -> None:
        if threshold is None:
            threshold = calibrated_threshold(calibration, detect_step)
        _check_non_negative("scale", scale)
        _check_non_negative("threshold", threshold)
        if not isinstance(detect_step, int) or detect_step < 0:
            raise ValueError(f"detect_step={detect_step} must be an integer >= 0 (0 = the first step)")
        self.inner, self.scale, self.threshold, self.detect_step = inner, float(scale), float(threshold), detect_step

    def flagged(self, d: Tensor) -> Tensor:
        """Per sample, whether the score at ``detect_step`` exceeds the threshold (needs ``d`` up to it)."""
        return detection_score(d, self.detect_step + 1) > self.threshold

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        cfg = self._full(d, self.scale)
        if step < self.detect_step:
            return cfg
        return torch.where(self.flagged(d), self.inner(step, timestep, d).to(cfg.device), cfg)

    def check_timesteps(self, num_train_timesteps: int) -> None:
        self.inner.check_timesteps(num_train_timesteps)

    def decisions(self, d: Tensor) -> list[str | None]:
        if d.shape[1] <= self.detect_step:
            return [None] * d.shape[0]
        return ["mitigated" if f else "cfg" for f in self.flagged(d).tolist()]
