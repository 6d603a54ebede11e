//! `nightshift simulate`: serve the provider simulator.

use anyhow::Context;

use crate::cli::args::SimulateArgs;
use crate::cli::exit::{EXIT_CONFIG, EXIT_OK, Exit, exit};
use crate::cost::PriceTable;
use crate::sim::Sim;

pub(crate) async fn run(a: SimulateArgs) -> Result<i32, Exit> {
    let problems = a.settings.problems();
    if let Some((field, msg)) = problems.first() {
        return Err(exit(
            EXIT_CONFIG,
            anyhow::anyhow!("--{}: {msg}", field.replace('_', "-")),
        ));
    }
    let prices =
        PriceTable::builtin_with(a.pricing.as_deref()).map_err(|e| exit(EXIT_CONFIG, e))?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    use std::io::Write;
    std::io::stdout().flush()?;
    let sim = Sim::new(a.settings, prices)?;
    tokio::select! {
        r = crate::sim::serve(sim, listener) => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(EXIT_OK)
}
