"""Coarse deadlines: fire once, never early, not after removal, grouped per slot."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from portproxy.deadlines import Deadlines


def test_deadlines_fire_once_not_early_and_not_after_removal() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop, resolution=0.02)
        fired: dict[str, float] = {}
        done = asyncio.Event()
        # Times a few ms before a slot boundary two slots ahead, so a, b and gone share it.
        boundary = (math.ceil(loop.time() / 0.02) + 2) * 0.02
        due = {"a": boundary - 0.005, "b": boundary - 0.002, "gone": boundary - 0.008,
               "c": boundary + 0.05}

        def on(name: str) -> Callable[[], None]:
            def callback() -> None:
                assert name not in fired, f"{name} fired twice"
                fired[name] = loop.time()
                if name == "c":
                    done.set()
            return callback

        slots = {name: deadlines.add(when, name, on(name)) for name, when in due.items()}
        assert slots["a"] == slots["b"] == slots["gone"]  # same slot: grouped
        deadlines.remove(slots["gone"], "gone")
        assert len(deadlines) == 3
        async with asyncio.timeout(5):
            await done.wait()
        assert set(fired) == {"a", "b", "c"}
        for name, at in fired.items():
            assert at >= due[name] - 0.001, f"{name} fired early"
        assert fired["c"] >= fired["a"]
        assert len(deadlines) == 0

    asyncio.run(scenario())


def test_a_callback_can_file_a_new_deadline_in_the_slot_being_fired() -> None:
    # The relay re-arms from its callback when traffic moved its deadline; a re-armed
    # deadline that rounds to the slot being fired must still fire (in a new loop timer).
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop, resolution=0.01)
        done = asyncio.Event()
        calls: list[str] = []

        def second() -> None:
            calls.append("second")
            done.set()

        def first() -> None:
            calls.append("first")
            deadlines.add(loop.time(), "again", second)

        deadlines.add(loop.time() + 0.01, "first", first)
        async with asyncio.timeout(5):
            await done.wait()
        assert calls == ["first", "second"]

    asyncio.run(scenario())
