"""Connections spread over the workers: each worker accepts at most PER_TURN connections per event-loop turn.

`bentoml serve` hands every worker the same listening socket. On each wake-up, asyncio's selector loop
accepts waiting connections in a loop, up to the listen backlog (BaseSelectorEventLoop._accept_connection;
BentoML passes its `backlog`, 2048). So when a client opens 64 keep-alive connections at once, the first
worker to wake takes all of them and the other workers stay idle for as long as those connections live:
on 2 workers, 5 of 6 runs of 64 connections had all 64 on one worker (`ss -tnp` during the run) and
served 960-1,330 req/s, the balanced run 2,000. Accepting one connection per turn lets every worker woken
by the same burst take its share, and a worker busy with a forward pass leaves the next ones to the others.
The cost: when hundreds of connections open at once onto busy workers, the last ones wait some turns
before their first request is read (256 connections on 2 workers: p99 1.2 s in the first seconds).

Python's own event loop only: with uvloop installed (uvicorn would pick it), this has no effect.
"""

from __future__ import annotations

import asyncio.selector_events

PER_TURN = 1  # more per turn brought the imbalance back (README "Benchmarks")


def install() -> None:
    """Accept at most PER_TURN connections per turn of this process's asyncio selector loops (idempotent)."""
    loop_class = asyncio.selector_events.BaseSelectorEventLoop
    original = loop_class._accept_connection
    if getattr(original, "spreads_connections", False):
        return

    def accept_a_few(self, protocol_factory, sock, sslcontext=None, server=None, backlog=100, *rest):
        return original(self, protocol_factory, sock, sslcontext, server, min(backlog, PER_TURN), *rest)

    accept_a_few.spreads_connections = True
    loop_class._accept_connection = accept_a_few
