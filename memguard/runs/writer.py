"""Writing a run's PNGs in a background thread, so sampling never waits for PNG encoding.

A batch of images on a GPU is copied into pinned (page-locked) host memory without blocking (``non_blocking``
copy, a CUDA event marks its end); the thread waits for the event, then encodes and writes each PNG with its
record (:func:`memguard.runs.folder.write_image`, atomic per file). On the CPU the images are handed over as they
are. At most ``depth`` batches wait; an error in the thread is raised in the sampling thread at its next
``submit`` or at ``close``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from memguard.runs.folder import Record, write_image

_DONE = None


class ImageWriter:
    """``with ImageWriter() as writer: writer.submit(images, paths, records)``; leaving the block waits for every
    image to be written."""

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="memguard-png-writer", daemon=True)
        self._thread.start()

    def submit(self, images: Tensor, paths: Sequence[Path], records: Sequence[Record]) -> None:
        """Queue a batch ``(B, 3, H, W)`` in ``[0, 1]`` (any device) to be written as ``paths`` with ``records``."""
        self._raise()
        event = None
        if images.is_cuda:
            host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
            host.copy_(images, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            images = host
        self._queue.put((images, list(paths), list(records), event))

    def close(self) -> None:
        """Wait until every queued image is written; raise the writer's error, if any."""
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        self._raise()

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        try:
            self.close()  # the images made so far are written, also when sampling failed (a resume keeps them)
        except Exception:
            if exc_type is None:
                raise

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _work(self) -> None:
        while (item := self._queue.get()) is not _DONE:
            if self._error is not None:
                continue  # drain: the sampling thread raises the first error
            images, paths, records, event = item
            try:
                if event is not None:
                    event.synchronize()
                for image, path, record in zip(images, paths, records):
                    write_image(path, image, record)
            except BaseException as err:  # noqa: BLE001  (handed to the sampling thread)
                self._error = err
