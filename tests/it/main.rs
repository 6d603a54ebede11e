//! Integration tests: one binary, one temporary folder per test, everything over real HTTP
//! against the built-in simulator (or, in `secrets`, a loopback gateway that echoes the key).

mod cli;
mod common;
mod cost;
mod crash;
mod faults;
mod gc;
mod layers;
mod metrics;
mod nights;
mod outputs;
mod pipeline;
mod providers;
mod report;
mod secrets;
mod sim;
mod stages;
mod stages_plan;
mod store;
mod workers;
