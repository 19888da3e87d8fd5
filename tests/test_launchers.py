"""Running at scale through real launchers: accelerate (one process per device) and Hydra's submitit launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.test_cli import memguard_here

pytestmark = pytest.mark.slow

RUN = ["scenario=custom", "prompts=[a red circle,a blue square,a green cross]", "images_per_prompt=3",
       "sampler.steps=4", "mitigation=dtp", "device=cpu", "threads=1", "progress=false", "batch_size=1"]


def command(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                                                os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder(run_dir: Path) -> tuple[dict[str, bytes], pd.DataFrame, pd.DataFrame]:
    images = {p.name: p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))}
    return images, pd.read_csv(run_dir / "generations.csv"), pd.read_csv(run_dir / "trajectories.csv")


def test_accelerate_two_processes_make_the_one_process_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` starts two processes through torchrun (on a machine
    without GPUs too; `--cpu` alone starts one); each is a shard, the last one to finish writes the tables.
    batch_size=1: each image is computed alone in both runs, so the bytes match (a shard's batches hold other
    images than the one process's, which moves float rounding as batch_size does: within 1/255)."""
    one = memguard_here("run", *RUN, f"model.path={tiny_model_dir}", f"run_dir={tmp_path / 'one'}",
                        cwd=tmp_path)  # the one-process folder: the command, in this process
    assert one.returncode == 0, one.stderr
    two = command("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                  "-m", "memguard.cli", "run", *RUN, f"model.path={tiny_model_dir}", f"run_dir={tmp_path / 'two'}",
                  cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    images_one, gens_one, traj_one = folder(tmp_path / "one")
    images_two, gens_two, traj_two = folder(tmp_path / "two")
    assert len(images_one) == 9 and images_two == images_one  # byte-identical PNGs (records included)
    pd.testing.assert_frame_equal(gens_two, gens_one)
    pd.testing.assert_frame_equal(traj_two, traj_one)
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert set(metrics["shards"]) == {"0/2", "1/2"}
    assert sum(s["images_made"] for s in metrics["shards"].values()) == 9
    assert metrics["n_images"] == 9


def test_submitit_local_sweep_completes_both_folders(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
    result = command("-m", "memguard.cli", "run", "-m", "hydra/launcher=submitit_local",
                     *[o for o in RUN if not o.startswith("mitigation=")], f"model.path={tiny_model_dir}",
                     "mitigation=none,uncond", "hydra.launcher.timeout_min=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("none", "uncond"):
        run_dir = tmp_path / "outputs" / "runs" / "custom" / name
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["mitigation"] == name and metrics["n_images"] == 9
        assert len(list((run_dir / "images").glob("*.png"))) == 9 and (run_dir / "grid.png").is_file()


def test_slurm_launcher_config_has_gpu_defaults() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
    from hydra import compose, initialize_config_dir

    from memguard.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.cpus_per_task) == (1, 1, 8)
    assert launcher.timeout_min == 720 and launcher.partition is None  # the cluster's default partition


def test_missing_launcher_plugin_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    from memguard.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.") else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        main(["run", "-m", "hydra/launcher=submitit_slurm", "mitigation=none,dtp"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "memguard: error: hydra/launcher=submitit_slurm needs the hydra-submitit-launcher package, which is not "
        "installed; install memguard's cluster extra: pip install -e '.[cluster]' (or pip install hydra-submitit-launcher)")
