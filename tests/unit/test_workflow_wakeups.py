"""The polling default a workflow storage without notifications hands its waiters."""

from __future__ import annotations

import anyio

from pgstreams._workflows.storage import LocalWakeup, local_wakeups


async def test_a_fire_between_arm_and_wait_is_not_missed() -> None:
    async with local_wakeups() as wake:
        assert isinstance(wake, LocalWakeup)
        assert not wake.arm()
        wake.fire()  # after the look, before the sleep
        with anyio.fail_after(5):
            assert await wake.wait(60)
        assert wake.arm()  # cleared
        assert not wake.arm()


async def test_without_a_fire_it_waits_the_poll_interval() -> None:
    wake = LocalWakeup()
    wake.arm()
    assert not await wake.wait(0.01)


async def test_a_fire_wakes_a_sleeping_waiter() -> None:
    wake = LocalWakeup()
    woken: list[bool] = []

    async def sleeper(task_status: anyio.abc.TaskStatus[None]) -> None:
        wake.arm()
        task_status.started()
        woken.append(await wake.wait(60))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(sleeper)
            wake.fire()
    assert woken == [True]
