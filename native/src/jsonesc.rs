//! JSON string escaping, one table for every writer in this crate.
//!
//! orjson and msgspec (the Python references the writers here must match byte for byte) escape
//! strings the same way: `"` and `\`, control characters as `\b \t \n \f \r` or `\u00XX`
//! (lower-case hex), everything else (non-ASCII, DEL, `/`) as it is. The flat prefix of the
//! audit scan (lib.rs), the alert writer (alerts.rs), the regex parser's JSON (regexlines.rs) and
//! the csv/ltsv/template writer (fieldtext.rs) all write through here, so the table cannot drift
//! between them.

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `text` escaped for the inside of a JSON string, without the quotes around it. An escaped
/// `"` is written as `\` followed by `quote`: `"` for JSON, `""` inside a csv field (where the
/// quote itself is doubled).
pub(crate) fn escape_json_into(out: &mut Vec<u8>, text: &[u8], quote: &[u8]) {
    let mut start = 0;
    // 16 bytes at a time: a chunk with nothing to escape (most of a string with an escaped
    // quote in it) is passed over with one test the compiler vectorises (a fold, no early exit).
    for (index, chunk) in text.chunks(16).enumerate() {
        if chunk.len() == 16
            && !chunk
                .iter()
                .fold(false, |any, &b| any | (b < 0x20 || b == b'"' || b == b'\\'))
        {
            continue;
        }
        for (offset, &b) in chunk.iter().enumerate() {
            let escape: &[u8] = match b {
                b'"' => b"\\",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0x00..=0x1f => b"",
                _ => continue,
            };
            let i = index * 16 + offset;
            out.extend_from_slice(&text[start..i]);
            if escape.is_empty() {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
            } else {
                out.extend_from_slice(escape);
                if b == b'"' {
                    out.extend_from_slice(quote); // the escaped quote itself
                }
            }
            start = i + 1;
        }
    }
    out.extend_from_slice(&text[start..]);
}

/// `value` as a JSON string, quotes included.
pub(crate) fn write_json_string(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    escape_json_into(out, value.as_bytes(), b"\"");
    out.push(b'"');
}
