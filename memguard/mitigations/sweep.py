"""A mitigation's strength knob(s) and default sweep, declared in its YAML as data (``mitigation.sweep``).

Each ``conf/mitigation/NAME.yaml`` that ``memguard compare`` may run declares::

    sweep:
      knobs:                              # config key -> values, weakest first; several keys are zipped
        mitigation.schedule.tau: [300, 500, 700, 900]
      relative: false                     # true: values are factors of the key's own (default or calibrated) value
      source: "Jain et al. Table 2 (tau 700, 600) ..."   # where the values come from: the authors' sweep, or why these

``knobs: {}`` declares a method without a strength knob (``none``, DTP): one point. A YAML without ``sweep`` is
refused by ``compare`` in one line naming the file. The node describes how to sweep the method; it does not change
what a run generates, so a run folder's settings check leaves it out (:mod:`memguard.runs.folder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memguard.errors import UserError


@dataclass(frozen=True)
class Sweep:
    """One method's sweep: ``knobs`` (key -> values, all of one length, zipped), whether the values are factors
    of the key's own value (``relative``), and the ``source`` of the values."""

    method: str
    knobs: dict[str, list[Any]]
    relative: bool
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.knobs.values()))) if self.knobs else 1

    def points(self, base: DictConfig | None = None) -> list[dict[str, Any]]:
        """The sweep's points, weakest first, each ``{key: value}`` (``{}`` for a method without a knob).
        ``relative``: each value times the key's value in ``base`` (the composed config, calibration applied)."""
        points = []
        for i in range(len(self)):
            point = {}
            for key, values in self.knobs.items():
                value = values[i]
                if self.relative:
                    if base is None or OmegaConf.select(base, key) is None:
                        raise UserError(f"mitigation={self.method}: sweep.relative needs {key} set in the config")
                    value = round(float(OmegaConf.select(base, key)) * float(value), 6)
                point[key] = value
            points.append(point)
        return points


def point_name(point: dict[str, Any]) -> str:
    """A point's folder name: ``key_leaf=value`` joined by ``,``; ``default`` for a method without a knob."""
    if not point:
        return "default"
    return ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items())


def read_sweep(method: str, node: Any, where: str | Path) -> Sweep:
    """Validate one ``sweep`` node (``where``: the file it came from, named in every error)."""
    if node is None:
        raise UserError(f"mitigation={method} declares no strength knob: add a sweep node (knobs: key -> values, "
                        f"source: where they come from) to {where}; `knobs: {{}}` for a method with none")
    node = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else dict(node)
    unknown = set(node) - {"knobs", "relative", "source"}
    if unknown:
        raise UserError(f"{where}: sweep has unknown keys {sorted(unknown)}; allowed: knobs, relative, source")
    knobs, source = node.get("knobs"), node.get("source")
    if not isinstance(knobs, dict):
        raise UserError(f"{where}: sweep.knobs must be a mapping of config key -> list of values, not {knobs!r}")
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"{where}: sweep.source must say where the values come from (a paper table, a script's "
                        "file and line, or memguard's choice and why)")
    lengths = set()
    for key, values in knobs.items():
        if not str(key).startswith(("mitigation.", "guidance.")):
            raise UserError(f"{where}: sweep knob {key!r} must be a config key under mitigation. or guidance.")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: sweep.knobs.{key} must be a non-empty list of values, not {values!r}")
        lengths.add(len(values))
    if len(lengths) > 1:
        raise UserError(f"{where}: the sweep's knobs are zipped, so their lists need one length; got "
                        f"{ {k: len(v) for k, v in knobs.items()} }")
    return Sweep(method, {str(k): list(v) for k, v in knobs.items()}, bool(node.get("relative", False)), source)


def load_sweep(method: str, conf_dir: Path) -> Sweep:
    """The sweep declared in ``conf_dir/mitigation/METHOD.yaml`` (the file as written, interpolations unresolved;
    a YAML whose defaults name another mitigation inherits that one's sweep unless it declares its own)."""
    path = conf_dir / "mitigation" / f"{method}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf_dir / "mitigation").glob("*.yaml"))
        raise UserError(f"mitigation={method} has no {path}; choose one of {', '.join(known)}")
    raw = OmegaConf.load(path)
    node = raw.get("sweep")
    if node is None:
        parents = [d for d in raw.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        if parents:
            return load_sweep(parents[0], conf_dir)
    sweep = read_sweep(method, node, path)
    for key in sweep.knobs:  # a knob must name a key the method has (or a global guidance key)
        if key.startswith("mitigation.") and not _has_key(raw, key.removeprefix("mitigation."), conf_dir):
            raise UserError(f"{path}: sweep knob {key} is not a key of mitigation={method}")
    return sweep


def _has_key(node: DictConfig, key: str, conf_dir: Path) -> bool:
    """Whether the YAML (or a mitigation it extends through its defaults) has the dotted ``key``, unresolved."""
    here: Any = OmegaConf.to_container(node, resolve=False)
    for part in key.split("."):
        here = here.get(part) if isinstance(here, dict) else None
    if here is not None:
        return True
    return any(_has_key(OmegaConf.load(conf_dir / "mitigation" / f"{parent}.yaml"), key, conf_dir)
               for parent in node.get("defaults", []) if isinstance(parent, str) and parent != "_self_")
