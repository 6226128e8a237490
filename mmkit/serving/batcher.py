"""One model, many concurrent requests: a single worker thread owns the model and answers queued
requests in batches (requests that arrive within ``wait_ms`` of each other and share sampling
settings are generated together, left-padded); a streamed request is generated on its own."""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator

from mmkit.inference.generation import AnswerGenerator, Prompt, Reply, Sampling

_DONE = object()


@dataclass
class _Job:
    prompt: Prompt
    sampling: Sampling
    result: Future = field(default_factory=Future)
    pieces: queue.Queue | None = None  # set for streamed jobs


class Batcher:
    def __init__(self, generator: AnswerGenerator, max_batch_size: int, wait_ms: float) -> None:
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000
        self._jobs: queue.Queue[_Job] = queue.Queue()
        # Totals for GET /health; counters, not a list, so a server up for weeks holds no history.
        self.batches = 0
        self.requests_answered = 0
        self.largest_batch = 0
        threading.Thread(target=self._work, name="mmkit-generation", daemon=True).start()

    def answer(self, prompt: Prompt, sampling: Sampling) -> Reply:
        job = _Job(prompt, sampling)
        self._jobs.put(job)
        return job.result.result()

    def stream(self, prompt: Prompt, sampling: Sampling, on_finish: Callable[[Reply], None]) -> Iterator[str]:
        job = _Job(prompt, sampling, pieces=queue.Queue())
        self._jobs.put(job)
        while (piece := job.pieces.get()) is not _DONE:
            yield piece
        on_finish(job.result.result())  # re-raises a failure of the generation

    def _work(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            deadline = time.monotonic() + self.wait_s
            while len(jobs) < self.max_batch_size:
                try:
                    jobs.append(self._jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            for job in [j for j in jobs if j.pieces is not None]:
                self._stream(job)
            plain = [j for j in jobs if j.pieces is None]
            for sampling in dict.fromkeys(j.sampling for j in plain):
                self._answer([j for j in plain if j.sampling == sampling], sampling)

    def _answer(self, jobs: list[_Job], sampling: Sampling) -> None:
        self.batches += 1
        self.requests_answered += len(jobs)
        self.largest_batch = max(self.largest_batch, len(jobs))
        try:
            replies = self.generator.replies([j.prompt for j in jobs], sampling)
        except Exception as exc:
            for job in jobs:
                job.result.set_exception(exc)
            return
        for job, reply in zip(jobs, replies):
            job.result.set_result(reply)

    def _stream(self, job: _Job) -> None:
        finished: list[Reply] = []
        try:
            for piece in self.generator.stream(job.prompt, job.sampling, on_finish=finished.append):
                job.pieces.put(piece)
            job.result.set_result(finished[0])
        except Exception as exc:
            job.result.set_exception(exc)
        finally:
            job.pieces.put(_DONE)
