//! The `sqlite` output's rows for a block of audit events (`kubetrail/sinks/sqlite.py`).
//!
//! Why native: building a row in Python (decode the indexed fields with msgspec, hash the
//! identity, make the tuple) cost ~3 us per audit event, a third of the sink's whole budget,
//! and it held the GIL all along. Here a tail batch's block (what `kubernetes_audit` hands on,
//! still without a `Record` per line) is decoded without the GIL, and only the row tuples are
//! made with it.
//!
//! Each row is exactly what `row_of` in the Python module makes of the same line as an audit
//! record (the tests compare the two): identity `blake2b-128(auditID "\x1f" stage)`, time
//! from `stageTimestamp` (as the `k8s_audit` parser and the webhook input take it), `"audit"`,
//! user, verb, resource, namespace, name (a create's from its response), uid, code, no reason,
//! the tag and the line's bytes. The store's `ibucket` column is left NULL (the INSERT has no
//! such value): the identity index then keys the row by its time's bucket, and its time is the
//! `stageTimestamp`, the bucket the Python path gives the same event (`identity_bucket`).
//!
//! Store schema 5 keeps the body of a row with a user apart, in `user_bodies` keyed `(user,
//! time_ns, id)` (a user's records together on disk, for `who`): given that statement
//! (`insert_body`), the row goes in with an empty body and, only when it was new (the identity
//! index decided), its body follows with the row's id, in the same transaction, as the Python
//! path does.
//!
//! `StoreInserter` goes one step further: it decodes the blocks and inserts their rows itself,
//! in one transaction on a connection of its own, with the GIL released from the first line to
//! the `COMMIT`. Binding a row's 13 values through Python's sqlite3 module cost ~3.5 us of CPU
//! (measured: `INSERT ... SELECT` of the same rows inside SQLite took 5.5 us per row, the
//! same rows through `executemany` 9.5 us), more than the decoding. It links the system's
//! libsqlite3, the library Python's sqlite3 module uses, so the process has one SQLite and its
//! locks stay coherent between this connection and the readers' (the Python module checks
//! that before using it). Its statements run through SQLite's C API with every value bound in
//! place (`RawStatement`: the block's bytes, `SQLITE_STATIC`), where rusqlite would copy each
//! string and body into a buffer of SQLite's own first (docs/benchmarks.md "Store ingest, fifth
//! pass").
//!
//! Compression (`kubetrail/sinks/sqlite_bodies.py`): once the store has a dictionary, the Python
//! writer hands it over (`use_dictionary`) and each row's body is stored as one zstd frame made
//! with it, by the thread that decodes the blocks (beside the one inserting), the same frame the
//! Python path's `zstandard` makes (content size and dictionary ID in the header, no checksum).
//! Except in a replay: when most rows of the last block were already in the store (a restart
//! re-delivering what it had not acknowledged, a Kafka rebalance), compressing every body
//! before the identity index turns it away wasted a third of the decoder's time and set the
//! replay's pace (320,000 against 530,000 records/s). Then the decoder hands bodies on as they
//! came and the inserting thread compresses only those of rows that proved new (`replaying`).
//!
//! All or nothing: when any line is not an audit event this decoder takes the way msgspec
//! would (not JSON, a field of another type, a repeated key, an escaped surrogate, no
//! `stageTimestamp` in RFC 3339, an Event's or a log line's members), the function returns
//! None and Python builds the batch's rows from its records, the reference way.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blake2::digest::consts::U16;
use blake2::{Blake2b, Digest};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use rusqlite::ffi;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use std::os::raw::c_int;
use zstd::bulk::Compressor;
use zstd::dict::EncoderDictionary;

use crate::timefmt::parse_rfc3339_ns;
use crate::{beyond_reference, JStr};

/// A struct that must be a JSON object: serde's derived structs also take an array (their
/// fields in order), where msgspec refuses the record's columns.
struct Obj<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjVisitor<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Self::Value, M::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Obj)
            }
        }
        deserializer.deserialize_map(ObjVisitor(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct User<'a> {
    #[serde(borrow, default)]
    username: Option<JStr<'a>>,
}

#[derive(Deserialize)]
struct ObjectRef<'a> {
    #[serde(borrow, default)]
    resource: Option<JStr<'a>>,
    #[serde(borrow, default)]
    namespace: Option<JStr<'a>>,
    #[serde(borrow, default)]
    name: Option<JStr<'a>>,
    #[serde(borrow, default)]
    uid: Option<JStr<'a>>,
    #[serde(borrow, default)]
    #[allow(dead_code)] // decoded so that a non-string one is refused, as msgspec does
    subresource: Option<JStr<'a>>,
}

#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    code: Option<i64>,
}

#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(borrow, default)]
    name: Option<JStr<'a>>,
    #[serde(borrow, default)]
    #[allow(dead_code)] // decoded so that a non-string one is refused, as msgspec does
    namespace: Option<JStr<'a>>,
    #[serde(borrow, default)]
    uid: Option<JStr<'a>>,
}

/// `responseObject`: an object whose `metadata` is decoded strictly, other members skipped.
struct Response<'a> {
    metadata: Option<Meta<'a>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Response<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ResponseVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ResponseVisitor<'a> {
            type Value = Response<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object") // anything else: msgspec refuses the record's columns
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut metadata = None;
                let mut seen = false;
                while let Some(key) = map.next_key::<JStr<'de>>()? {
                    if key.as_str() == "metadata" {
                        if seen {
                            // msgspec takes the last one: let Python decide.
                            return Err(serde::de::Error::custom("repeated metadata"));
                        }
                        seen = true;
                        metadata = map.next_value::<Option<Obj<Meta<'de>>>>()?.map(|m| m.0);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Response { metadata })
            }
        }
        deserializer.deserialize_any(ResponseVisitor(std::marker::PhantomData))
    }
}

/// The members of a line that become columns (the Python module's `_Probe`). The members of
/// other kinds of record are taken only to notice them: a line with one goes to Python.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe<'a> {
    #[serde(borrow, default, rename = "auditID")]
    audit_id: Option<JStr<'a>>,
    #[serde(borrow, default)]
    stage: Option<JStr<'a>>,
    #[serde(borrow, default)]
    stage_timestamp: Option<JStr<'a>>,
    #[serde(borrow, default)]
    verb: Option<JStr<'a>>,
    #[serde(borrow, default)]
    user: Option<Obj<User<'a>>>,
    #[serde(borrow, default)]
    object_ref: Option<Obj<ObjectRef<'a>>>,
    #[serde(default)]
    response_status: Option<Obj<Status>>,
    #[serde(borrow, default)]
    response_object: Option<Response<'a>>,
    #[serde(default)]
    involved_object: Option<IgnoredAny>,
    #[serde(default)]
    regarding: Option<IgnoredAny>,
    #[serde(default)]
    kubernetes: Option<IgnoredAny>,
    #[serde(default)]
    reporting_controller: Option<IgnoredAny>,
}

/// One audit event's row, borrowing from the block.
struct Row<'a> {
    ident: [u8; 16],
    time_ns: i64,
    user: Option<Cow<'a, str>>,
    verb: Option<Cow<'a, str>>,
    resource: Option<Cow<'a, str>>,
    namespace: Option<Cow<'a, str>>,
    name: Option<Cow<'a, str>>,
    uid: Option<Cow<'a, str>>,
    code: Option<i64>,
    body: Cow<'a, [u8]>,
}

fn identity(audit_id: &str, stage: &str) -> [u8; 16] {
    // kubetrail.core.record.identity_key of (auditID, stage): the parts joined by \x1f.
    let mut hasher = Blake2b::<U16>::new();
    hasher.update(audit_id.as_bytes());
    hasher.update(b"\x1f");
    hasher.update(stage.as_bytes());
    hasher.finalize().into()
}

/// The event without the members the `kubernetes_audit` filter copied in front of its own
/// (`without_flat_prefix` in the Python module, whose pattern `FLAT_PREFIX` this scan follows:
/// the longest run of `"KEY":VALUE,` at the start of the object, KEY one of `flat`, VALUE a
/// string, an integer, true, false or an array of strings, all compact). A hand-written scan:
/// the same pattern through the regex crate cost ~3 us a line.
fn without_flat_prefix<'a>(line: &'a [u8], flat: &HashSet<Vec<u8>>) -> Cow<'a, [u8]> {
    let Some(end) = flat_run_end(line, flat) else {
        return Cow::Borrowed(line);
    };
    let prefix = &line[..end];
    if line.get(end) != Some(&b'"')
        || memchr::memmem::find(prefix, b"\"k8s.audit.id\":").is_none()
        || memchr::memmem::find(prefix, b"\"k8s.audit.redacted\":").is_some()
    {
        return Cow::Borrowed(line);
    }
    let mut body = Vec::with_capacity(line.len() - end + 1);
    body.push(b'{');
    body.extend_from_slice(&line[end..]);
    Cow::Owned(body)
}

/// Where the run of flat members ends (after its last comma), None when there is none.
fn flat_run_end(line: &[u8], flat: &HashSet<Vec<u8>>) -> Option<usize> {
    if line.first() != Some(&b'{') {
        return None;
    }
    let mut at = 1;
    let mut matched = None;
    while let Some(end) = flat_member(line, at, flat) {
        at = end;
        matched = Some(end);
    }
    matched
}

/// `"KEY":VALUE,` at `at`: the position after its comma.
fn flat_member(line: &[u8], at: usize, flat: &HashSet<Vec<u8>>) -> Option<usize> {
    let key_end = json_string(line, at)?;
    if !flat.contains(&line[at + 1..key_end - 1]) || line.get(key_end) != Some(&b':') {
        return None;
    }
    let at = key_end + 1;
    let end = match *line.get(at)? {
        b'"' => json_string(line, at)?,
        b'-' | b'0'..=b'9' => {
            let start = if line[at] == b'-' { at + 1 } else { at };
            let digits = line[start..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            if digits == 0 {
                return None;
            }
            start + digits
        }
        b't' if line[at..].starts_with(b"true") => at + 4,
        b'f' if line[at..].starts_with(b"false") => at + 5,
        b'[' => {
            let mut at = at + 1;
            if line.get(at) == Some(&b'"') {
                at = json_string(line, at)?;
                while line.get(at) == Some(&b',') {
                    at = json_string(line, at + 1)?;
                }
            }
            if line.get(at) != Some(&b']') {
                return None;
            }
            at + 1
        }
        _ => return None,
    };
    (line.get(end) == Some(&b',')).then_some(end + 1)
}

/// A JSON string at `at` (the pattern's `"[^"\\]*(?:\\.[^"\\]*)*"`): the position after its
/// closing quote.
fn json_string(line: &[u8], at: usize) -> Option<usize> {
    if line.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    loop {
        let next = i + memchr::memchr2(b'"', b'\\', &line[i..])?;
        if line[next] == b'"' {
            return Some(next + 1);
        }
        // A backslash and the byte it escapes (any but a newline, as the pattern's `.`).
        if matches!(line.get(next + 1), None | Some(b'\n')) {
            return None;
        }
        i = next + 2;
    }
}

fn key_set(keys: Vec<String>) -> HashSet<Vec<u8>> {
    keys.into_iter().map(String::into_bytes).collect()
}

fn row_of<'a>(line: &'a [u8], flat: &HashSet<Vec<u8>>) -> Option<Row<'a>> {
    if line.is_empty() || beyond_reference(line) {
        return None;
    }
    let Obj(p): Obj<Probe> = sonic_rs::from_slice(line).ok()?;
    if p.involved_object.is_some()
        || p.regarding.is_some()
        || p.kubernetes.is_some()
        || p.reporting_controller.is_some()
    {
        return None;
    }
    let (audit_id, stage) = (p.audit_id?, p.stage?);
    let time_ns = parse_rfc3339_ns(p.stage_timestamp?.as_str().as_bytes(), 0)?;
    let oref = p.object_ref.map(|r| r.0);
    let (mut name, mut uid, resource, namespace) = match oref {
        Some(r) => (
            r.name.map(|s| s.0),
            r.uid.map(|s| s.0),
            r.resource.map(|s| s.0),
            r.namespace.map(|s| s.0),
        ),
        None => (None, None, None, None),
    };
    let verb = p.verb.map(|s| s.0);
    if let Some(meta) = p.response_object.and_then(|r| r.metadata) {
        let meta_name = meta.name.map(|s| s.0);
        if name.is_none() && verb.as_deref() == Some("create") {
            name = meta_name.clone(); // a create with generateName: the name is in the answer
        }
        if uid.is_none() && meta_name == name {
            uid = meta.uid.map(|s| s.0);
        }
    }
    Some(Row {
        ident: identity(audit_id.as_str(), stage.as_str()),
        time_ns,
        user: p.user.and_then(|u| u.0.username).map(|s| s.0),
        verb,
        resource,
        namespace,
        name,
        uid,
        code: p.response_status.and_then(|s| s.0.code),
        body: without_flat_prefix(line, flat),
    })
}

fn text<'py>(py: Python<'py>, value: &Option<Cow<'_, str>>) -> Bound<'py, PyAny> {
    match value {
        Some(v) => PyString::new(py, v).into_any(),
        None => py.None().into_bound(py),
    }
}

/// The rows of a block of newline-terminated audit event lines, as the tuples the Python
/// module inserts; None when a line is not one this decoder takes (see the module doc).
#[pyfunction]
pub fn audit_store_rows<'py>(
    py: Python<'py>,
    tag: &str,
    block: Bound<'py, PyBytes>,
    flat_keys: Vec<String>,
) -> PyResult<Option<Bound<'py, PyList>>> {
    let flat = key_set(flat_keys);
    let bytes = block.as_bytes();
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let rows: Option<Vec<Row>> = py.detach(|| {
        std::panic::catch_unwind(|| {
            body.split(|&b| b == b'\n')
                .map(|line| row_of(line, &flat))
                .collect()
        })
        .unwrap_or(None)
    });
    let Some(rows) = rows else {
        return Ok(None);
    };
    let kind = pyo3::intern!(py, "audit").clone().into_any();
    let tag = PyString::new(py, tag).into_any();
    let none = py.None().into_bound(py);
    let out = PyList::empty(py);
    for row in &rows {
        let code = match row.code {
            Some(code) => code.into_pyobject(py)?.into_any(),
            None => none.clone(),
        };
        let items = [
            PyBytes::new(py, &row.ident).into_any(),
            row.time_ns.into_pyobject(py)?.into_any(),
            kind.clone(),
            text(py, &row.user),
            text(py, &row.verb),
            text(py, &row.resource),
            text(py, &row.namespace),
            text(py, &row.name),
            text(py, &row.uid),
            code,
            none.clone(),
            tag.clone(),
            PyBytes::new(py, &row.body).into_any(),
        ];
        out.append(PyTuple::new(py, items)?)?;
    }
    Ok(Some(out))
}

/// Bytes of bodies before and after compression, for the writer's watch on the ratio.
#[derive(Default)]
struct Sizes {
    plain: AtomicU64,
    stored: AtomicU64,
}

impl Sizes {
    /// ``body`` as one zstd frame, its sizes counted (None: it could not be compressed).
    fn compress(&self, compressor: &mut Compressor<'_>, body: &[u8]) -> Option<Vec<u8>> {
        let frame = compressor.compress(body).ok()?;
        self.plain.fetch_add(body.len() as u64, Ordering::Relaxed);
        self.stored.fetch_add(frame.len() as u64, Ordering::Relaxed);
        Some(frame)
    }
}

/// A block's rows, their bodies compressed when a ``compressor`` is given, or None when one of
/// its lines is not for this decoder (or, unexpectedly, a body cannot be compressed).
fn block_rows<'a>(
    bytes: &'a [u8],
    flat: &HashSet<Vec<u8>>,
    compressor: Option<(&mut Compressor<'_>, &Sizes)>,
) -> Option<Vec<Row<'a>>> {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut rows: Vec<Row<'a>> = body
        .split(|&b| b == b'\n')
        .map(|line| row_of(line, flat))
        .collect::<Option<_>>()?;
    if let Some((compressor, sizes)) = compressor {
        for row in &mut rows {
            row.body = Cow::Owned(sizes.compress(compressor, &row.body)?);
        }
    }
    Some(rows)
}

/// A block is a replay when fewer than one row in this many was new.
const REPLAY_SHARE: usize = 4;

fn sql_error(what: &str, err: rusqlite::Error) -> String {
    format!("{what}: {err}")
}

/// A prepared statement run through SQLite's C API, its values bound in place
/// (`SQLITE_STATIC`): rusqlite binds every text and blob `SQLITE_TRANSIENT`, a malloc and a copy
/// of each of a row's ~9 strings and its ~900-byte body (under SQLite's allocator mutex) only to
/// be copied again into the record. Here the values are the block's bytes, alive until the
/// statement has run; `run` steps it once and resets it, which drops SQLite's pointers to them.
struct RawStatement {
    db: *mut ffi::sqlite3,
    stmt: *mut ffi::sqlite3_stmt,
}

impl RawStatement {
    fn new(conn: &rusqlite::Connection, sql: &str) -> Result<Self, String> {
        // SAFETY: the handle is the connection's own, used on this thread only while `conn` is
        // borrowed (the statement is finalized before the borrow ends: it lives in a closure).
        let db = unsafe { conn.handle() };
        let mut stmt = std::ptr::null_mut();
        let len = c_int::try_from(sql.len()).map_err(|_| "statement too long".to_owned())?;
        // SAFETY: `sql` is valid for `len` bytes; `stmt` receives the new statement.
        let rc = unsafe {
            ffi::sqlite3_prepare_v2(
                db,
                sql.as_ptr().cast(),
                len,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK || stmt.is_null() {
            return Err(format!("cannot prepare {sql:?}: {}", errmsg(db)));
        }
        Ok(RawStatement { db, stmt })
    }

    fn text(&self, at: c_int, value: Option<&str>) -> Result<(), String> {
        // SAFETY: a live statement; the text outlives the next `run` (see the type's doc).
        let rc = unsafe {
            match value {
                None => ffi::sqlite3_bind_null(self.stmt, at),
                Some(text) => ffi::sqlite3_bind_text64(
                    self.stmt,
                    at,
                    text.as_ptr().cast(),
                    text.len() as u64,
                    ffi::SQLITE_STATIC(),
                    ffi::SQLITE_UTF8 as u8,
                ),
            }
        };
        self.bound(rc)
    }

    fn blob(&self, at: c_int, value: &[u8]) -> Result<(), String> {
        // SAFETY: as `text`. An empty blob is bound as a zero-length blob (a null pointer would
        // bind NULL), as rusqlite does.
        let rc = unsafe {
            if value.is_empty() {
                ffi::sqlite3_bind_zeroblob(self.stmt, at, 0)
            } else {
                ffi::sqlite3_bind_blob64(
                    self.stmt,
                    at,
                    value.as_ptr().cast(),
                    value.len() as u64,
                    ffi::SQLITE_STATIC(),
                )
            }
        };
        self.bound(rc)
    }

    fn int(&self, at: c_int, value: Option<i64>) -> Result<(), String> {
        // SAFETY: a live statement.
        let rc = unsafe {
            match value {
                None => ffi::sqlite3_bind_null(self.stmt, at),
                Some(value) => ffi::sqlite3_bind_int64(self.stmt, at, value),
            }
        };
        self.bound(rc)
    }

    /// A failed bind (a value over SQLite's length limit) leaves the parameter as it was: the
    /// row must not go in with the row before's value.
    fn bound(&self, rc: c_int) -> Result<(), String> {
        if rc == ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(errmsg(self.db))
        }
    }

    /// Steps the statement once (an INSERT: to its end) and resets it; the rows it changed.
    fn run(&self) -> Result<usize, String> {
        // SAFETY: a live statement whose bound values are alive (the caller's row).
        unsafe {
            let rc = ffi::sqlite3_step(self.stmt);
            if rc != ffi::SQLITE_DONE {
                let message = errmsg(self.db); // before the reset
                ffi::sqlite3_reset(self.stmt);
                return Err(message);
            }
            let changed = ffi::sqlite3_changes(self.db);
            ffi::sqlite3_reset(self.stmt);
            Ok(changed.max(0) as usize)
        }
    }

    fn last_insert_rowid(&self) -> i64 {
        // SAFETY: the connection's handle.
        unsafe { ffi::sqlite3_last_insert_rowid(self.db) }
    }
}

impl Drop for RawStatement {
    fn drop(&mut self) {
        // SAFETY: finalized once, here.
        unsafe {
            ffi::sqlite3_finalize(self.stmt);
        }
    }
}

fn errmsg(db: *mut ffi::sqlite3) -> String {
    // SAFETY: SQLite's message for the connection's last error, a NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(ffi::sqlite3_errmsg(db)) }
        .to_string_lossy()
        .into_owned()
}

/// The store's writing connection for blocks of audit events (see the module doc). The Python
/// `StoreWriter` opens the store first (checks, schema, WAL, the writer's lock) and keeps its
/// own connection for retention; calls come one at a time (its write lock).
#[pyclass(module = "kubetrail_native")]
pub struct StoreInserter {
    conn: Mutex<Option<rusqlite::Connection>>,
    insert: String,
    /// Schema 5's INSERT into `user_bodies` (user, time_ns, id, kind, verb, body); None: the
    /// body stays in the row (an older Python module).
    insert_body: Option<String>,
    flat: HashSet<Vec<u8>>,
    /// The store's newest compression dictionary, prepared (None: bodies stored as they came).
    dictionary: Mutex<Option<Arc<EncoderDictionary<'static>>>>,
    /// The bodies compressed so far (all dictionaries): ``compressed_bytes``.
    sizes: Sizes,
    /// The last block was mostly rows already stored: the next blocks' bodies are compressed
    /// only once their row proved new, by the inserting thread (see the module doc).
    replaying: AtomicBool,
}

#[pymethods]
impl StoreInserter {
    /// ``insert``: the Python module's INSERT statement (13 parameters, in its row order);
    /// ``insert_body``: its INSERT of a new row's body when the row has a user (6 parameters);
    /// ``setup``: statements run once on the new connection (pragmas of the Python writer's).
    #[new]
    #[pyo3(signature = (path, synchronous, insert, flat_keys, insert_body=None, setup=None))]
    fn new(
        path: &str,
        synchronous: &str,
        insert: &str,
        flat_keys: Vec<String>,
        insert_body: Option<&str>,
        setup: Option<&str>,
    ) -> PyResult<Self> {
        let flat = key_set(flat_keys);
        let open = || -> Result<rusqlite::Connection, rusqlite::Error> {
            let conn = rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(Duration::from_secs(10))?;
            conn.pragma_update(None, "synchronous", synchronous)?;
            conn.pragma_update(None, "cache_size", -65536)?;
            if let Some(sql) = setup {
                conn.execute_batch(sql)?;
            }
            conn.prepare(insert)?;
            if let Some(sql) = insert_body {
                conn.prepare(sql)?;
            }
            Ok(conn)
        };
        let conn =
            open().map_err(|e| PyRuntimeError::new_err(sql_error("cannot open the store", e)))?;
        Ok(StoreInserter {
            conn: Mutex::new(Some(conn)),
            insert: insert.to_owned(),
            insert_body: insert_body.map(str::to_owned),
            flat,
            dictionary: Mutex::new(None),
            sizes: Sizes::default(),
            replaying: AtomicBool::new(false),
        })
    }

    /// Bytes of the bodies this writer compressed so far, before and after (a replay's rows
    /// are compressed only by the first of its blocks).
    fn compressed_bytes(&self) -> (u64, u64) {
        (
            self.sizes.plain.load(Ordering::Relaxed),
            self.sizes.stored.load(Ordering::Relaxed),
        )
    }

    /// From the next write on, bodies are compressed with ``dictionary`` (a zstd dictionary)
    /// at ``level``; None: stored as they come.
    #[pyo3(signature = (dictionary, level=3))]
    fn use_dictionary(&self, dictionary: Option<&[u8]>, level: i32) -> PyResult<()> {
        let prepared = dictionary.map(|d| Arc::new(EncoderDictionary::copy(d, level)));
        *self
            .dictionary
            .lock()
            .map_err(|_| PyRuntimeError::new_err("the dictionary is poisoned"))? = prepared;
        Ok(())
    }

    /// Decodes ``blocks`` (``(tag, block)`` pairs) and inserts every row in one transaction.
    /// Returns how many rows were new (the rest were replays), or None, with nothing written,
    /// when a line is not an audit event this decoder takes. Raises RuntimeError (the
    /// transaction rolled back) when SQLite fails: a full disk, an I/O error, a lock held long.
    fn write(
        &self,
        py: Python<'_>,
        blocks: Vec<(String, Bound<'_, PyBytes>)>,
    ) -> PyResult<Option<usize>> {
        let slices: Vec<(&str, &[u8])> = blocks
            .iter()
            .map(|(t, b)| (t.as_str(), b.as_bytes()))
            .collect();
        let flat = &self.flat;
        let dictionary = self
            .dictionary
            .lock()
            .map_err(|_| PyRuntimeError::new_err("the dictionary is poisoned"))?
            .clone();
        // Without the GIL. One thread decodes the blocks (and compresses their bodies), one after
        // the other, while this one inserts the rows of the block before: a line that is not for
        // the native decoder rolls back what was inserted and leaves the group to Python.
        let result = py.detach(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                std::thread::scope(|scope| -> Result<Option<usize>, String> {
                    // A block's rows, and whether their bodies are compressed already.
                    let (tx, rx) = std::sync::mpsc::sync_channel::<Option<(Vec<Row>, bool)>>(2);
                    let slices = &slices;
                    let dictionary = &dictionary;
                    let sizes = &self.sizes;
                    let replaying = &self.replaying;
                    scope.spawn(move || {
                        let mut compressor = match dictionary {
                            Some(d) => match Compressor::with_prepared_dictionary(d) {
                                Ok(c) => Some(c),
                                Err(_) => {
                                    let _ = tx.send(None); // Python's path compresses them
                                    return;
                                }
                            },
                            None => None,
                        };
                        for &(_, bytes) in slices {
                            let here = compressor
                                .as_mut()
                                .filter(|_| !replaying.load(Ordering::Relaxed));
                            let compressed = here.is_some();
                            let rows = block_rows(bytes, flat, here.map(|c| (c, sizes)))
                                .map(|rows| (rows, compressed));
                            let declined = rows.is_none();
                            if tx.send(rows).is_err() || declined {
                                return;
                            }
                        }
                    });
                    let Some(first) = rx.recv().ok().flatten() else {
                        return Ok(None); // nothing begun
                    };
                    let guard = self
                        .conn
                        .lock()
                        .map_err(|_| "the store connection is poisoned".to_owned())?;
                    let conn = guard
                        .as_ref()
                        .ok_or_else(|| "the store is closed".to_owned())?;
                    conn.execute_batch("BEGIN IMMEDIATE")
                        .map_err(|e| sql_error("cannot begin", e))?;
                    let inserted = (|| -> Result<Option<usize>, String> {
                        let stmt = RawStatement::new(conn, &self.insert)?;
                        let body_stmt = match &self.insert_body {
                            Some(sql) => Some(RawStatement::new(conn, sql)?),
                            None => None,
                        };
                        let mut added = 0;
                        let mut next = Some(first);
                        // Made when a replay's block first has a new row.
                        let mut late: Option<Compressor> = None;
                        for &(tag, _) in slices {
                            let (rows, compressed) = match next.take() {
                                Some(block) => block,
                                None => match rx.recv() {
                                    Ok(Some(block)) => block,
                                    _ => return Ok(None),
                                },
                            };
                            // Bodies this thread compresses: those of the block's new rows.
                            let mut compress_late = |body: &[u8]| -> Option<Vec<u8>> {
                                if late.is_none() {
                                    late = Some(
                                        Compressor::with_prepared_dictionary(dictionary.as_ref()?)
                                            .ok()?,
                                    );
                                }
                                self.sizes.compress(late.as_mut()?, body)
                            };
                            let late_needed = dictionary.is_some() && !compressed;
                            let mut block_added = 0;
                            for row in &rows {
                                // Schema 5: a row with a user keeps an empty body; its body goes
                                // beside the user's others once the row proved new.
                                let apart = match (&body_stmt, row.user.as_deref()) {
                                    (Some(body_stmt), Some(user)) => Some((body_stmt, user)),
                                    _ => None,
                                };
                                let frame = match (late_needed, apart) {
                                    (true, None) => match compress_late(&row.body) {
                                        Some(frame) => Some(frame),
                                        None => return Ok(None),
                                    },
                                    _ => None,
                                };
                                let body: &[u8] = match (&frame, apart) {
                                    (_, Some(_)) => b"",
                                    (Some(frame), None) => frame,
                                    (None, None) => &row.body,
                                };
                                stmt.blob(1, &row.ident)?;
                                stmt.int(2, Some(row.time_ns))?;
                                stmt.text(3, Some("audit"))?;
                                stmt.text(4, row.user.as_deref())?;
                                stmt.text(5, row.verb.as_deref())?;
                                stmt.text(6, row.resource.as_deref())?;
                                stmt.text(7, row.namespace.as_deref())?;
                                stmt.text(8, row.name.as_deref())?;
                                stmt.text(9, row.uid.as_deref())?;
                                stmt.int(10, row.code)?;
                                stmt.text(11, None)?;
                                stmt.text(12, Some(tag))?;
                                stmt.blob(13, body)?;
                                let new = stmt.run()?;
                                if let (1, Some((body_stmt, user))) = (new, apart) {
                                    let frame = match late_needed {
                                        true => match compress_late(&row.body) {
                                            Some(frame) => Some(frame),
                                            None => return Ok(None),
                                        },
                                        false => None,
                                    };
                                    body_stmt.text(1, Some(user))?;
                                    body_stmt.int(2, Some(row.time_ns))?;
                                    body_stmt.int(3, Some(stmt.last_insert_rowid()))?;
                                    body_stmt.text(4, Some("audit"))?;
                                    body_stmt.text(5, row.verb.as_deref())?;
                                    body_stmt.blob(6, frame.as_deref().unwrap_or(&row.body))?;
                                    body_stmt.run()?;
                                }
                                block_added += new;
                            }
                            added += block_added;
                            if dictionary.is_some() {
                                replaying.store(
                                    block_added * REPLAY_SHARE < rows.len(),
                                    Ordering::Relaxed,
                                );
                            }
                        }
                        conn.execute_batch("COMMIT").map_err(|e| e.to_string())?;
                        Ok(Some(added))
                    })();
                    match inserted {
                        Ok(Some(added)) => Ok(Some(added)),
                        Ok(None) => {
                            conn.execute_batch("ROLLBACK")
                                .map_err(|e| sql_error("cannot roll back", e))?;
                            Ok(None)
                        }
                        Err(err) => {
                            if !conn.is_autocommit() {
                                let _ = conn.execute_batch("ROLLBACK");
                            }
                            Err(format!("cannot write: {err}"))
                        }
                    }
                })
            }))
            .unwrap_or_else(|_| Err("panic while writing the store".to_owned()))
        });
        result.map_err(PyRuntimeError::new_err)
    }

    /// The SQLite library's version as this module sees it (the Python module compares it
    /// with its own before using this writer).
    #[staticmethod]
    fn sqlite_version() -> &'static str {
        rusqlite::version()
    }

    fn close(&self) {
        if let Ok(mut guard) = self.conn.lock() {
            guard.take();
        }
    }
}
