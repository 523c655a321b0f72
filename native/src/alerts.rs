//! The `detect` filter's alert records, written natively.
//!
//! An alert is Falco's JSON output plus the triggering event's identity (see
//! `kubetrail/detect/engine.py`, `Engine.alert_record`). In Python each costs ~7 us (the output
//! string, the record dict, JSON); a third of the benchmark's events fire one. Most of Falco's
//! k8s_audit outputs read only members the audit scan decodes anyway (user, target, verb, URI,
//! response code, authorization annotations), so for a rule whose output reads nothing else,
//! Python compiles it once into a template (`AlertWriter`), and here each alert is the
//! template filled from the event, decoded with the scan's own `Event` struct (lib.rs).
//!
//! Byte for byte what the Python path writes (the tests compare the two): strings escaped as
//! orjson does, the time from `stageTimestamp` as `Event.timestamp_ns` reads it. What this
//! cannot do the same way gives None for that alert and Python writes it: a line that does not
//! decode here, a `stageTimestamp` that is not `YYYY-MM-DDTHH:MM:SS[.fraction]Z` with a valid
//! date (Python's fromisoformat takes more forms, and a wrong date means "now" there).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::jsonesc::{escape_json_into, write_json_string};
use crate::{block_lines, Event, JStr};

/// A member of the event an output may read (the ids the Python side uses).
const AUDIT_ID: u8 = 0;
const STAGE: u8 = 1;
const VERB: u8 = 2;
const URI: u8 = 3;
const USER_AGENT: u8 = 4;
const USER: u8 = 5;
const IMP_USER: u8 = 6;
const RESOURCE: u8 = 7;
const SUBRESOURCE: u8 = 8;
const NAMESPACE: u8 = 9;
const NAME: u8 = 10;
const CODE: u8 = 11;
const DECISION: u8 = 12;
const REASON: u8 = 13;
const FIELDS: u8 = 14;

/// One rule's alert, compiled by Python (see `AlertWriter.__new__`).
struct Template {
    /// From `","rule":` to `"output":"`: the rule's constant members.
    head: Vec<u8>,
    /// `: Priority ` as it follows the time in the output string (escaped).
    priority: Vec<u8>,
    /// The output after the priority: literal text (escaped) or a field.
    parts: Vec<Part>,
    /// `output_fields` members: `"name":` and the field.
    fields: Vec<(Vec<u8>, u8)>,
}

enum Part {
    Text(Vec<u8>),
    Field(u8),
}

#[pyclass(frozen, module = "kubetrail_native")]
pub(crate) struct AlertWriter {
    rules: Vec<Template>,
    /// `,"hostname":"..."` (encoded).
    hostname: Vec<u8>,
}

/// The field's value as the Python fields give it (a code as its decimal text); None: missing.
fn field<'a>(ev: &'a Event, id: u8, code: &'a str) -> Option<&'a str> {
    let text = |v: Option<&'a JStr>| v.map(|v| v.as_str());
    let oref = ev.object_ref.as_ref();
    match id {
        AUDIT_ID => text(ev.audit_id.as_ref()),
        STAGE => text(ev.stage.as_ref()),
        VERB => text(ev.verb.as_ref()),
        URI => text(ev.request_uri.as_ref()),
        USER_AGENT => text(ev.user_agent.as_ref()),
        USER => text(ev.user.as_ref().and_then(|u| u.username.as_ref())),
        IMP_USER => text(
            ev.impersonated_user
                .as_ref()
                .and_then(|u| u.username.as_ref()),
        ),
        RESOURCE => text(oref.and_then(|r| r.resource.as_ref())),
        SUBRESOURCE => text(oref.and_then(|r| r.subresource.as_ref())),
        NAMESPACE => text(oref.and_then(|r| r.namespace.as_ref())),
        NAME => text(oref.and_then(|r| r.name.as_ref())),
        CODE => ev
            .response_status
            .as_ref()
            .and_then(|s| s.code)
            .map(|_| code),
        DECISION => text(ev.annotations.as_ref().and_then(|n| n.decision.as_ref())),
        REASON => text(ev.annotations.as_ref().and_then(|n| n.reason.as_ref())),
        _ => None,
    }
}

fn digits(text: &[u8]) -> Option<u32> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(text.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
}

/// `YYYY-MM-DDTHH:MM:SS` and the nanoseconds (a fraction's first six digits, as Python's
/// datetime keeps microseconds), for a valid UTC time from 1970 on; None otherwise.
fn event_time(stamp: &str) -> Option<(&str, u32)> {
    let b = stamp.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if b[b.len() - 1] != b'Z' {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    let (hour, minute, second) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    );
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if year < 1970 || day == 0 || day > days || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let rest = &b[19..b.len() - 1];
    let micros = if rest.is_empty() {
        0
    } else {
        if rest[0] != b'.' {
            return None;
        }
        let fraction = &rest[1..];
        if fraction.is_empty() || !fraction.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let mut micros = 0;
        for i in 0..6 {
            micros = micros * 10 + fraction.get(i).map_or(0, |d| u32::from(d - b'0'));
        }
        micros
    };
    let mut nanos = micros * 1000;
    if nanos == 0 && &b[0..19] == b"1970-01-01T00:00:00" {
        nanos = 1; // Event.timestamp_ns: an event's time is never 0
    }
    Some((&stamp[0..19], nanos))
}

impl AlertWriter {
    /// One alert, or None when Python must write it (see the module's comment).
    fn write(&self, out: &mut Vec<u8>, line: &[u8], rule: &Template, tag: &[u8]) -> bool {
        let Ok(ev) = sonic_rs::from_slice::<Event>(line) else {
            return false;
        };
        let Some((whole, nanos)) = ev
            .stage_timestamp
            .as_ref()
            .and_then(|s| event_time(s.as_str()))
        else {
            return false;
        };
        let (Some(id), Some(stage)) = (ev.audit_id.as_ref(), ev.stage.as_ref()) else {
            return false;
        };
        let code = ev
            .response_status
            .as_ref()
            .and_then(|s| s.code)
            .map(|c| c.to_string())
            .unwrap_or_default();
        let fraction = format!(".{nanos:09}");
        out.extend_from_slice(b"{\"time\":\"");
        out.extend_from_slice(whole.as_bytes());
        out.extend_from_slice(fraction.as_bytes());
        out.extend_from_slice(b"Z\"");
        out.extend_from_slice(&rule.head);
        out.extend_from_slice(whole[11..].as_bytes());
        out.extend_from_slice(fraction.as_bytes());
        out.extend_from_slice(&rule.priority);
        for part in &rule.parts {
            match part {
                Part::Text(text) => out.extend_from_slice(text),
                Part::Field(f) => match field(&ev, *f, &code) {
                    Some(value) => escape_json_into(out, value.as_bytes(), b"\""),
                    None => out.extend_from_slice(b"<NA>"),
                },
            }
        }
        out.extend_from_slice(b"\",\"output_fields\":{");
        for (i, (name, f)) in rule.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(name);
            match field(&ev, *f, &code) {
                Some(value) => write_json_string(out, value),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.push(b'}');
        out.extend_from_slice(&self.hostname);
        out.extend_from_slice(b",\"k8s.audit.id\":\"");
        escape_json_into(out, id.as_str().as_bytes(), b"\"");
        out.extend_from_slice(b"\",\"k8s.audit.stage\":\"");
        escape_json_into(out, stage.as_str().as_bytes(), b"\"");
        out.extend_from_slice(b"\",\"trigger_tag\":");
        out.extend_from_slice(tag);
        out.push(b'}');
        true
    }
}

#[pymethods]
impl AlertWriter {
    /// ``rules``: per rule (head, priority, parts, fields), where a part is bytes (escaped
    /// text) or a field id and a field is (``"name":``, id); ``hostname``: ``,"hostname":...``.
    #[new]
    fn new(
        rules: Vec<(Vec<u8>, Vec<u8>, Vec<Bound<'_, PyAny>>, Vec<(Vec<u8>, u8)>)>,
        hostname: Vec<u8>,
    ) -> PyResult<Self> {
        let mut templates = Vec::with_capacity(rules.len());
        for (head, priority, parts, fields) in rules {
            let mut compiled = Vec::with_capacity(parts.len());
            for part in parts {
                compiled.push(if let Ok(id) = part.extract::<u8>() {
                    Part::Field(id)
                } else {
                    Part::Text(part.extract::<Vec<u8>>()?)
                });
            }
            if fields.iter().any(|(_, f)| *f >= FIELDS)
                || compiled
                    .iter()
                    .any(|p| matches!(p, Part::Field(f) if *f >= FIELDS))
            {
                return Err(PyValueError::new_err("unknown field id"));
            }
            templates.push(Template {
                head,
                priority,
                parts: compiled,
                fields,
            });
        }
        Ok(Self {
            rules: templates,
            hostname,
        })
    }

    /// The alerts of ``items`` (pairs of a line number in ``block`` and a rule number), one
    /// bytes object each, None where Python must write it; ``tag``: the trigger tag, encoded.
    fn render<'py>(
        &self,
        py: Python<'py>,
        block: &[u8],
        items: Vec<(usize, usize)>,
        tag: &[u8],
    ) -> PyResult<Bound<'py, PyList>> {
        let lines: Vec<&[u8]> = block_lines(block).collect();
        if items
            .iter()
            .any(|&(line, rule)| line >= lines.len() || rule >= self.rules.len())
        {
            return Err(PyValueError::new_err("line or rule out of range"));
        }
        let rendered: Vec<Option<Vec<u8>>> = py.detach(|| {
            items
                .iter()
                .map(|&(line, rule)| {
                    let mut out = Vec::with_capacity(1024);
                    self.write(&mut out, lines[line], &self.rules[rule], tag)
                        .then_some(out)
                })
                .collect()
        });
        let list = PyList::empty(py);
        for alert in rendered {
            match alert {
                Some(bytes) => list.append(PyBytes::new(py, &bytes))?,
                None => list.append(py.None())?,
            }
        }
        Ok(list)
    }
}

/// Lines ``indexes`` of ``block`` (newline-terminated lines), as bytes: the `detect` filter
/// needs a few lines of a big block, and finding them in Python costs a loop over all of them.
#[pyfunction]
pub(crate) fn cut_lines<'py>(
    py: Python<'py>,
    block: &[u8],
    indexes: Vec<usize>,
) -> PyResult<Bound<'py, PyList>> {
    let lines: Vec<&[u8]> = block_lines(block).collect();
    if indexes.iter().any(|&i| i >= lines.len()) {
        return Err(pyo3::exceptions::PyIndexError::new_err(
            "line index out of range",
        ));
    }
    let list = PyList::empty(py);
    for index in indexes {
        list.append(PyBytes::new(py, lines[index]))?;
    }
    Ok(list)
}
