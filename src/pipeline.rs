//! The streaming pipeline: consume the three input topics, decode, apply to the engine, publish
//! segment changes and dead letters, and store each input offset only after everything the
//! message caused has been delivered (at-least-once).
//!
//! Shape: the consume loop owns the [`Engine`] and hands every processed message, with the
//! delivery futures of its outputs, to a committer task over a bounded channel (back-pressure).
//! The committer awaits deliveries in consumption order and then stores the offset; librdkafka
//! auto-commits stored offsets, and we commit synchronously on revoke and on shutdown.

use crate::config::Settings;
use crate::decode::{DecodeError, Decoder};
use crate::encode::encode_change;
use crate::engine::{Engine, Outcome};
use crate::event::{ChangeReason, SegmentChange, Source};
use crate::http::{ApiCommand, PipelineLink};
use crate::kafka::{commit_sync, consumer_config, producer, SegContext};
use crate::metrics::{Metrics, Mirror};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

/// Dead-letter headers added to the original message's headers.
pub const DLQ_ERROR_CODE: &str = "segstream.error.code";
pub const DLQ_ERROR_MESSAGE: &str = "segstream.error.message";
pub const DLQ_SOURCE_TOPIC: &str = "segstream.source.topic";
pub const DLQ_SOURCE_PARTITION: &str = "segstream.source.partition";
pub const DLQ_SOURCE_OFFSET: &str = "segstream.source.offset";

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("kafka client: {0}")]
    Kafka(#[from] KafkaError),
    #[error("delivery to {output} failed: {error}")]
    Delivery {
        output: &'static str,
        error: KafkaError,
    },
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
    DeadLetter(Source),
}

/// A processed message waiting for its outputs before its offset may be stored; `at` is `None`
/// for outputs that no input message caused (an erasure requested over HTTP).
struct Pending {
    at: Option<(Source, i32, i64)>,
    deliveries: Vec<(DeliveryFuture, Output)>,
}

/// Sends a record, waiting while the producer's queue is full (back-pressure, not an error).
async fn send(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Runs the pipeline until `cancel` fires or a delivery fails for good; returns the engine with
/// the state it reached. On the way out it drains in-flight deliveries, flushes the producer and
/// commits offsets synchronously.
#[instrument(name = "pipeline", skip_all, fields(group = %settings.kafka.group_id))]
pub async fn run(
    settings: &Settings,
    engine: Engine,
    metrics: Metrics,
    cancel: CancellationToken,
) -> Result<Engine, PipelineError> {
    run_with_api(settings, engine, metrics, cancel, PipelineLink::detached()).await
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
    let consumer: Arc<StreamConsumer<SegContext>> =
        Arc::new(consumer_config(settings).create_with_context(SegContext {
            metrics: metrics.clone(),
        })?);
    let topics: Vec<&str> = Source::ALL.iter().map(|s| settings.topic(*s)).collect();
    consumer.subscribe(&topics)?;
    let producer = producer(settings)?;
    let decoder = Decoder::new(settings.decode.clone());
    info!(topics = ?topics, brokers = %settings.kafka.brokers, "Consuming.");

    let (tx, rx) = mpsc::channel::<Pending>(settings.pipeline.max_in_flight);
    let failed = cancel.child_token();
    let committer = tokio::spawn(commit_in_order(
        rx,
        consumer.clone(),
        settings.clone(),
        metrics.clone(),
        failed.clone(),
    ));

    let mut gauges = tokio::time::interval(Duration::from_millis(500));
    let mut limiter = LogLimiter::default();
    let mut mirror = Mirror::default();
    let mut result = Ok(());
    loop {
        let msg = tokio::select! {
            biased;
            _ = failed.cancelled() => break,
            _ = gauges.tick() => {
                refresh_gauges(&metrics, &mut mirror, &engine);
                link.publish(&engine);
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
                let _ = reply.send(known);
                if tx.send(Pending { at: None, deliveries }).await.is_err() {
                    break;
                }
                continue;
            }
            msg = consumer.recv() => msg,
        };
        let msg = match msg {
            Ok(m) => {
                // Consuming again after an outage (a gauge store: cheap per message).
                metrics.set_ready(true);
                m
            }
            Err(e) => {
                if limiter.allow() {
                    warn!(error = %e, "Consumer error; librdkafka retries.");
                }
                continue;
            }
        };
        let Some(source) = settings.source_of(msg.topic()) else {
            continue;
        };
        let started = Instant::now();
        metrics.consumed(source);
        let now = wall_ms();
        let payload = msg.payload().unwrap_or_default();
        let mut deliveries = Vec::new();
        let mut unusable = None;
        match decoder.decode(source, payload, Some(now)) {
            Ok(event) => {
                let applied = engine.apply(&event, now);
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
            }
            Err(error) => unusable = Some(error),
        }
        if let Some(error) = unusable {
            metrics.invalid(source, &error);
            if limiter.allow() {
                warn!(
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    error_code = error.code(),
                    "Dead-lettered an unusable message."
                );
            }
            let headers = dead_letter_headers(&msg, &error);
            let mut record = FutureRecord::to(&settings.kafka.topics.dead_letter)
                .payload(payload)
                .headers(headers);
            if let Some(key) = msg.key() {
                record = record.key(key);
            }
            match send(&producer, record).await {
                Ok(f) => deliveries.push((f, Output::DeadLetter(source))),
                Err(e) => result = Err(PipelineError::Kafka(e)),
            }
        }
        metrics.observe_processing(started.elapsed().as_secs_f64());
        if result.is_err() {
            break;
        }
        let pending = Pending {
            at: Some((source, msg.partition(), msg.offset())),
            deliveries,
        };
        if tx.send(pending).await.is_err() {
            break;
        }
    }

    // Ordered shutdown: stop consuming (above), drain deliveries and store their offsets, flush
    // the producer, then commit synchronously.
    metrics.set_ready(false);
    drop(tx);
    match committer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => result = result.and(Err(e)),
        Err(join) => warn!(error = %join, "Committer task failed."),
    }
    if let Err(e) = producer.flush(Duration::from_secs(30)) {
        warn!(error = %e, "Producer flush did not complete.");
    }
    commit_sync(consumer.as_ref(), &metrics);
    consumer.unsubscribe();
    refresh_gauges(&metrics, &mut mirror, &engine);
    info!(
        applied = engine.applied(),
        users = engine.users(),
        "Pipeline stopped."
    );
    result.map(|()| engine)
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

/// The original headers plus the reason and the source coordinates.
fn dead_letter_headers(msg: &impl Message, error: &DecodeError) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(original) = msg.headers() {
        for h in original.iter() {
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let message = error.to_string();
    let partition = msg.partition().to_string();
    let offset = msg.offset().to_string();
    for (key, value) in [
        (DLQ_ERROR_CODE, error.code()),
        (DLQ_ERROR_MESSAGE, message.as_str()),
        (DLQ_SOURCE_TOPIC, msg.topic()),
        (DLQ_SOURCE_PARTITION, partition.as_str()),
        (DLQ_SOURCE_OFFSET, offset.as_str()),
    ] {
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
) -> Result<(), PipelineError> {
    // Storing an offset takes librdkafka's locks; storing the latest delivered offset per
    // partition whenever the channel runs dry (and at least every STORE_EVERY messages) stores
    // the same positions for a fraction of the cost.
    const STORE_EVERY: usize = 1024;
    let mut latest: HashMap<(Source, i32), i64> = HashMap::new();
    let store = |latest: &mut HashMap<(Source, i32), i64>| {
        for ((source, partition), offset) in latest.drain() {
            let topic = settings.topic(source);
            if let Err(e) = consumer.store_offset(topic, partition, offset) {
                // The partition was revoked meanwhile; its new owner re-reads from the last commit.
                debug!(topic, partition, error = %e, "Offset not stored.");
            }
        }
    };
    let mut since_store = 0;
    loop {
        let p = match rx.try_recv() {
            Ok(p) => p,
            Err(mpsc::error::TryRecvError::Empty) => {
                store(&mut latest);
                since_store = 0;
                match rx.recv().await {
                    Some(p) => p,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        for (delivery, output) in p.deliveries {
            let name = match output {
                Output::Change(..) => "changes",
                Output::DeadLetter(_) => "dead_letter",
            };
            let error = match delivery.await {
                Ok(Ok(_)) => {
                    match output {
                        Output::Change(reason, event_time) => {
                            metrics.change_delivered(reason);
                            if reason != ChangeReason::Erased {
                                metrics.event_to_emit(event_time, wall_ms());
                            }
                        }
                        Output::DeadLetter(source) => metrics.dead_lettered(source),
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
        if let Some((source, partition, offset)) = p.at {
            latest.insert((source, partition), offset);
            since_store += 1;
            if since_store >= STORE_EVERY {
                store(&mut latest);
                since_store = 0;
            }
        }
    }
    store(&mut latest);
    Ok(())
}

fn refresh_gauges(metrics: &Metrics, mirror: &mut Mirror, engine: &Engine) {
    let (mae, rmse, _) = engine.value_errors();
    let c = engine.counters();
    metrics.set_model_state(
        engine.users(),
        engine.model_version(),
        mae,
        engine.segment_sizes().into_iter(),
    );
    metrics.set_quality(
        mirror,
        c.flaps,
        engine.kmeans_repairs(),
        c.labels_matured,
        rmse,
        engine.mean_distance(),
    );
}

/// At most one log line per second for per-message problems.
#[derive(Default)]
struct LogLimiter {
    last: Option<Instant>,
}

impl LogLimiter {
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}
