//! kubetrail_native: the `kubernetes_audit` filter's per-event step, in Rust.
//!
//! Why native: the filter's work per audit event (decode the queried fields, build the flat
//! object, splice it in front of the original bytes, form the dedupe key) costs ~5 us in Python,
//! against ~3 us for tailing the line at all; the budget is a third of that. Here one
//! call scans a whole batch (a block of JSON lines, or a list of records' bytes).
//!
//! What stays in Python (`kubetrail/transforms/kubernetes_audit.py`): the decisions that need
//! the filter's state (dedupe window, in-flight batches, acknowledgements) and the rare events
//! that must be redacted (Secrets, TokenRequests, configured paths), which this scan only
//! *marks*. The Python module also keeps a pure-Python scan with the same results, used when
//! this module is not built; tests compare the two on the same input.
//!
//! Also here: `KeySet`, the filter's remembered dedupe keys in a compact form (see `Key`), and
//! `count_newlines`, the tail's count of a block's lines.
//!
//! The scan runs without the GIL (the sinks' threads need it meanwhile) and cuts big batches in
//! parts for threads; each part writes its lines' outputs into a buffer of its own, and
//! `AuditScan.build` joins them into the batch's new block.
//!
//! Each line gets a code:
//!   PASS   not an audit event (JSON without a string auditID and stage): passed on untouched;
//!   DROP   its stage or level is in drop_stages / drop_levels;
//!   NATIVE handled here: its output is the flat prefix spliced onto the original bytes;
//!   SLOW   an audit event Python must finish (redaction candidates, or not an object literal);
//!   RETRY  not decoded here (not JSON, invalid UTF-8, a field of another type, a repeated key,
//!          an integer beyond 64 bits): Python decodes it the reference way and decides. Where
//!          the two decoders differ (msgspec takes a repeated key's last value and any integer)
//!          the reference wins, so such a line is never passed on unredacted by mistake.

mod alerts;
mod auditclass;
mod crilines;
mod dockerlines;
mod fieldtext;
mod framedcopy;
mod httpbody;
mod jsonesc;
mod jsonlines;
mod multilines;
mod regexlines;
mod storerows;
mod timefmt;

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use memchr::memmem;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyString, PyTuple};
use serde::de::{Deserializer, Visitor};
use serde::Deserialize;

use jsonesc::write_json_string;

const PASS: u8 = 0;
const DROP: u8 = 1;
const NATIVE: u8 = 2;
const SLOW: u8 = 3;
const RETRY: u8 = 4;

const SECRET_HINTS: [&[u8]; 4] = [
    b"\"kind\":\"Secret",
    b"\"kind\":\"TokenRequest\"",
    b"\"kind\": \"Secret",
    b"\"kind\": \"TokenRequest\"",
];

/// A JSON string, borrowed from the input unless it had escapes (then decoded and owned).
pub(crate) struct JStr<'a>(pub(crate) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for JStr<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for StrVisitor<'a> {
            type Value = JStr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(JStr(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(JStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(JStr(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(StrVisitor(std::marker::PhantomData))
    }
}

impl JStr<'_> {
    fn as_str(&self) -> &str {
        &self.0
    }
}

// The shape decoded from each event; unknown members are skipped (and still validated).
// It mirrors the msgspec structs of the Python scan, field for field.

#[derive(Deserialize)]
struct User<'a> {
    #[serde(borrow, default)]
    username: Option<JStr<'a>>,
    #[serde(borrow, default)]
    uid: Option<JStr<'a>>,
    #[serde(borrow, default)]
    groups: Option<Vec<JStr<'a>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectRef<'a> {
    #[serde(borrow, default)]
    resource: Option<JStr<'a>>,
    #[serde(borrow, default)]
    subresource: Option<JStr<'a>>,
    #[serde(borrow, default)]
    namespace: Option<JStr<'a>>,
    #[serde(borrow, default)]
    name: Option<JStr<'a>>,
    #[serde(borrow, default)]
    api_group: Option<JStr<'a>>,
}

#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    code: Option<i64>,
}

#[derive(Deserialize)]
struct Annotations<'a> {
    #[serde(borrow, default, rename = "authorization.k8s.io/decision")]
    decision: Option<JStr<'a>>,
    #[serde(borrow, default, rename = "authorization.k8s.io/reason")]
    reason: Option<JStr<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event<'a> {
    #[serde(borrow, default, rename = "auditID")]
    audit_id: Option<JStr<'a>>,
    #[serde(borrow, default)]
    stage: Option<JStr<'a>>,
    #[serde(borrow, default)]
    level: Option<JStr<'a>>,
    #[serde(borrow, default)]
    #[allow(dead_code)] // decoded so that a non-string kind is rejected, as msgspec does
    kind: Option<JStr<'a>>,
    #[serde(borrow, default)]
    verb: Option<JStr<'a>>,
    #[serde(borrow, default, rename = "requestURI")]
    request_uri: Option<JStr<'a>>,
    #[serde(borrow, default)]
    user_agent: Option<JStr<'a>>,
    #[serde(borrow, default, rename = "sourceIPs")]
    source_ips: Option<Vec<JStr<'a>>>,
    #[serde(borrow, default)]
    stage_timestamp: Option<JStr<'a>>,
    #[serde(borrow, default)]
    user: Option<User<'a>>,
    #[serde(borrow, default)]
    impersonated_user: Option<User<'a>>,
    #[serde(borrow, default)]
    object_ref: Option<ObjectRef<'a>>,
    #[serde(default)]
    response_status: Option<Status>,
    #[serde(borrow, default)]
    annotations: Option<Annotations<'a>>,
    /// Whether the event has a (non-null) request / response object: the detect filter's
    /// class (auditclass.rs); skipped, as msgspec.Raw keeps them unparsed in Python.
    #[serde(default, rename = "requestObject")]
    request_object: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "responseObject")]
    response_object: Option<serde::de::IgnoredAny>,
}

fn stage_code(stage: &str) -> &str {
    // One character per known stage keeps the dedupe keys short (same as the Python filter).
    match stage {
        "RequestReceived" => "0",
        "ResponseStarted" => "1",
        "ResponseComplete" => "2",
        "Panic" => "3",
        other => other,
    }
}

/// Writes the members of the flat object, in the Python filter's order, without its braces.
struct FlatWriter<'b> {
    out: &'b mut Vec<u8>,
    first: bool,
}

impl FlatWriter<'_> {
    /// ``key`` is the member's name quoted, with its colon (see ``member!``): one copy.
    fn key(&mut self, key: &[u8]) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.extend_from_slice(key);
    }

    fn string(&mut self, key: &[u8], value: Option<&JStr>) {
        if let Some(value) = value {
            self.key(key);
            write_jstr(self.out, value);
        }
    }

    fn list(&mut self, key: &[u8], value: Option<&Vec<JStr>>) {
        if let Some(items) = value {
            self.key(key);
            self.out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    self.out.push(b',');
                }
                write_jstr(self.out, item);
            }
            self.out.push(b']');
        }
    }
}

/// A string borrowed from the input had no escapes in it, so it holds no character that needs
/// one (JSON forbids raw quotes, backslashes and control characters in strings): copy it.
fn write_jstr(out: &mut Vec<u8>, value: &JStr) {
    match &value.0 {
        Cow::Borrowed(text) => {
            out.push(b'"');
            out.extend_from_slice(text.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(text) => write_json_string(out, text),
    }
}

/// A flat member's name as written: quoted, with its colon.
macro_rules! member {
    ($name:literal) => {
        concat!("\"", $name, "\":").as_bytes()
    };
}

fn write_flat(out: &mut Vec<u8>, ev: &Event) {
    let mut w = FlatWriter { out, first: true };
    let user = ev.user.as_ref();
    let imp = ev.impersonated_user.as_ref();
    let oref = ev.object_ref.as_ref();
    let notes = ev.annotations.as_ref();
    w.string(member!("time"), ev.stage_timestamp.as_ref());
    w.string(member!("k8s.audit.id"), ev.audit_id.as_ref());
    w.string(member!("k8s.audit.stage"), ev.stage.as_ref());
    w.string(member!("k8s.audit.level"), ev.level.as_ref());
    w.string(member!("user.name"), user.and_then(|u| u.username.as_ref()));
    w.string(member!("user.id"), user.and_then(|u| u.uid.as_ref()));
    w.list(member!("user.groups"), user.and_then(|u| u.groups.as_ref()));
    w.string(
        member!("k8s.audit.impersonated_user.name"),
        imp.and_then(|u| u.username.as_ref()),
    );
    w.list(
        member!("k8s.audit.impersonated_user.groups"),
        imp.and_then(|u| u.groups.as_ref()),
    );
    w.string(member!("k8s.audit.verb"), ev.verb.as_ref());
    w.string(
        member!("k8s.audit.resource"),
        oref.and_then(|r| r.resource.as_ref()),
    );
    w.string(
        member!("k8s.audit.subresource"),
        oref.and_then(|r| r.subresource.as_ref()),
    );
    w.string(
        member!("k8s.namespace.name"),
        oref.and_then(|r| r.namespace.as_ref()),
    );
    w.string(
        member!("k8s.audit.object.name"),
        oref.and_then(|r| r.name.as_ref()),
    );
    w.string(
        member!("k8s.audit.api_group"),
        oref.and_then(|r| r.api_group.as_ref()),
    );
    w.string(
        member!("client.address"),
        ev.source_ips.as_ref().and_then(|ips| ips.first()),
    );
    w.list(member!("k8s.audit.source_ips"), ev.source_ips.as_ref());
    w.string(member!("user_agent.original"), ev.user_agent.as_ref());
    w.string(member!("url.original"), ev.request_uri.as_ref());
    if let Some(code) = ev.response_status.as_ref().and_then(|s| s.code) {
        w.key(member!("http.response.status_code"));
        use std::io::Write;
        let _ = write!(w.out, "{code}");
    }
    w.string(
        member!("k8s.audit.authz.decision"),
        notes.and_then(|n| n.decision.as_ref()),
    );
    w.string(
        member!("k8s.audit.authz.reason"),
        notes.and_then(|n| n.reason.as_ref()),
    );
}

/// More brackets than this in a line and it goes to Python (see ``beyond_reference``).
const MAX_BRACKETS: usize = 512;

/// Whether ``line`` may be JSON this decoder takes and msgspec (the reference, which the tail's
/// parser also checks blocks with) refuses; Python then decides it (RETRY). Two such cases:
/// an escaped UTF-16 surrogate (sonic-rs takes a lone one anywhere, msgspec refuses it), and
/// nesting deeper than msgspec goes under Python's recursion limit (~1000 levels; sonic-rs has
/// none). Conservative: a valid surrogate pair or a bracket inside a string also counts.
fn beyond_reference(line: &[u8]) -> bool {
    // Backslashes are few (an escaped quote or two), and memchr finds one byte fastest.
    let surrogate = memchr::memchr_iter(b'\\', line).any(|at| {
        matches!(
            line.get(at + 1..at + 4),
            Some([b'u', b'd' | b'D', b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F'])
        )
    });
    // Depth needs two bytes a level, so only a long line can be too deep.
    surrogate
        || (line.len() > 2 * MAX_BRACKETS
            && memchr::memchr2_iter(b'[', b'{', line).count() > MAX_BRACKETS)
}

const STAGES: [&str; 4] = [
    "RequestReceived",
    "ResponseStarted",
    "ResponseComplete",
    "Panic",
];
/// `stage_index` of a stage outside STAGES: its key ends with the whole stage name.
const OTHER_STAGE: u8 = 255;

/// The filter's options that the scan needs; built once per filter.
#[pyclass(frozen, module = "kubetrail_native")]
struct AuditScanner {
    drop_stages: HashSet<String>,
    drop_levels: HashSet<String>,
    redact_secrets: bool,
    /// The last keys of configured redact paths; a line containing one is SLOW.
    needles: Vec<Vec<u8>>,
    flatten: bool,
    /// Parts a big batch is cut into, each scanned by a thread of its own.
    threads: usize,
    /// The `detect` filter's classes of events (see auditclass.rs).
    classes: auditclass::ClassTable,
}

/// Below this many lines a batch is scanned in one piece (a thread costs ~20 us to start).
const PARALLEL_MIN_LINES: usize = 256;

impl AuditScanner {
    /// The line's code; for NATIVE and SLOW lines also its dedupe key (auditID + stage code,
    /// written to ``key``) and stage index. A NATIVE line's flat members (when flattening) are
    /// written to ``flat``; its output is those members spliced onto the line (see
    /// ``Output``), made only when the batch's block is built.
    /// A NATIVE line's detection class (a part-local id) is written to ``class``.
    fn scan_line<'a>(
        &self,
        line: &'a [u8],
        key: &mut String,
        flat: &mut Vec<u8>,
        classes: &mut auditclass::LocalClasses<'a>,
        class: &mut u32,
    ) -> (u8, u8, u32) {
        *class = auditclass::NO_CLASS;
        if beyond_reference(line) {
            return (RETRY, 0, 0);
        }
        let ev: Event = match sonic_rs::from_slice(line) {
            Ok(ev) => ev,
            Err(_) => return (RETRY, 0, 0),
        };
        let (audit_id, stage) = match (&ev.audit_id, &ev.stage) {
            (Some(id), Some(stage)) => (id.as_str(), stage.as_str()),
            _ => return (PASS, 0, 0),
        };
        let level = ev.level.as_ref().map(|l| l.as_str());
        if self.drop_stages.contains(stage) || level.is_some_and(|l| self.drop_levels.contains(l)) {
            return (DROP, 0, 0);
        }
        let stage_index = STAGES
            .iter()
            .position(|s| *s == stage)
            .map_or(OTHER_STAGE, |i| i as u8);
        let id_len = audit_id.len() as u32;
        key.clear();
        key.push_str(audit_id);
        key.push_str(stage_code(stage));
        let mut slow = false;
        // Metadata and None levels carry no request/response bodies: nothing to redact.
        if self.redact_secrets && !matches!(level, Some("Metadata") | Some("None")) {
            let oref = ev.object_ref.as_ref();
            let resource = oref.and_then(|r| r.resource.as_ref()).map(|r| r.as_str());
            let subresource = oref
                .and_then(|r| r.subresource.as_ref())
                .map(|r| r.as_str());
            slow = resource == Some("secrets")
                || (resource == Some("serviceaccounts") && subresource == Some("token"))
                || SECRET_HINTS.iter().any(|h| memmem::find(line, h).is_some());
        }
        slow = slow || self.needles.iter().any(|n| memmem::find(line, n).is_some());
        if self.flatten && line.first() != Some(&b'{') {
            slow = true; // not an object literal: the Python filter merges it the slow way
        }
        if slow {
            return (SLOW, stage_index, id_len);
        }
        if self.flatten {
            write_flat(flat, &ev);
        }
        *class = classes.id(auditclass::ClassKey::of(&ev));
        (NATIVE, stage_index, id_len)
    }

    /// Scans ``lines`` (no Python objects touched: this runs without the GIL, in threads).
    fn scan_chunk<'a>(&self, lines: &[&'a [u8]]) -> ChunkScan<'a> {
        let mut chunk = ChunkScan {
            class_ids: Vec::with_capacity(lines.len()),
            classes: auditclass::LocalClasses::default(),
            codes: Vec::with_capacity(lines.len()),
            stage_indexes: Vec::with_capacity(lines.len()),
            id_lens: Vec::with_capacity(lines.len()),
            keys: String::with_capacity(lines.len() * 40),
            key_ends: Vec::with_capacity(lines.len()),
            // Flat members are about as long as the event they come from: reserve once.
            flat: Vec::with_capacity(if self.flatten {
                lines.iter().map(|l| l.len()).sum()
            } else {
                0
            }),
            flat_ends: Vec::with_capacity(lines.len()),
        };
        let mut key = String::with_capacity(64);
        let mut class = auditclass::NO_CLASS;
        for line in lines {
            let (code, stage_index, id_len) = self.scan_line(
                line,
                &mut key,
                &mut chunk.flat,
                &mut chunk.classes,
                &mut class,
            );
            chunk.class_ids.push(class);
            chunk.flat_ends.push(chunk.flat.len());
            chunk.codes.push(code);
            chunk.stage_indexes.push(stage_index);
            chunk.id_lens.push(id_len);
            if code == NATIVE || code == SLOW {
                chunk.keys.push_str(&key);
            }
            chunk.key_ends.push(chunk.keys.len());
        }
        chunk
    }

    fn scan_all(&self, py: Python<'_>, lines: &[&[u8]], input: Input) -> PyResult<AuditScan> {
        // Big batches are cut in parts scanned side by side, without the GIL: parsing is most of
        // the filter's cost, and the lines are independent of each other.
        let parts = if lines.len() >= PARALLEL_MIN_LINES {
            self.threads.max(1)
        } else {
            1
        };
        // Without the GIL in either case: the sinks' threads (file writes, TLS) need it meanwhile.
        // A bug here must not take the process down: a panic becomes a RuntimeError, which the
        // router logs and counts, passing the batch on unfiltered.
        let scanned = py.detach(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if parts == 1 {
                    return vec![self.scan_chunk(lines)];
                }
                let per_part = lines.len().div_ceil(parts);
                std::thread::scope(|scope| {
                    let mut pieces = lines.chunks(per_part);
                    let first = pieces.next().unwrap_or(&[]);
                    let handles: Vec<_> = pieces
                        .map(|part| scope.spawn(move || self.scan_chunk(part)))
                        .collect();
                    // This thread scans the first part itself instead of waiting idle.
                    let mut chunks = vec![self.scan_chunk(first)];
                    for handle in handles {
                        // A panicked part re-panics here, caught just above.
                        chunks.push(
                            handle
                                .join()
                                .unwrap_or_else(|e| std::panic::resume_unwind(e)),
                        );
                    }
                    chunks
                })
            }))
        });
        let mut chunks: Vec<ChunkScan> = scanned.map_err(|_| {
            PyRuntimeError::new_err("the native audit scan failed (a bug): see the log")
        })?;
        let mut scan = AuditScan {
            codes: Vec::with_capacity(lines.len()),
            stage_indexes: Vec::with_capacity(lines.len()),
            id_lens: Vec::with_capacity(lines.len()),
            input: Some(input),
            flats: Vec::with_capacity(chunks.len()),
            flat_spans: Vec::with_capacity(lines.len()),
            key_text: String::with_capacity(chunks.iter().map(|c| c.keys.len()).sum()),
            key_spans: Vec::with_capacity(lines.len()),
            keys: None,
            class_ids: Vec::with_capacity(lines.len()),
        };
        for chunk in chunks.iter_mut() {
            self.classes.merge(&chunk.classes, &mut chunk.class_ids);
        }
        for (number, chunk) in chunks.into_iter().enumerate() {
            scan.class_ids.extend_from_slice(&chunk.class_ids);
            let mut key_start = 0;
            let mut flat_start = 0;
            for (i, _) in chunk.codes.iter().enumerate() {
                let key_end = chunk.key_ends[i];
                let at = scan.key_text.len();
                scan.key_text.push_str(&chunk.keys[key_start..key_end]);
                scan.key_spans.push((at, scan.key_text.len()));
                key_start = key_end;
                let flat_end = chunk.flat_ends[i];
                scan.flat_spans.push(Span {
                    part: number as u32,
                    start: flat_start,
                    end: flat_end,
                });
                flat_start = flat_end;
            }
            scan.codes.extend_from_slice(&chunk.codes);
            scan.stage_indexes.extend_from_slice(&chunk.stage_indexes);
            scan.id_lens.extend_from_slice(&chunk.id_lens);
            scan.flats.push(chunk.flat);
        }
        Ok(scan)
    }
}

/// What one thread's scan of a part of a batch found (see ``AuditScan``).
struct ChunkScan<'a> {
    /// Each line's detection class (part-local until merged), and the part's classes.
    class_ids: Vec<u32>,
    classes: auditclass::LocalClasses<'a>,
    codes: Vec<u8>,
    stage_indexes: Vec<u8>,
    id_lens: Vec<u32>,
    keys: String,
    key_ends: Vec<usize>,
    /// Every NATIVE line's flat members, one after the other (none for the other lines).
    flat: Vec<u8>,
    flat_ends: Vec<usize>,
}

/// Where a line's flat members are: which part's buffer, and where in it.
#[derive(Clone, Copy)]
struct Span {
    part: u32,
    start: usize,
    end: usize,
}

/// The scanned input, held until the block is built: the outputs are made from it then, so
/// that each event's bytes are copied once (into the new block), not twice.
enum Input {
    /// A tail batch's block and where each line is in it.
    Block(Py<PyBytes>, Vec<(usize, usize)>),
    /// Records' bytes.
    Lines(Vec<Py<PyBytes>>),
}

impl Input {
    fn line<'a>(&'a self, py: Python<'a>, index: usize) -> &'a [u8] {
        match self {
            Input::Block(block, spans) => {
                let (start, end) = spans[index];
                &block.bind(py).as_bytes()[start..end]
            }
            Input::Lines(lines) => lines[index].bind(py).as_bytes(),
        }
    }

    fn lines<'a>(&'a self, py: Python<'a>) -> Vec<&'a [u8]> {
        match self {
            Input::Block(block, spans) => {
                let bytes = block.bind(py).as_bytes();
                spans
                    .iter()
                    .map(|&(start, end)| &bytes[start..end])
                    .collect()
            }
            Input::Lines(lines) => lines.iter().map(|l| l.bind(py).as_bytes()).collect(),
        }
    }
}

/// A line's output: its flat members (if any) spliced in after the line's opening brace.
/// Members are written only for an object literal (other lines are SLOW), so the line starts
/// with ``{``; ``{}`` gets no comma.
struct Output<'a> {
    flat: &'a [u8],
    line: &'a [u8],
}

impl Output<'_> {
    fn len(&self) -> usize {
        if self.flat.is_empty() {
            self.line.len()
        } else {
            self.line.len() + self.flat.len() + usize::from(self.line.get(1) != Some(&b'}'))
        }
    }

    /// Writes the output through ``put`` (one call per piece).
    fn write(&self, mut put: impl FnMut(&[u8])) {
        if self.flat.is_empty() {
            put(self.line);
            return;
        }
        put(b"{");
        put(self.flat);
        if self.line.get(1) != Some(&b'}') {
            put(b",");
        }
        put(&self.line[1..]);
    }
}

/// A new bytes object of ``len`` bytes, filled by ``fill`` without the GIL. Unlike
/// ``PyBytes::new_with`` it does not zero the buffer first: every byte is written once.
pub(crate) fn new_bytes_filled<'py>(
    py: Python<'py>,
    len: usize,
    fill: impl FnOnce(&mut RawWriter) + Send,
) -> PyResult<Bound<'py, PyBytes>> {
    let size = pyo3::ffi::Py_ssize_t::try_from(len)
        .map_err(|_| PyValueError::new_err("output block too large"))?;
    // SAFETY: PyBytes_FromStringAndSize(NULL, n) returns a new bytes object whose n bytes
    // are uninitialised; nothing reads them before `fill` wrote them all (checked below), and
    // no other reference to the object exists until it is returned.
    unsafe {
        let ptr = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), size);
        let bytes = Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked::<PyBytes>();
        let mut writer = RawWriter {
            ptr: pyo3::ffi::PyBytes_AsString(ptr).cast::<u8>(),
            len,
            at: 0,
        };
        let filled = py.detach(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fill(&mut writer)))
        });
        if filled.is_err() || writer.at != len {
            // Unreachable unless the length computed above is wrong; the bytes must not escape.
            return Err(PyRuntimeError::new_err(
                "the native audit scan built a block of the wrong size (a bug)",
            ));
        }
        Ok(bytes)
    }
}

/// Appends to a buffer of known size; every write is bounds-checked.
pub(crate) struct RawWriter {
    ptr: *mut u8,
    len: usize,
    at: usize,
}

// SAFETY: the buffer belongs to a bytes object no other thread can see while it is filled.
unsafe impl Send for RawWriter {}

impl RawWriter {
    pub(crate) fn put(&mut self, piece: &[u8]) {
        assert!(piece.len() <= self.len - self.at, "output block overrun");
        // SAFETY: in bounds (asserted); the source is another object's memory.
        unsafe {
            std::ptr::copy_nonoverlapping(piece.as_ptr(), self.ptr.add(self.at), piece.len());
        }
        self.at += piece.len();
    }
}

/// Splits a block of newline-terminated lines (a last line without newline counts too).
pub(crate) fn block_lines(block: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = block.strip_suffix(b"\n").unwrap_or(block);
    let mut start = 0;
    let mut ends = memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len()));
    let empty = block.is_empty();
    std::iter::from_fn(move || {
        if empty {
            return None;
        }
        let end = ends.next()?;
        let line = &body[start..end];
        start = end + 1;
        Some(line)
    })
}

#[pymethods]
impl AuditScanner {
    #[new]
    #[pyo3(signature = (drop_stages, drop_levels, redact_secrets, needles, flatten, threads=1))]
    fn new(
        drop_stages: Vec<String>,
        drop_levels: Vec<String>,
        redact_secrets: bool,
        needles: Vec<Vec<u8>>,
        flatten: bool,
        threads: usize,
    ) -> PyResult<Self> {
        if needles.iter().any(|n| n.is_empty()) {
            return Err(PyValueError::new_err(
                "an empty needle would make every line SLOW; use the Python scan",
            ));
        }
        Ok(Self {
            drop_stages: drop_stages.into_iter().collect(),
            drop_levels: drop_levels.into_iter().collect(),
            redact_secrets,
            needles,
            flatten,
            // 0: the CPUs this process may use (affinity and cgroup CPU quota) but one, at most
            // 4: the event loop's thread, which reads the next batch meanwhile, needs a CPU of its
            // own (on 2 CPUs a scan in two parts was 3-7% slower than in one).
            threads: if threads == 0 {
                std::thread::available_parallelism().map_or(1, |n| (n.get() - 1).clamp(1, 4))
            } else {
                threads.min(64)
            },
            classes: auditclass::ClassTable::default(),
        })
    }

    /// A detection class's values (see auditclass.rs): (stage, verb, resource, subresource,
    /// user name, impersonated user name, namespace, authorization decision, response code,
    /// whether it has a request object, a response object);
    /// None for an unknown id.
    fn class_values<'py>(&self, py: Python<'py>, id: u32) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let Some(key) = self.classes.get(id) else {
            return Ok(None);
        };
        let mut items: Vec<Bound<'py, PyAny>> = key
            .texts()
            .iter()
            .map(|t| match t {
                Some(text) => PyString::new(py, text).into_any(),
                None => py.None().into_bound(py),
            })
            .collect();
        items.push(match key.code() {
            Some(code) => code.into_pyobject(py)?.into_any(),
            None => py.None().into_bound(py),
        });
        let (request, response) = key.objects();
        items.push(PyBool::new(py, request).to_owned().into_any());
        items.push(PyBool::new(py, response).to_owned().into_any());
        Ok(Some(PyTuple::new(py, items)?))
    }

    /// How many detection classes the scanner has seen.
    #[getter]
    fn class_count(&self) -> usize {
        self.classes.len()
    }

    /// Parts a big batch is cut into (each scanned by a thread of its own).
    #[getter]
    fn threads(&self) -> usize {
        self.threads
    }

    /// Scans a block of newline-terminated JSON lines (a tail batch's bytes).
    fn scan_block(&self, py: Python<'_>, block: Bound<'_, PyBytes>) -> PyResult<AuditScan> {
        let bytes = block.as_bytes();
        let lines: Vec<&[u8]> = block_lines(bytes).collect();
        let base = bytes.as_ptr() as usize;
        let spans = lines
            .iter()
            .map(|l| {
                let start = l.as_ptr() as usize - base;
                (start, start + l.len())
            })
            .collect();
        let input = Input::Block(block.clone().unbind(), spans);
        self.scan_all(py, &lines, input)
    }

    /// Scans a list of records' JSON bytes.
    fn scan_lines(&self, py: Python<'_>, lines: Vec<Bound<'_, PyBytes>>) -> PyResult<AuditScan> {
        let slices: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        let input = Input::Lines(lines.iter().map(|l| l.clone().unbind()).collect());
        self.scan_all(py, &slices, input)
    }
}

/// The result of one scan: codes, dedupe keys, identities, and what every line's output is
/// made of (the input, held, and the flat members).
#[pyclass(module = "kubetrail_native")]
struct AuditScan {
    codes: Vec<u8>,
    stage_indexes: Vec<u8>,
    /// Byte length of the auditID at the start of each key.
    id_lens: Vec<u32>,
    /// The scanned input; None once released.
    input: Option<Input>,
    /// The flat members, one buffer per part scanned, and where each line's are.
    flats: Vec<Vec<u8>>,
    flat_spans: Vec<Span>,
    /// The dedupe keys, one after the other, and where each line's is.
    key_text: String,
    key_spans: Vec<(usize, usize)>,
    /// The keys as Python strings, made on first use (a filter without dedupe never asks).
    keys: Option<Py<PyList>>,
    /// Each line's detection class (see auditclass.rs), NO_CLASS for none.
    class_ids: Vec<u32>,
}

impl AuditScan {
    /// The line's dedupe key, if it is a kept audit event.
    fn key(&self, index: usize) -> Option<&str> {
        let code = self.codes[index];
        let (start, end) = self.key_spans[index];
        (code == NATIVE || code == SLOW).then(|| &self.key_text[start..end])
    }

    fn flat(&self, index: usize) -> &[u8] {
        let span = self.flat_spans[index];
        &self.flats[span.part as usize][span.start..span.end]
    }
}

#[pymethods]
impl AuditScan {
    fn __len__(&self) -> usize {
        self.codes.len()
    }

    /// One byte per line: 0 pass, 1 dropped by rule, 2 native, 3 slow (Python finishes it),
    /// 4 retry (Python decides).
    #[getter]
    fn codes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.codes)
    }

    /// Each line's detection class id as a native-endian u32 (0xffffffff: none), for the
    /// ``detect`` filter (see auditclass.rs). Kept after ``release``.
    #[getter]
    fn class_ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let mut bytes = Vec::with_capacity(self.class_ids.len() * 4);
        for id in &self.class_ids {
            bytes.extend_from_slice(&id.to_ne_bytes());
        }
        PyBytes::new(py, &bytes)
    }

    /// auditID + stage code per line, None where the line is not a kept audit event.
    #[getter]
    fn keys(&mut self, py: Python<'_>) -> PyResult<Py<PyList>> {
        if let Some(keys) = &self.keys {
            return Ok(keys.clone_ref(py));
        }
        let keys = PyList::empty(py);
        for index in 0..self.codes.len() {
            match self.key(index) {
                Some(key) => keys.append(PyString::new(py, key))?,
                None => keys.append(py.None())?,
            }
        }
        let keys = keys.unbind();
        self.keys = Some(keys.clone_ref(py));
        Ok(keys)
    }

    /// (auditID, stage) per line, None where the line is not a kept audit event.
    fn identities<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for index in 0..self.codes.len() {
            let Some(key) = self.key(index) else {
                out.append(py.None())?;
                continue;
            };
            // The key is auditID + one character for a known stage, or + the whole stage name.
            let stage_index = self.stage_indexes[index];
            let (id, stage) = if stage_index == OTHER_STAGE {
                key.split_at(self.id_lens[index] as usize)
            } else {
                (&key[..key.len() - 1], STAGES[stage_index as usize])
            };
            out.append(PyTuple::new(py, [id, stage])?)?;
        }
        Ok(out)
    }

    /// The output bytes of line ``index`` (``line``, its input, is what the Python scan needs).
    #[pyo3(signature = (index, line=None))]
    fn splice<'py>(
        &self,
        py: Python<'py>,
        index: usize,
        line: Option<&[u8]>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let _ = line;
        if index >= self.codes.len() {
            return Err(PyValueError::new_err("line index out of range"));
        }
        let Some(input) = &self.input else {
            return Err(PyValueError::new_err("the scan was released"));
        };
        let output = Output {
            flat: self.flat(index),
            line: input.line(py, index),
        };
        let mut bytes = Vec::with_capacity(output.len());
        output.write(|piece| bytes.extend_from_slice(piece));
        Ok(PyBytes::new(py, &bytes))
    }

    /// The output block: every line's output and a newline, less the lines whose ``keep`` byte
    /// is 0 (all kept when ``keep`` is None); ``replacements`` maps a line index to its output.
    /// May be called again (the filter builds a block before it knows which lines go on, and
    /// again in the rare case that not all of them do), until ``release``.
    #[pyo3(signature = (keep=None, replacements=None))]
    fn build<'py>(
        &self,
        py: Python<'py>,
        keep: Option<&[u8]>,
        replacements: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        if keep.is_some_and(|k| k.len() != self.codes.len()) {
            return Err(PyValueError::new_err("keep must have one byte per line"));
        }
        let Some(input) = &self.input else {
            return Err(PyValueError::new_err("the scan was released"));
        };
        let lines = input.lines(py);
        let replacements = match replacements {
            Some(map) if !map.is_empty() => Some(map),
            _ => None,
        };
        // Replacement values are held here so that their bytes can be borrowed below.
        let mut owned: Vec<Bound<'py, PyAny>> = Vec::new();
        let mut chosen: Vec<(usize, Option<usize>)> = Vec::with_capacity(self.codes.len());
        for index in 0..self.codes.len() {
            if keep.is_some_and(|k| k[index] == 0) {
                continue;
            }
            match replacements
                .map(|m| m.get_item(index))
                .transpose()?
                .flatten()
            {
                Some(value) => {
                    owned.push(value);
                    chosen.push((index, Some(owned.len() - 1)));
                }
                None => chosen.push((index, None)),
            }
        }
        // Each kept line is a replacement's bytes or an output (flat members + the line).
        enum Piece<'a> {
            Replaced(&'a [u8]),
            Spliced(Output<'a>),
        }
        let mut pieces: Vec<Piece> = Vec::with_capacity(chosen.len());
        for (index, replaced) in chosen {
            pieces.push(match replaced {
                Some(at) => Piece::Replaced(owned[at].extract::<&[u8]>()?),
                None => Piece::Spliced(Output {
                    flat: self.flat(index),
                    line: lines[index],
                }),
            });
        }
        let total = pieces
            .iter()
            .map(|p| match p {
                Piece::Replaced(bytes) => bytes.len() + 1,
                Piece::Spliced(output) => output.len() + 1,
            })
            .sum();
        let block = new_bytes_filled(py, total, |out| {
            for piece in &pieces {
                match piece {
                    Piece::Replaced(bytes) => out.put(bytes),
                    Piece::Spliced(output) => output.write(|part| out.put(part)),
                }
                out.put(b"\n");
            }
        })?;
        Ok(block)
    }

    /// Lets the input and the flat members go (after the last ``build``); the codes, keys and
    /// identities stay.
    fn release(&mut self) {
        self.input = None;
        self.flats = Vec::new();
    }
}

/// A dedupe key, compact where it can be: auditID + stage code, where the auditID is a
/// canonical UUID (lowercase, as the API server writes it) and the stage a known one, is 17
/// bytes instead of a 37-character Python string (~100 bytes with its set slot). Any other key is
/// kept as text. The two forms never meet: a text key is never a canonical UUID + code.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    // Bytes rather than a u128: alignment 1 keeps the key at 24 bytes instead of 32.
    Uuid([u8; 16], u8),
    Text(Box<str>),
}

impl Key {
    fn new(key: &str) -> Key {
        const _: () = assert!(std::mem::size_of::<Key>() == 24);
        let bytes = key.as_bytes();
        if bytes.len() == 37 && (b'0'..=b'3').contains(&bytes[36]) {
            if let Some(id) = parse_uuid(&bytes[..36]) {
                return Key::Uuid(id.to_be_bytes(), bytes[36] - b'0');
            }
        }
        Key::Text(key.into())
    }
}

/// The 128 bits of a canonical lowercase UUID (8-4-4-4-12 hex digits), None for anything else.
fn parse_uuid(text: &[u8]) -> Option<u128> {
    let mut value: u128 = 0;
    for (i, &b) in text.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if b != b'-' {
                return None;
            }
            continue;
        }
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        value = (value << 4) | u128::from(digit);
    }
    Some(value)
}

/// The keys one batch added to a ``KeySet`` (kept by the filter until their window ends).
#[pyclass(frozen, module = "kubetrail_native")]
struct KeyBatch {
    keys: Vec<Key>,
}

#[pymethods]
impl KeyBatch {
    fn __len__(&self) -> usize {
        self.keys.len()
    }
}

/// The filter's remembered dedupe keys, compact (see ``Key``): the ``seen`` set of the
/// ``kubernetes_audit`` filter when the native scan is installed.
#[pyclass(module = "kubetrail_native")]
#[derive(Default)]
struct KeySet {
    keys: HashSet<Key>,
}

#[pymethods]
impl KeySet {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    fn __len__(&self) -> usize {
        self.keys.len()
    }

    fn __contains__(&self, key: &str) -> bool {
        self.keys.contains(&Key::new(key))
    }

    /// True when none of ``keys`` is in the set.
    fn isdisjoint(&self, keys: &Bound<'_, PyAny>) -> PyResult<bool> {
        for key in keys.try_iter()? {
            if self.keys.contains(&Key::new(key?.extract::<&str>()?)) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Adds ``keys``; returns them as a batch for ``forget``.
    fn add(&mut self, keys: &Bound<'_, PyAny>) -> PyResult<KeyBatch> {
        let mut batch = Vec::new();
        for key in keys.try_iter()? {
            let key = Key::new(key?.extract::<&str>()?);
            self.keys.insert(key.clone());
            batch.push(key);
        }
        Ok(KeyBatch { keys: batch })
    }

    /// Removes a batch's keys (its window has ended).
    fn forget(&mut self, batch: &KeyBatch) {
        for key in &batch.keys {
            self.keys.remove(key);
        }
    }

    /// The tail's common case in one call: when no key of ``scan`` repeats within it and none
    /// is in the set, adds them all and returns them as a batch; otherwise changes nothing and
    /// returns None (the filter then goes line by line).
    fn add_scan_if_new(&mut self, scan: &AuditScan) -> Option<KeyBatch> {
        let mut batch: Vec<Key> = Vec::with_capacity(scan.codes.len());
        self.keys.reserve(scan.codes.len());
        for key in (0..scan.codes.len())
            .filter_map(|i| scan.key(i))
            .map(Key::new)
        {
            // One probe per key (the table is big and cold): insert, and undo on the rare repeat.
            if !self.keys.insert(key.clone()) {
                for added in &batch {
                    self.keys.remove(added);
                }
                return None;
            }
            batch.push(key);
        }
        Some(KeyBatch { keys: batch })
    }
}

/// The number of newlines in ``block``: what ``bytes.count(b"\n")`` returns, at several times
/// its speed (memchr's vectorised search). The tail counts the lines of every block it reads
/// with it, on the event loop's thread.
#[pyfunction]
fn count_newlines(block: &[u8]) -> usize {
    memchr::memchr_iter(b'\n', block).count()
}

/// Whether ``data`` is UTF-8 throughout: what ``data.decode()`` not raising says, without making
/// the text, several times faster than ``bytes.isascii()`` (simdutf8). The JSON parsers check
/// every block with it, since msgspec's validation skips the UTF-8 of what it does not decode.
#[pyfunction]
fn valid_utf8(data: &[u8]) -> bool {
    simdutf8::basic::from_utf8(data).is_ok()
}

#[pymodule]
fn kubetrail_native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(count_newlines, module)?)?;
    module.add_function(wrap_pyfunction!(valid_utf8, module)?)?;
    module.add_class::<AuditScanner>()?;
    module.add_class::<AuditScan>()?;
    module.add_class::<alerts::AlertWriter>()?;
    module.add_function(wrap_pyfunction!(alerts::cut_lines, module)?)?;
    module.add_function(wrap_pyfunction!(auditclass::class_counts, module)?)?;
    module.add_function(wrap_pyfunction!(auditclass::lines_of, module)?)?;
    module.add_class::<KeySet>()?;
    module.add_class::<KeyBatch>()?;
    module.add_class::<jsonlines::JsonLinesScanner>()?;
    module.add_class::<jsonlines::LineMembers>()?;
    module.add_class::<regexlines::RegexLinesScanner>()?;
    module.add_function(wrap_pyfunction!(jsonlines::frame_lines, module)?)?;
    module.add_function(wrap_pyfunction!(jsonlines::has_blank_line, module)?)?;
    module.add_function(wrap_pyfunction!(jsonlines::write_framed, module)?)?;
    module.add_function(wrap_pyfunction!(framedcopy::write_framed_buffered, module)?)?;
    module.add_function(wrap_pyfunction!(
        framedcopy::write_dated_lines_buffered,
        module
    )?)?;
    module.add_class::<timefmt::TimeFormat>()?;
    module.add_function(wrap_pyfunction!(storerows::audit_store_rows, module)?)?;
    module.add_class::<storerows::StoreInserter>()?;
    module.add_class::<fieldtext::FieldsWriter>()?;
    module.add_class::<httpbody::FramedBody>()?;
    module.add_class::<multilines::LineRules>()?;
    module.add_function(wrap_pyfunction!(multilines::text_json_lines, module)?)?;
    module.add_function(wrap_pyfunction!(crilines::cri_join, module)?)?;
    module.add_function(wrap_pyfunction!(dockerlines::docker_join, module)?)?;
    Ok(())
}
