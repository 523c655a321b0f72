"""The ``kubernetes`` filter's logic without an API server: stores fed as a watch would feed
them, records processed as the router would hand them over. (Against a real API server:
tests/integration/test_container_logs.py.)"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from kubetrail.core.block import TextBlock
from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Batch, Record
from kubetrail.parsers.klog_parser import KlogParser
from kubetrail.parsers.logr_parser import LogrParser
from kubetrail.parsers.multiline import ContainerLogJoiner, JoinStats
from kubetrail.transforms.kubernetes import KubernetesTransform
from tests.unit.helpers import build

CID = "c" * 64
OLD_CID = "0" * 64


def pod(name: str = "web-1", uid: str = "uid-1", cid: str | None = CID, **meta: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"podIP": "10.0.0.7"}
    if cid:
        status["containerStatuses"] = [
            {"name": "app", "image": "app:1", "imageID": "sha256:abc", "containerID": f"containerd://{cid}"}
        ]
    return {
        "metadata": {"name": name, "namespace": "shop", "uid": uid, **meta},
        "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "app:1"}]},
        "status": status,
    }


def tag(name: str = "web-1", cid: str = CID, container: str = "app") -> str:
    return f"kube.var.log.containers.{name}_shop_{container}-{cid}.log"


def filt(**props: Any) -> KubernetesTransform:
    return build(KubernetesTransform, kube_url="http://127.0.0.1:1", **props)  # type: ignore[no-any-return]


def records(t: str, *logs: str, stream: str = "stdout") -> list[Record]:
    return [Record(t, 1, {"log": log, "stream": stream}) for log in logs]


def test_records_get_pod_metadata_resolved_once_per_tag() -> None:
    f = filt(owner_references="on")
    f.pods.apply("ADDED", pod(labels={"app": "web"}, annotations={"a": "b"}, ownerReferences=[{"kind": "ReplicaSet"}]))
    out = f.process(records(tag(), "one", "two"))
    meta = out[0].body["kubernetes"]
    assert meta == {
        "pod_name": "web-1",
        "namespace_name": "shop",
        "pod_id": "uid-1",
        "labels": {"app": "web"},
        "annotations": {"a": "b"},
        "host": "node-a",
        "pod_ip": "10.0.0.7",
        "container_name": "app",
        "docker_id": CID,
        "container_hash": "sha256:abc",
        "container_image": "app:1",
        "ownerReferences": [{"kind": "ReplicaSet"}],
    }
    assert out[1].body["kubernetes"] is meta  # built once, shared by the batch


def test_labels_and_annotations_can_be_left_out() -> None:
    f = filt(labels="off", annotations="off")
    f.pods.apply("ADDED", pod(labels={"app": "web"}, annotations={"a": "b"}))
    meta = f.process(records(tag(), "x"))[0].body["kubernetes"]
    assert "labels" not in meta and "annotations" not in meta


def test_unknown_pod_keeps_what_the_tag_says_and_is_counted() -> None:
    f = filt()
    out = f.process(records(tag("nobody"), "x", "y"))
    assert out[0].body["kubernetes"] == {
        "pod_name": "nobody",
        "namespace_name": "shop",
        "container_name": "app",
        "docker_id": CID,
    }
    text = _metrics(f)
    misses = [line for line in text.splitlines() if line.startswith("kubetrail_k8s_metadata_misses_total{")]
    assert len(misses) == 1 and 'reason="not_synced"' in misses[0] and misses[0].endswith(" 2.0")
    # Known later (the watch caught up): the next batch gets the metadata.
    f.pods.apply("ADDED", pod("nobody", uid="uid-9"))
    assert f.process(records(tag("nobody"), "z"))[0].body["kubernetes"]["pod_id"] == "uid-9"


def test_non_container_tags_pass_unchanged() -> None:
    f = filt()
    record = Record("app.audit", 1, {"log": "x"})
    assert f.process([record])[0].body == {"log": "x"}


def test_deleted_pod_keeps_its_metadata_for_the_grace_period() -> None:
    f = filt(deleted_pod_grace="60")
    f.pods.apply("ADDED", pod())
    f.pods.apply("DELETED", pod())
    assert f.process(records(tag(), "late line"))[0].body["kubernetes"]["pod_id"] == "uid-1"
    f.pods.sweep(now=1e12)  # long after the grace period
    assert "pod_id" not in f.process(records(tag(), "later"))[0].body["kubernetes"]


def test_a_recreated_pod_never_lends_its_metadata_to_its_predecessor() -> None:
    f = filt()
    f.pods.apply("ADDED", pod(uid="old", cid=OLD_CID))
    f.pods.apply("DELETED", pod(uid="old", cid=OLD_CID))
    f.pods.apply("ADDED", pod(uid="new", cid=CID))  # same name (StatefulSet)
    out_old = f.process(records(tag(cid=OLD_CID), "from the old pod"))
    out_new = f.process(records(tag(cid=CID), "from the new pod"))
    assert out_old[0].body["kubernetes"]["pod_id"] == "old"
    assert out_new[0].body["kubernetes"]["pod_id"] == "new"


def test_a_relist_drops_pods_that_are_gone_into_the_deleted_set() -> None:
    f = filt()
    f.pods.apply("ADDED", pod())
    f.pods.begin_list()
    f.pods.apply("LISTED", pod("other", uid="uid-2", cid="d" * 64))
    f.pods.end_list()
    assert len(f.pods) == 1
    assert f.process(records(tag(), "x"))[0].body["kubernetes"]["pod_id"] == "uid-1"  # still in grace


def test_namespace_metadata() -> None:
    f = filt(namespace_labels="on")
    assert f.namespaces is not None
    f.pods.apply("ADDED", pod())
    f.namespaces.apply("ADDED", {"metadata": {"name": "shop", "labels": {"team": "t"}, "annotations": {"x": "y"}}})
    body = f.process(records(tag(), "x"))[0].body
    assert body["kubernetes_namespace"] == {"name": "shop", "labels": {"team": "t"}}


def test_no_namespace_watch_unless_asked() -> None:
    assert filt().namespaces is None


def test_merge_log_top_level_or_under_a_key_and_keep_log() -> None:
    f = filt(merge_log="on", keep_log="off")
    f.pods.apply("ADDED", pod())
    body = f.process(records(tag(), '{"level":"warn","kubernetes":"spoof"}\n', "plain"))
    assert body[0].body["level"] == "warn" and "log" not in body[0].body
    assert body[0].body["kubernetes"]["pod_name"] == "web-1"  # a log cannot overwrite metadata
    assert body[1].body["log"] == "plain"
    g = filt(merge_log="on", merge_log_key="app")
    out = g.process(records(tag(), '{"a":1}'))[0].body
    assert out["app"] == {"a": 1} and out["log"] == '{"a":1}'


def test_exclude_and_parser_annotations_by_stream_and_container() -> None:
    from kubetrail.parsers.registry import ParserRegistry

    f = build(
        KubernetesTransform,
        parsers=ParserRegistry(),
        kube_url="http://127.0.0.1:1",
        merge_log="on",
        **{"k8s-logging__exclude": "on", "k8s-logging__parser": "on"},
    )
    f.pods.apply(
        "ADDED",
        pod(
            annotations={
                "fluentbit.io/exclude_stderr": "true",
                "fluentbit.io/parser": "json",
                "kubetrail.io/parser-app": "klog",  # more specific, and kubetrail.io first
            }
        ),
    )
    out = f.process(records(tag(), "I0501 12:00:00.000001 1 a.go:1] hi") + records(tag(), "noise", stream="stderr"))
    assert len(out) == 1
    assert out[0].body["msg"] == "hi" and out[0].body["severity"] == "info"


def test_exclude_annotations_are_ignored_unless_enabled() -> None:
    f = filt()
    f.pods.apply("ADDED", pod(annotations={"fluentbit.io/exclude": "true"}))
    assert len(f.process(records(tag(), "kept"))) == 1


def test_use_kubelet_is_refused() -> None:
    with pytest.raises(ConfigError, match="use_kubelet"):
        filt(use_kubelet="on")


def _metrics(f: KubernetesTransform) -> str:
    from prometheus_client import generate_latest

    return generate_latest(f.metrics.registry).decode()


# -- parsers -------------------------------------------------------------------------------


def test_klog_structured_and_free_text() -> None:
    parser = KlogParser()
    lines = [
        b'I0501 12:00:00.123456    7 server.go:42] "Serving securely" address="[::]:6443" count=3 err="a \\"q\\""',
        b"W0501 12:00:01.5 99 x.go:1] free text, no pairs",
        b"not klog at all",
    ]
    records, failed = parser.parse_lines(lines, "t")
    assert failed == 1
    first = records[0].body
    assert first["severity"] == "info" and first["thread"] == 7 and first["source"] == "server.go:42"
    assert first["msg"] == "Serving securely" and first["err"] == 'a "q"'
    assert first["address"] == "[::]:6443" and first["count"] == "3"
    assert records[0].time_ns % 1_000_000_000 == 123_456_000
    assert records[1].body == {"severity": "warning", "thread": 99, "source": "x.go:1", "msg": "free text, no pairs"}
    assert records[2].body == {"log": "not klog at all"}


def test_logr_json() -> None:
    parser = LogrParser()
    records, failed = parser.parse_lines(
        [b'{"ts":1714564800.25,"v":0,"msg":"started","caller":"x.go:1"}', b'{"no":"msg"}', b"\xff"], "t"
    )
    assert failed == 2
    assert records[0].time_ns == 1714564800_250_000_000 and records[0].body["msg"] == "started"


# -- watches (against a fake API server: the real one is in tests/integration) ------------


async def test_watch_resumes_from_the_last_version_and_relists_only_on_410() -> None:
    import asyncio

    from aiohttp import web

    from tests.unit.fake_api import serve

    calls: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        calls.append({"path": request.path, **query})
        assert query.get("fieldSelector") == "spec.nodeName=node-a"
        lists = [c for c in calls if "watch" not in c]
        if "watch" not in query:
            items = [pod()] if len(lists) == 1 else [pod("web-2", uid="uid-2", cid="e" * 64)]
            return web.json_response({"metadata": {"resourceVersion": str(10 * len(lists))}, "items": items})
        response = web.StreamResponse()
        await response.prepare(request)
        watches = [c for c in calls if "watch" in c]
        if len(watches) == 1:
            added = {"type": "ADDED", "object": {**pod("web-2", uid="uid-2", cid="e" * 64)}}
            added["object"]["metadata"]["resourceVersion"] = "11"
            await response.write(orjson_line(added))
            await response.write(orjson_line({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}}))
        elif len(watches) == 2:
            await response.write(orjson_line({"type": "ERROR", "object": {"code": 410, "reason": "Gone"}}))
        else:
            await asyncio.sleep(1.5)  # an idle watch; short so the server can shut down
        return response

    async with serve(handler) as url:
        f = build(KubernetesTransform, kube_url=url, kube_token_file="", kube_ca_file="", node_name="node-a")
        await f.start()
        assert f.synced
        try:
            f.process(records(tag("nobody"), "a miss never turns into a request"))
            for _ in range(100):
                if len([c for c in calls if "watch" not in c]) == 2 and len(f.pods) == 1:
                    break
                await asyncio.sleep(0.05)
        finally:
            await f.close()
    watches = [c for c in calls if "watch" in c]
    assert watches[0]["resourceVersion"] == "10"
    assert watches[1]["resourceVersion"] == "12"  # resumed after the bookmark, no list in between
    assert [c.get("resourceVersion") for c in calls if "watch" not in c] == [None, None]  # 2nd list: 410
    assert set(f.pods.pods) == {("shop", "web-2")}
    assert {c["path"] for c in calls} == {"/api/v1/pods"}  # lists and watches only, no GET per pod
    # web-1 was not in the second list: gone, but kept for the grace period.
    assert f.process(records(tag(), "late"))[0].body["kubernetes"]["pod_id"] == "uid-1"


def orjson_line(obj: Any) -> bytes:
    import orjson

    return orjson.dumps(obj) + b"\n"


# -- a block stays a block (process_batch) -------------------------------------------------------

CRI_LINES = [
    b"2026-12-01T12:00:00.000000001Z stdout F plain text",
    b'2026-12-01T12:00:00.5Z stderr F quote " backslash \\ caf\xc3\xa9 \xf0\x9f\x98\x80',
    b"2026-12-01T12:00:01Z stdout P first half ",
    b"2026-12-01T12:00:01Z stdout F second half",
    b"not a CRI line",  # a bad line: {"log": ...} without a stream
    b"2026-12-01T12:00:02Z stderr F ends with a brace }",
]


def cri_batch(t: str, lines: list[bytes] = CRI_LINES, formats: tuple[str, ...] = ("cri",), key: str = "log") -> Batch:
    """The tail's batch for ``lines`` with ``multiline.parser`` ``formats``: a block."""
    joiner = ContainerLogJoiner(formats, 1 << 20, False, key, "uid-f")
    ready = joiner.process_block(b"".join(line + b"\n" for line in lines), 100, t, JoinStats())
    assert ready is not None
    return Batch(t, None, None, 10, None, block=ready)


def both_ways(f: KubernetesTransform, make: Any) -> tuple[Batch, list[bytes]]:
    """The filter's batch for ``make()``, and the record path's JSON lines for another copy."""
    out = f.process_batch(make())
    expected = [r.json_bytes() for r in f.process(make().records)]
    return out, expected


def lines_of(batch: Batch) -> list[bytes]:
    data = batch.raw_block
    assert data is not None
    return data.split(b"\n")[:-1]


@pytest.mark.parametrize("namespace_labels", ["off", "on"])
def test_a_block_gets_the_metadata_spliced_in_as_the_record_path_writes_it(
    namespace_labels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_000_000_000)  # the bad line's time
    f = filt(namespace_labels=namespace_labels, owner_references="on")
    f.pods.apply("ADDED", pod(labels={"app": "web", "q": 'a"b'}, annotations={"a": "b"}, ownerReferences=[{"k": 1}]))
    if f.namespaces is not None:
        f.namespaces.apply("ADDED", {"metadata": {"name": "shop", "labels": {"team": "t"}}})
    out, expected = both_ways(f, lambda: cri_batch(tag()))
    assert out.line_block is not None and out.line_block.canonical  # still a block: no records built
    assert lines_of(out) == expected and len(expected) == 5
    assert list(out.block_times()) == [r.time_ns for r in cri_batch(tag()).records]
    built = out.records  # built on demand, with the source's identities and the new bytes
    assert [r.body for r in built] == [orjson.loads(line) for line in expected]
    assert [r.identity for r in built] == [r.identity for r in cri_batch(tag()).records]
    assert all(r.body["kubernetes"]["pod_id"] == "uid-1" for r in built)


def test_docker_and_text_blocks_are_spliced_too(tmp_path: Any) -> None:
    f = filt()
    f.pods.apply("ADDED", pod())
    docker = [
        b'{"log":"whole \\u003cb\\u003e\\n","stream":"stdout","time":"2026-12-01T12:00:00Z"}',
        b'{"log":"piece ","stream":"stderr","time":"2026-12-01T12:00:01Z"}',
        b'{"log":"end\\n","stream":"stderr","time":"2026-12-01T12:00:02Z"}',
    ]
    out, expected = both_ways(f, lambda: cri_batch(tag(), docker, ("docker",)))
    assert out.line_block is not None and lines_of(out) == expected and len(expected) == 2

    def text_batch() -> Batch:
        block = TextBlock(b"one }\nt\xc3\xa9 two\n", 2, tag(), "log", 5, False)
        return Batch(tag(), None, None, 10, None, block=block)

    out, expected = both_ways(f, text_batch)
    assert out.line_block is not None and lines_of(out) == expected and len(expected) == 2


def test_an_unknown_pod_s_block_is_spliced_and_counted_per_line() -> None:
    f = filt()
    out = f.process_batch(cri_batch(tag("nobody")))
    assert out.line_block is not None
    assert all(orjson.loads(line)["kubernetes"]["pod_name"] == "nobody" for line in lines_of(out))
    misses = [line for line in _metrics(f).splitlines() if line.startswith("kubetrail_k8s_metadata_misses_total{")]
    assert len(misses) == 1 and misses[0].endswith(" 5.0")


def test_blocks_the_record_path_must_decide_go_that_way() -> None:
    """Exclusion, a parser annotation or merge_parser with merge_log, a log merge_log parses, a
    member named kubernetes: the record path's result, as records."""
    from kubetrail.parsers.registry import ParserRegistry

    def check(f: KubernetesTransform, make: Any, spliced: bool) -> None:
        out, expected = both_ways(f, make)
        assert (out.line_block is not None) is spliced
        assert [r.json_bytes() for r in out.records] == expected

    excluding = build(KubernetesTransform, kube_url="http://127.0.0.1:1", **{"k8s-logging__exclude": "on"})
    excluding.pods.apply("ADDED", pod(annotations={"fluentbit.io/exclude_stderr": "true"}))
    check(excluding, lambda: cri_batch(tag()), spliced=False)
    other = build(KubernetesTransform, kube_url="http://127.0.0.1:1", **{"k8s-logging__exclude": "on"})
    other.pods.apply("ADDED", pod(annotations={"fluentbit.io/exclude-sidecar": "true"}))  # another container
    check(other, lambda: cri_batch(tag()), spliced=True)
    parsing = build(
        KubernetesTransform,
        parsers=ParserRegistry(),
        kube_url="http://127.0.0.1:1",
        merge_log="on",
        **{"k8s-logging__parser": "on"},
    )
    parsing.pods.apply("ADDED", pod(annotations={"fluentbit.io/parser_stderr": "json"}))
    check(parsing, lambda: cri_batch(tag()), spliced=False)
    merging = filt(merge_log="on", keep_log="off")
    merging.pods.apply("ADDED", pod())
    check(merging, lambda: cri_batch(tag()), spliced=True)  # no log starts with "{": nothing to merge
    json_log = [*CRI_LINES, b'2026-12-01T12:00:03Z stdout F {"level":"warn"}']
    check(merging, lambda: cri_batch(tag(), json_log), spliced=False)
    plain = filt()
    plain.pods.apply("ADDED", pod())
    check(plain, lambda: cri_batch(tag(), key="kubernetes"), spliced=False)  # the joiner's key
    not_container = cri_batch("app.logs")
    assert plain.process_batch(not_container) is not_container


def test_merge_log_trims_escaped_line_ends_of_string_values_only() -> None:
    f = filt(merge_log="on")
    f.pods.apply("ADDED", pod())
    logs = ['{"msg":"line\\n","n":1,"s":"a\\r\\n","u":"b\\u000a","keep":"in\\nside"}', '{"plain":"text "}']
    out = f.process(records(tag(), *logs))
    assert {k: out[0].body[k] for k in ("msg", "n", "s", "u", "keep")} == {
        "msg": "line",
        "n": 1,
        "s": "a",
        "u": "b",
        "keep": "in\nside",
    }
    assert out[1].body["plain"] == "text "  # only \n and \r are trimmed
    off = filt(merge_log="on", merge_log_trim="off")
    assert off.process(records(tag(), logs[0]))[0].body["msg"] == "line\n"
