//! FHIR date, dateTime and instant values as half-open ranges of UTC microseconds.
//!
//! A FHIR date is as precise as it is written: `2020` means all of 2020, `2020-03-04T10:00Z`
//! the whole minute. Search compares such ranges (R4 search, "date" parameters), so values are
//! parsed into `[low, high)` rather than a single instant.

use chrono::{FixedOffset, NaiveDate, NaiveTime, TimeZone as _};

use crate::model::to_micros;

/// A half-open range `[low, high)` of microseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateRange {
    /// First microsecond inside the range.
    pub low: i64,
    /// First microsecond after the range.
    pub high: i64,
}

impl DateRange {
    /// The one-microsecond range of an instant.
    pub fn instant(us: i64) -> Self {
        DateRange {
            low: us,
            high: us.saturating_add(1),
        }
    }
}

/// Parses a FHIR `date`, `dateTime` or `instant` (and the partial forms search allows, such as
/// `2020-01-02T10:00`) into the range it denotes. A time without a zone is taken as UTC.
/// Returns `None` for anything that is not such a value.
pub fn parse_fhir_date(s: &str) -> Option<DateRange> {
    let (date_part, time_part) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut fields = date_part.split('-');
    let year: i32 = digits(fields.next()?, 4)?;
    let month = match fields.next() {
        Some(m) => Some(digits::<u8>(m, 2)?),
        None => None,
    };
    let day = match fields.next() {
        Some(d) => Some(digits::<u8>(d, 2)?),
        None => None,
    };
    if fields.next().is_some() {
        return None;
    }
    match (month, day, time_part) {
        (None, None, None) => {
            let start = NaiveDate::from_ymd_opt(year, 1, 1)?;
            let end = NaiveDate::from_ymd_opt(year.checked_add(1)?, 1, 1)?;
            Some(span(start, end))
        }
        (Some(m), None, None) => {
            let start = NaiveDate::from_ymd_opt(year, u32::from(m), 1)?;
            let end = if m == 12 {
                NaiveDate::from_ymd_opt(year.checked_add(1)?, 1, 1)?
            } else {
                NaiveDate::from_ymd_opt(year, u32::from(m) + 1, 1)?
            };
            Some(span(start, end))
        }
        (Some(m), Some(d), None) => {
            let start = NaiveDate::from_ymd_opt(year, u32::from(m), u32::from(d))?;
            Some(span(start, start.succ_opt()?))
        }
        (Some(m), Some(d), Some(t)) => {
            let date = NaiveDate::from_ymd_opt(year, u32::from(m), u32::from(d))?;
            parse_time(date, t)
        }
        _ => None,
    }
}

fn span(start: NaiveDate, end: NaiveDate) -> DateRange {
    let midnight = |d: NaiveDate| to_micros(d.and_time(NaiveTime::MIN).and_utc());
    DateRange {
        low: midnight(start),
        high: midnight(end),
    }
}

fn parse_time(date: NaiveDate, t: &str) -> Option<DateRange> {
    // Split off the zone: `Z`, `+hh:mm` or `-hh:mm`.
    let (clock, offset) = if let Some(c) = t.strip_suffix('Z') {
        (c, FixedOffset::east_opt(0)?)
    } else if t.len() > 6 && matches!(t.as_bytes()[t.len() - 6], b'+' | b'-') {
        let (c, z) = t.split_at(t.len() - 6);
        let sign: i32 = if z.starts_with('-') { -1 } else { 1 };
        let (zh, zm) = z[1..].split_once(':')?;
        let (zh, zm): (i32, i32) = (digits(zh, 2)?, digits(zm, 2)?);
        if zh > 23 || zm > 59 {
            return None;
        }
        (c, FixedOffset::east_opt(sign * (zh * 3600 + zm * 60))?)
    } else {
        (t, FixedOffset::east_opt(0)?)
    };
    let mut parts = clock.split(':');
    let hour: u8 = digits(parts.next()?, 2)?;
    let minute: u8 = digits(parts.next()?, 2)?;
    let (second, frac, width_us): (u8, u32, i64) = match parts.next() {
        None => (0, 0, 60_000_000),
        Some(sec) => match sec.split_once('.') {
            None => (digits(sec, 2)?, 0, 1_000_000),
            Some((s, f)) => {
                if f.is_empty() || f.len() > 9 || !f.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                // Precision beyond microseconds cannot be stored; round the range out to 1 µs.
                let kept = &f[..f.len().min(6)];
                let micros: u32 = kept.parse().ok()?;
                let scale = 10u32.pow(6 - kept.len() as u32);
                (digits(s, 2)?, micros * scale, i64::from(scale))
            }
        },
    };
    if parts.next().is_some() {
        return None;
    }
    let time =
        NaiveTime::from_hms_micro_opt(u32::from(hour), u32::from(minute), u32::from(second), frac)
            .filter(|_| frac < 1_000_000)?;
    let local = offset.from_local_datetime(&date.and_time(time)).single()?;
    let low = to_micros(local.to_utc());
    Some(DateRange {
        low,
        high: low.checked_add(width_us)?,
    })
}

fn digits<T: std::str::FromStr>(s: &str, width: usize) -> Option<T> {
    if s.len() == width && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// A search prefix (R4 search §3.1.1.4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prefix {
    /// equal: the target range lies within the search range.
    Eq,
    /// not equal.
    Ne,
    /// greater than: part of the target lies above the search range.
    Gt,
    /// less than: part of the target lies below the search range.
    Lt,
    /// greater or equal.
    Ge,
    /// less or equal.
    Le,
    /// starts after the end of the search range.
    Sa,
    /// ends before the start of the search range.
    Eb,
    /// approximately: the ranges overlap once the search range is widened by 10%.
    Ap,
}

impl Prefix {
    /// Splits a two-letter prefix off a value, if there is one.
    pub fn split(value: &str) -> (Prefix, &str) {
        let table = [
            ("eq", Prefix::Eq),
            ("ne", Prefix::Ne),
            ("gt", Prefix::Gt),
            ("lt", Prefix::Lt),
            ("ge", Prefix::Ge),
            ("le", Prefix::Le),
            ("sa", Prefix::Sa),
            ("eb", Prefix::Eb),
            ("ap", Prefix::Ap),
        ];
        for (p, prefix) in table {
            if let Some(rest) = value.strip_prefix(p) {
                if rest.starts_with(|c: char| c.is_ascii_digit()) {
                    return (prefix, rest);
                }
            }
        }
        (Prefix::Eq, value)
    }
}

/// One date value of a search: a prefix and the range the written value denotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateValue {
    /// How the stored range must relate to `range`.
    pub prefix: Prefix,
    /// The searched range.
    pub range: DateRange,
}

impl DateValue {
    /// The search range widened for `ap`: by 10% of its distance from `now`, and at least by
    /// its own width, as the spec leaves the exact amount to the server.
    pub fn approximate_bounds(&self, now: i64) -> DateRange {
        let r = self.range;
        let distance = (now.saturating_sub(r.low)).unsigned_abs() / 10;
        let pad = i64::try_from(distance)
            .unwrap_or(i64::MAX)
            .max(r.high - r.low);
        DateRange {
            low: r.low.saturating_sub(pad),
            high: r.high.saturating_add(pad),
        }
    }

    /// Whether a stored range matches, by the prefix's rule. Backends that evaluate in memory use
    /// this; SQL backends translate the same rules into predicates.
    pub fn matches(&self, stored: DateRange, now: i64) -> bool {
        let q = self.range;
        let within = stored.low >= q.low && stored.high <= q.high;
        match self.prefix {
            Prefix::Eq => within,
            Prefix::Ne => !within,
            Prefix::Gt => stored.high > q.high,
            Prefix::Lt => stored.low < q.low,
            Prefix::Ge => stored.high > q.high || within,
            Prefix::Le => stored.low < q.low || within,
            Prefix::Sa => stored.low >= q.high,
            Prefix::Eb => stored.high <= q.low,
            Prefix::Ap => {
                let a = self.approximate_bounds(now);
                stored.low < a.high && stored.high > a.low
            }
        }
    }
}

/// A date predicate over a single instant column, as SQL backends need it: `column >= ge` and
/// `column < lt` (each when present), the whole negated when `negated`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstantPredicate {
    /// Inclusive lower bound.
    pub ge: Option<i64>,
    /// Exclusive upper bound.
    pub lt: Option<i64>,
    /// Whether the bounds describe what must NOT hold.
    pub negated: bool,
}

impl DateValue {
    /// Translates this value into bounds on an instant `t` (a stored range `[t, t+1)`), with the
    /// same meaning as [`DateValue::matches`].
    pub fn instant_predicate(&self, now: i64) -> InstantPredicate {
        let q = self.range;
        let p = |ge, lt, negated| InstantPredicate { ge, lt, negated };
        match self.prefix {
            Prefix::Eq => p(Some(q.low), Some(q.high), false),
            Prefix::Ne => p(Some(q.low), Some(q.high), true),
            Prefix::Gt | Prefix::Sa => p(Some(q.high), None, false),
            Prefix::Lt | Prefix::Eb => p(None, Some(q.low), false),
            Prefix::Ge => p(Some(q.low), None, false),
            Prefix::Le => p(None, Some(q.high), false),
            Prefix::Ap => {
                let a = self.approximate_bounds(now);
                p(Some(a.low), Some(a.high), false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(s: &str) -> i64 {
        let t = chrono::DateTime::parse_from_rfc3339(s).expect("rfc3339");
        to_micros(t.to_utc())
    }

    #[test]
    fn precision_decides_the_range() {
        let y = parse_fhir_date("2020").expect("year");
        assert_eq!(
            (y.low, y.high),
            (us("2020-01-01T00:00:00Z"), us("2021-01-01T00:00:00Z"))
        );
        let m = parse_fhir_date("2020-12").expect("month");
        assert_eq!(
            (m.low, m.high),
            (us("2020-12-01T00:00:00Z"), us("2021-01-01T00:00:00Z"))
        );
        let feb = parse_fhir_date("2024-02").expect("leap month");
        assert_eq!(feb.high - feb.low, 29 * 86_400_000_000);
        let d = parse_fhir_date("2020-02-29").expect("leap day");
        assert_eq!(d.high - d.low, 86_400_000_000);
        let min = parse_fhir_date("2020-01-02T10:30").expect("minute");
        assert_eq!(min.low, us("2020-01-02T10:30:00Z"));
        assert_eq!(min.high - min.low, 60_000_000);
        let s = parse_fhir_date("2020-01-02T10:30:05+02:00").expect("second");
        assert_eq!(s.low, us("2020-01-02T08:30:05Z"));
        assert_eq!(s.high - s.low, 1_000_000);
        let ms = parse_fhir_date("2020-01-02T10:30:05.12Z").expect("fraction");
        assert_eq!(ms.low, us("2020-01-02T10:30:05.12Z"));
        assert_eq!(ms.high - ms.low, 10_000);
    }

    #[test]
    fn malformed_dates_are_rejected() {
        for bad in [
            "",
            "20",
            "2020-13",
            "2020-02-30",
            "2020-1-01",
            "2020-01-01T25:00",
            "2020-01-01T",
            "2020-01-01T10",
            "abc",
            "2020-01-01T10:00:00.Z",
            "2020-01-01T10:00:00+0200",
            "2020-01-01T10:00:00.1234567890Z",
        ] {
            assert!(parse_fhir_date(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn prefixes_follow_range_semantics() {
        let q = |p: &str| {
            let (prefix, rest) = Prefix::split(p);
            DateValue {
                prefix,
                range: parse_fhir_date(rest).expect("date"),
            }
        };
        let inside = DateRange::instant(us("2020-06-01T00:00:00Z"));
        let before = DateRange::instant(us("2019-12-31T23:59:59Z"));
        let after = DateRange::instant(us("2021-01-01T00:00:00Z"));
        let now = us("2026-01-01T00:00:00Z");
        let check = |v: &str, r: DateRange| q(v).matches(r, now);
        assert!(check("2020", inside) && !check("2020", before) && !check("2020", after));
        assert!(check("ne2020", before) && !check("ne2020", inside));
        assert!(check("gt2020", after) && !check("gt2020", inside));
        assert!(check("lt2020", before) && !check("lt2020", inside));
        assert!(check("ge2020", inside) && check("ge2020", after) && !check("ge2020", before));
        assert!(check("le2020", inside) && check("le2020", before) && !check("le2020", after));
        assert!(check("sa2020", after) && !check("sa2020", inside));
        assert!(check("eb2020", before) && !check("eb2020", inside));
        assert!(check("ap2020", inside) && check("ap2020", before));
        // A stored range straddling the search range's start is neither eq nor eb.
        let straddle = parse_fhir_date("2019-12").map(|r| DateRange {
            low: r.low,
            high: us("2020-01-15T00:00:00Z"),
        });
        let straddle = straddle.expect("range");
        assert!(!check("2020", straddle) && !check("eb2020", straddle));
        assert!(check("lt2020", straddle) && check("le2020", straddle));
    }

    #[test]
    fn instant_predicates_agree_with_range_matching() {
        let now = us("2026-01-01T00:00:00Z");
        let instants = [
            "2019-12-31T23:59:59.999999Z",
            "2020-01-01T00:00:00Z",
            "2020-07-01T12:00:00Z",
            "2020-12-31T23:59:59.999999Z",
            "2021-01-01T00:00:00Z",
            "2019-06-01T00:00:00Z",
        ];
        for prefix in ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"] {
            let written = format!("{prefix}2020");
            let (p, rest) = Prefix::split(&written);
            let v = DateValue {
                prefix: p,
                range: parse_fhir_date(rest).expect("date"),
            };
            let pred = v.instant_predicate(now);
            for i in instants {
                let t = us(i);
                let inside = pred.ge.is_none_or(|g| t >= g) && pred.lt.is_none_or(|l| t < l);
                assert_eq!(
                    inside != pred.negated,
                    v.matches(DateRange::instant(t), now),
                    "{prefix} at {i}"
                );
            }
        }
    }

    #[test]
    fn prefix_needs_a_digit_after_it() {
        assert_eq!(Prefix::split("ge2020"), (Prefix::Ge, "2020"));
        assert_eq!(Prefix::split("2020"), (Prefix::Eq, "2020"));
        assert_eq!(Prefix::split("gender"), (Prefix::Eq, "gender"));
    }
}
