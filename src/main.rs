//! The `nightshift` binary: parses arguments, sets up logging, runs the command.

use clap::Parser;
use nightshift::cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// jemalloc: per-thread caches and arenas that do not fragment the heap into several times
/// the memory in use, where glibc's malloc spent a sixth of a run in locks and free lists.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts. It also serves the C code's `malloc` (SQLite's
/// page cache and statements) on Linux. Two arenas: with its default of four per core, each
/// thread's arena kept its own freed pages and the peak RSS rose by 12–15 MB.
// SAFETY: jemalloc reads this symbol as its `const char *malloc_conf`; a reference to a byte
// array is a plain pointer, here to a NUL-terminated string that lives for the whole process.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc"), target_os = "linux"))]
#[unsafe(export_name = "malloc_conf")]
static MALLOC_CONF: &[u8; 10] = b"narenas:2\0";

fn main() {
    // A file-size limit (or a full disk) must surface as a write error, not kill the process.
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to SIG_IGN before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::parse();
    // Read-only commands print reports that are often piped into `head`: a closed pipe
    // ends them quietly, as it ends any Unix filter. (Network writes never raise SIGPIPE:
    // they are sent with MSG_NOSIGNAL.)
    #[cfg(unix)]
    if cli.command.is_report() {
        // SAFETY: restoring the default disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let filter = EnvFilter::try_from_env("NIGHTSHIFT_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            EnvFilter::new(if cli.log_format == LogFormat::Json {
                "nightshift=info"
            } else {
                "nightshift=warn"
            })
        });
    // At trace level the AWS signer logs each canonical request and the SDK each request it
    // sends, session token included: those two never log below debug, whatever the filter
    // asks (a test runs everything at trace and looks for the credentials).
    let cap = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("aws_sigv4", LevelFilter::DEBUG)
        .with_target("aws_smithy_runtime", LevelFilter::DEBUG);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(cli.log_format == LogFormat::Text && cli.color.for_stderr())
        .with_writer(std::io::stderr);
    if cli.log_format == LogFormat::Json {
        builder.json().finish().with(cap).init();
    } else {
        builder.with_target(false).finish().with(cap).init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = runtime.block_on(nightshift::cli::main(cli));
    drop(runtime);
    std::process::exit(code);
}
