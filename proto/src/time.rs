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
}
