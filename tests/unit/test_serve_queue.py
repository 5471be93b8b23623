"""The batcher's bounded queue: past max_queue waiting requests, submit refuses with QueueFull."""
import asyncio

import pytest

from lorakit.serve.batcher import Batcher, QueueFull
from lorakit.serve.generate import GenerationRequest


def test_submit_refuses_past_the_queue_bound():
    batcher = Batcher(registry=None, tokenizer=None, max_queue=2)  # not started: nothing leaves the queue

    async def fill():
        for _ in range(2):
            batcher.submit(GenerationRequest([1]))
        assert batcher.waiting == 2
        with pytest.raises(QueueFull, match="queue is full"):
            batcher.submit(GenerationRequest([1]))

    asyncio.run(fill())


def test_the_queue_bound_is_checked():
    with pytest.raises(ValueError, match="queue"):
        Batcher(registry=None, tokenizer=None, max_queue=-1)
