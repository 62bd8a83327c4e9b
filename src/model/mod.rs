//! The online models: a running standardiser, mini-batch k-means (segments) and a two-part value
//! model of AdaGrad SGD regressions (purchase propensity × spend given a purchase). Pure and
//! deterministic: seeded RNG, no clock, no I/O.
//!
//! Rooms: `scaler` (the standardiser), `kmeans` (segments), `value` (the value model and its
//! SGD regressions); the vector arithmetic they share is here.

mod kmeans;
mod scaler;
#[cfg(test)]
mod tests;
mod value;

pub use kmeans::*;
pub use scaler::*;
pub use value::*;

/// Lanes of the partial sums in [`lane_sum`].
const LANES: usize = 8;

/// `Σ term(aᵢ, bᵢ)`, summed in [`LANES`] partial sums: one accumulator summed left to right is a
/// chain the compiler may not reorder, so it cannot use vector registers; eight independent ones
/// it can (nearest-centroid search is most of a model update).
#[inline(always)]
fn lane_sum(a: &[f64], b: &[f64], term: impl Fn(f64, f64) -> f64) -> f64 {
    let ((ca, ta), (cb, tb)) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>());
    let mut acc = [0.0; LANES];
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..LANES {
            acc[l] += term(x[l], y[l]);
        }
    }
    let tail: f64 = ta.iter().zip(tb).map(|(x, y)| term(*x, *y)).sum();
    acc.iter().sum::<f64>() + tail
}

/// Squared Euclidean distance.
fn dist2(a: &[f64], b: &[f64]) -> f64 {
    lane_sum(a, b, |x, y| (x - y) * (x - y))
}

/// Dot product.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    lane_sum(a, b, |x, y| x * y)
}
