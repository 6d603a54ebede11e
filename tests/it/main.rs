//! Integration tests: one binary, one temporary folder per test, everything against the
//! built-in simulator over real HTTP.

mod cli;
mod common;
mod cost;
mod crash;
mod faults;
mod pipeline;
mod providers;
mod sim;
mod store;
mod workers;
