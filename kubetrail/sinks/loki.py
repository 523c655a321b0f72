"""The ``loki`` output: Loki's push API (``/loki/api/v1/push``, JSON, gzip) with Fluent Bit's options.

Labels (Fluent Bit's syntax): ``labels job=fluent-bit, $sub['stream'], team=$meta['team']`` —
fixed pairs, record accessors (the label is named after the accessor's last key) and named
accessors; ``label_keys`` adds accessors; ``auto_kubernetes_labels`` adds the pod's labels from
the ``kubernetes`` filter. Label names are made valid for Loki (``[a-zA-Z_][a-zA-Z0-9_]*``).
``remove_keys`` drops keys from the line; ``line_format json|key_value``; ``drop_single_key``;
``tenant_id`` (or ``tenant_id_key`` per record) becomes ``X-Scope-OrgID``.

Out-of-order and too-old entries, without loss or silent drops:

* Entries are sorted by time within each stream of a push, so a Loki with ordered writes (or
  an entry within the out-of-order window) is never refused because of kubetrail's own order.
* A 400 from Loki is per entry (``timestamp too old``, ``entry too far behind``, line too
  long, bad labels): Loki has *stored every other entry of the push* and names only some of
  the refused ones (at most ``max_returned_errors``, timestamps rounded). So kubetrail finds
  the refused ones itself: entries older than the ``oldest acceptable timestamp`` Loki quotes
  are refused for sure; the rest is sent again, split in halves while Loki still answers
  400, down to single entries. Resending stored entries is harmless because Loki ignores an
  entry identical in stream, timestamp and line to one it has. Each refused entry ends in a
  :class:`PermanentError` ``rejected`` list with Loki's message (dead letter), never dropped
  silently; 429 and 5xx retry the whole push (same idempotence argument).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson

from kubetrail.core.accessor import RecordAccessor
from kubetrail.core.component import ComponentContext
from kubetrail.core.config.compat import no_effect
from kubetrail.core.errors import ConfigError, PermanentError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.core.values import split_list
from kubetrail.sinks.http_base import HttpResponse, HttpSink, check_status, client_options, refuses_client_certificate

_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")
# Only the max-age message: its cutoff holds for the whole tenant ("entry too far behind" also
# quotes an "oldest acceptable timestamp", but that one is per stream).
_TOO_OLD_CUTOFF = re.compile(r"has timestamp too old: [^,]+, oldest acceptable timestamp is: ([0-9T:+\-Z]+)")
MAX_ISOLATION_REQUESTS = 4096  # bound on the halving, so a broken push cannot loop for long


def label_name(name: str) -> str:
    cleaned = _INVALID_LABEL_CHARS.sub("_", name)
    return "_" + cleaned if not cleaned or cleaned[0].isdigit() else cleaned


def _label_value(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else orjson.dumps(value).decode()


class LokiSink(HttpSink):
    plugin_name = "loki"
    description = "Grafana Loki push API (JSON, gzip), labels from record keys"
    options = (
        *client_options(3100, "/loki/api/v1/push", bearer_token=True, default_compress="gzip"),
        Option("tenant_id", help="Sent as X-Scope-OrgID (multi-tenant Loki)"),
        Option("tenant_id_key", help="Record key whose value is the tenant (overrides tenant_id)"),
        Option("labels", "str", "job=fluent-bit", help="key=value, $accessor or key=$accessor, comma separated"),
        Option("label_keys", "list", [], help="Record accessors that become labels"),
        Option("remove_keys", "list", [], help="Record accessors removed from the line"),
        Option("drop_single_key", "choice", "off", choices=("on", "off", "true", "false", "raw")),
        Option("line_format", "choice", "json", choices=("json", "key_value")),
        Option("auto_kubernetes_labels", "bool", False, help="The pod's labels (kubernetes filter) as labels"),
        Option("label_map_path", help="JSON file: nested record keys -> label names (Fluent Bit's label map)"),
        Option("structured_metadata", "str", "", help="key=value or key=$accessor pairs sent as structured metadata"),
        Option("structured_metadata_map_keys", "list", [], help="Record accessors of maps whose entries are metadata"),
        no_effect("structured_metadata_map_values", why="use structured_metadata or structured_metadata_map_keys"),
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.fixed: dict[str, str] = {}
        self.dynamic: list[tuple[str, RecordAccessor]] = []
        try:
            for item in split_list(config["labels"]):
                name, eq, value = item.partition("=")
                name, value = name.strip(), value.strip()
                if eq and value.startswith("$"):
                    self.dynamic.append((label_name(name), RecordAccessor(value)))
                elif eq and name:
                    self.fixed[label_name(name)] = value
                elif item.startswith("$"):
                    accessor = RecordAccessor(item)
                    self.dynamic.append((label_name(str(accessor.path[-1])), accessor))
                else:
                    raise ValueError(f"{item!r} is neither key=value nor a $record['accessor']")
            for item in config["label_keys"]:
                if not item.startswith("$"):
                    raise ValueError(f"label_keys entry {item!r} must be a record accessor such as $key")
                accessor = RecordAccessor(item)
                self.dynamic.append((label_name(str(accessor.path[-1])), accessor))
        except ValueError as exc:
            raise ConfigError(str(exc), key="labels") from None
        try:
            self.remove = [RecordAccessor(k if k.startswith("$") else "$" + k) for k in config["remove_keys"]]
            tenant_key = config["tenant_id_key"]
            self.tenant_key = RecordAccessor(tenant_key) if tenant_key else None
        except ValueError as exc:
            raise ConfigError(str(exc), key="remove_keys") from None
        if config["label_map_path"]:
            self.dynamic.extend(_label_map(config["label_map_path"]))
        self.metadata_fixed: dict[str, str] = {}
        self.metadata_dynamic: list[tuple[str, RecordAccessor]] = []
        try:
            for item in split_list(config["structured_metadata"]):
                name, eq, value = item.partition("=")
                if not eq or not name.strip():
                    raise ValueError(f"{item!r} is not key=value or key=$accessor")
                if value.strip().startswith("$"):
                    self.metadata_dynamic.append((name.strip(), RecordAccessor(value.strip())))
                else:
                    self.metadata_fixed[name.strip()] = value.strip()
            self.metadata_maps = [RecordAccessor(k) for k in config["structured_metadata_map_keys"]]
        except ValueError as exc:
            raise ConfigError(str(exc), key="structured_metadata") from None
        self.label_accessors = [accessor for _, accessor in self.dynamic]
        self.tenant: str | None = config["tenant_id"] or None
        self.drop_single_key: str = {"true": "on", "false": "off"}.get(
            config["drop_single_key"], config["drop_single_key"]
        )
        self.line_format: str = config["line_format"]
        self.auto_kubernetes_labels: bool = config["auto_kubernetes_labels"]

    # -- building the push ----------------------------------------------------------------

    def _labels(self, body: dict[str, Any]) -> dict[str, str]:
        labels = dict(self.fixed)
        if self.auto_kubernetes_labels:
            kube = body.get("kubernetes")
            if isinstance(kube, dict) and isinstance(kube.get("labels"), dict):
                for key, value in kube["labels"].items():
                    text = _label_value(value)
                    if text is not None:
                        labels[label_name(key)] = text
        for name, accessor in self.dynamic:
            text = _label_value(accessor.get(body))
            if text is not None:
                labels[name] = text
        return labels

    def _line(self, record: Record) -> str:
        if not (self.remove or self.dynamic or self.drop_single_key != "off" or self.line_format != "json"):
            return record.json_bytes().decode()  # the record as it came: no copy, no re-encode
        body = self._without(record.body)
        if self.drop_single_key != "off" and len(body) == 1:
            value = next(iter(body.values()))
            if self.drop_single_key == "raw" and isinstance(value, str):
                return value
            return orjson.dumps(value).decode() if self.line_format == "json" else str(value)
        if self.line_format == "key_value":
            return " ".join(f"{key}={_label_value(value) or ''}" for key, value in body.items())
        return orjson.dumps(body).decode()

    def _without(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body minus ``remove_keys`` and the keys that became labels (as Fluent Bit does)."""
        removing = [*self.remove, *self.label_accessors]
        if not removing:
            return body
        # The record is shared with other sinks: copy only the dicts on the way to each removed
        # key (a deep copy of the whole body cost more than the rest of the line together).
        body = dict(body)
        for accessor in removing:
            parent: Any = body
            for part in accessor.path[:-1]:
                child = parent.get(part)
                if not isinstance(child, dict):
                    parent = None
                    break
                child = parent[part] = dict(child)  # copied again per path: cheap, always safe
                parent = child
            if isinstance(parent, dict):
                parent.pop(accessor.path[-1], None)
        return body

    def _tenant(self, record: Record) -> str | None:
        if self.tenant_key is not None:
            value = _label_value(self.tenant_key.get(record.body))
            if value:
                return value
        return self.tenant

    def _metadata(self, body: dict[str, Any]) -> dict[str, str]:
        """Loki's structured metadata of one entry (a third element of the value, Loki 2.9+)."""
        metadata = dict(self.metadata_fixed)
        for name, accessor in self.metadata_dynamic:
            text = _label_value(accessor.get(body))
            if text is not None:
                metadata[name] = text
        for accessor in self.metadata_maps:
            found = accessor.get(body)
            if isinstance(found, dict):
                for key, value in found.items():
                    text = _label_value(value)
                    if text is not None:
                        metadata[str(key)] = text
        return metadata

    def _push_body(self, entries: list[tuple[int, Record]]) -> bytes:
        streams: dict[str, tuple[dict[str, str], list[tuple[int, int, str, dict[str, str]]]]] = {}
        with_metadata = bool(self.metadata_fixed or self.metadata_dynamic or self.metadata_maps)
        for index, record in entries:
            labels = self._labels(record.body)
            key = orjson.dumps(labels, option=orjson.OPT_SORT_KEYS).decode()
            stream = streams.get(key)
            if stream is None:
                stream = streams[key] = (labels, [])
            metadata = self._metadata(record.body) if with_metadata else {}
            stream[1].append((record.time_ns, index, self._line(record), metadata))
        payload = []
        for labels, values in streams.values():
            values.sort(key=lambda item: (item[0], item[1]))  # by time, stable within a stream
            payload.append(
                {
                    "stream": labels,
                    "values": [[str(ts), line, meta] if meta else [str(ts), line] for ts, _, line, meta in values],
                }
            )
        return orjson.dumps({"streams": payload})

    # -- delivery -------------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        by_tenant: dict[str | None, list[tuple[int, Record]]] = {}
        for index, record in enumerate(batch.records):
            by_tenant.setdefault(self._tenant(record), []).append((index, record))
        rejected: list[tuple[int, Record, str]] = []
        for tenant, entries in by_tenant.items():
            rejected += await self._deliver(tenant, entries)
        if rejected:
            rejected.sort(key=lambda item: item[0])
            reasons = sorted({reason for _, _, reason in rejected})
            raise PermanentError(
                f"Loki refused {len(rejected)} of {len(batch)} entries (the others were stored): "
                + "; ".join(reasons[:3]),
                rejected=[(record, reason) for _, record, reason in rejected],
            )

    async def _push(self, tenant: str | None, entries: list[tuple[int, Record]]) -> HttpResponse:
        headers = {"X-Scope-OrgID": tenant} if tenant else None
        body = self._push_body(entries)
        return await self.http.request("POST", None, body, content_type="application/json", headers=headers)

    async def _deliver(self, tenant: str | None, entries: list[tuple[int, Record]]) -> list[tuple[int, Record, str]]:
        """Push ``entries``; returns the ones Loki refused for good, with its reason."""
        response = await self._push(tenant, entries)
        if response.status != 400 or refuses_client_certificate(response):
            check_status(response)  # 2xx returns; 429/5xx retry the whole batch (resends are deduplicated)
            return []
        # Per-entry refusal: the others are stored. Find the refused ones.
        message = response.excerpt(2000)
        rejected: list[tuple[int, Record, str]] = []
        cutoff = _too_old_cutoff(message)
        if cutoff is not None:
            too_old = [(i, r) for i, r in entries if r.time_ns < cutoff]
            rejected += [(i, r, f"Loki: timestamp too old ({message[:300]})") for i, r in too_old]
            entries = [(i, r) for i, r in entries if r.time_ns >= cutoff]
            if not entries:
                return rejected
            response = await self._push(tenant, entries)
            if response.status != 400:
                check_status(response)
                return rejected
        budget = [MAX_ISOLATION_REQUESTS]
        return rejected + await self._isolate(tenant, entries, response, budget)

    async def _isolate(
        self, tenant: str | None, entries: list[tuple[int, Record]], response: HttpResponse, budget: list[int]
    ) -> list[tuple[int, Record, str]]:
        """``entries`` got a 400: halve until each refused entry is alone."""
        if len(entries) == 1:
            index, record = entries[0]
            return [(index, record, f"Loki: HTTP 400: {response.excerpt()}")]
        result: list[tuple[int, Record, str]] = []
        half = len(entries) // 2
        for part in (entries[:half], entries[half:]):
            budget[0] -= 1
            if budget[0] < 0:
                raise PermanentError(f"Loki keeps refusing parts of the push: {response.excerpt()}")
            answer = await self._push(tenant, part)
            if answer.status == 400:
                result += await self._isolate(tenant, part, answer, budget)
            else:
                check_status(answer)
        return result


def _too_old_cutoff(message: str) -> int | None:
    """Loki's ``oldest acceptable timestamp`` (seconds, rounded down) in ns, if it quotes one."""
    cutoffs = []
    for stamp in _TOO_OLD_CUTOFF.findall(message):
        try:
            when = datetime.fromisoformat(stamp)
        except ValueError:
            continue
        if when.tzinfo is not None:  # RFC 3339 always has a zone; anything else is not Loki's
            cutoffs.append(int(when.timestamp()) * 1_000_000_000)
    return max(cutoffs) if cutoffs else None


def _label_map(path: str) -> list[tuple[str, RecordAccessor]]:
    """Fluent Bit's ``label_map_path``: a JSON object whose nesting follows the record's and whose
    string leaves are label names (``{"sub": {"stream": "stream"}}`` = ``$sub['stream']``)."""
    try:
        with open(path, "rb") as handle:
            tree = orjson.loads(handle.read())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the label map {path}: {exc}", key="label_map_path") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"the label map {path} must be a JSON object", key="label_map_path")
    found: list[tuple[str, RecordAccessor]] = []

    def walk(node: dict[str, Any], trail: list[str]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, [*trail, key])
            elif isinstance(value, str):
                parts = [*trail, key]
                pattern = "$" + parts[0] + "".join(f"['{p}']" for p in parts[1:])
                found.append((label_name(value), RecordAccessor(pattern)))
            else:
                raise ConfigError(
                    f"the label map {path}: {key!r} must map to a label name or an object", key="label_map_path"
                )

    walk(tree, [])
    return found
