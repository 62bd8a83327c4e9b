//! The `segstream` binary: parse the command line, start tracing, install signal handling, and
//! hand over to the library.

use clap::Parser;
use segstream::cli::{self, Cli, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// jemalloc, for Rust and (its symbols unprefixed) for librdkafka's C code. With glibc's malloc
/// a consumed message is freed by the consume loop into the arena of librdkafka's broker thread,
/// which is allocating the next fetch in it at the same time: the two contend on that arena's
/// lock, and the loop slept on it (futex waits in `free`) for most of its first seconds on a
/// backlog. jemalloc frees through per-thread caches; its size classes also start each user's
/// state on a cache line. Measured in docs/performance.md.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    exit_on_panic();
    let cli = Cli::parse();
    // The demo's live summary is its output: its logs say only what went wrong (RUST_LOG=info
    // shows everything, as for the other commands).
    let default = match cli.command {
        cli::Command::Demo(_) => "warn",
        _ => "info",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        tokio::spawn(shutdown_on_signal(cancel.clone()));
        cli::run(cli, cancel).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A panic on any thread ends the process (exit code 70, after the usual panic message), so
/// an orchestrator restarts it. Without this a panic in a spawned task (once: copying a
/// dead letter's headers) left the service alive but consuming nothing: `/healthz` still 200,
/// SIGTERM ignored. Input is re-read from the last checkpoint after the restart.
fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::exit(70);
    }));
}

/// Cancels on SIGINT or SIGTERM; the commands then shut down in order.
async fn shutdown_on_signal(cancel: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("Shutting down.");
    cancel.cancel();
}
