"""NeMo (Hintersdorf et al., NeurIPS 2024, "Finding NeMo"): switch off, while a prompt's images are sampled, the
cross-attention value neurons that memorize it.

A value neuron is one output channel ``c`` of a cross-attention value projection ``attn2.to_v``; its activation
``v[n, j, c] = (W_v e_j)_c`` depends only on the text embedding ``e`` (``j``: token). Blocking it multiplies that
channel by ``factor`` (0: off) for every token:

    v[n, :, c] <- factor * v[n, :, c]     for c in neurons[prompt][module]

on every row of the denoiser's batch, so both CFG branches (and any extra ones) of the prompt's images, at every
step. ml-research/localizing_memorization_in_diffusion_models (commit f952ede): the hook
``hooks/block_activations.py`` l. 15 (``module_out[:, :, self.indices] *= self.factor``), registered as a forward
hook on ``attn2.to_v`` of ``down_blocks[0..2].attentions[0..1]`` and ``mid_block.attentions[0]``
(``transformer_blocks[0]``), ``utils/stable_diffusion.py`` l. 73-86; the batch it sees is ``[text, uncond]``
(l. 64) so both branches are blocked; ``--scaling_factor`` 0 (``4_generate_images.py`` l. 297). Their generation
blocks one neuron list per batch (the batch's first row's, ``4_generate_images.py`` l. 221-223; batch size 1 by
default, l. 286); here each image gets its own prompt's list.

The neurons come from a JSON file (``mitigation.attention.neurons``), written by ``memguard nemo-localize``
(:mod:`memguard.mitigations.nemo_localize`)::

    {"neurons": {"<prompt>": {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": [12, 301], ...}, ...}}

A prompt the localization found not memorized has an empty mapping (their detection writes empty lists for it,
``3_detect_memorized_neurons.py`` l. 57-68) and is sampled as without the mitigation. A prompt that is not in the
file at all is refused (``unlisted: refuse``: the file was made for other prompts) unless ``unlisted: unmasked``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memguard.errors import UserError
from memguard.mitigations import DenoiserHook, repeat_rows

KEY = "mitigation.attention.neurons"
Neurons = dict[str, list[int]]  # module name -> channel indices
VALUE_SUFFIX = "attn2.to_v"


def value_projections(denoiser: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every cross-attention value projection of the denoiser, by module name (``...attn2.to_v``)."""
    return {name: module for name, module in denoiser.named_modules()
            if name.endswith(VALUE_SUFFIX) and isinstance(module, torch.nn.Linear)}


class _ScaleChannels:
    """A forward hook: the module's output ``(N, L, C)`` times ``scale`` ``(N, C)`` (or ``(1, C)``: every row)."""

    def __init__(self, scale: Tensor) -> None:
        self.scale = scale

    def __call__(self, module: torch.nn.Module, inputs: Any, output: Tensor) -> Tensor:
        scale = self.scale
        if scale.shape[0] not in (1, output.shape[0]):
            raise RuntimeError(f"NeMo's value masks hold {scale.shape[0]} rows, the denoiser's batch has "
                               f"{output.shape[0]}")
        return output * scale.to(output.device, output.dtype)[:, None, :]


@contextmanager
def scaled_channels(denoiser: torch.nn.Module, scales: Mapping[str, Tensor]) -> Iterator[None]:
    """While the block runs, each named module's output channels are multiplied by ``scales[name]`` (rows: the
    denoiser's batch rows, or one row for all); the hooks are removed on exit, also on an error."""
    handles = []
    try:
        for name, scale in scales.items():
            handles.append(denoiser.get_submodule(name).register_forward_hook(_ScaleChannels(scale)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def channel_scale(width: int, channels: Sequence[int], factor: float, device: torch.device | str = "cpu") -> Tensor:
    """``(width,)``: ``factor`` at ``channels``, 1 elsewhere."""
    scale = torch.ones(width, device=device)
    scale[list(channels)] = factor
    return scale


def check_neurons(neurons: Mapping[str, Sequence[int]], modules: Mapping[str, torch.nn.Linear], where: str) -> None:
    """A UserError (one line, ``where`` names the key and entry) for a module that is not one of the denoiser's
    value projections, or a channel outside ``[0, out_features)``."""
    for name, channels in neurons.items():
        if name not in modules:
            shown = ", ".join(list(modules)[:3]) + (", ..." if len(modules) > 3 else "")
            raise UserError(f"{where} names module {name!r}, which is not a cross-attention value projection "
                            f"(attn2.to_v) of this denoiser ({len(modules)} of them: {shown}); the file was "
                            "made for another model: localize again with memguard nemo-localize")
        width = modules[name].out_features
        bad = [c for c in channels if not 0 <= c < width]
        if bad:
            raise UserError(f"{where}: {name} channel {bad[0]} is out of range [0, {width}) (the module has "
                            f"{width} output channels); the file was made for another model")


def read_neurons(path: str | Path, key: str = KEY) -> dict[str, Neurons]:
    """The ``neurons`` mapping of a neuron file: prompt -> module name -> sorted channel indices; a UserError
    naming ``key`` for a missing or malformed file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{key}={str(path)!r} is not a file; make it with `memguard nemo-localize` (the same "
                        "scenario and model), or give the JSON file of NeMo's neurons per prompt")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{key}={str(path)!r} is not a JSON file ({type(err).__name__}: {err})") from err
    table = data.get("neurons") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise UserError(f"{key}={str(path)!r} has no \"neurons\" object; expected "
                        '{"neurons": {"<prompt>": {"<module>": [channel, ...]}}}')
    out: dict[str, Neurons] = {}
    for prompt, modules in table.items():
        if not isinstance(modules, dict) or not all(
                isinstance(c, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in c)
                for c in modules.values()):
            raise UserError(f"{key}={str(path)!r}: the entry of prompt {prompt[:60]!r} is not a mapping of module "
                            "names to lists of channel indices (integers)")
        out[prompt] = {name: sorted(set(channels)) for name, channels in modules.items() if channels}
    return out


class NeMo(DenoiserHook):
    """``mitigation.attention`` for NeMo: per image, its prompt's memorization neurons (from the ``neurons`` file)
    times ``factor`` in every branch of the denoiser's batch, at every step (module docstring).

    ``neurons``: the JSON file; ``factor``: what a blocked channel is multiplied by (their ``--scaling_factor``,
    default 0); ``unlisted``: ``refuse`` (a prompt not in the file stops the run) or ``unmasked`` (it is sampled
    without masks).
    """

    families = ("sd", "sdxl")

    def __init__(self, neurons: str | None = None, factor: float = 0.0, unlisted: str = "refuse") -> None:
        if neurons is None:
            raise ValueError("neurons is not set; give mitigation.attention.neurons=FILE, the file memguard "
                             "nemo-localize writes")
        if unlisted not in ("refuse", "unmasked"):
            raise ValueError(f"unlisted={unlisted!r} must be refuse or unmasked")
        if math.isnan(factor):
            raise ValueError(f"factor={factor} must be a number (0 switches the neurons off)")
        self.path, self.factor, self.unlisted = str(neurons), float(factor), unlisted
        self.table = read_neurons(self.path)
        self._checked: set[int] = set()  # the denoisers every entry of the file was checked against

    def scales(self, denoiser: torch.nn.Module, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Per module that any of the prompts blocks, ``(B, C)``: ``factor`` at each image's own prompt's
        channels, 1 elsewhere (rows of prompts that block nothing there are all 1)."""
        modules = value_projections(denoiser)
        if id(denoiser) not in self._checked:
            for prompt, neurons in self.table.items():
                check_neurons(neurons, modules, f"{KEY}={self.path!r}: prompt {prompt[:60]!r}")
            self._checked.add(id(denoiser))
        rows = []
        for prompt in prompts:
            if prompt not in self.table and self.unlisted == "refuse":
                raise UserError(f"{KEY}={self.path!r} has no entry for the prompt {prompt[:80]!r}; localize this "
                                "prompt set with memguard nemo-localize, or set mitigation.attention.unlisted=unmasked "
                                "to sample unlisted prompts without masks")
            rows.append(self.table.get(prompt, {}))
        device = next(denoiser.parameters()).device
        names = sorted({name for row in rows for name in row})
        return {name: torch.stack([channel_scale(modules[name].out_features, row.get(name, ()), self.factor, device)
                                   for row in rows]) for name in names}

    def installed(self, family, prompts: Sequence[str], branches: int) -> AbstractContextManager[None]:
        """The :class:`memguard.mitigations.DenoiserHook` entry: each image's masks, repeated for the
        ``branches`` blocks of the denoiser's batch."""
        return scaled_channels(family.denoiser, {name: repeat_rows(scale, branches)
                                                 for name, scale in self.scales(family.denoiser, prompts).items()})
