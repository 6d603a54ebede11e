//! One runner per store: an exclusive advisory lock (`flock`) on `<store>.lock`.
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
            crate::fsutil::create_private_dir_all(dir).map_err(io)?;
        }
        let path = PathBuf::from(format!("{}.lock", db.display()));
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
        let since = crate::report::rfc3339(crate::store::now_ms());
        let line = format!(
            "pid {} on host {} since {since} ({what})\n",
            std::process::id(),
            crate::worker::hostname(),
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
}
