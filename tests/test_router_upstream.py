"""The router's HTTP/1.1 client (router/upstream.py) and its failover, against backends in this
process: aiohttp servers, and raw sockets where a test needs a backend that misbehaves exactly.

Keep-alive connections are reused; streams arrive chunk by chunk as the backend sends them; a
pooled connection the backend closed is replaced without failing the request, but a fresh one
that fails is the backend's failure; timeouts, refusals, drops and close-delimited bodies; a
reader that falls behind stops the backend's reads instead of buffering without bound; closing
an exchange tells the backend. Through the whole router: 503 and refused connections fail over
to the next backend, and a stale pooled connection does not mark a healthy backend down.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from expertmesh.router.app import RouterState, build_app
from expertmesh.router.backends import Backend, BackendPool
from expertmesh.router.policies import PrefixKeyer, Router
from expertmesh.router.proxy import ProxySettings
from expertmesh.router.upstream import _PAUSE_BYTES, UpstreamClosed, UpstreamError, UpstreamPool, UpstreamTimeout
from server_util import metric

JSON = {"Content-Type": "application/json"}


async def _serve(routes: dict[str, object], **runner_kw) -> tuple[web.AppRunner, str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    runner = web.AppRunner(app, access_log=None, **runner_kw)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def _raw(answer) -> tuple[asyncio.Server, str]:
    """A backend on a bare socket: `answer(n, reader, writer)` handles the n-th request of a connection."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                if await answer(n, reader, writer) is False:
                    return
                n += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _ok_response(body: bytes = b"ok") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_connections_are_kept_alive_and_streams_arrive_chunk_by_chunk():
    async def main():
        peers: set = set()
        second = asyncio.Event()

        async def completions(request: web.Request) -> web.StreamResponse:
            peers.add(request.transport.get_extra_info("peername"))
            body = await request.json()
            if not body.get("stream"):
                return web.json_response({"echo": body})
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            await out.write(b"data: 1\n\n")
            await asyncio.wait_for(second.wait(), 10)  # held until the client has seen the first event
            await out.write(b"data: 2\n\n")
            await out.write_eof()
            return out

        runner, url = await _serve({"/v1/completions": completions})
        pool = UpstreamPool()
        try:
            for i in range(4):
                ex = await pool.post(url, "/v1/completions", JSON, json.dumps({"i": i}).encode(), 5)
                assert ex.status == 200 and ex.headers["content-type"].startswith("application/json")
                assert json.loads(await ex.read(5)) == {"echo": {"i": i}}
                pool.release(ex)
            ex = await pool.post(url, "/v1/completions", JSON, b'{"stream": true}', 5)
            assert ex.headers["transfer-encoding"] == "chunked"
            assert await ex.next_chunk(5) == b"data: 1\n\n"  # before the backend has sent the rest
            second.set()
            assert await ex.read(5) == b"data: 2\n\n"
            pool.release(ex)
            assert len(peers) == 1, peers  # five requests, one connection
        finally:
            pool.close()
            await runner.cleanup()

    asyncio.run(main())


def test_a_pooled_connection_the_backend_closed_is_replaced_but_a_fresh_failure_is_raised():
    async def main():
        seen = []  # which request of its connection each request was

        async def answer(n, reader, writer):
            seen.append(n)
            if n == 0:
                writer.write(_ok_response())
                await writer.drain()
                return True
            return False  # a second request on a connection: closed unanswered, like a keep-alive timeout race

        server, url = await _raw(answer)
        pool = UpstreamPool()
        try:
            for _ in range(3):  # each reuse meets a closed connection and goes again on a fresh one
                ex = await pool.post(url, "/v1/completions", JSON, b"{}", 5)
                assert await ex.read(5) == b"ok"
                pool.release(ex)
            assert seen == [0, 1, 0, 1, 0]  # three requests answered, two stale connections met and replaced
        finally:
            pool.close()
            server.close()

        async def never(n, reader, writer):
            return False

        server, url = await _raw(never)
        try:
            with pytest.raises(UpstreamClosed, match="closed the connection"):
                await pool.post(url, "/v1/completions", JSON, b"{}", 5)
        finally:
            server.close()

    asyncio.run(main())


def test_timeouts_refusals_drops_and_close_delimited_bodies():
    async def main():
        async def stall(n, reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await asyncio.sleep(30)

        async def drop(n, reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            return False

        async def until_close(n, reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
            await writer.drain()
            return False

        async def garbage(n, reader, writer):
            writer.write(b"SMTP ready\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(30)

        pool = UpstreamPool(connect_timeout_s=2)
        servers = {name: await _raw(f) for name, f in
                   (("stall", stall), ("drop", drop), ("close", until_close), ("garbage", garbage))}
        try:
            ex = await pool.post(servers["stall"][1], "/x", JSON, b"{}", 0.3)
            assert await ex.next_chunk(0.3) == b"first"
            t0 = time.monotonic()
            with pytest.raises(UpstreamTimeout, match="0.3 s"):
                await ex.next_chunk(0.3)
            assert 0.25 < time.monotonic() - t0 < 5
            assert ex.closed and not ex.reusable()

            ex = await pool.post(servers["drop"][1], "/x", JSON, b"{}", 5)
            assert await ex.next_chunk(5) == b"first"  # what arrived before the drop comes first
            with pytest.raises(UpstreamClosed):
                await ex.next_chunk(5)

            ex = await pool.post(servers["close"][1], "/x", JSON, b"{}", 5)
            assert await ex.read(5) == b"all of it" and not ex.reusable()

            with pytest.raises(UpstreamError, match="broken HTTP"):
                await pool.post(servers["garbage"][1], "/x", JSON, b"{}", 5)

            dead, dead_url = await _raw(stall)
            dead.close()
            await dead.wait_closed()
            with pytest.raises(UpstreamError, match="cannot connect"):
                await pool.post(dead_url, "/x", JSON, b"{}", 5)
        finally:
            pool.close()
            for server, _ in servers.values():
                server.close()
        with pytest.raises(ValueError, match="https://b:1"):
            pool.target("https://b:1")

    asyncio.run(main())


def test_a_slow_reader_pauses_the_backend_and_closing_tells_it():
    async def main():
        total = 32 << 20
        gone = asyncio.Event()

        async def flood(request: web.Request) -> web.StreamResponse:
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            for _ in range(total // (64 << 10)):
                await out.write(b"x" * (64 << 10))
            await out.write_eof()
            return out

        async def forever(request: web.Request) -> web.StreamResponse:
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            try:
                while True:
                    await out.write(b"data: tick\n\n")
                    await asyncio.sleep(0.01)
            except (ConnectionResetError, asyncio.CancelledError):
                gone.set()
                raise

        runner, url = await _serve({"/flood": flood, "/forever": forever})
        pool = UpstreamPool()
        try:
            ex = await pool.post(url, "/flood", JSON, b"{}", 5)
            await asyncio.sleep(0.5)  # the backend could send everything meanwhile; the reader takes nothing
            assert ex._buffered <= 2 * _PAUSE_BYTES, ex._buffered  # held in the socket buffers, not here
            assert len(await ex.read(5)) == total

            ex = await pool.post(url, "/forever", JSON, b"{}", 5)
            assert (await ex.next_chunk(5)).startswith(b"data: tick")
            ex.close()
            await asyncio.wait_for(gone.wait(), 5)  # the backend saw its client leave
        finally:
            pool.close()
            await runner.cleanup()

    asyncio.run(main())


async def _router(urls: list[str], disagg: tuple[set[str], set[str]] | None = None
                  ) -> tuple[web.AppRunner, str, RouterState]:
    pool = BackendPool([Backend(u) for u in urls], interval_s=60)
    tiers = None if disagg is None else tuple(Router("round-robin", pool, PrefixKeyer(None), members=m)
                                              for m in disagg)
    state = RouterState(Router("round-robin", pool, PrefixKeyer(None)), ProxySettings(read_timeout_s=5),
                        disagg=tiers)
    runner = web.AppRunner(build_app(state), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}", state


def test_the_router_fails_over_on_503_and_refusal_but_not_on_a_stale_connection():
    async def main():
        async def health(request):
            return web.json_response({"status": "ok"})

        async def unavailable(request):
            return web.json_response({"error": {"message": "draining"}}, status=503)

        async def good(request):
            return web.json_response({"served": True})

        bad, bad_url = await _serve({"/health": health, "/v1/completions": unavailable})
        doomed, doomed_url = await _serve({"/health": health, "/v1/completions": good})
        ok, ok_url = await _serve({"/health": health, "/v1/completions": good}, keepalive_timeout=0.05)
        router, url, state = await _router([bad_url, doomed_url, ok_url])
        await doomed.cleanup()  # healthy at the check, refusing connections now
        client = UpstreamPool()
        try:
            for i in range(3):  # round-robin: each backend first once; every request ends on ok_url
                ex = await client.post(url, "/v1/completions", JSON, b"{}", 10)
                assert ex.status == 200 and json.loads(await ex.read(10)) == {"served": True}
                client.release(ex)
            assert state.pool.healthy() == {ok_url}
            text = state.metrics.render().decode()
            for backend, outcome, count in ((bad_url, "retried", 1), (doomed_url, "retried", 1), (ok_url, "ok", 3)):
                assert metric(text, "expertmesh_router:requests_total", backend=backend, outcome=outcome) == count
            await asyncio.sleep(0.3)  # ok_url closes the router's idle connections meanwhile
            ex = await client.post(url, "/v1/completions", JSON, b"{}", 10)
            assert ex.status == 200
            assert state.pool.healthy() == {ok_url} and state.pool.backends[ok_url].last_error is None
        finally:
            client.close()
            await router.cleanup()
            await bad.cleanup()
            await ok.cleanup()

    asyncio.run(main())


def test_disaggregated_routing_asks_a_prefill_server_then_hands_its_params_to_a_decode_server():
    async def main():
        seen: dict[str, list] = {"prefill": [], "decode": []}
        params = {"do_remote_prefill": True, "transfer_id": 42, "remote_host": "127.0.0.1", "remote_port": 9,
                  "num_blocks": 3, "layout": {}}

        async def health(request):
            return web.json_response({"status": "ok"})

        async def unavailable(request):
            return web.json_response({"error": {"message": "draining"}}, status=503)

        async def prefill(request):
            body = await request.json()
            seen["prefill"].append(body)
            if body.get("prompt") == "bad":
                return web.json_response({"error": {"message": "bad prompt", "param": "prompt"}}, status=400)
            return web.json_response({"choices": [{"text": "z"}], "kv_transfer_params": params})

        async def decode(request):
            body = await request.json()
            seen["decode"].append(body)
            return web.json_response({"choices": [{"text": "answer"}]})

        down, down_url = await _serve({"/health": health, "/v1/completions": unavailable})
        up, up_url = await _serve({"/health": health, "/v1/completions": prefill})
        dec, dec_url = await _serve({"/health": health, "/v1/completions": decode})
        router, url, state = await _router([down_url, up_url, dec_url], ({down_url, up_url}, {dec_url}))
        client = UpstreamPool()
        try:
            body = {"prompt": "x", "max_tokens": 5, "n": 2, "stream": False, "stream_options": None}
            for _ in range(2):  # round-robin: each prefill server comes first once
                ex = await client.post(url, "/v1/completions", JSON, json.dumps(body).encode(), 10)
                assert ex.status == 200 and json.loads(await ex.read(10)) == {"choices": [{"text": "answer"}]}
                client.release(ex)
            # The 503 one was passed over (and is down now); the other got both prefill legs:
            assert seen["prefill"] == [{"prompt": "x", "max_tokens": 1, "stream": False,
                                        "kv_transfer_params": {"do_remote_decode": True}}] * 2
            # The decode server got the client's request as sent, plus the prefill server's params:
            assert seen["decode"] == [{**body, "kv_transfer_params": params}] * 2
            text = state.metrics.render().decode()
            assert metric(text, "expertmesh_router:requests_total", backend=down_url, outcome="retried") == 1
            ex = await client.post(url, "/v1/completions", JSON, b'{"prompt": "bad"}', 10)
            assert ex.status == 400 and json.loads(await ex.read(10))["error"]["param"] == "prompt"
            client.release(ex)
            assert len(seen["decode"]) == 2  # a refused prompt never reaches the decode tier
        finally:
            client.close()
            await router.cleanup()
            for runner in (down, up, dec):
                await runner.cleanup()

    asyncio.run(main())
