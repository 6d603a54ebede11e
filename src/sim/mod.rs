//! The provider simulator.
//!
//! A local server that speaks the batch APIs of OpenAI, Azure OpenAI, Anthropic, Gemini and
//! Amazon Bedrock (with the S3 subset its client uses), and the real-time chat-completions,
//! messages and Bedrock runtime endpoints, on loopback, so the real client code talks real
//! HTTP without an API key (docs/providers.md §7). One provider-neutral core
//! sits behind one wire adapter per provider. Its modules are listed here in layers, each
//! importing only modules listed before it (`tests/it/layers.rs` checks there is no cycle;
//! the methods of `Sim`, spread over these files, still call one another across layers):
//!
//! 1. the vocabulary: `types` (`ProviderKind`, the neutral request and reply, `SimError`),
//!    `settings`, `answer`;
//! 2. the data held: `data` (a file, a batch and its status, a request's outcome), `bill`
//!    (a bill entry; the bill and the record);
//! 3. keeping it: `journal` (the state folder and its journal), `state` (what one `Sim` holds
//!    and how that is journaled), `faults` (every draw);
//! 4. the providers' wire formats: `http` (what their routes share), then `openai` (OpenAI
//!    and Azure), `anthropic`, `gemini`, `bedrock`, each with its JSON, its batch creation and
//!    its HTTP routes, and `s3` (the objects Bedrock jobs read and write); `wire`, the one
//!    dispatch on provider kind to them;
//! 5. the neutral core that speaks through `wire`: `files`, `batch` (a batch's timeline),
//!    `run` (validating a batch, answering its requests, writing its results; online
//!    requests);
//! 6. `server` (the server and its routes), and this module: the `Sim` itself and its ids.
//!
//! It is deterministic given its seed: answers are generated from the request's JSON schema
//! and the request body, prompt tokens are counted with the same function the planner uses,
//! and a request's faults (failed, malformed, missing or duplicated line) and cache hits are
//! drawn from the seed, the body's hash and how many requests with that body this state has
//! answered before, batch or online (`Inner::draw_key`). Never from the custom_id, which
//! carries the client's run-specific batch id: a fresh state draws the same in every run and
//! every process, and a resent request (a retry) draws afresh. The count is not journaled but
//! rebuilt on reopening from the recorded outcomes. Batch expiry and lost create responses
//! are drawn on the batch's creation number, the other HTTP faults (`server`) on the
//! process's call counter.
//!
//! It keeps the record of what it accepted and billed (`GET /_sim/record`): every batch (and
//! every online request), each request's custom_id, body hash and outcome, and the bill
//! (tokens and exact cost per custom_id, per model and pricing mode, and totals). Tests judge
//! "never sent twice" and "ledger = bill" from that record.
//!
//! Every id it hands out (files, batches and Bedrock job ARNs, result files, content file
//! names, upload sessions) carries a nonce drawn afresh by each `Sim`, so two simulators with
//! the same seed, in two processes or one after the other on the same state, never hand out
//! the same id. Everything
//! else (answers, faults, expiry, the order of result lines) is drawn from the seed and the
//! request, never from an id.
//!
//! File contents live in a private folder, not in memory, so rehearsing a large backfill does
//! not need the memory to hold it. `Sim::new` keeps its state in memory and a temporary
//! folder (it dies with the process); `Sim::persistent` keeps everything in a state folder
//! (`journal`) that the next process reopens: its batches go on by the wall clock, their
//! results can be downloaded, and the record and the bill include them.

pub mod answer;
mod anthropic;
mod batch;
mod bedrock;
mod bill;
mod data;
mod faults;
mod files;
mod gemini;
mod http;
mod journal;
mod openai;
mod run;
mod s3;
mod server;
pub mod settings;
mod state;
mod types;
pub mod wire;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};

use crate::cost::PriceTable;
use journal::Log;
use state::Inner;

pub use bill::BillEntry;
pub use data::{Outcome, RecordedRequest};
pub use faults::draw;
pub use server::{SimHandle, serve, start};
pub use settings::SimSettings;
pub use types::{OnlineReply, ProviderKind, SimError};

/// The simulator's state.
pub struct Sim {
    settings: SimSettings,
    prices: PriceTable,
    /// The folder file contents are kept in.
    files: PathBuf,
    /// Drawn afresh by every `Sim` and mixed into every id it hands out.
    nonce: [u8; 16],
    inner: Mutex<Inner>,
    base: OnceLock<String>,
    /// In-memory mode: the temporary folder holding the file contents.
    _temp: Option<tempfile::TempDir>,
    /// Persistent mode: the state folder's lock, held as long as this `Sim` lives.
    _lock: Option<File>,
}

impl Sim {
    /// A simulator whose state lives in memory and a temporary folder, gone with the process.
    pub fn new(settings: SimSettings, prices: PriceTable) -> std::io::Result<Arc<Self>> {
        let dir = tempfile::Builder::new()
            .prefix("nightshift-sim-")
            .tempdir()?;
        Ok(Arc::new(Sim {
            settings,
            prices,
            files: dir.path().to_path_buf(),
            nonce: *uuid::Uuid::new_v4().as_bytes(),
            inner: Mutex::new(Inner::default()),
            base: OnceLock::new(),
            _temp: Some(dir),
            _lock: None,
        }))
    }

    /// A simulator whose state lives in the folder `dir` (created if need be, mode 0700) and
    /// survives the process: a later `Sim::persistent` on the same folder sees every file,
    /// batch, upload, online request and bill entry of the earlier ones, and their batches
    /// go on by the wall clock. Batches keep the settings they were created under; new ones
    /// follow `settings`. The folder is locked for the life of the returned `Sim`: a second
    /// opener, in this process or another, gets an error naming the folder.
    pub fn persistent(
        dir: &Path,
        settings: SimSettings,
        prices: PriceTable,
    ) -> std::io::Result<Arc<Self>> {
        let folder = journal::open_folder(dir)?;
        let mut inner = Inner::default();
        let replayed = journal::replay(&folder.journal, |seq, op| inner.apply(seq, op))?;
        inner.count_answered();
        if replayed.torn_tail {
            tracing::warn!(
                journal = %folder.journal.display(),
                "the simulator's last change before a crash was cut short and is dropped"
            );
        }
        let mut snap = journal::Snapshot::create(&folder.journal)?;
        inner.snapshot(&mut snap)?;
        let journal = snap.commit(&folder.journal)?;
        journal::remove_orphans(&folder.files, &inner.referenced())?;
        inner.log = Log::new(journal);
        Ok(Arc::new(Sim {
            settings,
            prices,
            files: folder.files,
            nonce: *uuid::Uuid::new_v4().as_bytes(),
            inner: Mutex::new(inner),
            base: OnceLock::new(),
            _temp: None,
            _lock: Some(folder.lock),
        }))
    }

    /// The settings new batches and every HTTP call follow.
    pub fn settings(&self) -> &SimSettings {
        &self.settings
    }

    /// The root URL the simulator is reachable at (set once it listens).
    pub(crate) fn set_base(&self, base: String) {
        let _ = self.base.set(base);
    }

    fn base(&self) -> &str {
        self.base.get().map(String::as_str).unwrap_or("")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, unless it could not be saved (then every call is refused).
    fn state(&self) -> Result<std::sync::MutexGuard<'_, Inner>, SimError> {
        let inner = self.lock();
        match inner.log.broken() {
            Some(why) => Err(SimError::unsaved(why)),
            None => Ok(inner),
        }
    }

    /// The answer of a call that changed the state: refused if the change was not saved.
    fn saved<T>(inner: &Inner, v: T) -> Result<T, SimError> {
        match inner.log.broken() {
            Some(why) => Err(SimError::unsaved(why)),
            None => Ok(v),
        }
    }

    fn next_id(&self, inner: &mut Inner, prefix: &str) -> String {
        let h = self.next_hash(inner, prefix);
        match prefix {
            "file" => format!("file-{}", &hex::encode(&h[..11])),
            "azure-file" => format!("file-{}", &hex::encode(&h[..16])),
            "gemini-file" => format!("files/{}", &hex::encode(&h[..8])),
            "batch" => format!("batch_{}", &hex::encode(&h[..12])),
            "azure-batch" => {
                let u = uuid::Uuid::from_slice(&h[..16]).unwrap_or_default();
                format!("batch_{u}")
            }
            "msgbatch" => format!("msgbatch_01{}", &hex::encode(&h[..12])),
            "gemini-batch" => format!("batches/{}", &hex::encode(&h[..8])),
            "bedrock-job" => {
                const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
                let id: String = h[..12]
                    .iter()
                    .map(|b| ALPHABET[usize::from(*b) % 36] as char)
                    .collect();
                format!(
                    "arn:aws:bedrock:{}:{}:model-invocation-job/{id}",
                    self.settings.aws_region,
                    bedrock::ACCOUNT
                )
            }
            _ => format!("{prefix}_{}", &hex::encode(&h[..12])),
        }
    }

    /// A fresh hash for an id: the seed, the next sequence number, what it is for and this
    /// simulator's nonce.
    fn next_hash(&self, inner: &mut Inner, what: &str) -> [u8; 32] {
        inner.seq += 1;
        let mut h = Sha256::new();
        h.update(format!("{}:{}:{what}:", self.settings.seed, inner.seq));
        h.update(self.nonce);
        h.finalize().into()
    }

    /// A name and path for a new file's content.
    fn new_content(&self, inner: &mut Inner) -> (String, PathBuf) {
        inner.seq += 1;
        let name = format!("f{}-{}", hex::encode(&self.nonce[..6]), inner.seq);
        let path = self.files.join(&name);
        (name, path)
    }

    /// A path for a new file's content (created 0600 by whoever writes it).
    pub(crate) fn new_file_path(&self) -> PathBuf {
        self.new_content(&mut self.lock()).1
    }

    fn content_path(&self, name: &str) -> PathBuf {
        self.files.join(name)
    }
}

#[cfg(test)]
mod aws_test;
#[cfg(test)]
mod bedrock_tests;
#[cfg(test)]
mod tests;
