//! docker json-file log lines (`multiline.parser docker`) decoded and joined per stream in one
//! call, written as the JSON lines of Fluent Bit's records: `crilines.rs`' twin for docker.
//!
//! Why: the record path decodes every line into a dict with orjson, and the output encodes it
//! again: 3.1-3.2 s for 500,000 messages against 0.6 s for the same messages as CRI lines.
//!
//! Only the shape docker writes is taken here: `{"log":"..","stream":"stdout|stderr",
//! "time":".."}`, those three members in that order, compact, nothing else. A block with any
//! other line (another member such as `attrs`, another order or stream, a line that is not JSON,
//! a CRI line under `docker, cri`) is declined as a whole (`None`) and goes the record path
//! (`ContainerLogJoiner.process` in `kubetrail/parsers/multiline.py`), which is the reference
//! the tests compare with byte for byte:
//!
//! * a `log` ending in `\n` with nothing pending on its stream is a record of its own: the
//!   document as orjson writes it (the strings decoded and escaped again: docker's `\u003c` for
//!   `<` comes out as `<`), with the `log` member moved to the end under `key` when `key` is not
//!   `log`; its `max_size` rules are the CRI ones on the log's UTF-8 bytes;
//! * any other `log` is a piece: it starts (or continues) its stream's pending message, whose
//!   time is its first piece's, and the piece ending in `\n` finishes it as `{"stream":..,
//!   "time":..,<key>:..}` (the first piece's document without `log`, the joined text last);
//! * a time is decided as the CRI stamps are (`crilines::Walk::time`: the fast RFC 3339 shapes
//!   here, any other text by Python's `time_of`); not a time: the caller's `now`, counted.
//!
//! The pending messages come in and go out as `cri_join`'s do (the caller keeps only those whose
//! first piece had exactly this shape, so its document is `{"stream","time"}`).

use memchr::memmem;
use pyo3::prelude::*;
use serde::Deserialize;

use crate::crilines::{lines_at, pending_in, JoinResult, Pending, PendingTuple, Walk};
use crate::jsonesc::escape_json_into;
use crate::JStr;

const STREAMS: [&str; 2] = ["stdout", "stderr"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DockerLine<'a> {
    #[serde(borrow)]
    log: JStr<'a>,
    #[serde(borrow)]
    stream: JStr<'a>,
    #[serde(borrow)]
    time: JStr<'a>,
}

/// The line's (log, stream index, time) when it has exactly docker's shape; None otherwise.
/// serde refuses a missing, repeated or unknown member and sonic-rs anything that is not JSON;
/// the order is checked on the bytes (a member name in quotes followed by a colon cannot occur
/// inside a JSON string, where its quotes are escaped; with a space before the colon the name
/// is not found and the line is declined). The output is written from the decoded values, so
/// the line's own spacing and escapes do not matter.
fn docker_line(line: &[u8]) -> Option<(JStr<'_>, usize, JStr<'_>)> {
    if !line.starts_with(b"{\"log\":\"") {
        return None;
    }
    let stream_at = memmem::find(line, b"\"stream\":\"")?;
    let time_at = memmem::find(line, b"\"time\":\"")?;
    if time_at < stream_at {
        return None;
    }
    let parsed: DockerLine = sonic_rs::from_slice(line).ok()?;
    let stream = STREAMS.iter().position(|s| *s == parsed.stream.as_str())?;
    Some((parsed.log, stream, parsed.time))
}

impl Walk<'_, '_> {
    /// `"name":"value"` escaped as orjson writes it.
    fn member(&mut self, name: &[u8], value: &str) {
        self.out.push(b'"');
        self.out.extend_from_slice(name);
        self.out.extend_from_slice(b"\":\"");
        escape_json_into(&mut self.out, value.as_bytes(), b"\"");
        self.out.push(b'"');
    }

    /// `"<key>":"text"` (the key as the caller's `key_prefix` spells it), lossy text.
    fn keyed_text(&mut self, text: &[u8]) {
        self.out.extend_from_slice(self.key);
        self.text(text);
        self.out.push(b'"');
    }

    fn docker_record(&mut self, stream: usize, time_text: &str, log: &[u8], keyed: bool) {
        self.out.push(b'{');
        if keyed {
            self.keyed_text(log);
            self.out.push(b',');
        }
        self.member(b"stream", STREAMS[stream]);
        self.out.push(b',');
        self.member(b"time", time_text);
        if !keyed {
            self.out.push(b',');
            self.keyed_text(log);
        }
        self.out.extend_from_slice(b"}\n");
    }

    /// `_finish` for a docker message: skipped if it grew past the limit and is not truncated.
    fn docker_finish(&mut self, entry: Pending, stream: usize) {
        if entry.over {
            if !self.truncate {
                self.stats.long_skipped += 1;
                return;
            }
            self.stats.long_truncated += 1;
        }
        self.docker_record(stream, &entry.time_text, &entry.data, false);
        self.times.push(entry.time_ns);
        self.offsets.push(entry.start);
    }
}

/// A block of docker json-file lines (newline-terminated, whole lines from file offset `start`)
/// through the joiner, or None where a line is not docker's shape (see the module docstring).
/// Arguments and result as `cri_join`'s; `log_first` says the key is `log`, so a whole line's
/// record keeps docker's member order.
#[allow(clippy::too_many_arguments)]
#[pyfunction]
#[pyo3(signature = (block, start, key_prefix, log_first, max_size, truncate, now_ns, pending, time_of))]
pub fn docker_join<'py>(
    py: Python<'py>,
    block: &[u8],
    start: i64,
    key_prefix: &[u8],
    log_first: bool,
    max_size: usize,
    truncate: bool,
    now_ns: i64,
    pending: Vec<PendingTuple<'py>>,
    time_of: &Bound<'py, PyAny>,
) -> PyResult<Option<JoinResult<'py>>> {
    let mut open = pending_in(pending);
    let mut walk = Walk::new(block.len(), key_prefix, now_ns, max_size, truncate, time_of);
    for (line_start, line) in lines_at(block, start) {
        let Some((log, stream, time)) = docker_line(line) else {
            return Ok(None);
        };
        let log = log.as_str().as_bytes();
        let complete = log.last() == Some(&b'\n');
        let time = time.as_str();
        if complete && open[stream].is_none() {
            let time_ns = walk.time(time.as_bytes())?;
            let Some(log) = walk.whole(log) else {
                continue;
            };
            walk.docker_record(stream, time, log, log_first);
            walk.times.push(time_ns);
            walk.offsets.push(line_start);
            continue;
        }
        let first = |w: &mut Walk| {
            Ok(Pending::new(
                line_start,
                time.to_owned(),
                w.time(time.as_bytes())?,
            ))
        };
        if let Some(entry) = walk.piece(&mut open[stream], first, log, complete)? {
            walk.docker_finish(entry, stream);
        }
    }
    Ok(Some(walk.result(py, open)))
}
