//! Every Prometheus metric segstream exports, declared in one place behind typed methods and
//! registered on the service's own [`Registry`] (so tests and several pipelines in one process
//! stay isolated). Labels are low-cardinality: input source, error code, reason, segment id.

use crate::catalogue::CatalogueReason;
use crate::decode::DecodeError;
use crate::engine::SegmentFigures;
use crate::event::{ChangeReason, Source};
use crate::validation::Report;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// The engine counters already counted (see [`Metrics::set_quality`]).
    mirror: std::sync::Arc<std::sync::Mutex<Mirror>>,
    consumed: IntCounterVec,
    applied: IntCounterVec,
    /// Per-source handles of the two per-message counters (no label lookup per message).
    consumed_by: [IntCounter; 3],
    applied_by: [IntCounter; 3],
    invalid: IntCounterVec,
    dead_letters: IntCounterVec,
    changes: IntCounterVec,
    catalogue: IntCounterVec,
    users: IntGauge,
    segment_size: IntGaugeVec,
    segment_value: GaugeVec,
    segment_propensity: GaugeVec,
    model_version: IntGauge,
    value_mae: Gauge,
    processing: Histogram,
    producer_errors: IntCounterVec,
    rebalances: IntCounterVec,
    ready: IntGauge,
    commits_failed: IntCounter,
    duplicates: IntCounterVec,
    late: IntCounterVec,
    flaps: IntCounter,
    repairs: IntCounter,
    labels: IntCounter,
    value_rmse: Gauge,
    value_calibration: Gauge,
    purchase_log_loss: Gauge,
    purchase_auc: Gauge,
    value_gini: Gauge,
    value_pearson: Gauge,
    mean_distance: Gauge,
    erasures: IntCounter,
    lag: IntGaugeVec,
    event_to_emit: Histogram,
    evictions: IntCounter,
    erasure_requests: IntCounterVec,
    checkpoints: IntCounterVec,
    checkpoint_failures: IntCounter,
    checkpoint_duration: Histogram,
    checkpoint_records: IntCounter,
    checkpoint_bytes: IntCounter,
    checkpoint_age: Gauge,
    last_checkpoint_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
    restoring: IntGauge,
    restores: IntCounter,
    restore_duration: Histogram,
    restored_users: IntCounter,
    skipped: IntCounter,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn fgauge(r: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

/// Engine counters as last mirrored into the metrics, so they can be added as deltas.
#[derive(Default)]
pub struct Mirror {
    flaps: u64,
    repairs: u64,
    labels: u64,
    evicted: u64,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn fgauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("metric registered once");
        let build = IntGaugeVec::new(
            Opts::new(
                "segstream_build_info",
                "Always 1; the labels say which build runs.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        r.register(Box::new(build)).expect("metric registered once");
        let consumed = counter_vec(
            &r,
            "segstream_events_consumed_total",
            "Input messages read from Kafka, by input topic.",
            &["topic"],
        );
        let applied = counter_vec(
            &r,
            "segstream_events_applied_total",
            "Valid events applied to user state and models, by input topic.",
            &["topic"],
        );
        let m = Metrics {
            mirror: Default::default(),
            consumed_by: Source::ALL.map(|s| consumed.with_label_values(&[s.as_str()])),
            applied_by: Source::ALL.map(|s| applied.with_label_values(&[s.as_str()])),
            consumed,
            applied,
            invalid: counter_vec(
                &r,
                "segstream_events_invalid_total",
                "Input messages that failed decoding or validation, by input topic and error code.",
                &["topic", "error_code"],
            ),
            dead_letters: counter_vec(
                &r,
                "segstream_dead_letters_total",
                "Records delivered to the dead-letter topic, by input topic.",
                &["topic"],
            ),
            changes: counter_vec(
                &r,
                "segstream_segment_changes_total",
                "Segment-change records delivered, by reason.",
                &["reason"],
            ),
            catalogue: counter_vec(
                &r,
                "segstream_catalogue_records_total",
                "Segment catalogue records delivered, by reason.",
                &["reason"],
            ),
            users: gauge(&r, "segstream_users_tracked", "Users held in memory."),
            segment_size: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "segstream_segment_users",
                        "Users currently assigned to each segment.",
                    ),
                    &["segment"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            segment_value: fgauge_vec(
                &r,
                "segstream_segment_mean_predicted_value",
                "Mean predicted net spend over the value horizon of each segment's users, in currency.",
                &["segment"],
            ),
            segment_propensity: fgauge_vec(
                &r,
                "segstream_segment_mean_purchase_probability",
                "Mean probability of a purchase within the value horizon of each segment's users.",
                &["segment"],
            ),
            model_version: gauge(
                &r,
                "segstream_model_version",
                "Number of k-means mini-batches the model has absorbed.",
            ),
            value_mae: {
                let g = Gauge::new(
                    "segstream_value_model_mae",
                    "Progressive mean absolute error of the predicted value, in currency.",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            processing: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "segstream_processing_seconds",
                        "Time to decode, validate and apply one input message (excluding delivery).",
                    )
                    .buckets(vec![
                        1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 1e-4, 1e-3, 1e-2,
                    ]),
                )
                .expect("valid metric");
                r.register(Box::new(h.clone()))
                    .expect("metric registered once");
                h
            },
            producer_errors: counter_vec(
                &r,
                "segstream_producer_errors_total",
                "Output records that could not be delivered, by output (changes, dead_letter).",
                &["output"],
            ),
            rebalances: counter_vec(
                &r,
                "segstream_rebalances_total",
                "Consumer-group rebalance events, by kind (assign, revoke).",
                &["kind"],
            ),
            ready: gauge(
                &r,
                "segstream_ready",
                "1 while the pipeline is consuming, 0 while starting or stopping.",
            ),
            commits_failed: {
                let c = IntCounter::new(
                    "segstream_offset_commits_failed_total",
                    "Synchronous offset commits (shutdown, revoke) that failed.",
                )
                .expect("valid metric");
                r.register(Box::new(c.clone()))
                    .expect("metric registered once");
                c
            },
            duplicates: counter_vec(
                &r,
                "segstream_events_duplicate_total",
                "Events ignored because their event id was applied recently for the same user.",
                &["topic"],
            ),
            late: counter_vec(
                &r,
                "segstream_events_late_total",
                "Events later than features.allowed_lateness, by topic and what was done (applied, dead_letter).",
                &["topic", "policy"],
            ),
            flaps: counter(
                &r,
                "segstream_segment_flaps_total",
                "Moves back to the segment a user left within model.flap_window.",
            ),
            repairs: counter(
                &r,
                "segstream_kmeans_repairs_total",
                "Dead k-means centroids moved to split the largest segment.",
            ),
            labels: counter(
                &r,
                "segstream_value_labels_total",
                "Delayed labels (spend over the value horizon) the value model learned from.",
            ),
            value_calibration: fgauge(
                &r,
                "segstream_value_calibration",
                "Progressive sum of predicted over sum of actual spend on matured labels (1 is calibrated).",
            ),
            purchase_auc: fgauge(
                &r,
                "segstream_purchase_auc",
                "Progressive AUC of the purchase propensity on matured labels (0.5 is chance).",
            ),
            value_gini: fgauge(
                &r,
                "segstream_value_normalised_gini",
                "Progressive normalised Gini of the predicted value's ranking on matured labels (1 ranks as the outcome does).",
            ),
            value_pearson: fgauge(
                &r,
                "segstream_value_pearson",
                "Progressive Pearson correlation of predicted value and matured spend.",
            ),
            purchase_log_loss: fgauge(
                &r,
                "segstream_purchase_log_loss",
                "Progressive mean log loss of the purchase propensity on matured labels.",
            ),
            value_rmse: fgauge(
                &r,
                "segstream_value_model_rmse",
                "Progressive root mean squared error of the predicted value, in currency.",
            ),
            mean_distance: fgauge(
                &r,
                "segstream_kmeans_mean_distance",
                "Mean distance of assigned users to their segment centroid (model space); lower is tighter.",
            ),
            erasures: counter(
                &r,
                "segstream_erasures_total",
                "Users erased on request (right to be forgotten).",
            ),
            lag: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "segstream_consumer_lag_messages",
                        "Messages between the consumer's position and the partition's end (librdkafka statistics).",
                    ),
                    &["topic", "partition"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("metric registered once");
                g
            },
            event_to_emit: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "segstream_event_to_emit_seconds",
                        "From the event time of the event that caused a segment change to its delivery.",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
                    ]),
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("metric registered once");
                h
            },
            evictions: counter(
                &r,
                "segstream_evictions_total",
                "Users evicted from memory (idle past state.ttl, or beyond state.max_users).",
            ),
            erasure_requests: counter_vec(
                &r,
                "segstream_erasure_requests_total",
                "Requests on the erasure topic, by result (erased, unknown, invalid).",
                &["result"],
            ),
            checkpoints: counter_vec(
                &r,
                "segstream_checkpoints_total",
                "Partition checkpoints written to the changelog, by kind (full, delta).",
                &["kind"],
            ),
            checkpoint_failures: counter(
                &r,
                "segstream_checkpoint_failures_total",
                "Checkpoints that could not be written (the pipeline stops; a restart restores the previous one).",
            ),
            checkpoint_duration: histogram(
                &r,
                "segstream_checkpoint_duration_seconds",
                "Time to write one checkpoint, from waiting for outputs to the markers' acknowledgement.",
                vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            checkpoint_records: counter(
                &r,
                "segstream_checkpoint_records_total",
                "User records (states and removals) written to the changelog.",
            ),
            checkpoint_bytes: counter(
                &r,
                "segstream_checkpoint_bytes_total",
                "Bytes of user state written to the changelog.",
            ),
            checkpoint_age: fgauge(
                &r,
                "segstream_checkpoint_age_seconds",
                "Seconds since the last successful checkpoint (0 before the first, or with checkpoints off).",
            ),
            last_checkpoint_ms: Default::default(),
            restoring: gauge(
                &r,
                "segstream_restoring",
                "1 while changelog partitions are being restored (the instance is not ready).",
            ),
            restores: counter(
                &r,
                "segstream_restores_total",
                "Changelog partitions restored (at start and on assignment).",
            ),
            restore_duration: histogram(
                &r,
                "segstream_restore_duration_seconds",
                "Time to restore the changelog partitions of one assignment (read together).",
                vec![0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
            ),
            restored_users: counter(
                &r,
                "segstream_restored_users_total",
                "User states restored from the changelog.",
            ),
            skipped: counter(
                &r,
                "segstream_events_skipped_total",
                "Input messages already in the restored state (before its checkpoint's offsets), not applied again.",
            ),
            registry: r,
        };
        for k in ["full", "delta"] {
            m.checkpoints.with_label_values(&[k]);
        }
        for k in ["erased", "unknown", "invalid"] {
            m.erasure_requests.with_label_values(&[k]);
        }
        // Pre-create every series so dashboards and rate() see zeros, not gaps.
        for s in Source::ALL {
            m.consumed.with_label_values(&[s.as_str()]);
            m.applied.with_label_values(&[s.as_str()]);
            m.dead_letters.with_label_values(&[s.as_str()]);
            for code in DecodeError::CODES {
                m.invalid.with_label_values(&[s.as_str(), code]);
            }
        }
        for r in [
            ChangeReason::FirstAssignment,
            ChangeReason::Moved,
            ChangeReason::Erased,
        ] {
            m.changes.with_label_values(&[r.as_str()]);
        }
        for s in Source::ALL {
            m.duplicates.with_label_values(&[s.as_str()]);
            for p in ["applied", "dead_letter"] {
                m.late.with_label_values(&[s.as_str(), p]);
            }
        }
        for k in ["assign", "revoke"] {
            m.rebalances.with_label_values(&[k]);
        }
        for o in ["changes", "dead_letter", "changelog", "model"] {
            m.producer_errors.with_label_values(&[o]);
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }

    pub fn consumed(&self, s: Source) {
        self.consumed_by[s as usize].inc();
    }
    pub fn applied(&self, s: Source) {
        self.applied_by[s as usize].inc();
    }
    pub fn invalid(&self, s: Source, e: &DecodeError) {
        self.invalid
            .with_label_values(&[s.as_str(), e.code()])
            .inc();
    }
    pub(crate) fn dead_lettered(&self, s: Source) {
        self.dead_letters.with_label_values(&[s.as_str()]).inc();
    }
    pub(crate) fn change_delivered(&self, r: ChangeReason) {
        self.changes.with_label_values(&[r.as_str()]).inc();
    }
    pub(crate) fn producer_error(&self, output: &'static str) {
        self.producer_errors.with_label_values(&[output]).inc();
    }
    pub(crate) fn rebalance(&self, kind: &'static str) {
        self.rebalances.with_label_values(&[kind]).inc();
    }
    pub(crate) fn commit_failed(&self) {
        self.commits_failed.inc();
    }
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }
    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }
    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lag
            .with_label_values(&[topic, &partition.to_string()])
            .set(lag);
    }
    /// A change caused by an event at `event_ms` was delivered at `now_ms` (wall clock).
    pub(crate) fn event_to_emit(&self, event_ms: i64, now_ms: i64) {
        self.event_to_emit
            .observe((now_ms - event_ms).max(0) as f64 / 1_000.0);
    }
    pub fn erased(&self) {
        self.erasures.inc();
    }
    pub fn duplicate(&self, s: Source) {
        self.duplicates.with_label_values(&[s.as_str()]).inc();
    }
    pub(crate) fn late(&self, s: Source, applied: bool) {
        let p = if applied { "applied" } else { "dead_letter" };
        self.late.with_label_values(&[s.as_str(), p]).inc();
    }
    /// Takes the engine's counters as restored from a checkpoint as already counted: this
    /// process's counters count what happened since it started (Prometheus sees a restart as a
    /// reset), instead of jumping by the restored totals, which reads as a burst of flaps,
    /// evictions and labels at every restart.
    pub(crate) fn rebase_counters(&self, counters: &crate::engine::Counters, repairs: u64) {
        *self.mirror.lock().unwrap_or_else(|e| e.into_inner()) = Mirror {
            flaps: counters.flaps,
            repairs,
            labels: counters.labels_matured,
            evicted: counters.evicted,
        };
    }

    /// Mirrors the engine's quality figures and counters (their increments since last time).
    pub(crate) fn set_quality(
        &self,
        counters: &crate::engine::Counters,
        repairs: u64,
        rmse: f64,
        (calibration, log_loss): (f64, f64),
        mean_distance: f64,
    ) {
        let (flaps, labels, evicted) = (counters.flaps, counters.labels_matured, counters.evicted);
        let mut mirror = self.mirror.lock().unwrap_or_else(|e| e.into_inner());
        self.flaps.inc_by(flaps.saturating_sub(mirror.flaps));
        self.repairs.inc_by(repairs.saturating_sub(mirror.repairs));
        self.labels.inc_by(labels.saturating_sub(mirror.labels));
        self.evictions
            .inc_by(evicted.saturating_sub(mirror.evicted));
        *mirror = Mirror {
            flaps,
            repairs,
            labels,
            evicted,
        };
        self.value_rmse.set(rmse);
        self.value_calibration.set(calibration);
        self.purchase_log_loss.set(log_loss);
        self.mean_distance.set(mean_distance);
    }

    pub fn catalogue_delivered(&self, reason: CatalogueReason) {
        self.catalogue.with_label_values(&[reason.as_str()]).inc();
    }
    pub fn catalogue_records(&self) -> u64 {
        CatalogueReason::ALL
            .iter()
            .map(|r| self.catalogue.with_label_values(&[r.as_str()]).get())
            .sum()
    }

    /// The value model's progressive ranking figures.
    pub(crate) fn set_validation(&self, r: &Report) {
        self.purchase_auc.set(r.propensity_auc);
        self.value_gini.set(r.value_normalised_gini);
        self.value_pearson.set(r.value_pearson);
    }
    pub(crate) fn observe_processing(&self, seconds: f64) {
        self.processing.observe(seconds);
    }
    #[cfg(feature = "bench")]
    /// Mean decode + apply time per message so far (seconds).
    pub(crate) fn processing_mean(&self) -> f64 {
        let n = self.processing.get_sample_count();
        if n == 0 {
            0.0
        } else {
            self.processing.get_sample_sum() / n as f64
        }
    }
    /// Refreshes the gauges that mirror engine state.
    pub fn set_model_state(
        &self,
        users: usize,
        model_version: u64,
        mae: f64,
        segments: &[SegmentFigures],
    ) {
        self.users.set(users as i64);
        self.model_version.set(model_version as i64);
        self.value_mae.set(mae);
        for s in segments {
            let id = [s.id.to_string()];
            self.segment_size.with_label_values(&id).set(s.size);
            self.segment_value
                .with_label_values(&id)
                .set(s.mean_predicted_value);
            self.segment_propensity
                .with_label_values(&id)
                .set(s.mean_purchase_probability);
        }
    }

    /// An erasure request was handled: `erased`, `unknown` (no such user here) or `invalid`.
    pub(crate) fn erasure_request(&self, result: &'static str) {
        self.erasure_requests.with_label_values(&[result]).inc();
    }
    pub fn erasure_requests(&self, result: &'static str) -> u64 {
        self.erasure_requests.with_label_values(&[result]).get()
    }
    pub fn evictions_total(&self) -> u64 {
        self.evictions.get()
    }
    /// A checkpoint of `partitions` partitions (`full` of them full) was acknowledged.
    pub(crate) fn checkpoint_written(
        &self,
        seconds: f64,
        partitions: usize,
        full: usize,
        records: usize,
        bytes: usize,
        now_ms: i64,
    ) {
        self.checkpoint_duration.observe(seconds);
        self.checkpoints
            .with_label_values(&["full"])
            .inc_by(full as u64);
        self.checkpoints
            .with_label_values(&["delta"])
            .inc_by(partitions.saturating_sub(full) as u64);
        self.checkpoint_records.inc_by(records as u64);
        self.checkpoint_bytes.inc_by(bytes as u64);
        self.last_checkpoint_ms
            .store(now_ms, std::sync::atomic::Ordering::Relaxed);
        self.checkpoint_age.set(0.0);
    }
    pub(crate) fn checkpoint_failed(&self) {
        self.checkpoint_failures.inc();
    }
    /// Refreshes the checkpoint-age gauge.
    pub(crate) fn set_checkpoint_age(&self, now_ms: i64) {
        let last = self
            .last_checkpoint_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if last > 0 {
            self.checkpoint_age
                .set((now_ms - last).max(0) as f64 / 1_000.0);
        }
    }
    pub(crate) fn set_restoring(&self, restoring: bool) {
        self.restoring.set(i64::from(restoring));
    }
    /// One partition restored with `users` users.
    pub fn restored(&self, users: usize) {
        self.restores.inc();
        self.restored_users.inc_by(users as u64);
    }
    /// A restore (the partitions of one assignment, read together) took `seconds`.
    pub(crate) fn restore_took(&self, seconds: f64) {
        self.restore_duration.observe(seconds);
    }
    pub fn restores_total(&self) -> u64 {
        self.restores.get()
    }
    pub fn restored_users_total(&self) -> u64 {
        self.restored_users.get()
    }
    pub fn skipped(&self) {
        self.skipped.inc();
    }
    pub fn skipped_total(&self) -> u64 {
        self.skipped.get()
    }
    pub(crate) fn dead_lettered_erasure(&self) {
        self.dead_letters.with_label_values(&["erasure"]).inc();
    }

    pub fn consumed_total(&self) -> u64 {
        Source::ALL
            .iter()
            .map(|s| self.consumed.with_label_values(&[s.as_str()]).get())
            .sum()
    }
    pub fn applied_total(&self) -> u64 {
        Source::ALL
            .iter()
            .map(|s| self.applied.with_label_values(&[s.as_str()]).get())
            .sum()
    }
    pub fn dead_letters_total(&self) -> u64 {
        Source::ALL
            .iter()
            .map(|s| self.dead_letters.with_label_values(&[s.as_str()]).get())
            .sum()
    }
    pub fn invalid_count(&self, s: Source, code: &str) -> u64 {
        self.invalid.with_label_values(&[s.as_str(), code]).get()
    }
    pub fn changes_total(&self) -> u64 {
        [
            ChangeReason::FirstAssignment,
            ChangeReason::Moved,
            ChangeReason::Evicted,
            ChangeReason::Erased,
        ]
        .iter()
        .map(|r| self.changes.with_label_values(&[r.as_str()]).get())
        .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_engine_counters_do_not_jump_the_exported_ones() {
        let m = Metrics::new();
        let flaps = |n| crate::engine::Counters {
            flaps: n,
            ..Default::default()
        };
        m.set_quality(&flaps(10), 0, 0.0, (0.0, 0.0), 0.0);
        // A restore brings the checkpoint's total (100); only what follows it is counted.
        m.rebase_counters(&flaps(100), 0);
        m.set_quality(&flaps(103), 0, 0.0, (0.0, 0.0), 0.0);
        assert!(
            m.render().contains("segstream_segment_flaps_total 13"),
            "{}",
            m.render()
        );
    }

    #[test]
    fn names_follow_the_convention_and_series_exist_before_traffic() {
        let m = Metrics::new();
        m.invalid(Source::Social, &DecodeError::EmptyUserId);
        let text = m.render();
        assert!(text.contains(
            "segstream_events_invalid_total{error_code=\"empty_user_id\",topic=\"social\"} 1"
        ));
        assert!(text.contains("segstream_events_consumed_total{topic=\"purchases\"} 0"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            // Ours, or the standard process collector's (the names every exporter uses).
            assert!(
                name.starts_with("segstream_") || name.starts_with("process_"),
                "{name}"
            );
            assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
        }
        // Two services in one process do not share series.
        assert_eq!(
            Metrics::new().invalid_count(Source::Social, "empty_user_id"),
            0
        );
    }
}
