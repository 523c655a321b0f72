"""The history queries against Elasticsearch / OpenSearch, on the fields kubetrail writes there.

The ``es`` and ``opensearch`` outputs store each record as it is (audit events keep
``objectRef``, ``user``, ``verb``, ``responseStatus``; Events keep ``involvedObject`` or
``regarding``; container logs keep ``kubernetes.pod_name``) plus the time key (``@timestamp``
by default). These queries use exactly those fields, so an index written by kubetrail (or by
Fluent Bit with the same records) answers ``history``, ``who`` and ``search`` as the store does.

* **The mapping decides the query.** Dynamic mapping makes a string field ``text`` with a
  ``.keyword`` subfield; an explicit mapping may make it ``keyword``. The index's mapping is read
  once and each filter becomes a ``term`` on the field or its ``.keyword`` (exact), or a
  ``match_phrase`` on a text field without one. Fields the index lacks are named in the error
  (``--from`` pointing at an index that kubetrail did not write).
* **Kinds.** Events name the object's kind (``Deployment``), audit records its resource
  (``deployments``): the Event side is queried with the kind spelled from the resource,
  case-insensitively.
* Plain ``urllib`` (one request per question; this is a command, not the hot path).
* Results are capped by the index's result window (10,000 by default), like ``--limit``.
* **Alerts** are the ``detect`` filter's documents as the outputs write them (``rule``,
  ``priority``, ``output``, ``output_fields`` with Falco's field names, ``k8s.audit.id``,
  ``k8s.audit.stage``; dotted names are objects in the mapping). An object's or a user's audit
  records bring the alerts of their auditIDs (one ``terms`` query), alerts whose
  ``output_fields.ka.target.*``/``ka.user.name`` name the object or user come with the records,
  as the store's columns do; ``--priority`` is "this or more severe", by Falco's names.
  Alerts cannot share an index with Kubernetes Events (an alert's ``source`` is a string,
  ``k8s_audit``, an Event's an object): send them to an index of their own and read both,
  ``es://HOST:PORT/kubetrail,kubetrail-alerts`` (a list or a pattern, as Elasticsearch takes it).
"""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

from kubetrail.core.kinds import kind_of_resource, resource_of_kind
from kubetrail.detect.rules import PRIORITIES
from kubetrail.history.model import HistoryError, ObjectRef, StoredRecord, with_alerts
from kubetrail.history.store import MUTATING, STAGES, WORKLOADS, Filters
from kubetrail.parsers.timefmt import TimeParser

MAX_WINDOW = 10_000
AUDIT_FIELDS = ("objectRef.resource", "objectRef.name", "objectRef.namespace", "user.username", "verb")
EVENT_FIELDS = ("involvedObject.kind", "involvedObject.name", "involvedObject.namespace", "reason")
_TIMES = TimeParser()
# The alert's own fields that stand for the store's columns (what its rule's output printed).
ALERT_COLUMNS = {
    "user": "output_fields.ka.user.name",
    "verb": "output_fields.ka.verb",
    "resource": "output_fields.ka.target.resource",
    "namespace": "output_fields.ka.target.namespace",
    "name": "output_fields.ka.target.name",
    "code": "output_fields.ka.response.code",
}


class EsBackend:
    name = "elasticsearch"

    def __init__(self, base_url: str, index: str, *, time_key: str = "@timestamp", auth: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.index = index
        self.time_key = time_key
        self.auth = auth
        self.fields = self._mapping()

    @classmethod
    def from_url(cls, url: str) -> EsBackend:
        """``es://HOST:PORT/INDEX`` (``opensearch://`` too; ``+https`` for TLS; ``?time_key=``)."""
        parsed = urllib.parse.urlsplit(url)
        scheme = "https" if parsed.scheme.endswith("+https") or parsed.scheme == "https" else "http"
        if not parsed.hostname:
            raise HistoryError(f"expected es://HOST:PORT/INDEX, got {url!r}")
        port = parsed.port or 9200
        index = parsed.path.strip("/") or "fluent-bit"
        auth = None
        if parsed.username:
            credentials = f"{urllib.parse.unquote(parsed.username)}:{urllib.parse.unquote(parsed.password or '')}"
            auth = "Basic " + base64.b64encode(credentials.encode()).decode()
        query = dict(urllib.parse.parse_qsl(parsed.query))
        return cls(
            f"{scheme}://{parsed.hostname}:{port}", index, time_key=query.get("time_key", "@timestamp"), auth=auth
        )

    # -- HTTP --------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = orjson.dumps(body) if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.auth:
            request.add_header("Authorization", self.auth)
        try:
            with urllib.request.urlopen(request, timeout=60, context=ssl.create_default_context()) as response:
                return orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            if exc.code == 404:
                raise HistoryError(f"no index {self.index!r} at {self.base_url} ({detail})") from None
            raise HistoryError(f"{self.base_url} answered {exc.code} to {method} {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise HistoryError(f"cannot reach {self.base_url}: {getattr(exc, 'reason', exc)}") from None

    def _resolves_to_nothing(self, quoted_index: str) -> bool:
        """True when the index name or pattern names no index, alias or data stream. ``_resolve``
        answers 200 with empty lists for that, so it never goes through the server's error path."""
        try:
            answer = self._call("GET", f"/_resolve/index/{quoted_index}")
        except HistoryError:
            return False  # unknown: keep the original error
        return isinstance(answer, dict) and not any(answer.get(k) for k in ("indices", "aliases", "data_streams"))

    def _mapping(self) -> dict[str, tuple[str, bool]]:
        """Field path -> (type, has a .keyword subfield), over every index the pattern names."""
        quoted = urllib.parse.quote(self.index, safe=",*")
        try:
            answer = self._call("GET", f"/{quoted}/_mapping")
        except HistoryError:
            # OpenSearch 2.19 sometimes answers 500 ("Unclosed object or array found": its error
            # response fails to serialise) instead of 404 for an index that does not exist, and so
            # can HEAD; _resolve tells the two apart without an error response.
            if self._resolves_to_nothing(quoted):
                raise HistoryError(f"no index {self.index!r} at {self.base_url}") from None
            raise
        fields: dict[str, tuple[str, bool]] = {}

        def walk(properties: dict[str, Any], prefix: str) -> None:
            for name, spec in properties.items():
                path = prefix + name
                if "properties" in spec:
                    walk(spec["properties"], path + ".")
                else:
                    fields[path] = (spec.get("type", "object"), "keyword" in (spec.get("fields") or {}))

        for index in answer.values():
            mappings = index.get("mappings") or {}
            if "properties" not in mappings and len(mappings) == 1:  # Elasticsearch 6: one type level
                mappings = next(iter(mappings.values()))
            walk(mappings.get("properties") or {}, "")
        if not fields:
            raise HistoryError(f"index {self.index!r} has no documents or no mapping yet")
        return fields

    def _missing(self, names: tuple[str, ...]) -> list[str]:
        return [name for name in names if name not in self.fields]

    # -- query building ------------------------------------------------------------------------

    def _term(self, field: str, value: Any, insensitive: bool = False) -> dict[str, Any]:
        kind, has_keyword = self.fields.get(field, ("keyword", False))
        if kind == "text":
            if has_keyword:
                return self._term_on(field + ".keyword", value, insensitive)
            return {"match_phrase": {field: value}}
        return self._term_on(field, value, insensitive and kind == "keyword")

    @staticmethod
    def _term_on(field: str, value: Any, insensitive: bool) -> dict[str, Any]:
        if insensitive:
            return {"term": {field: {"value": value, "case_insensitive": True}}}
        return {"term": {field: value}}

    def _any_of(self, field: str, values: list[Any]) -> dict[str, Any]:
        kind, has_keyword = self.fields.get(field, ("keyword", False))
        if kind == "text" and has_keyword:
            return {"terms": {field + ".keyword": values}}
        if kind == "text":
            return {"bool": {"should": [{"match_phrase": {field: v}} for v in values], "minimum_should_match": 1}}
        return {"terms": {field: values}}

    def _alert_clause(self, **columns: Any) -> dict[str, Any] | None:
        """Alerts whose own fields have these values (None: the index holds no alerts, or none
        of them prints one of these fields)."""
        if self._missing(("rule", "k8s.audit.id")):
            return None
        clauses: list[dict[str, Any]] = [{"exists": {"field": "rule"}}, {"exists": {"field": "k8s.audit.id"}}]
        for key, value in columns.items():
            if value is None:
                continue
            field = ALERT_COLUMNS[key]
            if field not in self.fields:
                return None
            clauses.append(self._any_of(field, value) if isinstance(value, list) else self._term(field, value))
        return {"bool": {"filter": clauses}}

    def _prefix(self, field: str, value: str) -> dict[str, Any]:
        kind, has_keyword = self.fields.get(field, ("keyword", False))
        target = field + ".keyword" if kind == "text" and has_keyword else field
        return {"prefix": {target: value}}

    def _range(self, since: int | None, until: int | None) -> list[dict[str, Any]]:
        if since is None and until is None:
            return []
        bounds: dict[str, Any] = {"format": "epoch_millis"}
        if since is not None:
            bounds["gte"] = since // 1_000_000
        if until is not None:
            bounds["lte"] = until // 1_000_000
        return [{"range": {self.time_key: bounds}}]

    def _object_clauses(self, ref: ObjectRef) -> list[dict[str, Any]]:
        clauses = []
        if not self._missing(("objectRef.resource", "objectRef.name")):
            audit = [self._term("objectRef.name", ref.name), self._term("objectRef.resource", ref.resource)]
            if ref.namespace is not None:
                audit.append(self._term("objectRef.namespace", ref.namespace))
            clauses.append({"bool": {"filter": audit}})
        for side in ("involvedObject", "regarding"):
            if self._missing((f"{side}.kind", f"{side}.name")):
                continue
            event = [
                self._term(f"{side}.name", ref.name),
                self._term(f"{side}.kind", kind_of_resource(ref.resource), insensitive=True),
            ]
            if ref.namespace is not None:
                event.append(self._term(f"{side}.namespace", ref.namespace))
            clauses.append({"bool": {"filter": event}})
        alert = self._alert_clause(resource=ref.resource, namespace=ref.namespace, name=ref.name)
        if alert is not None and clauses:
            clauses.append(alert)
        if not clauses:
            missing = self._missing(
                ("objectRef.resource", "objectRef.name", "involvedObject.kind", "involvedObject.name")
            )
            raise HistoryError(
                f"index {self.index!r} has none of kubetrail's object fields (missing: {', '.join(missing)}); "
                "is it written by kubetrail's es/opensearch output with audit records or Events?"
            )
        return clauses

    def _search(self, query: dict[str, Any], limit: int) -> list[StoredRecord]:
        if self.time_key not in self.fields:
            raise HistoryError(f"index {self.index!r} has no time field {self.time_key!r} (set ?time_key= in the URL)")
        # The newest ``limit`` (what a long history needs first), shown oldest first.
        body = {"query": query, "size": min(limit, MAX_WINDOW), "sort": [{self.time_key: {"order": "desc"}}]}
        answer = self._call("POST", f"/{urllib.parse.quote(self.index, safe=',*')}/_search", body)
        records = []
        for hit in answer.get("hits", {}).get("hits", []):
            source = hit.get("_source") or {}
            records.append(StoredRecord(hit["_id"], self._time_ns(source, hit), _kind(source), source))
        records.reverse()
        return records

    def _time_ns(self, source: dict[str, Any], hit: dict[str, Any]) -> int:
        value = source.get(self.time_key)
        try:
            return _TIMES.parse_ns(value) if value is not None else int(hit.get("sort", [0])[0]) * 1_000_000
        except (ValueError, TypeError):
            return int(hit.get("sort", [0])[0]) * 1_000_000

    # -- the backend's questions -----------------------------------------------------------------

    def resources(self) -> list[str]:
        aggs: dict[str, Any] = {}
        for name, field in (("audit", "objectRef.resource"), ("event", "involvedObject.kind")):
            if field in self.fields:
                kind, has_keyword = self.fields[field]
                aggs[name] = {
                    "terms": {"field": field + ".keyword" if kind == "text" and has_keyword else field, "size": 500}
                }
        if not aggs:
            return []
        answer = self._call("POST", f"/{urllib.parse.quote(self.index, safe=',*')}/_search", {"size": 0, "aggs": aggs})
        found = set()
        for name, agg in (answer.get("aggregations") or {}).items():
            for bucket in agg.get("buckets", []):
                found.add(bucket["key"] if name == "audit" else resource_of_kind(bucket["key"]))
        return sorted(found)

    def object_records(
        self, ref: ObjectRef, since: int | None, until: int | None, logs: bool, limit: int
    ) -> list[StoredRecord]:
        should = self._object_clauses(ref)
        if ref.resource in WORKLOADS and not self._missing(("involvedObject.kind", "involvedObject.name")):
            # Its ReplicaSets' and pods' Events, named after it (as the store answers).
            owned = [
                self._prefix("involvedObject.name", ref.name + "-"),
                {
                    "bool": {
                        "should": [
                            self._term("involvedObject.kind", kind, insensitive=True)
                            for kind in ("ReplicaSet", "Pod", "Job")
                        ],
                        "minimum_should_match": 1,
                    }
                },
            ]
            if ref.namespace is not None:
                owned.append(self._term("involvedObject.namespace", ref.namespace))
            should.append({"bool": {"filter": owned}})
        if logs and "kubernetes.pod_name" in self.fields:
            if ref.resource == "pods":
                pod = [self._term("kubernetes.pod_name", ref.name)]
            elif ref.resource in WORKLOADS:
                pod = [self._prefix("kubernetes.pod_name", ref.name + "-")]
            else:
                pod = []
            if pod:
                if ref.namespace is not None:
                    pod.append(self._term("kubernetes.namespace_name", ref.namespace))
                should.append({"bool": {"filter": pod}})
        query = {"bool": {"should": should, "minimum_should_match": 1, "filter": self._range(since, until)}}
        return with_alerts(self._search(query, limit), self.alerts_for)[-limit:]

    def alerts_for(self, audit_ids: list[str]) -> list[StoredRecord]:
        """The alerts fired by these audit requests (any stage)."""
        if self._missing(("rule", "k8s.audit.id")):
            return []
        out: list[StoredRecord] = []
        for start in range(0, len(audit_ids), 1000):
            chunk = audit_ids[start : start + 1000]
            query = {"bool": {"filter": [{"exists": {"field": "rule"}}, self._any_of("k8s.audit.id", chunk)]}}
            out += self._search(query, MAX_WINDOW)
        return out

    def triggers_of(self, alerts: list[tuple[str, int]]) -> list[StoredRecord]:
        """The audit records of these alerts' requests (``(auditID, time)``: every stage stored)."""
        if self._missing(("auditID", "stage")):
            return []
        audit_ids = list(dict.fromkeys(audit_id for audit_id, _ in alerts))
        out: list[StoredRecord] = []
        for start in range(0, len(audit_ids), 1000):
            chunk = audit_ids[start : start + 1000]
            query = {
                "bool": {"filter": [self._any_of("auditID", chunk), self._any_of("stage", list(STAGES))]},
            }
            out += [r for r in self._search(query, MAX_WINDOW) if r.kind == "audit"]
        return out

    def uid_ref(self, uid: str) -> ObjectRef | None:
        should = [
            # objectRef.uid is set on few requests; the object in a response always carries its uid.
            self._term(f, uid)
            for f in ("objectRef.uid", "responseObject.metadata.uid", "involvedObject.uid", "regarding.uid")
            if f in self.fields
        ]
        if not should:
            return None
        for record in self._search({"bool": {"should": should, "minimum_should_match": 1}}, 10):
            body = record.body
            ref = body.get("objectRef") or {}
            if ref.get("name") and ref.get("resource"):
                return ObjectRef(ref["resource"], ref.get("namespace"), ref["name"])
            involved = body.get("involvedObject") or body.get("regarding") or {}
            if involved.get("name") and involved.get("kind"):
                return ObjectRef(resource_of_kind(involved["kind"]), involved.get("namespace"), involved["name"])
        return None

    def user_records(
        self, user: str, since: int | None, until: int | None, limit: int, writes_only: bool = False
    ) -> list[StoredRecord]:
        missing = self._missing(("user.username",))
        if missing:
            raise HistoryError(f"index {self.index!r} has no audit user field (missing: {', '.join(missing)})")
        filters = [self._term("user.username", user)]
        if writes_only:
            filters.append({"bool": {"should": [self._term("verb", v) for v in MUTATING], "minimum_should_match": 1}})
        sides = [{"bool": {"filter": filters}}]
        alert = self._alert_clause(user=user, verb=list(MUTATING) if writes_only else None)
        if alert is not None:
            sides.append(alert)
        query = {"bool": {"should": sides, "minimum_should_match": 1, "filter": self._range(since, until)}}
        return with_alerts(self._search(query, limit), self.alerts_for)[-limit:]

    def search(self, filters: Filters, since: int | None, until: int | None, limit: int) -> list[StoredRecord]:
        alerts = self._alert_search(filters)
        if filters.alerts_only:
            if alerts is None:
                return []
            return self._search({"bool": {"filter": [alerts, *self._range(since, until)]}}, limit)
        records = self._record_search(filters)
        if filters.kind is None and alerts is not None:
            records = {"bool": {"should": [records, alerts], "minimum_should_match": 1}}
        return self._search({"bool": {"filter": [records, *self._range(since, until)]}}, limit)

    def _alert_search(self, filters: Filters) -> dict[str, Any] | None:
        """The alerts matching ``filters`` (their columns as the store has them), or None."""
        if filters.reason is not None:
            return None  # alerts have no reason
        query = self._alert_clause(
            user=filters.user,
            verb=list(MUTATING) if filters.writes_only and filters.verb is None else filters.verb,
            resource=filters.resource,
            namespace=filters.namespace,
            name=filters.name,
            code=str(filters.code) if filters.code is not None else None,
        )
        if query is None:
            return None
        if filters.writes_only and filters.verb is not None and filters.verb not in MUTATING:
            return None
        if filters.rule is not None:
            query["bool"]["filter"].append(self._term("rule", filters.rule))
        if filters.level is not None:
            names = [name for level, name in enumerate(PRIORITIES) if level <= filters.level]
            query["bool"]["filter"].append(self._any_of("priority", names))
        return query

    def _record_search(self, filters: Filters) -> dict[str, Any]:
        clauses: list[dict[str, Any]] = []
        fields = {"user": "user.username", "verb": "verb", "code": "responseStatus.code", "reason": "reason"}
        for key, field in fields.items():
            value = getattr(filters, key)
            if value is not None:
                if field not in self.fields:
                    raise HistoryError(f"index {self.index!r} has no field {field!r} (for --{key})")
                clauses.append(self._term(field, value))
        if filters.kind == "audit":
            clauses.append({"exists": {"field": "auditID"}})
        elif filters.kind == "event":
            clauses.append({"exists": {"field": "involvedObject"}})
        elif filters.kind == "log":
            clauses.append({"exists": {"field": "kubernetes.pod_name"}})
        if filters.writes_only:
            clauses.append({"bool": {"should": [self._term("verb", v) for v in MUTATING], "minimum_should_match": 1}})
        if filters.resource or filters.namespace or filters.name:
            sides = []
            audit = []
            event = []
            if filters.resource:
                audit.append(self._term("objectRef.resource", filters.resource))
                event.append(self._term("involvedObject.kind", kind_of_resource(filters.resource), insensitive=True))
            if filters.namespace:
                audit.append(self._term("objectRef.namespace", filters.namespace))
                event.append(self._term("involvedObject.namespace", filters.namespace))
            if filters.name:
                audit.append(self._term("objectRef.name", filters.name))
                event.append(self._term("involvedObject.name", filters.name))
            sides = [{"bool": {"filter": audit}}, {"bool": {"filter": event}}]
            clauses.append({"bool": {"should": sides, "minimum_should_match": 1}})
        return {"bool": {"filter": clauses}}

    def _terms(self, field: str, filters: list[dict[str, Any]]) -> list[str]:
        if field not in self.fields:
            return []
        kind, has_keyword = self.fields[field]
        target = field + ".keyword" if kind == "text" and has_keyword else field
        body = {
            "size": 0,
            "query": {"bool": {"filter": filters}},
            "aggs": {"v": {"terms": {"field": target, "size": 1000}}},
        }
        answer = self._call("POST", f"/{urllib.parse.quote(self.index, safe=',*')}/_search", body)
        return [b["key"] for b in (answer.get("aggregations") or {}).get("v", {}).get("buckets", [])]

    def near_names(self, ref: ObjectRef) -> list[str]:
        names = []
        if "objectRef.resource" in self.fields:
            flt = [self._term("objectRef.resource", ref.resource)]
            if ref.namespace is not None:
                flt.append(self._term("objectRef.namespace", ref.namespace))
            names += self._terms("objectRef.name", flt)
        if "involvedObject.kind" in self.fields:
            flt = [self._term("involvedObject.kind", kind_of_resource(ref.resource), insensitive=True)]
            if ref.namespace is not None:
                flt.append(self._term("involvedObject.namespace", ref.namespace))
            names += self._terms("involvedObject.name", flt)
        return sorted(set(names))

    def users(self) -> list[str]:
        return self._terms("user.username", [])

    def close(self) -> None:
        """Nothing held open (one request per question)."""


def _kind(source: dict[str, Any]) -> str:
    if "auditID" in source and "stage" in source:
        return "audit"
    if "rule" in source and "k8s.audit.id" in source:
        return "alert"
    if "involvedObject" in source or "regarding" in source:
        return "event"
    kube = source.get("kubernetes")
    if isinstance(kube, dict) and kube.get("pod_name"):
        return "log"
    return "other"
