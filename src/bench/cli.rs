//! The `bench` commands: each runs one measurement of this module and prints its figures.

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// In process: pre-generated Avro bytes through decode + engine on all cores.
    Pipeline {
        /// Events timed (as many again warm the engines first).
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Distinct users.
        #[arg(long, default_value_t = 100_000)]
        users: usize,
        /// Worker threads, one shard of users each (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Write each timed event's user's final model vector here (raw f64, 50 per row), for
        /// benches/sklearn/run.sh.
        #[arg(long)]
        vectors_out: Option<PathBuf>,
    },
    /// Through a real broker: segstream's rate next to a bare consumer's on the same topics.
    Broker {
        /// Bootstrap servers of the broker to measure against.
        #[arg(long)]
        brokers: String,
        /// Events to produce and consume.
        #[arg(long, default_value_t = 500_000)]
        events: u64,
        /// Distinct users in the traffic (each one's first assignment is a published change).
        #[arg(long, default_value_t = 100_000)]
        users: usize,
        /// A librdkafka property for both consumers (bare and segstream's), `KEY=VALUE`;
        /// repeatable. To measure consumer tuning.
        #[arg(long = "consumer-property", value_parser = parse_property)]
        consumer_properties: Vec<(String, String)>,
    },
    /// Latency: event produce time to segment change at a subscriber, at a fixed input rate.
    Latency {
        /// Bootstrap servers of the broker to measure against.
        #[arg(long)]
        brokers: String,
        /// Input events per second (measure at half of `bench broker`'s segstream rate).
        #[arg(long, default_value_t = 50_000)]
        rate: u64,
        /// Duration of the run; the first quarter is a warm-up.
        #[arg(long, default_value_t = 40)]
        seconds: u64,
        /// Distinct users.
        #[arg(long, default_value_t = 100_000)]
        users: usize,
        /// librdkafka's fetch.wait.max.ms for segstream's consumer (its default is 500 ms; a
        /// broker that holds fetches that long adds it to every event's latency at low load).
        #[arg(long)]
        fetch_wait_ms: Option<u64>,
        /// No segstream: a consumer configured as segstream's reads the input topics and times
        /// each event from its produce time — one broker hop, the floor under segstream's two.
        #[arg(long)]
        floor: bool,
        /// segstream's `state.checkpoint_interval` for the run (e.g. "30s"); "off" runs without
        /// checkpoints.
        #[arg(long, default_value = "5s")]
        checkpoint_interval: String,
    },
    /// Restore time: a full checkpoint of N users to a changelog on a real broker, restored.
    Restore {
        /// Bootstrap servers of the broker to measure against.
        #[arg(long)]
        brokers: String,
        /// Users in the checkpoint.
        #[arg(long, default_value_t = 1_000_000)]
        users: usize,
        /// Changelog partitions.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Resident memory per user: persona events for N users through the engine.
    Memory {
        /// Distinct users.
        #[arg(long, default_value_t = 1_000_000)]
        users: usize,
        /// Events per user (on average; users are drawn at random).
        #[arg(long, default_value_t = 4)]
        events_per_user: usize,
    },
}

/// `bench`: the benchmarks, each printing its figures.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Broker {
            brokers,
            events,
            users,
            consumer_properties,
        } => bench_broker(brokers, events, users, consumer_properties).await,
        BenchCommand::Pipeline {
            events,
            users,
            threads,
            vectors_out,
        } => bench_pipeline(events, users, threads, vectors_out),
        BenchCommand::Latency {
            brokers,
            rate,
            seconds,
            users,
            fetch_wait_ms,
            floor,
            checkpoint_interval,
        } => {
            bench_latency(
                brokers,
                rate,
                seconds,
                users,
                fetch_wait_ms,
                floor,
                checkpoint_interval,
            )
            .await
        }
        BenchCommand::Restore {
            brokers,
            users,
            partitions,
        } => bench_restore(brokers, users, partitions).await,
        BenchCommand::Memory {
            users,
            events_per_user,
        } => bench_memory(users, events_per_user),
    }
}

/// `bench broker`.
async fn bench_broker(
    brokers: String,
    events: u64,
    users: usize,
    consumer_properties: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let r = super::broker(&brokers, events, users, &consumer_properties).await?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    println!(
        "bare consumer {:.0} events/s, segstream {:.0} events/s: ratio {:.2}",
        r.bare_consumer_events_per_second, r.segstream_events_per_second, r.ratio
    );
    println!(
        "without checkpoints {:.0} events/s: checkpointing costs {:.1} % of throughput",
        r.segstream_without_checkpoints_events_per_second,
        100.0 * r.checkpoint_cost
    );
    println!(
        "{:.2} us per message, of which decode + apply {:.2} us",
        r.pipeline_us_per_message, r.decode_apply_us_per_message
    );
    Ok(())
}

/// `bench pipeline`.
fn bench_pipeline(
    events: usize,
    users: usize,
    threads: Option<usize>,
    vectors_out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let threads = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let r = super::pipeline(events, users, threads, vectors_out.as_deref())?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    println!(
        "{} threads: {:.0} events/s, {:.0} events/s per core",
        r.threads, r.events_per_second, r.events_per_second_per_core
    );
    Ok(())
}

/// `bench latency`.
async fn bench_latency(
    brokers: String,
    rate: u64,
    seconds: u64,
    users: usize,
    fetch_wait_ms: Option<u64>,
    floor: bool,
    checkpoint_interval: String,
) -> anyhow::Result<()> {
    let checkpoints = match checkpoint_interval.as_str() {
        "off" => None,
        s => Some(
            humantime::parse_duration(s)
                .map_err(|e| anyhow::anyhow!("--checkpoint-interval: {e}"))?,
        ),
    };
    let options = super::LatencyOptions {
        rate,
        seconds,
        users,
        fetch_wait_ms,
        floor,
        checkpoints,
    };
    let r = super::latency(&brokers, &options).await?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    let what = if floor {
        "event -> consumer of the input (no segstream)"
    } else {
        "event -> segment change at a subscriber"
    };
    println!(
        "{} events/s: {what} p50 {:.0} ms, p99 {:.0} ms ({} timed)",
        r.rate, r.p50_ms, r.p99_ms, r.changes
    );
    Ok(())
}

/// `bench restore`.
async fn bench_restore(brokers: String, users: usize, partitions: i32) -> anyhow::Result<()> {
    let r = super::restore(&brokers, users, partitions).await?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    println!(
        "{} users ({:.0} MB of state): full checkpoint written in {:.1} s, restored in {:.1} s ({:.0} users/s)",
        r.users,
        r.changelog_bytes as f64 / 1e6,
        r.checkpoint_seconds,
        r.restore_seconds,
        r.users_per_second
    );
    Ok(())
}

/// `bench memory`.
fn bench_memory(users: usize, events_per_user: usize) -> anyhow::Result<()> {
    let r = super::memory(users, events_per_user)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    println!(
        "{} users: {:.0} bytes of resident memory per user ({:.0} events/s while filling)",
        r.users, r.bytes_per_user, r.events_per_second
    );
    Ok(())
}

/// `KEY=VALUE` into its two halves.
fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}
