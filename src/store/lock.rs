//! One runner per store: an exclusive advisory lock (`flock`) on `<store>.lock`, beside
//! the store's real path (symlinks resolved, so two names for one file share one lock).
//!
//! The kernel releases the lock when its holder exits however it exits, so a lock left by a
//! killed process is simply free: the next run takes it over without any staleness rules.
//! The file holds the holder's pid, host, start time and command, which a refused run
//! prints. (Advisory locks are not reliable on some network filesystems; keep the store on
//! a local disk.)

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another nightshift process is using the store {store}: {holder}")]
    Held { store: PathBuf, holder: String },
    #[error("cannot lock the store {store}: {source}")]
    Io {
        store: PathBuf,
        source: std::io::Error,
    },
}

/// Held for as long as the value lives.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock of the store at `db`, or says who holds it.
    pub fn acquire(db: &Path, what: &str) -> Result<RunLock, LockError> {
        let io = |source| LockError::Io {
            store: db.to_path_buf(),
            source,
        };
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::util::fs::create_private_dir_all(dir).map_err(io)?;
        }
        let path = PathBuf::from(format!("{}.lock", real_path(db).display()));
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(&path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a file descriptor we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::WouldBlock {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    return Err(LockError::Held {
                        store: db.to_path_buf(),
                        holder: if holder.is_empty() {
                            "a process that has not written its name yet".into()
                        } else {
                            holder.to_string()
                        },
                    });
                }
                return Err(io(err));
            }
        }
        let since = crate::util::time::rfc3339(crate::util::time::now_ms());
        let line = format!(
            "pid {} on host {} since {since} ({what})\n",
            std::process::id(),
            crate::util::host::hostname(),
        );
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(line.as_bytes()).map_err(io)?;
        Ok(RunLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The path a store really lives at: symlinks (of the file or its folders) resolved, so
/// `b/state.db → a/state.db` locks `a/state.db.lock`. A store not created yet resolves
/// through its folder.
pub fn real_path(db: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(db) {
        return p;
    }
    match (db.parent(), db.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::canonicalize(dir)
                .map(|d| d.join(name))
                .unwrap_or_else(|_| db.to_path_buf())
        }
        _ => db.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_named_and_a_dropped_lock_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let first = RunLock::acquire(&db, "nightshift run a.toml").unwrap();
        let err = RunLock::acquire(&db, "nightshift run b.toml").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("nightshift run a.toml"), "{msg}");
        drop(first);
        RunLock::acquire(&db, "nightshift run b.toml").unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_symlinked_store_path_takes_the_same_lock() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("state.db"), b"").unwrap();
        std::os::unix::fs::symlink(a.join("state.db"), b.join("state.db")).unwrap();
        let _held = RunLock::acquire(&a.join("state.db"), "nightshift run a.toml").unwrap();
        let err = RunLock::acquire(&b.join("state.db"), "nightshift run b.toml").unwrap_err();
        assert!(matches!(err, LockError::Held { .. }), "{err}");
        // A symlinked folder too.
        let c = dir.path().join("c");
        std::os::unix::fs::symlink(&a, &c).unwrap();
        let err = RunLock::acquire(&c.join("state.db"), "nightshift run c.toml").unwrap_err();
        assert!(matches!(err, LockError::Held { .. }), "{err}");
    }
}
