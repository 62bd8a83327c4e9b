//! The streaming pipeline: consume the three input topics, decode, apply to the engine, publish
//! segment changes and dead letters, and store each input offset only after everything the
//! message caused has been delivered (at-least-once).
//!
//! Shape: [`run`] is a loop that takes the next [`Step`] and dispatches it to a named handler.
//! The loop owns the [`Engine`]; every processed message goes, with the delivery futures of its
//! outputs, to the committer task over a bounded channel (back-pressure), which stores offsets
//! in consumption order once delivered. Where offsets live is one choice, [`Offsets`]: stored by
//! the committer and committed by the group, or carried by checkpoints (durable state).
//!
//! Rooms: `ingest` (taking and decoding messages, with look-ahead), `outputs` (what is
//! produced), `committer` (deliveries before offsets), `durable` (checkpoints, restores,
//! rebalances and the trainer role), `log_limiter`.

mod committer;
mod durable;
mod ingest;
mod log_limiter;
mod outputs;

pub use outputs::{
    DLQ_ERROR_CODE, DLQ_ERROR_MESSAGE, DLQ_HEADERS_DROPPED, DLQ_ORIGINAL_KEY_SIZE,
    DLQ_ORIGINAL_VALUE_SIZE, DLQ_SOURCE_OFFSET, DLQ_SOURCE_PARTITION, DLQ_SOURCE_TOPIC,
    DLQ_TRUNCATED,
};

use crate::clock::wall_ms;
use crate::config::{KafkaConfig, Settings, TopicsConfig};
use crate::decode::{Ahead, DecodeError};
use crate::engine::{Engine, Outcome};
use crate::event::{Event, Source};
use crate::http::{ApiCommand, PipelineLink};
use crate::kafka::{commit_sync, consumer_config, producer, RebalanceEvent, SegContext};
use crate::metrics::Metrics;
use committer::{Committer, Pending, Stores};
use durable::{Due, Durable, Links, ERASURE_ROLE};
use ingest::{Ingest, Received};
use log_limiter::LogLimiter;
use outputs::{Outputs, Sent};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::Producer;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::time::Interval;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

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
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("restored models: {0}")]
    Model(String),
    #[error(transparent)]
    Topics(#[from] crate::topics::TopicsError),
    #[error("stopped: an output could not be delivered")]
    Stopped,
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

/// [`run`], serving an HTTP API through `link`: the catalogue is republished with the gauges,
/// and erasure requests are applied between messages.
pub async fn run_with_api(
    settings: &Settings,
    engine: Engine,
    metrics: Metrics,
    cancel: CancellationToken,
    mut link: PipelineLink,
) -> Result<Engine, PipelineError> {
    // Every topic exists and the co-partitioned ones agree before anything is consumed.
    if !crate::topics::prepare(settings, &metrics, &cancel).await? {
        return Ok(engine);
    }
    // Unbounded by necessity: librdkafka's rebalance callback must not block. It carries one
    // event per assignment change.
    let (rebalance_tx, rebalances) = mpsc::unbounded_channel();
    let checkpoints = settings.state.checkpoints;
    let context = SegContext {
        metrics: metrics.clone(),
        rebalances: checkpoints.then_some(rebalance_tx),
    };
    let consumer: Arc<StreamConsumer<SegContext>> =
        Arc::new(consumer_config(&settings.kafka, checkpoints).create_with_context(context)?);
    subscribe(&settings.kafka, checkpoints, &consumer)?;
    let mut pipeline = Pipeline::start(settings, engine, metrics, &consumer, rebalances).await?;
    let result = pipeline.drive(&cancel, &mut link).await;
    pipeline.shutdown(result).await
}

/// Subscribes to the input topics (and, with checkpoints, the erasure topic).
fn subscribe(
    kafka: &KafkaConfig,
    checkpoints: bool,
    consumer: &StreamConsumer<SegContext>,
) -> Result<(), KafkaError> {
    let mut topics: Vec<&str> = Source::ALL.iter().map(|s| kafka.topics.input(*s)).collect();
    if checkpoints {
        topics.push(&kafka.topics.erasure);
    }
    consumer.subscribe(&topics)?;
    info!(topics = ?topics, brokers = %kafka.brokers, checkpoints, "Consuming.");
    Ok(())
}

/// Where input offsets are kept.
enum Offsets<'c> {
    /// The committer stores each offset once its outputs are delivered; the group commits them.
    Group,
    /// Checkpoints carry them in their markers, with the state they produced.
    Checkpoints(Box<Durable<'c>>),
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

/// What the loop does next.
enum Step<'c> {
    Stop,
    Message(Received<'c>, Option<Ahead>),
    Durable(Due),
    Gauges,
    Api(ApiCommand),
}

struct Pipeline<'c> {
    topics: &'c TopicsConfig,
    engine: Engine,
    metrics: Metrics,
    ingest: Ingest<'c>,
    outputs: Outputs<'c>,
    committer: Committer,
    offsets: Offsets<'c>,
    /// Cancelled by the committer when an output cannot be delivered.
    failed: CancellationToken,
    gauges: Interval,
    limiter: LogLimiter,
}

impl<'c> Pipeline<'c> {
    async fn start(
        settings: &'c Settings,
        mut engine: Engine,
        metrics: Metrics,
        consumer: &'c Arc<StreamConsumer<SegContext>>,
        rebalances: mpsc::UnboundedReceiver<RebalanceEvent>,
    ) -> Result<Self, PipelineError> {
        let producer = producer(&settings.kafka)?;
        let failed = CancellationToken::new();
        let checkpoints = settings.state.checkpoints;
        let stores = if checkpoints {
            Stores::Nothing
        } else {
            Stores::Offsets
        };
        let (committer, acked) = Committer::start(
            &settings.kafka.topics,
            settings.pipeline.max_in_flight,
            consumer.clone(),
            metrics.clone(),
            failed.clone(),
            stores,
        );
        let offsets = if checkpoints {
            let links = Links {
                kafka: &settings.kafka,
                state: &settings.state,
                consumer,
                producer: producer.clone(),
                metrics: metrics.clone(),
                acked,
                failed: failed.clone(),
                rebalances,
            };
            Offsets::Checkpoints(Box::new(Durable::open(links, &mut engine).await?))
        } else {
            Offsets::Group
        };
        Ok(Self {
            topics: &settings.kafka.topics,
            engine,
            metrics,
            ingest: Ingest::new(consumer, &settings.kafka.topics, &settings.decode),
            outputs: Outputs::new(&settings.kafka, &settings.output, producer),
            committer,
            offsets,
            failed,
            gauges: tokio::time::interval(Duration::from_millis(500)),
            limiter: LogLimiter::default(),
        })
    }

    /// The consume loop: each step to its handler, until a stop or an error.
    async fn drive(
        &mut self,
        cancel: &CancellationToken,
        link: &mut PipelineLink,
    ) -> Result<(), PipelineError> {
        loop {
            match self.next_step(cancel, link).await {
                Step::Stop => return Ok(()),
                Step::Message(msg, ahead) => self.on_message(msg, ahead).await?,
                Step::Durable(due) => self.on_due(due).await?,
                Step::Gauges => self.on_gauges(link),
                Step::Api(command) => self.on_api(command).await?,
            }
        }
    }

    /// Messages librdkafka already holds are taken directly, up to a burst; then one turn of
    /// the `select!` (cancellation, durable state, gauges, API) comes before the next wait.
    async fn next_step(&mut self, cancel: &CancellationToken, link: &mut PipelineLink) -> Step<'c> {
        if let Some((msg, ahead)) = self.ingest.ready() {
            return Step::Message(msg, ahead);
        }
        let consumer = self.ingest.consumer();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Step::Stop,
            _ = self.failed.cancelled() => Step::Stop,
            due = next_due(&mut self.offsets) => Step::Durable(due),
            _ = self.gauges.tick() => Step::Gauges,
            Some(command) = link.commands.recv() => Step::Api(command),
            msg = consumer.recv() => Step::Message(msg, None),
        }
    }

    async fn on_message(
        &mut self,
        msg: Received<'c>,
        ahead: Option<Ahead>,
    ) -> Result<(), PipelineError> {
        let msg = match msg {
            Ok(m) => {
                // Consuming again after an outage (a gauge store: cheap per message).
                self.metrics.set_ready(true);
                m
            }
            Err(e) => {
                if let Some(more) = self.limiter.allow() {
                    warn!(error = %e, more_since_last = more, "Consumer error; librdkafka retries.");
                }
                return Ok(());
            }
        };
        let Some(input) = self.input_of(&msg, ahead.as_ref()) else {
            return Ok(());
        };
        if let Offsets::Checkpoints(durable) = &mut self.offsets {
            let sent = self.committer.sent();
            if !durable
                .admit(&msg, input.role(), &mut self.engine, sent)
                .await?
            {
                self.metrics.skipped();
                return Ok(());
            }
        }
        match input {
            Input::Event(source) => self.on_event(&msg, source, ahead).await,
            Input::Erasure => self.on_erasure_request(&msg).await,
        }
    }

    /// What `msg` is, by its topic (`None`: not one the pipeline reads).
    fn input_of(&self, msg: &BorrowedMessage<'_>, ahead: Option<&Ahead>) -> Option<Input> {
        match self.ingest.source(msg, ahead) {
            Some(source) => Some(Input::Event(source)),
            None if matches!(self.offsets, Offsets::Checkpoints(_))
                && msg.topic() == self.topics.erasure =>
            {
                Some(Input::Erasure)
            }
            None => None,
        }
    }

    /// Decodes and applies one event and publishes what it changed; an unusable one is
    /// dead-lettered with the reason.
    async fn on_event(
        &mut self,
        msg: &BorrowedMessage<'c>,
        source: Source,
        ahead: Option<Ahead>,
    ) -> Result<(), PipelineError> {
        let started = Instant::now();
        self.metrics.consumed(source);
        let now = wall_ms();
        let decoded = self.ingest.decode(msg, source, ahead, &self.engine, now);
        let (mut deliveries, unusable) = match decoded {
            Ok(event) => match DecodeError::check_key(msg.key(), event.user_id()) {
                Ok(()) => {
                    let at = (source, now, msg.partition());
                    apply(&mut self.engine, &self.outputs, &self.metrics, event, at).await?
                }
                Err(e) => (Vec::new(), Some(e)),
            },
            Err(e) => (Vec::new(), Some(e)),
        };
        if let Some(error) = unusable {
            self.metrics.invalid(source, &error);
            if let Some(more) = self.limiter.allow() {
                warn!(
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    error_code = error.code(),
                    more_since_last = more,
                    "Dead-lettered an unusable message; more_since_last others were since the last such line."
                );
            }
            let letter = self.outputs.dead_letter(msg, &error, Some(source)).await?;
            deliveries.push(letter);
        }
        self.metrics
            .observe_processing(started.elapsed().as_secs_f64());
        if deliveries.is_empty() && matches!(self.offsets, Offsets::Checkpoints(_)) {
            // Nothing to wait for: with checkpoints the committer only tracks outputs (offsets
            // come from the markers), so most messages skip the hand-off.
            return Ok(());
        }
        let at = Some((source, msg.partition(), msg.offset()));
        self.committer.hand_off(Pending { at, deliveries }).await
    }

    /// A request on the erasure topic (key = user id): the user's state leaves memory, the next
    /// checkpoint writes its removal, and an `erased` change is published. A request without a
    /// user id is dead-lettered.
    async fn on_erasure_request(&mut self, msg: &BorrowedMessage<'c>) -> Result<(), PipelineError> {
        let user = msg
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .filter(|u| !u.is_empty());
        let deliveries = match user {
            None => {
                self.metrics.erasure_request("invalid");
                let error = DecodeError::EmptyUserId;
                vec![self.outputs.dead_letter(msg, &error, None).await?]
            }
            Some(user) => match self.engine.erase(user, wall_ms()) {
                Some(change) => {
                    self.metrics.erasure_request("erased");
                    self.metrics.erased();
                    debug!(user, "Erased a user on request.");
                    vec![self.outputs.change(&change).await?]
                }
                None => {
                    self.metrics.erasure_request("unknown");
                    Vec::new()
                }
            },
        };
        let pending = Pending {
            at: None,
            deliveries,
        };
        self.committer.hand_off(pending).await
    }

    /// An erasure asked for over HTTP: answered once it is durable (with checkpoints, once a
    /// checkpoint carries the removal).
    async fn on_api(&mut self, command: ApiCommand) -> Result<(), PipelineError> {
        let ApiCommand::Erase { user, reply } = command;
        let change = self.engine.erase(&user, wall_ms());
        let known = change.is_some();
        let mut deliveries = Vec::new();
        if let Some(change) = change {
            self.metrics.erased();
            deliveries.push(self.outputs.change(&change).await?);
        }
        let pending = Pending {
            at: None,
            deliveries,
        };
        self.committer.hand_off(pending).await?;
        if let (true, Offsets::Checkpoints(durable)) = (known, &mut self.offsets) {
            let sent = self.committer.sent();
            durable
                .now(&mut self.engine, sent, CommitMode::Async)
                .await?;
        }
        let _ = reply.send(known);
        Ok(())
    }

    async fn on_due(&mut self, due: Due) -> Result<(), PipelineError> {
        match &mut self.offsets {
            Offsets::Checkpoints(durable) => {
                let sent = self.committer.sent();
                durable.handle(due, &mut self.engine, sent).await
            }
            Offsets::Group => Ok(()),
        }
    }

    fn on_gauges(&self, link: &PipelineLink) {
        refresh_gauges(&self.metrics, &self.engine);
        link.publish(&self.engine, wall_ms());
    }

    /// Ordered shutdown: stop consuming, drain deliveries (storing their offsets), write a last
    /// checkpoint, flush the producer, then commit synchronously. A message taken ahead but not
    /// processed is in no marker and no stored offset: it is read again after a restart.
    async fn shutdown(self, result: Result<(), PipelineError>) -> Result<Engine, PipelineError> {
        let Pipeline {
            mut engine,
            metrics,
            mut ingest,
            outputs,
            committer,
            mut offsets,
            ..
        } = self;
        ingest.stop();
        metrics.set_ready(false);
        let sent = committer.sent();
        // The committer says why it stopped better than the loop that found it stopped.
        let mut result = match (result, committer.close().await) {
            (Ok(()) | Err(PipelineError::Stopped), Err(e)) => Err(e),
            (result, _) => result,
        };
        if let Offsets::Checkpoints(durable) = &mut offsets {
            let ok = result.is_ok();
            if let Err(e) = durable.last_checkpoint(&mut engine, sent, ok).await {
                result = Err(e);
            }
        }
        if let Err(e) = outputs.producer().flush(Duration::from_secs(30)) {
            warn!(error = %e, "Producer flush did not complete.");
        }
        let consumer = ingest.consumer();
        match offsets {
            Offsets::Group => commit_sync(consumer, &metrics),
            Offsets::Checkpoints(durable) => durable.close(),
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
}

/// The durable state's next due, or never without checkpoints (a `select!` arm).
async fn next_due(offsets: &mut Offsets<'_>) -> Due {
    match offsets {
        Offsets::Checkpoints(durable) => durable.next().await,
        Offsets::Group => std::future::pending().await,
    }
}

/// Applies one usable event (`at`: its source, the time now and its partition) and publishes
/// the changes and catalogue records it caused; the error it is dead-lettered with if it came
/// too late to apply.
async fn apply(
    engine: &mut Engine,
    outputs: &Outputs<'_>,
    metrics: &Metrics,
    event: &Event,
    (source, now, partition): (Source, i64, i32),
) -> Result<(Vec<Sent>, Option<DecodeError>), KafkaError> {
    let applied = engine.apply_in(event, now, partition);
    let mut unusable = None;
    match applied.outcome {
        Outcome::Applied => metrics.applied(source),
        Outcome::Duplicate => metrics.duplicate(source),
        Outcome::Late { applied: true } => {
            metrics.late(source, true);
            metrics.applied(source);
        }
        Outcome::Late { applied: false } => {
            metrics.late(source, false);
            unusable = Some(DecodeError::TooLate);
        }
    }
    let mut deliveries = Vec::with_capacity(applied.changes.len());
    for change in applied.changes {
        deliveries.push(outputs.change(&change).await?);
    }
    // Sweeps and fits (inside this event's step) may have changed the catalogue.
    if engine.has_catalogue() {
        for record in engine.take_catalogue() {
            deliveries.push(outputs.catalogue(&record).await?);
        }
    }
    Ok((deliveries, unusable))
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
