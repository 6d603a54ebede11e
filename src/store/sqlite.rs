//! Opening the SQLite store: one file, WAL mode, 16 KB pages, `synchronous = FULL`, foreign
//! keys on, the migrations under `migrations/sqlite`.
//!
//! Switching a file into WAL mode takes an exclusive lock that SQLite does not wait for
//! (the busy timeout does not apply), so it is done once, on a single connection, retried
//! while another process briefly holds the file (a checkpoint as it closes); the pool's
//! connections then find the file in WAL mode and never switch it.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::db::Db;
use super::{Result, SqlStore, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Settings of the SQLite library itself, made once, before the first connection
/// initializes it (afterwards SQLite refuses them, and they stay as they were).
///
/// `SQLITE_CONFIG_MEMSTATUS` off: by default SQLite keeps process-wide allocation statistics,
/// updated under a global mutex at every allocation it makes; nothing here reads them.
fn configure_library() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config takes SQLITE_CONFIG_MEMSTATUS with one int argument; it
        // changes nothing and returns SQLITE_MISUSE once the library is initialized.
        let _ = unsafe {
            libsqlite3_sys::sqlite3_config(
                libsqlite3_sys::SQLITE_CONFIG_MEMSTATUS,
                0 as std::ffi::c_int,
            )
        };
    });
}

/// How long opening waits for other processes to let go of the file.
const BUSY: Duration = Duration::from_secs(10);

impl SqlStore {
    /// Opens (creating if needed) a SQLite database file and applies migrations. The folder
    /// is created with mode 0700 and the file is private to its owner.
    pub async fn open_sqlite(path: &Path) -> Result<Self> {
        configure_library();
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            crate::util::fs::create_private_dir_all(dir)?;
        }
        // Created private before SQLite sees it: SQLite gives the `-wal` and `-shm` files
        // (which hold prompts and answers too) the database file's mode.
        if !path.exists() {
            crate::util::fs::create_private_new(path)?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY)
            // 16 KB pages for a new store (a store made with SQLite's default 4 KB keeps
            // them: in WAL mode the page size of an existing file cannot change, and the
            // pragma is then ignored). A run writes every record's rows as appends to a
            // handful of tables, and each page is written twice (WAL, then checkpoint) and
            // often read back: with pages four times as large, a quarter of the system calls
            // move the same bytes. A million-record run: about 7 % less CPU (README, "Speed
            // and memory").
            .page_size(16_384)
            // 4 MB of page cache: at a million items the dedupe index is far larger than
            // any cache a small machine can spare, and the pages a cache would keep are in
            // the system's file cache anyway.
            .pragma("cache_size", "-4096");
        enable_wal(&opts).await?;
        // One connection. In WAL mode a connection drops its whole page cache when another
        // one wrote since its last transaction, and a pool of two hands its connections out
        // in turn: each statement then started cold and re-read the indexes it walks
        // (~10 page reads per record at 100,000 records, ~2.5 with one connection). Nothing
        // in the store holds a transaction while it waits on another query; the worker's
        // heartbeat waits for the transaction in progress to end.
        let store = connect(opts, 1, path.display().to_string()).await?;
        // Stores made before their files were created private.
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            crate::util::fs::restrict_file(Path::new(&p));
        }
        Ok(store)
    }

    /// A private in-memory SQLite database (tests).
    pub async fn open_sqlite_in_memory() -> Result<Self> {
        configure_library();
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")?
            .foreign_keys(true)
            .busy_timeout(BUSY);
        connect(opts, 1, ":memory:".into()).await
    }

    /// `PRAGMA integrity_check` and the foreign-key check: `ok` or the problems (SQLite only;
    /// `ok` on PostgreSQL, which keeps its own integrity).
    pub async fn integrity_check(&self) -> Result<String> {
        let Some(pool) = self.sqlite_pool() else {
            return Ok("ok".into());
        };
        let rows: Vec<(String,)> = sqlx::query_as("PRAGMA integrity_check")
            .fetch_all(pool)
            .await?;
        let mut out: Vec<String> = rows.into_iter().map(|(s,)| s).collect();
        let fk = sqlx::query("PRAGMA foreign_key_check")
            .fetch_all(pool)
            .await?;
        if !fk.is_empty() {
            out.push(format!("{} foreign key violation(s)", fk.len()));
        }
        Ok(out.join("; "))
    }
}

/// Applies the migrations on a connection of its own with foreign keys off: changing a
/// constraint in SQLite means rebuilding the table (create the new one, copy, drop the old,
/// rename), which SQLite's documented procedure does with foreign keys off. The keys are
/// checked once the migrations are in; a violation is an error.
async fn migrate(opts: &SqliteConnectOptions) -> Result<()> {
    use sqlx::Connection;
    let mut conn = opts.clone().foreign_keys(false).connect().await?;
    MIGRATOR.run(&mut conn).await?;
    let broken = sqlx::query("PRAGMA foreign_key_check")
        .fetch_all(&mut conn)
        .await?;
    conn.close().await?;
    if !broken.is_empty() {
        return Err(StoreError::Invalid(format!(
            "the store's migration left {} foreign key violation(s); restore a backup of the store",
            broken.len()
        )));
    }
    Ok(())
}

/// Puts the file in WAL mode (a lasting property of the file) on one connection.
async fn enable_wal(opts: &SqliteConnectOptions) -> Result<()> {
    let started = Instant::now();
    loop {
        let attempt = async {
            let mut conn = opts.clone().connect().await?;
            let mode: (String,) = sqlx::query_as("PRAGMA journal_mode = WAL")
                .fetch_one(&mut conn)
                .await?;
            drop(conn);
            Ok::<_, sqlx::Error>(mode.0)
        }
        .await;
        match attempt {
            Ok(_) => return Ok(()),
            Err(e) if is_busy(&e) && started.elapsed() < BUSY => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
        sqlx::Error::Database(d) => d
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6)),
        _ => false,
    }
}

async fn connect(opts: SqliteConnectOptions, max: u32, location: String) -> Result<SqlStore> {
    migrate(&opts).await?;
    let pool: SqlitePool = SqlitePoolOptions::new()
        .max_connections(max)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        // A connection whose transaction could not be ended (a disk I/O error: SQLite rolled
        // it back itself, the driver still counts it open) is replaced, not handed out to
        // fail every later transaction.
        .before_acquire(|conn, _| {
            Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(conn)) })
        })
        .connect_with(opts)
        .await?;
    Ok(SqlStore {
        db: Db::Sqlite(pool),
        location,
    })
}
