"""Read ahead in a background thread: `for batch in prefetch(batches)`."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_END = object()


# torch's threads per computing thread, as the process started (OMP_NUM_THREADS, or one per
# core); read at import, before any reader thread has called `one_torch_thread`
COMPUTE_THREADS = torch.get_num_threads()


def cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's or `taskset`'s
    limit, which `os.cpu_count()` does not see) where the OS has one (Linux), else every
    core (macOS, Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def reader_has_a_core() -> bool:
    """Whether a reader thread beside the computing one gets a core of its own: torch
    computes on fewer threads than the process has cores. Where its threads fill every
    core, a reader only takes turns with them (`stages.infer_pseudo_labels.read_ahead`)."""
    return cores() > COMPUTE_THREADS


def one_torch_thread() -> None:
    """Run this thread's torch operations on itself alone. Each Python thread that calls
    torch gets its own OpenMP team of `get_num_threads()` workers, and those spin after
    every parallel region: a reader thread's team (batch `cat`s, indexing) took cores from
    the training step's. Measured here (2 cores, resnet10t teacher on 1,000 images): 1.76 s
    an epoch with the readers' own teams, 1.36 s with this, 1.26 s with no reader thread.
    The calling thread's team shrinks, but `torch.set_num_threads` also sets the size that
    threads started later begin with: see `compute_threads`."""
    torch.set_num_threads(1)


def compute_threads() -> None:
    """Give the calling thread its full team of torch threads (`COMPUTE_THREADS`). Training
    and inference call this first: a thread started after a reader's `one_torch_thread`
    (a task runner's worker thread, e.g. the labelling sub-flow's) would otherwise begin
    with one, and compute on one core (`tests/test_augment_engine.py`)."""
    if torch.get_num_threads() != COMPUTE_THREADS:
        torch.set_num_threads(COMPUTE_THREADS)


class prefetch(Iterator[T]):  # noqa: N801 - used like a function: `for x in prefetch(items)`
    """Iterate over `items` produced up to `depth` ahead in a background thread, which starts
    at once: producing them (reading and decoding, mostly in C) overlaps whatever the caller
    does meanwhile (loading a model, a forward pass; both release the GIL). Errors surface in
    the consumer; `close()` (or leaving a `with` block) stops and closes the producer."""

    def __init__(self, items: Iterable[T], depth: int = 2):
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._worker = threading.Thread(
            target=self._produce, args=(items,), name="prefetch", daemon=True
        )
        self._worker.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterable[T]) -> None:
        one_torch_thread()
        source = iter(items)
        try:
            for item in source:
                if not self._put((item, None)):
                    return
            self._put((_END, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((_END, e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __next__(self) -> T:
        if self._stop.is_set():
            raise StopIteration
        item, error = self._ready.get()
        if item is _END:
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        if self._worker is not threading.current_thread():
            self._worker.join()

    def __enter__(self) -> prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()
