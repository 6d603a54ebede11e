//! Handling the files the simulator holds (uploads, inline batch inputs, result files and S3
//! objects): adding, reading, listing and deleting them, their contents in the simulator's
//! files folder, and the Gemini resumable-upload sessions. An S3 object is a file whose id is
//! its `s3://bucket/key` URI, put by a client or written by the simulator (a Bedrock job's
//! output); a put replaces the object under its key. The file itself is `data`'s; how it
//! looks on the wire is its provider's (`openai`, `gemini`, `s3`).

use std::path::PathBuf;

use serde_json::{Value, json};

use super::data::{OBJECT_PUT, OBJECT_WRITTEN, SimFile, object_id};
use super::journal::Put;
use super::state::Inner;
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
            .filter(|f| !f.is_object())
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

/// A page of S3 objects (ListObjectsV2).
pub(super) struct ObjectPage {
    pub(super) objects: Vec<SimFile>,
    /// Keys rolled up at the delimiter (each once, ending with it).
    pub(super) common_prefixes: Vec<String>,
    /// More follow; the next page starts after this key.
    pub(super) next: Option<String>,
}

impl Sim {
    /// S3 PutObject: the object at `bucket`/`key` is now the content file at `path` (replacing
    /// any earlier one). Its ETag.
    pub(crate) fn put_object(
        &self,
        bucket: &str,
        key: &str,
        path: PathBuf,
        bytes: u64,
        sha256: String,
    ) -> Result<String, SimError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let id = object_id(bucket, key);
        let mut inner = self.state()?;
        let upload = json!({"id": id, "filename": key, "purpose": OBJECT_PUT, "bytes": bytes, "sha256": sha256});
        let f = SimFile {
            id: id.clone(),
            filename: key.to_string(),
            purpose: OBJECT_PUT.into(),
            bytes,
            created_at: unix_now(),
            name,
        };
        let etag = f.etag();
        let seq = inner.seq;
        inner.log.write(seq, &[Put::Upload(&upload), Put::File(&f)]);
        inner.uploads.push(upload);
        let old = inner.files.insert(id, f);
        Self::saved(&inner, ())?;
        if let Some(old) = old
            && !inner.referenced().contains(old.name.as_str())
        {
            let _ = std::fs::remove_file(self.content_path(&old.name));
        }
        Ok(etag)
    }

    /// The S3 object at `bucket`/`key`, and where its content is; `None` when there is none.
    pub(super) fn object(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<(SimFile, PathBuf)>, SimError> {
        Ok(self
            .state()?
            .files
            .get(&object_id(bucket, key))
            .map(|f| (f.clone(), self.content_path(&f.name))))
    }

    /// S3 DeleteObject: gone, if it was there.
    pub(crate) fn delete_object(&self, bucket: &str, key: &str) -> Result<(), SimError> {
        let id = object_id(bucket, key);
        let mut inner = self.state()?;
        let Some(f) = inner.files.remove(&id) else {
            return Ok(());
        };
        let seq = inner.seq;
        inner.log.write(seq, &[Put::DropFile(&id)]);
        Self::saved(&inner, ())?;
        if !inner.referenced().contains(f.name.as_str()) {
            let _ = std::fs::remove_file(self.content_path(&f.name));
        }
        Ok(())
    }

    /// S3 ListObjectsV2: the objects of `bucket` whose keys start with `prefix`, in key
    /// order, after `after`, at most `max` (objects and rolled-up prefixes together).
    pub(super) fn list_objects(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        after: Option<&str>,
        max: usize,
    ) -> Result<ObjectPage, SimError> {
        let inner = self.state()?;
        let from = object_id(bucket, prefix);
        let mut page = ObjectPage {
            objects: Vec::new(),
            common_prefixes: Vec::new(),
            next: None,
        };
        let mut last: Option<String> = None;
        for f in inner.files.range(from.clone()..).map(|(_, f)| f) {
            if !f.id.starts_with(&from) {
                break;
            }
            let key = &f.id[from.len() - prefix.len()..];
            if after.is_some_and(|a| key <= a) {
                continue;
            }
            let rolled = delimiter.filter(|d| !d.is_empty()).and_then(|d| {
                key[prefix.len()..]
                    .find(d)
                    .map(|i| &key[..prefix.len() + i + d.len()])
            });
            if rolled.is_some() && page.common_prefixes.last().map(String::as_str) == rolled {
                continue;
            }
            if page.objects.len() + page.common_prefixes.len() == max {
                page.next = last;
                break;
            }
            match rolled {
                Some(p) => {
                    // The next page resumes after every key under it.
                    last = Some(format!("{p}\u{10FFFF}"));
                    page.common_prefixes.push(p.to_string());
                }
                None => {
                    last = Some(key.to_string());
                    page.objects.push(f.clone());
                }
            }
        }
        Ok(page)
    }

    /// Writes an S3 object from the simulator's side (a Bedrock job's output): `lines`, each
    /// followed by a newline, at `id` (an `s3://` URI), replacing any object there. Saved
    /// with the batch that wrote it; the id.
    pub(super) fn write_object(&self, inner: &mut Inner, id: String, lines: &[String]) -> String {
        let (name, bytes) = self.write_lines(inner, lines);
        let key = id
            .strip_prefix("s3://")
            .and_then(|r| r.split_once('/'))
            .map(|(_, k)| k.to_string())
            .unwrap_or_default();
        inner.files.insert(
            id.clone(),
            SimFile {
                id: id.clone(),
                filename: key,
                purpose: OBJECT_WRITTEN.into(),
                bytes,
                created_at: unix_now(),
                name,
            },
        );
        id
    }
}
