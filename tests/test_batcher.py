"""The serve batcher's scheduling, against a scoring function that records its batches."""

from __future__ import annotations

import asyncio

from lora_rm.serving.batcher import Batcher


class Recorder:
    def __init__(self):
        self.batches: list[tuple[str, list]] = []

    def __call__(self, kind: str, items: list) -> list[float]:
        self.batches.append((kind, list(items)))
        return [float(x) for x in items]


async def _run(batcher: Batcher, *requests):
    """Queue every request (kind, items) before the worker starts; their results, in order."""
    tasks = [asyncio.ensure_future(batcher.rewards(kind, items)) for kind, items in requests]
    await asyncio.sleep(0)
    worker = asyncio.ensure_future(batcher.run())
    try:
        return await asyncio.gather(*tasks)
    finally:
        worker.cancel()
        batcher.close()


def test_a_small_request_behind_a_huge_one_is_in_the_first_batch():
    record = Recorder()
    huge, small = list(range(100)), [1000, 1001]
    got = asyncio.run(_run(Batcher(record, 8), ("texts", huge), ("texts", small)))
    assert got == [[float(x) for x in huge], [1000.0, 1001.0]]
    assert record.batches[0] == (
        "texts",
        [0, 1, 2, 3, 4, 5, 1000, 1001],
    )  # equal shares; small takes all it needs
    assert all(len(items) == 8 for _, items in record.batches[:-1])


def test_requests_that_need_more_than_their_share_stay_whole_oldest_first():
    """Eight requests of 8 (a prompt's completions each) and room for 32: equal shares would split every request
    over two batches (its prompt read twice); pooled, the 4 oldest are read whole, then the next 4."""
    record = Recorder()
    requests = [("texts", list(range(10 * r, 10 * r + 8))) for r in range(8)]
    got = asyncio.run(_run(Batcher(record, 32), *requests))
    assert got == [[float(x) for x in items] for _, items in requests]
    assert [items for _, items in record.batches] == [
        [x for _, items in requests[:4] for x in items],
        [x for _, items in requests[4:] for x in items],
    ]


def test_a_request_over_the_room_takes_what_the_small_ones_leave():
    record = Recorder()
    asyncio.run(
        _run(Batcher(record, 8), ("texts", list(range(20))), ("texts", [100, 101, 102]), ("texts", [200]))
    )
    assert record.batches[0] == ("texts", [0, 1, 2, 3, 100, 101, 102, 200])  # the small ones whole
    assert [len(items) for _, items in record.batches] == [8, 8, 8]


def test_kinds_take_turns():
    record = Recorder()
    asyncio.run(_run(Batcher(record, 4), ("texts", list(range(12))), ("rows", [7])))
    assert [kind for kind, _ in record.batches] == ["texts", "rows", "texts", "texts"]


def test_a_cancelled_request_is_dropped_before_it_is_scored():
    record = Recorder()

    async def main():
        batcher = Batcher(record, 4)
        gone = asyncio.ensure_future(batcher.rewards("texts", list(range(40))))
        kept = asyncio.ensure_future(batcher.rewards("texts", [100]))
        await asyncio.sleep(0)
        gone.cancel()
        worker = asyncio.ensure_future(batcher.run())
        try:
            assert await kept == [100.0]
        finally:
            worker.cancel()
            batcher.close()
        return batcher.dropped

    assert asyncio.run(main()) == 40
    assert record.batches == [("texts", [100])]
