//! The command line: argument definitions and dispatch to `app`, `replay` and `retail`.

use crate::app::{self, DemoOptions, GenerateOptions};
use crate::config::RawConfig;
use crate::replay::{self, ReplayInputs, ReplayOptions, ReplayOutputs};
use crate::retail;
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use figment::Figment;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "segstream",
    version,
    about = "Real-time user segmentation over Kafka"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service against a Kafka cluster.
    Run(RunArgs),
    /// Run everything in-process on an embedded Kafka cluster with synthetic traffic.
    Demo(DemoArgs),
    /// Produce synthetic persona traffic (with some malformed records) to a Kafka cluster.
    Generate(GenerateArgs),
    /// Run NDJSON event files through the same code as the Kafka path.
    Replay(ReplayArgs),
    /// Convert the UCI Online Retail CSV into purchase events (NDJSON) for replay.
    Retail(RetailArgs),
    /// Print the segment catalogue of a saved model.
    Segments(SegmentsArgs),
    /// Measurements that print their figures (built with the `bench` feature, a default).
    #[cfg(feature = "bench")]
    Bench {
        #[command(subcommand)]
        command: crate::bench::cli::BenchCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration of FILE (with environment overrides), or the errors.
    Check {
        /// The TOML file to check.
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArgs {
    #[command(flatten)]
    pub cluster: ProducerConfigArgs,
    /// Consumer group (overrides kafka.group_id).
    #[arg(long)]
    pub group: Option<String>,
    /// HTTP address (overrides http.bind).
    #[arg(long)]
    pub http_bind: Option<String>,
}

impl ConfigArgs {
    pub fn load(&self) -> anyhow::Result<crate::config::Settings> {
        let mut flags = self.cluster.flags();
        if let Some(g) = &self.group {
            flags = flags.merge(("kafka.group_id", g));
        }
        if let Some(h) = &self.http_bind {
            flags = flags.merge(("http.bind", h));
        }
        Ok(RawConfig::load_with(self.cluster.config.as_deref(), flags)?.validate()?)
    }
}

/// What `generate` takes of the configuration (it neither joins a group nor serves HTTP), and
/// the part of [`ConfigArgs`] every command shares.
#[derive(Debug, Args, Clone, Default)]
pub struct ProducerConfigArgs {
    /// TOML configuration file (see config/segstream.toml).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Bootstrap servers (overrides kafka.brokers).
    #[arg(long)]
    pub brokers: Option<String>,
}

impl ProducerConfigArgs {
    fn flags(&self) -> Figment {
        match &self.brokers {
            Some(b) => Figment::new().merge(("kafka.brokers", b)),
            None => Figment::new(),
        }
    }

    pub fn load(&self) -> anyhow::Result<crate::config::Settings> {
        Ok(RawConfig::load_with(self.config.as_deref(), self.flags())?.validate()?)
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Warm-start from a model saved by `segstream replay --save-model`.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SegmentsArgs {
    /// Configuration the model was trained with (feature weights, actions).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The saved model.
    #[arg(long)]
    pub model: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The synthetic traffic shared by `demo` and `generate`.
#[derive(Debug, Args)]
pub struct TrafficArgs {
    /// Distinct synthetic users.
    #[arg(long, default_value_t = 2_000)]
    pub users: usize,
    /// Share of malformed records.
    #[arg(long, default_value_t = 0.01)]
    pub malformed_ratio: f64,
    /// Seed of the generator.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop after this long (e.g. 20s); without it, run until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Synthetic events per second.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    #[command(flatten)]
    pub traffic: TrafficArgs,
    /// HTTP address of /metrics (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http_bind: String,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub config: ProducerConfigArgs,
    /// Records per second (0 = as fast as possible).
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    #[command(flatten)]
    pub traffic: TrafficArgs,
    /// Stop after this many records (default: until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
    /// Create missing input topics with this many partitions.
    #[arg(long)]
    pub create_topics: Option<i32>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Configuration (features, model, validation) to replay with.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// NDJSON click events.
    #[arg(long)]
    pub clickstream: Option<PathBuf>,
    /// NDJSON purchase events.
    #[arg(long)]
    pub purchases: Option<PathBuf>,
    /// NDJSON social events.
    #[arg(long)]
    pub social: Option<PathBuf>,
    /// Where to write segment changes (NDJSON).
    #[arg(long)]
    pub changes_out: Option<PathBuf>,
    /// Where to write segment catalogue records (NDJSON).
    #[arg(long)]
    pub catalogue_out: Option<PathBuf>,
    /// Where to write the final per-user state (NDJSON).
    #[arg(long)]
    pub users_out: Option<PathBuf>,
    /// Where to write unusable lines with their reasons (NDJSON).
    #[arg(long)]
    pub dead_letters_out: Option<PathBuf>,
    /// Save the trained model here (for `run --model` and `segments`).
    #[arg(long)]
    pub save_model: Option<PathBuf>,
    /// Start from this saved model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Replay only events up to this time (RFC 3339, e.g. 2011-09-09T00:00:00Z) and report the
    /// state as of it.
    #[arg(long)]
    pub until: Option<String>,
}

#[derive(Debug, Args)]
pub struct RetailArgs {
    /// The Online Retail CSV (.csv or .csv.gz).
    #[arg(long, default_value = "tests/data/online_retail.csv.gz")]
    pub input: PathBuf,
    /// Where to write purchase events (NDJSON).
    #[arg(long)]
    pub output: PathBuf,
    /// Where to write refused rows with their reasons (NDJSON).
    #[arg(long)]
    pub rejects: Option<PathBuf>,
}

/// Runs a parsed command. `cancel` fires on SIGINT/SIGTERM.
pub async fn run(cli: Cli, cancel: CancellationToken) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => app::run(args.config.load()?, args.model.as_deref(), cancel).await,
        Command::Segments(a) => run_segments(a),
        Command::Demo(a) => run_demo(a, cancel).await,
        Command::Generate(a) => run_generate(a, cancel).await,
        Command::Replay(a) => run_replay(a),
        Command::Retail(a) => run_retail(a),
        #[cfg(feature = "bench")]
        Command::Bench { command } => crate::bench::cli::run(command).await,
        Command::Config {
            command: ConfigCommand::Check { file },
        } => run_config_check(file),
    }
}

/// `segments`: a saved model's segments, with its value model's figures.
fn run_segments(a: SegmentsArgs) -> anyhow::Result<()> {
    let settings = RawConfig::load(a.config.as_deref())?.validate()?;
    let engine = crate::engine::Engine::with_model(&settings, &a.model)
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let segments = engine.segments();
    if !engine.is_seeded() {
        anyhow::bail!(
            "{}: the model has no segments yet (k-means had not seen model.init_events events from model.init_users users when it was saved)",
            a.model.display()
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&segments)?);
    } else {
        // A model holds no users: sizes are each centroid's share of what it learnt from.
        let shares = engine.segment_shares();
        let (_, _, labels) = engine.value_errors();
        let (calibration, log_loss) = engine.value_calibration();
        let v = engine.value_validation();
        println!(
            "model version {}, value model: {labels} labels, calibration {calibration:.2}, Pearson {:.3}, normalised Gini {:.3}; propensity AUC {:.3}, log loss {log_loss:.3}",
            engine.model_version(),
            v.value_pearson,
            v.value_normalised_gini,
            v.propensity_auc,
        );
        if !v.deciles.is_empty() {
            println!("value by tenth of labels (highest predicted first):");
            println!(
                "{:>8}  {:>14}  {:>11}",
                "labels", "mean predicted", "mean actual"
            );
            for d in &v.deciles {
                println!(
                    "{:>8}  {:>14.2}  {:>11.2}",
                    d.labels, d.mean_predicted, d.mean_actual
                );
            }
        }
        println!("{:>3}  {:>6}  {:<24} description", "id", "share", "action");
        for s in segments {
            println!(
                "{:>3}  {:>5.1}%  {:<24} {}",
                s.id,
                100.0 * shares.get(s.id as usize).copied().unwrap_or(0.0),
                s.action.as_deref().unwrap_or("-"),
                s.label
            );
        }
    }
    Ok(())
}

/// `demo`: the whole pipeline on an embedded cluster, with a live summary.
async fn run_demo(a: DemoArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let report = app::demo(
        DemoOptions {
            duration: a.duration,
            rate: a.rate,
            users: a.traffic.users,
            malformed_ratio: a.traffic.malformed_ratio,
            seed: a.traffic.seed,
            http_bind: a.http_bind,
        },
        cancel,
    )
    .await?;
    anyhow::ensure!(
        report.segments_non_empty > 0,
        "no segments formed: {report:?}"
    );
    Ok(())
}

/// `generate`: synthetic traffic to the input topics.
async fn run_generate(a: GenerateArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let settings = a.config.load()?;
    let s = app::generate(
        &settings,
        &GenerateOptions {
            rate: a.rate,
            users: a.traffic.users,
            malformed_ratio: a.traffic.malformed_ratio,
            seed: a.traffic.seed,
            count: a.count,
            create_topics: a.create_topics,
        },
        cancel,
    )
    .await?;
    println!(
        "sent {} records ({} malformed, {} failed)",
        s.sent, s.malformed, s.failed
    );
    anyhow::ensure!(s.failed == 0, "{} records were not delivered", s.failed);
    Ok(())
}

/// `replay`: NDJSON files through the engine in event-time order.
fn run_replay(a: ReplayArgs) -> anyhow::Result<()> {
    let settings = RawConfig::load(a.config.as_deref())?.validate()?;
    let (engine, report) = replay::replay(
        &settings,
        &ReplayInputs {
            clickstream: a.clickstream,
            purchases: a.purchases,
            social: a.social,
        },
        &ReplayOutputs {
            changes: a.changes_out,
            catalogue: a.catalogue_out,
            users: a.users_out,
            dead_letters: a.dead_letters_out,
            model: a.save_model,
        },
        &ReplayOptions {
            model: a.model,
            until_ms: a
                .until
                .map(|u| {
                    chrono::DateTime::parse_from_rfc3339(&u)
                        .map(|t| t.timestamp_millis())
                        .with_context(|| format!("--until {u}: expected RFC 3339"))
                })
                .transpose()?,
        },
    )?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("segments:");
    for s in engine.segments() {
        println!(
            "  {:>2}: {:>6} users  value {:>9.2}  p(buy) {:>5.1}%  {:<24} {}",
            s.id,
            s.size,
            s.mean_predicted_value,
            100.0 * s.mean_purchase_probability,
            s.action.as_deref().unwrap_or("-"),
            s.label
        );
    }
    Ok(())
}

/// `retail`: the UCI Online Retail CSV as purchase events.
fn run_retail(a: RetailArgs) -> anyhow::Result<()> {
    let report = retail::convert(&a.input, &a.output, a.rejects.as_deref())
        .with_context(|| format!("converting {}", a.input.display()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// `config check`: every problem of a configuration, or the effective configuration.
fn run_config_check(file: Option<PathBuf>) -> anyhow::Result<()> {
    let raw = RawConfig::load(file.as_deref())?;
    let problems = raw.problems();
    if !problems.is_empty() {
        // Every problem once, so one run of `config check` shows all there is to fix.
        let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
        match all.as_slice() {
            [one] => anyhow::bail!("{one}"),
            _ => anyhow::bail!("{} problems:\n{}", all.len(), all.join("\n")),
        }
    }
    let mut effective = raw.clone();
    let settings = raw.validate()?;
    // What librdkafka itself refuses: a missing feature, property or certificate file.
    crate::kafka::check_clients(&settings)?;
    // With what validation added (the CA probe for TLS without a CA).
    effective.kafka = settings.kafka;
    // Printed as TOML, the file's own format, secrets redacted: it can be saved and used.
    print!("{}", effective.redacted_toml());
    Ok(())
}
