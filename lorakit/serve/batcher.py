"""Gathers concurrent requests into batches and runs them on the model in one worker thread.

The event loop submits a job and reads its events from an asyncio queue: ("text", delta) as text
becomes final, then ("done", GenerationResult) or ("error", exception). The worker waits for a
first job, collects more for `window_s` (up to `max_batch_size`, and at most as many distinct
adapters as can be loaded at once), loads their adapters and generates them together.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from lorakit.serve.generate import GenerationRequest, check_request, generate_batch
from lorakit.serve.registry import AdapterRegistry

log = logging.getLogger("lorakit.serve")


@dataclass
class Job:
    """One request in flight: what to generate, and where its events go."""
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    stream: bool = False  # whether it wants ("text", delta) events
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the event loop when the client went away
    submitted: float = field(default_factory=time.monotonic)  # times for the metrics (time.monotonic)
    first_token: float | None = None
    finished: float | None = None

    def emit(self, kind: str, value) -> None:
        """Called from the worker thread: hand an event to the event loop."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class ShuttingDown(RuntimeError):
    """The server stopped before this request ran."""


class QueueFull(RuntimeError):
    """As many requests wait as the server queues; this one is turned away."""


class InvalidRequest(ValueError):
    """The request cannot be generated (a bad seed, prompt, length, ...): it fails alone, not its batch."""


class Batcher:
    def __init__(self, registry: AdapterRegistry, tokenizer, max_batch_size: int = 32, window_s: float = 0.01,
                 max_queue: int | None = None):
        if max_batch_size < 1 or window_s < 0 or (max_queue is not None and max_queue < 0):
            raise ValueError(f"max_batch_size must be >= 1, the batch window and the queue >= 0, "
                             f"got {max_batch_size}, {window_s} and {max_queue}")
        self.registry, self.tokenizer = registry, tokenizer
        self.max_batch_size, self.window_s, self.max_queue = max_batch_size, window_s, max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: deque[Job] = deque()  # jobs left out of a batch for its adapter count; they go first
        self._thread = threading.Thread(target=self._run, name="lorakit-model", daemon=True)
        self.running = 0  # requests in the batch being generated

    @property
    def waiting(self) -> int:
        """Requests queued for a later batch."""
        return self._queue.qsize() + len(self._held)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the running batch, fail the jobs still waiting, end the worker thread."""
        self._queue.put(None)
        self._thread.join()

    def submit(self, request: GenerationRequest, stream: bool = False) -> Job:
        """Queue a request (from the event loop); read its events from job.events. QueueFull when
        max_queue requests wait already."""
        if self.max_queue is not None and self.waiting >= self.max_queue:
            raise QueueFull(f"the server's queue is full ({self.max_queue} requests wait for a batch); "
                            "retry after a moment")
        job = Job(request, asyncio.get_running_loop(), stream)
        self._queue.put(job)
        return job

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._run_batch(batch)
            except Exception as err:  # a failed batch fails its requests; the worker goes on serving
                log.exception("generation failed for a batch of %d requests", len(batch))
                for job in batch:
                    job.emit("error", err)
        for job in [*self._held, *iter_queue(self._queue)]:
            job.emit("error", ShuttingDown("the server is shutting down"))

    def _next_batch(self) -> list[Job] | None:
        """Up to max_batch_size jobs, within the adapter limit; None once stop() was called."""
        batch: list[Job] = []
        skipped: list[Job] = []
        adapters: set[str] = set()
        deadline = None
        while len(batch) < self.max_batch_size:
            try:
                job = self._held.popleft() if self._held else self._queue.get(
                    timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if job is None:
                self._held.extendleft(reversed(batch + skipped))
                return None
            if job.cancelled:
                continue
            name = job.request.adapter
            if name is not None and name not in adapters and len(adapters) >= self.registry.max_loaded:
                skipped.append(job)
                continue
            batch.append(job)
            if name is not None:
                adapters.add(name)
            deadline = deadline or time.monotonic() + self.window_s
        self._held.extendleft(reversed(skipped))
        return batch

    def _run_batch(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if self._valid(j)]
        failures = self.registry.prepare({j.request.adapter for j in jobs if j.request.adapter is not None})
        for job in jobs:
            if job.request.adapter in failures:
                job.emit("error", failures[job.request.adapter])
        jobs = [j for j in jobs if j.request.adapter not in failures]
        if not jobs:
            return

        def on_text(row: int, delta: str) -> None:
            job = jobs[row]
            job.first_token = job.first_token or time.monotonic()
            if delta and job.stream:
                job.emit("text", delta)

        self.running = len(jobs)
        try:
            results = generate_batch(self.registry.bank, self.tokenizer, [j.request for j in jobs], on_text)
        finally:
            self.running = 0
        for job, result in zip(jobs, results):
            job.finished = time.monotonic()
            job.emit("done", result)

    def _valid(self, job: Job) -> bool:
        """Whether the job's request can be generated; if not, it fails alone (not its whole batch)."""
        try:
            check_request(job.request, self.registry.bank.model)
        except ValueError as err:
            job.emit("error", InvalidRequest(str(err)))
            return False
        return True


def iter_queue(q: queue.Queue):
    """What is left in a queue, without waiting (the stop marker skipped)."""
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return
        if item is not None:
            yield item
