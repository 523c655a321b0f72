//! CRI container log lines (`multiline.parser cri`) sliced and joined per stream in one call,
//! written as the JSON lines of Fluent Bit's records, with no Python object per line.
//!
//! Why: the tail's CRI path made a `Record` (a dict) per message in a Python loop (split, time
//! parse, decode, dict) and the output encoded every record again: 1.75 s CPU for 500,000
//! messages, most of the row. The shape is fixed (`<time> <stream> <P|F> <message>`), so it is
//! sliced, not matched; the pieces of a message are joined per stream and each finished message
//! is written as `{"time":"..","stream":"..","_p":"F","<key>":".."}` straight into one buffer.
//!
//! The semantics are the Python reference's (`ContainerLogJoiner.process` in
//! `kubetrail/parsers/multiline.py`), which the tests compare byte for byte:
//!
//! * a line splits on its first three spaces (`bytes.split(b" ", 3)`); a line of two parts, a
//!   stream that is not `stdout`/`stderr` or a flag that is not `P`/`F` is a bad line, passed
//!   on as `{key: line}` at the caller's `now`; an empty line is skipped;
//! * the time of a message is its first piece's; an F piece that continues a message is not
//!   parsed. `YYYY-MM-DDTHH:MM:SS` with `Z` or `.digitsZ` (all 2-digit fields valid, as
//!   `strptime` takes them) is decided here; any other stamp (an offset, odd digits, a
//!   date `strptime` refuses) is handed to Python's own `time_of(stamp)`, so odd lines get the
//!   reference's answer at its price;
//! * text is decoded as UTF-8 with U+FFFD for invalid bytes (`from_utf8_lossy` replaces the
//!   same maximal subparts as Python's `"replace"`), counted once per record; the stamp text
//!   is decoded as ASCII with U+FFFD per byte over 0x7f (`decode("ascii", "replace")`);
//! * the `max_size` rules (skip or truncate at a character boundary) are `_add`/`_cut`'s.
//!
//! State stays in Python (the pending message of each stream, for checkpoints and the flush
//! timeout): it comes in as tuples and goes out the same way, at most one per stream.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::block_lines;
use crate::jsonesc::escape_json_into;

const STREAMS: [&[u8]; 2] = [b"stdout", b"stderr"];

/// A stream's unfinished message: (stream index, file offset of its first piece, time text,
/// time ns, the pieces so far, their size, grew past the limit). As `_Pending` in Python.
pub(crate) type PendingTuple<'py> = (usize, i64, String, i64, Bound<'py, PyBytes>, usize, bool);
pub(crate) type PendingOut<'py> = (usize, i64, String, i64, Bound<'py, PyBytes>, usize, bool);

pub(crate) struct Pending {
    pub(crate) start: i64,
    pub(crate) time_text: String,
    pub(crate) time_ns: i64,
    pub(crate) data: Vec<u8>,
    pub(crate) size: usize,
    pub(crate) over: bool,
}

impl Pending {
    /// A message whose first piece starts at file offset `start`, timed by that piece.
    pub(crate) fn new(start: i64, time_text: String, time_ns: i64) -> Self {
        Pending {
            start,
            time_text,
            time_ns,
            data: Vec::new(),
            size: 0,
            over: false,
        }
    }
}

/// What the walk counted: bad lines, bad times, invalid UTF-8, long skipped, long truncated.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) bad_lines: usize,
    pub(crate) bad_times: usize,
    pub(crate) bad_utf8: usize,
    pub(crate) long_skipped: usize,
    pub(crate) long_truncated: usize,
}

fn two(text: &[u8], at: usize) -> Option<i64> {
    let (a, b) = (text[at], text[at + 1]);
    (a.is_ascii_digit() && b.is_ascii_digit())
        .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn month_days(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Epoch seconds of `YYYY-MM-DDTHH:MM:SS` when every field is two digits (four for the year)
/// and a date `strptime` accepts; None otherwise (then Python decides).
fn head_seconds(head: &[u8]) -> Option<i64> {
    if head.len() != 19
        || head[4] != b'-'
        || head[7] != b'-'
        || head[10] != b'T'
        || head[13] != b':'
        || head[16] != b':'
    {
        return None;
    }
    let year = two(head, 0)? * 100 + two(head, 2)?;
    let (month, day) = (two(head, 5)?, two(head, 8)?);
    let (hour, minute, second) = (two(head, 11)?, two(head, 14)?, two(head, 17)?);
    if year < 1 || !(1..=12).contains(&month) || day < 1 || day > month_days(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 61 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// The stamp's time: `Some(Some(ns))`, `Some(None)` (not a time, as the reference decides
/// natively too), or None: not a shape decided here, ask Python.
fn fast_time(stamp: &[u8]) -> Option<Option<i64>> {
    if stamp.len() < 20 {
        return None;
    }
    // Beyond int64 ns (before 1677, after 2262): Python decides, and its int does not fit
    // the times array, so the caller takes the record path for the block.
    let seconds = head_seconds(&stamp[..19])?.checked_mul(1_000_000_000)?;
    let rest = &stamp[19..];
    if rest == b"Z" {
        return Some(Some(seconds));
    }
    if rest.len() >= 2 && rest[0] == b'.' && rest[rest.len() - 1] == b'Z' {
        let digits = &rest[1..rest.len() - 1];
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Some(None);
        }
        let mut fraction = 0i64;
        for n in 0..9 {
            fraction = fraction * 10 + digits.get(n).map_or(0, |d| i64::from(d - b'0'));
        }
        return seconds.checked_add(fraction).map(Some);
    }
    None
}

/// `decode("ascii", "replace")`: each byte over 0x7f becomes U+FFFD.
fn ascii_text(stamp: &[u8]) -> String {
    stamp
        .iter()
        .map(|&b| if b < 0x80 { char::from(b) } else { '\u{fffd}' })
        .collect()
}

/// `_cut`: the first `limit` bytes, less a character the cut would split.
pub(crate) fn cut(data: &[u8], limit: usize) -> &[u8] {
    if limit >= data.len() {
        return data;
    }
    let mut end = limit;
    while end > 0 && limit - end < 3 && data[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    &data[..end]
}

pub(crate) struct Walk<'a, 'py> {
    pub(crate) out: Vec<u8>,
    pub(crate) times: Vec<i64>,
    pub(crate) offsets: Vec<i64>,
    pub(crate) stats: Stats,
    pub(crate) key: &'a [u8],
    pub(crate) now_ns: i64,
    pub(crate) max_size: usize,
    pub(crate) truncate: bool,
    pub(crate) time_of: &'a Bound<'py, PyAny>,
}

impl<'a, 'py> Walk<'a, 'py> {
    pub(crate) fn new(
        block_len: usize,
        key: &'a [u8],
        now_ns: i64,
        max_size: usize,
        truncate: bool,
        time_of: &'a Bound<'py, PyAny>,
    ) -> Self {
        Walk {
            out: Vec::with_capacity(block_len + block_len / 2),
            times: Vec::with_capacity(block_len / 64),
            offsets: Vec::with_capacity(block_len / 64),
            stats: Stats::default(),
            key,
            now_ns,
            max_size,
            truncate,
            time_of,
        }
    }

    /// Lossy text of `data`, escaped into the output (invalid UTF-8 counted).
    pub(crate) fn text(&mut self, data: &[u8]) {
        match std::str::from_utf8(data) {
            Ok(_) => escape_json_into(&mut self.out, data, b"\""),
            Err(_) => {
                self.stats.bad_utf8 += 1;
                let decoded = String::from_utf8_lossy(data);
                escape_json_into(&mut self.out, decoded.as_bytes(), b"\"");
            }
        }
    }

    pub(crate) fn time(&mut self, stamp: &[u8]) -> PyResult<i64> {
        let found = match fast_time(stamp) {
            Some(found) => found,
            None => self
                .time_of
                .call1((PyBytes::new(self.time_of.py(), stamp),))?
                .extract::<Option<i64>>()?,
        };
        Ok(found.unwrap_or_else(|| {
            self.stats.bad_times += 1;
            self.now_ns
        }))
    }

    fn record(&mut self, time_text: &[u8], stream: usize, text: &[u8], time_ns: i64, offset: i64) {
        self.out.extend_from_slice(b"{\"time\":\"");
        escape_json_into(&mut self.out, time_text, b"\"");
        self.out.extend_from_slice(b"\",\"stream\":\"");
        self.out.extend_from_slice(STREAMS[stream]);
        self.out.extend_from_slice(b"\",\"_p\":\"F\",");
        self.out.extend_from_slice(self.key);
        self.text(text);
        self.out.extend_from_slice(b"\"}\n");
        self.times.push(time_ns);
        self.offsets.push(offset);
    }

    /// The `max_size` rules for a message whole in its line: None when it is skipped (counted).
    pub(crate) fn whole<'m>(&mut self, message: &'m [u8]) -> Option<&'m [u8]> {
        if message.len() <= self.max_size {
            return Some(message);
        }
        if !self.truncate {
            self.stats.long_skipped += 1;
            return None;
        }
        self.stats.long_truncated += 1;
        Some(cut(message, self.max_size))
    }

    /// A piece onto its stream's pending message (`open`; a new one from `first` when none is):
    /// the message when `last` finished it, None while it stays open.
    pub(crate) fn piece(
        &mut self,
        open: &mut Option<Pending>,
        first: impl FnOnce(&mut Self) -> PyResult<Pending>,
        piece: &[u8],
        last: bool,
    ) -> PyResult<Option<Pending>> {
        let mut entry = match open.take() {
            Some(entry) => entry,
            None => first(self)?,
        };
        self.add(&mut entry, piece);
        if last {
            return Ok(Some(entry));
        }
        *open = Some(entry);
        Ok(None)
    }

    /// `_add`: a piece onto a pending message, within `max_size`.
    pub(crate) fn add(&self, entry: &mut Pending, piece: &[u8]) {
        if entry.over {
            return;
        }
        entry.size += piece.len();
        if entry.size > self.max_size {
            entry.over = true;
            if self.truncate {
                let keep = piece.len() - (entry.size - self.max_size);
                entry.data.extend_from_slice(cut(piece, keep));
            }
            return;
        }
        entry.data.extend_from_slice(piece);
    }

    /// `_finish`: the message's record, unless it grew past the limit and is skipped.
    fn finish(&mut self, entry: Pending, stream: usize) {
        if entry.over {
            if !self.truncate {
                self.stats.long_skipped += 1;
                return;
            }
            self.stats.long_truncated += 1;
        }
        self.record(
            entry.time_text.as_bytes(),
            stream,
            &entry.data,
            entry.time_ns,
            entry.start,
        );
    }
}

/// The three fields and the message of a CRI line: (stamp, stream index, is F, message).
fn slice(line: &[u8]) -> Option<(&[u8], usize, bool, &[u8])> {
    let first = memchr::memchr(b' ', line)?;
    let rest = &line[first + 1..];
    let second = memchr::memchr(b' ', rest)?;
    let stream = STREAMS.iter().position(|s| *s == &rest[..second])?;
    let rest = &rest[second + 1..];
    let (flag, message) = match memchr::memchr(b' ', rest) {
        Some(third) => (&rest[..third], &rest[third + 1..]),
        None => (rest, &b""[..]),
    };
    let full = match flag {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    Some((&line[..first], stream, full, message))
}

/// The block's non-empty lines, each with its offset in the file (`start`: the block's own).
pub(crate) fn lines_at(block: &[u8], start: i64) -> impl Iterator<Item = (i64, &[u8])> {
    let mut position = start;
    block_lines(block).filter_map(move |line| {
        let at = position;
        position += line.len() as i64 + 1;
        (!line.is_empty()).then_some((at, line))
    })
}

/// A block of CRI lines (newline-terminated, whole lines from file offset `start`) through the
/// joiner, from and back to the pending messages. `key_prefix` is `"<key>":"` as orjson
/// writes the key; `now_ns` the time of bad lines and bad times; `time_of(stamp)` Python's
/// time for a stamp not decided here (int or None).
///
/// With `decline_json`, a line starting with `{` (a docker document under `docker, cri`) makes it
/// return None: the block is the record path's.
///
/// Returns `(data, times, offsets, count, pending, stats)`: the finished records' JSON lines,
/// each one's time and first piece's file offset (int64, native order), the pending messages
/// at the end (as given in), and `(bad_lines, bad_times, bad_utf8, long_skipped,
/// long_truncated)`.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
#[pyfunction]
#[pyo3(signature = (block, start, key_prefix, max_size, truncate, now_ns, pending, time_of, decline_json=false))]
pub fn cri_join<'py>(
    py: Python<'py>,
    block: &[u8],
    start: i64,
    key_prefix: &[u8],
    max_size: usize,
    truncate: bool,
    now_ns: i64,
    pending: Vec<PendingTuple<'py>>,
    time_of: &Bound<'py, PyAny>,
    decline_json: bool,
) -> PyResult<Option<JoinResult<'py>>> {
    let mut open = pending_in(pending);
    let mut walk = Walk::new(block.len(), key_prefix, now_ns, max_size, truncate, time_of);
    for (line_start, line) in lines_at(block, start) {
        if decline_json && line[0] == b'{' {
            return Ok(None); // `docker, cri`: a docker document, the record path's to decide
        }
        let Some((stamp, stream, full, message)) = slice(line) else {
            walk.stats.bad_lines += 1;
            walk.out.push(b'{');
            walk.out.extend_from_slice(key_prefix);
            walk.text(line);
            walk.out.extend_from_slice(b"\"}\n");
            walk.times.push(now_ns);
            walk.offsets.push(line_start);
            continue;
        };
        if full && open[stream].is_none() {
            let time_ns = walk.time(stamp)?;
            let Some(message) = walk.whole(message) else {
                continue;
            };
            if stamp.is_ascii() {
                walk.record(stamp, stream, message, time_ns, line_start);
            } else {
                walk.record(
                    ascii_text(stamp).as_bytes(),
                    stream,
                    message,
                    time_ns,
                    line_start,
                );
            }
            continue;
        }
        let first = |w: &mut Walk| Ok(Pending::new(line_start, ascii_text(stamp), w.time(stamp)?));
        if let Some(entry) = walk.piece(&mut open[stream], first, message, full)? {
            walk.finish(entry, stream);
        }
    }
    Ok(Some(walk.result(py, open)))
}

/// What a join returns to Python: the finished records' JSON lines, each one's time and first
/// piece's file offset (int64, native order), their count, the pending messages at the end (as
/// given in), and `(bad_lines, bad_times, bad_utf8, long_skipped, long_truncated)`.
pub(crate) type JoinResult<'py> = (
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    usize,
    Vec<PendingOut<'py>>,
    (usize, usize, usize, usize, usize),
);

/// The pending messages as Python gives them, by stream index.
pub(crate) fn pending_in(pending: Vec<PendingTuple<'_>>) -> [Option<Pending>; 2] {
    let mut open: [Option<Pending>; 2] = [None, None];
    for (stream, at, time_text, time_ns, data, size, over) in pending {
        if stream < 2 {
            open[stream] = Some(Pending {
                start: at,
                time_text,
                time_ns,
                data: data.as_bytes().to_vec(),
                size,
                over,
            });
        }
    }
    open
}

impl Walk<'_, '_> {
    /// The walk's output and the pending messages left, as Python takes them.
    pub(crate) fn result<'py>(
        self,
        py: Python<'py>,
        open: [Option<Pending>; 2],
    ) -> JoinResult<'py> {
        let walk = self;
        let left: Vec<PendingOut<'py>> = open
            .into_iter()
            .enumerate()
            .filter_map(|(stream, entry)| {
                entry.map(|e| {
                    (
                        stream,
                        e.start,
                        e.time_text,
                        e.time_ns,
                        PyBytes::new(py, &e.data),
                        e.size,
                        e.over,
                    )
                })
            })
            .collect();
        let count = walk.times.len();
        let as_bytes =
            |values: &[i64]| -> Vec<u8> { values.iter().flat_map(|v| v.to_ne_bytes()).collect() };
        let stats = &walk.stats;
        (
            PyBytes::new(py, &walk.out),
            PyBytes::new(py, &as_bytes(&walk.times)),
            PyBytes::new(py, &as_bytes(&walk.offsets)),
            count,
            left,
            (
                stats.bad_lines,
                stats.bad_times,
                stats.bad_utf8,
                stats.long_skipped,
                stats.long_truncated,
            ),
        )
    }
}
