//! Plain text lines as JSON records, and the `multiline` filter's regex rules over a block of
//! them, with no Python object per line.
//!
//! Why: a tail with no parser made a `Record` (a dict) per line, the `multiline` filter ran its
//! state machine line by line in Python and the output encoded every record again (2.5x the
//! built-in parser's path on the same bytes). Here the tail's block of lines becomes either
//! JSON lines `{"log":"<line>"}` (`text_json_lines`) or, through the filter's rules
//! (`LineRules.join`), JSON lines of the joined messages, in one call each.
//!
//! Semantics are the Python reference's (`kubetrail/parsers/multiline_rules.py`,
//! `LineJoiner.feed_many`, and the filter's `_join`), which tests compare byte for byte:
//! a line is decoded as UTF-8 with U+FFFD for invalid bytes (`from_utf8_lossy` replaces the
//! same maximal subparts Python's `"replace"` does), cut of its `\r` in a CRLF file, escaped
//! as orjson does (`jsonesc.rs`); joined lines are separated by `\n`.
//!
//! Rules are searched (not anchored), first match wins, in the order the Python side gives.
//! Rust's `regex` and Python's `re` accept the same text for the patterns the Python side lets
//! through here (no look-around, back-references or set operations: those fail to compile or
//! are refused there), *on ASCII text*: for other text the Unicode classes differ (`\s` in
//! Python also takes U+001C..U+001F, `\w` differs on marks). So a line that is not ASCII, or
//! holds one of those four separators, is decided by calling Python's `search(rule, text)`:
//! the same answer as the reference, at the reference's price, for those lines only.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use regex::Regex;

use crate::block_lines;
use crate::jsonesc::escape_json_into;

/// The text of a line: without its `\r` in a CRLF file (the Python path cuts it there).
fn text_of(line: &[u8], crlf: bool) -> &[u8] {
    if crlf {
        line.strip_suffix(b"\r").unwrap_or(line)
    } else {
        line
    }
}

/// Whether Rust's `regex` decides `text` as Python's `re` would: ASCII without U+001C..U+001F.
fn ascii_plain(text: &[u8]) -> bool {
    text.iter()
        .fold(true, |ok, &b| ok & (b < 0x1c || (b > 0x1f && b < 0x80)))
}

/// `text` (lossy UTF-8) escaped for the inside of a JSON string.
fn escape_text(out: &mut Vec<u8>, text: &[u8]) {
    let decoded = String::from_utf8_lossy(text);
    escape_json_into(out, decoded.as_bytes(), b"\"");
}

/// Each line of a block (newline-terminated, no blank line) as `prefix` + the escaped line +
/// `"}` + newline: the record `{key: line}` as orjson writes it, `prefix` being `{"key":"`.
#[pyfunction]
pub fn text_json_lines<'py>(
    py: Python<'py>,
    block: &[u8],
    prefix: &[u8],
    crlf: bool,
) -> Bound<'py, PyBytes> {
    let lines = block.iter().filter(|&&b| b == b'\n').count();
    let mut out = Vec::with_capacity(block.len() + lines * (prefix.len() + 3) + block.len() / 16);
    for line in block_lines(block) {
        out.extend_from_slice(prefix);
        escape_text(&mut out, text_of(line, crlf));
        out.extend_from_slice(b"\"}\n");
    }
    PyBytes::new(py, &out)
}

/// A state's candidate rules, in order: (rule index, next state).
type Steps = Vec<(usize, i64)>;

#[pyclass(module = "kubetrail_native", frozen)]
pub struct LineRules {
    regexes: Vec<Regex>,
    /// The rules that start a message (all rule sets, in the order they are tried).
    starts: Steps,
    /// Per state id: the rules that continue a message in that state.
    steps: Vec<Steps>,
}

/// What one call found; see `LineRules.join`.
struct Walk {
    out: Vec<u8>,
    offsets: Vec<u8>,
    count: usize,
    head_end: usize,
    tail_start: i64,
    state: i64,
    joined: usize,
}

impl LineRules {
    /// The next state if a rule of `rules` matches `text`, else None.
    fn first_match<'py>(
        &self,
        py: Python<'py>,
        rules: &Steps,
        text: &[u8],
        decoded: &mut Option<Bound<'py, PyString>>,
        search: &Bound<'py, PyAny>,
    ) -> PyResult<Option<i64>> {
        if rules.is_empty() {
            return Ok(None);
        }
        if ascii_plain(text) {
            // ASCII: valid UTF-8, and both engines agree on it.
            let text = std::str::from_utf8(text).unwrap_or("");
            return Ok(rules
                .iter()
                .find(|(rule, _)| self.regexes[*rule].is_match(text))
                .map(|(_, next)| *next));
        }
        let decoded = match decoded {
            Some(value) => value,
            None => decoded.insert(PyString::new(py, &String::from_utf8_lossy(text))),
        };
        for (rule, next) in rules {
            if search.call1((*rule, decoded.clone()))?.is_truthy()? {
                return Ok(Some(*next));
            }
        }
        Ok(None)
    }

    fn steps_of(&self, state: i64) -> PyResult<&Steps> {
        usize::try_from(state)
            .ok()
            .and_then(|index| self.steps.get(index))
            .ok_or_else(|| PyValueError::new_err(format!("unknown state {state}")))
    }

    fn walk<'py>(
        &self,
        py: Python<'py>,
        block: &[u8],
        crlf: bool,
        prefix: &[u8],
        mut state: i64,
        close: bool,
        search: &Bound<'py, PyAny>,
    ) -> PyResult<Walk> {
        let mut out: Vec<u8> = Vec::with_capacity(block.len() + block.len() / 4);
        let mut offsets: Vec<u8> = Vec::with_capacity(block.len() / 8);
        let (mut count, mut joined) = (0usize, 0usize);
        // The group this call writes: (where its text began in `out`, first line's offset,
        // number of lines). A group open before the call (state >= 0 at the start) is the
        // caller's: its lines here are the head, not written.
        let mut group: Option<(usize, usize, usize)> = None;
        let mut head = state >= 0;
        let mut head_end = if head { block.len() } else { 0 };
        let mut offset = 0usize;
        for line in block_lines(block) {
            let at = offset;
            offset += line.len() + 1;
            let text = text_of(line, crlf);
            let mut decoded: Option<Bound<'py, PyString>> = None;
            if state >= 0 {
                let steps = self.steps_of(state)?;
                if let Some(next) = self.first_match(py, steps, text, &mut decoded, search)? {
                    state = next;
                    if let Some((_, _, lines)) = group.as_mut() {
                        out.extend_from_slice(b"\\n");
                        escape_text(&mut out, text);
                        *lines += 1;
                    }
                    continue;
                }
                state = -1;
                if head {
                    head_end = at;
                }
                if let Some((_, _, lines)) = group.take() {
                    out.extend_from_slice(b"\"}\n");
                    joined += usize::from(lines > 1);
                }
            }
            head = false;
            let started = self.first_match(py, &self.starts, text, &mut decoded, search)?;
            if let Some(next) = started {
                state = next;
                group = Some((out.len(), at, 1));
            }
            offsets.extend_from_slice(&(at as i64).to_ne_bytes());
            count += 1;
            out.extend_from_slice(prefix);
            escape_text(&mut out, text);
            if started.is_none() {
                out.extend_from_slice(b"\"}\n");
            }
        }
        let mut tail_start = -1i64;
        if let Some((mark, at, lines)) = group {
            if close {
                out.extend_from_slice(b"\"}\n");
                joined += usize::from(lines > 1);
                state = -1;
            } else {
                // Still open: the caller keeps its lines; nothing of it is written.
                out.truncate(mark);
                offsets.truncate(offsets.len() - 8);
                count -= 1;
                tail_start = at as i64;
            }
        }
        Ok(Walk {
            out,
            offsets,
            count,
            head_end,
            tail_start,
            state,
            joined,
        })
    }
}

#[pymethods]
impl LineRules {
    /// `patterns`: one per rule (Python `re` syntax the caller checked); `starts`: (rule, next
    /// state) of the rules that start a message, in order; `steps`: per state id, the rules
    /// that continue one. Raises ValueError when Rust's `regex` does not take a pattern.
    #[new]
    fn new(patterns: Vec<String>, starts: Steps, steps: Vec<Steps>) -> PyResult<Self> {
        let regexes = patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| PyValueError::new_err(e.to_string())))
            .collect::<PyResult<Vec<_>>>()?;
        let states = steps.len() as i64;
        for (rule, next) in starts.iter().chain(steps.iter().flatten()) {
            if *rule >= regexes.len() || *next < 0 || *next >= states {
                return Err(PyValueError::new_err("a rule or state out of range"));
            }
        }
        Ok(Self {
            regexes,
            starts,
            steps,
        })
    }

    /// A block of lines (newline-terminated, no blank line) through the rules, from `state`
    /// (-1: no message open; else the open message's state, whose lines the caller holds).
    /// Returns `(data, offsets, count, head_end, tail_start, state, joined)`:
    /// `data`: JSON lines (`prefix` is `{"key":"`) of the messages that start and end in the
    /// block and of the lines alone, `count` of them, each one's first line's byte offset in
    /// `offsets` (int64, native order); `head_end`: the lines before it continued the message
    /// open at the start (0 when none was); `tail_start`: the first line of the message still
    /// open at the end, not written (-1: none, or it is the one open at the start); `state`:
    /// the state at the end (-1: nothing open); `joined`: messages written of several lines.
    /// `close`: a message open at the end is written too (the caller's own is not).
    /// `search(rule, text)`: Python's verdict for a line that is not plain ASCII.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    #[pyo3(signature = (block, crlf, prefix, state, close, search))]
    fn join<'py>(
        &self,
        py: Python<'py>,
        block: &[u8],
        crlf: bool,
        prefix: &[u8],
        state: i64,
        close: bool,
        search: &Bound<'py, PyAny>,
    ) -> PyResult<(
        Bound<'py, PyBytes>,
        Bound<'py, PyBytes>,
        usize,
        usize,
        i64,
        i64,
        usize,
    )> {
        if state >= 0 {
            self.steps_of(state)?;
        }
        let walk = self.walk(py, block, crlf, prefix, state, close, search)?;
        Ok((
            PyBytes::new(py, &walk.out),
            PyBytes::new(py, &walk.offsets),
            walk.count,
            walk.head_end,
            walk.tail_start,
            walk.state,
            walk.joined,
        ))
    }
}
