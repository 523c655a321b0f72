"""Backpressure with the filesystem buffer: the audit webhook answers 200 once batches are on
disk (even with the sink down) and 429 once the buffer is at ``storage.total_limit_size``; once
the sink is back, every admitted event is delivered exactly once."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

from kubetrail.core.config import load_config
from kubetrail.runtime.pipeline import Pipeline
from tests.unit.helpers import write
from tests.unit.test_audit_webhook import GatedSink, Pki, Receiver, certs, event, event_list

__all__ = ["certs"]  # the fixture, re-exported for pytest


async def test_audit_webhook_is_answered_from_disk_then_429_when_the_buffer_is_full(tmp_path: Path, certs: Pki) -> None:
    config = write(
        tmp_path / "audit.conf",
        f"""
[SERVICE]
    grace 5
    storage.path {tmp_path / "storage"}
[INPUT]
    name              kubernetes_audit
    tag               audit
    listen            127.0.0.1
    port              0
    tls.crt_file      {certs.crt}
    tls.key_file      {certs.key}
    tls.ca_file       {certs.ca_file}
    bearer_token_file {certs.token_file}
    storage.type      filesystem
    ack_timeout       0.5
    max_pending       2
[OUTPUT]
    name  stdout
    match *
    storage.total_limit_size 6k
""",
    )
    pipeline = Pipeline(load_config(config))
    sink = GatedSink()
    sink.gate = asyncio.Event()  # the output is down
    pipeline.runners[0].sink = sink  # type: ignore[assignment]
    source = pipeline.sources[0].instance
    task = asyncio.create_task(pipeline.run())
    try:
        async with asyncio.timeout(10):
            await source.started.wait()
        receiver = Receiver(pipeline, source, sink, f"https://127.0.0.1:{source.bound_port}/audit", certs, task)
        answers: dict[str, int] = {}
        for i in range(40):
            status, headers, _ = await receiver.post(event_list([event(audit_id=f"e{i}")]))
            answers[f"e{i}"] = status
            if status == 429:
                assert headers["Retry-After"] == "5"
                break
        statuses = list(answers.values())
        assert statuses[0] == 200  # on disk, although the sink has delivered nothing
        assert statuses[-1] == 429, statuses  # buffer full: the API server is told to retry
        assert set(statuses[:-1]) == {200}
        spool = pipeline.runners[0].spool
        assert spool is not None and spool.disk_bytes <= 6 * 1024 + 2048
        sink.gate.set()  # the output is back
        async with asyncio.timeout(15):
            while len(sink.identities()) < len(statuses) - 1:
                await asyncio.sleep(0.05)
        assert (await receiver.post(event_list([event(audit_id="after")])))[0] == 200
        await asyncio.sleep(0.3)
    finally:
        sink.gate.set()
        pipeline.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
    got = Counter(audit_id for audit_id, _stage in sink.identities())
    accepted = {k for k, v in answers.items() if v == 200} | {"after"}
    # Everything answered 200 is delivered exactly once; a 429'd batch is the API server's to re-send
    # (it may have been admitted after all: it is then delivered once too, never twice).
    assert accepted <= set(got) and all(n == 1 for n in got.values()), got


async def test_events_watch_stops_reading_its_stream_while_downstream_is_full() -> None:
    """The emitter blocks (a full buffer): the source stops reading the watch, so the API
    server's writes stall in the socket; released, every event arrives once, in order."""
    import orjson
    from aiohttp import web

    from kubetrail.core.record import Batch
    from tests.unit.fake_api import event as k8s_event
    from tests.unit.fake_api import events_source, serve

    total = 3000
    pad = "x" * 8000  # 3000 x 8 KB: far more than the socket buffers and the source's queue
    written = 0
    finished = asyncio.Event()
    leave = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal written
        if request.query.get("watch") != "1":
            return web.json_response({"kind": "EventList", "metadata": {"resourceVersion": "1"}, "items": []})
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(total):
            obj = k8s_event(f"e{i}", str(i + 2))
            obj["message"] = pad
            await response.write(orjson.dumps({"type": "ADDED", "object": obj}) + b"\n")
            written += 1
        finished.set()
        await leave.wait()  # a quiet watch, until the test is done
        return response

    gate = asyncio.Event()
    got: list[str] = []
    async with serve(handler) as url:
        source = events_source(url)

        class Emitter:
            async def send(self, batch: Batch) -> None:
                await gate.wait()  # downstream full until the gate opens
                got.extend(r.identity[0] for r in batch.records)  # type: ignore[index]
                if batch.ack is not None:
                    batch.ack.seal()
                if len(got) >= total:
                    source.stop()

        run = asyncio.create_task(source.run(Emitter()))
        await asyncio.sleep(1.5)
        stalled_at = written
        await asyncio.sleep(0.5)
        assert written == stalled_at < total, "the API server's writes should stall while we are full"
        assert not finished.is_set()
        gate.set()
        await asyncio.wait_for(finished.wait(), 20)
        async with asyncio.timeout(20):
            while len(got) < total:
                await asyncio.sleep(0.05)
        run.cancel()  # the stream stays open (a quiet watch); stopping it is not under test here
        with contextlib.suppress(asyncio.CancelledError):
            await run
        await source.close()
        leave.set()
    assert got == [f"uid-e{i}" for i in range(total)]
