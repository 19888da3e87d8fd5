"""Which sampler (and dtype) a run uses: ``sampler=auto`` (:func:`resolve_sampler`) and ``+protocol=authors``
(:func:`apply_protocol`), a baseline under its authors' sampler and dtype (``conf/protocol/authors.yaml``). Both
put a ``conf/sampler/NAME.yaml`` with the run's steps into ``cfg.sampler`` (:func:`sampler_node`).

The paper runs every row under one protocol (DPM-Solver++, 50 steps); memguard's default follows it. The
authors' own code runs their method under another sampler and dtype; ``protocol.mitigations.<name>`` names them
and :func:`apply_protocol` puts them into the run's config before anything is built, so ``config.yaml`` records
what ran. A mitigation the protocol does not list is left as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf, open_dict

import memguard
from memguard.errors import UserError

if TYPE_CHECKING:
    from memguard.families import Family

log = logging.getLogger(__name__)


def sampler_file(name: str) -> Path:
    return memguard.CONF_DIR / "sampler" / f"{name}.yaml"


def sampler_node(name: str, steps: int) -> DictConfig:
    """``conf/sampler/NAME.yaml`` with ``steps`` (the run's)."""
    node = OmegaConf.load(sampler_file(name))
    node.steps = steps
    return node


def resolve_sampler(cfg: DictConfig, family: type[Family]) -> None:
    """``sampler=auto``: ``cfg.sampler`` becomes the family's own sampler (``conf/sampler/<family.sampler>.yaml``:
    DPM-Solver++ for eps and v models, flow-matching Euler for flow models) with the run's ``steps`` and any
    ``scheduler`` keys given, and the choice is logged; config.yaml then records it. A named sampler is kept."""
    if cfg.sampler.name != "auto":
        return
    chosen = sampler_node(family.sampler, cfg.sampler.steps)
    extra = {k: v for k, v in OmegaConf.to_container(cfg.sampler.scheduler).items() if k != "_target_"}
    chosen.scheduler = OmegaConf.merge(chosen.scheduler, extra)
    with open_dict(cfg):
        cfg.sampler = chosen
    log.info("sampler=auto: %s (%s, %d steps), the sampler of a %s model; name another with sampler=NAME",
             chosen.name, chosen.scheduler._target_.split(".")[1], chosen.steps, family.name)


def apply_protocol(cfg: DictConfig, v_prediction: bool) -> None:
    """Replace ``cfg.sampler`` (its steps kept) and ``cfg.dtype`` by the protocol's entry for the run's
    mitigation, and merge the entry's ``mitigation`` node (e.g. an optimisation's ``noise.precision``) into
    ``cfg.mitigation``, its values winning over the run's; ``v_prediction``: the model predicts v (an entry's
    ``sampler_v`` then applies)."""
    protocol = cfg.get("protocol")
    if protocol is None:
        return
    entry = (protocol.get("mitigations") or {}).get(cfg.mitigation.name)
    if entry is None:
        log.info("protocol=%s lists no sampler for mitigation=%s: it keeps sampler=%s, dtype=%s", protocol.name,
                 cfg.mitigation.name, cfg.sampler.name, cfg.dtype)
        return
    name = entry.get("sampler_v") if v_prediction and entry.get("sampler_v") else entry.sampler
    if not sampler_file(name).is_file():
        raise UserError(f"protocol.mitigations.{cfg.mitigation.name}.sampler={name} is not a sampler in conf/sampler/")
    chosen = sampler_node(name, cfg.sampler.steps)
    with open_dict(cfg):
        cfg.sampler = chosen
        cfg.dtype = entry.get("dtype", cfg.dtype)
        if entry.get("mitigation") is not None:
            cfg.mitigation = OmegaConf.merge(cfg.mitigation, entry.mitigation)
    log.info("protocol=%s: mitigation=%s runs under %s, %s%s (%s)", protocol.name, cfg.mitigation.name, name,
             cfg.dtype, "" if entry.get("mitigation") is None else
             f", mitigation {OmegaConf.to_container(entry.mitigation)}", entry.get("code", "its authors' code"))
