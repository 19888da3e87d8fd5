"""``+protocol=authors``: a baseline under its authors' sampler and dtype (``conf/protocol/authors.yaml``).

The paper runs every row under one protocol (DPM-Solver++, 50 steps); memguard's default follows it. The
authors' own code runs their method under another sampler and dtype; ``protocol.mitigations.<name>`` names them
and :func:`apply_protocol` puts them into the run's config before anything is built, so ``config.yaml`` records
what ran. A mitigation the protocol does not list is left as it is.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

import memguard
from memguard.errors import UserError

log = logging.getLogger(__name__)


def apply_protocol(cfg: DictConfig, v_prediction: bool) -> None:
    """Replace ``cfg.sampler`` (its steps kept) and ``cfg.dtype`` by the protocol's entry for the run's
    mitigation; ``v_prediction``: the model predicts v (an entry's ``sampler_v`` then applies)."""
    protocol = cfg.get("protocol")
    if protocol is None:
        return
    entry = (protocol.get("mitigations") or {}).get(cfg.mitigation.name)
    if entry is None:
        log.info("protocol=%s lists no sampler for mitigation=%s: it keeps sampler=%s, dtype=%s", protocol.name,
                 cfg.mitigation.name, cfg.sampler.name, cfg.dtype)
        return
    name = entry.get("sampler_v") if v_prediction and entry.get("sampler_v") else entry.sampler
    file = memguard.ROOT / "conf" / "sampler" / f"{name}.yaml"
    if not file.is_file():
        raise UserError(f"protocol.mitigations.{cfg.mitigation.name}.sampler={name} is not a sampler in conf/sampler/")
    chosen = OmegaConf.load(file)
    chosen.steps = cfg.sampler.steps
    with open_dict(cfg):
        cfg.sampler = chosen
        cfg.dtype = entry.get("dtype", cfg.dtype)
    log.info("protocol=%s: mitigation=%s runs under %s, %s (%s)", protocol.name, cfg.mitigation.name, name,
             cfg.dtype, entry.get("code", "its authors' code"))
