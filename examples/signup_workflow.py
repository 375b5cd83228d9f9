"""Table changes into a durable workflow: each new user runs an onboarding workflow once.

Run: python examples/signup_workflow.py   (no server needed: it starts an embedded one)
"""

from __future__ import annotations

from typing import Any

import anyio

import pgstreams as ps

onboard = ps.Workflow[dict[str, Any], dict[str, Any]]("onboard")
attempts: dict[str, int] = {}


async def create_account(email: str) -> dict[str, Any]:
    return {"account": f"acct-{email.split('@')[0]}"}


def send_welcome(account: str) -> str:
    attempts[account] = attempts.get(account, 0) + 1
    if attempts[account] == 1:
        raise ConnectionError("mail server busy")  # fails once, succeeds on the retry
    return f"welcome mail sent to {account}"


@onboard.run
async def _onboard(ctx: ps.WorkflowContext, user: dict[str, Any]) -> dict[str, Any]:
    account = await ctx.step("create-account", create_account, user["email"])
    mail = await ctx.step("welcome", send_welcome, account["account"], retries=3, backoff=0.05)
    return {"user": user["id"], **account, "mail": mail}


def user_input(change: ps.Change[dict[str, Any]]) -> dict[str, Any] | None:
    return change.new


def workflow_id(change: ps.Change[dict[str, Any]]) -> str:
    assert change.new is not None
    return f"onboard-{change.new['id']}"  # one run per user, however often it is seen


async def main() -> None:
    async with ps.embedded() as db:
        async with db.connection() as conn:
            await conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text)")
        users: ps.PgChangeStream[dict[str, Any]] = ps.PgChangeStream(
            db, "users", operations=["insert"]
        )
        await users.install_trigger()
        engine = ps.WorkflowEngine(db)
        onboarding = ps.trigger(
            workflow=onboard,
            engine=engine,
            to_input=user_input,
            to_workflow_id=workflow_id,
            wait=True,
        )

        async def sign_up() -> None:
            await anyio.sleep(0.2)  # the subscription below starts "from now"
            async with db.connection() as conn:
                await conn.execute(
                    "INSERT INTO users VALUES (1, 'ada@example.com'), (2, 'bob@example.com')"
                )

        async with engine.worker(concurrency=2), anyio.create_task_group() as tg:
            tg.start_soon(sign_up)
            async for result in users.subscribe().through(onboarding).take(2):
                print(
                    result.workflow_id, "started" if result.started else "duplicate", result.result
                )

        history = await engine.storage.run_history("onboard-1")
        print("onboard-1 history:", [(h.step, h.attempt, h.status) for h in history])


if __name__ == "__main__":
    anyio.run(main)
