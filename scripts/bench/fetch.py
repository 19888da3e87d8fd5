"""`memguard fetch` on an image URL list against fetching the same list one at a time, side by side in one run.

A webster500-shaped prompt file names 200 image URLs (one per prompt); local servers on 127.0.0.1 serve them,
each request held 50 ms before its answer (a slow remote host), the URLs spread over 20 servers (in a process of
their own, as remote hosts are) as LAION's images spread over many hosts (``fetch.per_host`` caps the requests to one host). Both runs are ``memguard fetch
scenario=webster500 sources.references.kind=url_list fetch.only=[references]`` in this process, into fresh
folders: the default settings (``fetch.workers``, ``fetch.per_host`` of conf/config.yaml), then
``fetch.workers=1``: one URL at a time, interleaved over rounds. Printed: the median times and their ratio.

    python scripts/bench/fetch.py                 # 200 URLs, 50 ms a request, 20 hosts
    python scripts/bench/fetch.py --urls 500 --delay 0.1
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def serve(images: dict[str, bytes], delay: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            time.sleep(delay)
            body = images.get(self.path.split("?")[0])
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def hosts(n_urls: int, n_hosts: int, delay: float, ports: "multiprocessing.Queue", stop: "multiprocessing.Event") -> None:
    """The servers, in a process of their own (a remote host's work is not the client's): their ports, then wait."""
    servers = [serve({f"/img/{i}.png": png(i) for i in range(h, n_urls, n_hosts)}, delay) for h in range(n_hosts)]
    ports.put([s.server_address[1] for s in servers])
    stop.wait()


def fetch_once(prompts: Path, folder: Path, extra: list[str]) -> float:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from memguard.cli import CONF_DIR
    from memguard.fetch.command import fetch

    data = folder / "data" / "webster500"
    data.mkdir(parents=True)
    (data / "sdv1_500_memorized.jsonl").write_bytes(prompts.read_bytes())
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["scenario=webster500", f"paths.data_dir={folder / 'data'}",
                                           "fetch.only=[references]", "sources.references.kind=url_list", *extra])
    start = time.perf_counter()
    lines = fetch(cfg)
    seconds = time.perf_counter() - start
    assert len(list((data / "gt_images").rglob("*.png"))) > 0, lines
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds each request is held (0.05)")
    parser.add_argument("--hosts", type=int, default=20, help="servers the URLs are spread over (20)")
    parser.add_argument("--rounds", type=int, default=3, help="each way this many times, interleaved; medians (3)")
    options = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import memguard  # noqa: F401  (import order: makes the torch stack importable)

    ports, stop = multiprocessing.Queue(), multiprocessing.Event()
    process = multiprocessing.Process(target=hosts, args=(options.urls, options.hosts, options.delay, ports, stop),
                                      daemon=True)
    process.start()
    rows = [(i, f"http://127.0.0.1:{port}/img/{i}.png") for h, port in enumerate(ports.get(timeout=60))
            for i in range(h, options.urls, options.hosts)]
    with tempfile.TemporaryDirectory(prefix="memguard-bench-fetch-") as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"caption": f"caption {i}", "index": i, "url": url}) + "\n"
                                   for i, url in sorted(rows)))
        times: dict[str, list[float]] = {"concurrent": [], "one": []}
        for r in range(options.rounds):  # interleaved: both see the same load on a shared machine
            times["concurrent"].append(fetch_once(prompts, Path(tmp) / f"a{r}", []))
            times["one"].append(fetch_once(prompts, Path(tmp) / f"b{r}", ["fetch.workers=1"]))
        concurrent, one_by_one = statistics.median(times["concurrent"]), statistics.median(times["one"])
    stop.set()
    process.join(10)
    print(f"{options.urls} image URLs, {options.delay * 1000:.0f} ms a request, {options.hosts} hosts, median of "
          f"{options.rounds} rounds")
    print(f"  memguard fetch (default workers and per-host limit): {concurrent:.2f} s  "
          f"({', '.join(f'{t:.2f}' for t in times['concurrent'])})")
    print(f"  one at a time (fetch.workers=1):                     {one_by_one:.2f} s  "
          f"({', '.join(f'{t:.2f}' for t in times['one'])})")
    print(f"  ratio: {one_by_one / concurrent:.1f}x")


if __name__ == "__main__":
    main()
