//! Kafka clients built from [`Settings`]: the consumer (at-least-once offset handling, commits on
//! revoke, or a revoke handed to the pipeline to checkpoint first), the producer, and topic
//! creation. The only module besides `pipeline` that knows rdkafka.

use crate::config::{KafkaConfig, Settings};
use crate::metrics::Metrics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::Duration;
use tracing::{info, warn};

/// Consumer context: counts rebalances, tracks readiness, and tells the pipeline which partitions
/// came and went (with checkpoints) or commits stored offsets before partitions are taken away
/// (without).
pub struct SegContext {
    pub metrics: Metrics,
    /// Assignment changes for the pipeline (with checkpoints: restore and release state).
    pub rebalances: Option<tokio::sync::mpsc::UnboundedSender<RebalanceEvent>>,
}

/// Partition numbers assigned or revoked (all input topics are co-partitioned).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RebalanceEvent {
    Assigned(Vec<i32>),
    /// The partitions stay assigned (paused) until the pipeline has checkpointed them and calls
    /// `unassign()`: the group waits for that before it moves them (librdkafka's
    /// wait-unassign-call state), so their next owner starts exactly where this one stopped.
    Revoked(Vec<i32>),
    /// Already taken away: the users are released without a checkpoint.
    Released(Vec<i32>),
}

fn partitions_of(tpl: &rdkafka::TopicPartitionList) -> Vec<i32> {
    let mut ps: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    ps.sort_unstable();
    ps.dedup();
    ps
}

impl ClientContext for SegContext {
    /// Client-level errors. Losing every broker makes the instance not ready until a message
    /// arrives again (the pipeline marks it ready then).
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.metrics.set_ready(false);
        }
        warn!(error = %error, reason, "Kafka client error.");
    }

    /// librdkafka's statistics (every `statistics.interval.ms`): consumer lag per partition.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1: unknown (not assigned, or no committed position yet); the internal
                // partition -1 is librdkafka's "unassigned" bucket.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics.set_lag(topic, *partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for SegContext {
    /// librdkafka's default, except that with checkpoints an eager revoke is not carried out
    /// here: the pipeline checkpoints the partitions, then unassigns them (the callback runs
    /// inside the pipeline's own `recv()`, where nothing can be written). If the pipeline is
    /// gone (shutting down), the revoke is carried out at once.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let protocol = consumer.rebalance_protocol();
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if let (Some(tx), RebalanceProtocol::Eager) = (&self.rebalances, &protocol) {
                    if tx.send(RebalanceEvent::Revoked(partitions_of(tpl))).is_ok() {
                        self.metrics.rebalance("revoke");
                        self.metrics.set_ready(false);
                        info!(
                            partitions = tpl.count(),
                            "Partitions revoked; checkpointing them before letting go."
                        );
                        return;
                    }
                }
                Rebalance::Revoke(tpl)
            }
            e => Rebalance::Error(KafkaError::Rebalance(e.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        let done = match (err, &protocol) {
            (
                RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS,
                RebalanceProtocol::Cooperative,
            ) => consumer.incremental_assign(tpl),
            (RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, _) => consumer.assign(tpl),
            (_, RebalanceProtocol::Cooperative) => consumer.incremental_unassign(tpl),
            _ => consumer.unassign(),
        };
        if let Err(e) = done {
            warn!(error = %e, "Could not apply the rebalance.");
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.metrics.rebalance("revoke");
            self.metrics.set_ready(false);
            match &self.rebalances {
                // With checkpoints but nobody to checkpoint (shutting down) or a cooperative
                // protocol: the pipeline only lets the users go; their next owner restores the
                // last checkpoint.
                Some(tx) => {
                    info!(partitions = tpl.count(), "Partitions revoked.");
                    let _ = tx.send(RebalanceEvent::Released(partitions_of(tpl)));
                }
                None => {
                    info!(
                        partitions = tpl.count(),
                        "Partitions revoked; committing stored offsets."
                    );
                    commit_sync(consumer, &self.metrics);
                }
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.metrics.rebalance("assign");
                info!(partitions = tpl.count(), "Partitions assigned.");
                match &self.rebalances {
                    // Ready once the pipeline restored them.
                    Some(tx) => {
                        let _ = tx.send(RebalanceEvent::Assigned(partitions_of(tpl)));
                    }
                    None => self.metrics.set_ready(true),
                }
            }
            Rebalance::Error(e) => warn!(error = %e, "Rebalance failed."),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Commits the stored offsets and waits for the broker's answer. "Nothing to commit" is fine.
pub(crate) fn commit_sync<C: ConsumerContext>(consumer: &impl Consumer<C>, metrics: &Metrics) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => {
            metrics.commit_failed();
            warn!(error = %e, "Offset commit failed.");
        }
    }
}

pub(crate) fn apply_properties(cfg: &mut ClientConfig, props: &BTreeMap<String, String>) {
    for (k, v) in props {
        cfg.set(k, v);
    }
}

/// The consumer's configuration: at-least-once (offsets stored by the pipeline only after an
/// event's effects are delivered, then auto-committed), then the pass-through properties.
/// `checkpoints`: offsets are committed from checkpoints (`state.checkpoints`), not automatically.
pub(crate) fn consumer_config(kafka: &KafkaConfig, checkpoints: bool) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group_id)
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        // Measured on Tansu (`bench broker`): with librdkafka's defaults (1 MB per partition
        // per fetch, refetch below 100k queued messages) a bare consumer read ~216 k events/s,
        // bound by fetch round trips; with 10 MB fetches and a 1M-message low mark it reads
        // 1.35-1.39 M/s. Both are caps, not waits (a fetch returns what there is), and the
        // queue stays bounded by `queued.max.messages.kbytes` (64 MB per partition).
        .set("max.partition.fetch.bytes", "10485760")
        .set("queued.min.messages", "1000000");
    if checkpoints {
        // Offsets are committed from checkpoints; the range assignor gives one instance the same
        // partition number of every (co-partitioned) input.
        cfg.set("enable.auto.commit", "false")
            .set("partition.assignment.strategy", "range");
    } else {
        cfg.set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000");
    }
    apply_properties(&mut cfg, &kafka.properties);
    apply_properties(&mut cfg, &kafka.consumer_properties);
    cfg
}

/// The producer's configuration: idempotent (no duplicates from internal retries, per-partition
/// order kept), then the pass-through properties.
pub(crate) fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    apply_properties(&mut cfg, &kafka.properties);
    apply_properties(&mut cfg, &kafka.producer_properties);
    cfg
}

pub fn producer(kafka: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    producer_config(kafka).create()
}

/// Creates the topics that do not exist yet (an existing topic is left as it is).
pub(crate) async fn ensure_topics(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    ensure_topics_with(brokers, properties, topics, partitions, &[]).await
}

/// [`ensure_topics`] with topic configuration (`retention.ms`, ...) for the ones it creates.
/// Replication is the broker's default (`default.replication.factor`).
pub(crate) async fn ensure_topics_with(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topics: &[&str],
    partitions: i32,
    config: &[(&str, &str)],
) -> Result<(), KafkaError> {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            config.iter().fold(
                NewTopic::new(t, partitions, TopicReplication::Fixed(-1)),
                |n, (k, v)| n.set(k, v),
            )
        })
        .collect();
    create_topics(brokers, properties, &new).await
}

/// Creates `new` with an admin client; a topic that already exists is left as it is.
async fn create_topics(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    new: &[NewTopic<'_>],
) -> Result<(), KafkaError> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers);
    apply_properties(&mut cfg, properties);
    let admin: AdminClient<DefaultClientContext> = cfg.create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                warn!(%topic, error = %code, "Could not create topic.");
                return Err(KafkaError::AdminOp(code));
            }
        }
    }
    Ok(())
}

/// Sends a record, waiting while the producer's queue is full (back-pressure, not an error).
pub async fn send(
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

/// Creates one topic (an existing one is left as it is), with `kafka.replication_factor`.
pub(crate) async fn create_topic(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
    config: &[(&str, String)],
) -> Result<(), KafkaError> {
    let replication = TopicReplication::Fixed(kafka.replication_factor);
    let new = config.iter().fold(
        NewTopic::new(topic, partitions, replication),
        |n, (k, v)| n.set(k, v),
    );
    create_topics(&kafka.brokers, &kafka.properties, &[new]).await
}

/// Why no broker answered, from the errors the client reported while it tried.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reachability {
    #[error("authentication failed; check sasl.mechanism, sasl.username and sasl.password ({0})")]
    Authentication(String),
    #[error("TLS handshake failed; check ssl.ca.location (the CA that signed the brokers' certificates) and, for client certificates, ssl.certificate.location and ssl.key.location ({0})")]
    Tls(String),
    #[error("no broker answered: they are down or unreachable, or their listener expects another security.protocol (a TLS listener closes plain-text clients) ({0})")]
    Unreachable(String),
}

/// The last error the probe's client reported (librdkafka reports them as they happen).
#[derive(Default)]
pub struct ProbeContext {
    last: std::sync::Mutex<Option<(Option<RDKafkaErrorCode>, String)>>,
}

impl ProbeContext {
    fn record(&self, code: Option<RDKafkaErrorCode>, reason: &str) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        // "All brokers down" follows the error that says why; keep the why.
        if code != Some(RDKafkaErrorCode::AllBrokersDown) || last.is_none() {
            *last = Some((code, reason.to_owned()));
        }
    }
}

impl ClientContext for ProbeContext {
    /// A connection failure (`FAIL`) is kept for the probe's own error line, which names its
    /// cause; other lines are logged as librdkafka's.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, msg: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if fac == "FAIL" {
            self.record(None, msg);
            return;
        }
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "{fac}: {msg}")
            }
            L::Warning => warn!(target: "librdkafka", "{fac}: {msg}"),
            L::Notice | L::Info => info!(target: "librdkafka", "{fac}: {msg}"),
            L::Debug => tracing::debug!(target: "librdkafka", "{fac}: {msg}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.record(error.rdkafka_error_code(), reason);
    }
}

impl ConsumerContext for ProbeContext {}

/// A metadata client that looks topics up and, when the cluster does not answer, says why.
#[derive(Clone)]
pub struct Probe {
    consumer: std::sync::Arc<BaseConsumer<ProbeContext>>,
}

impl Probe {
    pub fn new(kafka: &KafkaConfig) -> Result<Probe, KafkaError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &kafka.brokers);
        apply_properties(&mut cfg, &kafka.properties);
        let consumer = cfg.create_with_context(ProbeContext::default())?;
        Ok(Probe {
            consumer: std::sync::Arc::new(consumer),
        })
    }

    /// Partition count of each topic (`None`: it does not exist). Blocking.
    pub(crate) fn partition_counts(
        &self,
        topics: &[String],
    ) -> Result<Vec<Option<i32>>, Reachability> {
        let c = &self.consumer;
        topics
            .iter()
            .map(
                |topic| match c.fetch_metadata(Some(topic), Duration::from_secs(10)) {
                    Ok(md) => Ok(match md.topics().first() {
                        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                            Some(t.partitions().len() as i32)
                        }
                        _ => None,
                    }),
                    Err(e) => {
                        // Error events wait in the client's queue: serve them all first.
                        while c.poll(Duration::from_millis(10)).is_some() {}
                        Err(self.why(e))
                    }
                },
            )
            .collect()
    }

    fn why(&self, fetch: KafkaError) -> Reachability {
        let last = self
            .consumer
            .context()
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match last {
            Some((code, reason)) => classify(code, reason),
            None => Reachability::Unreachable(fetch.to_string()),
        }
    }
}

/// The cause of a connection failure, from librdkafka's code or, for its log lines, its words.
fn classify(code: Option<RDKafkaErrorCode>, reason: String) -> Reachability {
    match code {
        Some(RDKafkaErrorCode::Authentication) => Reachability::Authentication(reason),
        Some(RDKafkaErrorCode::SSL) => Reachability::Tls(reason),
        _ if reason.contains("SASL") || reason.contains("uthentication") => {
            Reachability::Authentication(reason)
        }
        _ if reason.contains("SSL") || reason.contains("certificate") => Reachability::Tls(reason),
        _ => Reachability::Unreachable(reason),
    }
}

/// What only this binary's librdkafka can tell about the configuration, without connecting:
/// that it was built with what the security settings need (`builtin.features`), and that it
/// accepts every property of the consumer and the producer (names, values, certificate and key
/// files it can load).
#[derive(Debug, thiserror::Error)]
pub enum ClientCheckError {
    #[error("security {security} needs librdkafka's `{feature}`, which this binary lacks (builtin.features = {builtin})")]
    Feature {
        security: String,
        feature: &'static str,
        builtin: String,
    },
    #[error("kafka.properties.\"{key}\": cannot read `{path}`: {error}")]
    File {
        key: String,
        path: String,
        error: String,
    },
    #[error("kafka: librdkafka refuses the {client}'s configuration: {message}")]
    Refused {
        client: &'static str,
        message: String,
    },
}

/// Swallows the log lines of a client that is built only to be checked.
struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, _: rdkafka::config::RDKafkaLogLevel, _: &str, _: &str) {}
}

impl ConsumerContext for Quiet {}

impl rdkafka::producer::ProducerContext for Quiet {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// librdkafka's `builtin.features` in this binary.
pub(crate) fn builtin_features() -> String {
    ClientConfig::new()
        .create_native_config()
        .and_then(|c| c.get("builtin.features"))
        .unwrap_or_default()
}

/// See [`ClientCheckError`].
pub fn check_clients(s: &Settings) -> Result<(), ClientCheckError> {
    let builtin = builtin_features();
    for feature in s.security.features() {
        if !builtin.split(',').any(|b| b == feature) {
            return Err(ClientCheckError::Feature {
                security: s.security.describe(),
                feature,
                builtin,
            });
        }
    }
    for (key, path) in &s.kafka.properties {
        let is_file = key.starts_with("ssl.") && key.ends_with(".location") && path != "probe";
        if is_file {
            if let Err(e) = std::fs::metadata(path) {
                return Err(ClientCheckError::File {
                    key: key.clone(),
                    path: path.clone(),
                    error: e.to_string(),
                });
            }
        }
    }
    let refused = |client| {
        move |e: KafkaError| ClientCheckError::Refused {
            client,
            message: e.to_string(),
        }
    };
    // Without bootstrap servers the clients never connect.
    let mut consumer = consumer_config(&s.kafka, s.state.checkpoints);
    consumer.remove("bootstrap.servers");
    consumer
        .create_with_context::<_, BaseConsumer<Quiet>>(Quiet)
        .map_err(refused("consumer"))?;
    let mut producer = producer_config(&s.kafka);
    producer.remove("bootstrap.servers");
    producer
        .create_with_context::<_, rdkafka::producer::BaseProducer<Quiet>>(Quiet)
        .map_err(refused("producer"))?;
    Ok(())
}
