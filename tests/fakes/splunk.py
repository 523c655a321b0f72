"""A fake Splunk HTTP Event Collector: Splunk is not installable from any registry here.

It implements the documented HEC behaviour the ``splunk`` sink relies on (Splunk docs:
"Format events for HTTP Event Collector", "Troubleshoot HTTP Event Collector" status codes,
"About HTTP Event Collector Indexer Acknowledgment"):

* ``POST /services/collector/event`` (and ``/services/collector``): events are JSON objects
  back to back; ``Authorization: Splunk <token>``; gzip bodies.
* Answers: 200 ``{"text":"Success","code":0}`` (+ ``"ackId"`` with ack on); 401 code 2
  ``Token is required``; 403 code 4 ``Invalid token``; 400 code 5 ``No data``; 400 code 6
  ``Invalid data format``, code 7 ``Incorrect index``, code 12 ``Event field is required``,
  code 13 ``Event field cannot be blank`` — each with ``invalid-event-number``, the events
  before it being indexed and the rest not read; 400 code 10 ``Data channel is missing``;
  400 code 14 ``ACK is disabled``; 503 code 9 ``Server is busy``.
* Indexer acknowledgement: a channel is required (header ``X-Splunk-Request-Channel`` or
  ``?channel=``); ``POST /services/collector/ack?channel=C`` with ``{"acks":[ids]}`` answers
  ``{"acks":{"id":true|false}}``; an ack turns true after ``ack_after_polls`` polls, or never
  for the ids in ``lose_acks`` (an indexer that crashed before indexing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class HecEvent:
    channel: str | None
    event: dict[str, Any]


@dataclass
class FakeHec:
    token: str = "hec-token"
    ack_enabled: bool = False
    indexes: tuple[str, ...] = ("main", "k8s")
    ack_after_polls: int = 1
    lose_acks: set[int] = field(default_factory=set)
    busy: int = 0  # answer this many event requests with 503 code 9 first
    indexed: list[HecEvent] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    polls: int = 0
    _next_ack: int = 0
    _acks: dict[tuple[str, int], int] = field(default_factory=dict)  # (channel, id) -> polls seen
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeHec:
        app = web.Application(client_max_size=1024**3)
        app.router.add_post("/services/collector/event", self._event)
        app.router.add_post("/services/collector", self._event)
        app.router.add_post("/services/collector/ack", self._ack)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _answer(status: int, code: int, text: str, **extra: Any) -> web.Response:
        return web.json_response({"text": text, "code": code, **extra}, status=status)

    def _auth(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        if not header:
            return self._answer(401, 2, "Token is required")
        scheme, _, token = header.partition(" ")
        if scheme != "Splunk" or token != self.token:
            return self._answer(403, 4, "Invalid token")
        return None

    def _channel(self, request: web.Request) -> str | None:
        return request.headers.get("X-Splunk-Request-Channel") or request.query.get("channel")

    async def _event(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp has already undone Content-Encoding: gzip
        self.requests.append({"headers": dict(request.headers), "size": len(body)})
        refused = self._auth(request)
        if refused is not None:
            return refused
        if self.busy > 0:
            self.busy -= 1
            return self._answer(503, 9, "Server is busy")
        channel = self._channel(request)
        if self.ack_enabled and not channel:
            return self._answer(400, 10, "Data channel is missing")
        text = body.decode("utf-8", "replace")
        decoder = json.JSONDecoder()
        position, number = 0, 0
        events: list[dict[str, Any]] = []
        while True:
            while position < len(text) and text[position].isspace():
                position += 1
            if position >= len(text):
                break
            try:
                event, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError:
                return self._refuse(events, channel, 6, "Invalid data format", number)
            if not isinstance(event, dict):
                return self._refuse(events, channel, 6, "Invalid data format", number)
            if "event" not in event:
                return self._refuse(events, channel, 12, "Event field is required", number)
            if event["event"] in ("", None, {}):
                return self._refuse(events, channel, 13, "Event field cannot be blank", number)
            if "index" in event and event["index"] not in self.indexes:
                return self._refuse(events, channel, 7, "Incorrect index", number)
            events.append(event)
            number += 1
        if not events:
            return self._answer(400, 5, "No data")
        self.indexed += [HecEvent(channel, event) for event in events]
        if not self.ack_enabled:
            return self._answer(200, 0, "Success")
        ack_id = self._next_ack
        self._next_ack += 1
        self._acks[(channel or "", ack_id)] = 0
        return self._answer(200, 0, "Success", ackId=ack_id)

    def _refuse(
        self, before: list[dict[str, Any]], channel: str | None, code: int, text: str, number: int
    ) -> web.Response:
        self.indexed += [HecEvent(channel, event) for event in before]  # what came before is indexed
        return self._answer(400, code, text, **{"invalid-event-number": number})

    async def _ack(self, request: web.Request) -> web.Response:
        refused = self._auth(request)
        if refused is not None:
            return refused
        if not self.ack_enabled:
            return self._answer(400, 14, "ACK is disabled")
        channel = self._channel(request)
        if not channel:
            return self._answer(400, 10, "Data channel is missing")
        try:
            ids = json.loads(await request.read())["acks"]
        except (ValueError, KeyError, TypeError):
            return self._answer(400, 6, "Invalid data format")
        self.polls += 1
        state: dict[str, bool] = {}
        for ack_id in ids:
            key = (channel, ack_id)
            if key not in self._acks or ack_id in self.lose_acks:
                state[str(ack_id)] = False
                continue
            self._acks[key] += 1
            state[str(ack_id)] = self._acks[key] >= self.ack_after_polls
        return web.json_response({"acks": state})
