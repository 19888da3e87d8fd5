"""Model families: what memguard's one sampling loop needs from a kind of diffusers model, one small adapter each.

An adapter (:class:`Family`) says three things and nothing else:

1. how to encode the condition and the null condition (:meth:`Family.encode`, :meth:`Family.null`), as
   :data:`Conditions`, named batch-first tensors the denoiser takes as keyword arguments;
2. how to call the denoiser on a batch (:meth:`Family.__call__`; the loop calls it once per step on ``[x, x]``
   with the null and the real condition joined by :func:`join`);
3. how its output is expressed in eps units (:meth:`Family.eps_coefficients`: ``eps = a_k out + b_k x_k`` per
   step, so ``eps_c - eps_u = a_k (out_c - out_u)`` and ``d_t = a_k^2 ||out_c - out_u||^2``).

=========  =====================================  ===============================  ===========================
family     ``model_index.json`` ``_class_name``    condition / null condition       model output, eps units
=========  =====================================  ===============================  ===========================
``sd``     ``StableDiffusionPipeline``             CLIP embedding / of ``""``       eps; v: ``a = sqrt(abar_t)``
``sdxl``   ``StableDiffusionXLPipeline``           two CLIP encoders, pooled        as ``sd``
                                                   embedding, ``add_time_ids`` /
                                                   zeros (``force_zeros_for_
                                                   empty_prompt``) or of ``""``
``sd3``    ``StableDiffusion3Pipeline``            CLIP x2 + T5 / of ``""``          velocity: ``a = 1 - sigma``
``dit``    ``DiTPipeline``                         class id / the null class        eps (learned variance
                                                   (``num_embeds_ada_norm``)         channels dropped)
=========  =====================================  ===============================  ===========================

The family of a model folder is read from its ``model_index.json`` (:func:`family_name`), overridable by
``model.family``. A new family is one module here with one :class:`Family` subclass, and one entry in
:data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
import json
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from memguard.errors import UserError

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

Conditions = dict[str, Tensor]  # keyword arguments of the denoiser, each batch-first: one row per sample

# family name -> (module, class); the pipeline class each family reproduces is the class's ``pipeline_class``
FAMILIES = {"sd": ("memguard.families.sd", "SD"), "sdxl": ("memguard.families.sdxl", "SDXL"),
            "sd3": ("memguard.families.sd3", "SD3"), "dit": ("memguard.families.dit", "DiT")}


def join(uncond: Conditions, cond: Conditions, *extra: Conditions) -> Conditions:
    """The batch ``[null, condition]`` for one denoiser call on ``[x, x]`` (null first, as diffusers' pipelines),
    followed by any ``extra`` branches' conditions (:class:`memguard.mitigations.Branches`)."""
    return {key: torch.cat([uncond[key], cond[key], *(e[key] for e in extra)]) for key in cond}


class Family:
    """A model family's adapter: its networks and scheduler, and the three things the sampling loop asks of it.

    Subclasses set the class attributes and implement :meth:`encode`, :meth:`null`, :meth:`__call__`,
    :meth:`pipeline`, :meth:`random`; :meth:`eps_coefficients` defaults to the scheduler's prediction type
    (``epsilon`` or ``v_prediction``).
    """

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # diffusers pipeline class, as ``_class_name`` in model_index.json
    subfolders: ClassVar[tuple[str, ...]]  # model_index.json entries the family needs (may be null: optional)
    optional: ClassVar[tuple[str, ...]] = ()  # entries of ``subfolders`` that may be null
    sampler: ClassVar[str] = "dpm"  # what sampler=auto chooses (conf/sampler/NAME.yaml): the paper's DPM-Solver++
    text: ClassVar[bool] = True  # prompts are text: prompt and embedding baselines apply
    cross_attention: ClassVar[bool] = False  # the denoiser has attn2 cross-attention: Ren et al.'s baseline applies

    denoiser: torch.nn.Module  # UNet or transformer
    vae: Any  # AutoencoderKL, or None for a pixel-space model
    scheduler: SchedulerMixin  # the model folder's own scheduler
    tokenizer: Any = None  # the first CLIP tokenizer (prompt baselines, Ren et al.'s token lengths); None: no text

    # -- the three things the loop needs ------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], size: int | None = None) -> Conditions:
        """The condition for each prompt, as the family's diffusers pipeline encodes it, for images ``size``
        pixels square (default: the model's own; SDXL's ``add_time_ids`` hold the image size)."""
        raise NotImplementedError

    def null(self, n: int, size: int | None = None) -> Conditions:
        """The null condition for ``n`` samples (the unconditional branch of CFG)."""
        raise NotImplementedError

    def __call__(self, x: Tensor, t: Tensor, conditions: Conditions) -> Tensor:
        """The denoiser's raw output on ``x`` (the scheduler-scaled model input) at timestep ``t`` (a 0-d tensor
        from ``scheduler.timesteps``), in the shape of ``x``."""
        raise NotImplementedError

    def eps_coefficients(self, scheduler: SchedulerMixin) -> tuple[list[float], list[float]]:
        """Per step of ``scheduler.timesteps`` (set), ``(a_k, b_k)`` with ``eps = a_k out + b_k x_k``.

        ``epsilon``: ``a = 1, b = 0``. ``v_prediction`` (``v = sqrt(abar) eps - sqrt(1 - abar) x0`` with
        ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``): ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``, as
        diffusers' DDIM converts it, so ``a = sqrt(abar_t), b = sqrt(1 - abar_t)`` (``x``: the scaled model input,
        the variance-preserving ``x_t``).
        """
        prediction = scheduler.config.get("prediction_type", "epsilon")
        steps = len(scheduler.timesteps)
        if prediction == "epsilon":
            return [1.0] * steps, [0.0] * steps
        if prediction == "v_prediction":
            abar = [float(scheduler.alphas_cumprod[int(t)]) for t in scheduler.timesteps.cpu()]
            return [a ** 0.5 for a in abar], [(1 - a) ** 0.5 for a in abar]
        raise UserError(f"sampler.scheduler: prediction_type={prediction!r} is not supported by memguard "
                        "(epsilon or v_prediction; flow-matching models use the sd3 family)")

    # -- shapes, devices ----------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale_factor

    @property
    def networks(self) -> list[torch.nn.Module]:
        return [m for m in vars(self).values() if isinstance(m, torch.nn.Module)]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Family:
        for module in self.networks:
            module.to(device) if dtype is None else module.to(device, dtype)
        return self

    @classmethod
    def check_scheduler(cls, scheduler: SchedulerMixin) -> None:
        """Raise a UserError if ``scheduler`` cannot sample this family (a flow-matching scheduler on an eps/v
        model, or the reverse)."""
        if _flow_matching(scheduler):
            raise UserError(f"sampler: {type(scheduler).__name__} is a flow-matching scheduler; a {cls.name} model "
                            "predicts eps or v: use sampler=dpm, ddim, euler or pndm")

    @classmethod
    def check_baselines(cls, baselines: Any, mitigation: str) -> None:
        """Refuse baselines that need what this family lacks: text (``mitigation.prompt``, ``.embedding``: sd, sdxl,
        sd3) or attn2 cross-attention (``mitigation.attention``, Ren et al.'s: sd, sdxl). ``baselines``: a
        :class:`memguard.mitigations.Baselines` (a higher layer, so read by its slots' names, not imported)."""
        needs_text = [key for key in ("prompt", "embedding") if getattr(baselines, key) is not None]
        if needs_text and not cls.text:
            raise UserError(f"mitigation={mitigation} changes the text prompt (mitigation.{needs_text[0]}), but a "
                            f"{cls.name} model is class-conditional; use a guidance schedule "
                            "(none, stp, dtp, og_dtp, ...)")
        if baselines.attention is not None and not cls.cross_attention:
            raise UserError(f"mitigation={mitigation} edits the denoiser's text cross-attention "
                            f"(mitigation.attention), which a {cls.name} model does not have ({'joint attention' if cls.text else 'no text'}); "
                            f"it runs on the {' and '.join(baselines.attention.families or ('sd', 'sdxl'))} families")
        for key in vars(baselines):
            served = getattr(getattr(baselines, key), "families", None)
            if served is not None and cls.name not in served:
                raise UserError(f"mitigation={mitigation}: mitigation.{key} serves the {', '.join(served)} "
                                f"famil{'ies' if len(served) > 1 else 'y'}, not {cls.name}; choose another mitigation")
        hook = baselines.attention
        if getattr(hook, "blocks_branches", False) and baselines.branches is not None:
            raise UserError(f"mitigation={mitigation}: mitigation.attention edits a two-branch batch and cannot be "
                            "combined with mitigation.branches; drop one of them")

    # -- the family's diffusers pipeline, random and saved folders ------------------------------------------------
    def pipeline(self, scheduler: SchedulerMixin | None = None) -> Any:
        """The family's own diffusers pipeline on these components (and ``scheduler``, default the model's)."""
        raise NotImplementedError

    @classmethod
    def random(cls, seed: int = 0) -> Family:
        """A tiny random-weight model of this family, built from configs as diffusers' own tests build one."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype = torch.float32) -> Family:
        """Load a diffusers folder of this family (through its pipeline class's ``from_pretrained``)."""
        raise NotImplementedError

    def save(self, folder: str | Path) -> Path:
        """Write a diffusers folder that :func:`load_family` and the family's diffusers pipeline both read."""
        self.pipeline().save_pretrained(folder)
        return Path(folder)


def null_entries(folder: Path) -> dict[str, None]:
    """The ``model_index.json`` entries that are null (``[null, null]``, e.g. SD3's ``text_encoder_3`` without T5),
    as keyword arguments ``{name: None}``: a pipeline's ``from_pretrained`` refuses such a folder unless each is
    passed as None explicitly (diffusers 0.42 ``DiffusionPipeline.from_pretrained``)."""
    index = read_model_index(folder)
    return {k: None for k, v in index.items() if not k.startswith("_") and v in (None, [None, None])}


def _flow_matching(scheduler: SchedulerMixin) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


def _family_class(name: str) -> type[Family]:
    module, cls = FAMILIES[name]
    return getattr(importlib.import_module(module), cls)


def read_model_index(folder: str | Path, key: str = "model.path") -> dict[str, Any]:
    """The folder's ``model_index.json``, or a UserError naming ``key``."""
    path = Path(folder).expanduser() / "model_index.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{key}={str(folder)!r}: model_index.json cannot be read ({type(err).__name__}); a diffusers "
                        "model folder holds model_index.json (as written by the pipeline's save_pretrained)") from err


def family_name(folder: str | Path, override: str | None = None, key: str = "model.path") -> str:
    """The family of a model folder: ``override`` (``model.family``) if given, else the family whose pipeline class
    is ``model_index.json``'s ``_class_name``. A folder whose entries belong to another family (mixed) is refused."""
    index = read_model_index(folder, key)
    by_pipeline = {_family_class(n).pipeline_class: n for n in FAMILIES}
    if override is not None and override not in FAMILIES:
        raise UserError(f"model.family={override!r} is not a model family; use one of {', '.join(FAMILIES)} "
                        "(or leave it null: read from model_index.json)")
    name = override or by_pipeline.get(index.get("_class_name"))
    if name is None:
        raise UserError(f"{key}={str(folder)!r}: model_index.json names _class_name={index.get('_class_name')!r}, "
                        f"not one of memguard's families ({', '.join(f'{n}: {p}' for p, n in by_pipeline.items())}); "
                        "set model.family=NAME if the folder is laid out as one of them")
    family = _family_class(name)
    entries = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    known = set(family.subfolders) | {"safety_checker", "feature_extractor", "image_encoder"}
    foreign = sorted(entries - known)
    missing = sorted(s for s in family.subfolders
                     if s not in family.optional and not (s == "vae" and index.get("vae") in (None, [None, None]))
                     and (index.get(s) in (None, [None, None])))
    if foreign or missing:
        problem = f"lists {', '.join(foreign)}" if foreign else f"lacks {', '.join(missing)}"
        raise UserError(f"{key}={str(folder)!r}: model_index.json {problem}, which a {name} model "
                        f"({family.pipeline_class}) does not{' have' if foreign else ' do without'} (a mixed or "
                        f"incomplete folder); set model.family to the folder's own family, or fix the folder")
    return name


def family_class(folder: str | Path, override: str | None = None, key: str = "model.path") -> type[Family]:
    """The :class:`Family` subclass of a model folder (see :func:`family_name`)."""
    return _family_class(family_name(folder, override, key))


def load_family(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                family: str | None = None, key: str = "model.path") -> Family:
    """Load a local diffusers model folder as its family's adapter, on ``device``; nothing is downloaded."""
    # start-up: diffusers loads where a network is built or loaded, not where a folder is only read
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging  # start-up: as above

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{key}={str(path)!r} is not a folder; give a local diffusers model folder "
                        "(model_index.json and its subfolders)")
    cls = family_class(folder, family, key)
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    adapter = cls.load(folder, dtype)
    for module in adapter.networks:
        module.requires_grad_(False).eval()
    return adapter.to(device)  # loaded in dtype (the SDXL VAE kept float32 where it must be)


def random_family(name: str, seed: int = 0) -> Family:
    """A tiny random-weight model of family ``name`` (``sd``, ``sdxl``, ``sd3``, ``dit``)."""
    if name not in FAMILIES:
        raise UserError(f"--family {name!r} is not a model family; use one of {', '.join(FAMILIES)}")
    adapter = _family_class(name).random(seed)
    for module in adapter.networks:
        module.requires_grad_(False).eval()
    return adapter


def as_family(model: Any) -> Family:
    """``model`` if it is a :class:`Family`; SD components (:class:`~memguard.components.Components`) as the sd
    family."""
    if isinstance(model, Family):
        return model
    return _family_class("sd")(model)
