//! A multi-stage run's records with their chains of items, read a page of records at a
//! time ([`ChainPages`]): what `report --items` writes, record by record.

use super::Chain;
use crate::store::{LinkRow, Store, StoreError};

/// Records per page: a page's records and links are read and written before the next, so
/// what `report --items` holds does not grow with the run (read whole, 322 MB at 100,000
/// records through two stages).
pub const CHAIN_PAGE: u32 = 5_000;

/// A multi-stage run's records with their links, a page at a time, in line order.
pub struct ChainPages<'a, S> {
    store: &'a S,
    run_id: &'a str,
    stages: &'a [String],
    page: u32,
    /// The last line read (`i64::MAX`: nothing, or nothing more, to read).
    after: i64,
}

/// One page of [`ChainPages`].
pub struct ChainPage {
    records: Vec<(i64, String)>,
    links: Vec<LinkRow>,
}

impl ChainPage {
    /// Each record of the page with its links, in line order.
    pub fn chains(&self) -> Vec<Chain<'_>> {
        self.records
            .iter()
            .map(|(line, record_id)| Chain {
                record_id,
                line: *line,
                links: LinkRow::of_line(&self.links, *line).iter().collect(),
            })
            .collect()
    }
}

impl<'a, S: Store> ChainPages<'a, S> {
    /// The chains of the run whose stages are `stages` (none for a one-stage run), `page`
    /// records at a time.
    pub fn new(store: &'a S, run_id: &'a str, stages: &'a [String], page: u32) -> Self {
        ChainPages {
            store,
            run_id,
            stages,
            page: page.max(1),
            after: if stages.len() > 1 { 0 } else { i64::MAX },
        }
    }

    pub fn stages(&self) -> &'a [String] {
        self.stages
    }

    /// The next page; `None` once every record was read.
    pub async fn next(&mut self) -> Result<Option<ChainPage>, StoreError> {
        if self.after == i64::MAX {
            return Ok(None);
        }
        let records = self
            .store
            .run_record_ids(self.run_id, self.after, self.page)
            .await?;
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            self.after = i64::MAX;
            return Ok(None);
        };
        let links = self
            .store
            .links_between(self.run_id, first.0, last.0, true)
            .await?;
        self.after = last.0;
        Ok(Some(ChainPage { records, links }))
    }
}
