//! Text for people and logs: thousands separators, plurals, durations, bounded previews of
//! untrusted text, and escaping of control characters before text from a source file or a
//! provider reaches a terminal; and a JSON value's compact text.

/// A JSON value as compact JSON: the text its `Display` gives, written by serde_json straight
/// into the string (`Display` goes through the formatter a piece at a time, a cost that showed
/// on every record: a prompt's inserted object, a stored record, an answer).
pub fn compact_json(v: &serde_json::Value) -> String {
    serde_json::to_string(v).expect("a JSON value always serializes")
}

/// `1234567` → `1,234,567`.
pub fn n(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1 batch`, `3 batches` (with thousands separators).
pub fn plural(count: u64, one: &str, many: &str) -> String {
    format!("{} {}", n(count), if count == 1 { one } else { many })
}

/// Text that came from a source file or a provider, made safe to print on a terminal:
/// control characters (escape sequences, carriage returns) are shown escaped.
pub fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().collect::<String>()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A duration for people: `850ms`, `42s`, `3m05s`, `2h07m`.
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        m if m < 1000 => format!("{m}ms"),
        m if m < 60_000 => format!("{:.1}s", m as f64 / 1000.0),
        m if m < 3_600_000 => format!("{}m{:02}s", m / 60_000, (m / 1000) % 60),
        m => format!("{}h{:02}m", m / 3_600_000, (m / 60_000) % 60),
    }
}

/// At most `max` characters of `s`, for error texts that may quote model output.
pub fn preview(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(n(0), "0");
        assert_eq!(n(999), "999");
        assert_eq!(n(1000), "1,000");
        assert_eq!(n(1234567), "1,234,567");
    }

    #[test]
    fn control_characters_are_escaped_and_previews_bounded() {
        assert_eq!(printable("a\u{1b}[31mb"), "a\\u{1b}[31mb");
        assert_eq!(printable("plain"), "plain");
        assert_eq!(preview("abcdef", 3), "abc…");
        assert_eq!(plural(1, "batch", "batches"), "1 batch");
        assert_eq!(plural(1200, "batch", "batches"), "1,200 batches");
    }
}
