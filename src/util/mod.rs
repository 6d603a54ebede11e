//! Small helpers every layer uses and none owns: private and atomic files (`fs`), clocks
//! and timestamps (`time`), text for people and logs (`text`), terminal tables (`table`),
//! the machine's name (`host`),
//! and the named crash points of the crash tests (`failpoint`). Nothing here imports the rest
//! of the crate.

pub mod failpoint;
pub mod fs;
pub mod host;
pub mod table;
pub mod text;
pub mod time;
