//! Keeps API keys out of the text providers send back.
//!
//! A provider (or a proxy in front of it) may echo credentials: `Incorrect API key
//! provided: sk-…` with the whole key, or a 5xx page quoting the request headers. Every
//! provider-originated text (error bodies and messages, transport errors, result-line
//! errors, batch errors) passes through a [`Redactor`] built from the client's key before
//! it is logged, stored or shown, and before it is cut to a preview.
//!
//! Two kinds of masking, both to `***`:
//! - the configured key itself, and any piece of it of [`FRAGMENT`] bytes or more (what a
//!   server that truncates its echo leaves behind);
//! - credential shapes, whatever the key: `Bearer <token>`, `Authorization:`, `api-key:`,
//!   `x-api-key:`, `x-goog-api-key:`, `x-amz-security-token:` header echoes,
//!   `key=`/`token=`/`sig=` and AWS presigned-URL (`X-Amz-Security-Token=`, …) query values,
//!   `user:password@` in URLs, `sk-…` (OpenAI, Anthropic) and `AIza…` (Google) tokens.
//!
//! Model answers are data: only the key (and its pieces) is masked in them, never shapes.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::LazyLock;

use aho_corasick::AhoCorasick;
use regex::{Regex, RegexSet};
use secrecy::{ExposeSecret, SecretString};

use super::{LineOutcome, ProviderError, RemoteBatch, ResultLine};
use crate::util::text::preview;

/// What a masked secret becomes.
pub const MASK: &str = "***";

/// The shortest piece of the key that is masked on its own (12 base-62 characters are
/// about 71 bits: never a chance match, and too much of a key to show).
pub const FRAGMENT: usize = 12;

/// Keys shorter than this are masked only by shape: masking every occurrence of a
/// two-letter "key" would garble every message, and no provider issues such keys.
pub const MIN_KEY_LEN: usize = 8;

/// Credential shapes, masked in every provider text whatever the key.
static SHAPES: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    let r = |re: &str| Regex::new(re).expect("a valid pattern");
    vec![
        // `scheme://user:password@host`
        (
            r(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@'\x22]+:[^/\s@'\x22]+@"),
            "${1}***@",
        ),
        // Header echoes, in any quoting: `Authorization: Bearer …`, `"api-key": "…"`,
        // `x-api-key=…`, `['x-goog-api-key': '…']`.
        (
            r(
                r"(?i)\b((?:proxy-)?authorization|x-goog-api-key|x-api-key|x-amz-security-token|api[-_]?key)([\\\x22']*\s*[:=][\s\[\\\x22']*)((?:bearer|basic|token|aws4-hmac-sha256)\s+)?[^\s\\\x22',;&}<>\]]+",
            ),
            "${1}${2}${3}***",
        ),
        (r(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}"), "${1} ***"),
        // Credentials in a query string.
        (
            r(
                r"(?i)([?&;](?:key|api[-_]?key|access_token|token|sig|signature|x-amz-security-token|x-amz-signature|x-amz-credential)=)[^&\s#\\\x22'<>]+",
            ),
            "${1}***",
        ),
        // Provider key shapes: OpenAI `sk-…`, `sk-proj-…`, Anthropic `sk-ant-…`, Google `AIza…`.
        (
            r(r"\b(?:sk-[A-Za-z0-9_-]{16,}|AIza[0-9A-Za-z_-]{30,})"),
            MASK,
        ),
    ]
});

/// The patterns of [`SHAPES`] as one set: most texts (a model name, `stop`: two on every
/// result line) match none, and one pass over the text says so where five searches did.
/// A text any of them matches goes through all five in order, as before.
static ANY_SHAPE: LazyLock<RegexSet> = LazyLock::new(|| {
    RegexSet::new(SHAPES.iter().map(|(re, _)| re.as_str())).expect("valid patterns")
});

/// Masks the client's key and credential shapes in provider-originated text.
pub struct Redactor {
    /// Every [`FRAGMENT`]-byte window of the key (or the whole key when shorter).
    key: Option<AhoCorasick>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("key", &self.key.as_ref().map(|_| "**REDACTED**"))
            .finish()
    }
}

impl Redactor {
    /// A redactor for `key`.
    pub fn new(key: &SecretString) -> Redactor {
        let k = key.expose_secret().as_bytes();
        if k.len() < MIN_KEY_LEN {
            return Redactor::shapes_only();
        }
        let patterns: Vec<&[u8]> = if k.len() <= FRAGMENT {
            vec![k]
        } else {
            k.windows(FRAGMENT).collect()
        };
        Redactor {
            key: AhoCorasick::new(patterns).ok(),
        }
    }

    /// A redactor that knows no key: credential shapes only.
    pub fn shapes_only() -> Redactor {
        Redactor { key: None }
    }

    /// Byte ranges of `s` that are the key or pieces of it, merged, on char boundaries.
    fn key_ranges(&self, s: &str) -> Vec<Range<usize>> {
        let Some(ac) = &self.key else {
            return Vec::new();
        };
        let mut out: Vec<Range<usize>> = Vec::new();
        // All patterns have one length, so matches come in order of their start.
        for m in ac.find_overlapping_iter(s) {
            let (mut a, mut b) = (m.start(), m.end());
            while !s.is_char_boundary(a) {
                a -= 1;
            }
            while !s.is_char_boundary(b) {
                b += 1;
            }
            match out.last_mut() {
                Some(r) if a <= r.end => r.end = r.end.max(b),
                _ => out.push(a..b),
            }
        }
        out
    }

    /// `s` with the key and its pieces masked; no shapes (for model answers).
    pub fn scrub_key<'a>(&self, s: &'a str) -> Cow<'a, str> {
        let ranges = self.key_ranges(s);
        if ranges.is_empty() {
            return Cow::Borrowed(s);
        }
        let mut out = String::with_capacity(s.len());
        let mut at = 0;
        for r in ranges {
            out.push_str(&s[at..r.start]);
            out.push_str(MASK);
            at = r.end;
        }
        out.push_str(&s[at..]);
        Cow::Owned(out)
    }

    /// `s` with the key, its pieces and every credential shape masked.
    pub fn scrub<'a>(&self, s: &'a str) -> Cow<'a, str> {
        let mut text = self.scrub_key(s);
        if !ANY_SHAPE.is_match(&text) {
            return text;
        }
        for (re, with) in SHAPES.iter() {
            let replaced = match re.replace_all(&text, *with) {
                Cow::Owned(o) => Some(o),
                Cow::Borrowed(_) => None,
            };
            if let Some(o) = replaced {
                text = Cow::Owned(o);
            }
        }
        text
    }

    /// [`Redactor::scrub`] for an owned string (no copy when nothing is masked).
    pub fn scrub_string(&self, s: String) -> String {
        let scrubbed = match self.scrub(&s) {
            Cow::Owned(o) => Some(o),
            Cow::Borrowed(_) => None,
        };
        scrubbed.unwrap_or(s)
    }

    /// The scrubbed text of at most the first `cap` bytes of `bytes`. When `bytes` is
    /// longer, the key may have been cut at the end, leaving a piece too short to
    /// recognise: the last `FRAGMENT - 1` characters are dropped as well.
    pub fn scrub_head(&self, bytes: &[u8], cap: usize) -> String {
        let cut = bytes.len() > cap;
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(cap)]);
        let mut out = self.scrub(&text).into_owned();
        if cut {
            let keep = out
                .char_indices()
                .rev()
                .nth(FRAGMENT - 2)
                .map_or(0, |(i, _)| i);
            out.truncate(keep);
        }
        out
    }

    /// The error with every provider text in it scrubbed (local I/O errors are ours).
    pub fn error(&self, e: ProviderError) -> ProviderError {
        use ProviderError as E;
        match e {
            E::Transient {
                status,
                retry_after,
                message,
            } => E::Transient {
                status,
                retry_after,
                message: self.scrub_string(message),
            },
            E::Ambiguous { message } => E::Ambiguous {
                message: self.scrub_string(message),
            },
            E::Permanent {
                status,
                code,
                message,
            } => E::Permanent {
                status,
                code: code.map(|c| self.scrub_string(c)),
                message: self.scrub_string(message),
            },
            E::Auth { status, message } => E::Auth {
                status,
                message: self.scrub_string(message),
            },
            E::Protocol(m) => E::Protocol(self.scrub_string(m)),
            other @ (E::TooLarge { .. } | E::Io(_)) => other,
        }
    }

    /// A result-line outcome with the provider's texts scrubbed: error messages, codes,
    /// refusals and model names fully; the answer itself of the key only.
    pub fn outcome(&self, o: LineOutcome) -> LineOutcome {
        match o {
            LineOutcome::Answer {
                content,
                refusal,
                finish_reason,
                model,
                usage,
            } => LineOutcome::Answer {
                content: content.map(|c| {
                    let scrubbed = match self.scrub_key(&c) {
                        Cow::Owned(o) => Some(o),
                        Cow::Borrowed(_) => None,
                    };
                    scrubbed.unwrap_or(c)
                }),
                refusal: refusal.map(|r| self.scrub_string(r)),
                finish_reason: finish_reason.map(|f| self.scrub_string(f)),
                model: model.map(|m| self.scrub_string(m)),
                usage,
            },
            LineOutcome::Error {
                status,
                code,
                message,
                usage,
            } => LineOutcome::Error {
                status,
                code: code.map(|c| self.scrub_string(c)),
                message: self.scrub_string(message),
                usage,
            },
            other @ (LineOutcome::Expired | LineOutcome::Cancelled) => other,
        }
    }

    /// A parsed result line (or the reason it could not be parsed, which may quote the
    /// line) scrubbed. The custom_id is ours and is kept as it is.
    pub fn result_line(&self, r: Result<ResultLine, String>) -> Result<ResultLine, String> {
        match r {
            Ok(l) => Ok(ResultLine {
                custom_id: l.custom_id,
                outcome: self.outcome(l.outcome),
            }),
            Err(e) => Err(self.scrub_string(e)),
        }
    }

    /// A batch as the provider described it, its status text scrubbed and its errors
    /// scrubbed, then bounded. Ids are kept: they name things at the provider and are
    /// checked where they reach a URL.
    pub fn batch(&self, mut b: RemoteBatch) -> RemoteBatch {
        b.raw_status = preview(&self.scrub(&b.raw_status), 100);
        b.errors = b
            .errors
            .into_iter()
            .map(|e| preview(&self.scrub(&e), 300))
            .collect();
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Usage;

    const KEY: &str = "sk-live-0123456789abcdefGHIJKLMNOPqrstuvWXYZ";

    fn r() -> Redactor {
        Redactor::new(&SecretString::from(KEY.to_string()))
    }

    #[test]
    fn the_exact_key_is_masked_wherever_it_stands() {
        let t = format!("Incorrect API key provided: {KEY}. You can find yours at x.");
        let s = r().scrub(&t).into_owned();
        assert!(!s.contains("0123456789abcdef"), "{s}");
        assert!(s.starts_with("Incorrect API key provided: ***"), "{s}");
        assert!(s.ends_with(". You can find yours at x."), "{s}");
        // Glued to other text, twice, and as the whole text.
        let t = format!("x{KEY}y{KEY}");
        assert_eq!(r().scrub_key(&t), "x***y***");
        assert_eq!(r().scrub_key(KEY), "***");
        // Without any shape around it: a key that does not look like one.
        let odd = "Zq7uXw2LpE9rT4yV1bN6mK3sD8fG5hJ0";
        let ro = Redactor::new(&SecretString::from(odd.to_string()));
        assert_eq!(ro.scrub(&format!("got key {odd} here")), "got key *** here");
    }

    #[test]
    fn pieces_of_the_key_a_truncated_echo_leaves_are_masked() {
        // A server that cut the key to its first 20 characters, or kept only its end.
        for piece in [&KEY[..20], &KEY[KEY.len() - 14..], &KEY[5..5 + FRAGMENT]] {
            let t = format!("key provided: {piece}… (truncated)");
            let s = r().scrub_key(&t).into_owned();
            assert!(!s.contains(piece), "{piece} in {s}");
            assert!(s.contains("key provided: ***"), "{s}");
        }
        // Shorter than FRAGMENT: ordinary text, left alone.
        assert_eq!(r().scrub_key("live-0123"), "live-0123");
    }

    #[test]
    fn a_key_cut_by_a_length_cap_leaves_nothing_behind() {
        let body = format!("{}error: key {KEY} refused", "x".repeat(100));
        for cap in 100..body.len() {
            let s = r().scrub_head(body.as_bytes(), cap);
            // No piece of 4 characters or more of the key survives, wherever the cut fell.
            for w in KEY.as_bytes().windows(4) {
                let w = std::str::from_utf8(w).unwrap();
                assert!(!s.contains(w), "cap {cap}: {w} in {s}");
            }
        }
        // Uncut: everything kept.
        assert_eq!(r().scrub_head(b"short body", 100), "short body".to_string());
    }

    #[test]
    fn echoed_headers_are_masked_in_any_quoting() {
        let r = Redactor::shapes_only();
        for (text, gone) in [
            ("Authorization: Bearer abcdefgh12345678", "abcdefgh12345678"),
            (
                r#"{"authorization":"Bearer tok_secret_1234"}"#,
                "tok_secret_1234",
            ),
            (
                r#"{'Authorization': ['Basic dXNlcjpwYXNz']}"#,
                "dXNlcjpwYXNz",
            ),
            (
                "api-key: 0123456789abcdef0123456789abcdef",
                "0123456789abcdef",
            ),
            (
                r#""x-api-key": "opaque-credential-value""#,
                "opaque-credential",
            ),
            (
                "X-Goog-Api-Key=gk-opaque-9876543210",
                "gk-opaque-9876543210",
            ),
            (r#"{\"api-key\":\"escaped-secret-1\"}"#, "escaped-secret-1"),
        ] {
            let s = r.scrub(text).into_owned();
            assert!(!s.contains(gone), "{text} -> {s}");
            assert!(s.contains(MASK), "{text} -> {s}");
        }
        // Headers that are not credentials stay readable.
        let t = "content-type: application/json\nhost: 127.0.0.1:8080";
        assert_eq!(r.scrub(t), t);
    }

    #[test]
    fn bearer_tokens_query_keys_and_key_shapes_are_masked() {
        let r = Redactor::shapes_only();
        for (text, gone) in [
            ("sent bearer eyJhbGciOi.payload.sig along", "eyJhbGciOi"),
            (
                "GET https://g.example/v1beta/models?alt=json&key=AIzaSyA-opaque_value&x=1",
                "AIzaSyA-opaque",
            ),
            ("GET /files?key=plainvalue", "plainvalue"),
            ("url?access_token=ya29.abc&x", "ya29.abc"),
            ("unknown key sk-proj-AbCdEfGhIjKlMnOpQrSt ok", "AbCdEfGh"),
            ("sk-ant-api03-ZYXWVUTSRQPONMLK_ji", "ZYXWVUTS"),
            ("AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI", "DdI0hCZ"),
            ("https://user:hunter2@proxy.example:8080/v1", "hunter2"),
            // AWS: an echoed session token, a SigV4 header, a presigned URL.
            (
                "headers: x-amz-security-token: IQoJb3JpZ2luX2VjEJr//////////wEaCXVz",
                "IQoJb3JpZ2lu",
            ),
            (
                "authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261205/us-east-1/s3/aws4_request",
                "AKIDEXAMPLE",
            ),
            (
                "GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIDX%2F2026&X-Amz-Security-Token=FwoGZXIvYXdz&X-Amz-Signature=abcdef0123",
                "FwoGZXIvYXdz",
            ),
        ] {
            let s = r.scrub(text).into_owned();
            assert!(!s.contains(gone), "{text} -> {s}");
        }
        // The rest of a URL stays, and so do ordinary words.
        let s = r.scrub("GET /files?key=plainvalue&limit=5").into_owned();
        assert_eq!(s, "GET /files?key=***&limit=5");
        for t in [
            "the task-1234567890123456789 failed",
            "a Bearer token is required",
        ] {
            assert_eq!(r.scrub(t), t);
        }
    }

    #[test]
    fn scrubbing_is_idempotent_and_keeps_json_valid() {
        let body = format!(
            r#"{{"error":{{"message":"Incorrect API key provided: {KEY}","headers":{{"authorization":"Bearer {KEY}"}}}}}}"#
        );
        let once = r().scrub(&body).into_owned();
        assert_eq!(r().scrub(&once), once);
        let v: serde_json::Value = serde_json::from_str(&once).unwrap();
        assert!(!v.to_string().contains(&KEY[8..20]));
    }

    #[test]
    fn answers_lose_only_the_key_errors_everything() {
        let o = r().outcome(LineOutcome::Answer {
            content: Some(format!(r#"{{"summary":"Bearer abcdefgh1234 {KEY}"}}"#)),
            refusal: Some(format!("no: {KEY}")),
            finish_reason: None,
            model: None,
            usage: Usage::default(),
        });
        let LineOutcome::Answer {
            content, refusal, ..
        } = o
        else {
            panic!()
        };
        assert_eq!(
            content.as_deref(),
            Some(r#"{"summary":"Bearer abcdefgh1234 ***"}"#)
        );
        assert_eq!(refusal.as_deref(), Some("no: ***"));
        let e = r().result_line(Err(format!("invalid type: string \"{KEY}\"")));
        assert_eq!(e.unwrap_err(), "invalid type: string \"***\"");
    }

    #[test]
    fn short_keys_are_not_masked_by_value_and_debug_hides_the_key() {
        let r = Redactor::new(&SecretString::from("k".to_string()));
        assert_eq!(r.scrub("keep this key"), "keep this key");
        let d = format!("{:?}", self::r());
        assert!(!d.contains("0123456789"), "{d}");
    }
}
