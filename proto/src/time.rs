//! Calendar formatting of Unix times (UTC), without a date library: receipts, webhooks and the CLI show dates.

/// `(year, month, day)` of a day count since 1970-01-01, in the proleptic Gregorian calendar (the inverse of the
/// well-known days-from-civil computation, exact for every day count).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Day count since 1970-01-01 of a proleptic Gregorian date (days-from-civil).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Milliseconds since the Unix epoch at 00:00 UTC of a `YYYY-MM-DD` date from 1970 on; `None` for anything else
/// (the inverse of [`date`], which it must round-trip).
pub fn parse_date(s: &str) -> Option<u64> {
    let mut parts = s.split('-');
    let (Some(y), Some(m), Some(d), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    let ms = u64::try_from(days_from_civil(y, m, d)).ok()?.checked_mul(86_400_000)?;
    (date(ms) == s).then_some(ms)
}

/// `YYYY-MM-DD` of `ms` milliseconds since the Unix epoch.
pub fn date(ms: u64) -> String {
    let (y, m, d) = civil_from_days((ms / 86_400_000) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// RFC 3339 UTC timestamp with milliseconds, e.g. `2026-11-24T08:15:03.123Z`.
pub fn rfc3339(ms: u64) -> String {
    let secs_of_day = (ms / 1000) % 86_400;
    format!(
        "{}T{:02}:{:02}:{:02}.{:03}Z",
        date(ms),
        secs_of_day / 3600,
        (secs_of_day / 60) % 60,
        secs_of_day % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400_000), "2000-02-29");
        assert_eq!(date(1_795_507_359_132), "2026-11-24");
        assert_eq!(rfc3339(1_795_507_359_132), "2026-11-24T08:02:39.132Z");
        assert_eq!(date(253_402_300_799_000), "9999-12-31");
    }

    #[test]
    fn dates_parse_back_exactly() {
        for ms in [0u64, 86_400_000, 951_782_400_000, 1_700_000_000_000 / 86_400_000 * 86_400_000] {
            assert_eq!(parse_date(&date(ms)), Some(ms), "{}", date(ms));
        }
        assert_eq!(parse_date("2024-02-29"), Some(1_709_164_800_000));
        for bad in ["2023-02-29", "2024-13-01", "2024-1-01", "24-01-01", "2024-01-01T00", "1969-12-31", "", "x"] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }
}
