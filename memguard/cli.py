"""The ``memguard`` command: a sub-command word, then Hydra overrides.

    memguard run [key=value ...]            generate a scenario under a mitigation (Hydra; -m sweeps)
    memguard check [key=value ...]          check every input a run needs (model, prompts, references, weights)
    memguard fetch [key=value ...]          download what check would report missing, from sources.* (network)
    memguard basin [key=value ...]          CFG started at each of basin.starts, branching from one trajectory
    memguard evaluate [key=value ...]       (re-)evaluate a run folder: run_dir=DIR references=DIR metrics=...
    memguard train scenario=tiny [...]      train the tiny scenario's model from nothing (about 20 min on CPU)
    memguard finetune scenario=laion10k     fine-tune SD's UNet on a scenario's data (accelerate launch: GPUs)
    memguard tables [--output-dir DIR]      the paper's Tables 1-5 and the tiny table from DIR/runs (outputs)
    memguard compare [key=value ...]        every method calibrated, swept, ranked: a leaderboard (compare.output)
    memguard calibrate mitigation=NAME      a method's threshold on the model at hand, from the control prompts
    memguard calibrate RUN_DIR [--fpr 0.01] mitigation=auto's detection threshold from a standard-CFG run folder
    memguard plot RUN_DIR [RUN_DIR ...]     mean ||eps_c||, ||eps_u||, ||eps_c - eps_u|| per step and group
    memguard nemo-localize [key=value ...]  NeMo's memorization neurons per prompt, the file mitigation=nemo reads
    memguard random-model DIR [--family F]  write a tiny random-weight folder, F = sd|sdxl|sd3|dit (tests, demos)
    memguard COMMAND --help                 what COMMAND does, its main keys and their defaults, an example

A plain ``@hydra.main`` would read the sub-command word as an override; here it is taken off ``sys.argv``
first. User errors print one line (``memguard: error: ...``) and exit 2; ``HYDRA_FULL_ERROR=1`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import memguard
from memguard.errors import UserError

CONF_DIR = memguard.CONF_DIR
USAGE = __doc__.split("\n\n")[1]


def _report_user_errors(task: Callable[[Any], Any], cfg: Any) -> Any:
    try:
        return task(cfg)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"memguard: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:  # a task that saved its state says where (memguard train); others say nothing
        print(f"memguard: interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        sys.exit(130)


# hydra/launcher=NAME -> (the module of the Hydra plugin that provides it, its pip package); conf/hydra/launcher/slurm
# is memguard's GPU defaults over submitit_slurm
LAUNCHER_PLUGINS = {
    **dict.fromkeys(("submitit_slurm", "submitit_local", "slurm"),
                    ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
}


def check_launcher(overrides: list[str]) -> None:
    """A ``hydra/launcher=`` whose plugin is not installed is a UserError naming the key and the extra to install
    (Hydra itself would only list the launchers it has)."""

    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "hydra/launcher" and value in LAUNCHER_PLUGINS:
            module, package = LAUNCHER_PLUGINS[value]
            if importlib.util.find_spec(module) is None:
                raise UserError(f"hydra/launcher={value} needs the {package} package, which is not installed; "
                                f"install memguard's cluster extra: pip install -e '.[cluster]' (or pip install {package})")


# The Hydra sub-commands' own help: what the command does, its main keys (defaults read from the composed config,
# so they cannot drift), one example. `memguard COMMAND --help` prints it, then Hydra's groups and full config.
COMMAND_HELP: dict[str, tuple[str, tuple[str, ...], str]] = {
    "run": ("Generate every (prompt, seed) of a scenario under a mitigation into its run folder (re-running resumes), "
            "then evaluate it with the scenario's metrics.",
            ("scenario", "model.path", "prompts_file", "mitigation", "guidance.scale", "sampler", "sampler.steps",
             "images_per_prompt", "seed_scheme", "batch_size", "device", "dtype", "run_name"),
            "memguard run scenario=custom model.path=DIR prompts_file=prompts.csv mitigation=og_dtp"),
    "check": ("Check every input a run needs at once (model folder, prompts, references, metric weights, free disk) "
              "and say where each missing one comes from; exit 2 if any is missing.",
              ("scenario", "model.path", "prompts_file", "references", "metrics"),
              "memguard check experiment=table4"),
    "fetch": ("Download what `memguard check` would report missing, from each input's sources.<input> node (hub, "
              "URL, Drive, image URL lists); the one command that uses the network.",
              ("scenario", "metrics", "fetch.only", "fetch.dry_run", "fetch.workers", "paths.data_dir",
               "paths.models_dir", "paths.weights_dir"),
              "memguard fetch scenario=webster500 metrics=paper fetch.dry_run=true"),
    "basin": ("Map the attraction basin: per (prompt, seed) one trajectory without CFG and CFG started at each of "
              "basin.starts, branching from it; copies and alignment per start.",
              ("scenario", "basin.starts", "basin.opposite", "basin.tau", "metrics", "images_per_prompt"),
              "memguard basin scenario=tiny basin.starts='[0,5,10,20]'"),
    "evaluate": ("(Re-)evaluate a run folder with a metrics option: similarity to the references, alignment, FID, "
                 "detection; images are never touched.",
                 ("run_dir", "references", "metrics"),
                 "memguard evaluate run_dir=outputs/runs/tiny2/dtp metrics=tiny"),
    "train": ("Train the tiny scenario's model from nothing on its procedural dataset (resumable; Ctrl-C saves).",
              ("scenario", "train", "train.settings.steps", "train.output_dir"),
              "memguard train scenario=tiny_ft train=pretrain"),
    "finetune": ("Fine-tune Stable Diffusion's UNet on a scenario's data, as the paper's scenarios 1, 2 and 5 need "
                 "(accelerate launch for GPUs; resumes from its latest checkpoint).",
                 ("scenario", "finetune.base_model", "finetune.settings.steps", "finetune.output_dir"),
                 "memguard finetune scenario=laion10k"),
    "compare": ("For a scenario, each method of compare.methods calibrated on the model at hand, swept over its "
                "YAML's knob, evaluated; per method its operating point under the alignment budget (chosen on "
                "calibration seeds, reported on held-out seeds) and its cost; a leaderboard (CSV, Markdown, sortable "
                "HTML) and trade-off curves. Resumes; shard.index/count and -m with a launcher split it.",
                ("scenario", "compare.methods", "compare.points", "compare.budget", "compare.calibration_seeds",
                 "compare.output", "images_per_prompt", "sampler.steps"),
                "memguard compare scenario=tiny compare.points=3"),
    "calibrate": ("Derive a threshold-bearing method's threshold on the model at hand from the scenario's control "
                  "(non-memorized) prompts, as its YAML's calibration node declares; every later run of the method "
                  "applies the file (RUN_DIR form: mitigation=auto from a finished standard-CFG folder).",
                  ("scenario", "model.path", "mitigation", "mitigation.calibration.fpr", "mitigation.calibration.file"),
                  "memguard calibrate scenario=tiny mitigation=sail"),
    "nemo-localize": (("NeMo (Hintersdorf et al.): for each prompt, the cross-attention value neurons that memorize "
                       "it (z-scores of their activations against nemo.statistics, then refined by the MS-SSIM of the "
                       "first noise prediction across seeds), written to nemo.output for mitigation=nemo; resumes."),
                      ("scenario", "model.path", "prompts_file", "nemo.output", "nemo.statistics",
                       "nemo.statistics_prompts", "nemo.samples", "nemo.seed", "nemo.pairwise_threshold", "nemo.theta",
                       "dtype", "device"),
                      "memguard nemo-localize scenario=nemo500"),
}


# Each command's page of the documentation (docs/*.md in the source tree; `make docs` builds them into a site),
# named at the end of its --help.
COMMAND_DOCS = {
    "run": "docs/getting-started.md", "check": "docs/getting-started.md#checking-the-inputs",
    "fetch": "docs/scenarios.md#reproduce-a-table", "basin": "docs/basin.md", "evaluate": "docs/evaluation.md",
    "train": "docs/notebook.md", "finetune": "docs/scenarios.md", "tables": "docs/evaluation.md",
    "calibrate": "docs/basin.md#detection-and-mitigationauto", "plot": "docs/evaluation.md",
    "random-model": "docs/families.md", "nemo-localize": "docs/mitigations.md", "compare": "docs/compare.md",
}


def docs_line(name: str) -> str:
    page = COMMAND_DOCS.get(name)
    return f"more: {page} in memguard's source tree (`make docs` builds the site: site/index.html)" if page else ""


def _parser(name: str, what: str, example: str) -> argparse.ArgumentParser:
    """A plain (non-Hydra) command's parser whose --help reads as the Hydra commands' do: what, options, example."""
    return argparse.ArgumentParser(prog=f"memguard {name}", description=textwrap.fill(what, 100),
                                   epilog=f"example:\n  {example}\n\n{docs_line(name)}".rstrip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def command_help(name: str, overrides: list[str] | None = None, full: bool = False) -> str:
    """``memguard NAME --help``'s own part: what the command does, its main keys with their defaults (under
    ``overrides``), an example. ``full``: then, as Hydra's own help page lays them out, every config group's options
    and the composed config (read here, from one composition: Hydra's page lists each group through a fresh
    config repository, seconds)."""
    from hydra import compose, initialize_config_dir  # start-up: Hydra loads only for the commands that compose
    from hydra.core.global_hydra import GlobalHydra  # start-up: as above

    what, keys, example = COMMAND_HELP[name]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides or []))
    GlobalHydra.instance().clear()

    def default(key: str) -> str:
        node = OmegaConf.select(cfg, key, throw_on_missing=False)
        if OmegaConf.is_dict(node):  # a config group: the option chosen, by its name
            node = node.get("name")
        elif OmegaConf.is_list(node):  # a list value: as written on a command line
            return "[" + ",".join(map(str, node)) + "]"
        if node is None and (CONF_DIR / key).is_dir():  # a group chosen by none: its options
            return f"null ({' | '.join(sorted(p.stem for p in (CONF_DIR / key).glob('*.yaml')))})"
        if OmegaConf.is_missing(cfg, key):
            return "??? (required)"
        return "null" if node is None else str(node).lower() if isinstance(node, bool) else str(node)

    width = max(map(len, keys))
    lines = [f"usage: memguard {name} [key=value ...]", "", *textwrap.wrap(what, 100), "", "main keys (default):"]
    lines += [f"  {key:<{width}}  {default(key)}" for key in keys]
    more = [docs_line(name), ""] if docs_line(name) else []
    head = [*lines, "", f"example:\n  {example}", "", *more, "Every key and group (Hydra) follows.", ""]
    if not full:
        return "\n".join(head)
    groups = [f"{group.name}: {', '.join(sorted(p.stem for p in group.glob('*.yaml')))}"
              for group in sorted(CONF_DIR.iterdir()) if group.is_dir() and group.name != "hydra"]
    return "\n".join([*head, "== Configuration groups ==", "Compose your configuration from those groups (group=option)",
                      "", *groups, "", "== Config ==", "Override anything in the config (foo.bar=value)", "",
                      OmegaConf.to_yaml(cfg), f"Hydra's own options: memguard {name} --hydra-help"])


def _help_overrides(args: list[str]) -> list[str] | None:
    """The overrides of a ``--help`` command line that a plain composition takes, or None where only Hydra's own
    help can show them (a sweep, ``-m``, a ``hydra.`` key)."""
    overrides = [arg for arg in args if arg not in ("-h", "--help")]
    if any(arg.startswith("-") or arg.lstrip("+~").startswith("hydra") or "," in arg.partition("=")[2]
           for arg in overrides):
        return None
    return overrides


# the commands that write no run folder: Hydra gets no output folder of theirs (its .hydra/ and log) to write
NO_RUN_FOLDER = ("check", "fetch")


def source_overrides(overrides: list[str]) -> list[str]:
    """``sources.X.FIELD=value`` passed as ``++sources.X.FIELD=value``: a source node's field can be set whether
    or not the node has it (``sources.references.mirrors=[...]``) without Hydra's ``+``."""
    return [f"++{o}" if o.startswith("sources.") and "=" in o else o for o in overrides]


def _hydra_command(name: str, task: Callable[[Any], Any], overrides: list[str]) -> None:
    import hydra  # start-up: as above

    if not (CONF_DIR / "config.yaml").is_file():
        raise SystemExit(f"memguard: error: config folder {CONF_DIR} is missing; reinstall memguard (pip install "
                         "memguard's wheel, or pip install -e . in a clone)")
    if any(arg in ("-h", "--help") for arg in overrides):
        plain = _help_overrides(overrides)
        try:
            text = None if plain is None else command_help(name, plain, full=True)
        except Exception:  # an override that does not compose: Hydra's own help below reports it as Hydra does
            text = None
        if text is not None:
            print(text)
            return
        print(command_help(name))  # then Hydra's own page, for the overrides a plain composition does not take
        overrides = ["--help" if arg == "-h" else arg for arg in overrides]
    _report_user_errors(check_launcher, overrides)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def entry(cfg: Any) -> Any:
        return _report_user_errors(task, cfg)

    overrides = source_overrides(overrides)
    if name in NO_RUN_FOLDER:
        overrides = ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=.", *overrides]
    sys.argv = [f"memguard {name}", *overrides]
    entry()


def _random_model(args: list[str]) -> None:
    parser = _parser("random-model", "Write a tiny random-weight model folder of a family (tests, demos: its images "
                     "and d_t mean nothing).", "memguard random-model --family sdxl models/random-sdxl")
    parser.add_argument("folder", type=Path, help="a new or empty folder")
    parser.add_argument("--seed", type=int, default=0, help="the weights' seed (0)")
    parser.add_argument("--family", default="sd", help="sd (default), sdxl, sd3 or dit")
    parser.add_argument("--no-t5", action="store_true", help="sd3 only: without its third (T5) text encoder")
    options = parser.parse_args(args)
    if options.folder.exists() and any(options.folder.iterdir()):
        raise SystemExit(f"memguard: error: {options.folder} exists and is not empty; choose another folder")
    from diffusers.utils import logging as diffusers_logging  # start-up: torch and diffusers load for this command only

    from memguard.families import FAMILIES, random_family  # start-up: as above

    if options.family not in FAMILIES:
        raise SystemExit(f"memguard: error: --family {options.family!r} is not a model family; use one of "
                         f"{', '.join(FAMILIES)}")
    if options.no_t5 and options.family != "sd3":
        raise SystemExit("memguard: error: --no-t5 applies to --family sd3 only")
    diffusers_logging.disable_progress_bar()
    if options.no_t5:
        from memguard.families.sd3 import SD3  # start-up: as above

        model = SD3.random(options.seed, t5=False)
    else:
        model = random_family(options.family, options.seed)
    model.save(options.folder)
    print(f"wrote a random-weight tiny {options.family} folder (it memorizes nothing) to {options.folder}")


def _tables(args: list[str]) -> None:
    parser = _parser("tables", "Collect run folders into the paper's tables (Tables 1-5 and the tiny table, each "
                     "number with its interval beside the paper's): .csv, .md, .html and report.html in tables/.",
                     "memguard tables --output-dir outputs")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"),
                        help="holds runs/; tables/ is written there (outputs)")
    options = parser.parse_args(args)
    from memguard.tables import write_tables  # start-up: pandas and matplotlib load for this command only

    for path in write_tables(options.output_dir):
        if path.suffix == ".md":
            print(path.read_text())
    print(f"tables written to {options.output_dir / 'tables'}")


def _calibrate(args: list[str]) -> None:
    parser = _parser("calibrate", (
        "Set mitigation=auto's detection threshold from a standard-CFG run (mitigation=none) of prompts that are "
        "not memorized: at most --fpr of its images score above it. Writes RUN_DIR/calibration.json."),
        "memguard calibrate outputs/runs/tiny/calibration --fpr 0.01 --group unique")
    parser.add_argument("run_dir", type=Path, help="a finished mitigation=none run folder")
    parser.add_argument("--fpr", type=float, default=0.01, help="false-positive rate to allow (0.01)")
    parser.add_argument("--detect-step", type=int, default=0, help="mitigation.auto.detect_step (0)")
    parser.add_argument("--group", nargs="*", default=None, help="use only these prompt groups (e.g. unique)")
    options = parser.parse_args(args)
    from memguard.metrics.detection import calibrate  # start-up: torch loads for this command only

    result = calibrate(options.run_dir, options.fpr, options.detect_step, options.group)
    print(f"threshold {result['threshold']:.6g} ({result['measured_fpr']:.4f} of {result['n_images']} images above it) "
          f"written to {options.run_dir / 'calibration.json'}; use it with mitigation=auto "
          f"mitigation.auto.calibration={options.run_dir / 'calibration.json'} or "
          f"mitigation.auto.threshold={result['threshold']:.6g}")


def _plot(args: list[str]) -> None:
    parser = _parser("plot", (
        "The paper's Figures 3, 9, 10, 12: mean ||eps_c||, ||eps_u|| and ||eps_c - eps_u|| per timestep and prompt "
        "group, one panel per run folder, transition steps marked. Writes norms.png into the first folder."),
        "memguard plot outputs/runs/tiny/uncond outputs/runs/tiny/none --output norms.png")
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders, one column each")
    parser.add_argument("--output", type=Path, default=None, help="the figure's file (default RUN_DIR/norms.png)")
    options = parser.parse_args([a.removeprefix("run_dir=") for a in args])
    from memguard.runs.plots import plot_norms  # start-up: matplotlib loads for this command only

    print(f"wrote {plot_norms(options.run_dirs, options.output)}")


# The Hydra commands' tasks as "module:function": each module is imported when its task runs, not before (they
# import torch and diffusers, seconds that `memguard COMMAND --help` and a mistyped override should not wait)
TASKS = {
    "run": "memguard.runner:run", "check": "memguard.check:check", "fetch": "memguard.fetch.command:fetch",
    "basin": "memguard.basin:basin", "evaluate": "memguard.evaluate:evaluate",
    "train": "memguard.train:train_from_config", "finetune": "memguard.finetune:finetune",
    "nemo-localize": "memguard.mitigations.nemo_localize:localize", "calibrate": "memguard.calibrate:calibrate",
    "compare": "memguard.compare:compare",
}
# Overrides a command puts before the user's: basin and nemo-localize write their own folder kinds, outside runs/
# (which `memguard tables` reads); nemo-localize's beside its neuron file
EXTRA_OVERRIDES = {
    "basin": ["run_dir=${paths.output_dir}/basin/${basin.name}", "hydra.sweep.dir=${paths.output_dir}/basin",
              "hydra.sweep.subdir=${basin.name}"],
    "nemo-localize": ["run_dir=${paths.output_dir}/nemo/${scenario.name}"],
    "compare": ["run_dir=${compare.output}", "hydra.sweep.dir=${compare.output}/shards", "hydra.sweep.subdir=${shard.index}"],
}


def _task(command: str) -> Callable[[Any], Any]:
    """The command's task function, its module imported at the first call."""
    module, _, function = TASKS[command].partition(":")

    def task(cfg: Any) -> Any:
        return getattr(importlib.import_module(module), function)(cfg)

    task.__name__ = function
    return task


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(f"usage:\n{USAGE}\n\ndocumentation: README.md and docs/ in memguard's source tree "
              "(`make docs` builds the site: site/index.html)")
        return
    command, rest = argv[0], argv[1:]
    if command == "calibrate" and rest and (rest[0].startswith("-") or "=" not in rest[0]):
        _report_user_errors(_calibrate, rest)  # calibrate RUN_DIR: mitigation=auto from a finished folder
    elif command == "calibrate":  # calibrate mitigation=NAME: the Hydra task, beside no run folder of its own
        _hydra_command(command, _task(command), ["hydra.output_subdir=null", "hydra/job_logging=stdout",
                                                 "hydra.run.dir=.", *rest])
    elif command in TASKS:
        _hydra_command(command, _task(command), [*EXTRA_OVERRIDES.get(command, []), *rest])
    elif command == "tables":
        _tables(rest)
    elif command == "random-model":
        _random_model(rest)
    elif command == "plot":
        _report_user_errors(_plot, rest)
    else:
        raise SystemExit(f"memguard: error: unknown command {command!r}; commands: run, check, fetch, basin, evaluate, train, finetune, nemo-localize, compare, tables, calibrate, plot, random-model\nusage:\n{USAGE}")


if __name__ == "__main__":
    main()
