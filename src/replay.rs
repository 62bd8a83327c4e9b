//! Replay: NDJSON event files (the JSON form of the schemas, one file per input topic), merged in
//! event-time order and run through the same decode → engine code as the Kafka path. Writes the
//! segment changes, the final per-user state and the dead letters as NDJSON.

use crate::config::{DecodeConfig, ModelConfig, Settings, WireFormat};
use crate::decode::{DecodeError, Decoder};
use crate::engine::{Engine, Outcome};
use crate::event::{Event, Source};
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Input files; any may be absent.
#[derive(Clone, Debug, Default)]
pub struct ReplayInputs {
    pub clickstream: Option<PathBuf>,
    pub purchases: Option<PathBuf>,
    pub social: Option<PathBuf>,
}

/// Output files; any may be absent.
#[derive(Clone, Debug, Default)]
pub struct ReplayOutputs {
    pub changes: Option<PathBuf>,
    pub catalogue: Option<PathBuf>,
    pub users: Option<PathBuf>,
    pub dead_letters: Option<PathBuf>,
    /// Where to save the trained model (for `run --model`).
    pub model: Option<PathBuf>,
}

/// How to run a replay.
#[derive(Clone, Debug, Default)]
pub struct ReplayOptions {
    /// Start from this saved model instead of an empty one.
    pub model: Option<PathBuf>,
    /// Ignore events after this time (ms) and report the state as of it.
    pub until_ms: Option<i64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplayReport {
    pub lines: u64,
    pub applied: u64,
    pub duplicates: u64,
    pub late: u64,
    pub invalid: BTreeMap<&'static str, u64>,
    pub changes: u64,
    /// Segment catalogue records (created, split, reworded, moved).
    pub catalogue_records: u64,
    pub flaps: u64,
    pub users: usize,
    /// Flaps per segment change.
    pub flapping_share: f64,
    /// k-means inertia of the final assignment, and the users it covers.
    pub inertia: f64,
    pub users_assigned: usize,
    /// Progressive errors of the predicted value (currency) and its number of labels.
    pub value_mae: f64,
    pub value_rmse: f64,
    pub value_labels: u64,
    /// Progressive Σ predicted ÷ Σ actual value, and the purchase propensity's log loss.
    pub value_calibration: f64,
    pub purchase_log_loss: f64,
    /// Progressive AUC of the propensity; Pearson, normalised Gini and deciles of the value.
    pub validation: crate::validation::Report,
}

/// A line that could not be used, as written to the dead-letter file.
#[derive(Serialize)]
struct DeadLetter<'a> {
    source: &'static str,
    file: &'a str,
    line: u64,
    error_code: &'static str,
    error_message: String,
    value: &'a str,
}

fn open_out(path: &Option<PathBuf>) -> anyhow::Result<Option<BufWriter<File>>> {
    path.as_ref()
        .map(|p| {
            File::create(p)
                .map(BufWriter::new)
                .with_context(|| format!("creating {}", p.display()))
        })
        .transpose()
}

/// Replays the inputs; returns the engine in its final state and a report.
pub fn replay(
    settings: &Settings,
    inputs: &ReplayInputs,
    outputs: &ReplayOutputs,
    options: &ReplayOptions,
) -> anyhow::Result<(Engine, ReplayReport)> {
    let mut report = ReplayReport::default();
    let mut out = Sinks::open(outputs)?;
    let events = read_events(&settings.decode, inputs, options, &mut report, &mut out)?;
    let mut engine = match &options.model {
        Some(path) => Engine::with_model(settings, path)
            .with_context(|| format!("loading model {}", path.display()))?,
        None => Engine::new(settings),
    };
    let started = std::time::Instant::now();
    apply_all(&mut engine, &events, &mut report, &mut out)?;
    // The final state is "as of" the cut-off (or the last event): idle users decayed to it.
    if let Some(end) = options.until_ms.or(events.last().map(|e| e.0)) {
        out.changes(engine.advance_to(end, end), &mut report)?;
    }
    out.catalogue(&mut engine, &mut report)?;
    out.flush()?;
    write_final(&engine, outputs)?;
    tracing::info!(
        events = events.len(),
        seconds = started.elapsed().as_secs_f64(),
        "Replay done."
    );
    summarise(&engine, &mut report);
    warn_if_young(&settings.model, &engine, events.len());
    Ok((engine, report))
}

/// An input event with its time, topic and line number (the sort key).
type Timed = (i64, Source, u64, Event);

/// Every input file's valid events, in event-time order (ties keep the topic and then the file
/// order, so replay is deterministic), up to the cut-off; unusable lines are dead-lettered.
fn read_events(
    decode: &DecodeConfig,
    inputs: &ReplayInputs,
    options: &ReplayOptions,
    report: &mut ReplayReport,
    out: &mut Sinks,
) -> anyhow::Result<Vec<Timed>> {
    let decoder = Decoder::new(decode.clone());
    let mut events: Vec<Timed> = Vec::new();
    for (source, path) in [
        (Source::Clickstream, &inputs.clickstream),
        (Source::Purchases, &inputs.purchases),
        (Source::Social, &inputs.social),
    ] {
        let Some(path) = path else { continue };
        read_file(source, path, &decoder, report, &mut out.dead, &mut events)?;
    }
    events.sort_by_key(|(t, s, n, _)| (*t, *s, *n));
    if let Some(until) = options.until_ms {
        events.retain(|(t, ..)| *t <= until);
    }
    Ok(events)
}

/// Applies the events in order, writing what they cause.
fn apply_all(
    engine: &mut Engine,
    events: &[Timed],
    report: &mut ReplayReport,
    out: &mut Sinks,
) -> anyhow::Result<()> {
    let mut last_report = std::time::Instant::now();
    for (i, (t, source, n, event)) in events.iter().enumerate() {
        if i % 65_536 == 0 && last_report.elapsed() >= std::time::Duration::from_secs(5) {
            last_report = std::time::Instant::now();
            tracing::info!(
                done = i,
                of = events.len(),
                users = engine.users(),
                "Replaying."
            );
        }
        // No wall clock in replay: a change is "emitted" at its triggering event's time.
        let applied = engine.apply(event, *t);
        match applied.outcome {
            Outcome::Applied => report.applied += 1,
            Outcome::Duplicate => report.duplicates += 1,
            Outcome::Late { applied } => {
                report.late += 1;
                if applied {
                    report.applied += 1;
                } else {
                    *report
                        .invalid
                        .entry(DecodeError::TooLate.code())
                        .or_default() += 1;
                    out.too_late(*source, *n, event)?;
                }
            }
        }
        out.changes(applied.changes, report)?;
        if engine.has_catalogue() {
            out.catalogue(engine, report)?;
        }
    }
    Ok(())
}

/// The replay's NDJSON outputs, each written if asked for.
struct Sinks {
    changes: Option<BufWriter<File>>,
    catalogue: Option<BufWriter<File>>,
    dead: Option<BufWriter<File>>,
}

impl Sinks {
    fn open(outputs: &ReplayOutputs) -> anyhow::Result<Self> {
        Ok(Self {
            changes: open_out(&outputs.changes)?,
            catalogue: open_out(&outputs.catalogue)?,
            dead: open_out(&outputs.dead_letters)?,
        })
    }

    fn changes(
        &mut self,
        list: Vec<crate::event::SegmentChange>,
        report: &mut ReplayReport,
    ) -> anyhow::Result<()> {
        for change in list {
            report.changes += 1;
            if let Some(w) = self.changes.as_mut() {
                serde_json::to_writer(&mut *w, &change)?;
                w.write_all(b"\n")?;
            }
        }
        Ok(())
    }

    fn catalogue(&mut self, engine: &mut Engine, report: &mut ReplayReport) -> anyhow::Result<()> {
        for record in engine.take_catalogue() {
            report.catalogue_records += 1;
            if let Some(w) = self.catalogue.as_mut() {
                serde_json::to_writer(&mut *w, &record)?;
                w.write_all(b"\n")?;
            }
        }
        Ok(())
    }

    /// A dead letter for an event the late policy refused.
    fn too_late(&mut self, source: Source, line: u64, event: &Event) -> anyhow::Result<()> {
        if let Some(w) = self.dead.as_mut() {
            let d = DeadLetter {
                source: source.as_str(),
                file: "",
                line,
                error_code: DecodeError::TooLate.code(),
                error_message: DecodeError::TooLate.to_string(),
                value: event.event_id(),
            };
            serde_json::to_writer(&mut *w, &d)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    }

    fn flush(self) -> anyhow::Result<()> {
        for mut w in [self.changes, self.catalogue, self.dead]
            .into_iter()
            .flatten()
        {
            w.flush()?;
        }
        Ok(())
    }
}

/// The users' final states and the models, if asked for.
fn write_final(engine: &Engine, outputs: &ReplayOutputs) -> anyhow::Result<()> {
    if let Some(path) = &outputs.users {
        let mut w = open_out(&Some(path.clone()))?.expect("path given");
        for u in engine.dump() {
            serde_json::to_writer(&mut w, &u)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
    }
    if let Some(path) = &outputs.model {
        engine
            .save_model(path)
            .with_context(|| format!("saving model to {}", path.display()))?;
    }
    Ok(())
}

/// The engine's figures into the report.
fn summarise(engine: &Engine, report: &mut ReplayReport) {
    let c = engine.counters();
    let (mae, rmse, labels) = engine.value_errors();
    let (inertia, assigned) = engine.inertia();
    report.users = engine.users();
    report.flaps = c.flaps;
    report.flapping_share = c.flaps as f64 / report.changes.max(1) as f64;
    report.inertia = inertia;
    report.users_assigned = assigned;
    report.value_mae = mae;
    report.value_rmse = rmse;
    report.value_labels = labels;
    (report.value_calibration, report.purchase_log_loss) = engine.value_calibration();
    report.validation = engine.value_validation();
}

/// Says so when the history was too short for segments or for the value model.
fn warn_if_young(model: &ModelConfig, engine: &Engine, events: usize) {
    if !engine.is_seeded() {
        tracing::warn!(
            events,
            init_users = model.init_users,
            init_events = model.init_events,
            "No segments yet: k-means seeds after model.init_events events from model.init_users users, which this history does not reach. A saved model has no segments; replay more history or lower them."
        );
    }
    if engine.value_source() != "model" {
        let (_, _, labels) = engine.value_errors();
        tracing::warn!(
            labels,
            value_source = engine.value_source(),
            "Few value labels matured (a label needs model.value_horizon of event time after an event): predicted values are still partly or wholly each user's recent spend rate over the horizon."
        );
    }
}

fn read_file(
    source: Source,
    path: &Path,
    decoder: &Decoder,
    report: &mut ReplayReport,
    dead: &mut Option<BufWriter<File>>,
    events: &mut Vec<(i64, Source, u64, Event)>,
) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let name = path.display().to_string();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {name}"))?;
        if line.trim().is_empty() {
            continue;
        }
        report.lines += 1;
        let n = i as u64 + 1;
        match decoder.decode_as(source, WireFormat::Json, line.as_bytes(), None) {
            Ok(e) => events.push((e.event_time(), source, n, e)),
            Err(e) => {
                *report.invalid.entry(e.code()).or_default() += 1;
                if let Some(w) = dead.as_mut() {
                    let d = DeadLetter {
                        source: source.as_str(),
                        file: &name,
                        line: n,
                        error_code: e.code(),
                        error_message: e.to_string(),
                        value: &line,
                    };
                    serde_json::to_writer(&mut *w, &d)?;
                    w.write_all(b"\n")?;
                }
            }
        }
    }
    Ok(())
}
