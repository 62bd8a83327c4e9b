//! segstream: real-time user segmentation over Kafka. See ARCHITECTURE.md for the map.

pub mod app;
pub mod avro_fast;
pub mod bench;
pub mod changelog;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod decode;
pub mod encode;
pub mod engine;
pub mod event;
pub mod features;
pub mod generate;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod peers;
pub mod pipeline;
pub mod quality;
pub mod replay;
pub mod retail;
pub mod schema;
pub mod security;
pub mod store;
pub mod topics;
