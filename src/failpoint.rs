//! Named crash points for the crash tests (RELIABILITY.md B6).
//!
//! Compiled in only with the `failpoints` cargo feature. `NIGHTSHIFT_FAILPOINTS` names the
//! points to trip, each with the hit on which it fires: `create.after_send=1,apply.after_chunk=3`.
//! Tripping aborts the process on the spot — no destructors, no flush — as `kill -9` would.

/// Marks a named crash point. A no-op unless built with the `failpoints` feature.
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoint::hit($name);
    };
}

#[cfg(feature = "failpoints")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    fn config() -> &'static Mutex<HashMap<String, (u32, u32)>> {
        static CFG: OnceLock<Mutex<HashMap<String, (u32, u32)>>> = OnceLock::new();
        CFG.get_or_init(|| {
            let mut m = HashMap::new();
            if let Ok(spec) = std::env::var("NIGHTSHIFT_FAILPOINTS") {
                for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let (name, hit) = part.split_once('=').unwrap_or((part, "1"));
                    let hit = hit.trim().parse().unwrap_or(1);
                    m.insert(name.trim().to_string(), (hit, 0));
                }
            }
            Mutex::new(m)
        })
    }

    /// Counts a hit on `name` and aborts the process if this is the configured hit.
    pub fn hit(name: &str) {
        let mut cfg = config().lock().unwrap_or_else(|e| e.into_inner());
        if let Some((target, seen)) = cfg.get_mut(name) {
            *seen += 1;
            if *seen == *target {
                eprintln!("failpoint {name} (hit {seen}): aborting");
                std::process::abort();
            }
        }
    }
}

#[cfg(feature = "failpoints")]
pub use imp::hit;
