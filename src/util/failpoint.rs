//! Named crash points for the crash tests (docs/reliability.md §B6).
//!
//! Compiled in only with the `failpoints` cargo feature. `NIGHTSHIFT_FAILPOINTS` names the
//! points to trip, each with the hit on which it fires: `create.after_send=1,apply.after_chunk=3`.
//! Tripping aborts the process on the spot — no destructors, no flush — as `kill -9` would.
//! With `:stop` after the hit (`create.after_send=1:stop`) the process freezes itself there
//! instead (SIGSTOP), as a long pause or a network partition would; SIGCONT resumes it.

/// Marks a named crash point. A no-op unless built with the `failpoints` feature.
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        $crate::util::failpoint::hit($name);
    };
}

#[cfg(feature = "failpoints")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    /// Per point: the hit that trips it, hits so far, and whether it freezes (else aborts).
    type Points = HashMap<String, (u32, u32, bool)>;

    fn config() -> &'static Mutex<Points> {
        static CFG: OnceLock<Mutex<Points>> = OnceLock::new();
        CFG.get_or_init(|| {
            let mut m = HashMap::new();
            if let Ok(spec) = std::env::var("NIGHTSHIFT_FAILPOINTS") {
                for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let (name, action) = part.split_once('=').unwrap_or((part, "1"));
                    let (hit, stop) = match action.split_once(':') {
                        Some((hit, "stop")) => (hit, true),
                        _ => (action, false),
                    };
                    let hit = hit.trim().parse().unwrap_or(1);
                    m.insert(name.trim().to_string(), (hit, 0, stop));
                }
            }
            Mutex::new(m)
        })
    }

    /// Counts a hit on `name`; on the configured hit, aborts the process (or freezes it).
    pub fn hit(name: &str) {
        let mut cfg = config().lock().unwrap_or_else(|e| e.into_inner());
        let Some((target, seen, stop)) = cfg.get_mut(name) else {
            return;
        };
        *seen += 1;
        if *seen != *target {
            return;
        }
        let (seen, stop) = (*seen, *stop);
        drop(cfg);
        if stop {
            eprintln!("failpoint {name} (hit {seen}): stopping until SIGCONT");
            // SAFETY: raising a signal at ourselves has no memory-safety preconditions.
            unsafe {
                libc::raise(libc::SIGSTOP);
            }
            eprintln!("failpoint {name}: resumed");
        } else {
            eprintln!("failpoint {name} (hit {seen}): aborting");
            std::process::abort();
        }
    }
}

#[cfg(feature = "failpoints")]
pub use imp::hit;
