//! Fluent Bit time formats (`strptime` directives plus `%L`), compiled once and parsed natively.
//!
//! Why: a user's `[PARSER] time_format` was parsed by a compiled Python regex plus a cache,
//! about 6 us a line with the decoding around it; here a format is compiled once into a list of
//! steps and a time is parsed in tens of nanoseconds, so the JSON lines scan (`jsonlines.rs`)
//! can take each line's time from its raw bytes without a Python object per line.
//!
//! The semantics are those of `kubetrail/parsers/timefmt.py` (the reference, which tests
//! compare this with on every format of Fluent Bit's stock parsers.conf): numbers are greedy
//! (`%m` takes one or two digits), a space in the format takes any run of whitespace, `.%L` /
//! `,%L` may be absent, text after the end of the format is ignored (as strptime does), no
//! `%Y` means the current year, `%z` overrides `time_offset`, `%s` is taken as it is. Like
//! Fluent Bit's `flb_strptime` time cache, the seconds of the previous time are kept with the
//! text around its fraction: the next time of the same second costs a prefix compare.
//!
//! A time this parser does not take (non-ASCII, a shape it does not know) is not an error
//! here: the caller hands it to the Python reference, which decides.

use std::sync::Mutex;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

#[derive(Clone, Copy, Debug)]
enum Step {
    Year4,
    Year2,
    Month,
    Day,
    DaySpaced,
    Hour,
    HourSpaced,
    Hour12,
    Minute,
    Second,
    /// `%L`, `%f`, `%N`: one or more digits.
    Fraction,
    /// `.%L` or `,%L`: the separator and the digits, or neither.
    OptionalFraction(u8),
    Zone,
    ZoneName,
    MonthAbbr,
    MonthName,
    DayAbbr,
    DayName,
    YearDay,
    AmPm,
    Epoch,
    Space,
    Literal(u8),
}

/// What a parse found (the first occurrence of each field wins, as in the reference's regex).
#[derive(Default, Clone, Copy)]
struct Fields {
    year: Option<i64>,
    year2: Option<i64>,
    month: Option<i64>,
    day: Option<i64>,
    hour: Option<i64>,
    hour12: Option<i64>,
    minute: Option<i64>,
    second: Option<i64>,
    frac: Option<(usize, usize)>,
    zone: Option<i64>,
    yday: Option<i64>,
    pm: Option<bool>,
    epoch: Option<i64>,
}

fn set(slot: &mut Option<i64>, value: i64) {
    if slot.is_none() {
        *slot = Some(value);
    }
}

/// The compiled format and its one-entry cache of the last second.
pub struct Compiled {
    steps: Vec<Step>,
    offset: i64,
    /// Text before the fraction, after it, and the seconds they gave.
    cache: Mutex<Option<(Vec<u8>, Vec<u8>, i64)>>,
}

const MONTHS: [&[u8]; 12] = [
    b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov", b"dec",
];
const MONTH_NAMES: [&[u8]; 12] = [
    b"january",
    b"february",
    b"march",
    b"april",
    b"may",
    b"june",
    b"july",
    b"august",
    b"september",
    b"october",
    b"november",
    b"december",
];

/// Days since 1970-01-01 of a proleptic Gregorian date; like `calendar.timegm`, a day past the
/// month's end simply counts on (the reference checks only 1..=31).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn current_year() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    // civil_from_days, year only
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(month <= 2)
}

fn compile(fmt: &str) -> Result<Vec<Step>, String> {
    let bytes = fmt.as_bytes();
    let mut steps = Vec::new();
    let mut seen_fraction = false;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if (c == b'.' || c == b',') && bytes.get(i + 1..i + 3) == Some(b"%L") && !seen_fraction {
            steps.push(Step::OptionalFraction(c));
            seen_fraction = true;
            i += 3;
            continue;
        }
        if c == b'%' && i + 1 < bytes.len() {
            let d = bytes[i + 1];
            match d {
                b'Y' => steps.push(Step::Year4),
                b'y' => steps.push(Step::Year2),
                b'm' => steps.push(Step::Month),
                b'd' => steps.push(Step::Day),
                b'e' => steps.push(Step::DaySpaced),
                b'H' => steps.push(Step::Hour),
                b'k' => steps.push(Step::HourSpaced),
                b'I' => steps.push(Step::Hour12),
                b'M' => steps.push(Step::Minute),
                b'S' => steps.push(Step::Second),
                b'L' | b'f' | b'N' => {
                    seen_fraction = true;
                    steps.push(Step::Fraction);
                }
                b'z' => steps.push(Step::Zone),
                b'Z' => steps.push(Step::ZoneName),
                b'b' | b'h' => steps.push(Step::MonthAbbr),
                b'B' => steps.push(Step::MonthName),
                b'a' => steps.push(Step::DayAbbr),
                b'A' => steps.push(Step::DayName),
                b'j' => steps.push(Step::YearDay),
                b'p' => steps.push(Step::AmPm),
                b's' => steps.push(Step::Epoch),
                b'T' => steps.extend([
                    Step::Hour,
                    Step::Literal(b':'),
                    Step::Minute,
                    Step::Literal(b':'),
                    Step::Second,
                ]),
                b'F' => steps.extend([
                    Step::Year4,
                    Step::Literal(b'-'),
                    Step::Month,
                    Step::Literal(b'-'),
                    Step::Day,
                ]),
                b'%' => steps.push(Step::Literal(b'%')),
                _ => {
                    let shown = fmt[i..].chars().nth(1).unwrap_or('?');
                    return Err(format!(
                        "unsupported time format directive %{shown} in {fmt:?}"
                    ));
                }
            }
            i += 2;
            continue;
        }
        steps.push(if c == b' ' {
            Step::Space
        } else {
            Step::Literal(c)
        });
        i += 1;
    }
    Ok(steps)
}

fn digits(text: &[u8], at: usize, min: usize, max: usize) -> Option<(i64, usize)> {
    let mut end = at;
    let mut value: i64 = 0;
    while end < text.len() && end - at < max && text[end].is_ascii_digit() {
        value = value
            .checked_mul(10)?
            .checked_add(i64::from(text[end] - b'0'))?;
        end += 1;
    }
    (end - at >= min).then_some((value, end))
}

fn letters(text: &[u8], at: usize, min: usize, max: usize) -> Option<usize> {
    let mut end = at;
    while end < text.len() && end - at < max && text[end].is_ascii_alphabetic() {
        end += 1;
    }
    (end - at >= min).then_some(end)
}

fn month_of(name: &[u8], table: &[&[u8]; 12]) -> Option<i64> {
    let lower = name.to_ascii_lowercase();
    table
        .iter()
        .position(|m| *m == lower.as_slice())
        .map(|p| p as i64 + 1)
}

fn zone(text: &[u8], at: usize) -> Option<(i64, usize)> {
    if text.get(at) == Some(&b'Z') {
        return Some((0, at + 1));
    }
    let sign = match text.get(at) {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return None,
    };
    let (hours, mut end) = digits(text, at + 1, 2, 2)?;
    if text.get(end) == Some(&b':') {
        end += 1;
    }
    let (minutes, end) = digits(text, end, 2, 2)?;
    Some((sign * (hours * 3600 + minutes * 60), end))
}

impl Compiled {
    pub fn new(fmt: &str, offset: i64) -> Result<Self, String> {
        Ok(Self {
            steps: compile(fmt)?,
            offset,
            cache: Mutex::new(None),
        })
    }

    fn matches(&self, text: &[u8]) -> Option<Fields> {
        let mut f = Fields::default();
        let mut at = 0;
        for step in &self.steps {
            match *step {
                Step::Year4 => {
                    let (v, e) = digits(text, at, 4, 4)?;
                    set(&mut f.year, v);
                    at = e;
                }
                Step::Year2 => {
                    let (v, e) = digits(text, at, 2, 2)?;
                    set(&mut f.year2, v);
                    at = e;
                }
                Step::Month
                | Step::Day
                | Step::Hour
                | Step::Hour12
                | Step::Minute
                | Step::Second => {
                    let (v, e) = digits(text, at, 1, 2)?;
                    let slot = match *step {
                        Step::Month => &mut f.month,
                        Step::Day => &mut f.day,
                        Step::Hour => &mut f.hour,
                        Step::Hour12 => &mut f.hour12,
                        Step::Minute => &mut f.minute,
                        _ => &mut f.second,
                    };
                    set(slot, v);
                    at = e;
                }
                Step::DaySpaced | Step::HourSpaced => {
                    if text.get(at).is_some_and(u8::is_ascii_whitespace) {
                        at += 1;
                    }
                    let (v, e) = digits(text, at, 1, 2)?;
                    set(
                        if matches!(step, Step::DaySpaced) {
                            &mut f.day
                        } else {
                            &mut f.hour
                        },
                        v,
                    );
                    at = e;
                }
                Step::Fraction => {
                    let start = at;
                    while at < text.len() && text[at].is_ascii_digit() {
                        at += 1;
                    }
                    if at == start {
                        return None;
                    }
                    f.frac.get_or_insert((start, at));
                }
                Step::OptionalFraction(sep) => {
                    if text.get(at) == Some(&sep)
                        && text.get(at + 1).is_some_and(u8::is_ascii_digit)
                    {
                        let start = at + 1;
                        at = start;
                        while at < text.len() && text[at].is_ascii_digit() {
                            at += 1;
                        }
                        f.frac.get_or_insert((start, at));
                    }
                }
                Step::Zone => {
                    let (v, e) = zone(text, at)?;
                    set(&mut f.zone, v);
                    at = e;
                }
                Step::ZoneName => at = letters(text, at, 1, 5)?,
                Step::DayAbbr => at = letters(text, at, 3, 3)?,
                Step::DayName => at = letters(text, at, 1, usize::MAX)?,
                Step::MonthAbbr => {
                    let e = letters(text, at, 3, 3)?;
                    if f.month.is_none() {
                        f.month = Some(month_of(&text[at..e], &MONTHS)?);
                    }
                    at = e;
                }
                Step::MonthName => {
                    let e = letters(text, at, 1, usize::MAX)?;
                    if f.month.is_none() {
                        f.month = Some(month_of(&text[at..e], &MONTH_NAMES)?);
                    }
                    at = e;
                }
                Step::YearDay => {
                    let (v, e) = digits(text, at, 1, 3)?;
                    set(&mut f.yday, v);
                    at = e;
                }
                Step::AmPm => {
                    let a = text.get(at)?.to_ascii_lowercase();
                    let m = text.get(at + 1)?.to_ascii_lowercase();
                    if !(a == b'a' || a == b'p') || m != b'm' {
                        return None;
                    }
                    f.pm.get_or_insert(a == b'p');
                    at += 2;
                }
                Step::Epoch => {
                    let (v, e) = digits(text, at, 1, 18)?;
                    if text.get(e).is_some_and(u8::is_ascii_digit) {
                        return None; // beyond 64 bits: the reference's big integers decide
                    }
                    set(&mut f.epoch, v);
                    at = e;
                }
                Step::Space => {
                    let start = at;
                    while at < text.len() && text[at].is_ascii_whitespace() {
                        at += 1;
                    }
                    if at == start {
                        return None;
                    }
                }
                Step::Literal(c) => {
                    if text.get(at) != Some(&c) {
                        return None;
                    }
                    at += 1;
                }
            }
        }
        Some(f)
    }

    fn seconds(&self, f: &Fields) -> Option<i64> {
        if let Some(epoch) = f.epoch {
            return Some(epoch);
        }
        let year = f
            .year
            .or(f.year2.map(|y| 2000 + y))
            .unwrap_or_else(current_year);
        let month = f.month.unwrap_or(1);
        let day = f.day.unwrap_or(1);
        let mut hour = f.hour.or(f.hour12).unwrap_or(0);
        if let (Some(pm), Some(_)) = (f.pm, f.hour12) {
            hour = hour % 12 + if pm { 12 } else { 0 };
        }
        let minute = f.minute.unwrap_or(0);
        let second = f.second.unwrap_or(0);
        let mut seconds = if let Some(yday) = f.yday {
            days_from_civil(year, 1, 1) * 86_400
                + hour * 3600
                + minute * 60
                + second
                + (yday - 1) * 86_400
        } else {
            if !((1..=12).contains(&month)
                && (1..=31).contains(&day)
                && hour < 24
                && minute < 60
                && second <= 60)
            {
                return None;
            }
            days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        };
        seconds -= f.zone.unwrap_or(self.offset);
        Some(seconds)
    }

    /// Nanoseconds since the epoch, or None (the reference decides).
    pub fn parse_ns(&self, raw: &[u8]) -> Option<i64> {
        let text = raw.trim_ascii();
        if !text.is_ascii() {
            return None;
        }
        // A parser may be shared by threads (inputs with `threaded on`): a busy cache is skipped.
        if let Some((head, tail, seconds)) = self
            .cache
            .try_lock()
            .ok()
            .as_deref()
            .and_then(Option::as_ref)
        {
            if text.len() > head.len() + tail.len()
                && text.starts_with(head)
                && text.ends_with(tail)
            {
                let frac = &text[head.len()..text.len() - tail.len()];
                if frac.len() <= 9 && frac.iter().all(u8::is_ascii_digit) {
                    return Some(seconds * 1_000_000_000 + fraction_ns(frac));
                }
            }
        }
        let f = self.matches(text)?;
        let seconds = self.seconds(&f)?;
        let frac = f.frac.map_or(0, |(s, e)| fraction_ns(&text[s..e]));
        if let Some((s, e)) = f.frac {
            // Remembered only when what follows the fraction cannot be taken for more digits.
            if !text.get(e).is_some_and(u8::is_ascii_digit) && s > 0 {
                if let Ok(mut cache) = self.cache.try_lock() {
                    *cache = Some((text[..s].to_vec(), text[e..].to_vec(), seconds));
                }
            }
        }
        seconds.checked_mul(1_000_000_000)?.checked_add(frac)
    }
}

fn fraction_ns(digits: &[u8]) -> i64 {
    let mut value: i64 = 0;
    for i in 0..9 {
        value = value * 10 + digits.get(i).map_or(0, |d| i64::from(d - b'0'));
    }
    value
}

/// No `time_format`: RFC 3339 (any fraction length, zone optional) as the reference's automatic
/// mode takes it; anything else (epoch numbers, other ISO 8601 shapes) goes to the reference.
pub fn parse_rfc3339_ns(raw: &[u8], offset: i64) -> Option<i64> {
    let t = raw.trim_ascii();
    if t.len() < 19
        || t[4] != b'-'
        || t[7] != b'-'
        || !matches!(t[10], b'T' | b't' | b' ')
        || t[13] != b':'
        || t[16] != b':'
    {
        return None;
    }
    let num = |a: usize, n: usize| {
        digits(t, a, n, n)
            .filter(|&(_, e)| e == a + n)
            .map(|(v, _)| v)
    };
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    // fromisoformat's ranges: a real calendar day, no leap second.
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day < 1
        || day > month_days[(month - 1) as usize]
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let mut at = 19;
    let mut frac = 0;
    if t.get(at) == Some(&b'.') {
        let start = at + 1;
        at = start;
        while at < t.len() && t[at].is_ascii_digit() {
            at += 1;
        }
        if at == start {
            return None;
        }
        frac = fraction_ns(&t[start..at]);
    }
    let shift = if at == t.len() {
        offset
    } else if t[at] == b'z' && at + 1 == t.len() {
        0
    } else {
        let (z, end) = zone(t, at)?;
        if end != t.len() {
            return None;
        }
        z
    };
    let seconds =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - shift;
    Some(seconds * 1_000_000_000 + frac)
}

/// A `time_format` compiled once (`None`: the automatic RFC 3339 mode). For Python: tests
/// compare it with the reference parser, and the JSON lines scan takes one.
#[pyclass(module = "kubetrail_native", frozen)]
pub struct TimeFormat {
    pub compiled: Option<Compiled>,
    pub offset: i64,
}

impl TimeFormat {
    pub fn parse(&self, raw: &[u8]) -> Option<i64> {
        match &self.compiled {
            Some(c) => c.parse_ns(raw),
            None => parse_rfc3339_ns(raw, self.offset),
        }
    }
}

#[pymethods]
impl TimeFormat {
    #[new]
    #[pyo3(signature = (fmt, offset_seconds=0))]
    fn new(fmt: Option<&str>, offset_seconds: i64) -> PyResult<Self> {
        let compiled = match fmt {
            Some(f) => Some(Compiled::new(f, offset_seconds).map_err(PyValueError::new_err)?),
            None => None,
        };
        Ok(Self {
            compiled,
            offset: offset_seconds,
        })
    }

    /// Nanoseconds since the epoch, or None when this parser does not take the text.
    fn parse_ns(&self, text: &str) -> Option<i64> {
        self.parse(text.as_bytes())
    }
}
