//! The two databases behind one small query API: a `Db` (pool) and a `Tx` (write
//! transaction) that run a `Query` on SQLite or PostgreSQL.
//!
//! The store's SQL is written once, in the dialect both engines share. Parameters are
//! either numbered (`$1`, understood by both) or, in the bulk statements, anonymous (`?`):
//! SQLite looks a named parameter up by a linear scan, which makes a statement with
//! thousands of them quadratic, so bulk SQL uses `?` and is renumbered here for PostgreSQL.
//!
//! The stored states and modes ([`super::state`]) cross this boundary as their text: bound
//! through `Arg`, decoded from `TEXT` columns by the `Type`/`Decode` impls below (an
//! unknown value is a decode error).

use std::borrow::Cow;

use sqlx::postgres::{PgArguments, PgPool, PgRow};
use sqlx::sqlite::{SqliteArguments, SqlitePool, SqliteRow};
use sqlx::{Arguments, FromRow, Postgres, Sqlite, Transaction};

use super::state::{AttemptState, BatchMode, BatchState, EndState, ItemState, RunStatus};
use super::{Result, StoreError};

/// Which engine a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// A bound value.
#[derive(Debug)]
pub(crate) enum Arg<'a> {
    I64(i64),
    OptI64(Option<i64>),
    Bool(bool),
    Str(&'a str),
    OptStr(Option<&'a str>),
    String(String),
    Bytes(&'a [u8]),
    /// A list of ids (`= ANY($n)`); PostgreSQL only.
    I64s(&'a [i64]),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::I64(v)
    }
}
impl From<Option<i64>> for Arg<'_> {
    fn from(v: Option<i64>) -> Self {
        Arg::OptI64(v)
    }
}
impl From<bool> for Arg<'_> {
    fn from(v: bool) -> Self {
        Arg::Bool(v)
    }
}
impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Str(v)
    }
}
impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Str(v)
    }
}
impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Arg::OptStr(v)
    }
}
impl<'a> From<&'a Option<String>> for Arg<'a> {
    fn from(v: &'a Option<String>) -> Self {
        Arg::OptStr(v.as_deref())
    }
}
impl From<String> for Arg<'_> {
    fn from(v: String) -> Self {
        Arg::String(v)
    }
}
impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Arg::Bytes(v)
    }
}
impl<'a> From<&'a [i64]> for Arg<'a> {
    fn from(v: &'a [i64]) -> Self {
        Arg::I64s(v)
    }
}

/// Stored enums bind as their text, and decode from it on either engine.
macro_rules! stored_text {
    ($($t:ty),+) => {$(
        impl From<$t> for Arg<'_> {
            fn from(v: $t) -> Self {
                Arg::Str(v.as_str())
            }
        }
        impl From<Option<$t>> for Arg<'_> {
            fn from(v: Option<$t>) -> Self {
                Arg::OptStr(v.map(<$t>::as_str))
            }
        }
        impl<DB: sqlx::Database> sqlx::Type<DB> for $t
        where
            str: sqlx::Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <str as sqlx::Type<DB>>::type_info()
            }
            fn compatible(ty: &DB::TypeInfo) -> bool {
                <str as sqlx::Type<DB>>::compatible(ty)
            }
        }
        impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for $t
        where
            &'r str: sqlx::Decode<'r, DB>,
        {
            fn decode(value: DB::ValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                Ok(<&'r str as sqlx::Decode<'r, DB>>::decode(value)?.parse()?)
            }
        }
    )+};
}
stored_text!(
    AttemptState,
    BatchMode,
    BatchState,
    EndState,
    ItemState,
    RunStatus
);

/// SQL text and its parameters.
#[derive(Debug)]
pub(crate) struct Query<'a> {
    sql: Cow<'a, str>,
    args: Vec<Arg<'a>>,
}

/// Starts a query.
pub(crate) fn q<'a>(sql: impl Into<Cow<'a, str>>) -> Query<'a> {
    Query {
        sql: sql.into(),
        args: Vec::new(),
    }
}

impl<'a> Query<'a> {
    pub fn bind(mut self, v: impl Into<Arg<'a>>) -> Self {
        self.args.push(v.into());
        self
    }

    /// Binds in place (loops over rows).
    pub fn push(&mut self, v: impl Into<Arg<'a>>) {
        self.args.push(v.into());
    }

    fn sqlite(self) -> Result<(Cow<'a, str>, SqliteArguments<'a>)> {
        let mut a = SqliteArguments::default();
        a.reserve(self.args.len(), 0);
        for v in self.args {
            let r = match v {
                Arg::I64(x) => a.add(x),
                Arg::OptI64(x) => a.add(x),
                Arg::Bool(x) => a.add(x),
                Arg::Str(x) => a.add(x),
                Arg::OptStr(x) => a.add(x),
                Arg::String(x) => a.add(x),
                Arg::Bytes(x) => a.add(x),
                Arg::I64s(_) => {
                    return Err(StoreError::Invalid(
                        "an id list parameter is not supported on SQLite".into(),
                    ));
                }
            };
            r.map_err(|e| StoreError::Db(sqlx::Error::Encode(e)))?;
        }
        Ok((self.sql, a))
    }

    fn postgres(self) -> Result<(Cow<'a, str>, PgArguments)> {
        let mut a = PgArguments::default();
        for v in self.args {
            let r = match v {
                Arg::I64(x) => a.add(x),
                Arg::OptI64(x) => a.add(x),
                Arg::Bool(x) => a.add(x),
                Arg::Str(x) => a.add(x),
                Arg::OptStr(x) => a.add(x),
                Arg::String(x) => a.add(x),
                Arg::Bytes(x) => a.add(x),
                Arg::I64s(x) => a.add(x),
            };
            r.map_err(|e| StoreError::Db(sqlx::Error::Encode(e)))?;
        }
        let sql = match self.sql {
            Cow::Borrowed(s) if !s.contains('?') && !s.contains(OR_FAIL) => Cow::Borrowed(s),
            s => Cow::Owned(number_placeholders(&s.replace(OR_FAIL, " "))),
        };
        Ok((sql, a))
    }
}

/// SQLite's conflict clause on the store's multi-row writes inside a transaction (`INSERT
/// OR FAIL INTO`, `UPDATE OR FAIL items`): on a constraint error the statement stops where
/// it is instead of undoing its own rows, so SQLite need not copy the pages it changes into
/// a statement journal first (migrations/sqlite/0007_deferred_keys.sql). The transaction
/// around it is rolled back on any error either way, so nothing of a failed statement is
/// kept. Not for a statement on its own: outside a transaction SQLite would keep the rows
/// written before the error (and needs no statement journal there anyway).
/// PostgreSQL has no such clause and needs none; its text drops it.
pub(crate) const OR_FAIL: &str = " OR FAIL ";

/// Rewrites anonymous `?` parameters as `$1, $2, …` (outside string literals).
pub(crate) fn number_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + sql.len() / 4);
    let mut n = 0u32;
    let mut in_str = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                in_str = !in_str;
                out.push(c);
            }
            '?' if !in_str => {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            }
            _ => out.push(c),
        }
    }
    out
}

/// A row type both engines can decode.
pub(crate) trait Decode:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}
impl<T> Decode for T where
    T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}

/// A connection pool on either engine.
#[derive(Clone, Debug)]
pub(crate) enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A write transaction on either engine.
pub(crate) enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

impl Db {
    pub fn engine(&self) -> Engine {
        match self {
            Db::Sqlite(_) => Engine::Sqlite,
            Db::Postgres(_) => Engine::Postgres,
        }
    }

    /// Begins a write transaction (`BEGIN IMMEDIATE` on SQLite, so writers queue on the
    /// busy timeout instead of failing on a lock upgrade).
    pub async fn begin(&self) -> Result<Tx> {
        Ok(match self {
            Db::Sqlite(p) => Tx::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Db::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    pub async fn execute(&self, q: Query<'_>) -> Result<u64> {
        Ok(match self {
            Db::Sqlite(p) => {
                let (sql, a) = q.sqlite()?;
                sqlx::query_with(&sql, a).execute(p).await?.rows_affected()
            }
            Db::Postgres(p) => {
                let (sql, a) = q.postgres()?;
                sqlx::query_with(&sql, a).execute(p).await?.rows_affected()
            }
        })
    }

    pub async fn all<T: Decode>(&self, q: Query<'_>) -> Result<Vec<T>> {
        Ok(match self {
            Db::Sqlite(p) => {
                let (sql, a) = q.sqlite()?;
                sqlx::query_as_with(&sql, a).fetch_all(p).await?
            }
            Db::Postgres(p) => {
                let (sql, a) = q.postgres()?;
                sqlx::query_as_with(&sql, a).fetch_all(p).await?
            }
        })
    }

    pub async fn optional<T: Decode>(&self, q: Query<'_>) -> Result<Option<T>> {
        Ok(match self {
            Db::Sqlite(p) => {
                let (sql, a) = q.sqlite()?;
                sqlx::query_as_with(&sql, a).fetch_optional(p).await?
            }
            Db::Postgres(p) => {
                let (sql, a) = q.postgres()?;
                sqlx::query_as_with(&sql, a).fetch_optional(p).await?
            }
        })
    }

    pub async fn one<T: Decode>(&self, q: Query<'_>) -> Result<T> {
        Ok(match self {
            Db::Sqlite(p) => {
                let (sql, a) = q.sqlite()?;
                sqlx::query_as_with(&sql, a).fetch_one(p).await?
            }
            Db::Postgres(p) => {
                let (sql, a) = q.postgres()?;
                sqlx::query_as_with(&sql, a).fetch_one(p).await?
            }
        })
    }

    /// The first column of the one row a query returns.
    pub async fn scalar<T>(&self, q: Query<'_>) -> Result<T>
    where
        (T,): Decode,
    {
        Ok(self.one::<(T,)>(q).await?.0)
    }

    pub async fn close(&self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }
}

impl Tx {
    pub async fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(t) => t.commit().await?,
            Tx::Postgres(t) => t.commit().await?,
        }
        Ok(())
    }

    pub fn engine(&self) -> Engine {
        match self {
            Tx::Sqlite(_) => Engine::Sqlite,
            Tx::Postgres(_) => Engine::Postgres,
        }
    }

    pub async fn execute(&mut self, q: Query<'_>) -> Result<u64> {
        Ok(match self {
            Tx::Sqlite(t) => {
                let (sql, a) = q.sqlite()?;
                sqlx::query_with(&sql, a)
                    .execute(&mut **t)
                    .await?
                    .rows_affected()
            }
            Tx::Postgres(t) => {
                let (sql, a) = q.postgres()?;
                sqlx::query_with(&sql, a)
                    .execute(&mut **t)
                    .await?
                    .rows_affected()
            }
        })
    }

    pub async fn all<T: Decode>(&mut self, q: Query<'_>) -> Result<Vec<T>> {
        Ok(match self {
            Tx::Sqlite(t) => {
                let (sql, a) = q.sqlite()?;
                sqlx::query_as_with(&sql, a).fetch_all(&mut **t).await?
            }
            Tx::Postgres(t) => {
                let (sql, a) = q.postgres()?;
                sqlx::query_as_with(&sql, a).fetch_all(&mut **t).await?
            }
        })
    }

    pub async fn optional<T: Decode>(&mut self, q: Query<'_>) -> Result<Option<T>> {
        Ok(match self {
            Tx::Sqlite(t) => {
                let (sql, a) = q.sqlite()?;
                sqlx::query_as_with(&sql, a)
                    .fetch_optional(&mut **t)
                    .await?
            }
            Tx::Postgres(t) => {
                let (sql, a) = q.postgres()?;
                sqlx::query_as_with(&sql, a)
                    .fetch_optional(&mut **t)
                    .await?
            }
        })
    }

    pub async fn one<T: Decode>(&mut self, q: Query<'_>) -> Result<T> {
        Ok(match self {
            Tx::Sqlite(t) => {
                let (sql, a) = q.sqlite()?;
                sqlx::query_as_with(&sql, a).fetch_one(&mut **t).await?
            }
            Tx::Postgres(t) => {
                let (sql, a) = q.postgres()?;
                sqlx::query_as_with(&sql, a).fetch_one(&mut **t).await?
            }
        })
    }

    pub async fn scalar<T>(&mut self, q: Query<'_>) -> Result<T>
    where
        (T,): Decode,
    {
        Ok(self.one::<(T,)>(q).await?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_parameters_are_numbered_outside_literals() {
        assert_eq!(
            number_placeholders("SELECT ?, '?', x || '-' || ? FROM (VALUES (?,?))"),
            "SELECT $1, '?', x || '-' || $2 FROM (VALUES ($3,$4))"
        );
    }

    #[test]
    fn sqlite_conflict_clauses_are_kept_on_sqlite_and_dropped_for_postgres() {
        let insert = "INSERT OR FAIL INTO t (a) SELECT v.column1 FROM (VALUES (?)) AS v \
                      WHERE true ON CONFLICT (a) DO NOTHING";
        let update = "UPDATE OR FAIL t SET a = ? WHERE b = 'x'";
        for (sql, pg) in [
            (
                insert,
                "INSERT INTO t (a) SELECT v.column1 FROM (VALUES ($1)) AS v \
                 WHERE true ON CONFLICT (a) DO NOTHING",
            ),
            (update, "UPDATE t SET a = $1 WHERE b = 'x'"),
        ] {
            let (text, _) = q(sql).bind(1i64).sqlite().unwrap();
            assert_eq!(text, sql);
            let (text, _) = q(sql).bind(1i64).postgres().unwrap();
            assert_eq!(text, pg);
        }
    }
}
