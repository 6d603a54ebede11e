//! Handling the files the simulator holds (uploads, inline batch inputs and result files):
//! adding, reading, listing and deleting them, their contents in the simulator's files
//! folder, and the Gemini resumable-upload sessions. The file itself is `data`'s; how it
//! looks on the wire is its provider's (`openai`, `gemini`).

use std::path::PathBuf;

use serde_json::{Value, json};

use super::data::SimFile;
use super::journal::Put;
use super::types::{ProviderKind, SimError};
use super::{Sim, wire};
use crate::util::time::unix_now;

impl Sim {
    pub(crate) fn add_file(
        &self,
        flavor: ProviderKind,
        filename: String,
        purpose: String,
        path: PathBuf,
        bytes: u64,
        sha256: String,
    ) -> Result<Value, SimError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let mut inner = self.state()?;
        let id = match flavor {
            ProviderKind::Azure => self.next_id(&mut inner, "azure-file"),
            ProviderKind::Gemini => self.next_id(&mut inner, "gemini-file"),
            _ => self.next_id(&mut inner, "file"),
        };
        let upload = json!({"id": id, "filename": filename, "purpose": purpose, "bytes": bytes, "sha256": sha256});
        let f = SimFile {
            id: id.clone(),
            filename,
            purpose,
            bytes,
            created_at: unix_now(),
            name,
        };
        let v = wire::file_json(flavor, &f);
        let seq = inner.seq;
        inner.log.write(seq, &[Put::Upload(&upload), Put::File(&f)]);
        inner.uploads.push(upload);
        inner.files.insert(id, f);
        Self::saved(&inner, v)
    }

    pub(crate) fn start_session(&self, display_name: String) -> String {
        let mut inner = self.lock();
        let token = hex::encode(&self.next_hash(&mut inner, "upload")[..12]);
        inner.sessions.insert(token.clone(), display_name);
        token
    }

    pub(crate) fn take_session(&self, token: &str) -> Option<String> {
        self.lock().sessions.remove(token)
    }

    pub(crate) fn file(&self, flavor: ProviderKind, id: &str) -> Result<Value, SimError> {
        self.state()?
            .files
            .get(id)
            .map(|f| wire::file_json(flavor, f))
            .ok_or_else(|| SimError::not_found("file", id))
    }

    pub(crate) fn file_path(&self, id: &str) -> Result<PathBuf, SimError> {
        self.state()?
            .files
            .get(id)
            .map(|f| self.content_path(&f.name))
            .ok_or_else(|| SimError::not_found("file", id))
    }

    pub(crate) fn delete_file(&self, id: &str) -> Result<Value, SimError> {
        let mut inner = self.state()?;
        let f = inner
            .files
            .remove(id)
            .ok_or_else(|| SimError::not_found("file", id))?;
        let seq = inner.seq;
        inner.log.write(seq, &[Put::DropFile(id)]);
        let _ = std::fs::remove_file(self.content_path(&f.name));
        Self::saved(&inner, json!({"id": id, "object": "file", "deleted": true}))
    }

    pub(crate) fn list_files(
        &self,
        flavor: ProviderKind,
        purpose: Option<&str>,
        desc: bool,
        limit: usize,
        after: Option<&str>,
    ) -> Value {
        let inner = self.lock();
        let mut files: Vec<&SimFile> = inner
            .files
            .values()
            .filter(|f| purpose.is_none_or(|p| f.purpose == p))
            .filter(|f| (flavor == ProviderKind::Gemini) == f.id.starts_with("files/"))
            .collect();
        files.sort_by_key(|f| (f.created_at, f.id.clone()));
        if desc {
            files.reverse();
        }
        let start = after
            .and_then(|a| files.iter().position(|f| f.id == a).map(|p| p + 1))
            .unwrap_or(0);
        let page: Vec<Value> = files
            .iter()
            .skip(start)
            .take(limit)
            .map(|f| wire::file_json(flavor, f))
            .collect();
        let has_more = start + page.len() < files.len();
        let next = has_more.then(|| files[start + limit - 1].id.as_str());
        wire::file_list(flavor, page, has_more, next)
    }
}
