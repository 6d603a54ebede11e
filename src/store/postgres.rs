//! Opening the PostgreSQL store: a pool on a `postgres://` URL, the migrations under
//! `migrations/postgres`, optionally inside a schema of its own.
//!
//! Several workers on several machines share one database; what keeps them apart is in the
//! SQL ([`super::sql`]): `FOR UPDATE SKIP LOCKED` claims and lease tokens. The URL may carry
//! a password: only [`redact_url`]'s form of it is ever printed or stored.

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

/// The URL with its password (and any `password=` parameter) replaced by `***`.
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
        Err(_) => "postgres://(unparsable URL)".into(),
    }
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
    let opts = PgConnectOptions::from_str(url).map_err(|_| {
        StoreError::Invalid(format!(
            "{} is not a usable PostgreSQL URL",
            redact_url(url)
        ))
    })?;
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
        let mut opts = PgConnectOptions::from_str(url).map_err(|_| {
            StoreError::Invalid(format!("{location} is not a usable PostgreSQL URL"))
        })?;
        // A runaway statement must not hold locks other workers wait on.
        opts = opts.options([("statement_timeout", "300s")]);
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
    fn schema_names_are_plain_identifiers() {
        assert!(valid_schema("nightshift_test_1"));
        assert!(!valid_schema("Bad"));
        assert!(!valid_schema("x\"; DROP TABLE runs; --"));
        assert!(!valid_schema(""));
    }
}
