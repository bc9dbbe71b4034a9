"""Questions to one place share calls: one in flight per key, the rest batched behind it."""

from __future__ import annotations

import asyncio

import pytest

from kernel_operator.backends.batching import Batcher


async def test_a_hundred_questions_to_one_host_take_one_call() -> None:
    calls: list[tuple[str, list[int]]] = []

    async def answer(key: str, items: list[int]) -> list[int]:
        calls.append((key, items))
        await asyncio.sleep(0.05)
        return [i * 2 for i in items]

    batcher: Batcher[str, int, int] = Batcher(answer)
    results = await asyncio.gather(*(batcher.ask("h1", i) for i in range(100)), batcher.ask("h2", 7))
    assert results == [i * 2 for i in range(100)] + [14]
    # Asked together, answered together; a question asked while a call runs waits for the next.
    assert [len(items) for key, items in calls if key == "h1"] == [100]
    assert batcher.calls == 2
    first = asyncio.ensure_future(batcher.ask("h1", 1))
    await asyncio.sleep(0.01)  # its call is running
    late = await asyncio.gather(*(batcher.ask("h1", i) for i in range(5)))
    assert await first == 2 and late == [0, 2, 4, 6, 8]
    assert [len(items) for key, items in calls if key == "h1"] == [100, 1, 5]


async def test_a_failed_call_fails_only_the_questions_it_carried() -> None:
    attempts = 0

    async def answer(key: str, items: list[int]) -> list[int]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("the host went away")
        return items

    batcher: Batcher[str, int, int] = Batcher(answer)
    with pytest.raises(ConnectionError):
        await batcher.ask("h1", 1)
    assert await batcher.ask("h1", 2) == 2


async def test_batches_are_capped() -> None:
    sizes: list[int] = []

    async def answer(key: str, items: list[int]) -> list[int]:
        sizes.append(len(items))
        await asyncio.sleep(0)
        return items

    batcher: Batcher[str, int, int] = Batcher(answer, max_batch=10)
    await asyncio.gather(*(batcher.ask("h", i) for i in range(31)))
    assert max(sizes) <= 10 and sum(sizes) == 31
