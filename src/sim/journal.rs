//! The simulator's persistent state on disk: one folder per state, owned by one process at a
//! time.
//!
//! Layout of a state folder (mode 0700; every file in it 0600, they hold prompts and answers):
//!
//! ```text
//! lock           flock'ed (exclusive) for the life of the `Sim` owning the folder; holds its pid
//! journal.jsonl  the state: one transaction per line, `{"seq": N, "ops": [{"op": .., "v": ..}]}`
//! files/         file contents: uploads, inline batch inputs, result files
//! ```
//!
//! Every mutation appends one line (the entities it upserted and the bill entries it added)
//! and hands it to the operating system before the simulator answers, so a SIGKILL at any
//! instant loses at most the line being written; replay ignores such a torn last line. A
//! content file is written before the line that names it. Writing costs what changed, never
//! the whole state: a batch's request list is written when it changes (validation, results),
//! not on every poll. On open the journal is replayed, rewritten compactly (temporary file,
//! fsync, rename, folder fsync), and content files nothing refers to any more (left by a crash
//! between writing a file and its line, or by deletes) are removed.
//!
//! The journal is not fsynced per line: it survives the process dying, not the machine.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bill::BillEntry;
use super::data::{RecordedRequest, SimBatch, SimFile};
use crate::util::fs as fsutil;

const JOURNAL: &str = "journal.jsonl";
const FILES: &str = "files";
const LOCK: &str = "lock";

/// One entity written to the journal (borrowed: writing never copies the state).
#[derive(Serialize)]
#[serde(tag = "op", content = "v", rename_all = "snake_case")]
pub(super) enum Put<'a> {
    File(&'a SimFile),
    DropFile(&'a str),
    /// A batch without its request list and inline results (those are written on their own,
    /// when they change).
    Batch(&'a SimBatch),
    Requests {
        id: &'a str,
        requests: &'a [RecordedRequest],
    },
    InlineOutput {
        id: &'a str,
        lines: &'a [Value],
    },
    Bill(&'a BillEntry),
    Upload(&'a Value),
    Online(&'a Value),
    Refused(&'a Value),
}

/// The same, read back.
#[derive(Deserialize)]
#[serde(tag = "op", content = "v", rename_all = "snake_case")]
pub(super) enum Got {
    File(SimFile),
    DropFile(String),
    Batch(Box<SimBatch>),
    Requests {
        id: String,
        requests: Vec<RecordedRequest>,
    },
    InlineOutput {
        id: String,
        lines: Vec<Value>,
    },
    Bill(BillEntry),
    Upload(Value),
    Online(Value),
    Refused(Value),
}

#[derive(Serialize)]
struct LineOut<'a, 'b> {
    seq: u64,
    ops: &'b [Put<'a>],
}

#[derive(Deserialize)]
struct LineIn {
    seq: u64,
    ops: Vec<Got>,
}

fn write_line(w: &mut impl Write, seq: u64, ops: &[Put<'_>]) -> io::Result<()> {
    serde_json::to_writer(&mut *w, &LineOut { seq, ops }).map_err(io::Error::from)?;
    w.write_all(b"\n")
}

/// The journal, open for appending.
pub(super) struct Journal {
    file: File,
    path: PathBuf,
}

/// Where mutations are written: nowhere (in-memory mode) or a journal. After a failed write
/// it stays broken: the simulator then refuses every call rather than answer from a state it
/// could not save.
#[derive(Default)]
pub(super) struct Log {
    journal: Option<Journal>,
    broken: Option<String>,
}

impl Log {
    pub(super) fn new(journal: Journal) -> Self {
        Log {
            journal: Some(journal),
            broken: None,
        }
    }

    /// Appends one transaction (no-op in memory mode).
    pub(super) fn write(&mut self, seq: u64, ops: &[Put<'_>]) {
        if self.broken.is_some() || ops.is_empty() {
            return;
        }
        let Some(j) = &mut self.journal else {
            return;
        };
        let mut w = BufWriter::with_capacity(8 << 10, &j.file);
        let r = write_line(&mut w, seq, ops).and_then(|()| w.flush());
        if let Err(e) = r {
            self.broken = Some(format!(
                "the simulator could not save its state to {}: {e}",
                j.path.display()
            ));
        }
    }

    /// Marks the state as unsaveable (a content file could not be written).
    pub(super) fn fail(&mut self, why: String) {
        self.broken.get_or_insert(why);
    }

    /// Why the state can no longer be saved, if it cannot.
    pub(super) fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }
}

/// A state folder, locked and ready to be replayed.
pub(super) struct Folder {
    pub(super) lock: File,
    pub(super) journal: PathBuf,
    pub(super) files: PathBuf,
}

/// Creates (0700) and locks the state folder `dir`. A folder locked by another live `Sim`
/// (in this process or another) is refused with an error naming it.
pub(super) fn open_folder(dir: &Path) -> io::Result<Folder> {
    fsutil::create_private_dir_all(dir)
        .map_err(|e| with_path(e, "cannot create the simulator state folder", dir))?;
    restrict_dir(dir);
    let lock = lock(dir)?;
    let files = dir.join(FILES);
    fsutil::create_private_dir_all(&files)
        .map_err(|e| with_path(e, "cannot create the simulator state folder", &files))?;
    restrict_dir(&files);
    // Compaction leftovers of a dead process.
    fsutil::sweep_temp_files(dir)?;
    Ok(Folder {
        lock,
        journal: dir.join(JOURNAL),
        files,
    })
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn restrict_dir(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    }
    #[cfg(not(unix))]
    let _ = dir;
}

fn lock(dir: &Path) -> io::Result<File> {
    let path = dir.join(LOCK);
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o
        .open(&path)
        .map_err(|e| with_path(e, "cannot open the simulator lock", &path))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(with_path(e, "cannot lock", &path));
            }
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another simulator".to_string()
            } else {
                format!("another simulator (pid {holder})")
            };
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "the simulator state folder {} is in use by {who}; one simulator at a time may own it",
                    dir.display()
                ),
            ));
        }
    }
    // Ours now: note who holds it, for the message above.
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// What replaying found besides the state.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Replayed {
    pub(super) lines: u64,
    /// A torn (unfinished) last line was ignored.
    pub(super) torn_tail: bool,
}

/// Replays the journal at `path` (absent = empty state) into `apply`. Lines are written with
/// their newline last, so a last line without one is a write a crash cut short: it is
/// ignored. A whole line that does not parse is damage, and an error naming the file and
/// line.
pub(super) fn replay(path: &Path, mut apply: impl FnMut(u64, Got)) -> io::Result<Replayed> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Replayed::default()),
        Err(e) => return Err(with_path(e, "cannot read", path)),
    };
    let mut r = BufReader::with_capacity(1 << 16, f);
    let mut buf = Vec::new();
    let mut out = Replayed::default();
    let mut n = 0u64;
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        n += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if buf.last() != Some(&b'\n') {
            // the end of the file, cut short
            out.torn_tail = true;
            break;
        }
        match serde_json::from_slice::<LineIn>(&buf) {
            Ok(line) => {
                out.lines += 1;
                for op in line.ops {
                    apply(line.seq, op);
                }
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} line {n} is damaged ({e}); the simulator state cannot be read (move the folder away to start afresh)",
                        path.display()
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// A compact rewrite of the journal: lines go to a temporary file that replaces the journal
/// only on [`Snapshot::commit`].
pub(super) struct Snapshot {
    file: fsutil::AtomicFile,
}

impl Snapshot {
    pub(super) fn create(journal: &Path) -> io::Result<Self> {
        Ok(Snapshot {
            file: fsutil::AtomicFile::create(journal)?,
        })
    }

    pub(super) fn line(&mut self, seq: u64, ops: &[Put<'_>]) -> io::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        write_line(self.file.writer(), seq, ops)
    }

    /// fsync, rename over the journal, fsync the folder; then opens it for appending.
    pub(super) fn commit(self, journal: &Path) -> io::Result<Journal> {
        self.file.commit()?;
        let mut o = OpenOptions::new();
        o.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let file = o
            .open(journal)
            .map_err(|e| with_path(e, "cannot open", journal))?;
        Ok(Journal {
            file,
            path: journal.to_path_buf(),
        })
    }
}

/// Removes the content files in `files` that are not in `keep` (file names).
pub(super) fn remove_orphans(files: &Path, keep: &HashSet<&str>) -> io::Result<usize> {
    let mut n = 0;
    for e in fs::read_dir(files)?.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !keep.contains(name) && e.file_type().is_ok_and(|t| t.is_file()) {
            fs::remove_file(e.path())?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(n: u64) -> Value {
        serde_json::json!({"id": format!("u{n}")})
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_a_damaged_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL);
        let mut text = String::new();
        for n in 0..3 {
            let mut w = Vec::new();
            write_line(&mut w, n, &[Put::Upload(&upload(n))]).unwrap();
            text.push_str(std::str::from_utf8(&w).unwrap());
        }
        let whole = text.clone();
        // cut the last line mid-way
        text.truncate(text.len() - 7);
        fs::write(&path, &text).unwrap();
        let mut seen = Vec::new();
        let r = replay(&path, |seq, op| {
            if let Got::Upload(v) = op {
                seen.push((seq, v["id"].as_str().unwrap().to_string()));
            }
        })
        .unwrap();
        assert!(r.torn_tail);
        assert_eq!(r.lines, 2);
        assert_eq!(seen, vec![(0, "u0".to_string()), (1, "u1".to_string())]);

        // the same cut, followed by a newline (and more): not a crash artefact
        let mut bad = text.clone();
        bad.push('\n');
        bad.push_str(whole.lines().last().unwrap());
        bad.push('\n');
        fs::write(&path, &bad).unwrap();
        let Err(e) = replay(&path, |_, _| {}) else {
            panic!("corruption is an error");
        };
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("line 3"), "{e}");
        let mut bad = text.clone();
        bad.push('\n');
        fs::write(&path, &bad).unwrap();
        let Err(e) = replay(&path, |_, _| {}) else {
            panic!("a whole line that does not parse is damage, even the last");
        };
        assert!(e.to_string().contains("line 3"), "{e}");

        // intact: nothing torn
        fs::write(&path, &whole).unwrap();
        let r = replay(&path, |_, _| {}).unwrap();
        assert_eq!(
            r,
            Replayed {
                lines: 3,
                torn_tail: false
            }
        );
    }

    #[test]
    fn a_missing_journal_is_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let r = replay(&dir.path().join(JOURNAL), |_, _| panic!("nothing to apply")).unwrap();
        assert_eq!(r, Replayed::default());
    }

    #[cfg(unix)]
    #[test]
    fn the_folder_is_private_and_locked_while_open() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("sim");
        let f = open_folder(&state).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&f.files), 0o700);
        assert_eq!(mode(&state.join(LOCK)), 0o600);
        let Err(e) = open_folder(&state) else {
            panic!("second opener refused");
        };
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let msg = e.to_string();
        assert!(msg.contains(&state.display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(f);
        open_folder(&state).expect("free again once the first is dropped");
    }
}
