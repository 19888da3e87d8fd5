"""Whether two source trees of memguard make the same run folders: every mitigation on the tiny scenario, compared.

    python scripts/probes/same_outputs.py OLD_TREE NEW_TREE --output DIR [--steps 8] [--images 1]

Runs ``memguard run -m scenario=tiny mitigation=<every conf/mitigation option>`` once with each tree's code and
configs (``PYTHONPATH=TREE``, the same virtual environment), with few steps and images, into DIR/a and DIR/b;
``mitigation=nemo`` reads the neurons ``memguard nemo-localize scenario=tiny`` writes after the sweep (statistics
from the tiny prompts themselves), and ``mitigation=auto`` runs with a fixed ``mitigation.auto.threshold`` (the tiny
scenario ships no calibration). Then, per mitigation,
compares every image (decoded pixels, exactly) and every number of metrics.json (exactly, wall-clock fields left
out), prints one table row each and exits 1 if any differs. Made to check that a refactoring changed no output
(issue 27: the house move). A mitigation whose run fails under either tree is reported as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

AUTO_THRESHOLD = "1.0"  # any fixed value: both trees then decide per image from the same score
LATER = ("auto", "nemo")  # run after the sweep: auto with a threshold, nemo after nemo-localize
# left out of the comparison: wall-clock fields, and how many images this invocation made (a resumed folder made
# fewer; the images themselves are compared)
BOOKKEEPING = {"seconds", "images_per_second", "images_made"}


def memguard(tree: Path, output: Path, *args: str) -> str | None:
    """Run the command with ``tree``'s code; None, or the end of its error output where it failed."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "memguard.cli", *args, f"paths.output_dir={output}", "progress=false"]
    result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    return None if result.returncode == 0 else result.stderr.strip().splitlines()[-1][:300]


def make(tree: Path, output: Path, mitigations: list[str], steps: int, images: int) -> dict[str, str]:
    """Every mitigation's run folder under ``output``; the mitigations that failed, with why."""
    common = ["scenario=tiny", f"sampler.steps={steps}", f"images_per_prompt={images}"]
    sweep = [m for m in mitigations if m not in LATER]
    failed = {}
    if error := memguard(tree, output, "run", "-m", *common, f"mitigation={','.join(sweep)}"):
        failed |= dict.fromkeys(sweep, error)
    if "auto" in mitigations and (error := memguard(tree, output, "run", *common, "mitigation=auto",
                                                    f"mitigation.auto.threshold={AUTO_THRESHOLD}")):
        failed["auto"] = error
    if "nemo" in mitigations:  # the neurons of the tiny prompts, against statistics of the same prompts
        error = memguard(tree, output, "nemo-localize", *common[:2], "nemo.samples=2",
                         f"nemo.statistics_prompts={output}/data/tiny/prompts.jsonl",
                         f"nemo.statistics={output}/nemo/stats.pt")
        if error or (error := memguard(tree, output, "run", *common, "mitigation=nemo")):
            failed["nemo"] = error
    return failed


def numbers(node: object, prefix: str = "") -> dict[str, object]:
    """metrics.json flattened to key path -> leaf, the :data:`BOOKKEEPING` fields left out."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() if key not in BOOKKEEPING
                for k, v in numbers(value, f"{prefix}{key}.").items()}
    if isinstance(node, list):
        return {k: v for i, value in enumerate(node) for k, v in numbers(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): node}


def relative(text: str, roots: list[Path]) -> str:
    for i, root in enumerate(roots):
        text = text.replace(str(root), f"<root{i}>")
    return text


def compare(a: Path, b: Path, roots: tuple[list[Path], list[Path]]) -> tuple[bool, bool, str]:
    """(images identical, metrics identical, what differs first) of two run folders; in text, each side's
    ``roots`` (its output folder and tree) read as one placeholder."""
    if not (a / "metrics.json").is_file() or not (b / "metrics.json").is_file():
        return False, False, "metrics.json missing on one side"
    names_a = sorted(p.name for p in (a / "images").glob("*.png"))
    names_b = sorted(p.name for p in (b / "images").glob("*.png"))
    if not names_a or names_a != names_b:
        return False, False, f"image files differ: {len(names_a)} vs {len(names_b)}"
    differing = [n for n in names_a if not np.array_equal(np.asarray(Image.open(a / "images" / n)),
                                                          np.asarray(Image.open(b / "images" / n)))]
    metrics_a, metrics_b = (numbers(json.loads(relative((f / "metrics.json").read_text(), r)))
                            for f, r in zip((a, b), roots))
    keys = sorted(set(metrics_a) | set(metrics_b))
    changed = [k for k in keys if metrics_a.get(k, "missing") != metrics_b.get(k, "missing")]
    note = (f"{len(differing)} image(s) differ, e.g. {differing[0]}; " if differing else "") + \
           (f"{len(changed)} metric(s) differ, e.g. {changed[0]}: {metrics_a.get(changed[0], 'missing')} vs "
            f"{metrics_b.get(changed[0], 'missing')}" if changed else "")
    return not differing, not changed, note or f"{len(names_a)} images, {len(keys)} numbers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", type=Path, nargs=2, metavar="TREE", help="two memguard source trees (a, b)")
    parser.add_argument("--output", type=Path, required=True, help="a folder for both trees' outputs")
    parser.add_argument("--steps", type=int, default=8, help="sampler.steps (8)")
    parser.add_argument("--images", type=int, default=1, help="images_per_prompt (1)")
    parser.add_argument("--mitigations", default=None, help="comma-separated (default: every option both trees have)")
    parser.add_argument("--compare-only", action="store_true", help="compare folders made before")
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    if args.mitigations:
        mitigations = args.mitigations.split(",")
    else:
        options = [{p.stem for p in (t / "conf" / "mitigation").glob("*.yaml")} for t in trees]
        mitigations = sorted(options[0] & options[1])
    outputs = [args.output.resolve() / label for label in ("a", "b")]
    failed: dict[str, str] = {}
    if not args.compare_only:
        for tree, output in zip(trees, outputs):
            failed |= {m: f"{tree.name}: {e}" for m, e in make(tree, output, mitigations, args.steps, args.images).items()}
    print("| mitigation | images identical | metrics.json identical | note |\n| --- | --- | --- | --- |")
    same = not failed
    for name, error in failed.items():
        print(f"| {name} | not run | not run | failed under {error} |")
    folders = sorted({p.name for o in outputs for p in (o / "runs" / "tiny").glob("*") if p.is_dir()})
    for name in folders:  # one run folder per mitigation (its name: the mitigation's, with its parameters)
        images, metrics, note = compare(*(o / "runs" / "tiny" / name for o in outputs),
                                        roots=([outputs[0], trees[0]], [outputs[1], trees[1]]))
        same &= images and metrics
        print(f"| {name} | {'yes' if images else 'NO'} | {'yes' if metrics else 'NO'} | {note} |")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
