"""Many kernels' questions to one place answered by one call (e.g. one ssh command per host).

Rules: questions for a key queue up; while no call for that key is running, one starts with
everything queued (at most ``max_batch``); questions arriving meanwhile wait for the next one.
So a host is asked at most one question at a time, however many kernels it runs, and a lone
question waits for nothing. A failed call fails the questions it carried, and only those.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741 - item
R = TypeVar("R")


class Batcher(Generic[K, I, R]):
    def __init__(self, answer: Callable[[K, list[I]], Awaitable[list[R]]], max_batch: int = 100) -> None:
        self._answer = answer
        self.max_batch = max_batch
        self._queues: dict[K, list[tuple[I, asyncio.Future[R]]]] = {}
        self._running: dict[K, asyncio.Task[None]] = {}
        self.calls = 0  # for the benchmarks: how many batched calls were made
        self.questions = 0

    async def ask(self, key: K, item: I) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queues.setdefault(key, []).append((item, future))
        self.questions += 1
        if key not in self._running:
            self._running[key] = loop.create_task(self._drain(key))
        return await future

    async def _drain(self, key: K) -> None:
        try:
            while self._queues.get(key):
                queue = self._queues[key]
                batch, self._queues[key] = queue[: self.max_batch], queue[self.max_batch :]
                self.calls += 1
                try:
                    answers = await self._answer(key, [item for item, _ in batch])
                except Exception as err:  # handed to every question the call carried
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                for (_, future), answer in zip(batch, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
        finally:
            self._running.pop(key, None)
            if not self._queues.get(key):
                self._queues.pop(key, None)
