"""One model, many concurrent requests: a single worker thread owns the model and answers queued
jobs in batches (jobs that arrive within ``wait_ms`` of each other and share sampling settings are
generated together, left-padded); a streamed job is generated on its own.

A job fails alone: when a batch fails, each of its jobs is generated again by itself, so the one
that cannot be generated gets the error and the others their replies. A cancelled job (its client
went away) is dropped before it starts, and a cancelled stream stops at its next token.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from mmkit.inference.generation import AnswerGenerator, Prompt, Reply, Sampling


@dataclass
class Job:
    prompt: Prompt
    sampling: Sampling
    # Set for a streamed job: called in the worker thread with each piece of text as it comes.
    on_piece: Callable[[str], None] | None = None
    result: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Batcher:
    def __init__(self, generator: AnswerGenerator, max_batch_size: int, wait_ms: float) -> None:
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000
        self._jobs: queue.Queue[Job] = queue.Queue()
        # Totals for GET /health; counters, not a list, so a server up for weeks holds no history.
        self.batches = 0
        self.requests_answered = 0
        self.largest_batch = 0
        self.cancelled = 0
        threading.Thread(target=self._work, name="mmkit-generation", daemon=True).start()

    def submit(self, job: Job) -> Job:
        """Queues ``job``; its ``result`` future gets the :class:`Reply` or the error."""
        self._jobs.put(job)
        return job

    def answer(self, prompt: Prompt, sampling: Sampling) -> Reply:
        """The reply, waiting for it (for callers without an event loop)."""
        return self.submit(Job(prompt, sampling)).result.result()

    def _work(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            deadline = time.monotonic() + self.wait_s
            while len(jobs) < self.max_batch_size:
                try:
                    jobs.append(self._jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            live = [job for job in jobs if not self._dropped(job)]
            for job in [j for j in live if j.on_piece is not None]:
                if not self._dropped(job):  # its client may have left while earlier streams ran
                    self._stream(job)
            plain = [j for j in live if j.on_piece is None]
            for sampling in dict.fromkeys(j.sampling for j in plain):
                self._answer([j for j in plain if j.sampling == sampling and not self._dropped(j)], sampling)

    def _dropped(self, job: Job) -> bool:
        if not job.cancelled.is_set():
            return False
        self.cancelled += 1
        job.result.cancel()
        return True

    def _answer(self, jobs: list[Job], sampling: Sampling) -> None:
        if not jobs:
            return
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        try:
            replies = self.generator.replies([j.prompt for j in jobs], sampling)
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].result.set_exception(exc)
                return
            for job in jobs:  # find the one at fault: each alone
                self._answer([job], sampling)
            return
        self.requests_answered += len(jobs)
        for job, reply in zip(jobs, replies):
            job.result.set_result(reply)

    def _stream(self, job: Job) -> None:
        finished: list[Reply] = []
        self.batches += 1
        self.largest_batch = max(self.largest_batch, 1)
        try:
            for piece in self.generator.stream(job.prompt, job.sampling, on_finish=finished.append,
                                               cancelled=job.cancelled):
                job.on_piece(piece)
            if finished:
                self.requests_answered += 1
                job.result.set_result(finished[0])
            else:  # cancelled: the generation stopped early
                self.cancelled += 1
                job.result.cancel()
        except Exception as exc:
            job.result.set_exception(exc)
