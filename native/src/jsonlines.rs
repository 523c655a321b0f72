//! A `json` parser's block of lines in one call: validated, each line's time taken from its raw
//! bytes, and `time_key` cut out of the bytes when `time_keep` is off, with no Python object
//! per line.
//!
//! Why: a user-defined `[PARSER] format json` with `time_key` and `time_keep off` (the usual
//! Fluent Bit config) had to decode every line into a dict to delete one key and encode it
//! again (about 15 us a line). Cutting the member out of the original bytes gives the same
//! record; what stays in Python is only what this scan cannot decide (see `scan`).
//!
//! Validation, without `members`, is not done here: the caller has msgspec decode the block
//! first (one C call, strict JSON; UTF-8 checked beside it), which measured three times faster
//! than sonic-rs's strict lazy object iterator on audit lines. On a block known to be valid,
//! finding a top-level member is a structural walk: strings skipped with memchr, brackets
//! counted, everything else ignored.
//!
//! Without `members`, a line is not walked whole: the key's quoted text is found with memmem
//! and, when it is there once, only the top-level members between it and the nearer end of the
//! line are walked to learn whether it is a top-level key (`locate`). An audit line's
//! `stageTimestamp` is its second last member, so this walks about 150 of its 900 bytes. A key
//! found twice, or a `\uXXXX` escape that might spell one of its bytes, takes the whole walk.
//!
//! With `members=True` (a `csv`/`ltsv`/`template` file output asked, see
//! `kubetrail/core/block.py`) the same walk keeps each line's top-level member spans for
//! `fieldtext::FieldsWriter` (`LineMembers`), so that writer does not walk the line again; a
//! container is then skipped by the writer's compactness check instead of a bracket count (one
//! walk either way), and strings are found by its inlined 16-byte search. Since that walk
//! touches every byte, it also checks each line strictly as it goes (`Members::valid`, reported
//! as `LineMembers.validated`), and the caller skips msgspec's pass when it vouches for every
//! line: the `csv` and `ltsv` outputs went from 1.25x to 1.03x `plain`'s CPU (issue 18). The
//! scan therefore runs on blocks nobody validated yet, and must never fail on any bytes.

use memchr::memmem;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::fieldtext::{compact_end, key_bit, printable_ascii, string_end};
use crate::timefmt::{Compiled, TimeFormat};
use crate::{block_lines, new_bytes_filled};

/// `Member::flags`: the key has an escape (the writer decodes it).
pub(crate) const KEY_ESCAPED: u8 = 1;
/// `Member::flags`: the value is a string with an escape (else a string is its raw text).
pub(crate) const VALUE_ESCAPED: u8 = 2;
/// `Member::flags`: the value is an object or array written exactly as orjson writes it after
/// decoding (`fieldtext::compact_end`): copied whole, never walked again.
pub(crate) const COMPACT: u8 = 4;
/// `Member::flags`: the key is spelled as an earlier key of its line (a repeated key).
pub(crate) const REPEATED: u8 = 8;

/// One top-level member of a scanned line, as offsets into the line of the scan's output (after
/// any cut): the key's opening quote, past its closing quote, the value's first byte and past
/// its last. What `fieldtext::FieldsWriter` needs to write a line without walking it again.
#[derive(Clone, Copy)]
pub(crate) struct Member {
    pub(crate) key: u32,
    pub(crate) key_end: u32,
    pub(crate) value: u32,
    pub(crate) value_end: u32,
    pub(crate) flags: u8,
}

/// Every line's top-level members, kept by `JsonLinesScanner.scan(..., members=True)` for the
/// block it returned (`data`): the side buffer that lets the `file` output's `csv`, `ltsv` and
/// `template` writer skip its own walk of each line (see fieldtext.rs). The writer relies on
/// the block being valid (UTF-8, no raw control byte in a string, no bad escape): either this
/// walk found every line so (`validated`) or the caller had msgspec validate the block.
#[pyclass(module = "kubetrail_native", frozen)]
pub struct LineMembers {
    /// The block the offsets are of (the writer refuses any other).
    pub(crate) data: Py<PyBytes>,
    pub(crate) members: Vec<Member>,
    /// Line i's members are `members[starts[i]..starts[i + 1]]`.
    pub(crate) starts: Vec<u32>,
    /// Whether the walk that found the members found every line strictly valid JSON that
    /// orjson decodes too (see `Members::valid`): the caller need not validate the block.
    #[pyo3(get)]
    pub(crate) validated: bool,
}

#[pymethods]
impl LineMembers {
    /// The number of lines.
    fn __len__(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    /// Line ``index``'s members as ``(key start, key end, value start, value end, flags)``,
    /// offsets into the line (for tests and debugging; the writer reads them natively).
    fn line(&self, index: usize) -> PyResult<Vec<(u32, u32, u32, u32, u8)>> {
        let (Some(&a), Some(&b)) = (self.starts.get(index), self.starts.get(index + 1)) else {
            return Err(pyo3::exceptions::PyIndexError::new_err(
                "line index out of range",
            ));
        };
        Ok(self.members[a as usize..b as usize]
            .iter()
            .map(|m| (m.key, m.key_end, m.value, m.value_end, m.flags))
            .collect())
    }
}

/// One line's result in the first pass.
struct Line {
    start: usize,
    end: usize,
    /// Bytes to leave out (relative to the block), when the key's member is cut.
    cut: Option<(usize, usize)>,
}

#[pyclass(module = "kubetrail_native", frozen)]
pub struct JsonLinesScanner {
    key: String,
    remove: bool,
    format: TimeFormat,
    /// `"key"` with its quotes, when `locate` may be used for this key (`plain_key`). Boxed:
    /// the finder holds AVX2 vectors that need 32-byte alignment, and a Python object's memory
    /// has 16 (unboxed, its aligned loads crashed).
    quoted: Option<Box<memmem::Finder<'static>>>,
}

/// A key `locate` may look for: bytes no JSON escape but `\uXXXX` can write, so a line spells
/// it some other way only with a `\u` escape (which `escape_may_spell` looks for).
fn plain_key(key: &[u8]) -> bool {
    !key.is_empty()
        && key
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.@$:".contains(b))
}

/// Whether a `\uXXXX` in the line might write one of the key's bytes: then the key might be
/// written with escapes, which only the whole walk notices. `\\u0074` (an escaped backslash
/// and text) counts too, which only sends the line to the whole walk.
fn escape_may_spell(line: &[u8], key: &[u8]) -> bool {
    // memchr, not memmem::find_iter: that builds a searcher per call, which cost more here.
    memchr::memchr_iter(b'\\', line).any(|at| {
        if line.get(at + 1) != Some(&b'u') {
            return false;
        }
        let hex = line.get(at + 2..at + 6).unwrap_or_default();
        match std::str::from_utf8(hex).map(|text| u32::from_str_radix(text, 16)) {
            Ok(Ok(code)) => code < 128 && key.contains(&(code as u8)),
            _ => true,
        }
    })
}

/// Whether a key written as `name` (raw, between its quotes) might be `key` once its escapes are
/// decoded: the same rule for the whole walk and `locate`, so that both take the same lines.
fn escaped_name_may_spell(name: &[u8], key: &[u8]) -> bool {
    name.contains(&b'\\') && (!plain_key(key) || escape_may_spell(name, key))
}

/// The opening quote of the string whose closing quote is at `close`: the nearest quote before
/// it that no backslash escapes (an odd run of backslashes before a quote escapes it; outside
/// strings a valid line has no backslash).
fn string_start_back(line: &[u8], close: usize) -> Option<usize> {
    let mut before = close;
    loop {
        let quote = memchr::memrchr(b'"', &line[..before])?;
        let mut run = quote;
        while run > 0 && line[run - 1] == b'\\' {
            run -= 1;
        }
        if (quote - run) % 2 == 0 {
            return Some(quote);
        }
        before = quote;
    }
}

/// The first byte of the value whose last byte is at `end - 1`, in a line known to be valid
/// JSON: `skip_value` read backwards.
fn value_start_back(line: &[u8], end: usize) -> Option<usize> {
    match *line.get(end.checked_sub(1)?)? {
        b'"' => string_start_back(line, end - 1),
        b'}' | b']' => {
            let mut depth = 0usize;
            let mut i = end;
            while i > 0 {
                i -= 1;
                match line[i] {
                    b'"' => i = string_start_back(line, i)?,
                    b'}' | b']' => depth += 1,
                    b'{' | b'[' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i);
                        }
                    }
                    _ => {}
                }
            }
            None
        }
        _ => {
            let mut i = end;
            while i > 0
                && !matches!(
                    line[i - 1],
                    b':' | b',' | b'[' | b'{' | b' ' | b'\t' | b'\r' | b'\n'
                )
            {
                i -= 1;
            }
            Some(i)
        }
    }
}

/// Whether the quote at `quote` opens a top-level key, walking the top-level members from the
/// object's `{` at `open` forwards until it is passed: that key's value start, or None (the
/// quote is inside some member's value).
fn key_value_forward(line: &[u8], open: usize, quote: usize) -> Result<Option<usize>, ()> {
    let mut at = open + 1;
    loop {
        at = skip_ws_forward(line, at);
        if line.get(at) != Some(&b'"') {
            return Ok(None); // the object's end
        }
        let key_end = skip_string(line, at).ok_or(())?;
        let colon = skip_ws_forward(line, key_end);
        if line.get(colon) != Some(&b':') {
            return Err(());
        }
        let value = skip_ws_forward(line, colon + 1);
        if at == quote {
            return Ok(Some(value));
        }
        let value_end = skip_value(line, value).ok_or(())?;
        if value_end > quote {
            return Ok(None);
        }
        at = skip_ws_forward(line, value_end);
        match line.get(at) {
            Some(b',') => at += 1,
            _ => return Ok(None),
        }
    }
}

/// `key_value_forward` from the line's end: the top-level members walked backwards from the
/// closing `}` until the quote is reached or passed.
fn key_value_backward(line: &[u8], quote: usize) -> Result<Option<usize>, ()> {
    let close = skip_ws_back(line, line.len());
    if close == 0 || line[close - 1] != b'}' {
        return Err(());
    }
    let mut delimiter = close - 1; // the `}`, then each `,` between members
    loop {
        let value_end = skip_ws_back(line, delimiter);
        if value_end == 0 {
            return Err(());
        }
        if line[value_end - 1] == b'{' {
            return Ok(None); // the object's start
        }
        let value = value_start_back(line, value_end).ok_or(())?;
        if value <= quote {
            return Ok(None); // inside this value, or this value is the quoted text
        }
        let colon = skip_ws_back(line, value);
        if colon == 0 || line[colon - 1] != b':' {
            return Err(());
        }
        let key_end = skip_ws_back(line, colon - 1);
        if key_end == 0 || line[key_end - 1] != b'"' {
            return Err(());
        }
        let key = string_start_back(line, key_end - 1).ok_or(())?;
        if key <= quote {
            return Ok((key == quote).then_some(value));
        }
        let before = skip_ws_back(line, key);
        match before.checked_sub(1).map(|at| line[at]) {
            Some(b',') => delimiter = before - 1,
            _ => return Ok(None),
        }
    }
}

/// The top-level member `key` of an object line that msgspec has validated, found without
/// walking the whole line (see the module's docs): `Some(Ok(Some((value start, value end))))`,
/// `Some(Ok(None))` when the key is not a top-level member, `Some(Err(()))` when the line is
/// not an object; None when `scan_line`'s whole walk must decide (the quoted key found twice,
/// or a `\u` escape that might spell it).
fn locate(
    line: &[u8],
    key: &[u8],
    quoted: &memmem::Finder<'_>,
) -> Option<Result<Option<(usize, usize)>, ()>> {
    let open = skip_ws_forward(line, 0);
    if line.get(open) != Some(&b'{') {
        return Some(Err(()));
    }
    if escape_may_spell(line, key) {
        return None;
    }
    let Some(quote) = quoted.find(line) else {
        return Some(Ok(None));
    };
    if quoted.find(&line[quote + 1..]).is_some() {
        return None;
    }
    let value = if quote < line.len() / 2 {
        key_value_forward(line, open, quote)
    } else {
        key_value_backward(line, quote)
    };
    Some(value.and_then(|found| match found {
        Some(start) => Ok(Some((start, skip_value(line, start).ok_or(())?))),
        None => Ok(None),
    }))
}

fn skip_ws_forward(line: &[u8], mut at: usize) -> usize {
    while at < line.len() && line[at].is_ascii_whitespace() {
        at += 1;
    }
    at
}

fn skip_ws_back(line: &[u8], mut at: usize) -> usize {
    while at > 0 && line[at - 1].is_ascii_whitespace() {
        at -= 1;
    }
    at
}

/// Where the member `"key": value` starts, given the value's start; None when the key is not
/// written as its plain text (escapes), which the caller leaves to the reference decoder.
fn member_start(line: &[u8], value_start: usize, key: &[u8]) -> Option<usize> {
    let colon = skip_ws_back(line, value_start);
    if colon == 0 || line[colon - 1] != b':' {
        return None;
    }
    let quote = skip_ws_back(line, colon - 1);
    if quote == 0 || line[quote - 1] != b'"' {
        return None;
    }
    let key_end = quote - 1;
    let key_start = key_end.checked_sub(key.len())?;
    if key_start == 0 || line[key_start - 1] != b'"' || &line[key_start..key_end] != key {
        return None;
    }
    Some(key_start - 1)
}

/// The bytes to cut so that the member `[member, value_end)` is gone and the object stays valid.
fn cut_span(line: &[u8], member: usize, value_end: usize) -> (usize, usize) {
    let after = skip_ws_forward(line, value_end);
    if line.get(after) == Some(&b',') {
        return (member, skip_ws_forward(line, after + 1));
    }
    let before = skip_ws_back(line, member);
    if before > 0 && line[before - 1] == b',' {
        return (before - 1, value_end);
    }
    (member, value_end)
}

/// The end of the JSON string whose opening quote is at `at` (the index after its closing quote).
fn skip_string(line: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    loop {
        let found = memchr::memchr2(b'"', b'\\', &line[i..])?;
        i += found;
        if line[i] == b'\\' {
            i += 2; // the escaped character, whatever it is
            continue;
        }
        return Some(i + 1);
    }
}

/// The end of the value starting at `at` (after whitespace), in a line already known to be
/// valid JSON: strings are skipped whole, brackets counted, anything else runs to the next
/// `,` `}` `]` or whitespace.
fn skip_value(line: &[u8], at: usize) -> Option<usize> {
    match *line.get(at)? {
        b'"' => skip_string(line, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            while i < line.len() {
                match line[i] {
                    b'"' => {
                        i = skip_string(line, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let mut i = at;
            while i < line.len()
                && !matches!(line[i], b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n')
            {
                i += 1;
            }
            Some(i)
        }
    }
}

/// The members of the lines scanned so far (see `LineMembers`), collected during the scan.
struct Members {
    members: Vec<Member>,
    starts: Vec<u32>,
    /// The key spans of the nested objects open in `compact_end` (reused: no allocation).
    nested: Vec<(usize, usize)>,
    /// The line's raw keys so far as bits (`fieldtext::key_bit`): a repeated key is found here,
    /// while its bytes are in the cache, instead of by the writer.
    seen: [u64; 16],
    /// Whether every line so far is, as far as this walk can vouch, a JSON object that
    /// msgspec's strict decoder and orjson both take (see `valid_text`, `escapes_valid`,
    /// `scalar_valid`; a nested container is vouched for when it is compact). The walk touches
    /// every byte anyway, so checking as it goes spares the caller msgspec's pass over the
    /// block. It only ever says no when unsure: a line it does not vouch for (a float in a
    /// nested value, a surrogate escape, a tab between tokens, ...) sends the block to msgspec.
    valid: bool,
}

/// A line whose bytes are text JSON may hold as they are: UTF-8 with no control byte at all
/// (so no raw one in a string, and no whitespace but spaces between tokens).
fn valid_text(line: &[u8]) -> bool {
    printable_ascii(line)
        || (simdutf8::basic::from_utf8(line).is_ok() && !line.iter().any(|&b| b < 0x20))
}

/// Whether every escape in a string's text (between its quotes) is one JSON allows, leaving
/// out `\u` surrogates (msgspec decides whether they pair).
fn escapes_valid(text: &[u8]) -> bool {
    let mut at = 0;
    while let Some(found) = memchr::memchr(b'\\', &text[at..]) {
        let escape = at + found;
        at = match text.get(escape + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => escape + 2,
            Some(b'u') => match text.get(escape + 2..escape + 6) {
                Some(hex)
                    if hex.iter().all(u8::is_ascii_hexdigit)
                        && !(matches!(hex[0], b'd' | b'D')
                            && matches!(hex[1], b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')) =>
                {
                    escape + 6
                }
                _ => return false,
            },
            _ => return false,
        };
    }
    true
}

/// Whether a top-level scalar (what `skip_value` spans) is `true`, `false`, `null` or a number
/// in JSON's grammar that orjson reads as a finite double or an integer: no exponent of three
/// digits, no 30 bytes of digits (msgspec reads `1e999`, orjson refuses it).
fn scalar_valid(text: &[u8]) -> bool {
    if matches!(text, b"true" | b"false" | b"null") {
        return true;
    }
    let digits = |at: &mut usize| {
        let start = *at;
        while matches!(text.get(*at), Some(b'0'..=b'9')) {
            *at += 1;
        }
        *at - start
    };
    let mut at = usize::from(text.first() == Some(&b'-'));
    match text.get(at) {
        Some(b'0') => at += 1,
        Some(b'1'..=b'9') => {
            digits(&mut at);
        }
        _ => return false,
    }
    if text.get(at) == Some(&b'.') {
        at += 1;
        if digits(&mut at) == 0 {
            return false;
        }
    }
    if matches!(text.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(text.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        if !(1..=2).contains(&digits(&mut at)) {
            return false;
        }
    }
    at == text.len() && text.len() < 30
}

impl Members {
    /// The member whose key's opening quote is at `at`: `(key end, value start, value end)`,
    /// remembered with its flags. A container is checked for being compact (orjson's
    /// spelling) as it is skipped: the one walk the writer would otherwise do again.
    fn member(&mut self, line: &[u8], at: usize) -> Result<(usize, usize, usize), ()> {
        let (key_end, key_escaped) = string_end(line, at).ok_or(())?;
        let colon = skip_ws_forward(line, key_end);
        if line.get(colon) != Some(&b':') {
            return Err(());
        }
        let value = skip_ws_forward(line, colon + 1);
        let mut flags = if key_escaped { KEY_ESCAPED } else { 0 };
        let raw_key = &line[at + 1..key_end - 1];
        let (word, bit) = key_bit(raw_key);
        if self.seen[word] & bit != 0 {
            let first = self.starts[self.starts.len() - 1] as usize;
            let same = |m: &Member| &line[m.key as usize + 1..m.key_end as usize - 1] == raw_key;
            if self.members[first..].iter().any(same) {
                flags |= REPEATED;
            }
        }
        self.seen[word] |= bit;
        let value_end = match line.get(value) {
            Some(b'"') => {
                let (end, escaped) = string_end(line, value).ok_or(())?;
                if escaped {
                    flags |= VALUE_ESCAPED;
                }
                end
            }
            Some(b'{' | b'[') => match compact_end(line, value, &mut self.nested) {
                Some(end) => {
                    flags |= COMPACT;
                    end
                }
                None => skip_value(line, value).ok_or(())?,
            },
            _ => skip_value(line, value).ok_or(())?,
        };
        if self.valid {
            self.valid = (!key_escaped || escapes_valid(&line[at + 1..key_end - 1]))
                && match line[value] {
                    b'"' => {
                        flags & VALUE_ESCAPED == 0 || escapes_valid(&line[value + 1..value_end - 1])
                    }
                    b'{' | b'[' => flags & COMPACT != 0,
                    _ => scalar_valid(&line[value..value_end]),
                };
        }
        // Offsets are u32: a line of 4 GiB has no members kept (the caller gives up on them).
        let offset = |at: usize| u32::try_from(at).map_err(|_| ());
        self.members.push(Member {
            key: offset(at)?,
            key_end: offset(key_end)?,
            value: offset(value)?,
            value_end: offset(value_end)?,
            flags,
        });
        Ok((key_end, value, value_end))
    }

    /// The line's members are all in: the next line's start here.
    fn line_done(&mut self) {
        self.starts.push(self.members.len() as u32);
        self.seen = [0; 16];
    }

    /// The last line lost the member whose key starts at `key` and the bytes `[a, b)` with it
    /// (`time_keep off`): what came after moves back.
    fn cut(&mut self, key: usize, a: usize, b: usize) {
        let first = self.starts[self.starts.len() - 2] as usize;
        let shift = (b - a) as u32;
        let line = &mut self.members[first..];
        let Some(gone) = line.iter().position(|m| m.key as usize == key) else {
            return;
        };
        for m in line[gone + 1..].iter_mut() {
            m.key -= shift;
            m.key_end -= shift;
            m.value -= shift;
            m.value_end -= shift;
        }
        self.members.remove(first + gone);
        *self.starts.last_mut().expect("a line was scanned") -= 1;
    }
}

/// The top-level member `key` of one object line that msgspec has validated: `(value start,
/// value end, time)` (time None: not a plain string or not in the format), or None when the key
/// is absent. Err(()) when the key is repeated or written with escapes, which the reference
/// decoder then decides.
fn scan_line(
    line: &[u8],
    key: &str,
    format: &TimeFormat,
    mut members: Option<&mut Members>,
) -> Result<Option<(usize, usize, Option<i64>)>, ()> {
    let key = key.as_bytes();
    let mut at = skip_ws_forward(line, 0);
    if line.get(at) != Some(&b'{') {
        return Err(());
    }
    if let Some(kept) = members.as_deref_mut() {
        kept.valid = kept.valid && valid_text(line);
    }
    at += 1;
    let mut found: Option<(usize, usize)> = None;
    let mut after_comma = false;
    loop {
        at = skip_ws_forward(line, at);
        match line.get(at) {
            Some(b'}') => {
                if let Some(kept) = members.as_deref_mut() {
                    kept.valid = kept.valid && !after_comma; // `{"a":1,}`
                }
                break;
            }
            Some(b'"') => {}
            _ => return Err(()),
        }
        let key_start = at;
        let (key_end, value_start, value_end) = match members.as_deref_mut() {
            None => {
                let key_end = skip_string(line, at).ok_or(())?;
                at = skip_ws_forward(line, key_end);
                if line.get(at) != Some(&b':') {
                    return Err(());
                }
                let value_start = skip_ws_forward(line, at + 1);
                (
                    key_end,
                    value_start,
                    skip_value(line, value_start).ok_or(())?,
                )
            }
            Some(found) => found.member(line, key_start)?,
        };
        let name = &line[key_start + 1..key_end - 1];
        if name == key {
            if found.is_some() {
                return Err(()); // a repeated key: msgspec and orjson take the last one
            }
            found = Some((value_start, value_end));
        } else if escaped_name_may_spell(name, key) {
            return Err(()); // an escaped name might spell the key
        }
        at = skip_ws_forward(line, value_end);
        match line.get(at) {
            Some(b',') => {
                at += 1;
                after_comma = true;
            }
            Some(b'}') => break,
            _ => return Err(()),
        }
    }
    if let Some(kept) = members {
        // Nothing but spaces after the object (a valid line has no other whitespace).
        kept.valid = kept.valid && skip_ws_forward(line, at + 1) == line.len();
        kept.line_done();
    }
    Ok(found.map(|(start, end)| with_time(line, start, end, format)))
}

/// The member's value span with its time (None: not a plain string, or not in the format).
fn with_time(
    line: &[u8],
    start: usize,
    end: usize,
    format: &TimeFormat,
) -> (usize, usize, Option<i64>) {
    let raw = &line[start..end];
    let time = if raw.len() >= 2 && raw[0] == b'"' && !raw.contains(&b'\\') {
        format.parse(&raw[1..raw.len() - 1])
    } else {
        None
    };
    (start, end, time)
}

#[pymethods]
impl JsonLinesScanner {
    #[new]
    #[pyo3(signature = (key, remove, fmt, offset_seconds=0))]
    fn new(key: String, remove: bool, fmt: Option<&str>, offset_seconds: i64) -> PyResult<Self> {
        let compiled = match fmt {
            Some(f) => Some(
                Compiled::new(f, offset_seconds)
                    .map_err(pyo3::exceptions::PyValueError::new_err)?,
            ),
            None => None,
        };
        let quoted = plain_key(key.as_bytes())
            .then(|| Box::new(memmem::Finder::new(format!("\"{key}\"").as_bytes()).into_owned()));
        Ok(Self {
            key,
            remove,
            format: TimeFormat {
                compiled,
                offset: offset_seconds,
            },
            quoted,
        })
    }

    /// Scans a block of newline-terminated lines that msgspec has validated as one JSON document
    /// each. None when a line is not an object (or is blank, or repeats or escapes the key):
    /// the caller's line-by-line path then decides and reports. Otherwise ``(block, times,
    /// slow, members)``: ``block`` is the lines with the key's member cut where its time was
    /// taken here (the same object when nothing was cut); ``times`` holds a native-endian int64
    /// per line (``now_ns`` where the key is absent or its time is in ``slow``); ``slow`` lists
    /// ``(index, value's JSON bytes)`` for the times this scan did not take (not a plain
    /// string, or not in the format): the reference parser decides those, and their key is
    /// left in place. ``members``: with ``members=True``, every line's top-level members in
    /// ``block`` (`LineMembers`, for `FieldsWriter`), else None.
    #[pyo3(signature = (block, now_ns, members=false))]
    fn scan<'py>(
        &self,
        py: Python<'py>,
        block: Bound<'py, PyBytes>,
        now_ns: i64,
        members: bool,
    ) -> PyResult<Option<ScanResult<'py>>> {
        let mut kept = members.then(|| Members {
            members: Vec::new(),
            starts: vec![0],
            nested: Vec::new(),
            seen: [0; 16],
            valid: true,
        });
        let bytes = block.as_bytes();
        let base = bytes.as_ptr() as usize;
        let mut lines: Vec<Line> = Vec::new();
        let mut times: Vec<u8> = Vec::with_capacity(bytes.len() / 64);
        let mut slow = Vec::new();
        let mut cut_total = 0usize;
        for (index, line) in block_lines(bytes).enumerate() {
            if line.is_empty() {
                return Ok(None);
            }
            let start = line.as_ptr() as usize - base;
            let located = match (&self.quoted, &kept) {
                (Some(quoted), None) => locate(line, self.key.as_bytes(), quoted),
                _ => None,
            };
            let found = match located {
                Some(Ok(span)) => Ok(span.map(|(a, b)| with_time(line, a, b, &self.format))),
                Some(Err(())) => Err(()),
                None => scan_line(line, &self.key, &self.format, kept.as_mut()),
            };
            let Ok(found) = found else {
                return Ok(None);
            };
            let mut cut = None;
            let time = match found {
                None => now_ns,
                Some((vs, ve, Some(ns))) => {
                    if self.remove {
                        let Some(member) = member_start(line, vs, self.key.as_bytes()) else {
                            return Ok(None);
                        };
                        let (a, b) = cut_span(line, member, ve);
                        if let Some(kept) = kept.as_mut() {
                            kept.cut(member, a, b);
                        }
                        cut = Some((start + a, start + b));
                        cut_total += b - a;
                    }
                    ns
                }
                Some((vs, ve, None)) => {
                    slow.push((index, PyBytes::new(py, &line[vs..ve])));
                    now_ns
                }
            };
            times.extend_from_slice(&time.to_ne_bytes());
            lines.push(Line {
                start,
                end: start + line.len(),
                cut,
            });
        }
        let out = if cut_total == 0 {
            block.clone()
        } else {
            let total = bytes.len() - cut_total;
            let lines = &lines;
            new_bytes_filled(py, total, move |out| {
                for (i, line) in lines.iter().enumerate() {
                    match line.cut {
                        Some((a, b)) => {
                            out.put(&bytes[line.start..a]);
                            out.put(&bytes[b..line.end]);
                        }
                        None => out.put(&bytes[line.start..line.end]),
                    }
                    // The newline after each line (a last line without one stays without).
                    let next = lines.get(i + 1).map_or(bytes.len(), |n| n.start);
                    out.put(&bytes[line.end..next]);
                }
            })?
        };
        let members = match kept {
            Some(kept) => Some(Bound::new(
                py,
                LineMembers {
                    data: out.clone().unbind(),
                    members: kept.members,
                    starts: kept.starts,
                    validated: kept.valid,
                },
            )?),
            None => None,
        };
        Ok(Some((out, PyBytes::new(py, &times), slow, members)))
    }
}

/// What `JsonLinesScanner.scan` returns for a block it took.
type ScanResult<'py> = (
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Vec<(usize, Bound<'py, PyBytes>)>,
    Option<Bound<'py, LineMembers>>,
);

/// Fluent Bit's text framings of JSON lines, from a block and its times without a record per
/// line: what the `file` output's `out_file`, `stdout`'s `msgpack` text and the `json` family
/// with a date key produce per record (see `kubetrail/sinks/json_format.py`, whose Python
/// version tests compare with). One builder (`Frames`) serves every way out: `frame_lines`
/// into one bytes object, `write_framed` straight to a file descriptor with `writev`, and the
/// `http` output's request body (`httpbody::FramedBody`, `writev` to its socket).
///
/// `style`: 0 `TAG: [S.NNNNNNNNN, LINE]`, 1 the same after `[N] ` (N from `first`), 2 the line
/// with `"KEY":S.F` (a double, as orjson writes it) put first, 3 the same with whole seconds,
/// 4 the line as it is (no times needed). `join`: 0 each framed line ends with a newline
/// (`json_lines`), 1 they are one JSON array `[A,B]` and a newline (`json`), 2 back to back
/// (`json_stream`). `times` holds a native-endian int64 per line.
///
/// The output is `glue 0, body 0, glue 1, body 1, ..., glue n`: each glue is what lies between
/// two lines' bytes (the previous line's `]`, the separator, the next line's prefix), formatted
/// into one small buffer, so `writev` gets two slices a line.
pub(crate) struct Frames<'a> {
    /// Per line, the part of the line written after its prefix.
    pub(crate) bodies: Vec<&'a [u8]>,
    /// The glues back to back; `ends[k]` is where glue k ends (n + 1 of them).
    pub(crate) prefixes: Vec<u8>,
    pub(crate) ends: Vec<usize>,
}

impl<'a> Frames<'a> {
    /// None when the lines and times do not pair up, or a line cannot take a date (not an
    /// object, or a double this module does not write as orjson does): the caller then
    /// formats records.
    pub(crate) fn new(
        block: &'a [u8],
        times: &[u8],
        style: u8,
        text: &[u8],
        first: u64,
        join: u8,
    ) -> Option<Self> {
        let lines: Vec<&[u8]> = block_lines(block).collect();
        let timed = style != 4;
        if (timed && times.len() != lines.len() * 8)
            || style > 4
            || join > 2
            || (style <= 1 && join != 0)
            || (!block.is_empty() && !block.ends_with(b"\n"))
        {
            return None;
        }
        let time_at =
            |i: usize| i64::from_ne_bytes(times[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let mut prefixes: Vec<u8> = Vec::with_capacity(lines.len() * (text.len() + 40));
        let mut ends: Vec<usize> = Vec::with_capacity(lines.len());
        let mut bodies: Vec<&[u8]> = Vec::with_capacity(lines.len());
        let mut number = itoa_buffer();
        let mut doubles = zmij::Buffer::new();
        let suffix: &[u8] = if style <= 1 { b"]" } else { b"" };
        let separator: &[u8] = [b"\n" as &[u8], b",", b""][join as usize];
        if join == 1 {
            prefixes.push(b'[');
        }
        for (i, line) in lines.iter().enumerate() {
            if i > 0 {
                prefixes.extend_from_slice(suffix);
                prefixes.extend_from_slice(separator);
            }
            match style {
                0 | 1 => {
                    let t = time_at(i);
                    let (secs, mut nanos) =
                        (t.div_euclid(1_000_000_000), t.rem_euclid(1_000_000_000));
                    if style == 1 {
                        prefixes.push(b'[');
                        prefixes.extend_from_slice(number.format(first + i as u64).as_bytes());
                        prefixes.extend_from_slice(b"] ");
                    }
                    prefixes.extend_from_slice(text);
                    prefixes.extend_from_slice(b": [");
                    prefixes.extend_from_slice(number.format(secs).as_bytes());
                    let mut nanos_text = *b".000000000, ";
                    for digit in nanos_text[1..10].iter_mut().rev() {
                        *digit = b'0' + (nanos % 10) as u8;
                        nanos /= 10;
                    }
                    prefixes.extend_from_slice(&nanos_text);
                    bodies.push(line);
                }
                2 | 3 => {
                    let t = time_at(i);
                    let body = line.trim_ascii();
                    if body.first() != Some(&b'{') {
                        return None;
                    }
                    prefixes.extend_from_slice(b"{\"");
                    prefixes.extend_from_slice(text);
                    prefixes.extend_from_slice(b"\":");
                    if style == 2 {
                        let double = double_text(t as f64 / 1e9, &mut doubles);
                        if double.is_empty() {
                            return None;
                        }
                        prefixes.extend_from_slice(double.as_bytes());
                    } else {
                        prefixes.extend_from_slice(
                            number.format(t.div_euclid(1_000_000_000)).as_bytes(),
                        );
                    }
                    if body[1..].trim_ascii() != b"}" {
                        prefixes.push(b',');
                    }
                    bodies.push(&body[1..]);
                }
                _ => bodies.push(line),
            }
            ends.push(prefixes.len());
        }
        if !lines.is_empty() {
            prefixes.extend_from_slice(suffix);
        }
        prefixes.extend_from_slice([b"\n" as &[u8], b"]\n", b""][join as usize]);
        if join == 0 && lines.is_empty() {
            prefixes.clear(); // no line: nothing at all
        }
        ends.push(prefixes.len());
        Some(Self {
            bodies,
            prefixes,
            ends,
        })
    }

    /// Every piece of the output in order.
    fn pieces<'s>(&'s self, mut put: impl FnMut(&'s [u8])) {
        put(&self.prefixes[..self.ends[0]]);
        for (i, body) in self.bodies.iter().enumerate() {
            put(body);
            put(&self.prefixes[self.ends[i]..self.ends[i + 1]]);
        }
    }

    fn len(&self) -> usize {
        let mut total = 0;
        self.pieces(|piece| total += piece.len());
        total
    }
}

/// The framed lines as one bytes object (see `Frames`), written once into a bytes object of
/// the exact size: no second copy of a block as big as the input. None when `Frames` refuses.
#[pyfunction]
#[pyo3(signature = (block, times, style, text, first=0, join=0))]
pub fn frame_lines<'py>(
    py: Python<'py>,
    block: &[u8],
    times: &[u8],
    style: u8,
    text: &[u8],
    first: u64,
    join: u8,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let Some(frames) = Frames::new(block, times, style, text, first, join) else {
        return Ok(None);
    };
    let total = frames.len();
    let frames = &frames;
    crate::new_bytes_filled(py, total, move |out| frames.pieces(|piece| out.put(piece))).map(Some)
}

/// A tiny integer formatter (no allocation per number).
struct IntText([u8; 24], usize);

fn itoa_buffer() -> IntText {
    IntText([0; 24], 0)
}

impl IntText {
    fn format<T: Into<i128>>(&mut self, value: T) -> &str {
        let mut v: i128 = value.into();
        let negative = v < 0;
        let mut at = self.0.len();
        loop {
            at -= 1;
            self.0[at] = b'0' + (v % 10).unsigned_abs() as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if negative {
            at -= 1;
            self.0[at] = b'-';
        }
        self.1 = at;
        std::str::from_utf8(&self.0[at..]).unwrap_or("0")
    }
}

/// A double as orjson (and Python's repr) writes it: the shortest text that reads back the
/// same, with `.0` on whole numbers; exponents only outside [1e-4, 1e16) as Python does.
/// zmij (Schubfach) writes the same shortest digits as Rust's `Display` did, without a
/// `String` per line: the date of every line was ~0.03 s per 300,000 lines that way, most of
/// the framing's CPU. Within that range zmij writes fixed notation (it does for 1e-5..1e16),
/// `.0` included on whole numbers.
pub(crate) fn double_text(value: f64, buffer: &mut zmij::Buffer) -> &str {
    let abs = value.abs();
    if !value.is_finite() || (abs != 0.0 && !(1e-4..1e16).contains(&abs)) {
        return ""; // the caller never asks for such times; empty = use Python
    }
    buffer.format_finite(value)
}

/// Whether ``block`` has an empty line (a newline at its start or two in a row). The tail asks
/// this of every block before it makes it a lazy block; ``b"\n\n" in block`` cost CPython
/// half a second per 266 MB of audit lines (its search stops at every newline), memmem's
/// vectorised search a small fraction of that.
#[pyfunction]
pub fn has_blank_line(block: &[u8]) -> bool {
    block.first() == Some(&b'\n') || memchr::memmem::find(block, b"\n\n").is_some()
}

/// Framed lines (see `Frames`) written straight to a file descriptor with `writev`: the lines
/// go from the block to the kernel once, never copied into a framed buffer the size of the
/// input (on this VM, filling 266 MB of fresh memory cost 0.1-0.2 s; `format plain` writes the
/// block itself). Only the small prefixes are formatted, into one buffer. The GIL is released
/// while writing. Without `style`: 0 (`out_file`), or 1 (`msgpack` text) when `first` is given.
/// Returns the bytes written; errors are the OS's (ValueError when `Frames` refuses).
#[pyfunction]
#[pyo3(signature = (fd, block, times, tag, first=None, style=None))]
pub fn write_framed(
    py: Python<'_>,
    fd: i32,
    block: &[u8],
    times: &[u8],
    tag: &[u8],
    first: Option<u64>,
    style: Option<u8>,
) -> PyResult<usize> {
    use std::io::{IoSlice, Write};
    use std::os::fd::FromRawFd;

    let style = style.unwrap_or(if first.is_some() { 1 } else { 0 });
    let Some(frames) = Frames::new(block, times, style, tag, first.unwrap_or(0), 0) else {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "one time per line of a newline-terminated block (and objects for a date)",
        ));
    };
    py.detach(|| {
        // SAFETY: the descriptor belongs to the caller's open file; ManuallyDrop never closes it.
        let mut file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
        let mut written = 0usize;
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1024);
        let mut result: std::io::Result<()> = Ok(());
        let mut flush = |slices: &mut Vec<IoSlice<'_>>| -> std::io::Result<()> {
            let mut view: &mut [IoSlice<'_>] = slices;
            while !view.is_empty() {
                let n = file.write_vectored(view)?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "write returned 0",
                    ));
                }
                written += n;
                IoSlice::advance_slices(&mut view, n);
            }
            slices.clear();
            Ok(())
        };
        // IOV_MAX is 1024 on Linux.
        frames.pieces(|piece| {
            if result.is_err() || piece.is_empty() {
                return;
            }
            slices.push(IoSlice::new(piece));
            if slices.len() == 1024 {
                result = flush(&mut slices);
            }
        });
        result?;
        flush(&mut slices)?;
        Ok(written)
    })
    .map_err(|e: std::io::Error| PyErr::from(e))
}
