"""The ``s3`` output: records as newline-delimited JSON objects in S3, with Fluent Bit's options.

**When a batch counts as delivered: once it is durably in the local ``store_dir`` buffer**
(written and fsynced), not once it is in S3. S3 is for large objects: Fluent Bit fills a file up
to ``total_file_size`` (100 MB) or for ``upload_timeout`` (10 minutes) before it uploads it.
Acknowledging only after the upload would hold every source's checkpoint back for those ten
minutes and keep all of it in memory (the sink runner's buffer is a few batches), so the
pipeline would stall. The buffer file survives kill -9 and a restart: on start, every file
left in ``store_dir`` is recovered (a torn last line cut off: that batch was never
acknowledged, so its source sends it again) and uploaded. Nothing acknowledged is lost.

Layout under ``store_dir/<bucket>/<output id>/``: ``open/`` holds one file per tag being filled
(``.data`` + a ``.json`` with the tag and its first record's time); a full or timed-out file
is *sealed*: its object key is computed once and written next to it in ``sealed/``, so an
upload interrupted by a crash is repeated under the *same* key (the object is overwritten,
not duplicated). ``index`` keeps ``$INDEX``. A file S3 refuses for good (a malformed request,
or ``retry_limit`` failed uploads) is moved to ``failed/`` with the reason and kept: the data
was acknowledged, so it is never deleted; the log says where it is.

**Uploads** run in a background task, the only one that seals files, so a part upload never
races a seal. Multipart (the default), as in Fluent Bit: every ``upload_chunk_size`` of synced
data in a file still filling goes up as the next part of the file's multipart upload (created
then, with the key fixed then); the upload id and each part's ETag and end offset are kept in
the file's description, so after a crash the same upload is completed with the rest of the
file as its last part (if S3 has dropped it meanwhile, the file goes up again whole under the
same key). ``PutObject`` with ``use_put_object on`` or for a file that never reached one part.
With ``compression gzip`` the file is compressed whole when sealed and then sent in parts
(compressed parts could be under S3's 5 MiB minimum). Differences from Fluent Bit: the local
file keeps the bytes of parts already sent until the object is complete (a lost upload can then
be redone), so ``store_dir`` holds up to ``total_file_size`` per tag where Fluent Bit holds a
chunk; ``store_dir_limit_size`` makes writes wait (backpressure) instead of discarding data;
failed uploads are retried with backoff without limit unless ``retry_limit`` is set.

**Keys** (``s3_key_format``): ``$TAG``, ``$TAG[n]`` (the tag split on any character of
``s3_key_format_tag_delimiters``), ``$UUID`` (8 random characters), ``$INDEX`` (increments per
upload, kept in ``store_dir``), strftime fields from the file's first record time (UTC). As in
Fluent Bit, with ``use_put_object`` and no ``$UUID`` in the format, ``-object`` and a random
suffix are appended (unless ``static_file_path on``), so two files never share a key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
import re
import secrets
import string
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from botocore.exceptions import ClientError

from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.config.compat import no_effect
from kubetrail.core.dates import DATE_FORMATS
from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.sinks.aws_base import AWS_OPTIONS, AwsClient, classify, error_code, error_text
from kubetrail.sinks.http_base import gzip_sync
from kubetrail.sinks.json_format import date_key_option, with_date

MIN_CHUNK = 5 * 1024 * 1024  # S3's smallest part (but the last)
MAX_CHUNK = 50 * 1024 * 1024
MIN_FILE = 1024 * 1024
MAX_PUT_OBJECT_FILE = 1024 * 1024 * 1024
MAX_MULTIPART_FILE = 50 * 1024 * 1024 * 1024
BACKOFF_CAP = 60.0
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_KEY_TAG = re.compile(r"\$TAG\[(\d+)\]|\$TAG|\$UUID|\$INDEX")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# Options of Fluent Bit's blob uploads (files from the blob input), which kubetrail does not have;
# read as text since their values are never used.
_BLOB_OPTIONS: tuple[Option, ...] = tuple(
    no_effect(name, why="blob uploads (the blob input) are not supported")
    for name in (
        "blob_database_file", "file_delivery_attempt_limit", "part_delivery_attempt_limit", "part_size",
        "upload_parts_timeout", "upload_part_freshness_limit", "authorization_endpoint_url",
        "authorization_endpoint_username", "authorization_endpoint_password", "authorization_endpoint_bearer_token",
    )
)  # fmt: skip


class S3Sink(Sink):
    plugin_name = "s3"
    description = "Amazon S3 (or compatible): newline-delimited JSON objects, buffered in store_dir"
    options = (
        *(o for o in AWS_OPTIONS if o.name != "region"),
        Option("region", "str", "us-east-1", help="AWS region of the bucket"),
        Option("bucket", help="S3 bucket name (required)"),
        Option("total_file_size", "size", 100_000_000, help="Upload a file once it has this many bytes"),
        Option("upload_chunk_size", "size", 5_242_880, help="Part size of multipart uploads (5M-50M)"),
        Option("upload_timeout", "duration", 600.0, help="Upload a file this long after its first record"),
        Option("store_dir", "str", "/tmp/fluent-bit/s3", help="Local buffer; acknowledged batches wait here"),
        Option("store_dir_limit_size", "size", 0, help="Most bytes in store_dir; writes wait at the limit (0: none)"),
        Option("s3_key_format", "str", "/fluent-bit-logs/$TAG/%Y/%m/%d/%H/%M/%S", help="Object key template"),
        Option("s3_key_format_tag_delimiters", "str", ".", help="Characters that split the tag for $TAG[n]"),
        Option("static_file_path", "bool", False, help="Append no random suffix to keys without $UUID"),
        Option("use_put_object", "bool", False, help="PutObject instead of multipart uploads"),
        Option("compression", "choice", "none", choices=("none", "gzip"), help="Object compression"),
        Option("content_type", help="Content-Type of the objects"),
        Option("send_content_md5", "bool", False, help="Send Content-MD5 with PutObject and UploadPart"),
        Option("json_date_key", "str", "date", help="Key for the record time; 'false' leaves it out"),
        Option("json_date_format", "choice", "iso8601", choices=DATE_FORMATS),
        Option("log_key", help="Write only this key's value (a string as it is) instead of the record"),
        Option("canned_acl", help="Canned ACL of the objects (e.g. bucket-owner-full-control)"),
        Option("storage_class", help="Storage class of the objects (default STANDARD)"),
        no_effect("preserve_data_ordering", "bool", True, why="files are always uploaded in order"),
        *_BLOB_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        bucket = (config.get("bucket") or "").strip()
        if not bucket:
            raise ConfigError("the bucket is required", key="bucket")
        self.bucket = bucket
        self.aws = AwsClient("s3", config)
        self.chunk_size = int(config["upload_chunk_size"])
        if not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK:
            raise ConfigError("must be between 5M and 50M (S3's part sizes)", key="upload_chunk_size")
        self.use_put_object = bool(config["use_put_object"])
        self.total_file_size = int(config["total_file_size"])
        top = MAX_PUT_OBJECT_FILE if self.use_put_object else MAX_MULTIPART_FILE
        if not MIN_FILE <= self.total_file_size <= top:
            limit = "1G with use_put_object" if self.use_put_object else "50G"
            raise ConfigError(f"must be between 1M and {limit}", key="total_file_size")
        self.upload_timeout = float(config["upload_timeout"])
        if self.upload_timeout <= 0:
            raise ConfigError("must be positive", key="upload_timeout")
        self.key_format: str = config["s3_key_format"]
        if not self.key_format.strip("/"):
            raise ConfigError("must not be empty", key="s3_key_format")
        self.delimiters: str = config["s3_key_format_tag_delimiters"] or "."
        self.static_file_path = bool(config["static_file_path"])
        self.gzip = config["compression"] == "gzip"
        self.content_type: str | None = config.get("content_type") or None
        self.send_md5 = bool(config["send_content_md5"])
        self.date_key = date_key_option(config["json_date_key"])
        self.date_format: str = config["json_date_format"]
        self.log_key: str | None = config.get("log_key") or None
        self.acl: str | None = config.get("canned_acl") or None
        self.storage_class: str | None = config.get("storage_class") or None
        self.limit = int(config.get("store_dir_limit_size") or 0)
        self.retry_limit = _upload_retry_limit(str(config.get("retry_limit") or "no_limits"))
        self.root = Path(config["store_dir"]) / _SAFE_NAME.sub("_", bucket) / _SAFE_NAME.sub("_", ctx.component_id)
        self.open_dir, self.sealed_dir, self.failed_dir = self.root / "open", self.root / "sealed", self.root / "failed"
        self._open: dict[str, tuple[Path, int, float]] = {}  # tag -> (data file, size, created wall time)
        self._full: list[tuple[Path, str]] = []  # files no longer appended to, sealed by the uploader
        # Multipart parts go up while a file fills (Fluent Bit's way); with gzip the object is
        # compressed whole at the end instead, since compressed parts could be under 5 MiB.
        self.stream_parts = not self.use_put_object and not self.gzip
        self._lock = asyncio.Lock()  # one writer of the store at a time (workers share the sink)
        self._appended: dict[int, tuple[Batch, set[str]]] = {}  # batch id -> (batch, tags stored)
        self._wake = asyncio.Event()
        self._uploader: asyncio.Task[None] | None = None
        self._sequence = 0
        self._uploads = ctx.metrics.counter("kubetrail_s3_uploads", "Objects uploaded to S3, by result", "result")
        self._upload_bytes = ctx.metrics.counter("kubetrail_s3_upload_bytes", "Bytes uploaded to S3")

    # -- the local store ------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._recover)
        self.aws.bind(self.log, self.ctx.metrics)
        await self.aws.start()
        if self._uploader is None:
            self._uploader = asyncio.create_task(self._upload_loop(), name=f"{self.ctx.component_id}.upload")

    def _recover(self) -> None:
        for directory in (self.open_dir, self.sealed_dir, self.failed_dir):
            directory.mkdir(parents=True, exist_ok=True)
        # Numbers are never reused, failed/ included: a file moved there must not be overwritten.
        names = [p.stem for d in (self.sealed_dir, self.open_dir, self.failed_dir) for p in d.glob("*.data")]
        self._sequence = max((int(n.split("-")[0]) for n in names if n.split("-")[0].isdigit()), default=0)
        for data in sorted(self.open_dir.glob("*.data")):
            meta_path = data.with_suffix(".json")
            size = _cut_torn_line(data)
            try:
                meta = orjson.loads(meta_path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                meta = None
            if meta is not None and meta.get("parts") and meta["parts"][-1]["end"] > size:
                _drop_multipart(meta)  # parts of bytes no longer there (cannot happen: parts are of synced data)
                _write_atomic(meta_path, orjson.dumps(meta))
            if meta is None or size == 0:
                if size:  # data without its description: upload it under the tag 'recovered'
                    _write_atomic(meta_path, orjson.dumps({"tag": "recovered", "first_ns": int(time.time() * 1e9)}))
                    meta = {"tag": "recovered"}
                else:
                    data.unlink(missing_ok=True)
                    meta_path.unlink(missing_ok=True)
                    continue
            self._seal(data, str(meta["tag"]))  # whatever was open before the restart goes out first
        for data in self.sealed_dir.glob("*.data"):
            if not data.with_suffix(".json").exists():
                # Stopped between moving the file here and writing its key: its open/ description
                # (tag, first record time) is still there.
                _cut_torn_line(data)
                try:
                    meta = orjson.loads((self.open_dir / data.with_suffix(".json").name).read_bytes())
                except (OSError, orjson.JSONDecodeError):
                    meta = {"tag": "recovered", "first_ns": int(time.time() * 1e9)}
                self._write_key(data, meta)
        for orphan in self.open_dir.glob("*.json"):  # descriptions whose data went to sealed/ or was empty
            if not orphan.with_suffix(".data").exists():
                orphan.unlink()
        self.log.info("s3 buffer recovered", extra={"sealed_files": len(list(self.sealed_dir.glob("*.data")))})

    def _store_bytes(self) -> int:
        return sum(p.stat().st_size for d in (self.open_dir, self.sealed_dir) for p in d.glob("*.data"))

    def _line(self, record: Record) -> bytes:
        if self.log_key is not None:
            value = record.body.get(self.log_key)
            if value is None:
                return b""
            return (value.encode() if isinstance(value, str) else orjson.dumps(value)) + b"\n"
        return with_date(record, self.date_key, self.date_format) + b"\n"

    async def write(self, batch: Batch) -> None:
        by_tag: dict[str, list[bytes]] = {}
        first: dict[str, int] = {}
        missing = []
        for record in batch.records:
            line = self._line(record)
            if not line:
                missing.append((record, f"log_key {self.log_key!r} is not in the record"))
                continue
            by_tag.setdefault(record.tag, []).append(line)
            first.setdefault(record.tag, record.time_ns)
        async with self._lock:
            if self.limit and await asyncio.to_thread(self._store_bytes) >= self.limit:
                raise RetryableError(f"store_dir holds store_dir_limit_size ({self.limit} bytes); waiting for uploads")
            # A batch with several tags is appended tag by tag; when one fails, the retry of the
            # batch skips the tags already stored (kept per batch until it succeeds).
            key = id(batch)
            entry = self._appended.get(key)
            if entry is None or entry[0] is not batch:
                entry = self._appended[key] = (batch, set())
                while len(self._appended) > 64:  # forgetting one only risks appending it twice
                    self._appended.pop(next(iter(self._appended)))
            for tag, lines in by_tag.items():
                if tag in entry[1]:
                    continue
                await asyncio.to_thread(self._append, tag, b"".join(lines), first[tag])
                entry[1].add(tag)
            self._appended.pop(key, None)
        if missing:
            raise PermanentError(f"{len(missing)} records have no {self.log_key!r}", rejected=missing)

    def _append(self, tag: str, data: bytes, first_ns: int) -> None:
        """Append whole lines to the tag's open file and fsync: after this the batch is safe."""
        current = self._open.get(tag)
        if current is None:
            self._sequence += 1
            path = self.open_dir / f"{self._sequence:012d}-{_SAFE_NAME.sub('_', tag)[:100]}.data"
            _write_atomic(path.with_suffix(".json"), orjson.dumps({"tag": tag, "first_ns": first_ns}))
            current = (path, 0, time.time())
        path, size, created = current
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise RetryableError(f"cannot open the s3 buffer file {path}: {exc.strerror or exc}") from None
        try:
            written = os.write(fd, data)
            while written < len(data):  # a short write (full disk is an OSError instead)
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError as exc:
            # Cut what this batch left (a full disk mid-write): the retry appends it whole again,
            # and no torn line stays in the middle of the file.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
                os.fsync(fd)
            raise RetryableError(f"cannot write to the s3 buffer {path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        if size == 0:
            _fsync_dir(path.parent)  # the new file's name is durable too
        size += len(data)
        self._open[tag] = (path, size, created)
        if size >= self.total_file_size:
            del self._open[tag]  # the next batch of this tag starts a new file
            self._full.append((path, tag))
            self._wake.set()

    def _seal(self, data: Path, tag: str) -> None:
        """Move a filled file to ``sealed/`` with its object key fixed from now on (and the
        multipart upload its parts went to, if they went up while it filled)."""
        meta = orjson.loads(data.with_suffix(".json").read_bytes())
        meta["tag"] = tag
        target = self.sealed_dir / data.name
        os.replace(data, target)
        _fsync_dir(self.sealed_dir)
        self._write_key(target, meta)
        data.with_suffix(".json").unlink(missing_ok=True)

    def _write_key(self, data: Path, meta: dict[str, Any]) -> None:
        meta.setdefault("first_ns", int(time.time() * 1e9))
        if not meta.get("key"):
            meta["key"] = self._key(str(meta["tag"]), int(meta["first_ns"]))
        _write_atomic(data.with_suffix(".json"), orjson.dumps(meta))

    def _key(self, tag: str, first_ns: int) -> str:
        parts = re.split("[" + re.escape(self.delimiters) + "]", tag)
        has_uuid = "$UUID" in self.key_format
        index: int | None = None

        def substitute(match: re.Match[str]) -> str:
            nonlocal index
            text = match.group(0)
            if match.group(1) is not None:
                n = int(match.group(1))
                return parts[n] if n < len(parts) else ""
            if text == "$TAG":
                return tag
            if text == "$UUID":
                return _random_id()
            if index is None:
                index = self._next_index()
            return str(index)

        key = _KEY_TAG.sub(substitute, self.key_format)
        key = time.strftime(key.replace("%%", "\0"), time.gmtime(first_ns / 1e9)).replace("\0", "%")
        if self.use_put_object and not has_uuid and not self.static_file_path:
            key += "-object" + _random_id()
        return key.lstrip("/")

    def _next_index(self) -> int:
        path = self.root / "index"
        try:
            value = int(path.read_text().strip() or 0)
        except (OSError, ValueError):
            value = 0
        value += 1
        _write_atomic(path, str(value).encode())
        return value

    # -- uploads --------------------------------------------------------------------------

    async def _upload_loop(self) -> None:
        failures = 0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(1.0, self.upload_timeout))
            except TimeoutError:
                pass
            self._wake.clear()
            async with self._lock:
                now = time.time()
                for tag, (path, _, created) in list(self._open.items()):
                    if now - created >= self.upload_timeout:
                        del self._open[tag]
                        self._full.append((path, tag))
                full, self._full = self._full, []
                filling = [(path, size) for path, size, _ in self._open.values()] if self.stream_parts else []
            for path, tag in full:  # only this task seals, so a part upload never races a seal
                await asyncio.to_thread(self._seal, path, tag)
            try:
                await self.aws.refresh()  # a rotated tls.ca_file: a new client (only this task uploads)
            except Exception as exc:
                self.log.warning("cannot make a client with the rotated tls.ca_file", extra={"error": str(exc)})
            for path, size in filling:
                await self._stream_part(path, size)
            ok = await self._upload_sealed()
            if ok:
                failures = 0
                continue
            failures += 1
            delay = min(BACKOFF_CAP, 2 ** min(failures - 1, 10))
            await asyncio.sleep(random.uniform(delay / 2, delay))

    async def _upload_sealed(self) -> bool:
        """Upload every sealed file, oldest first; False when one failed and should wait."""
        for data in sorted(self.sealed_dir.glob("*.data")):
            meta_path = data.with_suffix(".json")
            meta = orjson.loads(await asyncio.to_thread(meta_path.read_bytes))
            try:
                await self._upload(data, meta, meta_path)
            except asyncio.CancelledError:
                raise
            except PermanentError as exc:
                await asyncio.to_thread(self._fail, data, str(exc))
                continue
            except Exception as exc:
                error = exc if isinstance(exc, RetryableError) else classify(exc, f"upload of {meta['key']}")
                attempts = int(meta.get("attempts", 0)) + 1
                meta["attempts"] = attempts
                await asyncio.to_thread(_write_atomic, meta_path, orjson.dumps(meta))
                self._uploads.labels("retry").inc()
                self.metrics.error("upload")
                if self.retry_limit is not None and attempts > self.retry_limit:
                    await asyncio.to_thread(self._fail, data, f"retry_limit ({self.retry_limit}) used up: {error}")
                    continue
                if attempts == 1 or attempts % 10 == 0:
                    extra = {"key": meta["key"], "error": str(error), "attempts": attempts}
                    self.log.warning("s3 upload failed; retrying", extra=extra)
                return False
            await asyncio.to_thread(self._done, data)
        return True

    def _done(self, data: Path) -> None:
        data.unlink(missing_ok=True)
        data.with_suffix(".json").unlink(missing_ok=True)
        _fsync_dir(data.parent)

    def _fail(self, data: Path, reason: str) -> None:
        meta_path = data.with_suffix(".json")
        meta = orjson.loads(meta_path.read_bytes())
        meta["error"] = reason
        os.replace(data, self.failed_dir / data.name)
        _write_atomic(self.failed_dir / meta_path.name, orjson.dumps(meta))
        meta_path.unlink(missing_ok=True)
        self._uploads.labels("failed").inc()
        self.log.error(
            "s3 refused a file for good; it is kept in store_dir/failed",
            extra={"key": meta.get("key"), "error": reason, "path": str(self.failed_dir / data.name)},
        )

    def _object_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket}
        if self.content_type:
            args["ContentType"] = self.content_type
        if self.gzip:
            args["ContentEncoding"] = "gzip"
        if self.acl:
            args["ACL"] = self.acl
        if self.storage_class:
            args["StorageClass"] = self.storage_class
        return args

    async def _stream_part(self, data: Path, end: int) -> None:
        """Upload the synced bytes of a file still filling as the next parts of its multipart
        upload, ``upload_chunk_size`` each. A failure only logs: the bytes are uploaded later
        (the next try, or when the file is sealed)."""
        meta_path = data.with_suffix(".json")
        try:
            meta = orjson.loads(await asyncio.to_thread(meta_path.read_bytes))
            parts = meta.setdefault("parts", [])
            start = parts[-1]["end"] if parts else 0
            if end - start < self.chunk_size:
                return
            client = self.aws.client
            if not meta.get("upload_id"):
                if not meta.get("key"):
                    meta["key"] = await asyncio.to_thread(self._key, str(meta["tag"]), int(meta["first_ns"]))
                upload = await client.create_multipart_upload(**self._object_args(), Key=meta["key"])
                meta["upload_id"] = upload["UploadId"]
                await asyncio.to_thread(_write_atomic, meta_path, orjson.dumps(meta))
            while end - start >= self.chunk_size:  # parts of upload_chunk_size, as Fluent Bit cuts them
                stop = start + self.chunk_size
                number, etag = await self._put_part(meta, await asyncio.to_thread(_read_range, data, start, stop))
                parts.append({"PartNumber": number, "ETag": etag, "end": stop})
                await asyncio.to_thread(_write_atomic, meta_path, orjson.dumps(meta))
                self._upload_bytes.inc(stop - start)
                start = stop
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.metrics.error("upload_part")
            self.log.warning("s3 part upload failed; the bytes go up later", extra={"error": str(exc)})

    async def _put_part(self, meta: dict[str, Any], chunk: bytes) -> tuple[int, str]:
        number = len(meta.get("parts") or []) + 1
        args: dict[str, Any] = {
            "Bucket": self.bucket, "Key": meta["key"], "UploadId": meta["upload_id"], "PartNumber": number,
            "Body": chunk,
        }  # fmt: skip
        if self.send_md5:
            args["ContentMD5"] = _md5(chunk)
        answer = await self.aws.client.upload_part(**args)
        return number, str(answer["ETag"])

    async def _finish_streamed(self, data: Path, meta: dict[str, Any], meta_path: Path) -> bool:
        """Complete a multipart upload whose parts went up while the file filled: the rest of the
        file is the last part. False when the upload is gone (expired, aborted): start over."""
        parts = meta["parts"]
        start = parts[-1]["end"] if parts else 0
        rest = await asyncio.to_thread(_read_range, data, start, None)
        try:
            if rest or not parts:
                number, etag = await self._put_part(meta, rest)
                parts.append({"PartNumber": number, "ETag": etag, "end": start + len(rest)})
                await asyncio.to_thread(_write_atomic, meta_path, orjson.dumps(meta))
            await self.aws.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=meta["key"],
                UploadId=meta["upload_id"],
                MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in parts]},
            )
        except ClientError as exc:
            if error_code(exc) in ("NoSuchUpload", "InvalidPart", "InvalidPartOrder", "EntityTooSmall"):
                self.log.warning("s3 multipart upload lost; the file is uploaded again whole",
                                 extra={"key": meta["key"], "error": error_text(exc)})  # fmt: skip
                _drop_multipart(meta)
                await asyncio.to_thread(_write_atomic, meta_path, orjson.dumps(meta))
                return False
            raise
        self._upload_bytes.inc(len(rest))
        return True

    async def _upload(self, data: Path, meta: dict[str, Any], meta_path: Path) -> None:
        key = meta["key"]
        if meta.get("upload_id"):
            try:
                done = await self._finish_streamed(data, meta, meta_path)
            except ClientError as exc:
                raise classify(exc, f"upload of s3://{self.bucket}/{key}") from None
            if done:
                self._uploads.labels("ok").inc()
                return
        body = await asyncio.to_thread(data.read_bytes)
        if self.gzip:
            body = await asyncio.to_thread(gzip_sync, body)
        client = self.aws.client
        what = f"upload of s3://{self.bucket}/{key}"
        try:
            if self.use_put_object or len(body) <= self.chunk_size:
                args = {**self._object_args(), "Key": key, "Body": body}
                if self.send_md5:
                    args["ContentMD5"] = _md5(body)
                await client.put_object(**args)
            else:
                await self._multipart(key, body)
        except ClientError as exc:
            raise classify(exc, what) from None
        self._uploads.labels("ok").inc()
        self._upload_bytes.inc(len(body))

    async def _multipart(self, key: str, body: bytes) -> None:
        client = self.aws.client
        upload = await client.create_multipart_upload(**self._object_args(), Key=key)
        upload_id = upload["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, len(body), self.chunk_size), start=1):
                chunk = body[offset : offset + self.chunk_size]
                args: dict[str, Any] = {
                    "Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": number, "Body": chunk,
                }  # fmt: skip
                if self.send_md5:
                    args["ContentMD5"] = _md5(chunk)
                answer = await client.upload_part(**args)
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
            await client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):  # the next attempt starts a new upload
                await asyncio.shield(client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id))
            raise

    async def close(self) -> None:
        """Seal what is open and try to upload everything once within the service's ``grace``;
        what is not uploaded stays in ``store_dir`` for the next start."""
        uploader, self._uploader = self._uploader, None
        if uploader is not None:
            uploader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await uploader
        if self.aws.client is not None:
            async with self._lock:
                full = self._full + [(path, tag) for tag, (path, _, _) in self._open.items()]
                self._full, self._open = [], {}
                for path, tag in full:
                    await asyncio.to_thread(self._seal, path, tag)
            grace = float(self.ctx.service.get("grace") or 5.0)
            try:
                # Bounded like the drain: an unreachable S3 must not hold the shutdown.
                await asyncio.wait_for(self._upload_sealed(), timeout=grace)
            except Exception as exc:  # never lose the files: they stay in store_dir
                extra = {"error": str(exc)}
                self.log.warning("s3 uploads at shutdown failed; they resume at the next start", extra=extra)
        await self.aws.close()


def _read_range(path: Path, start: int, end: int | None) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read() if end is None else f.read(end - start)


def _drop_multipart(meta: dict[str, Any]) -> None:
    """Forget a multipart upload (its key stays: the object keeps the name chosen for it)."""
    meta.pop("upload_id", None)
    meta.pop("parts", None)


def _upload_retry_limit(text: str) -> int | None:
    """``retry_limit`` (validated by the runtime) as a number of failed uploads; None: no limit.
    Sinks cannot import the runtime's parser (layers), so the few words are read here again."""
    word = text.strip().lower()
    if word in ("no_limits", "false", "off", "unlimited"):
        return None
    if word == "no_retries":
        return 0
    try:
        return max(0, int(word))
    except ValueError:
        raise ConfigError("expected a number, no_limits or no_retries", key="retry_limit") from None


def _random_id() -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(8))


def _md5(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def _cut_torn_line(path: Path) -> int:
    """Cut a file after its last newline (a write torn by a crash was never acknowledged)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return size
        position = size
        while position > 0:
            step = min(65536, position)
            f.seek(position - step)
            block = f.read(step)
            cut = block.rfind(b"\n")
            if cut >= 0:
                position = position - step + cut + 1
                break
            position -= step
        f.truncate(position)
        f.flush()
        os.fsync(f.fileno())
    return position
