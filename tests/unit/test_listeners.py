"""How the API binds its ports: alone by default, shared only when asked.

Two operators that share a port answer each other's requests (the kernel spreads
connections over the sockets). That is what replicas of one install on one host want, and
what two installs must never get unseen: a client of one would read the other's database.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import ClientSession, web

from kubetask.api import start_api
from kubetask.api.server import PortInUse


def named(name: str) -> web.Application:
    """An application whose one page says which process (``name``) answered."""

    async def who(request: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/who", who)
    return app


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_port_in_use_fails_the_start_with_an_error_that_names_it_and_what_to_set() -> None:
    port = unused_port()
    first = await start_api(named("first"), "127.0.0.1", port)
    try:
        with pytest.raises(PortInUse) as failed:
            await start_api(named("second"), "127.0.0.1", port)
        message = str(failed.value)
        assert f"127.0.0.1:{port}" in message
        assert "KUBETASK_API_PORT" in message and "KUBETASK_API_SHARE_PORT=true" in message
        async with ClientSession() as http:
            answers = {await (await http.get(f"http://127.0.0.1:{port}/who")).text() for _ in range(20)}
        assert answers == {"first"}
    finally:
        await first.cleanup()


async def test_one_that_asks_to_share_cannot_join_a_port_held_by_one_that_did_not() -> None:
    port = unused_port()
    first = await start_api(named("first"), "127.0.0.1", port)
    try:
        with pytest.raises(PortInUse):
            await start_api(named("second"), "127.0.0.1", port, share_port=True)
    finally:
        await first.cleanup()


async def test_replicas_that_both_ask_share_the_port_and_both_answer() -> None:
    port = unused_port()
    listeners = [await start_api(named(n), "127.0.0.1", port, share_port=True) for n in ("a", "b")]
    try:
        answers: set[str] = set()
        async with ClientSession() as http:
            for _ in range(200):
                # A new connection each time: the kernel picks a socket per connection.
                async with http.get(f"http://127.0.0.1:{port}/who", headers={"Connection": "close"}) as r:
                    answers.add(await r.text())
                if answers == {"a", "b"}:
                    break
        assert answers == {"a", "b"}
    finally:
        await asyncio.gather(*(listener.cleanup() for listener in listeners))
