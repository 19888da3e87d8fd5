"""Similarity and FID of 10k generations against 10k references from cached statistics, timed.

Copy similarity: both sets' embeddings are read from cache files as memguard.metrics.similarity.embed_files
writes them (random unit vectors of SSCD's size: the time does not depend on the values), then
memguard.metrics.similarity.nearest_references (chunked matrix products). FID: the references' running sums
are read from a cache file as memguard.metrics.fid.fid_of_files writes it, the generations' features are
added in batches, and torchmetrics computes the distance (2048-d, Inception's size). Each step is timed
separately, median over rounds.

    python scripts/bench/similarity.py                  # 10k x 10k, 1024-d SSCD (sscd_disc_large), 2048-d FID
    python scripts/bench/similarity.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import memguard  # noqa: F401  (import order: makes the torch stack importable)
from memguard.metrics.fid import REAL_STATES, streaming_fid
from memguard.metrics.similarity import nearest_references


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=10_000)
    parser.add_argument("--references", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=1024, help="embedding size (sscd_disc_large: 1024)")
    parser.add_argument("--fid-dim", type=int, default=2048, help="FID feature size (Inception pool: 2048)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    cache = Path(tempfile.mkdtemp(prefix="memguard-bench-similarity-"))
    for name, n in (("generations", args.generations), ("references", args.references)):
        torch.save({"embeddings": F.normalize(torch.randn(n, args.dim, generator=g), dim=1)}, cache / f"{name}.pt")
    references = torch.randn(args.references, args.fid_dim, generator=g, dtype=torch.float64).abs()
    metric = streaming_fid(args.fid_dim)
    metric.update(references, real=True)
    torch.save({s: getattr(metric, s) for s in REAL_STATES}, cache / "fid.pt")
    generated = torch.randn(args.generations, args.fid_dim, generator=g, dtype=torch.float64).abs() * 1.1

    def similarity() -> dict[str, float]:
        t_load, (gen, ref) = timed(lambda: [torch.load(cache / f"{n}.pt")["embeddings"]
                                            for n in ("generations", "references")])
        t_near, nearest = timed(lambda: nearest_references(gen, ref))
        assert nearest.similarity.shape == (args.generations,)
        return {"load cached embeddings": t_load, "nearest_references": t_near}

    def fid() -> dict[str, float]:
        def load():
            m, cached = streaming_fid(args.fid_dim), torch.load(cache / "fid.pt")
            for s in REAL_STATES:
                setattr(m, s, cached[s])
            return m

        t_load, m = timed(load)
        t_update, _ = timed(lambda: [m.update(generated[i : i + 64], real=False) for i in range(0, len(generated), 64)])
        t_compute, value = timed(m.compute)
        assert torch.isfinite(value)
        return {"FID: load cached sums": t_load, "FID: add generations (64 a batch)": t_update,
                "FID: compute": t_compute}

    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for step, seconds in {**similarity(), **fid()}.items():
            times.setdefault(step, []).append(seconds)
    print(f"{args.generations} generations x {args.references} references, embeddings {args.dim}-d, FID features "
          f"{args.fid_dim}-d, threads={args.threads}, median of {args.rounds} rounds")
    for step, values in times.items():
        print(f"  {step:36s} {statistics.median(values):7.3f} s")
    total = statistics.median(times["load cached embeddings"]) + statistics.median(times["nearest_references"])
    print(f"  {'similarity from cached embeddings':36s} {total:7.3f} s   (target <= 5 s)")


if __name__ == "__main__":
    main()
