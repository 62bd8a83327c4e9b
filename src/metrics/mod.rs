//! Every Prometheus metric segstream exports, declared in `families.rs` behind the typed
//! methods here and registered on the service's own [`Registry`] (so tests and several
//! pipelines in one process stay isolated). Labels are low-cardinality: input source, error
//! code, reason, segment id.

use crate::catalogue::CatalogueReason;
use crate::decode::DecodeError;
use crate::engine::SegmentFigures;
use crate::event::{ChangeReason, Source};
use crate::validation::Report;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

mod families;

use families::{InputMetrics, ModelMetrics, OutputMetrics, StateMetrics};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// The engine counters already counted (see [`Metrics::set_quality`]).
    mirror: std::sync::Arc<std::sync::Mutex<Mirror>>,
    inputs: InputMetrics,
    outputs: OutputMetrics,
    model: ModelMetrics,
    state: StateMetrics,
}

/// Engine counters as last mirrored into the metrics, so they can be added as deltas.
#[derive(Default)]
pub struct Mirror {
    flaps: u64,
    repairs: u64,
    labels: u64,
    evicted: u64,
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
        let m = Metrics {
            inputs: InputMetrics::register(&r),
            outputs: OutputMetrics::register(&r),
            model: ModelMetrics::register(&r),
            state: StateMetrics::register(&r),
            mirror: Default::default(),
            registry: r,
        };
        for k in ["full", "delta"] {
            m.state.checkpoints.with_label_values(&[k]);
        }
        for k in ["erased", "unknown", "invalid"] {
            m.outputs.erasure_requests.with_label_values(&[k]);
        }
        // Pre-create every series so dashboards and rate() see zeros, not gaps.
        for s in Source::ALL {
            m.inputs.consumed.with_label_values(&[s.as_str()]);
            m.inputs.applied.with_label_values(&[s.as_str()]);
            m.outputs.dead_letters.with_label_values(&[s.as_str()]);
            for code in DecodeError::CODES {
                m.inputs.invalid.with_label_values(&[s.as_str(), code]);
            }
        }
        for r in [
            ChangeReason::FirstAssignment,
            ChangeReason::Moved,
            ChangeReason::Erased,
        ] {
            m.outputs.changes.with_label_values(&[r.as_str()]);
        }
        for s in Source::ALL {
            m.inputs.duplicates.with_label_values(&[s.as_str()]);
            for p in ["applied", "dead_letter"] {
                m.inputs.late.with_label_values(&[s.as_str(), p]);
            }
        }
        for k in ["assign", "revoke"] {
            m.inputs.rebalances.with_label_values(&[k]);
        }
        for o in ["changes", "dead_letter", "changelog", "model"] {
            m.outputs.producer_errors.with_label_values(&[o]);
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
        self.inputs.consumed_by[s as usize].inc();
    }
    pub fn applied(&self, s: Source) {
        self.inputs.applied_by[s as usize].inc();
    }
    pub fn invalid(&self, s: Source, e: &DecodeError) {
        self.inputs
            .invalid
            .with_label_values(&[s.as_str(), e.code()])
            .inc();
    }
    pub(crate) fn dead_lettered(&self, s: Source) {
        self.outputs
            .dead_letters
            .with_label_values(&[s.as_str()])
            .inc();
    }
    pub(crate) fn change_delivered(&self, r: ChangeReason) {
        self.outputs.changes.with_label_values(&[r.as_str()]).inc();
    }
    pub(crate) fn producer_error(&self, output: &'static str) {
        self.outputs
            .producer_errors
            .with_label_values(&[output])
            .inc();
    }
    pub(crate) fn rebalance(&self, kind: &'static str) {
        self.inputs.rebalances.with_label_values(&[kind]).inc();
    }
    pub(crate) fn commit_failed(&self) {
        self.inputs.commits_failed.inc();
    }
    pub fn set_ready(&self, ready: bool) {
        self.inputs.ready.set(i64::from(ready));
    }
    pub fn is_ready(&self) -> bool {
        self.inputs.ready.get() == 1
    }
    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.inputs
            .lag
            .with_label_values(&[topic, &partition.to_string()])
            .set(lag);
    }
    /// A change caused by an event at `event_ms` was delivered at `now_ms` (wall clock).
    pub(crate) fn event_to_emit(&self, event_ms: i64, now_ms: i64) {
        self.outputs
            .event_to_emit
            .observe((now_ms - event_ms).max(0) as f64 / 1_000.0);
    }
    pub fn erased(&self) {
        self.outputs.erasures.inc();
    }
    pub fn duplicate(&self, s: Source) {
        self.inputs
            .duplicates
            .with_label_values(&[s.as_str()])
            .inc();
    }
    pub(crate) fn late(&self, s: Source, applied: bool) {
        let p = if applied { "applied" } else { "dead_letter" };
        self.inputs.late.with_label_values(&[s.as_str(), p]).inc();
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
        self.model.flaps.inc_by(flaps.saturating_sub(mirror.flaps));
        self.model
            .repairs
            .inc_by(repairs.saturating_sub(mirror.repairs));
        self.model
            .labels
            .inc_by(labels.saturating_sub(mirror.labels));
        self.outputs
            .evictions
            .inc_by(evicted.saturating_sub(mirror.evicted));
        *mirror = Mirror {
            flaps,
            repairs,
            labels,
            evicted,
        };
        self.model.value_rmse.set(rmse);
        self.model.value_calibration.set(calibration);
        self.model.purchase_log_loss.set(log_loss);
        self.model.mean_distance.set(mean_distance);
    }

    pub fn catalogue_delivered(&self, reason: CatalogueReason) {
        self.outputs
            .catalogue
            .with_label_values(&[reason.as_str()])
            .inc();
    }
    pub fn catalogue_records(&self) -> u64 {
        CatalogueReason::ALL
            .iter()
            .map(|r| {
                self.outputs
                    .catalogue
                    .with_label_values(&[r.as_str()])
                    .get()
            })
            .sum()
    }

    /// The value model's progressive ranking figures.
    pub(crate) fn set_validation(&self, r: &Report) {
        self.model.purchase_auc.set(r.propensity_auc);
        self.model.value_gini.set(r.value_normalised_gini);
        self.model.value_pearson.set(r.value_pearson);
    }
    pub(crate) fn observe_processing(&self, seconds: f64) {
        self.inputs.processing.observe(seconds);
    }
    #[cfg(feature = "bench")]
    /// Mean decode + apply time per message so far (seconds).
    pub(crate) fn processing_mean(&self) -> f64 {
        let n = self.inputs.processing.get_sample_count();
        if n == 0 {
            0.0
        } else {
            self.inputs.processing.get_sample_sum() / n as f64
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
        self.model.users.set(users as i64);
        self.model.model_version.set(model_version as i64);
        self.model.value_mae.set(mae);
        for s in segments {
            let id = [s.id.to_string()];
            self.model.segment_size.with_label_values(&id).set(s.size);
            self.model
                .segment_value
                .with_label_values(&id)
                .set(s.mean_predicted_value);
            self.model
                .segment_propensity
                .with_label_values(&id)
                .set(s.mean_purchase_probability);
        }
    }

    /// An erasure request was handled: `erased`, `unknown` (no such user here) or `invalid`.
    pub(crate) fn erasure_request(&self, result: &'static str) {
        self.outputs
            .erasure_requests
            .with_label_values(&[result])
            .inc();
    }
    pub fn erasure_requests(&self, result: &'static str) -> u64 {
        self.outputs
            .erasure_requests
            .with_label_values(&[result])
            .get()
    }
    pub fn evictions_total(&self) -> u64 {
        self.outputs.evictions.get()
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
        self.state.checkpoint_duration.observe(seconds);
        self.state
            .checkpoints
            .with_label_values(&["full"])
            .inc_by(full as u64);
        self.state
            .checkpoints
            .with_label_values(&["delta"])
            .inc_by(partitions.saturating_sub(full) as u64);
        self.state.checkpoint_records.inc_by(records as u64);
        self.state.checkpoint_bytes.inc_by(bytes as u64);
        self.state
            .last_checkpoint_ms
            .store(now_ms, std::sync::atomic::Ordering::Relaxed);
        self.state.checkpoint_age.set(0.0);
    }
    pub(crate) fn checkpoint_failed(&self) {
        self.state.checkpoint_failures.inc();
    }
    /// Refreshes the checkpoint-age gauge.
    pub(crate) fn set_checkpoint_age(&self, now_ms: i64) {
        let last = self
            .state
            .last_checkpoint_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if last > 0 {
            self.state
                .checkpoint_age
                .set((now_ms - last).max(0) as f64 / 1_000.0);
        }
    }
    pub(crate) fn set_restoring(&self, restoring: bool) {
        self.state.restoring.set(i64::from(restoring));
    }
    /// One partition restored with `users` users.
    pub fn restored(&self, users: usize) {
        self.state.restores.inc();
        self.state.restored_users.inc_by(users as u64);
    }
    /// A restore (the partitions of one assignment, read together) took `seconds`.
    pub(crate) fn restore_took(&self, seconds: f64) {
        self.state.restore_duration.observe(seconds);
    }
    pub fn restores_total(&self) -> u64 {
        self.state.restores.get()
    }
    pub fn restored_users_total(&self) -> u64 {
        self.state.restored_users.get()
    }
    pub fn skipped(&self) {
        self.inputs.skipped.inc();
    }
    pub fn skipped_total(&self) -> u64 {
        self.inputs.skipped.get()
    }
    pub(crate) fn dead_lettered_erasure(&self) {
        self.outputs
            .dead_letters
            .with_label_values(&["erasure"])
            .inc();
    }

    pub fn consumed_total(&self) -> u64 {
        Source::ALL
            .iter()
            .map(|s| self.inputs.consumed.with_label_values(&[s.as_str()]).get())
            .sum()
    }
    pub fn applied_total(&self) -> u64 {
        Source::ALL
            .iter()
            .map(|s| self.inputs.applied.with_label_values(&[s.as_str()]).get())
            .sum()
    }
    pub fn dead_letters_total(&self) -> u64 {
        Source::ALL
            .iter()
            .map(|s| {
                self.outputs
                    .dead_letters
                    .with_label_values(&[s.as_str()])
                    .get()
            })
            .sum()
    }
    pub fn invalid_count(&self, s: Source, code: &str) -> u64 {
        self.inputs
            .invalid
            .with_label_values(&[s.as_str(), code])
            .get()
    }
    pub fn changes_total(&self) -> u64 {
        [
            ChangeReason::FirstAssignment,
            ChangeReason::Moved,
            ChangeReason::Evicted,
            ChangeReason::Erased,
        ]
        .iter()
        .map(|r| self.outputs.changes.with_label_values(&[r.as_str()]).get())
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
