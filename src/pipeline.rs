//! The streaming pipeline: consume the three input topics, decode, apply to the engine, publish
//! segment changes and dead letters, and store each input offset only after everything the
//! message caused has been delivered (at-least-once).
//!
//! Shape: the consume loop owns the [`Engine`] and hands every processed message, with the
//! delivery futures of its outputs, to a committer task over a bounded channel (back-pressure).
//! The committer awaits deliveries in consumption order and then stores the offset; librdkafka
//! auto-commits stored offsets, and we commit synchronously on revoke and on shutdown.

use crate::catalogue::CatalogueReason;
use crate::checkpoint::{
    self, model_follower, restore_partition, CheckpointError, EndOfLog, Owned, Snapshot, Written,
};
use crate::config::Settings;
use crate::decode::{Ahead, DecodeError, Decoder, ScratchPair, Spare};
use crate::encode::{encode_catalogue, encode_change};
use crate::engine::{Engine, Outcome};
use crate::event::{CatalogueRecord, ChangeReason, SegmentChange, Source};
use crate::http::{ApiCommand, PipelineLink};
use crate::kafka::{commit_sync, consumer_config, producer, send, RebalanceEvent, SegContext};
use crate::metrics::Metrics;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::TopicPartitionList;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

/// Dead-letter headers added to the original message's headers.
pub const DLQ_ERROR_CODE: &str = "segstream.error.code";
pub const DLQ_ERROR_MESSAGE: &str = "segstream.error.message";
pub const DLQ_SOURCE_TOPIC: &str = "segstream.source.topic";
pub const DLQ_SOURCE_PARTITION: &str = "segstream.source.partition";
pub const DLQ_SOURCE_OFFSET: &str = "segstream.source.offset";
/// Set to `true` when the dead letter's key or value was cut to fit the output limit.
pub const DLQ_TRUNCATED: &str = "segstream.truncated";
pub const DLQ_ORIGINAL_KEY_SIZE: &str = "segstream.original.key.size";
pub const DLQ_ORIGINAL_VALUE_SIZE: &str = "segstream.original.value.size";
/// How many original headers were left out because they did not fit the output limit.
pub const DLQ_HEADERS_DROPPED: &str = "segstream.headers.dropped";

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("kafka client: {0}")]
    Kafka(#[from] KafkaError),
    #[error("delivery to {output} failed: {error}")]
    Delivery {
        output: &'static str,
        error: KafkaError,
    },
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("restored models: {0}")]
    Model(String),
    #[error(transparent)]
    Topics(#[from] crate::topics::TopicsError),
    #[error("stopped: an output could not be delivered")]
    Stopped,
}

/// Milliseconds since the Unix epoch by the wall clock. The pipeline is the edge that reads it.
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What an output record was, for the metric counted when it is delivered.
#[derive(Clone, Copy)]
enum Output {
    /// A segment change and the event time of the event that caused it.
    Change(ChangeReason, i64),
    /// A dead letter from an input topic (`None`: the erasure topic).
    DeadLetter(Option<Source>),
    /// A segment catalogue record.
    Catalogue(CatalogueReason),
}

/// A processed message waiting for its outputs before its offset may be stored; `at` is `None`
/// for outputs that no input message caused (an erasure requested over HTTP).
struct Pending {
    at: Option<(Source, i32, i64)>,
    deliveries: Vec<(DeliveryFuture, Output)>,
}

/// Runs the pipeline until `cancel` fires or a delivery fails for good; returns the engine with
/// the state it reached. On the way out it drains in-flight deliveries, flushes the producer,
/// writes a last checkpoint and commits offsets synchronously.
#[instrument(name = "pipeline", skip_all, fields(group = %settings.kafka.group_id))]
pub async fn run(
    settings: &Settings,
    engine: Engine,
    metrics: Metrics,
    cancel: CancellationToken,
) -> Result<Engine, PipelineError> {
    run_with_api(settings, engine, metrics, cancel, PipelineLink::detached()).await
}

/// What an input message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Input {
    Event(Source),
    Erasure,
}

impl Input {
    /// The name a checkpoint's marker records this input's offsets under.
    fn role(self) -> &'static str {
        match self {
            Input::Event(s) => s.as_str(),
            Input::Erasure => ERASURE_ROLE,
        }
    }
}

const ERASURE_ROLE: &str = "erasure";

/// The durable-state bookkeeping of one pipeline: the partitions it owns (restored), and how far
/// it consumed each of their inputs since.
struct Durable {
    owned: BTreeMap<i32, Owned>,
    consumed: HashMap<(&'static str, i32), i64>,
    /// The models and counters are restored once, from the first partition restored.
    global_restored: bool,
    /// The latest models on the model topic (the trainer's).
    latest_model: Option<Vec<u8>>,
}

impl Durable {
    /// The owner of partition 0 trains the models; the others adopt them from the model topic.
    fn is_trainer(&self) -> bool {
        self.owned.contains_key(&0)
    }
}

/// [`run`], serving an HTTP API through `link`: the catalogue is republished with the gauges,
/// and erasure requests are applied between messages.
pub async fn run_with_api(
    settings: &Settings,
    mut engine: Engine,
    metrics: Metrics,
    cancel: CancellationToken,
    mut link: PipelineLink,
) -> Result<Engine, PipelineError> {
    let durable_state = settings.state.checkpoints;
    // Every topic exists and the co-partitioned ones agree before anything is consumed.
    if !crate::topics::prepare(settings, &metrics, &cancel).await? {
        return Ok(engine);
    }
    let (rebalance_tx, mut rebalances) = mpsc::unbounded_channel();
    let consumer: Arc<StreamConsumer<SegContext>> =
        Arc::new(consumer_config(settings).create_with_context(SegContext {
            metrics: metrics.clone(),
            rebalances: durable_state.then_some(rebalance_tx),
        })?);
    let mut topics: Vec<&str> = Source::ALL.iter().map(|s| settings.topic(*s)).collect();
    if durable_state {
        topics.push(&settings.kafka.topics.erasure);
    }
    consumer.subscribe(&topics)?;
    let producer = producer(settings)?;
    let decoder = Decoder::new(settings.decode.clone());
    let mut scratch = ScratchPair::default();
    info!(topics = ?topics, brokers = %settings.kafka.brokers, checkpoints = durable_state, "Consuming.");

    let (tx, rx) = mpsc::channel::<Pending>(settings.pipeline.max_in_flight);
    let (acked_tx, acked) = watch::channel(0u64);
    let mut sent: u64 = 0;
    // Cancelled by the committer when an output cannot be delivered.
    let failed = CancellationToken::new();
    let committer = tokio::spawn(commit_in_order(
        rx,
        consumer.clone(),
        settings.clone(),
        metrics.clone(),
        failed.clone(),
        !durable_state,
        acked_tx,
    ));

    let mut durable = Durable {
        owned: BTreeMap::new(),
        consumed: HashMap::new(),
        global_restored: false,
        latest_model: None,
    };
    let models_in = if durable_state {
        // Blocking: it waits for the model topic's metadata.
        let s = settings.clone();
        let follower = tokio::task::spawn_blocking(move || model_follower(&s))
            .await
            .map_err(|e| PipelineError::Checkpoint(CheckpointError::Task(e.to_string())))??;
        durable.latest_model = latest_models(&follower).await;
        if let Some(m) = &durable.latest_model {
            match engine.adopt_models(m) {
                Ok(()) => info!(
                    model_version = engine.model_version(),
                    "Adopted the latest published models."
                ),
                Err(e) => warn!(error = %e, "Published models not adopted."),
            }
        }
        // Until this instance owns partition 0, it applies the trainer's models.
        engine.set_trainer(false);
        Some(follower)
    } else {
        None
    };
    let writer = Writer {
        settings,
        producer: &producer,
        consumer: &consumer,
        metrics: &metrics,
        acked: &acked,
        failed: &failed,
    };
    let mut in_flight: Option<InFlight> = None;
    let mut gauges = tokio::time::interval(Duration::from_millis(500));
    let mut checkpoints = tokio::time::interval(settings.state.checkpoint_interval);
    checkpoints.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut limiter = LogLimiter::default();
    let mut result = Ok(());
    let mut burst = 0;
    // The message after the current one, taken early (see `look_ahead`).
    let mut next: Option<Next<'_>> = None;
    'consume: loop {
        // Messages librdkafka already holds are taken directly, up to a burst; then one turn of
        // the `select!` (cancellation, rebalances, timers, checkpoints, API) comes first.
        let (ready, mut ahead) = match next.take() {
            Some(n) => (Some(n.msg), n.ahead),
            None if burst < BURST => (ready_message(&consumer), None),
            None => (None, None),
        };
        if ready.is_some() {
            burst += 1;
        } else {
            burst = 0;
        }
        let msg = if let Some(m) = ready {
            m
        } else {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = failed.cancelled() => break,
                Some(event) = rebalances.recv() => {
                    let done = writer.rebalance(event, &mut in_flight, &mut engine, &mut durable, sent).await;
                    if let Err(e) = done {
                        result = Err(e);
                        break;
                    }
                    continue;
                }
                _ = gauges.tick() => {
                    refresh_gauges(&metrics, &engine);
                    link.publish(&engine, wall_ms());
                    continue;
                }
                Some(m) = async { match &models_in { Some(c) => Some(c.recv().await), None => None } } => {
                    if let Ok(m) = m {
                        if let Some(bytes) = m.payload() {
                            if !engine.is_trainer() {
                                if let Err(e) = engine.adopt_models(bytes) {
                                    warn!(error = %e, "Published models not adopted.");
                                }
                            }
                            durable.latest_model = Some(bytes.to_vec());
                        }
                    }
                    continue;
                }
                done = async { (&mut in_flight.as_mut().expect("guarded").task).await }, if in_flight.is_some() => {
                    let started = in_flight.take().expect("guarded").started;
                    if let Err(e) = writer.finish(done, started, &mut durable, CommitMode::Async).await {
                        result = Err(e);
                        break;
                    }
                    continue;
                }
                _ = checkpoints.tick(), if durable_state && in_flight.is_none() => {
                    // One checkpoint at a time; processing goes on while it is written.
                    in_flight = writer.begin(&mut engine, &durable, sent);
                    continue;
                }
                Some(cmd) = link.commands.recv() => {
                    let ApiCommand::Erase { user, reply } = cmd;
                    let change = engine.erase(&user, wall_ms());
                    let known = change.is_some();
                    let mut deliveries = Vec::new();
                    if let Some(change) = change {
                        metrics.erased();
                        match publish_change(&producer, settings, &change).await {
                            Ok(d) => deliveries.push(d),
                            Err(e) => {
                                result = Err(PipelineError::Kafka(e));
                                break;
                            }
                        }
                    }
                    if tx.send(Pending { at: None, deliveries }).await.is_err() {
                        break;
                    }
                    sent += 1;
                    // The erasure is durable once a checkpoint carries the removal: answer then.
                    if known && durable_state {
                        let done = writer.now(&mut in_flight, &mut engine, &mut durable, sent, CommitMode::Async).await;
                        if let Err(e) = done {
                            result = Err(e);
                            break;
                        }
                    }
                    let _ = reply.send(known);
                    continue;
                }
                msg = consumer.recv() => msg,
            }
        };
        let msg = match msg {
            Ok(m) => {
                // Consuming again after an outage (a gauge store: cheap per message).
                metrics.set_ready(true);
                m
            }
            Err(e) => {
                if let Some(more) = limiter.allow() {
                    warn!(error = %e, more_since_last = more, "Consumer error; librdkafka retries.");
                }
                continue;
            }
        };
        // A message decoded ahead already had its topic looked up.
        let source = match &ahead {
            Some(a) => Some(a.source()),
            None => settings.source_of(msg.topic()),
        };
        let input = match source {
            Some(source) => Input::Event(source),
            None if durable_state && msg.topic() == settings.kafka.topics.erasure => Input::Erasure,
            None => continue,
        };
        let partition = msg.partition();
        if durable_state {
            // Assignment changes are announced before the new partitions' messages arrive.
            while let Ok(event) = rebalances.try_recv() {
                let done = writer
                    .rebalance(event, &mut in_flight, &mut engine, &mut durable, sent)
                    .await;
                if let Err(e) = done {
                    result = Err(e);
                    break 'consume;
                }
            }
            if !durable.owned.contains_key(&partition) {
                if let Err(e) =
                    restore(settings, &mut engine, &mut durable, &metrics, &[partition]).await
                {
                    result = Err(e);
                    break;
                }
            }
            let owned = &durable.owned[&partition];
            if owned
                .restored_offsets
                .get(input.role())
                .is_some_and(|&next| msg.offset() < next)
            {
                // Already in the restored state (the group's commit lagged the checkpoint).
                metrics.skipped();
                continue;
            }
            durable
                .consumed
                .insert((input.role(), partition), msg.offset() + 1);
        }
        let payload = msg.payload().unwrap_or_default();
        let source =
            match input {
                Input::Event(source) => source,
                Input::Erasure => {
                    let deliveries =
                        match erase_on_request(&msg, settings, &producer, &mut engine, &metrics)
                            .await
                        {
                            Ok(d) => d,
                            Err(e) => {
                                result = Err(PipelineError::Kafka(e));
                                break;
                            }
                        };
                    if tx
                        .send(Pending {
                            at: None,
                            deliveries,
                        })
                        .await
                        .is_err()
                    {
                        break;
                    }
                    sent += 1;
                    continue;
                }
            };
        let started = Instant::now();
        metrics.consumed(source);
        let now = wall_ms();
        let mut deliveries = Vec::new();
        let mut unusable = None;
        match scratch.decode(&decoder, source, payload, Some(now), ahead.take()) {
            Ok((event, spare)) => {
                if burst < BURST {
                    next = look_ahead(&consumer, settings, &decoder, spare, &engine, now);
                }
                if let Err(e) = DecodeError::check_key(msg.key(), event.user_id()) {
                    unusable = Some(e);
                } else {
                    let applied = engine.apply_in(event, now, partition);
                    match applied.outcome {
                        Outcome::Applied => metrics.applied(source),
                        Outcome::Duplicate => metrics.duplicate(source),
                        Outcome::Late { applied } => {
                            metrics.late(source, applied);
                            if applied {
                                metrics.applied(source);
                            } else {
                                unusable = Some(DecodeError::TooLate);
                            }
                        }
                    }
                    for change in applied.changes {
                        match publish_change(&producer, settings, &change).await {
                            Ok(d) => deliveries.push(d),
                            Err(e) => {
                                result = Err(PipelineError::Kafka(e));
                                break;
                            }
                        }
                    }
                    // Sweeps and fits (inside this event's step) may have changed the catalogue.
                    if engine.has_catalogue() && result.is_ok() {
                        for record in engine.take_catalogue() {
                            match publish_catalogue(&producer, settings, &record).await {
                                Ok(d) => deliveries.push(d),
                                Err(e) => {
                                    result = Err(PipelineError::Kafka(e));
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            Err(error) => unusable = Some(error),
        }
        if let Some(error) = unusable {
            metrics.invalid(source, &error);
            if let Some(more) = limiter.allow() {
                warn!(
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    error_code = error.code(),
                    more_since_last = more,
                    "Dead-lettered an unusable message; more_since_last others were since the last such line."
                );
            }
            match dead_letter(&producer, settings, &msg, &error).await {
                Ok(f) => deliveries.push((f, Output::DeadLetter(Some(source)))),
                Err(e) => result = Err(PipelineError::Kafka(e)),
            }
        }
        metrics.observe_processing(started.elapsed().as_secs_f64());
        if result.is_err() {
            break;
        }
        if durable_state && deliveries.is_empty() {
            // Nothing to wait for: with checkpoints the committer only tracks outputs (offsets
            // come from the markers), so most messages skip the hand-off.
            continue;
        }
        let pending = Pending {
            at: Some((source, msg.partition(), msg.offset())),
            deliveries,
        };
        if tx.send(pending).await.is_err() {
            break;
        }
        sent += 1;
    }

    // Ordered shutdown: stop consuming (above), drain deliveries (and store their offsets),
    // write a last checkpoint, flush the producer, then commit synchronously. A message taken
    // ahead but not processed (the loop stopped on an error) is in no marker and no stored
    // offset: it is read again after a restart.
    drop(next);
    metrics.set_ready(false);
    drop(tx);
    match committer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => result = result.and(Err(e)),
        Err(join) => warn!(error = %join, "Committer task failed."),
    }
    if durable_state && result.is_ok() {
        // Every output is delivered by now; the checkpoint makes a restart start right here.
        if let Err(e) = writer
            .now(
                &mut in_flight,
                &mut engine,
                &mut durable,
                sent,
                CommitMode::Sync,
            )
            .await
        {
            result = Err(e);
        }
    } else if let Some(f) = in_flight.take() {
        f.task.abort();
    }
    if let Err(e) = producer.flush(Duration::from_secs(30)) {
        warn!(error = %e, "Producer flush did not complete.");
    }
    if !durable_state {
        commit_sync(consumer.as_ref(), &metrics);
    }
    // A revoke still waiting for its checkpoint is carried out now (the last checkpoint above
    // covers it); later ones during the close are carried out by the consumer context.
    drop(rebalances);
    if durable_state {
        let _ = consumer.unassign();
    }
    consumer.unsubscribe();
    refresh_gauges(&metrics, &engine);
    info!(
        applied = engine.applied(),
        users = engine.users(),
        "Pipeline stopped."
    );
    result.map(|()| engine)
}

/// A message taken from librdkafka's queue while the one before it is being processed, and
/// what decoding it ahead gave.
struct Next<'c> {
    msg: Result<BorrowedMessage<'c>, KafkaError>,
    ahead: Option<Ahead>,
}

/// Takes the next message if librdkafka already holds one, and decodes it if it is an event,
/// so that its user's state loads into cache while the current event is applied (the loop
/// then handles it exactly as if it had been taken next: rebalances first, then its checks).
fn look_ahead<'c>(
    consumer: &'c StreamConsumer<SegContext>,
    settings: &Settings,
    decoder: &Decoder,
    spare: Spare<'_>,
    engine: &Engine,
    now: i64,
) -> Option<Next<'c>> {
    let msg = ready_message(consumer)?;
    let event = msg.as_ref().ok().and_then(|m| {
        Some((
            settings.source_of(m.topic())?,
            m.payload().unwrap_or_default(),
        ))
    });
    let ahead = event
        .map(|(source, payload)| engine.decode_ahead(spare, decoder, source, payload, Some(now)));
    Some(Next { msg, ahead })
}

/// Messages taken from librdkafka's queue without a turn of the consume loop's `select!`.
const BURST: u32 = 256;

/// A message librdkafka already holds, if any, without waiting.
fn ready_message(
    consumer: &StreamConsumer<SegContext>,
) -> Option<Result<BorrowedMessage<'_>, KafkaError>> {
    poll_now(&mut std::pin::pin!(consumer.recv()))
}

/// The output of `future` if it is ready now, without waiting (a later `.await` of a pending
/// one registers the task's own waker).
fn poll_now<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(future).poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
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

/// Lets go of revoked partitions' users (their next owner restores them from the changelog and
/// reads the input from its last marker on).
fn release(
    partitions: Vec<i32>,
    engine: &mut Engine,
    durable: &mut Durable,
) -> Result<(), PipelineError> {
    for p in partitions {
        if durable.owned.remove(&p).is_some() {
            if engine.is_trainer() && !durable.is_trainer() {
                // The next trainer starts from the last published models: so do we,
                // or our unpublished steps would make one model version mean two models.
                if let Some(m) = &durable.latest_model {
                    engine
                        .adopt_models(m)
                        .map_err(|e| PipelineError::Model(e.to_string()))?;
                }
            }
            engine.set_trainer(durable.is_trainer());
            let released = engine.release_shard(p);
            durable.consumed.retain(|(_, q), _| *q != p);
            info!(
                partition = p,
                users = released,
                "Released a revoked partition."
            );
        }
    }
    Ok(())
}

/// Restores partitions from the changelog (not ready meanwhile): all are read at once (the
/// reads wait on the broker), then installed in turn.
async fn restore(
    settings: &Settings,
    engine: &mut Engine,
    durable: &mut Durable,
    metrics: &Metrics,
    partitions: &[i32],
) -> Result<(), PipelineError> {
    let started = Instant::now();
    metrics.set_restoring(true);
    metrics.set_ready(false);
    let reads: Vec<_> = partitions
        .iter()
        .map(|&p| {
            let s = settings.clone();
            tokio::task::spawn_blocking(move || restore_partition(&s, p))
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
        if !durable.global_restored {
            if let Some(g) = global {
                engine
                    .restore_global(&g)
                    .map_err(|e| PipelineError::Model(e.to_string()))?;
                metrics.rebase_counters(&engine.counters(), engine.kmeans_repairs());
                // The published models are at least as new as the checkpoint's.
                if let Some(m) = &durable.latest_model {
                    engine
                        .adopt_models(m)
                        .map_err(|e| PipelineError::Model(e.to_string()))?;
                }
            }
            durable.global_restored = true;
        }
        let owned = Owned::from_restored(&restored);
        let users = restored.users.len();
        engine.restore_shard(partition, restored.users);
        durable.owned.insert(partition, owned);
        engine.set_trainer(durable.is_trainer());
        metrics.restored(users);
    }
    metrics.restore_took(started.elapsed().as_secs_f64());
    metrics.set_restoring(false);
    metrics.set_ready(true);
    Ok(())
}

/// What checkpointing needs besides the engine and the bookkeeping.
struct Writer<'a> {
    settings: &'a Settings,
    producer: &'a FutureProducer,
    consumer: &'a StreamConsumer<SegContext>,
    metrics: &'a Metrics,
    /// Outputs delivered so far (the committer counts them in order).
    acked: &'a watch::Receiver<u64>,
    /// Cancelled when an output could not be delivered.
    failed: &'a CancellationToken,
}

/// A checkpoint being written while processing goes on.
struct InFlight {
    task: tokio::task::JoinHandle<Result<(Written, Snapshot), CheckpointError>>,
    started: Instant,
}

impl Writer<'_> {
    /// Takes a checkpoint of the owned partitions and writes it in the background once every
    /// output sent before it (`sent` of them) is delivered. `None` if nothing is owned.
    fn begin(&self, engine: &mut Engine, durable: &Durable, sent: u64) -> Option<InFlight> {
        if durable.owned.is_empty() {
            return None;
        }
        let started = Instant::now();
        let snapshot = checkpoint::take(
            self.settings,
            engine,
            &durable.owned,
            &durable.consumed,
            wall_ms(),
        );
        let (settings, producer) = (self.settings.clone(), self.producer.clone());
        let (mut acked, failed) = (self.acked.clone(), self.failed.clone());
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = acked.wait_for(|n| *n >= sent) => {}
                _ = failed.cancelled() => {}
            }
            if failed.is_cancelled() {
                return Err(CheckpointError::OutputFailed);
            }
            let written = checkpoint::write(&settings, &producer, &snapshot).await?;
            Ok((written, snapshot))
        });
        Some(InFlight { task, started })
    }

    /// Completes a written checkpoint: its partitions' chains advance, its offsets are
    /// committed to the group, and the trainer's models are published.
    async fn finish(
        &self,
        outcome: Result<Result<(Written, Snapshot), CheckpointError>, tokio::task::JoinError>,
        started: Instant,
        durable: &mut Durable,
        commit: CommitMode,
    ) -> Result<(), PipelineError> {
        let outcome = outcome
            .map_err(|e| CheckpointError::Task(e.to_string()))
            .and_then(|r| r);
        let (written, snapshot) = outcome.inspect_err(|e| {
            self.metrics.checkpoint_failed();
            if !matches!(e, CheckpointError::OutputFailed) {
                self.metrics.producer_error("changelog");
            }
            warn!(error = %e, error_code = e.code(), "Checkpoint failed; stopping.");
        })?;
        checkpoint::advance(&mut durable.owned, &written);
        self.metrics.checkpoint_written(
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
            let published =
                checkpoint::publish_models(self.settings, self.producer, models).await?;
            let metrics = self.metrics.clone();
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
        let mut tpl = TopicPartitionList::new();
        for (role, p, next) in &snapshot.offsets {
            let topic = if *role == ERASURE_ROLE {
                self.settings.kafka.topics.erasure.as_str()
            } else {
                Source::ALL
                    .into_iter()
                    .find(|s| s.as_str() == *role)
                    .map_or("", |s| self.settings.topic(s))
            };
            let _ = tpl.add_partition_offset(topic, *p, rdkafka::Offset::Offset(*next));
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, mode) {
                self.metrics.commit_failed();
                debug!(error = %e, "Offset commit after a checkpoint failed.");
            }
        }
    }

    /// Applies an assignment change. Assigned partitions are restored before their messages are
    /// read. Revoked ones are checkpointed (with every output sent so far delivered and the
    /// offsets committed), released, and only then unassigned, so their next owner starts where
    /// this instance stopped; partitions already taken away are only released.
    async fn rebalance(
        &self,
        event: RebalanceEvent,
        in_flight: &mut Option<InFlight>,
        engine: &mut Engine,
        durable: &mut Durable,
        sent: u64,
    ) -> Result<(), PipelineError> {
        match event {
            RebalanceEvent::Assigned(partitions) => {
                let new: Vec<i32> = partitions
                    .into_iter()
                    .filter(|p| !durable.owned.contains_key(p))
                    .collect();
                restore(self.settings, engine, durable, self.metrics, &new).await
            }
            RebalanceEvent::Revoked(partitions) => {
                let checkpointed = self
                    .now(in_flight, engine, durable, sent, CommitMode::Sync)
                    .await;
                release(partitions, engine, durable)?;
                // Unassigned even if the checkpoint failed (the error stops the pipeline): the
                // group must not wait for this instance.
                if let Err(e) = self.consumer.unassign() {
                    warn!(error = %e, "Could not unassign the revoked partitions.");
                }
                checkpointed
            }
            RebalanceEvent::Released(partitions) => release(partitions, engine, durable),
        }
    }

    /// Writes a checkpoint now and waits for it (after the one in flight, if any): at shutdown
    /// and on revoke (offsets committed synchronously), and before answering an erasure.
    async fn now(
        &self,
        in_flight: &mut Option<InFlight>,
        engine: &mut Engine,
        durable: &mut Durable,
        sent: u64,
        commit: CommitMode,
    ) -> Result<(), PipelineError> {
        if let Some(done) = in_flight.take() {
            self.finish(done.task.await, done.started, durable, CommitMode::Async)
                .await?;
        }
        if let Some(done) = self.begin(engine, durable, sent) {
            self.finish(done.task.await, done.started, durable, commit)
                .await?;
        }
        Ok(())
    }
}

/// Handles a request on the erasure topic (key = user id): the user's state leaves memory, the
/// next checkpoint writes its removal, and an `erased` change is published. A request without
/// a user id is dead-lettered.
async fn erase_on_request(
    msg: &BorrowedMessage<'_>,
    settings: &Settings,
    producer: &FutureProducer,
    engine: &mut Engine,
    metrics: &Metrics,
) -> Result<Vec<(DeliveryFuture, Output)>, KafkaError> {
    let user = msg
        .key()
        .and_then(|k| std::str::from_utf8(k).ok())
        .filter(|u| !u.is_empty());
    let Some(user) = user else {
        metrics.erasure_request("invalid");
        let f = dead_letter(producer, settings, msg, &DecodeError::EmptyUserId).await?;
        return Ok(vec![(f, Output::DeadLetter(None))]);
    };
    match engine.erase(user, wall_ms()) {
        Some(change) => {
            metrics.erasure_request("erased");
            metrics.erased();
            debug!(user, "Erased a user on request.");
            Ok(vec![publish_change(producer, settings, &change).await?])
        }
        None => {
            metrics.erasure_request("unknown");
            Ok(Vec::new())
        }
    }
}

/// Sends the message to the dead-letter topic with its original key and headers plus why.
///
/// A dead letter always fits the producer's limit (`message.max.bytes`: key, value and headers
/// together), or an oversized input would stop the pipeline on every restart: the key is cut to
/// a quarter of the limit and the value to what is left, with [`DLQ_TRUNCATED`] and the
/// original sizes in headers. If the original headers still do not fit, the dead letter goes
/// without them and [`DLQ_HEADERS_DROPPED`] says how many there were.
async fn dead_letter(
    producer: &FutureProducer,
    settings: &Settings,
    msg: &BorrowedMessage<'_>,
    error: &DecodeError,
) -> Result<DeliveryFuture, KafkaError> {
    let cut = DeadLetterCut::of(msg, output_limit(settings));
    let record = |headers| {
        let mut record = FutureRecord::to(&settings.kafka.topics.dead_letter)
            .payload(cut.value)
            .headers(headers);
        if let Some(key) = cut.key {
            record = record.key(key);
        }
        record
    };
    let with_originals = dead_letter_headers(msg, error, &cut, true);
    match send(producer, record(with_originals)).await {
        Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
            send(
                producer,
                record(dead_letter_headers(msg, error, &cut, false)),
            )
            .await
        }
        sent => sent,
    }
}

/// librdkafka's limit on one produced message, key, value and headers together: the producer's
/// `message.max.bytes` as configured, else librdkafka's default (1,000,000 bytes).
fn output_limit(settings: &Settings) -> usize {
    const LIBRDKAFKA_DEFAULT: usize = 1_000_000;
    let k = &settings.kafka;
    k.producer_properties
        .get("message.max.bytes")
        .or_else(|| k.properties.get("message.max.bytes"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(LIBRDKAFKA_DEFAULT)
}

/// The parts of an unusable message that its dead letter carries, cut to fit the output limit.
struct DeadLetterCut<'m> {
    key: Option<&'m [u8]>,
    value: &'m [u8],
    /// (original key size, original value size), if either was cut.
    truncated: Option<(usize, usize)>,
}

impl<'m> DeadLetterCut<'m> {
    /// Room kept for segstream's own headers (the error message is short) and librdkafka's
    /// per-header overhead.
    const HEADROOM: usize = 8 * 1024;

    fn of(msg: &'m impl Message, limit: usize) -> Self {
        let (key, value) = (msg.key(), msg.payload().unwrap_or_default());
        let key_len = key.map_or(0, <[u8]>::len);
        let kept_key = key.map(|k| &k[..k.len().min(limit / 4)]);
        let room = limit.saturating_sub(kept_key.map_or(0, <[u8]>::len) + Self::HEADROOM);
        let kept_value = &value[..value.len().min(room)];
        let cut = kept_key.map_or(0, <[u8]>::len) < key_len || kept_value.len() < value.len();
        Self {
            key: kept_key,
            value: kept_value,
            truncated: cut.then_some((key_len, value.len())),
        }
    }
}

/// Sends a segment change to the output topic, keyed by user id.
async fn publish_change(
    producer: &FutureProducer,
    settings: &Settings,
    change: &SegmentChange,
) -> Result<(DeliveryFuture, Output), KafkaError> {
    let bytes = encode_change(change, settings.output.format, settings.output.schema_id);
    let record = FutureRecord::to(&settings.kafka.topics.segment_changes)
        .key(change.user_id.as_bytes())
        .payload(&bytes[..]);
    let f = send(producer, record).await?;
    Ok((f, Output::Change(change.reason, change.event_time)))
}

/// Sends a catalogue record to the catalogue topic, keyed by segment id.
async fn publish_catalogue(
    producer: &FutureProducer,
    settings: &Settings,
    record: &CatalogueRecord,
) -> Result<(DeliveryFuture, Output), KafkaError> {
    let o = &settings.output;
    let bytes = encode_catalogue(record, o.format, o.catalogue_schema_id);
    let key = record.segment_id.to_string();
    let topic = FutureRecord::to(&settings.kafka.topics.segment_catalogue)
        .key(key.as_bytes())
        .payload(&bytes[..]);
    let f = send(producer, topic).await?;
    Ok((f, Output::Catalogue(record.reason)))
}

/// The original headers (copied as bytes: a key that is not UTF-8 is kept as it is) plus the
/// reason, the source coordinates and, for a cut message, what was cut.
fn dead_letter_headers(
    msg: &BorrowedMessage<'_>,
    error: &DecodeError,
    cut: &DeadLetterCut<'_>,
    originals: bool,
) -> OwnedHeaders {
    let original = msg.headers();
    let mut headers = match original {
        Some(h) if originals => h.detach(),
        _ => OwnedHeaders::new(),
    };
    let message = error.to_string();
    let partition = msg.partition().to_string();
    let offset = msg.offset().to_string();
    let mut ours = vec![
        (DLQ_ERROR_CODE, error.code().to_owned()),
        (DLQ_ERROR_MESSAGE, message),
        (DLQ_SOURCE_TOPIC, msg.topic().to_owned()),
        (DLQ_SOURCE_PARTITION, partition),
        (DLQ_SOURCE_OFFSET, offset),
    ];
    if let Some((key_size, value_size)) = cut.truncated {
        ours.push((DLQ_TRUNCATED, "true".to_owned()));
        ours.push((DLQ_ORIGINAL_KEY_SIZE, key_size.to_string()));
        ours.push((DLQ_ORIGINAL_VALUE_SIZE, value_size.to_string()));
    }
    if let (Some(h), false) = (original, originals) {
        ours.push((DLQ_HEADERS_DROPPED, h.count().to_string()));
    }
    for (key, value) in &ours {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

/// Awaits each message's deliveries in consumption order and stores its offset afterwards.
/// A delivery that failed for good stops the pipeline: its offset and every later one stay
/// unstored, so they are consumed again after a restart.
async fn commit_in_order(
    mut rx: mpsc::Receiver<Pending>,
    consumer: Arc<StreamConsumer<SegContext>>,
    settings: Settings,
    metrics: Metrics,
    failed: CancellationToken,
    store_offsets: bool,
    acked: watch::Sender<u64>,
) -> Result<(), PipelineError> {
    // Storing an offset takes librdkafka's locks; storing the latest delivered offset per
    // partition whenever the channel runs dry (and at least every STORE_EVERY messages) stores
    // the same positions for a fraction of the cost.
    const STORE_EVERY: usize = 1024;
    let mut latest: HashMap<(Source, i32), i64> = HashMap::new();
    let store = |latest: &mut HashMap<(Source, i32), i64>| {
        if !store_offsets {
            // With checkpoints, offsets are committed from the checkpoints' markers.
            latest.clear();
            return;
        }
        for ((source, partition), offset) in latest.drain() {
            let topic = settings.topic(source);
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
            let name = match output {
                Output::Change(..) => "changes",
                Output::DeadLetter(_) => "dead_letter",
                Output::Catalogue(_) => "catalogue",
            };
            let result = match poll_now(&mut delivery) {
                Some(r) => r,
                None => {
                    publish(delivered);
                    delivery.await
                }
            };
            let error = match result {
                Ok(Ok(_)) => {
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
                    continue;
                }
                Ok(Err((error, _))) => error,
                Err(_) => KafkaError::Canceled,
            };
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

fn refresh_gauges(metrics: &Metrics, engine: &Engine) {
    metrics.set_checkpoint_age(wall_ms());
    let (mae, rmse, _) = engine.value_errors();
    let c = engine.counters();
    metrics.set_model_state(
        engine.users(),
        engine.model_version(),
        mae,
        &engine.segment_figures(),
    );
    metrics.set_quality(
        &c,
        engine.kmeans_repairs(),
        rmse,
        engine.value_calibration(),
        engine.mean_distance(),
    );
    metrics.set_validation(&engine.value_validation());
}

/// At most one log line per [`LOG_INTERVAL`] for per-message problems, which says how many
/// it stood for (the metrics count each by topic and code).
#[derive(Default)]
struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

const LOG_INTERVAL: Duration = Duration::from_secs(10);

impl LogLimiter {
    /// `Some(n)` when a line may be written now: `n` problems went unlogged since the last.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}
