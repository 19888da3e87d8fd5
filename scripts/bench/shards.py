"""Sharding throughput: `memguard run` as one process vs two (accelerate launch, one shard each), side by side.

Measured in one run on the tiny scenario (CPU, one thread per process).

Each timed command is the whole `memguard run` (start-up, model loading, sampling, PNGs, tables and figures;
evaluation off), in a fresh run folder; the two are alternated over rounds and the median is reported, with
the ratio one process / two processes (the speed-up). The tiny dataset is written once before timing. On a
shared machine the speed-up is bounded by the cores other work leaves free: before and after the runs the
script measures that bound, the throughput of two concurrent single-threaded matrix-product loops over one.

    python scripts/bench/shards.py                       # 14 prompts x 16 seeds, 50 steps
    python scripts/bench/shards.py --images-per-prompt 4 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(command: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds


BURN = ("import time, torch; torch.set_num_threads(1); a = torch.randn(512, 512); t = time.perf_counter()\n"
        "for _ in range(400): a @ a\nprint(time.perf_counter() - t)")


def parallel_bound() -> float:
    """Throughput of two concurrent single-threaded CPU loops over one: 2.0 on two free cores."""
    def burn(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    return 2 * burn(1) / burn(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images-per-prompt", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    load, bound_before = os.getloadavg()[0], parallel_bound()
    work = Path(tempfile.mkdtemp(prefix="memguard-bench-shards-"))
    run = ["-m", "memguard.cli", "run", "scenario=tiny", f"images_per_prompt={args.images_per_prompt}",
           f"sampler.steps={args.steps}", "threads=1", "device=cpu", "evaluate=false", "progress=false",
           f"paths.output_dir={work}"]
    timed([sys.executable, *run, "images_per_prompt=1", "sampler.steps=1", f"run_dir={work}/warm"])  # dataset
    seconds: dict[str, list[float]] = {"1 process": [], "2 processes": []}
    for round_ in range(args.rounds):
        for name in sorted(seconds, reverse=bool(round_ % 2)):
            folder = f"run_dir={work}/{name.replace(' ', '_')}_{round_}"
            if name == "1 process":
                seconds[name].append(timed([sys.executable, *run, folder]))
            else:
                seconds[name].append(timed([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                            "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                                            *run, folder]))
    one, two = work / "1_process_0" / "images", work / "2_processes_0" / "images"
    files = sorted(p.name for p in one.glob("*.png"))
    assert files == sorted(p.name for p in two.glob("*.png")), "the two folders hold other images"
    diff = max(int(np.abs(np.asarray(Image.open(one / f), dtype=int) - np.asarray(Image.open(two / f), dtype=int)).max())
               for f in files)
    bound_after = parallel_bound()
    print(f"tiny scenario: {len(files)} images, {args.steps} steps, CPU, 1 thread per process, "
          f"{os.cpu_count()} cores, load average before: {load:.2f}, rounds={args.rounds}")
    for name, times in seconds.items():
        print(f"  {name:12s} {statistics.median(times):7.1f} s  ({len(files) / statistics.median(times):.2f} images/s; "
              f"{', '.join(f'{t:.1f}' for t in times)})")
    print(f"  speed-up 2 processes / 1 process: {statistics.median(seconds['1 process']) / statistics.median(seconds['2 processes']):.2f}x"
          f"   (largest pixel difference between the folders: {diff}/255)")
    print(f"  what the machine gave 2 processes over 1 (concurrent matrix-product loops): {bound_before:.2f}x before, "
          f"{bound_after:.2f}x after")


if __name__ == "__main__":
    main()
