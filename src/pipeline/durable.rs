//! Durable state, the checkpoint strategy: the partitions this instance owns (restored from the
//! changelog when assigned), how far it consumed each of their inputs, the checkpoint in flight,
//! and the trainer role (the owner of partition 0 trains; the others adopt the model topic's
//! models). What a checkpoint holds and how it is read back is `checkpoint.rs`; this file is
//! when: on a timer, on revoke, before answering an erasure and at shutdown.

use super::PipelineError;
use crate::checkpoint::{
    self, model_follower, restore_partition, CheckpointError, EndOfLog, Owned, Snapshot, Written,
};
use crate::clock::wall_ms;
use crate::config::{KafkaConfig, StateConfig};
use crate::engine::Engine;
use crate::event::Source;
use crate::kafka::{RebalanceEvent, SegContext};
use crate::metrics::Metrics;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::TopicPartitionList;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The name a checkpoint's marker records the erasure topic's offsets under (the input topics'
/// are their sources' names).
pub(super) const ERASURE_ROLE: &str = "erasure";

type Outcome = Result<Result<(Written, Snapshot), CheckpointError>, JoinError>;

/// A checkpoint being written while processing goes on.
struct InFlight {
    task: JoinHandle<Result<(Written, Snapshot), CheckpointError>>,
    started: Instant,
}

/// What needs the durable state's attention between messages.
pub(super) enum Due {
    /// The group's assignment changed (announced by the consumer context).
    Rebalance(RebalanceEvent),
    /// Models published on the model topic (`None`: a read that gave none).
    Models(Option<Vec<u8>>),
    /// The checkpoint in flight was written (or failed).
    Written(Outcome, Instant),
    /// Time for the next checkpoint.
    Checkpoint,
}

/// The clients, channels and handles the checkpoints need.
pub(super) struct Links<'c> {
    pub(super) kafka: &'c KafkaConfig,
    pub(super) state: &'c StateConfig,
    pub(super) consumer: &'c StreamConsumer<SegContext>,
    pub(super) producer: FutureProducer,
    pub(super) metrics: Metrics,
    /// Outputs delivered so far (the committer counts them in order).
    pub(super) acked: watch::Receiver<u64>,
    /// Cancelled when an output could not be delivered.
    pub(super) failed: CancellationToken,
    pub(super) rebalances: mpsc::UnboundedReceiver<RebalanceEvent>,
}

pub(super) struct Durable<'c> {
    links: Links<'c>,
    follower: StreamConsumer<EndOfLog>,
    timer: Interval,
    in_flight: Option<InFlight>,
    owned: BTreeMap<i32, Owned>,
    consumed: HashMap<(&'static str, i32), i64>,
    /// The models and counters are restored once, from the first partition restored.
    global_restored: bool,
    /// The latest models on the model topic (the trainer's).
    latest_model: Option<Vec<u8>>,
}

impl<'c> Durable<'c> {
    /// Follows the model topic, adopts its latest models, and starts as a follower (until this
    /// instance owns partition 0, it applies the trainer's models).
    pub(super) async fn open(links: Links<'c>, engine: &mut Engine) -> Result<Self, PipelineError> {
        // Blocking: it waits for the model topic's metadata.
        let kafka = links.kafka.clone();
        let follower = tokio::task::spawn_blocking(move || model_follower(&kafka))
            .await
            .map_err(|e| PipelineError::Checkpoint(CheckpointError::Task(e.to_string())))??;
        let latest_model = latest_models(&follower).await;
        if let Some(m) = &latest_model {
            match engine.adopt_models(m) {
                Ok(()) => info!(
                    model_version = engine.model_version(),
                    "Adopted the latest published models."
                ),
                Err(e) => warn!(error = %e, "Published models not adopted."),
            }
        }
        engine.set_trainer(false);
        let mut timer = tokio::time::interval(links.state.checkpoint_interval);
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(Self {
            links,
            follower,
            timer,
            in_flight: None,
            owned: BTreeMap::new(),
            consumed: HashMap::new(),
            global_restored: false,
            latest_model,
        })
    }

    /// Waits for what needs attention next (cancel-safe: a `select!` arm).
    pub(super) async fn next(&mut self) -> Due {
        let in_flight = &mut self.in_flight;
        tokio::select! {
            biased;
            Some(event) = self.links.rebalances.recv() => Due::Rebalance(event),
            m = self.follower.recv() => Due::Models(m.ok().and_then(|m| m.payload().map(<[u8]>::to_vec))),
            done = async { (&mut in_flight.as_mut().expect("guarded").task).await }, if in_flight.is_some() => {
                Due::Written(done, in_flight.take().expect("guarded").started)
            }
            _ = self.timer.tick(), if in_flight.is_none() => Due::Checkpoint,
        }
    }

    /// Attends to `due`; `sent` is how many messages the committer was handed so far.
    pub(super) async fn handle(
        &mut self,
        due: Due,
        engine: &mut Engine,
        sent: u64,
    ) -> Result<(), PipelineError> {
        match due {
            Due::Rebalance(event) => self.rebalance(event, engine, sent).await,
            Due::Models(Some(bytes)) => {
                if !engine.is_trainer() {
                    if let Err(e) = engine.adopt_models(&bytes) {
                        warn!(error = %e, "Published models not adopted.");
                    }
                }
                self.latest_model = Some(bytes);
                Ok(())
            }
            Due::Models(None) => Ok(()),
            Due::Written(outcome, started) => {
                self.finish(outcome, started, CommitMode::Async).await
            }
            Due::Checkpoint => {
                // One checkpoint at a time; processing goes on while it is written.
                self.in_flight = self.begin(engine, sent);
                Ok(())
            }
        }
    }

    /// Whether `msg` (of the input recorded as `role`) is to be processed: assignment changes
    /// announced before it are applied first, its partition is restored if new, and a message
    /// already in the restored state is skipped (the group's commit lagged the checkpoint).
    pub(super) async fn admit(
        &mut self,
        msg: &BorrowedMessage<'_>,
        role: &'static str,
        engine: &mut Engine,
        sent: u64,
    ) -> Result<bool, PipelineError> {
        while let Ok(event) = self.links.rebalances.try_recv() {
            self.rebalance(event, engine, sent).await?;
        }
        let partition = msg.partition();
        if !self.owned.contains_key(&partition) {
            self.restore(engine, &[partition]).await?;
        }
        let restored = &self.owned[&partition].restored_offsets;
        if restored.get(role).is_some_and(|&next| msg.offset() < next) {
            return Ok(false);
        }
        self.consumed.insert((role, partition), msg.offset() + 1);
        Ok(true)
    }

    /// Writes a checkpoint now and waits for it (after the one in flight, if any): at shutdown
    /// and on revoke (offsets committed synchronously), and before answering an erasure.
    pub(super) async fn now(
        &mut self,
        engine: &mut Engine,
        sent: u64,
        commit: CommitMode,
    ) -> Result<(), PipelineError> {
        if let Some(done) = self.in_flight.take() {
            self.finish(done.task.await, done.started, CommitMode::Async)
                .await?;
        }
        if let Some(done) = self.begin(engine, sent) {
            self.finish(done.task.await, done.started, commit).await?;
        }
        Ok(())
    }

    /// At shutdown, with every output delivered: the last checkpoint, so that a restart starts
    /// right here (`ok`), or, after an error, only the end of the one in flight.
    pub(super) async fn last_checkpoint(
        &mut self,
        engine: &mut Engine,
        sent: u64,
        ok: bool,
    ) -> Result<(), PipelineError> {
        if ok {
            return self.now(engine, sent, CommitMode::Sync).await;
        }
        if let Some(f) = self.in_flight.take() {
            f.task.abort();
        }
        Ok(())
    }

    /// Stops following assignments: a revoke still waiting for its checkpoint is carried out
    /// now (the last checkpoint covers it); later ones during the close are carried out by the
    /// consumer context.
    pub(super) fn close(self) {
        let consumer = self.links.consumer;
        drop(self);
        let _ = consumer.unassign();
    }

    /// Takes a checkpoint of the owned partitions and writes it in the background once every
    /// output sent before it (`sent` of them) is delivered. `None` if nothing is owned.
    fn begin(&self, engine: &mut Engine, sent: u64) -> Option<InFlight> {
        if self.owned.is_empty() {
            return None;
        }
        let started = Instant::now();
        let l = &self.links;
        let full_every = l.state.full_checkpoint_every;
        let snapshot = checkpoint::take(full_every, engine, &self.owned, &self.consumed, wall_ms());
        let (kafka, producer) = (l.kafka.clone(), l.producer.clone());
        let (mut acked, failed) = (l.acked.clone(), l.failed.clone());
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = acked.wait_for(|n| *n >= sent) => {}
                _ = failed.cancelled() => {}
            }
            if failed.is_cancelled() {
                return Err(CheckpointError::OutputFailed);
            }
            let written = checkpoint::write(&kafka, &producer, &snapshot).await?;
            Ok((written, snapshot))
        });
        Some(InFlight { task, started })
    }

    /// Completes a written checkpoint: its partitions' chains advance, its offsets are
    /// committed to the group, and the trainer's models are published.
    async fn finish(
        &mut self,
        outcome: Outcome,
        started: Instant,
        commit: CommitMode,
    ) -> Result<(), PipelineError> {
        let l = &self.links;
        let outcome = outcome
            .map_err(|e| CheckpointError::Task(e.to_string()))
            .and_then(|r| r);
        let (written, snapshot) = outcome.inspect_err(|e| {
            l.metrics.checkpoint_failed();
            if !matches!(e, CheckpointError::OutputFailed) {
                l.metrics.producer_error("changelog");
            }
            warn!(error = %e, error_code = e.code(), "Checkpoint failed; stopping.");
        })?;
        checkpoint::advance(&mut self.owned, &written);
        l.metrics.checkpoint_written(
            started.elapsed().as_secs_f64(),
            written.partitions,
            written.full,
            written.records,
            written.bytes,
            snapshot.taken_ms,
        );
        debug!(?written, "Checkpoint written.");
        if let Some(models) = &snapshot.models {
            // Fire and forget: the next checkpoint publishes newer models.
            let published = checkpoint::publish_models(l.kafka, &l.producer, models).await?;
            let metrics = l.metrics.clone();
            tokio::spawn(async move {
                if !matches!(published.await, Ok(Ok(_))) {
                    metrics.producer_error("model");
                }
            });
        }
        self.commit(&snapshot, commit);
        Ok(())
    }

    /// Commits a checkpoint's input offsets to the group, for lag monitoring and tools; the
    /// markers stay the truth on restore, so a failed commit is only counted.
    fn commit(&self, snapshot: &Snapshot, mode: CommitMode) {
        let l = &self.links;
        let mut tpl = TopicPartitionList::new();
        for (role, p, next) in &snapshot.offsets {
            let topic = if *role == ERASURE_ROLE {
                l.kafka.topics.erasure.as_str()
            } else {
                Source::ALL
                    .into_iter()
                    .find(|s| s.as_str() == *role)
                    .map_or("", |s| l.kafka.topics.input(s))
            };
            let _ = tpl.add_partition_offset(topic, *p, rdkafka::Offset::Offset(*next));
        }
        if tpl.count() > 0 {
            if let Err(e) = l.consumer.commit(&tpl, mode) {
                l.metrics.commit_failed();
                debug!(error = %e, "Offset commit after a checkpoint failed.");
            }
        }
    }

    /// Applies an assignment change. Assigned partitions are restored before their messages are
    /// read. Revoked ones are checkpointed (with every output sent so far delivered and the
    /// offsets committed), released, and only then unassigned, so their next owner starts where
    /// this instance stopped; partitions already taken away are only released.
    async fn rebalance(
        &mut self,
        event: RebalanceEvent,
        engine: &mut Engine,
        sent: u64,
    ) -> Result<(), PipelineError> {
        match event {
            RebalanceEvent::Assigned(partitions) => {
                let new: Vec<i32> = partitions
                    .into_iter()
                    .filter(|p| !self.owned.contains_key(p))
                    .collect();
                self.restore(engine, &new).await
            }
            RebalanceEvent::Revoked(partitions) => {
                let checkpointed = self.now(engine, sent, CommitMode::Sync).await;
                self.release(partitions, engine)?;
                // Unassigned even if the checkpoint failed (the error stops the pipeline): the
                // group must not wait for this instance.
                if let Err(e) = self.links.consumer.unassign() {
                    warn!(error = %e, "Could not unassign the revoked partitions.");
                }
                checkpointed
            }
            RebalanceEvent::Released(partitions) => self.release(partitions, engine),
        }
    }

    /// The owner of partition 0 trains the models; the others adopt them from the model topic.
    fn is_trainer(&self) -> bool {
        self.owned.contains_key(&0)
    }

    /// Lets go of revoked partitions' users (their next owner restores them from the changelog
    /// and reads the input from its last marker on).
    fn release(&mut self, partitions: Vec<i32>, engine: &mut Engine) -> Result<(), PipelineError> {
        for p in partitions {
            if self.owned.remove(&p).is_none() {
                continue;
            }
            if engine.is_trainer() && !self.is_trainer() {
                // The next trainer starts from the last published models: so do we, or our
                // unpublished steps would make one model version mean two models.
                self.adopt_latest(engine)?;
            }
            engine.set_trainer(self.is_trainer());
            let released = engine.release_shard(p);
            self.consumed.retain(|(_, q), _| *q != p);
            info!(
                partition = p,
                users = released,
                "Released a revoked partition."
            );
        }
        Ok(())
    }

    /// Restores partitions from the changelog (not ready meanwhile): all are read at once (the
    /// reads wait on the broker), then installed in turn.
    async fn restore(
        &mut self,
        engine: &mut Engine,
        partitions: &[i32],
    ) -> Result<(), PipelineError> {
        let metrics = self.links.metrics.clone();
        let started = Instant::now();
        metrics.set_restoring(true);
        metrics.set_ready(false);
        let reads: Vec<_> = partitions
            .iter()
            .map(|&p| {
                let kafka = self.links.kafka.clone();
                tokio::task::spawn_blocking(move || restore_partition(&kafka, p))
            })
            .collect();
        for (&partition, read) in partitions.iter().zip(reads) {
            let read = read.await.map_err(|e| CheckpointError::Task(e.to_string()));
            let (restored, global) = match read {
                Ok(Ok(r)) => r,
                Ok(Err(e)) | Err(e) => {
                    metrics.set_restoring(false);
                    return Err(e.into());
                }
            };
            if !self.global_restored {
                if let Some(g) = global {
                    engine
                        .restore_global(&g)
                        .map_err(|e| PipelineError::Model(e.to_string()))?;
                    metrics.rebase_counters(&engine.counters(), engine.kmeans_repairs());
                    // The published models are at least as new as the checkpoint's.
                    self.adopt_latest(engine)?;
                }
                self.global_restored = true;
            }
            let owned = Owned::from_restored(&restored);
            let users = restored.users.len();
            engine.restore_shard(partition, restored.users);
            self.owned.insert(partition, owned);
            engine.set_trainer(self.is_trainer());
            metrics.restored(users);
        }
        metrics.restore_took(started.elapsed().as_secs_f64());
        metrics.set_restoring(false);
        metrics.set_ready(true);
        Ok(())
    }

    /// Adopts the latest models published on the model topic, if any.
    fn adopt_latest(&self, engine: &mut Engine) -> Result<(), PipelineError> {
        match &self.latest_model {
            Some(m) => engine
                .adopt_models(m)
                .map_err(|e| PipelineError::Model(e.to_string())),
            None => Ok(()),
        }
    }
}

/// Reads the model topic to its end; the last models on it, if any.
async fn latest_models(follower: &StreamConsumer<EndOfLog>) -> Option<Vec<u8>> {
    let mut latest = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), follower.recv()).await {
            Ok(Ok(m)) => latest = m.payload().map(<[u8]>::to_vec),
            Ok(Err(KafkaError::PartitionEOF(_))) => return latest,
            Ok(Err(e)) => debug!(error = %e, "Model topic read error; retrying."),
            Err(_) => {
                warn!("The model topic's end was not reached within 30 s; starting with what was read.");
                return latest;
            }
        }
    }
}
