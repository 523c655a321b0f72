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
//!
//! Speed (issue 18): most nested values in real lines are already written as orjson would
//! write them (an API server's or orjson's own output), so each is first checked by a walk
//! that writes nothing (`Cursor::compact`) and then copied whole; re-encoding token by token
//! (`Cursor::json_value`) is the fallback, so an unusual value costs time, never correctness.
//! Strings are found with an inlined 16-byte search (most are a few bytes long: a call into
//! `memchr2` per string cost more than the search). A template's unused values are skipped
//! structurally: a block reaches an output only after its parser validated it (msgspec's strict
//! decoder refuses what orjson refuses: bad escapes, control bytes, lone surrogates).
//!
//! Not walking at all (issue 18, fourth pass): the `json` parser's scan walks each line's top
//! level anyway (to find and cut `time_key`), so when the sink asks for them before validation
//! it keeps every member's spans (`jsonlines::LineMembers`) with what it learnt on the way: an
//! escape in the key or string, a container already compact (`compact_end`, the check above,
//! run by the scan), a repeated key. `Cursor::members` then goes from span to span and the
//! writer touches only what it writes; everything the flags do not vouch for takes the same
//! code as without spans. The two outputs are compared in tests, and a block without spans
//! (another parser, validated before the sink asked) is walked here as before.

use std::borrow::Cow;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::block_lines;
use crate::jsonesc::escape_json_into;
use crate::jsonlines::{LineMembers, Member, COMPACT, KEY_ESCAPED, REPEATED, VALUE_ESCAPED};

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
    /// The line's top-level members as the parser's scan found them (`LineMembers`), when it
    /// kept them: `members` then goes from span to span instead of walking the line.
    known: Option<&'a [Member]>,
    /// The member whose value is at the cursor, when known: its value's end and flags.
    hint: Option<Member>,
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
        let mut at = find_quote_or_backslash(self.s, start).ok_or(Slow)?;
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
                    let next = find_quote_or_backslash(self.s, at).ok_or(Slow)?;
                    out.extend_from_slice(&self.s[at..next]);
                    at = next;
                }
            }
        }
    }

    /// The string value at the cursor, decoded: from the member's span when the scan saw no
    /// escape in it (no search), else as `string` decodes it.
    fn value_string(&mut self) -> Walk<Cow<'a, [u8]>> {
        if let Some(m) = self.hint {
            if m.flags & VALUE_ESCAPED == 0 && self.at == m.value as usize {
                let raw = self
                    .s
                    .get(self.at + 1..m.value_end as usize - 1)
                    .ok_or(Slow)?;
                self.at = m.value_end as usize;
                return Ok(Cow::Borrowed(raw));
            }
        }
        self.string()
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
        if count <= 18 {
            return Ok(text); // below 10^18: within 64 bits either way, no parse needed
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

    /// The value at the cursor written as orjson writes it into `out`, token by token (the way
    /// for a value that is not already compact: spaces, escapes orjson writes otherwise).
    fn json_value(&mut self, out: &mut Vec<u8>, depth: usize) -> Walk<()> {
        if depth > 200 {
            return Err(Slow);
        }
        match self.peek().ok_or(Slow)? {
            b'"' => {
                let text = self.string()?;
                write_string(out, &text, self.quote);
            }
            b'{' => {
                self.at += 1;
                out.push(b'{');
                if !self.empty(b'}') {
                    // A key repeated in a nested object: orjson's dict keeps its first place
                    // with the last value, so the text is Python's to write. No allocation for
                    // objects of one member.
                    let mut keys: Vec<Cow<'a, [u8]>> = Vec::new();
                    loop {
                        self.ws();
                        let key = self.string()?;
                        if keys.contains(&key) {
                            return Err(Slow);
                        }
                        write_string(out, &key, self.quote);
                        keys.push(key);
                        self.ws();
                        self.expect(b':')?;
                        out.push(b':');
                        self.ws();
                        self.json_value(out, depth + 1)?;
                        if !self.next_item(b'}')? {
                            break;
                        }
                        out.push(b',');
                    }
                }
                out.push(b'}');
            }
            b'[' => {
                self.at += 1;
                out.push(b'[');
                if !self.empty(b']') {
                    loop {
                        self.ws();
                        self.json_value(out, depth + 1)?;
                        if !self.next_item(b']')? {
                            break;
                        }
                        out.push(b',');
                    }
                }
                out.push(b']');
            }
            b't' => out.extend_from_slice(self.literal(b"true")?),
            b'f' => out.extend_from_slice(self.literal(b"false")?),
            b'n' => out.extend_from_slice(self.literal(b"null")?),
            b'-' | b'0'..=b'9' => {
                let text = self.number()?;
                out.extend_from_slice(text);
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

    /// After a member or an element: a `,` (true: another follows) or the container's `close`
    /// (false), consumed. Anything else is Python's.
    fn next_item(&mut self, close: u8) -> Walk<bool> {
        self.ws();
        match self.peek() {
            Some(b',') => {
                self.at += 1;
                Ok(true)
            }
            Some(byte) if byte == close => {
                self.at += 1;
                Ok(false)
            }
            _ => Err(Slow),
        }
    }

    /// Past the value at the cursor without looking into it: a template's unused values. The
    /// block's lines are valid JSON (a parser's block is validated by msgspec's strict decoder
    /// before any output sees it), so strings are found by their quotes and containers by
    /// counting brackets; the values a template writes are still checked as they are decoded.
    fn skip(&mut self) -> Walk<()> {
        if let Some(m) = self.hint {
            self.at = m.value_end as usize;
            return Ok(());
        }
        let s = self.s;
        match self.peek().ok_or(Slow)? {
            b'"' => self.at = skip_string(s, self.at).ok_or(Slow)?,
            b'{' | b'[' => {
                let mut depth = 0usize;
                let mut i = self.at;
                loop {
                    match *s.get(i).ok_or(Slow)? {
                        b'"' => {
                            i = skip_string(s, i).ok_or(Slow)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.at = i + 1;
                                return Ok(());
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
            }
            _ => {
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n')
                ) {
                    self.at += 1;
                }
            }
        }
        Ok(())
    }

    /// Past the value at the cursor when its bytes are already exactly what orjson writes for
    /// it after decoding (compact, orjson's escapes, integers within 64 bits, no repeated
    /// key): then the caller copies the span whole instead of re-encoding it token by token.
    /// False: not such a value, or not one this walk vouches for (the cursor is then anywhere;
    /// the caller goes back to the value's start and re-encodes). `keys`: the key spans of the
    /// objects open around the cursor (a stack, so no allocation per object).
    fn compact(&mut self, keys: &mut Vec<(usize, usize)>, depth: usize) -> bool {
        if depth > 200 {
            return false;
        }
        match self.peek() {
            Some(b'"') => self.compact_string(),
            Some(b'{') => {
                self.at += 1;
                if self.peek() == Some(b'}') {
                    self.at += 1;
                    return true;
                }
                let base = keys.len();
                loop {
                    let start = self.at;
                    if self.peek() != Some(b'"') || !self.compact_string() {
                        return false;
                    }
                    // Compact keys are equal as text exactly when their spellings are equal
                    // (orjson's escaping is one spelling per text), so spans are compared.
                    let key = &self.s[start..self.at];
                    if keys[base..].iter().any(|&(a, b)| &self.s[a..b] == key) {
                        return false; // repeated: orjson's dict keeps one
                    }
                    keys.push((start, self.at));
                    if self.peek() != Some(b':') {
                        return false;
                    }
                    self.at += 1;
                    if !self.compact(keys, depth + 1) {
                        return false;
                    }
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b'}') => {
                            self.at += 1;
                            keys.truncate(base);
                            return true;
                        }
                        _ => return false,
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return true;
                }
                loop {
                    if !self.compact(keys, depth + 1) {
                        return false;
                    }
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return true;
                        }
                        _ => return false,
                    }
                }
            }
            Some(b't') => self.literal(b"true").is_ok(),
            Some(b'f') => self.literal(b"false").is_ok(),
            Some(b'n') => self.literal(b"null").is_ok(),
            Some(b'-' | b'0'..=b'9') => self.number().is_ok(),
            _ => false,
        }
    }

    /// Past the string at the cursor when it is written as orjson writes its text.
    fn compact_string(&mut self) -> bool {
        let s = self.s;
        let mut at = self.at + 1;
        loop {
            let Some(next) = find_quote_or_backslash(s, at) else {
                return false;
            };
            if s[next] == b'"' {
                if self.controls && s[self.at + 1..next].iter().any(|&b| b < 0x20) {
                    return false; // a raw control byte: not JSON
                }
                self.at = next + 1;
                return true;
            }
            // An escape orjson writes: `\"` `\\` `\n` `\r` `\t` `\b` `\f`, or `\u00XX` (lower-case
            // hex) for the other control bytes. Any other spelling (`\/`, `\u00e9`, upper-case
            // hex, a surrogate pair) decodes to text orjson writes otherwise.
            at = match s.get(next + 1) {
                Some(b'"' | b'\\' | b'n' | b'r' | b't' | b'b' | b'f') => next + 2,
                Some(b'u') => match s.get(next + 2..next + 6) {
                    Some([b'0', b'0', high @ (b'0' | b'1'), low])
                        if matches!(low, b'0'..=b'9' | b'a'..=b'f')
                            && !(*high == b'0'
                                && matches!(low, b'8' | b'9' | b'a' | b'c' | b'd')) =>
                    {
                        next + 6
                    }
                    _ => return false,
                },
                _ => return false,
            };
        }
    }

    /// The value at the cursor as orjson writes it into `out`: copied whole when it is
    /// already written so (`compact`), else re-encoded (`json_value`). A csv field (`quote`
    /// `""`) has each `"` of the copy doubled.
    fn copy_value(&mut self, out: &mut Vec<u8>, keys: &mut Vec<(usize, usize)>) -> Walk<()> {
        let start = self.at;
        keys.clear();
        // The scan found it compact already (`COMPACT`): copied without a second walk.
        let known = self
            .hint
            .filter(|m| m.flags & COMPACT != 0 && m.value as usize == start)
            .map(|m| m.value_end as usize);
        if let Some(end) = known {
            self.at = end;
        }
        if known.is_some() || self.compact(keys, 0) {
            let span = &self.s[start..self.at];
            if self.quote.len() == 1 {
                out.extend_from_slice(span);
            } else {
                double_quotes(out, span);
            }
            return Ok(());
        }
        self.at = start;
        self.json_value(out, 0)
    }

    /// A top-level value as Python's `_text` gives it: a string's own text, else orjson's.
    fn text_value(&mut self, out: &mut Vec<u8>, keys: &mut Vec<(usize, usize)>) -> Walk<()> {
        if self.peek() == Some(b'"') {
            let text = self.value_string()?;
            out.extend_from_slice(&text);
            Ok(())
        } else {
            self.copy_value(out, keys)
        }
    }

    /// Walks the top-level object, calling `member(key, cursor)` with the cursor at each value;
    /// the callback must consume the value.
    fn members(
        &mut self,
        mut member: impl FnMut(Cow<'a, [u8]>, &mut Self) -> Walk<()>,
    ) -> Walk<()> {
        if let Some(known) = self.known {
            // From span to span: the keys and the values' kinds are known, only what is
            // written is looked at. A value the callback leaves anywhere but at its end means
            // the spans are not this line's: Python's.
            for m in known {
                let key = if m.flags & KEY_ESCAPED == 0 {
                    let raw = self.s.get(m.key as usize + 1..m.key_end as usize - 1);
                    Cow::Borrowed(raw.ok_or(Slow)?)
                } else {
                    self.hint = None;
                    self.at = m.key as usize;
                    self.string()?
                };
                self.at = m.value as usize;
                self.hint = Some(*m);
                member(key, self)?;
                if self.at != m.value_end as usize {
                    return Err(Slow);
                }
            }
            self.hint = None;
            return Ok(());
        }
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
                if !self.next_item(b'}')? {
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

/// The end of the object or array at `at` (past its close) when it is written exactly as orjson
/// writes it after decoding (see `Cursor::compact`), in a line already validated (no raw
/// control byte in a string); None when it is not. `keys` is scratch space. The json parser's
/// scan calls this as it skips a top-level container, so the writer need not walk it again.
pub(crate) fn compact_end(line: &[u8], at: usize, keys: &mut Vec<(usize, usize)>) -> Option<usize> {
    let mut cursor = Cursor {
        s: line,
        at,
        controls: false,
        quote: b"\"",
        known: None,
        hint: None,
    };
    keys.clear();
    cursor.compact(keys, 0).then_some(cursor.at)
}

/// The end of the string whose opening quote is at `at` (past its closing quote), and whether
/// it has an escape.
pub(crate) fn string_end(s: &[u8], at: usize) -> Option<(usize, bool)> {
    let first = find_quote_or_backslash(s, at + 1)?;
    if s[first] == b'"' {
        return Some((first + 1, false));
    }
    Some((skip_string(s, first - 1)?, true))
}

/// The first `"` or `\\` in `s` from `at` on. Inlined, 16 bytes a step: most strings here are
/// short (keys, names, timestamps), where a call into `memchr2` cost more than the search (it
/// was a quarter of the walk's time).
#[inline(always)]
fn find_quote_or_backslash(s: &[u8], mut at: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
            _mm_set1_epi8,
        };
        // SAFETY: SSE2 is part of x86_64; each load reads 16 bytes inside `s`.
        unsafe {
            let quote = _mm_set1_epi8(b'"' as i8);
            let backslash = _mm_set1_epi8(b'\\' as i8);
            while at + 16 <= s.len() {
                let chunk = _mm_loadu_si128(s.as_ptr().add(at) as *const __m128i);
                let hits = _mm_movemask_epi8(_mm_or_si128(
                    _mm_cmpeq_epi8(chunk, quote),
                    _mm_cmpeq_epi8(chunk, backslash),
                ));
                if hits != 0 {
                    return Some(at + hits.trailing_zeros() as usize);
                }
                at += 16;
            }
        }
    }
    s.get(at..)?
        .iter()
        .position(|&b| b == b'"' || b == b'\\')
        .map(|i| at + i)
}

/// The end of the string whose opening quote is at `at` (past its closing quote), its escapes
/// not looked into.
fn skip_string(s: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    loop {
        i = find_quote_or_backslash(s, i)?;
        if s[i] == b'\\' {
            i += 2; // the escaped byte, whatever it is
            continue;
        }
        return Some(i + 1);
    }
}

/// Whether every byte of `line` is printable ASCII (no control byte, nothing to check as
/// UTF-8): one vectorised pass instead of a UTF-8 check and a control-byte scan.
pub(crate) fn printable_ascii(line: &[u8]) -> bool {
    // A fold without an early exit, 32 bytes at a time: the compiler vectorises it.
    let mut chunks = line.chunks_exact(32);
    for chunk in &mut chunks {
        if chunk
            .iter()
            .fold(false, |any, &b| any | !(0x20..0x80).contains(&b))
        {
            return false;
        }
    }
    !chunks
        .remainder()
        .iter()
        .any(|&b| !(0x20..0x80).contains(&b))
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
    let (secs, mut nanos) = (t.div_euclid(1_000_000_000), t.rem_euclid(1_000_000_000));
    // Digits written backwards into a stack buffer: no formatter and no allocation per line.
    let mut text = [0u8; 32];
    let mut at = text.len();
    for _ in 0..9 {
        at -= 1;
        text[at] = b'0' + (nanos % 10) as u8;
        nanos /= 10;
    }
    at -= 1;
    text[at] = b'.';
    let mut whole = secs.unsigned_abs();
    loop {
        at -= 1;
        text[at] = b'0' + (whole % 10) as u8;
        whole /= 10;
        if whole == 0 {
            break;
        }
    }
    if secs < 0 {
        at -= 1;
        text[at] = b'-';
    }
    out.extend_from_slice(&text[at..]);
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
    /// The keys seen on this line (csv/ltsv: a repeated one goes to Python), as spans of the
    /// line, or of `keys` for a key with escapes (decoded; `true`).
    keys: Vec<u8>,
    spans: Vec<(usize, usize, bool)>,
    /// A cheap filter in front of the spans: one bit of 1,024 per key's hash (an audit line's
    /// 15 keys then rarely share a bit, where 64 bits made most lines compare spans).
    mask: [u64; 16],
    /// Template: each placeholder's value text, as spans of `text`.
    text: Vec<u8>,
    slots: Vec<Option<(usize, usize)>>,
    /// The key spans of the nested objects open in `Cursor::compact`.
    nested: Vec<(usize, usize)>,
}

/// A key's bit in a 1,024-bit set (`[u64; 16]`): word and mask. The first eight bytes, the
/// length and the last byte tell most keys of a line apart (no loop over the key).
#[inline]
pub(crate) fn key_bit(key: &[u8]) -> (usize, u64) {
    let head = match key.get(..8) {
        Some(eight) => u64::from_le_bytes(eight.try_into().unwrap_or([0; 8])),
        None => key.iter().fold(0u64, |h, &b| (h << 8) | u64::from(b)),
    };
    let hash =
        head ^ ((key.len() as u64) << 56) ^ (u64::from(key.last().copied().unwrap_or(0)) << 48);
    let slot = (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as usize;
    (slot >> 6, 1u64 << (slot & 63))
}

impl Scratch {
    /// Whether `key` was seen on this line already; remembers it.
    fn repeated(&mut self, line: &[u8], key: &Cow<'_, [u8]>) -> bool {
        let (word, bit) = key_bit(key);
        let text = |&(a, b, owned): &(usize, usize, bool)| {
            if owned {
                &self.keys[a..b]
            } else {
                &line[a..b]
            }
        };
        if self.mask[word] & bit != 0 && self.spans.iter().any(|span| text(span) == key.as_ref()) {
            return true;
        }
        self.mask[word] |= bit;
        // A key without escapes is a slice of the line: remembered by its place, not copied.
        let span = match key {
            Cow::Borrowed(raw) => {
                let start = raw.as_ptr() as usize - line.as_ptr() as usize;
                (start, start + raw.len(), false)
            }
            Cow::Owned(decoded) => {
                let start = self.keys.len();
                self.keys.extend_from_slice(decoded);
                (start, self.keys.len(), true)
            }
        };
        self.spans.push(span);
        false
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.spans.clear();
        self.mask = [0; 16];
        self.text.clear();
        self.slots.iter_mut().for_each(|slot| *slot = None);
    }
}

impl FieldsWriter {
    /// One line in this format into `out`; `known`: its members, when the parser's scan kept
    /// them (`LineMembers`).
    fn line<'a>(
        &self,
        line: &'a [u8],
        known: Option<&'a [Member]>,
        t: i64,
        out: &mut Vec<u8>,
        scratch: &mut Scratch,
    ) -> Walk<()> {
        // Most lines are printable ASCII: one pass says so, and no string needs a control check.
        // A line with known members was validated (UTF-8, no raw control byte in a string) by
        // the scan that found them or by msgspec before it (`LineMembers`): no pass at all.
        let controls = if known.is_some() || printable_ascii(line) {
            false
        } else {
            if std::str::from_utf8(line).is_err() {
                return Err(Slow);
            }
            line.iter().fold(false, |seen, &b| seen | (b < 0x20))
        };
        let mut cursor = Cursor {
            s: line,
            at: 0,
            controls,
            quote: b"\"",
            known,
            hint: None,
        };
        scratch.clear();
        // The scan compared the raw keys already (`REPEATED`); that says all when no key has an
        // escape (two spellings of one key), else the keys are compared here as decoded.
        let scanned_keys = known.is_some_and(|k| k.iter().all(|m| m.flags & KEY_ESCAPED == 0));
        let repeated =
            |scratch: &mut Scratch, cursor: &Cursor, key: &Cow<'_, [u8]>| match cursor.hint {
                Some(m) if scanned_keys => m.flags & REPEATED != 0,
                _ => scratch.repeated(line, key),
            };
        match self.kind {
            CSV => {
                write_epoch(out, t);
                cursor.members(|key, cursor| {
                    if repeated(scratch, cursor, &key) {
                        return Err(Slow); // a repeated key: orjson's dict decides its place
                    }
                    out.push(self.delimiter);
                    let start = cursor.at;
                    if cursor.peek() == Some(b'"') {
                        match cursor.value_string()? {
                            // No quote inside a string without escapes: the JSON string, its
                            // quotes included, is the field.
                            Cow::Borrowed(_) => out.extend_from_slice(&line[start..cursor.at]),
                            Cow::Owned(text) => {
                                out.push(b'"');
                                double_quotes(out, &text);
                                out.push(b'"');
                            }
                        }
                    } else {
                        out.push(b'"');
                        cursor.quote = b"\"\"";
                        let done = cursor.copy_value(out, &mut scratch.nested);
                        cursor.quote = b"\"";
                        done?;
                        out.push(b'"');
                    }
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
                    if repeated(scratch, cursor, &key) {
                        return Err(Slow);
                    }
                    out.push(self.delimiter);
                    out.extend_from_slice(&key);
                    out.extend_from_slice(&self.label_delimiter);
                    let mark = out.len();
                    // A decoded string may hold any delimiter (a tab from `\t`); JSON text only
                    // a visible one, and a string without escapes no control byte unless the
                    // line has one.
                    let mut replace = visible;
                    if cursor.peek() == Some(b'"') {
                        let text = cursor.value_string()?;
                        replace |= controls || matches!(text, Cow::Owned(_));
                        if replace && memchr::memchr(b'\n', &text).is_some() {
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
                        cursor.copy_value(out, &mut scratch.nested)?; // no raw newline in JSON
                    }
                    if replace {
                        let mut from = mark;
                        while let Some(at) = memchr::memchr(self.delimiter, &out[from..]) {
                            out[from + at] = b' '; // the same length: replaced in place
                            from += at + 1;
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
                            cursor.text_value(&mut scratch.text, &mut scratch.nested)?;
                            scratch.slots[index] = Some((start, scratch.text.len()));
                            Ok(())
                        }
                        None => cursor.skip(),
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
    // In a nested value quotes come every 8-9 bytes (audit lines): a search per quote and a
    // copy per piece cost more than the text itself. With SSSE3 (every x86-64 CPU since 2006,
    // checked at run time) eight bytes a step by one shuffle, whatever their quotes.
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("ssse3") {
        // SAFETY: the CPU has SSSE3 (checked just above).
        unsafe { double_quotes_ssse3(out, text) };
        return;
    }
    out.reserve(text.len() * 2);
    for &b in text {
        out.push(b);
        if b == b'"' {
            out.push(b'"');
        }
    }
}

/// For each 8-bit mask of quotes in 8 bytes: the `pshufb` control that writes those bytes with
/// each quote doubled (8 + popcount bytes; the rest of the 16 are don't-care).
const fn doubling_table() -> [[u8; 16]; 256] {
    let mut table = [[0x80u8; 16]; 256];
    let mut mask = 0;
    while mask < 256 {
        let (mut from, mut to) = (0, 0);
        while from < 8 {
            table[mask][to] = from as u8;
            to += 1;
            if (mask >> from) & 1 == 1 {
                table[mask][to] = from as u8;
                to += 1;
            }
            from += 1;
        }
        mask += 1;
    }
    table
}

static DOUBLING: [[u8; 16]; 256] = doubling_table();

/// `double_quotes` eight bytes a step: the quotes of 16 bytes found by one compare, each half
/// spread by one shuffle (`DOUBLING`) and stored whole; the output moves on by its length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn double_quotes_ssse3(out: &mut Vec<u8>, text: &[u8]) {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
        _mm_shuffle_epi8, _mm_srli_si128, _mm_storeu_si128,
    };
    out.reserve(text.len() * 2 + 16);
    let mut n = 0;
    let mut i = 0;
    {
        let spare = out.spare_capacity_mut();
        let to = spare.as_mut_ptr() as *mut u8;
        let quote = _mm_set1_epi8(b'"' as i8);
        // SAFETY (loads): text[i..i + 16] is inside `text`. (stores): each writes
        // spare[n..n + 16] with n <= 2 * i + 8 < 2 * len, inside the 2 * len + 16 reserved.
        while i + 16 <= text.len() {
            let chunk = _mm_loadu_si128(text.as_ptr().add(i) as *const __m128i);
            let hits = _mm_movemask_epi8(_mm_cmpeq_epi8(chunk, quote)) as usize;
            if hits == 0 {
                _mm_storeu_si128(to.add(n) as *mut __m128i, chunk);
                i += 16;
                n += 16;
                continue;
            }
            let (low, high) = (hits & 0xff, hits >> 8);
            let control = _mm_loadu_si128(DOUBLING[low].as_ptr() as *const __m128i);
            _mm_storeu_si128(to.add(n) as *mut __m128i, _mm_shuffle_epi8(chunk, control));
            n += 8 + low.count_ones() as usize;
            let upper = _mm_srli_si128(chunk, 8);
            let control = _mm_loadu_si128(DOUBLING[high].as_ptr() as *const __m128i);
            _mm_storeu_si128(to.add(n) as *mut __m128i, _mm_shuffle_epi8(upper, control));
            n += 8 + high.count_ones() as usize;
            i += 16;
        }
        for &b in &text[i..] {
            *to.add(n) = b;
            n += 1;
            if b == b'"' {
                *to.add(n) = b'"';
                n += 1;
            }
        }
    }
    let len = out.len() + n;
    // SAFETY: the first `n` bytes of the spare capacity were written just above.
    out.set_len(len);
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
    /// do not pair up; OSError as the OS reports it. ``members``: the block's `LineMembers` from
    /// the parser's scan (ValueError when they are of another block): each line is then
    /// written from its members' spans, without a walk of its own.
    #[pyo3(signature = (fd, block, times, first, members=None))]
    fn write(
        &self,
        py: Python<'_>,
        fd: i32,
        block: &Bound<'_, PyBytes>,
        times: &[u8],
        first: usize,
        members: Option<Bound<'_, LineMembers>>,
    ) -> PyResult<Option<usize>> {
        use std::io::Write;
        use std::os::fd::FromRawFd;

        let lines = paired_lines(block.as_bytes(), times)?;
        let members = members.as_ref().map(|m| m.get());
        if let Some(m) = members {
            // The spans are offsets into one block's lines: any other block would be misread.
            if !m.data.bind(py).is(block) || m.starts.len() != lines.len() + 1 {
                return Err(PyValueError::new_err("members of another block"));
            }
        }
        let line_members = |i: usize| {
            members.and_then(|m| {
                let (a, b) = (m.starts[i] as usize, m.starts[i + 1] as usize);
                m.members.get(a..b)
            })
        };
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
                    .line(
                        line,
                        line_members(i),
                        time_at(times, i),
                        &mut out,
                        &mut scratch,
                    )
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
