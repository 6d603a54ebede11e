//! Opening the PostgreSQL store: a pool on a `postgres://` URL, the migrations under
//! `migrations/postgres`, optionally inside a schema of its own.
//!
//! Several workers on several machines share one database; what keeps them apart is in the
//! SQL ([`super::sql`]): `FOR UPDATE SKIP LOCKED` claims and lease tokens. The URL may carry
//! a password: only [`redact_url`]'s form of it is ever printed or stored, and a URL that
//! cannot be used is explained ([`url_problem`]) without quoting it.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::db::Db;
use super::{Result, SqlStore, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Whether a `--db` value names a PostgreSQL database rather than a SQLite file.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// The URL with its password (and any `password=` parameter) replaced by `***`. A URL that
/// does not parse is shown as `postgres://(unparsable URL: WHY)`, never as given (WHY is the
/// parser's message, which never quotes the input).
pub fn redact_url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k.eq_ignore_ascii_case("password") {
                        "***".to_string()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if !pairs.is_empty() {
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(e) => format!("postgres://(unparsable URL: {e})"),
    }
}

/// What is wrong with a URL that does not parse: the parser's message (it never quotes the
/// input) and, for the errors that characters in a password often cause, [`encoding_hint`].
fn parse_problem(s: &str, e: url::ParseError) -> String {
    match encoding_hint(s, e) {
        Some(hint) => format!("{e}; {hint}"),
        None => e.to_string(),
    }
}

fn encoding_hint(s: &str, e: url::ParseError) -> Option<&'static str> {
    (s.contains('@')
        && matches!(
            e,
            url::ParseError::InvalidPort
                | url::ParseError::EmptyHost
                | url::ParseError::InvalidDomainCharacter
        ))
    .then_some(
        "a user name or password holding `/`, `?`, `#`, `@` or `:` must be percent-encoded (`/` as %2F)",
    )
}

/// Why `url` cannot be used to connect (`None`: it can), in words that never include its
/// password: the URL parser's complaint, or the driver's with any password in it replaced by
/// `***`.
pub fn url_problem(url: &str) -> Option<String> {
    let parsed = match url::Url::parse(url) {
        Ok(u) => u,
        Err(e) => return Some(parse_problem(url, e)),
    };
    let err = PgConnectOptions::from_str(url).err()?;
    // sqlx wraps some of its errors twice: "error with configuration: error with …".
    let mut msg = err.to_string();
    while let Some(m) = msg.strip_prefix("error with configuration: ") {
        msg = m.to_string();
    }
    let mut secrets: Vec<String> = Vec::new();
    if let Some(pw) = parsed.password() {
        secrets.push(pw.to_string());
        secrets.push(percent_decode(pw));
    }
    for (k, v) in parsed.query_pairs() {
        if k.eq_ignore_ascii_case("password") {
            secrets.push(v.into_owned());
        }
    }
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        msg = msg.replace(secret.as_str(), "***");
    }
    Some(msg)
}

/// `%XX` escapes decoded (a password as the driver will see it).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |j: usize| bytes.get(j).and_then(|&b| (b as char).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The error for a URL [`url_problem`] finds fault with, saying each thing once: an
/// unparsable URL's [`redact_url`] form carries the parser's reason already.
fn unusable(url: &str) -> StoreError {
    let why = match url::Url::parse(url) {
        Err(e) => encoding_hint(url, e).map(str::to_string),
        Ok(_) => Some(url_problem(url).unwrap_or_else(|| "rejected by the driver".into())),
    };
    StoreError::Invalid(match why {
        Some(why) => format!("{} is not a usable PostgreSQL URL: {why}", redact_url(url)),
        None => format!("{} is not a usable PostgreSQL URL", redact_url(url)),
    })
}

/// A schema name we create and quote ourselves: `^[a-z_][a-z0-9_]{0,62}$`.
pub fn valid_schema(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The URL with `search_path` set to `schema` (for another process to open the same
/// store with [`SqlStore::open_postgres`]).
pub fn with_search_path(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

/// Drops a schema made by [`SqlStore::open_postgres_in`] (benchmarks, tests).
pub async fn drop_schema(url: &str, schema: &str) -> Result<()> {
    if !valid_schema(schema) {
        return Err(StoreError::Invalid(format!("schema name `{schema}`")));
    }
    let opts = PgConnectOptions::from_str(url).map_err(|_| unusable(url))?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(())
}

impl SqlStore {
    /// Connects to PostgreSQL and applies migrations (in the URL's `search_path`, normally
    /// `public`).
    pub async fn open_postgres(url: &str) -> Result<Self> {
        Self::open_postgres_in(url, None).await
    }

    /// Connects and keeps every table in `schema` (created if missing); tests give each
    /// its own, so they run side by side on one database.
    pub async fn open_postgres_in(url: &str, schema: Option<&str>) -> Result<Self> {
        let location = redact_url(url);
        // sqlx's own URL errors may quote the URL: say what failed without it.
        let mut opts = PgConnectOptions::from_str(url).map_err(|_| unusable(url))?;
        // A runaway statement must not hold locks other workers wait on. And no JIT
        // compilation: a store without statistics yet (a first night) estimates its passes
        // over a run as costly enough to compile, and compiling took 0.1–0.2 s a statement,
        // as long as running it (a run's figures at 100,000 records: 1.5 → 1.0 s).
        opts = opts.options([("statement_timeout", "300s"), ("jit", "off")]);
        if let Some(schema) = schema {
            if !valid_schema(schema) {
                return Err(StoreError::Invalid(format!(
                    "schema name `{schema}` must match ^[a-z_][a-z0-9_]{{0,62}}$"
                )));
            }
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts.clone())
                .await?;
            // The name is checked above and quoted: it is never user text inside SQL.
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .execute(&admin)
                .await?;
            admin.close().await;
            opts = opts.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(SqlStore {
            db: Db::Postgres(pool),
            location,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_survive_redaction() {
        let r = redact_url("postgres://app:s3cret@db.internal:5432/jobs?sslmode=require");
        assert!(!r.contains("s3cret"), "{r}");
        assert!(r.contains("app:***@db.internal"), "{r}");
        let r = redact_url("postgres://db/jobs?user=app&password=s3cret");
        assert!(!r.contains("s3cret"), "{r}");
    }

    #[test]
    fn an_unusable_url_says_what_is_wrong_without_its_password() {
        // A `/` in the password ends the authority early: `pa55` is then read as the port.
        let url = "postgres://app:pa55/word@db.internal:5432/jobs";
        let shown = redact_url(url);
        assert!(!shown.contains("pa55"), "{shown}");
        assert_eq!(shown, "postgres://(unparsable URL: invalid port number)");
        let why = url_problem(url).unwrap();
        assert!(why.contains("invalid port number"), "{why}");
        assert!(why.contains("percent-encoded"), "{why}");
        let err = unusable(url).to_string();
        assert!(!err.contains("pa55"), "{err}");
        assert_eq!(err.matches("invalid port number").count(), 1, "{err}");
        assert!(err.contains("percent-encoded"), "{err}");
        let shown = redact_url("postgres://app:s3cret@db.internal:99999/jobs");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("invalid port number"), "{shown}");
        let shown = redact_url("postgres://app:s3cret@/jobs");
        assert!(!shown.contains("s3cret"), "{shown}");

        // Parses, but the driver refuses it: its reason, the password still hidden.
        let url = "postgres://app:s3cret@db.internal/jobs?sslmode=sometimes";
        let why = url_problem(url).unwrap();
        assert!(why.starts_with("unknown value \"sometimes\""), "{why}");
        assert!(!why.contains("s3cret"), "{why}");
        let err = unusable(url).to_string();
        assert!(err.contains("app:***@db.internal"), "{err}");
        assert!(err.contains("sometimes"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        let url = "postgres://db/jobs?password=s3cret&sslmode=s3cret";
        let why = url_problem(url).unwrap();
        assert!(!why.contains("s3cret"), "{why}");

        assert_eq!(url_problem("postgres://app:s3cret@db.internal/jobs"), None);
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(valid_schema("nightshift_test_1"));
        assert!(!valid_schema("Bad"));
        assert!(!valid_schema("x\"; DROP TABLE runs; --"));
        assert!(!valid_schema(""));
    }
}
