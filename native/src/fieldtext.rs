//! The `file` output's field formats (`csv`, `ltsv`, `template`) written straight from a block
//! of JSON lines and its times, with no Python object per line or per field.
//!
//! Why: these formats need each top-level value as text, so the Python path decodes every line
//! with orjson and formats each field in Python (about 10 us a line: 3.4x the `plain` output on
//! audit lines). Here one walk over each line writes the same bytes.
//!
//! Byte-identical to `kubetrail/sinks/file.py` (`_format_csv`, `_format_ltsv`,
//! `_format_template`), which remains the reference: a string value is its decoded text, any
//! other value is what `orjson.dumps` writes for it. This walk re-encodes nested values the way
//! orjson does (compact, its escapes) and leaves to Python, line by line, whatever it cannot be
//! sure to write identically: a float (orjson's shortest repr is not reproduced here), an
//! integer outside 64 bits or `-0`, a repeated key (orjson keeps the first position with the
//! last value), a lone surrogate, a line that is not an object or not valid UTF-8. Those lines
//! are reported with the position their text belongs at, and Python splices them in.

use std::borrow::Cow;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::block_lines;
use crate::jsonesc::escape_json_into;

const CSV: u8 = 0;
const LTSV: u8 = 1;
const TEMPLATE: u8 = 2;

/// A line this walk does not write (Python's formatter does).
struct Slow;

type Walk<T> = Result<T, Slow>;

/// A cursor over one line that is expected to be valid JSON.
struct Cursor<'a> {
    s: &'a [u8],
    at: usize,
    /// Whether the line has a control byte at all (then each string is checked for a raw one,
    /// which JSON does not allow; most lines have none, and skip that check).
    controls: bool,
    /// How a `"` of the JSON text is written: itself, or doubled inside a csv field.
    quote: &'static [u8],
}

impl<'a> Cursor<'a> {
    fn ws(&mut self) {
        while self.at < self.s.len() && matches!(self.s[self.at], b' ' | b'\t' | b'\r' | b'\n') {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Walk<()> {
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(Slow)
        }
    }

    fn hex4(&mut self) -> Walk<u32> {
        let digits = self.s.get(self.at..self.at + 4).ok_or(Slow)?;
        let mut value = 0u32;
        for &d in digits {
            value = value * 16 + (d as char).to_digit(16).ok_or(Slow)?;
        }
        self.at += 4;
        Ok(value)
    }

    /// The string at the cursor (its opening quote), decoded: borrowed when it has no escape.
    fn string(&mut self) -> Walk<Cow<'a, [u8]>> {
        self.expect(b'"')?;
        let start = self.at;
        let found = memchr::memchr2(b'"', b'\\', &self.s[start..]).ok_or(Slow)?;
        let mut at = start + found;
        if self.s[at] == b'"' {
            let raw = &self.s[start..at];
            if self.controls && raw.iter().any(|&b| b < 0x20) {
                return Err(Slow); // not valid JSON: the reference decoder decides
            }
            self.at = at + 1;
            return Ok(Cow::Borrowed(raw));
        }
        let mut out: Vec<u8> = self.s[start..at].to_vec();
        loop {
            let byte = *self.s.get(at).ok_or(Slow)?;
            match byte {
                b'"' => {
                    // Escapes are a backslash and printable bytes: any control byte in the
                    // span is a raw one, which is not valid JSON.
                    if self.s[start..at].iter().any(|&b| b < 0x20) {
                        return Err(Slow);
                    }
                    self.at = at + 1;
                    return Ok(Cow::Owned(out));
                }
                b'\\' => {
                    let escape = *self.s.get(at + 1).ok_or(Slow)?;
                    at += 2;
                    match escape {
                        b'"' => out.push(b'"'),
                        b'\\' => out.push(b'\\'),
                        b'/' => out.push(b'/'),
                        b'b' => out.push(0x08),
                        b'f' => out.push(0x0c),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            self.at = at;
                            let mut code = self.hex4()?;
                            if (0xD800..0xDC00).contains(&code) {
                                // A high surrogate must be followed by an escaped low one.
                                if self.s.get(self.at..self.at + 2) != Some(b"\\u") {
                                    return Err(Slow);
                                }
                                self.at += 2;
                                let low = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&low) {
                                    return Err(Slow);
                                }
                                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                            } else if (0xDC00..0xE000).contains(&code) {
                                return Err(Slow);
                            }
                            let ch = char::from_u32(code).ok_or(Slow)?;
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                            at = self.at;
                        }
                        _ => return Err(Slow),
                    }
                }
                _ => {
                    let next = memchr::memchr2(b'"', b'\\', &self.s[at..]).ok_or(Slow)?;
                    out.extend_from_slice(&self.s[at..at + next]);
                    at += next;
                }
            }
        }
    }

    /// An integer as orjson writes it after decoding (the same digits when within 64 bits);
    /// Slow for a float, `-0`, or a wider integer.
    fn number(&mut self) -> Walk<&'a [u8]> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        let digits = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        let count = self.at - digits;
        if count == 0 || count > 20 || matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return Err(Slow);
        }
        let text = &self.s[start..self.at];
        if (count > 1 && self.s[digits] == b'0') || text == b"-0" {
            return Err(Slow);
        }
        let magnitude: u128 = std::str::from_utf8(&self.s[digits..self.at])
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or(Slow)?;
        let fits = if digits > start {
            magnitude <= 1u128 << 63
        } else {
            magnitude <= u64::MAX as u128
        };
        if !fits {
            return Err(Slow);
        }
        Ok(text)
    }

    fn literal(&mut self, word: &'static [u8]) -> Walk<&'static [u8]> {
        if self.s.get(self.at..self.at + word.len()) == Some(word) {
            self.at += word.len();
            Ok(word)
        } else {
            Err(Slow)
        }
    }

    /// The value at the cursor written as orjson writes it into `out` (None: only skipped,
    /// where its text is not needed, so a float there does not matter).
    fn json_value(&mut self, out: &mut Option<&mut Vec<u8>>, depth: usize) -> Walk<()> {
        if depth > 200 {
            return Err(Slow);
        }
        match self.peek().ok_or(Slow)? {
            b'"' => {
                let text = self.string()?;
                if let Some(out) = out {
                    write_string(out, &text, self.quote);
                }
            }
            b'{' => {
                self.at += 1;
                push(out, b"{");
                if !self.empty(b'}') {
                    // A key repeated in a nested object: orjson's dict keeps its first place
                    // with the last value, so the text is Python's to write. Only checked where
                    // the text is written; no allocation for objects of one member.
                    let mut keys: Vec<Cow<'a, [u8]>> = Vec::new();
                    loop {
                        self.ws();
                        let key = self.string()?;
                        if let Some(out) = out {
                            if keys.contains(&key) {
                                return Err(Slow);
                            }
                            write_string(out, &key, self.quote);
                            keys.push(key);
                        }
                        self.ws();
                        self.expect(b':')?;
                        push(out, b":");
                        self.ws();
                        self.json_value(out, depth + 1)?;
                        if !self.next_item(out, b'}')? {
                            break;
                        }
                    }
                }
                push(out, b"}");
            }
            b'[' => {
                self.at += 1;
                push(out, b"[");
                if !self.empty(b']') {
                    loop {
                        self.ws();
                        self.json_value(out, depth + 1)?;
                        if !self.next_item(out, b']')? {
                            break;
                        }
                    }
                }
                push(out, b"]");
            }
            b't' => push(out, self.literal(b"true")?),
            b'f' => push(out, self.literal(b"false")?),
            b'n' => push(out, self.literal(b"null")?),
            b'-' | b'0'..=b'9' => {
                if out.is_some() {
                    let text = self.number()?;
                    push(out, text);
                } else {
                    self.skip_number();
                }
            }
            _ => return Err(Slow),
        }
        Ok(())
    }

    /// Just past an opening bracket: true, and past `close` too, when the container is empty.
    fn empty(&mut self, close: u8) -> bool {
        self.ws();
        let empty = self.peek() == Some(close);
        if empty {
            self.at += 1;
        }
        empty
    }

    /// After a member or an element: a `,` (written to `out`; true: another follows) or the
    /// container's `close` (consumed, not written; false). Anything else is Python's.
    fn next_item(&mut self, out: &mut Option<&mut Vec<u8>>, close: u8) -> Walk<bool> {
        self.ws();
        match self.peek() {
            Some(b',') => {
                self.at += 1;
                push(out, b",");
                Ok(true)
            }
            Some(byte) if byte == close => {
                self.at += 1;
                Ok(false)
            }
            _ => Err(Slow),
        }
    }

    fn skip_number(&mut self) {
        while matches!(
            self.peek(),
            Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
        ) {
            self.at += 1;
        }
    }

    /// A top-level value as Python's `_text` gives it: a string's own text, else orjson's.
    fn text_value(&mut self, out: &mut Vec<u8>) -> Walk<()> {
        if self.peek() == Some(b'"') {
            let text = self.string()?;
            out.extend_from_slice(&text);
            Ok(())
        } else {
            self.json_value(&mut Some(out), 0)
        }
    }

    /// Walks the top-level object, calling `member(key, cursor)` with the cursor at each value;
    /// the callback must consume the value.
    fn members(
        &mut self,
        mut member: impl FnMut(Cow<'a, [u8]>, &mut Self) -> Walk<()>,
    ) -> Walk<()> {
        self.ws();
        self.expect(b'{')?;
        if !self.empty(b'}') {
            loop {
                self.ws();
                let key = self.string()?;
                self.ws();
                self.expect(b':')?;
                self.ws();
                member(key, self)?;
                if !self.next_item(&mut None, b'}')? {
                    break;
                }
            }
        }
        self.ws();
        if self.at != self.s.len() {
            return Err(Slow);
        }
        Ok(())
    }
}

fn push(out: &mut Option<&mut Vec<u8>>, piece: &[u8]) {
    if let Some(out) = out {
        out.extend_from_slice(piece);
    }
}

/// A decoded string as orjson writes it, each `"` written as `quote`. A borrowed one had no
/// escape and no control byte in the input, so nothing in it needs escaping: copied whole
/// (most strings: the fast path).
fn write_string(out: &mut Vec<u8>, text: &Cow<'_, [u8]>, quote: &[u8]) {
    match text {
        Cow::Borrowed(raw) => {
            out.extend_from_slice(quote);
            out.extend_from_slice(raw);
            out.extend_from_slice(quote);
        }
        Cow::Owned(decoded) => {
            out.extend_from_slice(quote);
            escape_json_into(out, decoded, quote);
            out.extend_from_slice(quote);
        }
    }
}

/// `SECONDS.NNNNNNNNN`, as `kubetrail.core.dates.epoch_text` (floor division for negatives).
fn write_epoch(out: &mut Vec<u8>, t: i64) {
    let (secs, nanos) = (t.div_euclid(1_000_000_000), t.rem_euclid(1_000_000_000));
    out.extend_from_slice(secs.to_string().as_bytes());
    out.extend_from_slice(format!(".{nanos:09}").as_bytes());
}

/// Output gathered before each write (fits in the caches; one write per ~1,000 audit lines).
const CHUNK: usize = 1 << 20;

fn paired_lines<'a>(block: &'a [u8], times: &[u8]) -> PyResult<Vec<&'a [u8]>> {
    let lines: Vec<&[u8]> = block_lines(block).collect();
    if times.len() != lines.len() * 8 {
        return Err(PyValueError::new_err("one time per line"));
    }
    Ok(lines)
}

fn time_at(times: &[u8], i: usize) -> i64 {
    i64::from_ne_bytes(times[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
}

/// One piece of a compiled template: literal text, or the index of a placeholder's key.
enum Piece {
    Text(Vec<u8>),
    Key(usize),
}

/// A `file` output's `csv`, `ltsv` or `template` writer, built once per output.
#[pyclass(module = "kubetrail_native", frozen)]
pub struct FieldsWriter {
    kind: u8,
    delimiter: u8,
    label_delimiter: Vec<u8>,
    pieces: Vec<Piece>,
    keys: Vec<Vec<u8>>,
    /// Which of `keys` is `time` (filled with the record's time when the line has no `time`).
    time_key: Option<usize>,
}

/// Per-call buffers, reused from line to line (no allocation per line).
#[derive(Default)]
struct Scratch {
    /// The keys seen on this line (csv/ltsv: a repeated one goes to Python), as spans of `keys`.
    keys: Vec<u8>,
    spans: Vec<(usize, usize)>,
    /// A cheap filter in front of the spans: one bit per key's hash.
    mask: u64,
    /// Template: each placeholder's value text, as spans of `text`.
    text: Vec<u8>,
    slots: Vec<Option<(usize, usize)>>,
}

impl Scratch {
    /// Whether `key` was seen on this line already; remembers it.
    fn repeated(&mut self, key: &[u8]) -> bool {
        let hash = key.iter().fold(key.len() as u64, |h, &b| {
            h.wrapping_mul(31).wrapping_add(b as u64)
        });
        let bit = 1u64 << (hash % 64);
        if self.mask & bit != 0 && self.spans.iter().any(|&(a, b)| &self.keys[a..b] == key) {
            return true;
        }
        self.mask |= bit;
        let start = self.keys.len();
        self.keys.extend_from_slice(key);
        self.spans.push((start, self.keys.len()));
        false
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.spans.clear();
        self.mask = 0;
        self.text.clear();
        self.slots.iter_mut().for_each(|slot| *slot = None);
    }
}

impl FieldsWriter {
    fn line(&self, line: &[u8], t: i64, out: &mut Vec<u8>, scratch: &mut Scratch) -> Walk<()> {
        if std::str::from_utf8(line).is_err() {
            return Err(Slow);
        }
        let controls = line.iter().fold(false, |seen, &b| seen | (b < 0x20));
        let mut cursor = Cursor {
            s: line,
            at: 0,
            controls,
            quote: b"\"",
        };
        scratch.clear();
        match self.kind {
            CSV => {
                write_epoch(out, t);
                cursor.members(|key, cursor| {
                    if scratch.repeated(&key) {
                        return Err(Slow); // a repeated key: orjson's dict decides its place
                    }
                    out.push(self.delimiter);
                    out.push(b'"');
                    if cursor.peek() == Some(b'"') {
                        match cursor.string()? {
                            // No quote in a string without escapes: its bytes are the field.
                            Cow::Borrowed(raw) => out.extend_from_slice(raw),
                            Cow::Owned(text) => double_quotes(out, &text),
                        }
                    } else {
                        cursor.quote = b"\"\"";
                        let done = cursor.json_value(&mut Some(&mut *out), 0);
                        cursor.quote = b"\"";
                        done?;
                    }
                    out.push(b'"');
                    Ok(())
                })?;
            }
            LTSV => {
                out.extend_from_slice(b"time");
                out.extend_from_slice(&self.label_delimiter);
                write_epoch(out, t);
                // A tab (the default) never appears raw in JSON text.
                let visible = self.delimiter >= 0x20;
                cursor.members(|key, cursor| {
                    if scratch.repeated(&key) {
                        return Err(Slow);
                    }
                    out.push(self.delimiter);
                    out.extend_from_slice(&key);
                    out.extend_from_slice(&self.label_delimiter);
                    let mark = out.len();
                    // A decoded string may hold any delimiter (a tab from `\t`); JSON text only
                    // a visible one.
                    let mut replace = visible;
                    if cursor.peek() == Some(b'"') {
                        replace = true;
                        let text = cursor.string()?;
                        if memchr::memchr(b'\n', &text).is_some() {
                            for &b in text.iter() {
                                if b == b'\n' {
                                    out.extend_from_slice(b"\\n");
                                } else {
                                    out.push(b);
                                }
                            }
                        } else {
                            out.extend_from_slice(&text);
                        }
                    } else {
                        cursor.json_value(&mut Some(&mut *out), 0)?; // no raw newline in JSON
                    }
                    if replace {
                        for b in &mut out[mark..] {
                            if *b == self.delimiter {
                                *b = b' '; // the same length: replaced in place
                            }
                        }
                    }
                    Ok(())
                })?;
            }
            _ => {
                let mut has_time = false;
                cursor.members(|key, cursor| {
                    has_time |= key.as_ref() == b"time";
                    match self.keys.iter().position(|k| k.as_slice() == key.as_ref()) {
                        Some(index) => {
                            // A repeated key: the last value wins, as in orjson's dict.
                            let start = scratch.text.len();
                            cursor.text_value(&mut scratch.text)?;
                            scratch.slots[index] = Some((start, scratch.text.len()));
                            Ok(())
                        }
                        None => cursor.json_value(&mut None, 0),
                    }
                })?;
                for piece in &self.pieces {
                    match piece {
                        Piece::Text(text) => out.extend_from_slice(text),
                        Piece::Key(index) => match scratch.slots[*index] {
                            Some((a, b)) => out.extend_from_slice(&scratch.text[a..b]),
                            None if Some(*index) == self.time_key && !has_time => {
                                write_epoch(out, t)
                            }
                            None => {}
                        },
                    }
                }
            }
        }
        out.push(b'\n');
        Ok(())
    }
}

/// `text` with each `"` doubled (a csv field's inside).
fn double_quotes(out: &mut Vec<u8>, text: &[u8]) {
    let mut from = 0;
    for quote in memchr::memchr_iter(b'"', text) {
        out.extend_from_slice(&text[from..=quote]);
        out.push(b'"');
        from = quote + 1;
    }
    out.extend_from_slice(&text[from..]);
}

#[pymethods]
impl FieldsWriter {
    /// `kind`: 0 csv, 1 ltsv, 2 template. `delimiter`: one ASCII byte. `template`: the
    /// template cut by its placeholders (Python's ``re.split`` with one group): literal text
    /// and key names alternating, starting and ending with text.
    #[new]
    #[pyo3(signature = (kind, delimiter=b",".to_vec(), label_delimiter=b":".to_vec(), template=Vec::new()))]
    fn new(
        kind: u8,
        delimiter: Vec<u8>,
        label_delimiter: Vec<u8>,
        template: Vec<Vec<u8>>,
    ) -> PyResult<Self> {
        if kind > TEMPLATE {
            return Err(PyValueError::new_err("kind: 0 csv, 1 ltsv, 2 template"));
        }
        let [delimiter] = delimiter[..] else {
            return Err(PyValueError::new_err(
                "the delimiter must be one ASCII character",
            ));
        };
        if !delimiter.is_ascii() || delimiter == b'\n' {
            return Err(PyValueError::new_err(
                "the delimiter must be one ASCII character",
            ));
        }
        let mut pieces = Vec::new();
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for (i, part) in template.into_iter().enumerate() {
            if i % 2 == 0 {
                pieces.push(Piece::Text(part));
            } else {
                let index = keys.iter().position(|k| *k == part).unwrap_or_else(|| {
                    keys.push(part);
                    keys.len() - 1
                });
                pieces.push(Piece::Key(index));
            }
        }
        let time_key = keys.iter().position(|k| k.as_slice() == b"time");
        Ok(Self {
            kind,
            delimiter,
            label_delimiter,
            pieces,
            keys,
            time_key,
        })
    }

    /// The lines of ``block`` (newline-terminated JSON objects) with their ``times`` (an int64
    /// per line, native-endian) in this format, written to the file descriptor ``fd`` from
    /// line ``first`` on, through a
    /// small buffer that is reused (no output buffer as large as the input: on this VM, filling
    /// 266 MB of fresh memory costs more than writing it), without the GIL. Stops before the
    /// first line left to Python and returns its index (None: all written); the caller writes
    /// that line's text and calls again from the next line. ValueError when lines and times
    /// do not pair up; OSError as the OS reports it.
    fn write(
        &self,
        py: Python<'_>,
        fd: i32,
        block: &[u8],
        times: &[u8],
        first: usize,
    ) -> PyResult<Option<usize>> {
        use std::io::Write;
        use std::os::fd::FromRawFd;

        let lines = paired_lines(block, times)?;
        py.detach(|| {
            // SAFETY: the descriptor belongs to the caller's open file; ManuallyDrop never
            // closes it.
            let mut file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
            let mut out: Vec<u8> = Vec::with_capacity(CHUNK + CHUNK / 4);
            let mut scratch = Scratch {
                slots: vec![None; self.keys.len()],
                ..Scratch::default()
            };
            let mut stop = None;
            for (i, line) in lines.iter().enumerate().skip(first) {
                let mark = out.len();
                if self
                    .line(line, time_at(times, i), &mut out, &mut scratch)
                    .is_err()
                {
                    out.truncate(mark);
                    stop = Some(i);
                    break;
                }
                if out.len() >= CHUNK {
                    file.write_all(&out)?;
                    out.clear();
                }
            }
            file.write_all(&out)?;
            Ok(stop)
        })
        .map_err(|e: std::io::Error| PyErr::from(e))
    }
}
