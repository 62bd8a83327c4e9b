//! Domain types of the input and output events: ids, the topic enum, and the three
//! input event records plus the segment-change record, with the field names of `schemas/`.
//!
//! This module only describes data. It does not decode, validate or do I/O.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A shopper's id as it appears on the wire. Ids of up to 24 bytes are held inline (no heap
/// allocation), so the user map compares a looked-up id in the slot the lookup reads anyway,
/// without following a pointer to another allocation (a cache miss per event at scale).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(compact_str::CompactString);

impl UserId {
    pub fn new(id: &str) -> Self {
        Self(compact_str::CompactString::new(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// User ids are personal data: `Debug` does not print them, so a stray `{:?}` in a log line
/// cannot leak one. Use `as_str` where printing the id is intended.
impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UserId(..)")
    }
}

/// Id of a segment (a k-means centroid). Stable for the life of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SegmentId(pub u32);

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The three input streams. Closed set: adding one is a schema, decoder and feature change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Clickstream,
    Purchases,
    Social,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Clickstream, Source::Purchases, Source::Social];

    /// Low-cardinality name used in metric labels and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Clickstream => "clickstream",
            Source::Purchases => "purchases",
            Source::Social => "social",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClickKind {
    #[default]
    View,
    Search,
    AddToCart,
    RemoveFromCart,
    CheckoutStart,
}

/// `Default` is an empty record, the buffer a decoder fills in place.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClickEvent {
    pub event_id: String,
    pub user_id: String,
    pub event_time: i64,
    pub session_id: String,
    pub kind: ClickKind,
    pub product_id: String,
    pub category: String,
    pub price: f64,
    pub dwell_ms: i64,
    #[serde(default)]
    pub search_text: Option<String>,
    #[serde(default)]
    pub embedding: Option<Vec<f32>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    #[default]
    Placed,
    Cancelled,
    Refunded,
}

/// `Default` is an empty record, the buffer a decoder fills in place.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LineItem {
    pub product_id: String,
    pub category: String,
    pub quantity: i32,
    pub unit_price: f64,
    #[serde(default)]
    pub description: Option<String>,
}

/// `Default` is an empty record, the buffer a decoder fills in place.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PurchaseEvent {
    pub event_id: String,
    pub user_id: String,
    pub event_time: i64,
    pub order_id: String,
    pub status: OrderStatus,
    pub items: Vec<LineItem>,
    pub total: f64,
    pub currency: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SocialAction {
    #[default]
    Like,
    Share,
    Review,
    Comment,
    Follow,
}

/// `Default` is an empty record, the buffer a decoder fills in place.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SocialEvent {
    pub event_id: String,
    pub user_id: String,
    pub event_time: i64,
    pub action: SocialAction,
    #[serde(default)]
    pub target_product: Option<String>,
    #[serde(default)]
    pub target_category: Option<String>,
    #[serde(default)]
    pub rating: Option<i32>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub embedding: Option<Vec<f32>>,
}

/// A decoded, validated input event.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Click(ClickEvent),
    Purchase(PurchaseEvent),
    Social(SocialEvent),
}

impl Event {
    pub fn source(&self) -> Source {
        match self {
            Event::Click(_) => Source::Clickstream,
            Event::Purchase(_) => Source::Purchases,
            Event::Social(_) => Source::Social,
        }
    }

    pub fn user_id(&self) -> &str {
        match self {
            Event::Click(e) => &e.user_id,
            Event::Purchase(e) => &e.user_id,
            Event::Social(e) => &e.user_id,
        }
    }

    pub fn event_id(&self) -> &str {
        match self {
            Event::Click(e) => &e.event_id,
            Event::Purchase(e) => &e.event_id,
            Event::Social(e) => &e.event_id,
        }
    }

    /// Event time in milliseconds since the Unix epoch.
    pub fn event_time(&self) -> i64 {
        match self {
            Event::Click(e) => e.event_time,
            Event::Purchase(e) => e.event_time,
            Event::Social(e) => e.event_time,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeReason {
    FirstAssignment,
    Moved,
    Evicted,
    Erased,
    Updated,
}

impl ChangeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeReason::FirstAssignment => "first_assignment",
            ChangeReason::Moved => "moved",
            ChangeReason::Evicted => "evicted",
            ChangeReason::Erased => "erased",
            ChangeReason::Updated => "updated",
        }
    }
}

/// The output record, field for field `schemas/segment_change.avsc`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentChange {
    pub user_id: String,
    pub previous_segment: Option<i32>,
    pub new_segment: i32,
    pub segment_label: String,
    pub distance: f64,
    pub confidence: f64,
    pub predicted_value: f64,
    pub version: i64,
    pub reason: ChangeReason,
    pub event_time: i64,
    pub emit_time: i64,
    pub model_version: i64,
    #[serde(default)]
    pub action: Option<String>,
    /// P(a purchase within the value horizon); `None` only in records written before it.
    #[serde(default)]
    pub purchase_probability: Option<f64>,
    /// The catalogue version whose wording `segment_label` is (0: none yet).
    #[serde(default)]
    pub catalogue_version: i64,
}

/// A record of the segment catalogue topic, field for field `schemas/segment_catalogue.avsc`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename = "SegmentCatalogueEntry")]
pub struct CatalogueRecord {
    pub segment_id: i32,
    pub catalogue_version: i64,
    pub reason: crate::catalogue::CatalogueReason,
    pub split_from: Option<i32>,
    pub label: String,
    pub action: Option<String>,
    pub share: f64,
    pub mean_predicted_value: f64,
    pub mean_purchase_probability: f64,
    pub centroid: std::collections::BTreeMap<String, f64>,
    pub model_version: i64,
    pub emit_time: i64,
}
