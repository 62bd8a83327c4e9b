//! Configuration: the raw, documented serde structs and their validation into [`Settings`].
//!
//! Layering, lowest first: built-in defaults (the `default_*` functions in `sections.rs`) < the
//! config file (`--config FILE`, TOML) < environment variables `SEGSTREAM__SECTION__KEY` (for
//! example `SEGSTREAM__KAFKA__BROKERS=host:9092`) < command-line flags. The result is validated
//! once into [`Settings`]; nothing else reads configuration, and there is no global config.
//!
//! Rooms: this file holds `RawConfig` and how it is loaded and shown (secrets redacted);
//! `sections` the documented sections with their defaults; `validate` the rules (one
//! `ConfigError` per rule, each section's checks apart) and the checked `Settings`.

mod sections;
#[cfg(test)]
mod tests;
mod validate;

pub use sections::*;
pub use validate::{ConfigError, CoreSettings, Settings};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The whole configuration file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// Kafka connection, topics and client properties.
    pub kafka: KafkaConfig,
    /// How input messages are decoded and validated.
    pub decode: DecodeConfig,
    /// How segment changes are encoded.
    pub output: OutputConfig,
    /// Per-user feature computation.
    pub features: FeatureConfig,
    /// The online models.
    pub model: ModelConfig,
    /// The consume → apply → deliver pipeline.
    pub pipeline: PipelineConfig,
    /// Durable state (checkpoints to the changelog), eviction.
    pub state: StateConfig,
    /// The HTTP endpoint (metrics, health).
    pub http: HttpConfig,
}

/// figment's errors, each once, as `key: what (in where)`.
fn load_errors(e: figment::Error) -> Vec<String> {
    let mut lines: Vec<String> = e
        .into_iter()
        .map(|e| {
            let source = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(src) => format!(" (in {} {src})", m.name),
                    None => format!(" (in {})", m.name),
                })
                .unwrap_or_default();
            match e.path.join(".") {
                key if key.is_empty() => format!("configuration: {}{source}", e.kind),
                key => format!("{key}: {}{source}", e.kind),
            }
        })
        .collect();
    lines.dedup();
    lines
}
impl RawConfig {
    /// Defaults < `file` < `SEGSTREAM__*` environment. CLI flags are merged by the caller with
    /// [`RawConfig::load_with`].
    pub fn load(file: Option<&Path>) -> Result<RawConfig, ConfigError> {
        Self::load_with(file, Figment::new())
    }

    /// Like [`RawConfig::load`], with `overrides` (CLI flags) merged last.
    pub fn load_with(file: Option<&Path>, overrides: Figment) -> Result<RawConfig, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(RawConfig::default()));
        if let Some(file) = file {
            fig = fig.merge(Toml::file_exact(file));
        }
        fig = fig
            .merge(Env::prefixed("SEGSTREAM__").split("__"))
            .merge(overrides);
        fig.extract().map_err(|e| ConfigError::Load(load_errors(e)))
    }

    /// The configuration as JSON (the file's keys and nesting) with secrets replaced by
    /// `"<redacted>"`: `http.token`, and every property whose name has password or secret in it
    /// or ends in token (`sasl.password`, `ssl.key.password`, `sasl.oauthbearer.client.secret`).
    pub fn redacted_json(&self) -> serde_json::Value {
        fn redact(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map.iter_mut() {
                        let k = k.to_ascii_lowercase();
                        let secret =
                            k.contains("password") || k.contains("secret") || k.ends_with("token");
                        if secret && v.is_string() {
                            *v = serde_json::Value::String("<redacted>".into());
                        } else {
                            redact(v);
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
                _ => {}
            }
        }
        let mut v = serde_json::to_value(self).unwrap_or_default();
        redact(&mut v);
        v
    }

    /// [`RawConfig::redacted_json`] as TOML, the file's own format (unset keys left out).
    pub fn redacted_toml(&self) -> String {
        fn drop_nulls(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::Object(map) => {
                    map.retain(|_, v| !v.is_null());
                    map.values_mut().for_each(drop_nulls);
                }
                serde_json::Value::Array(items) => items.iter_mut().for_each(drop_nulls),
                _ => {}
            }
        }
        let mut v = self.redacted_json();
        drop_nulls(&mut v);
        toml::to_string_pretty(&v).unwrap_or_else(|e| format!("# not printable as TOML: {e}\n"))
    }
}
