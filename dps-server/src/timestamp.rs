//! Timestamps as Azure writes them: UTC with seven fractional digits
//! (`2026-12-01T11:25:54.1234567Z`). The .NET SDK parses nine digits only through a slow
//! fallback.

use time::OffsetDateTime;

/// The current time.
pub fn now() -> String {
    format(OffsetDateTime::now_utc())
}

/// `at` in UTC, to the 100 ns.
pub fn format(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.nanosecond() / 100
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::format_description::well_known::Rfc3339;

    #[test]
    fn seven_fractional_digits_that_read_back() {
        let at = OffsetDateTime::parse("2026-12-01T09:05:03.123456789+02:00", &Rfc3339).unwrap();
        let written = format(at);
        assert_eq!(written, "2026-12-01T07:05:03.1234567Z");
        let read = OffsetDateTime::parse(&written, &Rfc3339).unwrap();
        assert_eq!(read.unix_timestamp(), at.unix_timestamp());
        let whole = OffsetDateTime::parse("2026-01-02T03:04:05Z", &Rfc3339).unwrap();
        assert_eq!(format(whole), "2026-01-02T03:04:05.0000000Z");
    }
}
