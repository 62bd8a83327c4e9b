//! Per-user rolling features in event time, and the fixed-length vector the models see.
//!
//! Every aggregate is an exponentially decayed sum `S(T) = Σ w_i · 2^(-(T - t_i) / h)` held at a
//! reference time `T` = the latest event time seen for the user. An event at `t >= T` first
//! decays the state to `t`; an event at `t < T` (out of order) is added already decayed to `T`.
//! Both give the same sums, so arrival order within the allowed lateness does not change the
//! result (up to floating-point rounding). Pure: no clock, no I/O. Names, formulas and units of
//! every component are in docs/features.md.
//!
//! Rooms: `layout` declares the vector (components, names, groups, which are log-scaled);
//! `params` the decays and the embedding projection's signs; `text` tokens, the sentiment
//! lexicon and the stable hashes; `state` a user's aggregates and how an event updates them;
//! `vector` the vector read from them as of a time.

mod layout;
mod params;
mod state;
#[cfg(test)]
mod tests;
mod text;
mod vector;

pub use layout::*;
pub use params::*;
pub use state::*;
pub use text::*;
