//! Validation: every rule a configuration can break (one `ConfigError` variant each, the
//! message naming the key), each section's checks, and the checked `Settings` they give.

use super::*;
use crate::event::Source;
use std::net::SocketAddr;
use std::time::Duration;

/// Why a configuration was refused. One variant per rule; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One line per problem the file or environment has, each naming its key as written.
    #[error("{}", .0.join("\n"))]
    Load(Vec<String>),
    #[error("kafka.brokers: must list host:port entries separated by commas, none of them empty")]
    NoBrokers,
    #[error("http.token: is empty, which would serve the API without authentication; set a token, or remove the key to serve without one")]
    EmptyToken,
    #[error("kafka.group_id: must not be empty")]
    NoGroup,
    #[error("kafka.topics.{0}: must not be empty")]
    EmptyTopic(&'static str),
    #[error("kafka.topics: `{0}` is used for two purposes; every topic must be distinct")]
    DuplicateTopic(String),
    #[error("decode.max_message_bytes: must be at least 64")]
    MessageLimit,
    #[error("features.half_lives: each must be at least one second, in increasing order")]
    HalfLife,
    #[error("features.weights.{0}: must be a finite number >= 0")]
    Weight(&'static str),
    #[error("model.{0}: must be at least one second")]
    Interval(&'static str),
    #[error("model.actions[{0}]: unknown feature `{1}`")]
    ActionFeature(usize, String),
    #[error("model.k: must be between 2 and 256, got {0}")]
    K(usize),
    #[error("model.init_users: must be at least model.k ({k}), got {got}")]
    InitUsers { k: usize, got: usize },
    #[error("model.init_events: must be at least model.init_users ({users}), got {got}")]
    InitEvents { users: usize, got: u64 },
    #[error("model.batch_size: must be at least 1")]
    BatchSize,
    #[error("model.hysteresis: must be in [0, 1), got {0}")]
    Hysteresis(f64),
    #[error("model.{0}: must be a finite number > 0")]
    Positive(&'static str),
    #[error("model.sgd_l2: must be a finite number >= 0")]
    L2,
    #[error("pipeline.max_in_flight: must be at least 1")]
    InFlight,
    #[error("state.{0}: must be at least 1")]
    StateCount(&'static str),
    #[error("state.{0}: must be at least 100ms")]
    StateInterval(&'static str),
    #[error("http.bind: `{0}` is not an address like 127.0.0.1:9464")]
    Bind(String),
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
    #[error("kafka.replication_factor: must be -1 (the broker's default) or at least 1")]
    Replication,
    #[error("kafka.input_partitions: must be at least 1")]
    InputPartitions,
    #[error("http.peers: `{0}` is not host:port")]
    Peer(String),
}

/// Validated configuration. Only built by [`RawConfig::validate`].
#[derive(Clone, Debug)]
pub struct Settings {
    pub kafka: KafkaConfig,
    pub decode: DecodeConfig,
    pub output: OutputConfig,
    pub features: FeatureConfig,
    pub model: ModelConfig,
    pub pipeline: PipelineConfig,
    pub state: StateConfig,
    pub http_bind: SocketAddr,
    pub http_token: Option<String>,
    pub http_peers: Vec<String>,
    /// How every client reaches the cluster (from `kafka.properties`).
    pub security: crate::security::Security,
}

/// The sections the pure core reads (features, models, user state, what to publish): the
/// engine is built from this and never sees brokers, credentials or HTTP.
#[derive(Clone, Copy, Debug)]
pub struct CoreSettings<'a> {
    pub features: &'a FeatureConfig,
    pub model: &'a ModelConfig,
    pub state: &'a StateConfig,
    pub output: &'a OutputConfig,
}

impl<'a> From<&'a Settings> for CoreSettings<'a> {
    fn from(s: &'a Settings) -> Self {
        CoreSettings {
            features: &s.features,
            model: &s.model,
            state: &s.state,
            output: &s.output,
        }
    }
}

impl Settings {
    /// Topic name of an input source.
    pub fn topic(&self, source: Source) -> &str {
        self.kafka.topics.input(source)
    }
}

impl RawConfig {
    /// Every rule this configuration breaks, in the order of the file's sections (empty: valid).
    pub(crate) fn problems(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        kafka_problems(&self.kafka, &mut errors);
        if self.decode.max_message_bytes < 64 {
            errors.push(ConfigError::MessageLimit);
        }
        feature_problems(&self.features, &mut errors);
        model_problems(&self.model, &mut errors);
        if self.pipeline.max_in_flight == 0 {
            errors.push(ConfigError::InFlight);
        }
        state_problems(&self.state, &mut errors);
        http_problems(&self.http, &mut errors);
        errors
    }

    /// Validates into [`Settings`], or the first of [`RawConfig::problems`].
    pub fn validate(self) -> Result<Settings, ConfigError> {
        if let Some(first) = self.problems().into_iter().next() {
            return Err(first);
        }
        let k = &self.kafka;
        let http_bind = self
            .http
            .bind
            .parse()
            .map_err(|_| ConfigError::Bind(self.http.bind.clone()))?;
        let security = crate::security::checked(
            &k.properties,
            &k.consumer_properties,
            &k.producer_properties,
        )?;
        let mut kafka = self.kafka;
        if let Some((key, value)) = crate::security::default_ca(&security, &kafka.properties) {
            kafka.properties.insert(key, value);
        }
        Ok(Settings {
            kafka,
            decode: self.decode,
            output: self.output,
            features: self.features,
            model: self.model,
            pipeline: self.pipeline,
            state: self.state,
            http_bind,
            http_token: self.http.token,
            http_peers: self.http.peers,
            security,
        })
    }
}

/// `kafka`: brokers, group, topics (named, distinct), replication, partitions, security.
fn kafka_problems(k: &KafkaConfig, errors: &mut Vec<ConfigError>) {
    if k.brokers.split(',').any(|b| b.trim().is_empty()) {
        errors.push(ConfigError::NoBrokers);
    }
    if k.group_id.trim().is_empty() {
        errors.push(ConfigError::NoGroup);
    }
    let topics = k.topics.all();
    for (i, (key, name)) in topics.iter().enumerate() {
        if name.trim().is_empty() {
            errors.push(ConfigError::EmptyTopic(key));
        }
        if topics[..i].iter().any(|(_, other)| other == name) {
            errors.push(ConfigError::DuplicateTopic((*name).clone()));
        }
    }
    if k.replication_factor == 0 || k.replication_factor < -1 {
        errors.push(ConfigError::Replication);
    }
    if k.input_partitions < 1 {
        errors.push(ConfigError::InputPartitions);
    }
    if let Err(e) = crate::security::checked(
        &k.properties,
        &k.consumer_properties,
        &k.producer_properties,
    ) {
        errors.push(e.into());
    }
}

/// `features`: half-lives in order, group weights finite and non-negative.
fn feature_problems(f: &FeatureConfig, errors: &mut Vec<ConfigError>) {
    let h = &f.half_lives;
    if h[0] < Duration::from_secs(1) || h[0] > h[1] || h[1] > h[2] {
        errors.push(ConfigError::HalfLife);
    }
    let w = &f.weights;
    for (key, v) in [
        ("behaviour", w.behaviour),
        ("purchases", w.purchases),
        ("category", w.category),
        ("social", w.social),
        ("text", w.text),
        ("embedding", w.embedding),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            errors.push(ConfigError::Weight(key));
        }
    }
}

/// `model`: k, seeding, learning rates, intervals, action rules naming real features.
fn model_problems(m: &ModelConfig, errors: &mut Vec<ConfigError>) {
    if !(2..=256).contains(&m.k) {
        errors.push(ConfigError::K(m.k));
    }
    if m.init_users < m.k {
        errors.push(ConfigError::InitUsers {
            k: m.k,
            got: m.init_users,
        });
    }
    if m.init_events < m.init_users as u64 {
        errors.push(ConfigError::InitEvents {
            users: m.init_users,
            got: m.init_events,
        });
    }
    if m.batch_size == 0 {
        errors.push(ConfigError::BatchSize);
    }
    if !(0.0..1.0).contains(&m.hysteresis) {
        errors.push(ConfigError::Hysteresis(m.hysteresis));
    }
    for (key, v) in [
        ("sgd_learning_rate", m.sgd_learning_rate),
        ("clip_z", m.clip_z),
    ] {
        if !(v.is_finite() && v > 0.0) {
            errors.push(ConfigError::Positive(key));
        }
    }
    if !(m.sgd_l2.is_finite() && m.sgd_l2 >= 0.0) {
        errors.push(ConfigError::L2);
    }
    for (key, d) in [
        ("forgetting_half_life", m.forgetting_half_life),
        ("sweep_interval", m.sweep_interval),
        ("value_horizon", m.value_horizon),
    ] {
        if d < Duration::from_secs(1) {
            errors.push(ConfigError::Interval(key));
        }
    }
    for (i, rule) in m.actions.iter().enumerate() {
        if let Some(f) = &rule.feature {
            if crate::features::feature_index(f).is_none() {
                errors.push(ConfigError::ActionFeature(i, f.clone()));
            }
        }
    }
}

/// `state`: counts and intervals.
fn state_problems(st: &StateConfig, errors: &mut Vec<ConfigError>) {
    if st.full_checkpoint_every == 0 {
        errors.push(ConfigError::StateCount("full_checkpoint_every"));
    }
    if st.max_users == 0 {
        errors.push(ConfigError::StateCount("max_users"));
    }
    for (key, d) in [
        ("checkpoint_interval", st.checkpoint_interval),
        ("changelog_retention", st.changelog_retention),
        ("model_retention", st.model_retention),
        ("ttl", st.ttl),
    ] {
        if d < Duration::from_millis(100) {
            errors.push(ConfigError::StateInterval(key));
        }
    }
}

/// `http`: a non-empty token if set, the bind address, peers as host:port.
fn http_problems(h: &HttpConfig, errors: &mut Vec<ConfigError>) {
    if h.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        errors.push(ConfigError::EmptyToken);
    }
    if h.bind.parse::<SocketAddr>().is_err() {
        errors.push(ConfigError::Bind(h.bind.clone()));
    }
    for peer in &h.peers {
        let port = peer
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        if !matches!(port, Some((host, Ok(_))) if !host.trim().is_empty()) {
            errors.push(ConfigError::Peer(peer.clone()));
        }
    }
}
