"""The ``splunk`` output: Splunk HTTP Event Collector (HEC) events, with Fluent Bit's options.

Each batch is one POST to ``/services/collector/event`` whose body is the events' JSON objects
back to back (HEC's batch format): ``{"time", "host", "source", "sourcetype", "index",
"event", "fields"}``. ``event_key`` picks a part of the record as the event; ``event_host``,
``event_source``, ``event_sourcetype``, ``event_index`` are literals or ``$record['accessors']``
(``event_sourcetype_key``/``event_index_key`` too, as in Fluent Bit); ``event_field key value``
adds indexed fields; ``splunk_send_raw on`` sends the record itself as the event object.

Delivery:

* **Indexer acknowledgement** (added; Fluent Bit has none): with ``splunk_ack on`` every request
  carries the ``X-Splunk-Request-Channel`` (``channel``, or a random one per sink), HEC answers
  with an ``ackId``, and the batch is acknowledged only once ``/services/collector/ack`` reports
  it indexed. Without it a 200 only means "received" and an indexer crash loses the batch.
  An ack that does not come within ``splunk_ack_timeout`` is a retryable failure: the batch is
  sent again (HEC has no document ids, so this is the one case that can duplicate).
* **Errors** follow HEC's codes: 400 ``Invalid data format`` / ``Incorrect index`` /
  ``Event field is required`` name ``invalid-event-number``; HEC indexed the events before it
  and not the ones after, so that one event is rejected (dead letter, with HEC's text) and
  the following ones are sent again. 401/403 (token) retry, 503 ``Server is busy`` retries.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from kubetrail.core.accessor import RecordAccessor
from kubetrail.core.component import ComponentContext
from kubetrail.core.errors import ConfigError, PermanentError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.core.secrets import derive
from kubetrail.sinks.http_base import (
    BadResponseError,
    HttpResponse,
    HttpRetryableError,
    HttpSink,
    check_status,
    client_options,
)

EVENT_PATH = "/services/collector/event"
ACK_PATH = "/services/collector/ack"
# HEC codes that say "this event is bad" and come with invalid-event-number.
EVENT_ERROR_CODES = frozenset({6, 7, 12, 13, 15})
# HEC codes about the client's setup (token, channel, ack), not the events: retry, keep the data.
SETUP_ERROR_CODES = frozenset({2, 3, 4, 10, 11, 14})


class _Value:
    """A literal, or a ``$accessor`` read from each record."""

    def __init__(self, text: str | None, key: str) -> None:
        self.literal: str | None = None
        self.accessor: RecordAccessor | None = None
        if text and text.startswith("$"):
            try:
                self.accessor = RecordAccessor(text)
            except ValueError as exc:
                raise ConfigError(str(exc), key=key) from None
        else:
            self.literal = text or None

    def get(self, body: dict[str, Any]) -> Any:
        return self.accessor.get(body) if self.accessor is not None else self.literal


class SplunkSink(HttpSink):
    plugin_name = "splunk"
    description = "Splunk HTTP Event Collector, with optional indexer acknowledgement"
    options = (
        *client_options(8088, None),
        Option("splunk_token", help="HEC token, sent as 'Authorization: Splunk <token>'", secret=True),
        Option("channel", help="X-Splunk-Request-Channel (a GUID); required by HEC with indexer ack"),
        Option("splunk_ack", "bool", False, help="Acknowledge a batch only once HEC reports it indexed"),
        Option("splunk_ack_timeout", "duration", 60.0, help="How long to wait for an indexer ack"),
        Option("splunk_ack_interval", "duration", 1.0, help="Pause between ack polls"),
        Option("event_key", help="Record accessor: send only this part of the record as the event"),
        Option("event_host", help="host of each event (literal or $accessor)"),
        Option("event_source", help="source of each event (literal or $accessor)"),
        Option("event_sourcetype", help="sourcetype of each event (literal or $accessor)"),
        Option("event_sourcetype_key", help="Record accessor for the sourcetype (overrides event_sourcetype)"),
        Option("event_index", help="index of each event (literal or $accessor)"),
        Option("event_index_key", help="Record accessor for the index (overrides event_index)"),
        Option("event_field", multiple=True, help="Indexed field 'name value' (value literal or $accessor)"),
        Option("splunk_send_raw", "bool", False, help="Send the record itself as the HEC event object"),
        Option("http_buffer_size", "size", None, help="Accepted for Fluent Bit compatibility"),
        Option("http_debug_bad_request", "bool", False, help="Accepted; errors always quote HEC's answer"),
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        c = config
        token = c["splunk_token"]
        if token:
            if c["http_user"]:
                raise ConfigError("use either splunk_token or http_user, not both", key="splunk_token")
            self.http.settings.headers.insert(0, ("Authorization", derive("Splunk {}".format, token)))
        self.ack: bool = c["splunk_ack"]
        self.channel: str | None = c["channel"] or (str(uuid.uuid4()) if self.ack else None)
        if self.channel:
            self.http.settings.headers.append(("X-Splunk-Request-Channel", self.channel))
        self.ack_timeout: float = c["splunk_ack_timeout"]
        self.ack_interval: float = max(0.01, c["splunk_ack_interval"])
        try:
            self.event_key = RecordAccessor(c["event_key"]) if c["event_key"] else None
        except ValueError as exc:
            raise ConfigError(str(exc), key="event_key") from None
        self.meta: list[tuple[str, _Value]] = []
        for name, option, key_option in (
            ("host", "event_host", None),
            ("source", "event_source", None),
            ("sourcetype", "event_sourcetype", "event_sourcetype_key"),
            ("index", "event_index", "event_index_key"),
        ):
            key_text = c[key_option] if key_option else None
            if key_option and key_text:
                self.meta.append((name, _Value(key_text if key_text.startswith("$") else "$" + key_text, key_option)))
            elif c[option]:
                self.meta.append((name, _Value(c[option], option)))
        self.fields: list[tuple[str, _Value]] = []
        for text in c["event_field"]:
            name, _, value = text.strip().partition(" ")
            if not name or not value.strip():
                raise ConfigError(f"bad event_field {text!r}; expected 'name value'", key="event_field")
            self.fields.append((name, _Value(value.strip(), "event_field")))
        self.send_raw: bool = c["splunk_send_raw"]

    def _event(self, record: Record) -> bytes:
        if self.send_raw:
            return record.json_bytes()
        body = record.body
        seconds, nanos = divmod(record.time_ns, 1_000_000_000)
        parts = [b'{"time":' + f"{seconds}.{nanos // 1000:06d}".encode()]
        for name, value in self.meta:
            found = value.get(body)
            if found is not None:
                parts.append(orjson.dumps(name) + b":" + orjson.dumps(found if isinstance(found, str) else str(found)))
        if self.fields:
            fields = {name: value.get(body) for name, value in self.fields}
            parts.append(b'"fields":' + orjson.dumps({k: v for k, v in fields.items() if v is not None}))
        event = orjson.dumps(self.event_key.get(body)) if self.event_key is not None else record.json_bytes()
        parts.append(b'"event":' + event)
        return b",".join(parts) + b"}"

    async def write(self, batch: Batch) -> None:
        records = batch.records
        events = [self._event(record) for record in records]
        start = 0
        rejected: list[tuple[Record, str]] = []
        while start < len(events):
            response = await self.http.request(
                "POST", EVENT_PATH, b"\n".join(events[start:]), content_type="application/json"
            )
            if response.ok:
                if self.ack:
                    await self._wait_for_ack(response)
                break
            bad = self._invalid_event(response)
            if bad is None:
                self._setup_error(response)
                check_status(response)
                raise BadResponseError(f"{response.describe()}: {response.excerpt()}", response.status)
            number, reason = bad
            # HEC indexed events[start:start+number]; events[start+number] is refused; the rest was not read.
            rejected.append((records[start + number], reason))
            start += number + 1
        if rejected:
            raise PermanentError(
                f"Splunk HEC refused {len(rejected)} of {len(records)} events (the others were indexed): "
                + "; ".join(sorted({reason for _, reason in rejected})[:3]),
                rejected=rejected,
            )

    def _invalid_event(self, response: HttpResponse) -> tuple[int, str] | None:
        """``(invalid-event-number, reason)`` for a 400 about one event of the batch."""
        if response.status != 400:
            return None
        try:
            answer = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(answer, dict) or answer.get("code") not in EVENT_ERROR_CODES:
            return None
        number = answer.get("invalid-event-number")
        if not isinstance(number, int) or number < 0:
            return None
        return number, f"HEC code {answer.get('code')}: {answer.get('text', '')}"

    def _setup_error(self, response: HttpResponse) -> None:
        try:
            answer = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            return
        if isinstance(answer, dict) and answer.get("code") in SETUP_ERROR_CODES:
            raise HttpRetryableError(
                f"{response.describe()}: HEC code {answer['code']}: {answer.get('text', '')} "
                "(check splunk_token, channel and the token's indexer acknowledgement setting)",
                response.status,
            )

    async def _wait_for_ack(self, response: HttpResponse) -> None:
        answer = response.json()
        ack_id = answer.get("ackId") if isinstance(answer, dict) else None
        if not isinstance(ack_id, int):
            raise BadResponseError(
                f"{response.describe()}: splunk_ack is on but HEC returned no ackId (is indexer acknowledgement "
                f"enabled for this token?): {response.excerpt()!r}",
                response.status,
            )
        deadline = time.monotonic() + self.ack_timeout
        body = orjson.dumps({"acks": [ack_id]})
        while True:
            poll = await self.http.send(
                "POST", ACK_PATH, body, content_type="application/json", params={"channel": self.channel or ""}
            )
            acks = poll.json()
            state = acks.get("acks") if isinstance(acks, dict) else None
            if not isinstance(state, dict):
                raise BadResponseError(f"{poll.describe()}: ack answer without 'acks': {poll.excerpt()!r}", poll.status)
            if state.get(str(ack_id)) is True:
                return
            if time.monotonic() >= deadline:
                raise HttpRetryableError(
                    f"HEC did not confirm ackId {ack_id} on channel {self.channel} within {self.ack_timeout:g}s; "
                    "sending the batch again"
                )
            await asyncio.sleep(self.ack_interval)
