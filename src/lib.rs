//! segstream: real-time user segmentation over Kafka. See ARCHITECTURE.md for the map.

pub mod config;
pub mod decode;
pub mod encode;
pub mod engine;
pub mod event;
pub mod features;
pub mod model;
pub mod schema;
pub mod store;
