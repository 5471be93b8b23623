"""Runs the model in one worker thread: requests join the running batch between decode steps and
leave it when they end (continuous batching, lorakit.serve.scheduler).

The event loop submits a job and reads its events from an asyncio queue: ("text", delta) as text
becomes final, then ("done", GenerationResult) or ("error", exception). Before every decode step the
worker lets the waiting jobs join (up to `max_batch_size` rows, at most as many distinct adapters as
can be loaded at once, and about `max_prefill_tokens` of prompts while rows are running, so that a
burst of long prompts stalls the running rows for one bounded prefill), drops the rows whose client
went away, and decodes one token for every row. An idle worker waits for a first job and gathers
others for `window_s`. With `static=True` nothing joins while rows run: each batch runs to its end.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from lorakit.serve.generate import GenerationRequest, Row, check_request
from lorakit.serve.registry import AdapterRegistry
from lorakit.serve.scheduler import Event, RunningBatch

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
    finished: float | None = None  # when it was answered ("done" or "error")

    def emit(self, kind: str, value) -> None:
        """Called from the worker thread: hand an event to the event loop."""
        if kind != "text":
            self.finished = time.monotonic()
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class ShuttingDown(RuntimeError):
    """The server stopped before this request ran."""


class QueueFull(RuntimeError):
    """As many requests wait as the server queues; this one is turned away."""


class InvalidRequest(ValueError):
    """The request cannot be generated (a bad seed, prompt, length, ...): it fails alone, not its batch."""


class Batcher:
    def __init__(self, registry: AdapterRegistry, tokenizer, max_batch_size: int = 32, window_s: float = 0.01,
                 max_queue: int | None = None, static: bool = False, max_prefill_tokens: int = 4096):
        if max_batch_size < 1 or window_s < 0 or (max_queue is not None and max_queue < 0):
            raise ValueError(f"max_batch_size must be >= 1, the batch window and the queue >= 0, "
                             f"got {max_batch_size}, {window_s} and {max_queue}")
        self.registry, self.tokenizer = registry, tokenizer
        self.max_batch_size, self.window_s, self.max_queue = max_batch_size, window_s, max_queue
        self.static, self.max_prefill_tokens = static, max_prefill_tokens
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: deque[Job] = deque()  # jobs that could not join yet (adapters, prefill budget): first next
        self._thread = threading.Thread(target=self._run, name="lorakit-model", daemon=True)
        self._jobs: dict[Row, Job] = {}  # the running batch's rows -> their jobs
        self._stopping = False

    @property
    def running(self) -> int:
        """Requests in the running batch."""
        return len(self._jobs)

    @property
    def waiting(self) -> int:
        """Requests queued to join the running batch."""
        return self._queue.qsize() + len(self._held)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the running rows, fail the jobs still waiting, end the worker thread."""
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
        batch = RunningBatch(self.registry.bank, self.tokenizer, self.max_batch_size)
        while (jobs := self._next_jobs(batch)) is not None:
            try:
                self._join(batch, jobs)
            except Exception as err:  # the newcomers fail; the running rows, not touched yet, go on
                self._fail("joining", [j for j in jobs if j.finished is None], err)
            try:
                cancelled = [row for row in batch.rows if self._jobs[row].cancelled]
                batch.leave(cancelled)  # their clients went away: the rows leave, their slots are free
                for row in cancelled:
                    del self._jobs[row]
                self._send(batch.step())
            except Exception as err:  # a failed step fails its rows; the worker goes on serving
                self._fail("a decode step of", list(self._jobs.values()), err)
                self._jobs.clear()
                batch = RunningBatch(self.registry.bank, self.tokenizer, self.max_batch_size)
        for job in [*self._held, *iter_queue(self._queue)]:
            job.emit("error", ShuttingDown("the server is shutting down"))

    def _fail(self, what: str, jobs: list[Job], err: Exception) -> None:
        log.exception("generation failed in %s %d requests", what, len(jobs))
        for job in jobs:
            if job.finished is None:
                job.emit("error", err)

    def _next_jobs(self, batch: RunningBatch) -> list[Job] | None:
        """The jobs that join before the next step (maybe none); None once stop() was called and no
        row runs. An empty batch waits for a first job, then gathers more for window_s."""
        if self._stopping or (self.static and batch.rows):
            return None if not batch.rows else []
        idle = not batch.rows
        adapters = {row.request.adapter for row in batch.rows} - {None}
        room = self.max_batch_size - len(batch.rows)
        jobs: list[Job] = []
        skipped: list[Job] = []
        deadline, longest = None, 0
        while len(jobs) < room:
            try:
                if self._held:
                    job = self._held.popleft()
                elif idle:
                    job = self._queue.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stopping = True
                break
            if job.cancelled:
                continue
            name = job.request.adapter
            wide = max(longest, len(job.request.prompt_ids))  # the newcomers' prefill is jobs x wide tokens
            if ((name is not None and name not in adapters and len(adapters) >= self.registry.max_loaded)
                    or (not idle and jobs and (len(jobs) + 1) * wide > self.max_prefill_tokens)):
                skipped.append(job)
                continue
            jobs.append(job)
            longest = wide
            if name is not None:
                adapters.add(name)
            deadline = deadline or time.monotonic() + self.window_s
        self._held.extendleft(reversed(skipped))
        if self._stopping:  # what was gathered fails with the rest of the queue
            self._held.extendleft(reversed(jobs))
            return None if not batch.rows else []
        return jobs

    def _join(self, batch: RunningBatch, jobs: list[Job]) -> None:
        """Valid jobs whose adapters load join the batch (prefilled, first token sampled); others fail alone."""
        jobs = [j for j in jobs if self._valid(j)]
        busy = {row.request.adapter for row in batch.rows} - {None}
        failures = self.registry.prepare({j.request.adapter for j in jobs} - {None}, busy)
        for job in jobs:
            if job.request.adapter in failures:
                job.emit("error", failures[job.request.adapter])
        jobs = [j for j in jobs if j.request.adapter not in failures]
        events = batch.join([j.request for j in jobs])
        self._jobs.update((row, job) for job, (row, _) in zip(jobs, events))
        self._send(events)

    def _send(self, events: list[Event]) -> None:
        """Each row's new text to its job, and the result of the rows that finished: one hand-over to
        the event loop per step, not one per row (each wakes the loop and takes the GIL from torch)."""
        now = time.monotonic()
        out: dict[asyncio.AbstractEventLoop, list] = {}
        for row, delta in events:
            job = self._jobs[row]
            job.first_token = job.first_token or now
            if delta and job.stream:
                out.setdefault(job.loop, []).append((job.events, ("text", delta)))
            if row.finish_reason is not None:  # it has left the batch
                del self._jobs[row]
                job.finished = now
                out.setdefault(job.loop, []).append((job.events, ("done", row.result())))
        for loop, items in out.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _valid(self, job: Job) -> bool:
        """Whether the job's request can be generated; if not, it fails alone (not its whole batch)."""
        try:
            check_request(job.request, self.registry.bank.model)
        except ValueError as err:
            job.emit("error", InvalidRequest(str(err)))
            return False
        return True


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    """In the event loop: events into their jobs' queues."""
    for events, event in items:
        events.put_nowait(event)


def iter_queue(q: queue.Queue):
    """What is left in a queue, without waiting (the stop marker skipped)."""
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return
        if item is not None:
            yield item
