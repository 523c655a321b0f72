//! A `regex` parser's block of lines in one call: each line matched, its named groups written
//! as one JSON object per line, the time taken from `time_key` with the format compiled once,
//! with no Python object per line or per field.
//!
//! Why: a `[PARSER] format regex` cost a `re` match, a dict of strings and an `orjson.dumps`
//! per line (about 10 us); most records are written out as they were parsed, so the block of
//! JSON lines is the record, and Python builds records only if a filter asks for them.
//!
//! Semantics are the Python parser's (`kubetrail/parsers/regex_parser.py`), which tests compare
//! this with: the pattern (already converted from Onigmo syntax for Python's `re`) is searched,
//! not anchored; keys in the order of their groups; `skip_empty_values` leaves out groups that
//! matched nothing or an empty text. The Rust `regex` crate has Perl's leftmost-first matching
//! (the same groups as a backtracking engine) but no look-around or back-references: a pattern
//! it does not compile stays with Python's `re`. A line that does not match, or is not UTF-8,
//! sends the block to the Python line-by-line path (where it is kept under `log`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use regex::Regex;

use crate::block_lines;
use crate::jsonesc::write_json_string;
use crate::timefmt::{Compiled, TimeFormat};

#[pyclass(module = "kubetrail_native", frozen)]
pub struct RegexLinesScanner {
    regex: Regex,
    /// Group index and its name as a JSON key with the colon (`"name":`).
    groups: Vec<(usize, Vec<u8>)>,
    /// The group holding the time, if `time_key` names one.
    time_group: Option<usize>,
    remove: bool,
    skip_empty: bool,
    format: TimeFormat,
}

#[pymethods]
impl RegexLinesScanner {
    #[new]
    #[pyo3(signature = (pattern, time_key, remove, fmt, offset_seconds=0, skip_empty=true))]
    fn new(
        pattern: &str,
        time_key: Option<&str>,
        remove: bool,
        fmt: Option<&str>,
        offset_seconds: i64,
        skip_empty: bool,
    ) -> PyResult<Self> {
        let regex = Regex::new(pattern).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let mut groups = Vec::new();
        let mut time_group = None;
        for (index, name) in regex.capture_names().enumerate() {
            if let Some(name) = name {
                if groups
                    .iter()
                    .any(|(_, key): &(usize, Vec<u8>)| key[1..key.len() - 2] == *name.as_bytes())
                {
                    return Err(PyValueError::new_err("a group name is repeated"));
                }
                let mut key = Vec::new();
                write_json_string(&mut key, name);
                key.push(b':');
                if Some(name) == time_key {
                    time_group = Some(index);
                }
                groups.push((index, key));
            }
        }
        let compiled = match fmt {
            Some(f) => Some(Compiled::new(f, offset_seconds).map_err(PyValueError::new_err)?),
            None => None,
        };
        Ok(Self {
            regex,
            groups,
            time_group,
            remove,
            skip_empty,
            format: TimeFormat {
                compiled,
                offset: offset_seconds,
            },
        })
    }

    /// ``(json_lines, times, slow)`` for a block of newline-terminated lines, or None when a line
    /// does not match (or is not UTF-8). ``times``: a native-endian int64 per line (``now_ns``
    /// where there is no time, or it is in ``slow``); ``slow``: ``(index, time text)`` of the
    /// times the format did not take here, whose key is kept (the reference parser decides).
    fn scan<'py>(
        &self,
        py: Python<'py>,
        block: &[u8],
        now_ns: i64,
    ) -> PyResult<
        Option<(
            Bound<'py, PyBytes>,
            Bound<'py, PyBytes>,
            Vec<(usize, String)>,
        )>,
    > {
        let mut out: Vec<u8> = Vec::with_capacity(block.len() + block.len() / 2);
        let mut times: Vec<u8> = Vec::with_capacity(block.len() / 8);
        let mut slow = Vec::new();
        let mut locs = self.regex.capture_locations();
        for (index, line) in block_lines(block).enumerate() {
            let Ok(text) = std::str::from_utf8(line) else {
                return Ok(None);
            };
            if self.regex.captures_read(&mut locs, text).is_none() {
                return Ok(None);
            }
            let mut time = now_ns;
            let mut keep_time = true;
            if let Some(group) = self.time_group {
                if locs.get(group).is_none() && !self.skip_empty {
                    slow.push((index, String::new())); // written as "": the reference counts it
                }
                if let Some((start, end)) = locs.get(group) {
                    let value = &text[start..end];
                    if !(self.skip_empty && value.is_empty()) {
                        match self.format.parse(value.as_bytes()) {
                            Some(ns) => {
                                time = ns;
                                keep_time = !self.remove;
                            }
                            None => slow.push((index, value.to_owned())),
                        }
                    }
                }
            }
            out.push(b'{');
            let mut first = true;
            for (group, key) in &self.groups {
                if Some(*group) == self.time_group && !keep_time {
                    continue;
                }
                let value = locs.get(*group).map(|(s, e)| &text[s..e]);
                if self.skip_empty && value.is_none_or(str::is_empty) {
                    continue;
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(key);
                write_json_string(&mut out, value.unwrap_or(""));
            }
            out.extend_from_slice(b"}\n");
            times.extend_from_slice(&time.to_ne_bytes());
        }
        Ok(Some((
            PyBytes::new(py, &out),
            PyBytes::new(py, &times),
            slow,
        )))
    }
}
