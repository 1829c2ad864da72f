"""The request batcher of `lora-rm serve`: concurrent requests queue their sequences, one worker task scores the
oldest queued ones, up to `batch_size` from as many requests as fit, in one model call on a thread of its own."""

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class _Job:
    kind: str  # "texts": full texts; "rows": (prompt, response) pairs
    items: list[Any]
    done: asyncio.Future
    rewards: list[float] = field(default_factory=list)
    taken: int = 0  # items already handed to the model


class Batcher:
    """Scores queued requests together, `batch_size` sequences per model call, oldest first."""

    def __init__(self, model: Any, batch_size: int, normalize: bool = False):
        self.model, self.batch_size, self.normalize = model, batch_size, normalize
        self.pending = 0  # requests waiting for their rewards
        self.model_calls = self.sequences = 0  # fewer calls than sequences: requests shared forwards
        self._jobs: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lora-rm-model")

    async def rewards(self, kind: str, items: list[Any]) -> list[float]:
        """The rewards of `items` (texts for kind "texts", (prompt, response) pairs for "rows"), in order.
        Raises what the model call raised for them (UserError for input the model refuses)."""
        if not items:
            return []
        job = _Job(kind, items, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._wake.set()
        self.pending += 1
        try:
            return await job.done
        finally:
            self.pending -= 1

    async def run(self) -> None:
        """The worker: runs until cancelled."""
        while True:
            while self._jobs and self._jobs[0].done.done():
                self._jobs.popleft()
            if not self._jobs:
                self._wake.clear()
                await self._wake.wait()
                continue
            kind = self._jobs[0].kind
            await self._score(kind, self._take(kind))

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _take(self, kind: str) -> list[tuple[_Job, int, int]]:
        """The oldest unscored items of `kind`, at most batch_size, as (job, start, stop) slices."""
        room, slices = self.batch_size, []
        for job in self._jobs:
            if job.kind != kind or job.done.done():
                continue
            n = min(room, len(job.items) - job.taken)
            if n:
                slices.append((job, job.taken, job.taken + n))
                job.taken += n
                room -= n
            if not room:
                break
        return slices

    async def _score(self, kind: str, slices: list[tuple[_Job, int, int]]) -> None:
        items = [x for job, start, stop in slices for x in job.items[start:stop]]
        loop = asyncio.get_running_loop()
        self.model_calls += 1
        self.sequences += len(items)
        try:
            rewards = await loop.run_in_executor(self._executor, self._call_model, kind, items)
        except Exception as e:
            if len(slices) > 1:  # one bad request must not fail the others it shares a batch with
                for s in slices:
                    await self._score(kind, [s])
            elif not slices[0][0].done.done():
                slices[0][0].done.set_exception(e)
            return
        for job, start, stop in slices:
            job.rewards += rewards[: stop - start]
            rewards = rewards[stop - start :]
            if len(job.rewards) == len(job.items) and not job.done.done():
                job.done.set_result(job.rewards)

    def _call_model(self, kind: str, items: list[Any]) -> list[float]:
        if kind == "texts":
            return self.model.score_texts(items, self.batch_size, self.normalize)
        prompts, responses = zip(*items)
        return self.model.score(list(prompts), list(responses), self.batch_size, self.normalize)
