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

/// An age as people write it: a whole number and a unit, `s`, `m`, `h`, `d` or `w`
/// (`7d`, `36h`, `0s`).
pub fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit_secs = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => 0,
    };
    match num.parse::<u64>() {
        Ok(n) if unit_secs > 0 && n <= u64::MAX / unit_secs / 1000 => {
            Ok(std::time::Duration::from_secs(n * unit_secs))
        }
        _ => Err(format!(
            "`{text}` is not an age: a whole number and a unit, s, m, h, d or w (e.g. 7d, 36h, 0s)"
        )),
    }
}

/// An age in the largest unit up to days that divides it (`7d`, `36h`, `0s`).
pub fn age_text(d: std::time::Duration) -> String {
    let s = d.as_secs();
    for (unit, secs) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if s > 0 && s.is_multiple_of(secs) {
            return format!("{}{unit}", s / secs);
        }
    }
    format!("{s}s")
}

#[cfg(test)]
mod age_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ages_read_and_print_in_their_units() {
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_age("36h"), Ok(Duration::from_secs(36 * 3_600)));
        assert_eq!(parse_age("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_age("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(age_text(Duration::from_secs(36 * 3_600)), "36h");
        assert_eq!(age_text(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(age_text(Duration::ZERO), "0s");
        for bad in [
            "",
            "7",
            "d",
            "-1d",
            "1.5h",
            "7 days",
            "99999999999999999999d",
        ] {
            let e = parse_age(bad).unwrap_err();
            assert!(e.contains("is not an age"), "{bad}: {e}");
        }
    }
}
