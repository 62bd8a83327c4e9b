//! The committer: a task that awaits each processed message's deliveries in consumption order
//! and only then stores its offset (at-least-once), fed over a bounded channel (back-pressure).
//! It also counts the messages whose outputs are all delivered, for checkpoints waiting on it.

use super::outputs::{Output, Sent};
use super::PipelineError;
use crate::clock::wall_ms;
use crate::config::TopicsConfig;
use crate::event::{ChangeReason, Source};
use crate::kafka::SegContext;
use crate::metrics::Metrics;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A processed message waiting for its outputs before its offset may be stored; `at` is `None`
/// for outputs that no input message caused (an erasure requested over HTTP or on the erasure
/// topic, whose offsets the checkpoints' markers carry).
pub(super) struct Pending {
    pub(super) at: Option<(Source, i32, i64)>,
    pub(super) deliveries: Vec<Sent>,
}

/// Which of the two offset strategies the committer serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Stores {
    /// Store each message's offset once its outputs are delivered (librdkafka auto-commits).
    Offsets,
    /// Only track deliveries: the checkpoints' markers carry the offsets.
    Nothing,
}

/// The pipeline's end of the committer: hands messages over and knows how many it handed.
pub(super) struct Committer {
    tx: mpsc::Sender<Pending>,
    task: JoinHandle<Result<(), PipelineError>>,
    sent: u64,
}

impl Committer {
    /// Starts the task; it cancels `failed` when an output cannot be delivered, and publishes
    /// on the returned receiver how many handed-over messages are delivered.
    pub(super) fn start(
        topics: &TopicsConfig,
        max_in_flight: usize,
        consumer: Arc<StreamConsumer<SegContext>>,
        metrics: Metrics,
        failed: CancellationToken,
        stores: Stores,
    ) -> (Self, watch::Receiver<u64>) {
        let (tx, rx) = mpsc::channel::<Pending>(max_in_flight);
        let (acked_tx, acked) = watch::channel(0u64);
        let task = tokio::spawn(commit_in_order(
            rx,
            consumer,
            topics.clone(),
            metrics,
            failed,
            stores,
            acked_tx,
        ));
        let committer = Self { tx, task, sent: 0 };
        (committer, acked)
    }

    /// Messages handed over so far.
    pub(super) fn sent(&self) -> u64 {
        self.sent
    }

    /// Hands a message over (waiting while the channel is full). [`PipelineError::Stopped`]
    /// if the committer has stopped (an output failed; [`Committer::close`] says which).
    pub(super) async fn hand_off(&mut self, pending: Pending) -> Result<(), PipelineError> {
        self.tx
            .send(pending)
            .await
            .map_err(|_| PipelineError::Stopped)?;
        self.sent += 1;
        Ok(())
    }

    /// Lets the committer drain what it was handed and stop; its result.
    pub(super) async fn close(self) -> Result<(), PipelineError> {
        drop(self.tx);
        match self.task.await {
            Ok(result) => result,
            Err(join) => {
                warn!(error = %join, "Committer task failed.");
                Ok(())
            }
        }
    }
}

/// Awaits each message's deliveries in consumption order and stores its offset afterwards.
/// A delivery that failed for good stops the pipeline: its offset and every later one stay
/// unstored, so they are consumed again after a restart.
async fn commit_in_order(
    mut rx: mpsc::Receiver<Pending>,
    consumer: Arc<StreamConsumer<SegContext>>,
    topics: TopicsConfig,
    metrics: Metrics,
    failed: CancellationToken,
    stores: Stores,
    acked: watch::Sender<u64>,
) -> Result<(), PipelineError> {
    // Storing an offset takes librdkafka's locks; storing the latest delivered offset per
    // partition whenever the channel runs dry (and at least every STORE_EVERY messages) stores
    // the same positions for a fraction of the cost.
    const STORE_EVERY: usize = 1024;
    let mut latest: HashMap<(Source, i32), i64> = HashMap::new();
    let store = |latest: &mut HashMap<(Source, i32), i64>| {
        if stores == Stores::Nothing {
            latest.clear();
            return;
        }
        for ((source, partition), offset) in latest.drain() {
            let topic = topics.input(source);
            if let Err(e) = consumer.store_offset(topic, partition, offset) {
                // The partition was revoked meanwhile; its new owner re-reads from the last commit.
                debug!(topic, partition, error = %e, "Offset not stored.");
            }
        }
    };
    let mut since_store = 0;
    // The number of messages whose outputs are all delivered, for checkpoints waiting on it.
    // Published whenever the committer is about to wait (its channel is empty, or the next
    // delivery is not yet acknowledged) and at least every STORE_EVERY messages: a watch send
    // wakes every waiter, and once per message it took 7 % of the workers' time.
    let mut delivered: u64 = 0;
    let publish = |delivered: u64| {
        acked.send_if_modified(|n| {
            let changed = *n != delivered;
            *n = delivered;
            changed
        })
    };
    loop {
        let p = match rx.try_recv() {
            Ok(p) => p,
            Err(mpsc::error::TryRecvError::Empty) => {
                publish(delivered);
                store(&mut latest);
                since_store = 0;
                match rx.recv().await {
                    Some(p) => p,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        for (mut delivery, output) in p.deliveries {
            let result = match super::ingest::poll_now(&mut delivery) {
                Some(r) => r,
                None => {
                    publish(delivered);
                    delivery.await
                }
            };
            let error = match result {
                Ok(Ok(_)) => {
                    count_delivered(&metrics, output);
                    continue;
                }
                Ok(Err((error, _))) => error,
                Err(_) => KafkaError::Canceled,
            };
            let name = output.name();
            metrics.producer_error(name);
            warn!(output = name, error = %error, "Delivery failed; stopping without storing this offset.");
            // What was delivered before it stays stored; this offset and later ones do not.
            store(&mut latest);
            failed.cancel();
            return Err(PipelineError::Delivery {
                output: name,
                error,
            });
        }
        delivered += 1;
        if delivered.is_multiple_of(STORE_EVERY as u64) {
            publish(delivered);
        }
        if let Some((source, partition, offset)) = p.at {
            latest.insert((source, partition), offset);
            since_store += 1;
            if since_store >= STORE_EVERY {
                store(&mut latest);
                since_store = 0;
            }
        }
    }
    publish(delivered);
    store(&mut latest);
    Ok(())
}

/// The metric of one delivered output.
fn count_delivered(metrics: &Metrics, output: Output) {
    match output {
        Output::Change(reason, event_time) => {
            metrics.change_delivered(reason);
            if reason != ChangeReason::Erased {
                metrics.event_to_emit(event_time, wall_ms());
            }
        }
        Output::DeadLetter(Some(source)) => metrics.dead_lettered(source),
        Output::DeadLetter(None) => metrics.dead_lettered_erasure(),
        Output::Catalogue(reason) => metrics.catalogue_delivered(reason),
    }
}
