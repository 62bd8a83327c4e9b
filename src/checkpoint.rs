//! Durable state in Kafka: writing checkpoints to the changelog and restoring partitions from it.
//! The record format and the restore rules are the pure [`crate::changelog`]; this module does
//! the Kafka I/O for the pipeline.
//!
//! A checkpoint, for every partition this instance owns: the changed users' records (or all of
//! them, for a full checkpoint), the engine's models and counters, then the marker with the next
//! input offsets. It waits until every output of the input before it is delivered (so a restore
//! never skips an undelivered change or dead letter), and until its own records are
//! acknowledged; only then are the same offsets committed to the consumer group, for lag
//! monitoring and tools. The markers, not the group's commits, are the truth on restore.

use crate::changelog::{
    encode_marker, encode_user, Marker, Restored, Restorer, EPOCH_HEADER, KIND_GLOBAL, KIND_HEADER,
    KIND_MARKER, KIND_USER, MARKER_KEY,
};
use crate::config::KafkaConfig;
use crate::engine::{Engine, UserRecord};
use crate::features::LAYOUT_VERSION;
use crate::kafka::{apply_properties, send};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tracing::{debug, info};

/// Key of the record carrying the engine's models and counters.
pub const GLOBAL_KEY: &[u8] = b"segstream.global";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("changelog partition {partition}: {error}")]
    Changelog {
        partition: i32,
        error: crate::changelog::ChangelogError,
    },
    #[error("changelog partition {0}: no end of partition within {1:?}")]
    Stalled(i32, Duration),
    #[error("restore task failed: {0}")]
    Task(String),
    #[error("an output before the checkpoint could not be delivered")]
    OutputFailed,
}

impl CheckpointError {
    /// Low-cardinality code for metrics and logs.
    pub fn code(&self) -> &'static str {
        match self {
            CheckpointError::Kafka(_) => "kafka",
            CheckpointError::Changelog { error, .. } => error.code(),
            CheckpointError::Stalled(..) => "stalled",
            CheckpointError::Task(_) => "task",
            CheckpointError::OutputFailed => "output_failed",
        }
    }
}

/// This instance's chain on one changelog partition it owns.
#[derive(Clone, Debug)]
pub struct Owned {
    pub epoch: u64,
    pub seq: u64,
    /// Checkpoints since the last full one; the first after a restore is full.
    pub since_full: Option<u32>,
    /// The input offsets the restored state is as of (role name → next offset).
    pub restored_offsets: BTreeMap<String, i64>,
}

impl Owned {
    pub(crate) fn from_restored(r: &Restored) -> Self {
        Self {
            epoch: r.max_epoch + 1,
            seq: 0,
            since_full: None,
            restored_offsets: r
                .marker
                .as_ref()
                .map(|m| m.offsets.clone())
                .unwrap_or_default(),
        }
    }
}

/// Context of the readers of the changelog and the model topic: reaching the end of the
/// partition is the point, not an error (librdkafka's default context logs it at ERROR).
pub struct EndOfLog;

impl rdkafka::ClientContext for EndOfLog {
    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka reports it as a partition error or as a global one, by where it is noticed.
        let eof = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if eof {
            debug!(error = %error, "End of partition.");
        } else {
            tracing::warn!(error = %error, reason, "Changelog or model reader error.");
        }
    }
}

impl ConsumerContext for EndOfLog {}

/// Reads changelog partition `partition` from its start to its end (blocking; run it off the
/// async workers) and restores it by the changelog's rules.
pub fn restore_partition(
    kafka: &KafkaConfig,
    partition: i32,
) -> Result<(Restored, Option<Vec<u8>>), CheckpointError> {
    // A stalled read (broker gone) fails the restore rather than serving partial state.
    const IDLE: Duration = Duration::from_secs(60);
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.brokers)
        .set("group.id", format!("{}-restore", kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // The end of the log is known only from a fetch that finds nothing more, which the
        // broker holds for up to this long (librdkafka's default: 500 ms).
        .set("fetch.wait.max.ms", "20")
        .set("fetch.max.bytes", "4194304")
        .set("max.partition.fetch.bytes", "4194304");
    apply_properties(&mut cfg, &kafka.properties);
    let consumer: BaseConsumer<EndOfLog> = cfg.create_with_context(EndOfLog)?;
    assign_from_start(&consumer, &kafka.topics.changelog, partition)?;
    let mut restorer = Restorer::default();
    let mut globals: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut global = None;
    let mut last = Instant::now();
    let started = Instant::now();
    let fail = |error| CheckpointError::Changelog { partition, error };
    loop {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            if last.elapsed() > IDLE {
                return Err(CheckpointError::Stalled(partition, IDLE));
            }
            continue;
        };
        last = Instant::now();
        let msg = match msg {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(_)) => break,
            Err(e) => {
                debug!(error = %e, "Changelog read error; retrying.");
                continue;
            }
        };
        let (mut kind, mut epoch) = (None, 0);
        if let Some(h) = msg.headers() {
            for h in h.iter() {
                match (h.key, h.value) {
                    (KIND_HEADER, Some(v)) => kind = Some(v.to_vec()),
                    (EPOCH_HEADER, Some(v)) => {
                        epoch = std::str::from_utf8(v)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0)
                    }
                    _ => {}
                }
            }
        }
        match kind
            .as_deref()
            .map(|k| std::str::from_utf8(k).unwrap_or(""))
        {
            Some(KIND_USER) => restorer.user(epoch, msg.key().unwrap_or_default(), msg.payload()),
            Some(KIND_GLOBAL) => {
                globals.insert(epoch, msg.payload().unwrap_or_default().to_vec());
            }
            Some(KIND_MARKER) => {
                let accepted = restorer
                    .marker(msg.payload().unwrap_or_default())
                    .map_err(fail)?;
                let pending_global = globals.remove(&epoch);
                if accepted {
                    global = pending_global.or(global);
                }
            }
            _ => debug!(
                offset = msg.offset(),
                "Changelog record of unknown kind ignored."
            ),
        }
    }
    let read_seconds = started.elapsed().as_secs_f64();
    let restored = restorer.finish();
    info!(
        partition,
        read_seconds,
        seconds = started.elapsed().as_secs_f64(),
        users = restored.users.len(),
        records = restored.stats.records,
        markers = restored.stats.markers,
        rejected_markers = restored.stats.rejected_markers,
        discarded_records = restored.stats.discarded_records,
        "Restored a changelog partition."
    );
    Ok((restored, global))
}

/// What one checkpoint wrote.
#[derive(Clone, Debug, Default)]
pub struct Written {
    pub partitions: usize,
    pub full: usize,
    pub records: usize,
    pub bytes: usize,
    /// (partition, epoch, full) of each partition checkpointed: their chains advance.
    advanced: Vec<(i32, u64, bool)>,
}

/// One partition's part of a checkpoint.
struct PartitionPart {
    partition: i32,
    records: Vec<UserRecord>,
    marker: Marker,
}

/// A checkpoint taken from the engine at one instant: everything to write, so that writing can
/// overlap further processing. Its offsets are those of that instant.
pub struct Snapshot {
    parts: Vec<PartitionPart>,
    global: Vec<u8>,
    /// The models, when this instance trains them (published after the checkpoint).
    pub models: Option<Vec<u8>>,
    /// Input offsets to commit to the group once written: (topic role, partition, next offset).
    pub offsets: Vec<(&'static str, i32, i64)>,
    pub taken_ms: i64,
}

/// Takes a checkpoint of every partition in `owned` from the engine (clearing its change
/// marks). `offsets` gives the next input offset per (role, partition) consumed since the
/// restore. A partition's checkpoint is full every `state.full_checkpoint_every`-th time, and the
/// first time after its restore.
pub fn take(
    full_every: u32,
    engine: &mut Engine,
    owned: &BTreeMap<i32, Owned>,
    offsets: &HashMap<(&'static str, i32), i64>,
    now_ms: i64,
) -> Snapshot {
    let every = full_every;
    let full: Vec<i32> = owned
        .iter()
        .filter(|(_, o)| o.since_full.is_none_or(|n| n + 1 >= every))
        .map(|(p, _)| *p)
        .collect();
    let mut records = engine.checkpoint(&full);
    let parts = owned
        .iter()
        .map(|(&partition, o)| {
            let records = records.remove(&partition).unwrap_or_default();
            let mut marker_offsets = o.restored_offsets.clone();
            for ((role, p), next) in offsets {
                if *p == partition {
                    marker_offsets.insert((*role).to_owned(), *next);
                }
            }
            let marker = Marker {
                epoch: o.epoch,
                seq: o.seq,
                full: full.contains(&partition),
                records: records.len() as u64,
                offsets: marker_offsets,
                layout_version: LAYOUT_VERSION,
                written_ms: now_ms,
            };
            PartitionPart {
                partition,
                records,
                marker,
            }
        })
        .collect();
    Snapshot {
        parts,
        global: engine.export_global(),
        models: engine.is_trainer().then(|| engine.export_models()),
        offsets: offsets
            .iter()
            .filter(|((_, p), _)| owned.contains_key(p))
            .map(|((role, p), next)| (*role, *p, *next))
            .collect(),
        taken_ms: now_ms,
    }
}

/// Writes a checkpoint and waits for the broker to acknowledge all of it. Each partition's
/// records go first, then the engine's global state, then the marker that makes them count.
pub async fn write(
    kafka: &KafkaConfig,
    producer: &FutureProducer,
    snapshot: &Snapshot,
) -> Result<Written, CheckpointError> {
    let topic = kafka.topics.changelog.as_str();
    let mut deliveries = Vec::new();
    let mut written = Written::default();
    for part in &snapshot.parts {
        let partition = part.partition;
        let epoch = part.marker.epoch.to_string();
        let headers = |kind: &'static str| {
            OwnedHeaders::new()
                .insert(Header {
                    key: KIND_HEADER,
                    value: Some(kind),
                })
                .insert(Header {
                    key: EPOCH_HEADER,
                    value: Some(epoch.as_str()),
                })
        };
        for (id, value) in &part.records {
            let mut r = FutureRecord::<[u8], [u8]>::to(topic)
                .partition(partition)
                .key(id.as_str().as_bytes())
                .headers(headers(KIND_USER));
            let bytes = value.as_deref().map(encode_user);
            if let Some(v) = &bytes {
                written.bytes += v.len();
                r = r.payload(&v[..]);
            }
            deliveries.push(send(producer, r).await?);
        }
        let global_record = FutureRecord::to(topic)
            .partition(partition)
            .key(GLOBAL_KEY)
            .payload(&snapshot.global[..])
            .headers(headers(KIND_GLOBAL));
        deliveries.push(send(producer, global_record).await?);
        let marker = encode_marker(&part.marker);
        let m = FutureRecord::to(topic)
            .partition(partition)
            .key(MARKER_KEY)
            .payload(&marker[..])
            .headers(headers(KIND_MARKER));
        deliveries.push(send(producer, m).await?);
        written.records += part.records.len();
        written.partitions += 1;
        written.full += usize::from(part.marker.full);
        written
            .advanced
            .push((partition, part.marker.epoch, part.marker.full));
    }
    for d in deliveries {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e.into()),
            Err(_) => return Err(KafkaError::Canceled.into()),
        }
    }
    Ok(written)
}

/// Advances the chains of the partitions a written checkpoint covered (those still owned by the
/// same chain: a partition released and restored meanwhile has a new epoch and is left alone).
pub(crate) fn advance(owned: &mut BTreeMap<i32, Owned>, written: &Written) {
    for (partition, epoch, full) in &written.advanced {
        if let Some(o) = owned.get_mut(partition).filter(|o| o.epoch == *epoch) {
            o.seq += 1;
            o.since_full = if *full {
                Some(0)
            } else {
                o.since_full.map(|n| n + 1)
            };
        }
    }
}

/// Key of model records on the model topic.
pub const MODEL_KEY: &[u8] = b"segstream.models";

/// A consumer of the model topic from its start, reporting its end (`enable.partition.eof`):
/// the pipeline reads it to the end for the latest models before consuming input, then keeps
/// following it. Blocking (it waits for the topic's metadata): run it off the async workers.
pub(crate) fn model_follower(kafka: &KafkaConfig) -> Result<StreamConsumer<EndOfLog>, KafkaError> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.brokers)
        .set("group.id", format!("{}-models", kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    apply_properties(&mut cfg, &kafka.properties);
    let consumer: StreamConsumer<EndOfLog> = cfg.create_with_context(EndOfLog)?;
    assign_from_start(&consumer, &kafka.topics.model, 0)?;
    Ok(consumer)
}

/// Assigns `consumer` to `partition` of `topic` from its start, once it knows the topic's
/// metadata: with the partition's leader known, librdkafka looks up the start offset at once;
/// assigned before its first metadata, it retries that lookup only after a fixed 500 ms.
fn assign_from_start<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: i32,
) -> Result<(), KafkaError> {
    if let Err(e) = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
        debug!(topic, error = %e, "No metadata before reading; librdkafka retries.");
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)?;
    consumer.assign(&tpl)
}

/// Publishes the trainer's models (`Engine::export_models`) to the model topic.
pub(crate) async fn publish_models(
    kafka: &KafkaConfig,
    producer: &FutureProducer,
    bytes: &[u8],
) -> Result<DeliveryFuture, KafkaError> {
    let r = FutureRecord::to(&kafka.topics.model)
        .partition(0)
        .key(MODEL_KEY)
        .payload(bytes);
    send(producer, r).await
}
