//! Building: a planned batch's JSONL input file, written from the store deterministically
//! and atomically, under the name it is uploaded as.

use std::collections::HashMap;
use std::path::PathBuf;

use super::{RunError, Runner, batches_dir};
use crate::provider::BatchProvider;
use crate::request::RequestShape;
use crate::store::{BatchRow, Store};
use crate::util::fs::AtomicFile;

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    /// Writes the batch's JSONL file from the store, deterministically, atomically.
    pub(super) async fn build_file(
        &self,
        b: &BatchRow,
    ) -> Result<(PathBuf, String, u64), RunError> {
        use sha2::{Digest, Sha256};
        use std::io::Write;
        let ctx = self.ctx;
        let path = batches_dir(&ctx.work_dir).join(upload_name(&b.id));
        let mut file = AtomicFile::create(&path).map_err(|source| RunError::Output {
            path: path.clone(),
            source,
        })?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut shapes: HashMap<i64, RequestShape> = HashMap::new();
        let mut after = 0i64;
        let mut buf = Vec::with_capacity(1 << 20);
        let codec = ctx.provider.codec();
        loop {
            let lines = ctx.store.batch_lines(&b.id, after, 5000).await?;
            if lines.is_empty() {
                break;
            }
            buf.clear();
            for l in &lines {
                if let std::collections::hash_map::Entry::Vacant(e) = shapes.entry(l.shape_id) {
                    e.insert(ctx.store.shape(l.shape_id).await?);
                }
                codec.write_line(&l.custom_id, &shapes[&l.shape_id], &l.user_json, &mut buf);
                after = l.attempt_id;
            }
            hasher.update(&buf);
            bytes += buf.len() as u64;
            file.write_all(&buf).map_err(|source| RunError::Output {
                path: path.clone(),
                source,
            })?;
            crate::failpoint!("build.mid_write");
        }
        file.commit().map_err(|source| RunError::Output {
            path: path.clone(),
            source,
        })?;
        Ok((path, hex::encode(hasher.finalize()), bytes))
    }
}

/// The name a batch's input file is uploaded under: the local batch id.
pub fn upload_name(batch_id: &str) -> String {
    format!("{batch_id}.jsonl")
}
