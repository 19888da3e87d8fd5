"""``memguard compare``: every method of ``compare.methods`` calibrated on the model at hand, swept, and ranked.

For a scenario, per method (its YAML's ``sweep``, :mod:`memguard.mitigations.sweep`; a method without one is
refused before anything runs):

1. **Prepare**: a method with a ``calibration`` node and no calibration file for this model is calibrated first
   (:mod:`memguard.calibrate`); one with a ``prepare`` node (NeMo: its neuron file) has that task run where its
   output is missing.
2. **Sweep**: each point of the sweep (``compare.points``: all, or that many spread over it) is an ordinary run
   folder, ``runs/<scenario>/compare/<method>/<knob>=<value>``, generated and evaluated by ``memguard run``'s own
   task: a rerun resumes every folder (no finished image is made again); ``shard.index``/``shard.count`` split every
   folder's images as ``run`` does, and ``memguard compare -m shard.index=0,1,2,3 shard.count=4
   hydra/launcher=...`` sends the shards to a launcher (a last plain ``memguard compare`` tabulates).
3. **Rank** (:mod:`memguard.runs.leaderboard`): per point and seed split (the first ``compare.calibration_seeds`` of
   each prompt's seeds choose, the rest report: a split frozen by seed rank), copies on the memorized prompts and
   alignment on the memorized and the control prompts, with intervals; each method's operating point under the
   alignment budget; its cost per image. Written to ``compare.output``: ``points.csv``, ``leaderboard.csv``,
   ``.md``, ``.html`` (sortable, no network) and ``tradeoff.png``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import memguard
from memguard.calibrate import calibrate
from memguard.errors import UserError
from memguard.mitigations.calibration import apply_calibration
from memguard.mitigations.sweep import Sweep, load_sweep, point_name
from memguard.runner import run
from memguard.runs.leaderboard import point_rows, write_leaderboard

log = logging.getLogger(__name__)


def compose_with(overrides: list[str]) -> DictConfig:
    """The root config under ``overrides``: inside the Hydra app (``memguard compare``) from its config repository,
    else from memguard's config folder."""
    from hydra import compose, initialize_config_dir  # start-up: as in memguard.cli
    from hydra.core.global_hydra import GlobalHydra  # start-up: as above

    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_dir(config_dir=str(memguard.CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def user_overrides() -> list[str]:
    """The command line's overrides (inside the Hydra app), less the mitigation and Hydra's own keys."""
    from hydra.core.hydra_config import HydraConfig  # start-up: as in memguard.cli

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task
            if not o.lstrip("+~").startswith(("mitigation=", "mitigation.", "hydra", "run_name=", "run_dir="))]


def pick_points(points: list[dict[str, Any]], wanted: int | None) -> list[dict[str, Any]]:
    """``wanted`` points spread evenly over the sweep (its weakest and strongest kept), or all."""
    if wanted is None or wanted >= len(points):
        return points
    if wanted < 1:
        raise UserError(f"compare.points={wanted} must be >= 1, or null for every point of each sweep")
    if wanted == 1:
        return [points[len(points) // 2]]
    return [points[round(i * (len(points) - 1) / (wanted - 1))] for i in range(wanted)]


def prepare(cfg: DictConfig, allowed: bool) -> None:
    """Calibrate the method on this model where it has a calibration node and no file (a standard-CFG score reads
    compare's own ``none`` folder); run its ``prepare`` task where that task's output is missing."""
    node = cfg.mitigation.get("calibration")
    if node is not None and not Path(str(node.file)).is_file():
        if not allowed:
            raise UserError(f"mitigation={cfg.mitigation.name} is not calibrated on this model (no {node.file}); "
                            "run memguard calibrate mitigation=NAME, or compare.calibrate=true")
        log.info("compare: calibrating mitigation=%s on this model", cfg.mitigation.name)
        calibrate(cfg, control_run=f"{cfg.scenario.name}/compare/none/{point_name({})}")
    task = cfg.mitigation.get("prepare")
    if task is not None and not Path(str(task.output)).is_file():
        module, _, function = str(task.task).rpartition(".")
        log.info("compare: %s for mitigation=%s (writes %s)", task.task, cfg.mitigation.name, task.output)
        getattr(importlib.import_module(module), function)(cfg)


def point_cost(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Seconds per image as first measured (kept in ``compare_cost.json``: a resumed folder makes nothing), and the
    denoiser's forward and backward evaluations per image."""
    path = run_dir / "compare_cost.json"
    kept = json.loads(path.read_text()) if path.is_file() else {}
    made = (metrics.get("generation") or {}).get("images_made") or 0
    if made and made >= kept.get("images_timed", 0):
        kept = {"images_timed": made, "seconds_per_image": metrics["generation"]["seconds"] / made}
        path.write_text(json.dumps(kept, indent=2) + "\n")
    return {"seconds_per_image": kept.get("seconds_per_image", math.nan),
            "forward_per_image": metrics.get("unet_evals_per_image"),
            "backward_per_image": metrics.get("unet_backward_per_image", 0.0)}


def sweep_method(method: str, sweep: Sweep, overrides: list[str], settings: DictConfig) -> list[dict[str, Any]]:
    """Every chosen point of one method: generated, evaluated, measured; rows for :mod:`memguard.runs.leaderboard`
    (none where this shard's images are done but others' are not)."""
    base = compose_with([*overrides, f"mitigation={method}"])
    prepare(base, bool(settings.calibrate))
    calibrated = base.copy()
    apply_calibration(calibrated)  # relative sweeps: factors of the value the run would take
    rows = []
    for point in pick_points(sweep.points(calibrated), settings.points):
        name = point_name(point)
        cfg = compose_with([*overrides, f"mitigation={method}", *(f"{k}={v}" for k, v in point.items()),
                            f"run_name='{base.scenario.name}/compare/{method}/{name}'"])
        metrics = run(cfg)
        if metrics.get("finished") is False:
            continue
        run_dir = Path(cfg.run_dir)
        rows += point_rows(run_dir, method, name, point, float(settings.calibration_seeds),
                           [str(g) for g in control_groups(cfg)], point_cost(run_dir, metrics))
    return rows


def control_groups(cfg: DictConfig) -> list[str]:
    """The scenario's control (non-memorized) groups, as ``memguard calibrate`` takes them."""
    negative = OmegaConf.select(cfg, "metrics.detection.negative", default=None)
    return list(negative or [cfg.control_group])


def run_compare(overrides: list[str]) -> dict[str, Any]:
    """``memguard compare`` under ``overrides``: sweeps, evaluations, the leaderboard; its summary."""
    cfg = compose_with(overrides)
    settings = cfg.compare
    methods = [str(m) for m in settings.methods]
    if not 0 < float(settings.budget) < 1:
        raise UserError(f"compare.budget={settings.budget} must lie in (0, 1): the fraction of none's control "
                        "alignment a method may lose, e.g. 0.05")
    if "none" not in methods:
        raise UserError(f"compare.methods={methods} must include none: the budget and the ranking are against it")
    sweeps = {m: load_sweep(m, memguard.CONF_DIR) for m in methods}  # every declaration checked before any run
    started, rows = time.process_time(), []
    wall = time.perf_counter()
    for method in methods:
        rows += sweep_method(method, sweeps[method], overrides, settings)
    output = Path(str(settings.output))
    done = {r["method"] for r in rows}
    if done != set(methods):
        print(f"memguard compare: this shard's images are made; {len(set(methods) - done)} method(s) wait for other "
              "shards; rerun memguard compare (no shard keys) once they finish to write the leaderboard")
        return {"finished": False}
    board = write_leaderboard(output, rows, float(settings.budget), str(cfg.scenario.name),
                              {"cpu_seconds": round(time.process_time() - started, 1),
                               "wall_seconds": round(time.perf_counter() - wall, 1)})
    print(board.markdown)
    print(f"memguard compare: {len(rows) // 2} points of {len(methods)} methods; leaderboard and curves in {output} "
          f"(open {output / 'leaderboard.html'})")
    return {"finished": True, "output": str(output), "methods": methods}


def compare(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra task: the composed ``cfg`` names the scenario; each method's config is composed from the same
    command-line overrides."""
    return run_compare(user_overrides())
