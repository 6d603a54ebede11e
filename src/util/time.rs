//! Clocks and timestamps: unix time in milliseconds (what the store keeps) and seconds
//! (what provider APIs speak), and their RFC 3339 text.

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    now_ms() / 1000
}

/// RFC 3339 text of a time in unix milliseconds (`2026-11-27T18:36:02.123Z`).
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// RFC 3339 text of a time in unix seconds, with microseconds as provider APIs write them
/// (`2026-11-27T18:36:02.000000Z`).
pub fn rfc3339_micros(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map(|s| s.replace('Z', ".000000Z"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_read_as_people_and_providers_write_them() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.5Z");
        assert_eq!(rfc3339_micros(60), "1970-01-01T00:01:00.000000Z");
    }
}
