"""``memguard check``: every input a scenario needs, checked cheaply and reported all at once.

Run on its own (``memguard check scenario=webster500 metrics=paper``) and at the start of every ``memguard
run``, before the run folder is touched. It checks, without the network and without running a network:

- ``model.path``: the folder, ``model_index.json`` and each component's config and weights file (a
  safetensors header or a torch zip archive opens; no tensor is read);
- the prompts: count, duplicates, blank lines, prompts longer than 77 CLIP tokens (the text encoder truncates
  them), the seeds;
- ``references`` (when the run evaluates against them): the folder, its image count, each prompt's own
  subfolder (``references_per_prompt``), files whose header PIL cannot read (``Image.open`` without decoding);
- each metric's weights (``metrics.<stage>.path`` and any other ``*_path`` of the stage): a file whose archive
  opens, or a transformers folder (``config.json`` and a weights file that opens);
- free disk under ``run_dir`` for the images still to make.

Problems stop with one ``memguard: error:`` listing every one (each line: the key, what is wrong, the fix);
warnings (duplicates, truncated prompts, blank lines) are printed and do not stop.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors import safe_open

from memguard.components import (FOLDER_HELP, SUBFOLDERS, _pixel_space, check_model_folder, clip_tokenizer,
                                 load_tokenizer)
from memguard.errors import UserError
from memguard.evaluate import STAGES, reference_files
from memguard.families import family_class, read_model_index
from memguard.families.dit import class_id, labels_of
from memguard.fetch import manifest
from memguard.fetch.images import REPORT
from memguard.fetch.sources import destination, nodes, prose
from memguard.metrics.alignment import OPEN_CLIP_HELP
from memguard.metrics.fid import INCEPTION_HELP
from memguard.metrics.similarity import SSCD_URL
from memguard.mitigations.calibration import read_calibration
from memguard.runs.prompts import load_prompts
from memguard.runs.seeds import load_seeds

log = logging.getLogger(__name__)
CLIP_TOKENS = 77
# component -> (config file, accepted weights files; any one of them)
COMPONENT_FILES = {
    "unet": ("config.json", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                             "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.fp16.safetensors")),
    "vae": ("config.json", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                            "diffusion_pytorch_model.fp16.safetensors")),
    "text_encoder": ("config.json", ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                                     "model.fp16.safetensors")),
    "tokenizer": ("tokenizer_config.json", ("vocab.json", "tokenizer.json")),
    "scheduler": ("scheduler_config.json", ()),
}
# the other families' components (memguard/families): SDXL's and SD3's extra encoders, SD3's and DiT's transformer
COMPONENT_FILES |= {"transformer": COMPONENT_FILES["unet"], "text_encoder_2": COMPONENT_FILES["text_encoder"],
                    "text_encoder_3": COMPONENT_FILES["text_encoder"], "tokenizer_2": COMPONENT_FILES["tokenizer"],
                    "tokenizer_3": ("tokenizer_config.json", ("tokenizer.json", "spiece.model"))}


@dataclass
class Report:
    """What the check found: ``problems`` stop a run, ``warnings`` do not, ``notes`` say what was seen."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def error(self) -> UserError:
        if len(self.problems) == 1:  # one problem: one line, as every other user error
            return UserError(self.problems[0])
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return UserError(f"{len(self.problems)} input(s) missing or wrong (nothing was generated):\n{lines}")


# ---------------------------------------------------------------------------------------------------------------
# Files


def source(cfg: DictConfig, key: str) -> str:
    """``; get it: ...`` from the config's ``sources.<key>`` node (where that input comes from, and that ``memguard
    fetch`` fetches it), or nothing."""
    return prose(cfg, key)


def archive_problem(path: Path) -> str | None:
    """None if the weights file's container opens (safetensors header, torch zip archive, TorchScript
    archive, or a small legacy torch pickle that loads), else what is wrong. Reads no tensor data. Opened once per
    process while the file is unchanged (its size and modification time): a sweep's runs check the same model, whose
    tokenizer.json alone is 3.6 MB of JSON."""
    try:
        stat = path.stat()
    except OSError as err:
        return f"cannot be opened ({type(err).__name__}: {err.strerror})"
    return _archive_problem(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _archive_problem(name: str, size: int, mtime_ns: int) -> str | None:
    """:func:`archive_problem` of the file ``name`` as it is when its size and modification time are these."""
    path = Path(name)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                return None if list(f.keys()) else "holds no tensors"
        if path.name.endswith(".index.json"):
            json.loads(path.read_text())
            return None
        if path.suffix == ".json":
            json.loads(path.read_text())
            return None
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            return None if any(n.endswith("data.pkl") for n in names) else "is a zip file but not a torch archive"
        if path.stat().st_size < 512 * 2**20:  # an old-style torch pickle: small enough to load
            import torch  # start-up: torch loads only to open a legacy weights pickle

            torch.load(path, map_location="cpu", weights_only=True)
            return None
        return None
    except Exception as err:  # noqa: BLE001  (any failure to open means: not a usable weights file)
        return f"cannot be opened ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"


def check_model(cfg: DictConfig, report: Report) -> Path | None:
    """``model.path`` and each component's files; the folder if it is usable."""
    if OmegaConf.is_missing(cfg.model, "path"):
        report.problems.append(f"model.path is not set; give model.path=DIR, where {FOLDER_HELP}")
        return None
    folder, family = Path(cfg.model.path).expanduser(), None
    try:
        if (folder / "model_index.json").is_file():
            family = family_class(folder, cfg.model.get("family"))
        if family is None or family.name == "sd":
            check_model_folder(cfg.model.path)  # the folder and its subfolders, as the loader words it
    except UserError as err:
        report.problems.append(f"{err}{source(cfg, 'model')}")
        return None
    wrong = []
    components = SUBFOLDERS  # an sd folder's, where no index says more
    if family is None:
        wrong.append("model_index.json is missing")
    else:
        index = read_model_index(folder)
        components = tuple(c for c in family.subfolders if index.get(c) not in (None, [None, None]))
    for component in components:
        config, weights = COMPONENT_FILES[component]
        if component == "vae" and _pixel_space(folder):
            continue
        sub = folder / component
        if not sub.is_dir():  # only another family's folder gets here: check_model_folder has checked an sd one
            wrong.append(f"{component}/ is missing")
            continue
        if not (sub / config).is_file():
            wrong.append(f"{component}/{config} is missing")
        if weights:
            present = [sub / w for w in weights if (sub / w).is_file()]
            if not present:
                wrong.append(f"{component}/ has none of {', '.join(weights)}")
            elif (problem := archive_problem(present[0])) is not None:
                wrong.append(f"{component}/{present[0].name} {problem}")
    if wrong:
        fix = FOLDER_HELP if family is None or family.name == "sd" else \
            f"a {family.name} folder is written by {family.pipeline_class}.save_pretrained"
        report.problems.append(f"model.path={str(cfg.model.path)!r}: {'; '.join(wrong)}; {fix}")
        return None
    return folder


def check_prompts(cfg: DictConfig, report: Report, model: Path | None) -> Any:
    """The prompts (None where they cannot be loaded): count, duplicates, blank lines, long prompts."""
    try:
        loaded = load_prompts(cfg)
    except UserError as err:
        key = next((k for k in ("control_prompts_file", "prompt_join") if str(err).startswith(k)), "prompts_file")
        report.problems.append(f"{err}{source(cfg, key)}")
        control = cfg.get("control_prompts_file")
        if key == "prompts_file" and control is not None and not Path(str(control)).expanduser().is_file():
            report.problems.append(f"control_prompts_file={str(control)!r} is not a file; give the control "
                                   f"(non-memorized) prompts{source(cfg, 'control_prompts_file')}")
        return None
    texts = loaded.texts
    n_own = len(texts) - loaded.n_controls
    report.notes.append(f"prompts: {n_own}" + (f" from {cfg.prompts_file} ({loaded.source})" if cfg.prompts_file
                                               else ""))
    if loaded.n_controls:
        report.notes.append(f"control prompts: {loaded.n_controls} from {cfg.control_prompts_file} (group "
                            f"{cfg.get('control_group') or 'unmemorized'}), prompt {n_own} on")
    groups = Counter(g for g in loaded.groups if g is not None)
    if len(groups) > 1 or loaded.n_controls:
        report.notes.append("groups: " + ", ".join(f"{g} {n}" for g, n in groups.items())
                            + (f", no group {len(texts) - sum(groups.values())}" if sum(groups.values()) < len(texts) else ""))
    report.warnings.extend(loaded.warnings)
    blank = loaded.blank_lines  # as the file's format reads it (a CSV cell may span lines)
    if blank:
        report.warnings.append(f"prompts_file={str(cfg.prompts_file)!r}: {len(blank)} blank line(s) skipped "
                               f"(line {', '.join(map(str, blank[:5]))}{' ...' if len(blank) > 5 else ''})")
    seen: dict[str, int] = {}
    duplicates = [(i, seen[t]) for i, t in enumerate(texts) if seen.setdefault(t, i) != i]
    if duplicates:
        i, first = duplicates[0]
        report.warnings.append(f"{len(duplicates)} duplicate prompt(s), e.g. prompt {i} = prompt {first} "
                               f"{texts[i][:60]!r}; each is generated (and scored) again")
    if model is not None and _class_conditional(cfg, model, texts, report):
        return loaded
    # a BPE token covers at least one UTF-8 byte: a prompt of at most 75 bytes cannot exceed 77 tokens (so the
    # tokenizer, and transformers, load only where a prompt may)
    maybe_long = [i for i, t in enumerate(texts) if len(t.encode("utf-8")) + 2 > CLIP_TOKENS]
    tokenizer = _tokenizer(model) if maybe_long else None
    long = [i for i in maybe_long if len(tokenizer(texts[i], truncation=False, verbose=False).input_ids) > CLIP_TOKENS]
    if long:
        report.warnings.append(f"{len(long)} prompt(s) longer than {CLIP_TOKENS} CLIP tokens are truncated by the "
                               f"text encoder (prompt {', '.join(map(str, long[:5]))}{' ...' if len(long) > 5 else ''})")
    return loaded


def _class_conditional(cfg: DictConfig, model: Path, texts: list[str], report: Report) -> bool:
    """For a class-conditional model (dit): every prompt must name one of its classes; True if it is one."""
    if family_class(model, cfg.model.get("family")).text:
        return False
    labels = labels_of(read_model_index(model).get("id2label"))
    n_classes = json.loads((model / "transformer" / "config.json").read_text()).get("num_embeds_ada_norm") or 1000
    unknown = []
    for text in texts:
        try:
            class_id(text, labels, n_classes)
        except UserError as err:
            unknown.append(str(err) if not unknown else repr(text))
    if unknown:
        report.problems.append(unknown[0] + (f" (also: {', '.join(unknown[1:6])}{' ...' if len(unknown) > 6 else ''})"
                                             if len(unknown) > 1 else ""))
    return True


def _tokenizer(model: Path | None) -> Any:
    """The model's own tokenizer, or the CLIP tokenizer (the same BPE) where the model folder is unusable."""
    if model is not None:
        try:  # start-up: transformers loads (in load_tokenizer) only where a prompt is long enough
            return load_tokenizer(model / "tokenizer")
        except (OSError, ValueError):
            pass
    return clip_tokenizer()


def check_references(cfg: DictConfig, report: Report, prompts: Any) -> None:
    """The reference folder: images present and their headers readable, each prompt's own subfolder."""

    try:
        files = reference_files(cfg.references)
    except UserError as err:
        report.problems.append(f"{err} (needed by metrics={cfg.metrics.name}){source(cfg, 'references')}")
        return
    root = Path(cfg.references).expanduser()
    report.notes.append(f"references: {len(files)} images in {root}")
    if prompts is not None and cfg.references_per_prompt is not None:
        folders = {f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1}
        own = prompts.reference_keys[:len(prompts.reference_keys) - prompts.n_controls]  # controls have no references
        missing = sorted({k for k in own if str(k) not in folders}, key=str)
        if missing:  # evaluation leaves these prompts out (and counts them in metrics.json)
            dead = root.parent / REPORT
            report.warnings.append(
                f"references={str(cfg.references)!r}: {len(set(map(str, own))) - len(missing)} of "
                f"{len(set(map(str, own)))} prompts have references; {len(missing)} prompt(s) have no images in their own subfolder "
                f"({', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}; "
                f"references_per_prompt={cfg.references_per_prompt}); evaluation leaves them out"
                + (f" (dead links: {dead})" if dead.is_file() else
                   f"; put each prompt's ground truth in {root}/<{cfg.references_per_prompt}>/{source(cfg, 'references')}"))
    unreadable = []
    for f in files:
        try:
            with Image.open(f) as image:  # the header only; pixels are decoded when the metrics run
                image.size  # noqa: B018
        except Exception:  # noqa: BLE001  (any failure: PIL cannot read it)
            unreadable.append(str(f.relative_to(root)))
    if unreadable:
        line = (f"references={str(cfg.references)!r}: {len(unreadable)} image file(s) cannot be read: "
                f"{', '.join(unreadable)}")
        if cfg.get("skip_unreadable"):
            report.warnings.append(f"{line}; left out (skip_unreadable=true)")
        else:
            report.problems.append(f"{line}; replace or delete them, or set skip_unreadable=true to leave them out")


def _weights_help(target: str) -> str:
    if "SSCD" in target:
        return f"download sscd_disc_large.torchscript.pt from {SSCD_URL}"
    if "Clip" in target:
        return OPEN_CLIP_HELP
    if "Inception" in target:
        return INCEPTION_HELP
    return "see docs/evaluation.md (where each weights file comes from)"


MODEL_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a transformers folder (metrics.dino.path)


def check_weights(cfg: DictConfig, report: Report, stages: list[str]) -> None:
    """Each metric stage's weights (``path``, and any other ``*_path`` of its node, e.g. the aesthetic predictor's
    ``clip_path``): a file whose archive opens, or a transformers folder (``config.json`` and a weights file)."""
    for stage in stages:
        node = cfg.metrics[stage]
        for name in [k for k in node if (k == "path" or str(k).endswith("_path")) and node[k] is not None]:
            key, path = f"metrics.{stage}.{name}", Path(str(node[name])).expanduser()
            source_key = stage if name == "path" else f"{stage}_{name.removesuffix('_path')}"
            help_text = source(cfg, source_key).removeprefix("; ") or _weights_help(str(node.get("_target_", "")))
            file = next((path / f for f in MODEL_FOLDER_WEIGHTS if (path / f).is_file()), None) if path.is_dir() \
                else path
            if path.is_dir() and (file is None or not (path / "config.json").is_file()):
                problem = f"is not a model folder (config.json and {' or '.join(MODEL_FOLDER_WEIGHTS)})"
            else:
                problem = "is not a file" if not file.is_file() else archive_problem(file)
            if problem is not None:
                report.problems.append(f"{key}={str(node[name])!r} {problem}; {help_text}")
            else:
                report.notes.append(f"{key}: {path} ({file.stat().st_size / 2**20:.0f} MiB)")


def check_manifests(cfg: DictConfig, report: Report) -> None:
    """Files that ``memguard fetch`` wrote (its ``manifest.json`` beside each input) and that were changed or
    removed since: named, one line per input."""
    for key, node in nodes(cfg).items():
        dest = destination(cfg, key, node)
        if dest is None or not dest.exists():  # a missing input is reported by its own check
            continue
        changed = manifest.changes(dest)
        if changed:
            report.problems.append(f"{key}: {len(changed)} file(s) changed or removed since `memguard fetch` fetched "
                                   f"them ({'; '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); "
                                   "`memguard fetch` with the same overrides fetches them again")


def check_disk(cfg: DictConfig, report: Report, n_images: int, model: Path | None) -> None:
    """Free space under ``run_dir`` for ``n_images`` images not yet made (an uncompressed RGB image each)."""
    side = cfg.resolution or _model_resolution(model) or 512
    run_dir = Path(cfg.run_dir).expanduser().absolute()
    existing = len(list((run_dir / "images").glob("*.png"))) if (run_dir / "images").is_dir() else 0
    need = max(n_images - existing, 0) * (3 * side * side + 8192)
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if need > free:
        report.problems.append(f"run_dir={str(cfg.run_dir)!r}: {n_images - existing} images of {side} px need up to "
                               f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {parent}; free space or "
                               "choose paths.output_dir on another disk")


def _model_resolution(model: Path | None) -> int | None:
    try:
        denoiser = model / "unet" if (model / "unet").is_dir() else model / "transformer"
        unet = json.loads((denoiser / "config.json").read_text())
        vae_file = model / "vae" / "config.json"
        factor = 2 ** (len(json.loads(vae_file.read_text())["block_out_channels"]) - 1) if vae_file.is_file() else 1
        return int(unet["sample_size"]) * factor
    except (OSError, TypeError, KeyError, ValueError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# The task


def check_calibration(cfg: DictConfig, report: Report, model: Path | None) -> None:
    """A calibrated method's file must have been made for this model (its identity); a missing one is noted."""
    node = cfg.mitigation.get("calibration")
    if node is None or model is None:
        return
    path = Path(str(node.file))
    if not path.is_file():
        report.notes.append(f"mitigation={cfg.mitigation.name}: {node.key} is not calibrated on this model "
                            f"(no {path}); memguard calibrate mitigation={cfg.mitigation.name} derives it")
        return
    try:
        values = read_calibration(path, model)["values"]
        report.notes.append(f"calibration {path}: made for this model; sets {values}")
    except UserError as err:
        report.problems.append(str(err))


def check_inputs(cfg: DictConfig) -> Report:
    """Every input of ``cfg`` that a run needs; nothing is written."""
    report = Report()
    model = check_model(cfg, report)
    check_calibration(cfg, report, model)
    if cfg.get("dataset") is not None and cfg.prompts_file is not None and not Path(cfg.prompts_file).exists():
        report.notes.append(f"prompts and references: written by dataset ({cfg.dataset._target_}) on the first run")
        check_weights(cfg, report, [n for n in STAGES if cfg.metrics.get(n) is not None] if cfg.evaluate else [])
        return report
    prompts = check_prompts(cfg, report, model)
    try:
        seeds = load_seeds(cfg)
    except UserError as err:
        report.problems.append(str(err))
        seeds = []
    stages = [name for name in STAGES if cfg.metrics.get(name) is not None] if cfg.evaluate else []
    if any(STAGES[name][1] for name in stages):
        if cfg.references is None:
            report.problems.append(f"references is not set, and metrics={cfg.metrics.name} compares with reference "
                                   "images; give references=DIR, or evaluate=false")
        else:
            check_references(cfg, report, prompts)
    check_weights(cfg, report, stages)
    check_manifests(cfg, report)
    if prompts is not None and seeds:
        check_disk(cfg, report, len(prompts.texts) * len(seeds), model)
    return report


def require_inputs(cfg: DictConfig) -> Report:
    """:func:`check_inputs`; warnings are logged, problems raised as one UserError listing them all."""
    report = check_inputs(cfg)
    for warning in report.warnings:
        log.warning(warning)
    if report.problems:
        raise report.error()
    return report


def check(cfg: DictConfig) -> Report:
    """``memguard check``: print what was found and the warnings; problems are one error (exit 2)."""
    report = check_inputs(cfg)
    for line in report.notes:
        print(line)
    for line in report.warnings:
        print(f"warning: {line}")
    if report.problems:
        raise report.error()
    if report.warnings:  # the summary agrees with the warnings above it
        print(f"memguard check: the inputs a run of scenario={cfg.scenario.name} needs are present, with "
              f"{len(report.warnings)} warning(s) above")
    else:
        print(f"memguard check: every input of scenario={cfg.scenario.name} is present")
    return report
