//! The configuration file's sections: serde structs with documented defaults, and the serde
//! helpers for durations.

use crate::event::Source;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// Consumer group id; all instances of one deployment share it.
    pub group_id: String,
    /// Topic names.
    pub topics: TopicsConfig,
    /// librdkafka properties applied to every client (security, tuning): the escape hatch, e.g.
    /// `"security.protocol" = "SASL_SSL"`. Set after segstream's own properties, so they win.
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only.
    pub consumer_properties: BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    pub producer_properties: BTreeMap<String, String>,
    /// Which missing topics `run` creates at start: `none`, `outputs` (segment changes, dead
    /// letters and segstream's own state topics) or `all` (the inputs too). A missing topic it
    /// may not create is named in the log, and the instance waits, not ready, until it exists.
    pub create_topics: CreateTopics,
    /// Replication factor of the topics segstream creates; -1 takes the broker's
    /// `default.replication.factor`.
    pub replication_factor: i32,
    /// Partitions of input topics created with `create_topics = "all"` when no input exists yet
    /// (otherwise the existing inputs' count).
    pub input_partitions: i32,
}

/// See [`KafkaConfig::create_topics`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreateTopics {
    None,
    Outputs,
    All,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: default_brokers(),
            group_id: "segstream".into(),
            topics: TopicsConfig::default(),
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
            // What segstream writes is its own to create; inputs belong to their producers.
            create_topics: CreateTopics::Outputs,
            replication_factor: -1,
            input_partitions: 6,
        }
    }
}

/// A local single broker, as a developer runs one; production sets this in the file or env.
fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Input: click events.
    pub clickstream: String,
    /// Input: purchase events.
    pub purchases: String,
    /// Input: social events.
    pub social: String,
    /// Output: segment changes (key = user id).
    pub segment_changes: String,
    /// Output: the segment catalogue (key = segment id): a record when a segment is created or
    /// split, reworded, or its centroid moves.
    pub segment_catalogue: String,
    /// Output: messages that could not be used, with headers saying why.
    pub dead_letter: String,
    /// State: per-user checkpoints, one partition per input partition (see `state`).
    pub changelog: String,
    /// State: the trainer instance's models, adopted by the other instances (one partition).
    pub model: String,
    /// Input: erasure requests (key = user id, any value): the right to be forgotten.
    pub erasure: String,
}

impl TopicsConfig {
    /// Topic name of an input source.
    pub fn input(&self, source: Source) -> &str {
        match source {
            Source::Clickstream => &self.clickstream,
            Source::Purchases => &self.purchases,
            Source::Social => &self.social,
        }
    }

    /// The input source a topic name belongs to.
    pub(crate) fn source_of(&self, topic: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|s| self.input(*s) == topic)
    }

    /// Every topic by its key under `kafka.topics`: the inputs, the outputs, then the state
    /// topics. The one list of them; what each is for is `topics.rs`.
    pub fn all(&self) -> [(&'static str, &String); 9] {
        [
            ("clickstream", &self.clickstream),
            ("purchases", &self.purchases),
            ("social", &self.social),
            ("segment_changes", &self.segment_changes),
            ("segment_catalogue", &self.segment_catalogue),
            ("dead_letter", &self.dead_letter),
            ("changelog", &self.changelog),
            ("erasure", &self.erasure),
            ("model", &self.model),
        ]
    }

    /// [`TopicsConfig::all`], to rename them.
    pub(crate) fn all_mut(&mut self) -> [(&'static str, &mut String); 9] {
        [
            ("clickstream", &mut self.clickstream),
            ("purchases", &mut self.purchases),
            ("social", &mut self.social),
            ("segment_changes", &mut self.segment_changes),
            ("segment_catalogue", &mut self.segment_catalogue),
            ("dead_letter", &mut self.dead_letter),
            ("changelog", &mut self.changelog),
            ("erasure", &mut self.erasure),
            ("model", &mut self.model),
        ]
    }
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            clickstream: "clickstream".into(),
            purchases: "purchases".into(),
            social: "social".into(),
            segment_changes: "segment-changes".into(),
            segment_catalogue: "segment-catalogue".into(),
            dead_letter: "segstream-dead-letter".into(),
            changelog: "segstream-changelog".into(),
            model: "segstream-model".into(),
            erasure: "segstream-erasure".into(),
        }
    }
}

/// Wire format of one input topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireFormat {
    /// Avro binary behind the Confluent header: magic byte 0, a 4-byte big-endian schema id.
    Avro,
    /// One JSON object with the schema's field names.
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// Messages larger than this many bytes are dead-lettered unread.
    pub max_message_bytes: usize,
    /// Events stamped further in the future than this (relative to the wall clock) are rejected.
    #[serde(with = "exact_duration")]
    pub max_future_skew: Duration,
    /// Events older than this (relative to the wall clock) are rejected.
    #[serde(with = "exact_duration")]
    pub max_event_age: Duration,
    /// Wire format per input topic.
    pub formats: PerSource<WireFormat>,
    /// Confluent schema-registry id that each topic's writer schema has. A message carrying another
    /// id is dead-lettered as `unknown_schema_id`.
    pub schema_ids: PerSource<u32>,
}

/// One value per input topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerSource<T> {
    pub clickstream: T,
    pub purchases: T,
    pub social: T,
}

impl<T: Copy> PerSource<T> {
    pub fn get(&self, source: Source) -> T {
        match source {
            Source::Clickstream => self.clickstream,
            Source::Purchases => self.purchases,
            Source::Social => self.social,
        }
    }
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            // librdkafka's default message.max.bytes.
            max_message_bytes: 1_000_000,
            // Producers' clocks drift by seconds, not minutes.
            max_future_skew: Duration::from_secs(300),
            // Kafka's default retention is 7 days; a month covers a generous backlog.
            max_event_age: Duration::from_secs(30 * 86_400),
            formats: PerSource {
                clickstream: WireFormat::Avro,
                purchases: WireFormat::Avro,
                social: WireFormat::Avro,
            },
            // Ids a fresh schema registry hands out when the three schemas are registered in order.
            schema_ids: PerSource {
                clickstream: 1,
                purchases: 2,
                social: 3,
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Wire format of segment changes.
    pub format: WireFormat,
    /// Schema id written in the Confluent header of Avro segment changes.
    pub schema_id: u32,
    /// Publish a record (reason `updated`) when a user's action changes without a move. Off
    /// keeps subscribers on a schema without the `updated` symbol reading while they upgrade.
    pub updates: bool,
    /// Schema id written in the Confluent header of Avro catalogue records.
    pub catalogue_schema_id: u32,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            format: WireFormat::Avro,
            schema_id: 4,
            updates: true,
            catalogue_schema_id: 5,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureConfig {
    /// Short, medium and long half-lives of the decayed aggregates, in event time (exactly three).
    /// Behaviour rates are kept at all three; social and text at the medium; purchases, RFM and
    /// category affinity at the long one.
    #[serde(with = "humantime_list")]
    pub half_lives: [Duration; 3],
    /// An event older than the user's latest event by more than this is late.
    #[serde(with = "exact_duration")]
    pub allowed_lateness: Duration,
    /// What happens to a late event: `apply` it (decayed to its time), or `dead_letter` it
    /// (code `too_late`). Either way it is counted.
    pub late_policy: LatePolicy,
    /// Weight of each feature group in the segment distance (0 switches a group off).
    pub weights: GroupWeights,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    Apply,
    DeadLetter,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupWeights {
    pub behaviour: f64,
    pub purchases: f64,
    pub category: f64,
    pub social: f64,
    pub text: f64,
    pub embedding: f64,
}

impl Default for GroupWeights {
    fn default() -> Self {
        // Text buckets and projected embeddings are noisy per user; they inform, not dominate.
        Self {
            behaviour: 1.0,
            purchases: 1.0,
            category: 1.0,
            social: 1.0,
            text: 0.5,
            embedding: 0.5,
        }
    }
}

/// Durations read as humantime strings ("5m", "365days") and written back in the largest unit
/// that divides them exactly ("365days", not humantime's "11months 30days 3h 50m 24s", whose
/// months and years are fractional days).
pub(super) mod exact_duration {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    pub fn format(d: Duration) -> String {
        let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
        if nanos == 0 && secs > 0 {
            if secs == 86_400 {
                return "1day".into();
            }
            for (unit, name) in [(86_400, "days"), (3_600, "h"), (60, "m"), (1, "s")] {
                if secs % unit == 0 {
                    return format!("{}{name}", secs / unit);
                }
            }
        }
        if nanos % 1_000_000 == 0 {
            return format!("{}ms", d.as_millis());
        }
        humantime::format_duration(d).to_string()
    }

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        humantime_serde::deserialize(d)
    }
}

mod humantime_list {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub(crate) fn serialize<S: Serializer>(v: &[Duration; 3], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| super::exact_duration::format(*d)))
    }
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[Duration; 3], D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        let parsed: Result<Vec<Duration>, _> =
            v.iter().map(|s| humantime::parse_duration(s)).collect();
        let parsed = parsed.map_err(serde::de::Error::custom)?;
        <[Duration; 3]>::try_from(parsed)
            .map_err(|_| serde::de::Error::custom("exactly three half-lives: short, medium, long"))
    }
}

impl Default for FeatureConfig {
    fn default() -> Self {
        // A day (today's session), a week (a shopping cycle) and a month (RFM's usual window).
        Self {
            half_lives: [
                Duration::from_secs(86_400),
                Duration::from_secs(7 * 86_400),
                Duration::from_secs(30 * 86_400),
            ],
            // Producers batch and retry for minutes, rarely for an hour.
            allowed_lateness: Duration::from_secs(3_600),
            late_policy: LatePolicy::Apply,
            weights: GroupWeights::default(),
        }
    }
}

/// Maps segments and value tiers to an action tag carried in segment changes. Every condition
/// given must hold; the first matching rule wins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRule {
    /// The tag, e.g. `vip`, `win_back`; `{category}` is replaced by the segment's top category.
    pub tag: String,
    /// A feature of the segment's centroid (a name from docs/features.md, e.g. `recency_days`)...
    #[serde(default)]
    pub feature: Option<String>,
    /// ...whose z-score is at least this...
    #[serde(default)]
    pub min_z: Option<f64>,
    /// ...and at most this.
    #[serde(default)]
    pub max_z: Option<f64>,
    /// The user's predicted value is at least this (a value tier).
    #[serde(default)]
    pub min_user_value: Option<f64>,
}

fn default_actions() -> Vec<ActionRule> {
    let rule = |tag: &str, feature: Option<&str>, min_z, min_user_value| ActionRule {
        tag: tag.into(),
        feature: feature.map(Into::into),
        min_z,
        max_z: None,
        min_user_value,
    };
    vec![
        rule("vip", None, None, Some(500.0)),
        rule("win_back", Some("recency_days"), Some(1.0), None),
        rule("cross_sell:{category}", Some("frequency"), Some(0.5), None),
    ]
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Number of segments (k-means centroids).
    pub k: usize,
    /// Seed of every random choice the models make.
    pub seed: u64,
    /// Distinct users whose vectors are gathered before k-means++ seeds the centroids.
    pub init_users: usize,
    /// Events seen before seeding, so the sampled users' vectors carry some history.
    pub init_events: u64,
    /// Events per k-means mini-batch.
    pub batch_size: usize,
    /// A user moves to a nearer segment only if it is closer than the current one by this
    /// fraction (0.1 = 10 % closer), so users on a border do not flap.
    pub hysteresis: f64,
    /// Base learning rate of the AdaGrad SGD regression.
    pub sgd_learning_rate: f64,
    /// L2 penalty of the SGD regression.
    pub sgd_l2: f64,
    /// Standardised features are clipped to +/- this many standard deviations.
    pub clip_z: f64,
    /// Half-life of the centroids' counts in event time, so segments follow drift.
    #[serde(with = "exact_duration")]
    pub forgetting_half_life: Duration,
    /// A user stays in a segment for at least this many of their events before moving...
    pub min_dwell_events: u32,
    /// ...or at least this long in event time, whichever comes first (so users with few events
    /// can still move, on a sweep).
    #[serde(with = "exact_duration")]
    pub min_dwell: Duration,
    /// A move back to the segment left within this event time counts as flapping.
    #[serde(with = "exact_duration")]
    pub flap_window: Duration,
    /// Every this much event time, all users are swept: labels that matured train the value
    /// model, and idle users are re-assigned to the drifted centroids.
    #[serde(with = "exact_duration")]
    pub sweep_interval: Duration,
    /// Horizon H of the value model: it predicts a user's net spend over the next H.
    #[serde(with = "exact_duration")]
    pub value_horizon: Duration,
    /// Action rules, first match wins.
    pub actions: Vec<ActionRule>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            // Six behaviours marketing teams typically act on; configurable per deployment.
            k: 6,
            seed: 42,
            // Enough users for k-means++ to see every common behaviour before it picks centroids.
            init_users: 400,
            // Ten events per sampled user on average.
            init_events: 4_000,
            // Small batches keep centroids fresh; 64 amortises the update over many events.
            batch_size: 64,
            hysteresis: 0.1,
            // AdaGrad is robust to the base rate; 0.05 converges within a few thousand orders.
            sgd_learning_rate: 0.05,
            sgd_l2: 1e-4,
            // Beyond 5 sigma a value says "extreme" and nothing more.
            clip_z: 5.0,
            // As the medium feature half-life: centroids follow a week-scale change of habits.
            forgetting_half_life: Duration::from_secs(7 * 86_400),
            // Ten events confirm a new behaviour; measured on the personas this keeps flapping
            // under 1 % of changes (3 events: 5 %) at the same adjusted Rand index.
            min_dwell_events: 10,
            // A day: a move back inside the flap window is then impossible by construction.
            min_dwell: Duration::from_secs(86_400),
            flap_window: Duration::from_secs(86_400),
            sweep_interval: Duration::from_secs(3_600),
            // Marketing plans by the month.
            value_horizon: Duration::from_secs(30 * 86_400),
            actions: default_actions(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Messages processed but whose outputs are not yet confirmed delivered; the consumer waits
    /// when this many are in flight (back-pressure).
    pub max_in_flight: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        // About 10 ms of input at 1M events/s: bounds memory and redelivery after a crash.
        Self {
            max_in_flight: 10_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Checkpoint per-user state, models and input offsets to the changelog. Off: state lives
    /// in memory only and input is committed at-least-once (a restart starts from nothing).
    pub checkpoints: bool,
    /// Time between checkpoints; after a crash, input since the last one is read again.
    #[serde(with = "exact_duration")]
    pub checkpoint_interval: Duration,
    /// Every this many checkpoints a partition's checkpoint holds all its users, so restoring
    /// never needs the changelog older than that (retention can delete it).
    pub full_checkpoint_every: u32,
    /// Retention set on the changelog topic when segstream creates it; must be well above
    /// `checkpoint_interval × full_checkpoint_every`.
    #[serde(with = "exact_duration")]
    pub changelog_retention: Duration,
    /// Retention set on the model topic when segstream creates it: a starting instance reads
    /// it to its end for the latest models, so keep it short.
    #[serde(with = "exact_duration")]
    pub model_retention: Duration,
    /// Users without an event for this long (event time) are evicted at the next sweep.
    #[serde(with = "exact_duration")]
    pub ttl: Duration,
    /// At most this many users in memory: beyond it (plus 1 %), the least recently seen are
    /// evicted. Each eviction publishes a change with reason `evicted`.
    pub max_users: usize,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            checkpoints: true,
            // Bounds re-reading after a crash to seconds of input.
            checkpoint_interval: Duration::from_secs(5),
            // A full checkpoint every 10 minutes.
            full_checkpoint_every: 120,
            changelog_retention: Duration::from_secs(86_400),
            // Hundreds of model snapshots: plenty to find the latest, quick to read.
            model_retention: Duration::from_secs(3_600),
            // A year: longer than any half-life's memory of a user.
            ttl: Duration::from_secs(365 * 86_400),
            // About 5 GB of state at ~500 bytes per user.
            max_users: 10_000_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP API, `/metrics`, `/healthz` and `/readyz`. Port 0 picks a free port.
    pub bind: String,
    /// When set, every endpoint but `/metrics`, `/healthz` and `/readyz` requires
    /// `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The deployment's instances (`host:port` of their HTTP endpoint, or a name resolving to
    /// all of them, such as a Kubernetes headless Service): asked about users this instance does
    /// not hold, so any instance answers for any user. Empty: a single instance.
    pub peers: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        // Loopback only by default; 9464 is the port range Prometheus exporters use.
        Self {
            bind: "127.0.0.1:9464".into(),
            token: None,
            peers: Vec::new(),
        }
    }
}
