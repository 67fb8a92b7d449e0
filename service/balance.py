"""Connections shared out over the workers: each worker accepts connections up to its fair share of those
open and waiting, plus SLACK.

`bentoml serve` hands every worker the same listening socket, and on each wake-up asyncio's selector loop
accepts every waiting connection, up to the listen backlog (BaseSelectorEventLoop._accept_connection;
BentoML passes 2048). So when a client opens 64 keep-alive connections at once, the first worker to wake
takes all of them and the others idle for as long as those connections live: on 2 workers, 5 of 6 wrk runs
of 64 connections had all 64 on one worker and served 960-1,330 req/s against 2,000 balanced.

Each worker counts its open connections in its slot of the server's shared file (service/admission.py)
and stamps a heartbeat there every BEAT_S while it serves. Before accepting, a worker reads how many
connections wait in the listening socket's queue (TCP_INFO) and takes at most its share: the live
workers' connections (heartbeat younger than LIVE_S) and the waiting ones divided by the live workers,
and no more than the least-loaded one holds plus its part of the queue; plus SLACK, less its own. A
burst is thus split in about one step per worker. With no room it stops watching the listening socket
for PAUSE_S and looks again, leaving the waiting connections to the workers that have room (woken by the
same arrival). The least-loaded live worker always has room, so connections never wait on a full
service; a worker that is starting, stopped or hung stops beating and is not waited for after LIVE_S. A
worker serving alone, or outside a multi-worker server, accepts as asyncio does. Connections stay with
the worker that accepted them: the balance is of connections as they open (and a worker's closed
connections are uncounted only when its event loop gets to them).

Python's own event loop only (uvicorn picks uvloop when it is installed; this project does not install it).
"""

from __future__ import annotations

import asyncio.selector_events
import functools
import socket
import struct
import time

from service import admission

SLACK = 2  # connections a worker may hold beyond its share
BEAT_S = 0.1  # heartbeat period of a serving worker
LIVE_S = 1.0  # a worker whose heartbeat is older is not waited for (starting, stopped, hung or gone)
PAUSE_S = 0.001  # how long a worker without room leaves the listening socket to the others
_TCPI_UNACKED = 24  # offset in struct tcp_info: for a listening socket, the connections waiting to be accepted


def room(mine: int, others: list[int], waiting: int, backlog: int) -> int:
    """How many connections a worker holding `mine` may accept now, beside live workers holding `others`,
    with `waiting` connections in the listening socket's queue."""
    if not others:
        return backlog
    n = len(others) + 1
    share = -(-(mine + sum(others) + waiting) // n)  # ceil: an even split of the open and waiting ones
    # and no more than the least-loaded worker will hold once it takes its part of the queue: a worker late
    # to wake (a busy machine) finds its part still waiting, not taken by the others' growing shares
    least = min(others) + -(-waiting // n)
    return max(0, min(min(share, least) + SLACK - mine, backlog))


def waiting(sock) -> int:
    """Connections waiting in `sock`'s accept queue (Linux TCP_INFO of a listening socket; 0 if unknown)."""
    try:
        return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), _TCPI_UNACKED)[0]
    except (OSError, AttributeError, struct.error):
        return 0


class Balancer:
    """This worker's side of the balance: its connection count and heartbeat in the shared file."""

    def __init__(self, share: admission.SharedCount):
        self.share, self.me = share, share.index
        self.beating = False

    def room(self, waiting: int, backlog: int) -> int:
        now, live_ns = time.monotonic_ns(), int(LIVE_S * 1e9)
        beats, held = self.share.beats, self.share.connections
        others = [held[i] for i in range(self.share.slots)
                  if i != self.me and beats[i] and now - beats[i] < live_ns]
        return room(held[self.me], others, waiting, backlog)

    def opened(self, n: int) -> None:
        self.share.connections[self.me] += n

    def beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self.share.beats[self.me] = time.monotonic_ns()
        loop.call_later(BEAT_S, self.beat, loop)

    def counted(self, protocol_factory):
        """`protocol_factory` whose protocols count themselves open until their connection is lost."""
        if getattr(protocol_factory, "counted_by", None) is self:
            return protocol_factory

        def protocol():
            made = protocol_factory()
            lost = made.connection_lost

            def connection_lost(exc):
                self.opened(-1)
                return lost(exc)

            try:
                made.connection_lost = connection_lost
            except AttributeError:  # a protocol with __slots__ (not uvicorn's) goes uncounted
                return made
            self.opened(1)
            return made

        protocol.counted_by = self
        return protocol


@functools.cache
def _balancer() -> Balancer | None:
    """This worker's balancer, once its server's shared file is known; None when it serves alone."""
    share = admission.this_workers_share()
    return Balancer(share) if share is not None else None


def install() -> None:
    """Balance the connections of this process's asyncio selector loops over its server's workers
    (idempotent; without effect outside a multi-worker server)."""
    loop_class = asyncio.selector_events.BaseSelectorEventLoop
    start, accept = loop_class._start_serving, loop_class._accept_connection
    if getattr(accept, "balanced", False):
        return

    def start_serving(self, protocol_factory, sock, *rest):
        balancer = _balancer()
        if balancer is not None:
            protocol_factory = balancer.counted(protocol_factory)
            if not balancer.beating:
                balancer.beating = True
                balancer.beat(self)
        return start(self, protocol_factory, sock, *rest)

    def accept_share(self, protocol_factory, sock, sslcontext=None, server=None, backlog=100, *rest):
        balancer = _balancer()
        if balancer is None:
            return accept(self, protocol_factory, sock, sslcontext, server, backlog, *rest)
        n = balancer.room(waiting(sock), backlog)
        if n:
            return accept(self, protocol_factory, sock, sslcontext, server, n, *rest)
        self._remove_reader(sock.fileno())  # the others take the waiting connections meanwhile
        self.call_later(PAUSE_S, _resume, self, protocol_factory, sock, sslcontext, server, backlog, *rest)

    accept_share.balanced = True
    loop_class._start_serving, loop_class._accept_connection = start_serving, accept_share


def _resume(loop, protocol_factory, sock, *rest) -> None:
    if sock.fileno() != -1:  # not closed meanwhile (the server stopping)
        loop._start_serving(protocol_factory, sock, *rest)
