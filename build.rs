//! Build script: turns on the PostgreSQL tests (`cfg(pg_tests)`) when
//! `NIGHTSHIFT_TEST_PG_URL` names a server; without it `cargo test` lists them as ignored,
//! with the reason.

fn main() {
    println!("cargo:rustc-check-cfg=cfg(pg_tests)");
    println!("cargo:rerun-if-env-changed=NIGHTSHIFT_TEST_PG_URL");
    if std::env::var("NIGHTSHIFT_TEST_PG_URL").is_ok_and(|v| !v.trim().is_empty()) {
        println!("cargo:rustc-cfg=pg_tests");
    }
}
