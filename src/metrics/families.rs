//! The metric families, registered by area: inputs (what is read and how it is handled),
//! outputs (what is produced and removed), the models and segments, durable state. Each
//! family's name, help and labels are here; the typed methods that update them are `mod.rs`.

use super::*;

/// What the consume loop reads and how it handles it.
#[derive(Clone)]
pub(super) struct InputMetrics {
    /// Per-source handles of the two per-message counters (no label lookup per message).
    pub(super) consumed_by: [IntCounter; 3],
    pub(super) applied_by: [IntCounter; 3],
    pub(super) consumed: IntCounterVec,
    pub(super) applied: IntCounterVec,
    pub(super) invalid: IntCounterVec,
    pub(super) duplicates: IntCounterVec,
    pub(super) late: IntCounterVec,
    pub(super) skipped: IntCounter,
    pub(super) lag: IntGaugeVec,
    pub(super) processing: Histogram,
    pub(super) rebalances: IntCounterVec,
    pub(super) ready: IntGauge,
    pub(super) commits_failed: IntCounter,
}

/// What the pipeline produces and removes.
#[derive(Clone)]
pub(super) struct OutputMetrics {
    pub(super) dead_letters: IntCounterVec,
    pub(super) changes: IntCounterVec,
    pub(super) catalogue: IntCounterVec,
    pub(super) event_to_emit: Histogram,
    pub(super) producer_errors: IntCounterVec,
    pub(super) erasures: IntCounter,
    pub(super) erasure_requests: IntCounterVec,
    pub(super) evictions: IntCounter,
}

/// The models and the segments, as gauges.
#[derive(Clone)]
pub(super) struct ModelMetrics {
    pub(super) users: IntGauge,
    pub(super) segment_size: IntGaugeVec,
    pub(super) segment_value: GaugeVec,
    pub(super) segment_propensity: GaugeVec,
    pub(super) model_version: IntGauge,
    pub(super) value_mae: Gauge,
    pub(super) flaps: IntCounter,
    pub(super) repairs: IntCounter,
    pub(super) labels: IntCounter,
    pub(super) value_calibration: Gauge,
    pub(super) purchase_auc: Gauge,
    pub(super) value_gini: Gauge,
    pub(super) value_pearson: Gauge,
    pub(super) purchase_log_loss: Gauge,
    pub(super) value_rmse: Gauge,
    pub(super) mean_distance: Gauge,
}

/// Checkpoints and restores.
#[derive(Clone)]
pub(super) struct StateMetrics {
    pub(super) checkpoints: IntCounterVec,
    pub(super) checkpoint_failures: IntCounter,
    pub(super) checkpoint_duration: Histogram,
    pub(super) checkpoint_records: IntCounter,
    pub(super) checkpoint_bytes: IntCounter,
    pub(super) checkpoint_age: Gauge,
    pub(super) last_checkpoint_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
    pub(super) restoring: IntGauge,
    pub(super) restores: IntCounter,
    pub(super) restore_duration: Histogram,
    pub(super) restored_users: IntCounter,
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

impl InputMetrics {
    pub(super) fn register(r: &Registry) -> Self {
        let consumed = counter_vec(
            r,
            "segstream_events_consumed_total",
            "Input messages read from Kafka, by input topic.",
            &["topic"],
        );
        let applied = counter_vec(
            r,
            "segstream_events_applied_total",
            "Valid events applied to user state and models, by input topic.",
            &["topic"],
        );
        Self {
        consumed_by: Source::ALL.map(|s| consumed.with_label_values(&[s.as_str()])),
        applied_by: Source::ALL.map(|s| applied.with_label_values(&[s.as_str()])),
        consumed,
        applied,
        invalid: counter_vec(
            r,
            "segstream_events_invalid_total",
            "Input messages that failed decoding or validation, by input topic and error code.",
            &["topic", "error_code"],
        ),
        duplicates: counter_vec(
            r,
            "segstream_events_duplicate_total",
            "Events ignored because their event id was applied recently for the same user.",
            &["topic"],
        ),
        late: counter_vec(
            r,
            "segstream_events_late_total",
            "Events later than features.allowed_lateness, by topic and what was done (applied, dead_letter).",
            &["topic", "policy"],
        ),
        skipped: counter(
            r,
            "segstream_events_skipped_total",
            "Input messages already in the restored state (before its checkpoint's offsets), not applied again.",
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
        rebalances: counter_vec(
            r,
            "segstream_rebalances_total",
            "Consumer-group rebalance events, by kind (assign, revoke).",
            &["kind"],
        ),
        ready: gauge(
            r,
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
        }
    }
}

impl OutputMetrics {
    pub(super) fn register(r: &Registry) -> Self {
        Self {
            dead_letters: counter_vec(
                r,
                "segstream_dead_letters_total",
                "Records delivered to the dead-letter topic, by input topic.",
                &["topic"],
            ),
            changes: counter_vec(
                r,
                "segstream_segment_changes_total",
                "Segment-change records delivered, by reason.",
                &["reason"],
            ),
            catalogue: counter_vec(
                r,
                "segstream_catalogue_records_total",
                "Segment catalogue records delivered, by reason.",
                &["reason"],
            ),
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
                r.register(Box::new(h.clone()))
                    .expect("metric registered once");
                h
            },
            producer_errors: counter_vec(
                r,
                "segstream_producer_errors_total",
                "Output records that could not be delivered, by output (changes, dead_letter).",
                &["output"],
            ),
            erasures: counter(
                r,
                "segstream_erasures_total",
                "Users erased on request (right to be forgotten).",
            ),
            erasure_requests: counter_vec(
                r,
                "segstream_erasure_requests_total",
                "Requests on the erasure topic, by result (erased, unknown, invalid).",
                &["result"],
            ),
            evictions: counter(
                r,
                "segstream_evictions_total",
                "Users evicted from memory (idle past state.ttl, or beyond state.max_users).",
            ),
        }
    }
}

impl ModelMetrics {
    pub(super) fn register(r: &Registry) -> Self {
        Self {
        users: gauge(r, "segstream_users_tracked", "Users held in memory."),
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
            r,
            "segstream_segment_mean_predicted_value",
            "Mean predicted net spend over the value horizon of each segment's users, in currency.",
            &["segment"],
        ),
        segment_propensity: fgauge_vec(
            r,
            "segstream_segment_mean_purchase_probability",
            "Mean probability of a purchase within the value horizon of each segment's users.",
            &["segment"],
        ),
        model_version: gauge(
            r,
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
        flaps: counter(
            r,
            "segstream_segment_flaps_total",
            "Moves back to the segment a user left within model.flap_window.",
        ),
        repairs: counter(
            r,
            "segstream_kmeans_repairs_total",
            "Dead k-means centroids moved to split the largest segment.",
        ),
        labels: counter(
            r,
            "segstream_value_labels_total",
            "Delayed labels (spend over the value horizon) the value model learned from.",
        ),
        value_calibration: fgauge(
            r,
            "segstream_value_calibration",
            "Progressive sum of predicted over sum of actual spend on matured labels (1 is calibrated).",
        ),
        purchase_auc: fgauge(
            r,
            "segstream_purchase_auc",
            "Progressive AUC of the purchase propensity on matured labels (0.5 is chance).",
        ),
        value_gini: fgauge(
            r,
            "segstream_value_normalised_gini",
            "Progressive normalised Gini of the predicted value's ranking on matured labels (1 ranks as the outcome does).",
        ),
        value_pearson: fgauge(
            r,
            "segstream_value_pearson",
            "Progressive Pearson correlation of predicted value and matured spend.",
        ),
        purchase_log_loss: fgauge(
            r,
            "segstream_purchase_log_loss",
            "Progressive mean log loss of the purchase propensity on matured labels.",
        ),
        value_rmse: fgauge(
            r,
            "segstream_value_model_rmse",
            "Progressive root mean squared error of the predicted value, in currency.",
        ),
        mean_distance: fgauge(
            r,
            "segstream_kmeans_mean_distance",
            "Mean distance of assigned users to their segment centroid (model space); lower is tighter.",
        ),
        }
    }
}

impl StateMetrics {
    pub(super) fn register(r: &Registry) -> Self {
        Self {
        checkpoints: counter_vec(
            r,
            "segstream_checkpoints_total",
            "Partition checkpoints written to the changelog, by kind (full, delta).",
            &["kind"],
        ),
        checkpoint_failures: counter(
            r,
            "segstream_checkpoint_failures_total",
            "Checkpoints that could not be written (the pipeline stops; a restart restores the previous one).",
        ),
        checkpoint_duration: histogram(
            r,
            "segstream_checkpoint_duration_seconds",
            "Time to write one checkpoint, from waiting for outputs to the markers' acknowledgement.",
            vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        ),
        checkpoint_records: counter(
            r,
            "segstream_checkpoint_records_total",
            "User records (states and removals) written to the changelog.",
        ),
        checkpoint_bytes: counter(
            r,
            "segstream_checkpoint_bytes_total",
            "Bytes of user state written to the changelog.",
        ),
        checkpoint_age: fgauge(
            r,
            "segstream_checkpoint_age_seconds",
            "Seconds since the last successful checkpoint (0 before the first, or with checkpoints off).",
        ),
        last_checkpoint_ms: Default::default(),
        restoring: gauge(
            r,
            "segstream_restoring",
            "1 while changelog partitions are being restored (the instance is not ready).",
        ),
        restores: counter(
            r,
            "segstream_restores_total",
            "Changelog partitions restored (at start and on assignment).",
        ),
        restore_duration: histogram(
            r,
            "segstream_restore_duration_seconds",
            "Time to restore the changelog partitions of one assignment (read together).",
            vec![0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
        ),
        restored_users: counter(
            r,
            "segstream_restored_users_total",
            "User states restored from the changelog.",
        ),
        }
    }
}
