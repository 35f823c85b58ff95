"""A small userspace TCP proxy that adds a fixed delay each way (no sch_netem needed), for fault tests.

It runs an asyncio loop in a daemon thread of the test process. Each chunk read from one side is written to
the other ``delay_s`` after it arrived, in order, so latency is added without limiting throughput.
:meth:`DelayProxy.hold` stops forwarding towards the server (what is held is forwarded by :meth:`release`):
a test can then read Redis knowing nothing from behind the proxy lands in between.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class DelayProxy:
    """Listens on ``listen_host``:``port`` (a free one by default) and forwards to ``upstream``."""

    def __init__(
        self,
        listen_host: str,
        upstream_port: int,
        delay_s: float = 0.003,
        upstream_host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.listen_host, self.port, self.delay_s = listen_host, port, delay_s
        self.upstream = (upstream_host, upstream_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"delay-proxy-{listen_host}", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._open: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> DelayProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def hold(self) -> None:
        """Stop forwarding client -> server until :meth:`release` (chunks already written are not recalled)."""
        self._call(self._set_open(False))

    def release(self) -> None:
        self._call(self._set_open(True))

    def stop(self) -> None:
        """Close the listener and every connection, then end the thread."""
        if self._thread.is_alive():
            self._call(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set_open(self, value: bool) -> None:
        assert self._open is not None
        self._open.set() if value else self._open.clear()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.sleep(0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        pair = (writer, up_writer)
        for src, dst, held in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pipe(src, dst, held, pair))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        held: bool,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        """Read chunks into a queue stamped with their due time; a second task writes them when due."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        writer = asyncio.create_task(self._deliver(queue, dst, held, pair))
        loop = asyncio.get_running_loop()
        try:
            while data := await src.read(65536):
                queue.put_nowait((loop.time() + self.delay_s, data))
            queue.put_nowait((loop.time() + self.delay_s, b""))  # EOF, in its turn
            await writer
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.cancel()
            for w in pair:  # one side gone: the connection is over for both
                w.transport.abort()
                self._writers.discard(w)

    async def _deliver(
        self,
        queue: asyncio.Queue[tuple[float, bytes]],
        dst: asyncio.StreamWriter,
        held: bool,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        loop = asyncio.get_running_loop()
        assert self._open is not None
        try:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if held:
                    await self._open.wait()
                if not data:
                    return
                dst.write(data)
                await dst.drain()
        except OSError:
            for w in pair:  # the peer is gone: so is the other direction (its reader sees the abort)
                w.transport.abort()
