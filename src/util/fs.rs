//! Files written safely: private modes, atomic replacement; and reads at an offset.
//!
//! Batch input files, downloads and outputs hold prompts and model output (possibly personal
//! data): they are created with mode 0600 in folders with mode 0700. A file that others read
//! (the output) is written to a temporary sibling, fsynced, renamed over the final path and
//! the folder fsynced, so a crash leaves either the old file or the complete new one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

/// Creates `dir` and its missing parents with mode 0700.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    b.mode(0o700);
    b.create(dir)
}

/// Best effort: makes an existing file private to its owner.
pub fn restrict_file(path: &Path) {
    #[cfg(unix)]
    {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o600));
    }
    #[cfg(not(unix))]
    {
        let _ = path;
    }
}

/// Opens a new private file for writing (truncating any leftover).
pub fn create_private(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    o.mode(0o600);
    o.open(path)
}

/// Creates a new, empty private file; an existing one is left as it is.
pub fn create_private_new(path: &Path) -> io::Result<()> {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    o.mode(0o600);
    match o.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Fills `buf` from `file` at `offset`: one positioned read on Unix (no seek, and the file's
/// own position is left alone), a seek and a read elsewhere.
pub fn read_exact_at(file: &mut File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(buf)
    }
}

/// fsyncs a folder so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// A file being written under a temporary name, renamed into place by [`commit`].
///
/// [`commit`]: AtomicFile::commit
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(dest: &Path) -> io::Result<Self> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        if !dir.as_os_str().is_empty() && !dir.exists() {
            create_private_dir_all(dir)?;
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let file = create_private(&tmp)?;
        Ok(AtomicFile {
            tmp,
            dest: dest.to_path_buf(),
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// Makes the file readable by everyone (mode 0644) before it is in place: for files
    /// another user's process reads, such as a metrics textfile.
    pub fn readable_by_all(&self) -> io::Result<()> {
        let file = self.writer.as_ref().expect("not committed yet").get_ref();
        #[cfg(unix)]
        {
            file.set_permissions(fs::Permissions::from_mode(0o644))?;
        }
        #[cfg(not(unix))]
        let _ = file;
        Ok(())
    }

    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.writer.as_mut().expect("not committed yet")
    }

    /// Flushes, fsyncs, renames into place and fsyncs the folder.
    /// On failure (a full disk, say) the temporary file is removed: nothing is left behind.
    pub fn commit(mut self) -> io::Result<()> {
        let w = self.writer.take().expect("committed once");
        let written = (|| {
            let mut w = w;
            w.flush()?;
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            fs::rename(&self.tmp, &self.dest)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        if let Some(dir) = self.dest.parent()
            && !dir.as_os_str().is_empty()
        {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Removes leftover temporary files (`.NAME.tmp-PID`) in `dir` whose process is gone.
/// Several workers may share the folder: a live process's file is left alone.
pub fn sweep_temp_files(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(0);
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some(pid) = name
            .strip_prefix('.')
            .and_then(|rest| rest.rsplit_once(".tmp-"))
            .map(|(_, pid)| pid)
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok_and(process_alive) {
            continue;
        }
        if fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Whether a process with this id exists on this machine.
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 checks for existence and permission; nothing is delivered.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_processes_temp_files_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir
            .path()
            .join(format!(".a.jsonl.tmp-{}", std::process::id()));
        // Pid numbers stop well below this on Linux (pid_max ≤ 4,194,304).
        let dead = dir.path().join(".b.jsonl.tmp-2000000000");
        let kept = dir.path().join("c.jsonl");
        for p in [&ours, &dead, &kept] {
            fs::write(p, b"x").unwrap();
        }
        assert_eq!(sweep_temp_files(dir.path()).unwrap(), 1);
        assert!(ours.exists() && kept.exists() && !dead.exists());
    }

    #[test]
    fn atomic_file_appears_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("sub/out.jsonl");
        let mut f = AtomicFile::create(&dest).unwrap();
        f.write_all(b"hello\n").unwrap();
        assert!(!dest.exists());
        f.commit().unwrap();
        assert_eq!(fs::read_to_string(&dest).unwrap(), "hello\n");
        #[cfg(unix)]
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_dropped_atomic_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.jsonl");
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert!(!dest.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
