"""The request batcher of `lora-rm serve`: concurrent requests queue their sequences, one worker task scores them
`batch_size` at a time in one call of a scoring function, on a thread of its own.

Batches are shared fairly: each one gives every waiting request of its kind an equal share of the room (a request
that needs less takes less, the rest goes to the others), and kinds take turns, so one huge request cannot stall
small ones behind it. The requests that need more than their share pool theirs and take it oldest first, whole
where they fit: a request's sequences (a prompt's completions) stay in one batch, where the engine reads their
prompt once, rather than each request's prompt being read in every batch it is split over. A request whose
caller stopped waiting (its future cancelled: the client disconnected) has its unscored sequences dropped
before they reach the model.

The scoring function, `score_batch(kind, items) -> rewards`, is all the batcher knows of the model:
`model_scorer` builds it for a RewardModel; any other engine with that signature can take its place.
"""

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

ScoreBatch = Callable[[str, list[Any]], list[float]]


def model_scorer(model: Any, batch_size: int, normalize: bool = False) -> ScoreBatch:
    """`score_batch` for a RewardModel. Kinds: "texts", full texts read as `tokenizer(text)`; "template_texts",
    full texts that already carry the tokenizer's special tokens (a rendered chat template: tokenized without
    adding them again); "rows", (prompt, response) pairs built as in training."""

    def score_batch(kind: str, items: list[Any]) -> list[float]:
        if kind == "texts":
            return model.score_texts(items, batch_size, normalize)
        if kind == "template_texts":
            return model.score_texts(items, batch_size, normalize, chat=True)
        prompts, responses = zip(*items)
        return model.score(list(prompts), list(responses), batch_size, normalize)

    return score_batch


@dataclass(eq=False)
class _Job:
    kind: str
    items: list[Any]
    done: asyncio.Future
    rewards: list[float] = field(default_factory=list)
    taken: int = 0  # items already handed to the model

    @property
    def left(self) -> int:
        return len(self.items) - self.taken


class Batcher:
    """Scores queued requests together, at most `batch_size` sequences per call of `score_batch`."""

    def __init__(self, score_batch: ScoreBatch, batch_size: int):
        self.score_batch, self.batch_size = score_batch, batch_size
        self.pending = 0  # requests waiting for their rewards
        self.model_calls = self.sequences = 0  # fewer calls than sequences: requests shared forwards
        self.dropped = 0  # sequences never scored because their request was cancelled
        self._jobs: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._last_kind = ""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lora-rm-model")

    async def rewards(self, kind: str, items: list[Any]) -> list[float]:
        """The rewards of `items` (of one `kind` that `score_batch` knows), in order. Raises what the scoring
        call raised for them (UserError for input the model refuses). Cancelling the caller drops the items
        not yet handed to the model."""
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
            if job.done.cancelled():
                self.dropped += job.left

    async def run(self) -> None:
        """The worker: runs until cancelled."""
        while True:
            self._jobs = deque(j for j in self._jobs if not j.done.done() and j.left)
            if not self._jobs:
                self._wake.clear()
                await self._wake.wait()
                continue
            kind = self._next_kind()
            await self._score(kind, self._take(kind))

    async def on_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the model's thread, between two model calls (the tokenizer is not shared across threads)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _next_kind(self) -> str:
        """Kinds take turns: the oldest waiting request's kind, unless it had the last batch and another waits."""
        kinds = list(dict.fromkeys(j.kind for j in self._jobs))
        kind = kinds[1] if len(kinds) > 1 and kinds[0] == self._last_kind else kinds[0]
        self._last_kind = kind
        return kind

    def _take(self, kind: str) -> list[tuple[_Job, int, int]]:
        """Unscored items of `kind`, at most batch_size, as (job, start, stop) slices in queue order: shared
        equally among the waiting requests (water filling: the smallest take all they need, the rest split what
        is left), then the shares of the requests that need more pooled and given oldest first."""
        jobs = [j for j in self._jobs if j.kind == kind]
        room, share = self.batch_size, {}
        for i, job in enumerate(sorted(jobs, key=lambda j: j.left)):  # stable: equal needs, oldest first
            n = min(job.left, max(1, room // (len(jobs) - i)), room)
            share[job] = n
            room -= n
            if not room:
                break
        short = [j for j in jobs if share.get(j, 0) < j.left]  # queue order: oldest first
        pool = sum(share.get(j, 0) for j in short)
        for job in short:
            share[job] = min(job.left, pool)
            pool -= share[job]
        slices = []
        for job in jobs:
            if share.get(job):
                slices.append((job, job.taken, job.taken + share[job]))
                job.taken += share[job]
        return slices

    async def _score(self, kind: str, slices: list[tuple[_Job, int, int]]) -> None:
        items = [x for job, start, stop in slices for x in job.items[start:stop]]
        loop = asyncio.get_running_loop()
        self.model_calls += 1
        self.sequences += len(items)
        try:
            rewards = await loop.run_in_executor(self._executor, self.score_batch, kind, items)
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
