//! Every topic a deployment reads or writes, and the start-up step that makes sure they exist:
//! the cluster is reached with the configured security, each topic is looked up, the missing
//! ones segstream may create are created, and until all exist (co-partitioned) the instance
//! waits, not ready, saying in the log what is missing or why no broker answers.

use crate::config::{CreateTopics, KafkaConfig, Settings, StateConfig, TopicsConfig};
use crate::kafka::{self, Reachability};
use crate::metrics::Metrics;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Who a topic belongs to, which decides whether segstream creates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Written by the shop's producers.
    Input,
    /// Written by segstream for others (segment changes, dead letters).
    Output,
    /// Written and read by segstream itself (changelog, model, erasure requests).
    State,
}

/// A topic of the deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topic {
    /// Its key under `kafka.topics`.
    pub key: &'static str,
    pub name: String,
    pub role: Role,
    /// Must have the inputs' partition count (a user's events, erasures and checkpoints share a
    /// partition number, so one instance owns them together).
    pub copartitioned: bool,
}

/// The topics in use: inputs and outputs, and the state topics with checkpoints on.
pub fn of(topics: &TopicsConfig, checkpoints: bool) -> Vec<Topic> {
    let topic = |(key, name): (&'static str, &String)| {
        let (role, copartitioned) = match key {
            "clickstream" | "purchases" | "social" => (Role::Input, true),
            "changelog" | "erasure" => (Role::State, true),
            "model" => (Role::State, false),
            _ => (Role::Output, false),
        };
        let used = role != Role::State || checkpoints;
        used.then(|| Topic {
            key,
            name: name.clone(),
            role,
            copartitioned,
        })
    };
    topics.all().into_iter().filter_map(topic).collect()
}

/// Whether `create` lets segstream create a topic of `role`.
fn may_create(create: CreateTopics, role: Role) -> bool {
    match create {
        CreateTopics::None => false,
        CreateTopics::Outputs => role != Role::Input,
        CreateTopics::All => true,
    }
}

/// What the deployment's topics look like on the cluster.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Every topic exists and the co-partitioned ones agree.
    Ready,
    /// Topics to create (with their partition count), and missing ones segstream may not create.
    Missing {
        create: Vec<(Topic, i32)>,
        wait_for: Vec<Topic>,
    },
    /// Co-partitioned topics that disagree: a deployment error no wait can fix.
    NotCopartitioned(String),
}

/// Decides from each topic's partition count (`None`: missing). Pure.
pub(crate) fn plan(kafka: &KafkaConfig, topics: &[Topic], counts: &[Option<i32>]) -> Plan {
    let found: Vec<(&Topic, i32)> = topics
        .iter()
        .zip(counts)
        .filter_map(|(t, c)| c.map(|c| (t, c)))
        .collect();
    let copartitioned: Vec<&(&Topic, i32)> =
        found.iter().filter(|(t, _)| t.copartitioned).collect();
    if copartitioned.iter().any(|(_, n)| *n != copartitioned[0].1) {
        let list = copartitioned
            .iter()
            .map(|(t, n)| format!("{}={n}", t.name))
            .collect::<Vec<_>>()
            .join(", ");
        return Plan::NotCopartitioned(list);
    }
    // The partition count co-partitioned topics must have: what one of them has, or, when
    // segstream may create inputs, `kafka.input_partitions`.
    let known = copartitioned.first().map(|(_, n)| *n);
    let target =
        known.or((kafka.create_topics == CreateTopics::All).then_some(kafka.input_partitions));
    let mut create = Vec::new();
    let mut wait_for = Vec::new();
    for (t, c) in topics.iter().zip(counts) {
        if c.is_some() {
            continue;
        }
        let partitions = if t.copartitioned {
            target
        } else if t.key == "model" {
            // One partition: one order of models.
            Some(1)
        } else {
            Some(target.unwrap_or(kafka.input_partitions))
        };
        match partitions {
            Some(n) if may_create(kafka.create_topics, t.role) => create.push((t.clone(), n)),
            _ => wait_for.push(t.clone()),
        }
    }
    if create.is_empty() && wait_for.is_empty() {
        Plan::Ready
    } else {
        Plan::Missing { create, wait_for }
    }
}

/// What a user should do about a missing topic, for the log.
fn advice(topic: &Topic, create: CreateTopics) -> &'static str {
    match (topic.role, create) {
        (Role::Input, _) => {
            "create it as the producers' topic (as many partitions as the other inputs), or set kafka.create_topics = \"all\""
        }
        (_, CreateTopics::None) => {
            "create it, or set kafka.create_topics = \"outputs\" to let segstream create it"
        }
        _ => "created once the input topics exist",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    #[error("inputs, changelog and erasure topics must have the same number of partitions (co-partitioned); found {0}")]
    NotCopartitioned(String),
    #[error("kafka client for the topic check: {0}")]
    Client(rdkafka::error::KafkaError),
}

/// Waits until the cluster answers and every topic exists, creating what `kafka.create_topics`
/// allows. Returns `Ok(false)` if `cancel` fired first. Between looks (1 s, doubling to 30 s)
/// the instance is not ready and the log says why, once per look.
pub(crate) async fn prepare(
    settings: &Settings,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> Result<bool, TopicsError> {
    let topics = of(&settings.kafka.topics, settings.state.checkpoints);
    let names: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
    let probe = kafka::Probe::new(&settings.kafka).map_err(TopicsError::Client)?;
    let mut wait = Duration::from_secs(1);
    loop {
        let p = probe.clone();
        let n = names.clone();
        let look = tokio::task::spawn_blocking(move || p.partition_counts(&n));
        let looked = tokio::select! {
            _ = cancel.cancelled() => return Ok(false),
            l = look => l.unwrap_or_else(|e| Err(Reachability::Unreachable(e.to_string()))),
        };
        match looked {
            Err(why) => {
                metrics.set_ready(false);
                error!(
                    brokers = %settings.kafka.brokers,
                    security = %settings.security.describe(),
                    cause = %why,
                    retry_in = ?wait,
                    "Cannot reach the Kafka cluster."
                );
            }
            Ok(counts) => match plan(&settings.kafka, &topics, &counts) {
                Plan::Ready => return Ok(true),
                Plan::NotCopartitioned(found) => return Err(TopicsError::NotCopartitioned(found)),
                Plan::Missing { create, wait_for } => {
                    let mut refused = false;
                    for (t, partitions) in &create {
                        info!(topic = %t.name, partitions, "Creating a missing topic.");
                        let config = topic_config(&settings.state, t);
                        if let Err(e) =
                            kafka::create_topic(&settings.kafka, &t.name, *partitions, &config)
                                .await
                        {
                            // Most often no CREATE permission (ACLs) or a topic policy: say
                            // so and wait, as for a topic segstream may not create.
                            refused = true;
                            metrics.set_ready(false);
                            error!(
                                topic = %t.name,
                                key = %format!("kafka.topics.{}", t.key),
                                error = %e,
                                what_to_do = "create it (with the partition count above), or let segstream create topics (CREATE permission)",
                                retry_in = ?wait,
                                "The cluster refused to create a topic segstream needs."
                            );
                        }
                    }
                    if wait_for.is_empty() && !refused {
                        continue;
                    }
                    metrics.set_ready(false);
                    for t in &wait_for {
                        error!(
                            topic = %t.name,
                            key = %format!("kafka.topics.{}", t.key),
                            what_to_do = advice(t, settings.kafka.create_topics),
                            retry_in = ?wait,
                            "A topic segstream needs does not exist."
                        );
                    }
                }
            },
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(false),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

/// Topic configuration segstream sets on a topic it creates.
fn topic_config(state: &StateConfig, t: &Topic) -> Vec<(&'static str, String)> {
    let retention = match t.key {
        "changelog" => state.changelog_retention,
        "model" => state.model_retention,
        _ => return Vec::new(),
    };
    vec![
        ("cleanup.policy", "delete".to_owned()),
        ("retention.ms", retention.as_millis().to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    fn settings(create: CreateTopics) -> Settings {
        let mut raw = RawConfig::default();
        raw.kafka.create_topics = create;
        raw.validate().unwrap()
    }

    fn names(v: &[Topic]) -> Vec<&str> {
        v.iter().map(|t| t.key).collect()
    }

    #[test]
    fn every_topic_is_listed_once_with_its_role() {
        let s = settings(CreateTopics::Outputs);
        let t = of(&s.kafka.topics, s.state.checkpoints);
        assert_eq!(
            names(&t),
            [
                "clickstream",
                "purchases",
                "social",
                "segment_changes",
                "segment_catalogue",
                "dead_letter",
                "changelog",
                "erasure",
                "model"
            ]
        );
        let mut raw = RawConfig::default();
        raw.state.checkpoints = false;
        let s = raw.validate().unwrap();
        assert_eq!(of(&s.kafka.topics, s.state.checkpoints).len(), 6);
    }

    #[test]
    fn by_default_outputs_and_state_are_created_and_missing_inputs_are_waited_for() {
        let s = settings(CreateTopics::Outputs);
        let t = of(&s.kafka.topics, s.state.checkpoints);
        // Inputs with 4 partitions exist, nothing else.
        let counts = [
            Some(4),
            Some(4),
            Some(4),
            None,
            None,
            None,
            None,
            None,
            None,
        ];
        let Plan::Missing { create, wait_for } = plan(&s.kafka, &t, &counts) else {
            panic!("expected missing topics")
        };
        assert!(wait_for.is_empty());
        let created: Vec<(&str, i32)> = create.iter().map(|(t, n)| (t.key, *n)).collect();
        assert_eq!(
            created,
            [
                ("segment_changes", 4),
                ("segment_catalogue", 4),
                ("dead_letter", 4),
                ("changelog", 4),
                ("erasure", 4),
                ("model", 1)
            ]
        );
        // A missing input is named, never created, and the state topics wait for it only if
        // no input tells their partition count.
        let counts = [
            Some(4),
            None,
            Some(4),
            Some(4),
            Some(4),
            Some(4),
            Some(4),
            Some(4),
            Some(1),
        ];
        assert_eq!(
            plan(&s.kafka, &t, &counts),
            Plan::Missing {
                create: vec![],
                wait_for: vec![t[1].clone()]
            }
        );
        let none = [None; 9];
        let Plan::Missing { create, wait_for } = plan(&s.kafka, &t, &none) else {
            panic!()
        };
        assert_eq!(
            names(&wait_for),
            ["clickstream", "purchases", "social", "changelog", "erasure"]
        );
        assert_eq!(
            create.iter().map(|(t, _)| t.key).collect::<Vec<_>>(),
            [
                "segment_changes",
                "segment_catalogue",
                "dead_letter",
                "model"
            ]
        );
    }

    #[test]
    fn create_none_waits_for_everything_and_all_creates_inputs_too() {
        let counts = [
            Some(3),
            None,
            Some(3),
            None,
            Some(3),
            Some(3),
            Some(3),
            Some(3),
            Some(1),
        ];
        let s = settings(CreateTopics::None);
        let t = of(&s.kafka.topics, s.state.checkpoints);
        let Plan::Missing { create, wait_for } = plan(&s.kafka, &t, &counts) else {
            panic!()
        };
        assert!(create.is_empty());
        assert_eq!(names(&wait_for), ["purchases", "segment_changes"]);
        let s = settings(CreateTopics::All);
        let Plan::Missing { create, wait_for } = plan(&s.kafka, &t, &counts) else {
            panic!()
        };
        assert!(wait_for.is_empty());
        assert_eq!(
            create.iter().map(|(t, n)| (t.key, *n)).collect::<Vec<_>>(),
            [("purchases", 3), ("segment_changes", 3)]
        );
        // With no input at all, `all` uses kafka.input_partitions.
        let Plan::Missing { create, .. } = plan(&s.kafka, &t, &[None; 9]) else {
            panic!()
        };
        assert!(create.iter().take(3).all(|(_, n)| *n == 6));
    }

    #[test]
    fn co_partitioned_topics_that_disagree_are_a_deployment_error() {
        let s = settings(CreateTopics::Outputs);
        let t = of(&s.kafka.topics, s.state.checkpoints);
        let counts = [
            Some(4),
            Some(4),
            Some(4),
            Some(4),
            Some(4),
            Some(4),
            Some(2),
            Some(4),
            Some(1),
        ];
        assert!(matches!(
            plan(&s.kafka, &t, &counts),
            Plan::NotCopartitioned(found) if found.contains("segstream-changelog=2")
        ));
        let all = [
            Some(4),
            Some(4),
            Some(4),
            Some(9),
            Some(1),
            Some(1),
            Some(4),
            Some(4),
            Some(1),
        ];
        assert_eq!(plan(&s.kafka, &t, &all), Plan::Ready);
    }
}
