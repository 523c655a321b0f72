"""Which AWS client the ``cloudwatch_logs``/``s3`` outputs use: aiobotocore or boto3 in a thread.

Both send the same PutLogEvents calls (1,000 events of about 200 bytes each) to moto's server
on loopback (tests/servers/moto.py), alternating, and the script prints this process's CPU time
(user + system, the client's threads included; moto runs in its own process) and wall time per
call. Run::

    python bench/bench_aws_clients.py [CALLS]
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import boto3
from aiobotocore.session import AioSession

from _common import REPO

EVENTS = 1000
REGION = "us-east-1"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(calls: int, put: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    await put()  # connection and credentials set up outside the measurement
    cpu, wall = cpu_seconds(), time.monotonic()
    for _ in range(calls):
        await put()
    return (cpu_seconds() - cpu) / calls, (time.monotonic() - wall) / calls


def main(calls: int) -> None:
    sys.path.insert(0, str(REPO))  # the tests' server wrappers
    from tests.servers.moto import MotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true")
    server = MotoServer()
    server.start()
    try:
        now = int(time.time() * 1000)
        events = [{"timestamp": now + i, "message": '{"log":"' + "x" * 180 + f'","i":{i}}}'} for i in range(EVENTS)]
        sync = boto3.client("logs", region_name=REGION, endpoint_url=server.url)
        sync.create_log_group(logGroupName="bench")
        for stream in ("aio", "thread"):
            sync.create_log_stream(logGroupName="bench", logStreamName=stream)

        async def with_aiobotocore() -> tuple[float, float]:
            async with AioSession().create_client("logs", region_name=REGION, endpoint_url=server.url) as client:
                return await measure(
                    calls, lambda: client.put_log_events(logGroupName="bench", logStreamName="aio", logEvents=events)
                )

        async def with_boto3_thread() -> tuple[float, float]:
            return await measure(
                calls,
                lambda: asyncio.to_thread(
                    sync.put_log_events, logGroupName="bench", logStreamName="thread", logEvents=events
                ),
            )

        for _ in range(2):
            for name, run in (("aiobotocore", with_aiobotocore), ("boto3 in a thread", with_boto3_thread)):
                cpu, wall = asyncio.run(run())
                print(f"{name:18s} client CPU {cpu * 1000:6.2f} ms per call   wall {wall * 1000:6.1f} ms per call")
    finally:
        server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
