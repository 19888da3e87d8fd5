"""The `memguard` command as a user runs it: sub-command dispatch, sweeps, one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memguard.cli import main

pytestmark = pytest.mark.slow


def memguard(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`memguard ARGS` in a process of its own, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "memguard.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


def memguard_here(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`memguard ARGS` through the same entry point (``memguard.cli.main``) in this test's process, with its output
    and exit status as :func:`memguard` gives them: for the tests about what a command does rather than about the
    process (whose start, importing torch and diffusers, costs ~6 s a call). A message passed to ``SystemExit``
    goes to stderr with status 1, as the interpreter does."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.chdir(cwd)
        for key, value in {"HF_HUB_OFFLINE": "1", **(env or {})}.items():
            patch.setenv(key, value)
        patch.setattr(sys, "argv", list(sys.argv))  # Hydra's entry sets it
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
    return subprocess.CompletedProcess(["memguard", *args], code, out.getvalue(), err.getvalue())


def test_run_custom_model_with_og_dtp(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = memguard("run", "scenario=custom", f"model.path={tiny_model_dir}", "prompts=[a cat,a dog]",
                      "mitigation=og_dtp", "sampler.steps=5", "images_per_prompt=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "outputs" / "runs" / "custom" / "og_dtp"
    assert len(list((run_dir / "images").glob("*.png"))) == 4
    assert json.loads((run_dir / "metrics.json").read_text())["mitigation"] == "og_dtp"
    assert "generating" in result.stderr  # the progress bar


def test_multirun_sweeps_mitigations(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = memguard_here("run", "-m", "scenario=custom", f"model.path={tiny_model_dir}", "prompts=[a cat]",
                           "mitigation=none,uncond", "debug=default", cwd=tmp_path)  # the sweep, in this process
    assert result.returncode == 0, result.stderr
    for name in ("none", "uncond"):
        metrics = json.loads((tmp_path / "outputs" / "runs" / "debug" / "custom" / name / "metrics.json").read_text())
        assert metrics["mitigation"] == name and metrics["n_images"] == 2
    uncond = json.loads((tmp_path / "outputs/runs/debug/custom/uncond/metrics.json").read_text())
    assert uncond["transition"]["never_fired_fraction"] == 1.0


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    result = memguard("run", "scenario=custom", "model.path=/no/such/model", "prompts=[a cat]", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("memguard: error: model.path='/no/such/model' is not a folder")
    full = memguard("run", "scenario=custom", "model.path=/no/such/model", "prompts=[a cat]", cwd=tmp_path,
                    env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr


def test_unknown_option_lists_the_valid_ones(tmp_path: Path) -> None:
    result = memguard("run", "mitigation=bogus", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'mitigation/bogus'" in result.stderr
    for name in ("dtp", "og_dtp", "stp", "og_stp", "interval", "none", "uncond"):
        assert f"\t{name}\n" in result.stderr


def test_unknown_command_and_help(tmp_path: Path) -> None:
    assert "memguard run" in memguard("--help", cwd=tmp_path).stdout
    result = memguard("frobnicate", cwd=tmp_path)
    assert result.returncode != 0 and "unknown command 'frobnicate'" in result.stderr


def test_random_model_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    result = memguard("random-model", str(tmp_path / "m"), cwd=tmp_path)
    assert result.returncode != 0 and "not empty" in result.stderr
    assert (tmp_path / "m" / "keep.txt").read_text() == "x"


def test_every_hydra_command_has_help_of_its_own() -> None:
    """What the command does, its main keys with their defaults from the composed config, one example."""
    from memguard.cli import COMMAND_HELP, command_help

    assert set(COMMAND_HELP) == {"run", "check", "fetch", "basin", "evaluate", "train", "finetune", "nemo-localize",
                                "calibrate", "compare"}
    for name, (_, keys, example) in COMMAND_HELP.items():
        text = command_help(name)
        assert text.startswith(f"usage: memguard {name} [key=value ...]") and example in text
        for key in keys:
            assert f"  {key} " in text, (name, key)
    run = command_help("run")
    assert "  mitigation         none" in run and "  sampler            auto" in run and "images_per_prompt  8" in run
    assert ("train                 null (finetune | pretrain | tiny2_finetune | tiny2_pretrain | tiny2_t4_finetune | "
            "tiny2_t4_pretrain)") in command_help("train")


def test_command_help_then_hydras_key_list(tmp_path: Path) -> None:
    result = memguard("check", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: memguard check [key=value ...]")
    assert "== Config ==" in result.stdout and "mitigation: auto, dtp" in result.stdout  # Hydra's, after ours
