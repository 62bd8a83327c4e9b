//! The running standardiser: weighted Welford moments with a half-life, clipped z-scores
//! times group weights.

use crate::features::{Vector, DIM};
use serde::{Deserialize, Serialize};

/// Running mean and variance per feature, used to standardise vectors; each standardised
/// component is then multiplied by its group's weight. With a half-life, the moments are
/// exponentially weighted in event time (West's weighted Welford: before each observation the
/// weights so far decay by `2^(-Δt / half-life)`), so the scale follows the population as it is
/// now: a year of sweeps otherwise leaves recency and tenure z-scores of everyone near +1.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scaler {
    /// Total weight of the observations (their count without a half-life).
    pub(super) n: f64,
    pub(super) mean: Vec<f64>,
    pub(super) m2: Vec<f64>,
    pub(super) weights: Vec<f64>,
    pub(super) clip_z: f64,
    /// Half-life of the observations' weights in event time (ms); 0 keeps every observation
    /// (and a model saved before it had one).
    #[serde(default)]
    pub(super) half_life_ms: f64,
    /// Latest event time observed (ms), the clock of the decay.
    #[serde(default = "no_time")]
    pub(super) clock_ms: i64,
    /// Observations, for the refresh schedule of the cached spread.
    #[serde(default)]
    pub(super) observed: u64,
    /// 1 / standard deviation per feature (0 where there is no spread yet), refreshed on every
    /// observation for the first thousand and every 256th after: the spread then moves slowly,
    /// and 50 square roots per event are a tenth of the engine's time.
    #[serde(skip)]
    pub(super) inv_sd: Vec<f64>,
}

/// Observations after which the cached spread is refreshed only every [`SD_REFRESH`].
pub(super) const SD_WARMUP: u64 = 1024;

pub(super) fn no_time() -> i64 {
    i64::MIN
}
pub(super) const SD_REFRESH: u64 = 256;

impl Scaler {
    pub fn new(clip_z: f64) -> Self {
        Self::weighted(clip_z, [1.0; DIM])
    }

    pub(crate) fn weighted(clip_z: f64, weights: Vector) -> Self {
        Self {
            n: 0.0,
            mean: vec![0.0; DIM],
            m2: vec![0.0; DIM],
            weights: weights.to_vec(),
            clip_z,
            half_life_ms: 0.0,
            clock_ms: i64::MIN,
            observed: 0,
            inv_sd: vec![0.0; DIM],
        }
    }

    /// Weights observations by a half-life of `ms` of event time (0: never forget).
    pub(crate) fn with_half_life(mut self, ms: f64) -> Self {
        self.half_life_ms = ms;
        self
    }

    /// Recomputes the cached spread (also after loading a saved scaler).
    pub fn refresh(&mut self) {
        self.inv_sd.resize(DIM, 0.0);
        for i in 0..DIM {
            let sd = (self.m2[i] / self.n.max(1.0)).sqrt();
            // One observation has no spread (m2 = 0); decay scales m2 and n alike.
            self.inv_sd[i] = if self.n > 0.0 && sd > 1e-9 {
                1.0 / sd
            } else {
                0.0
            };
        }
    }

    /// The unweighted z-score of `x[i]` (for explanations).
    pub fn z(&self, i: usize, x: f64) -> f64 {
        let sd = (self.m2[i] / self.n.max(1.0)).sqrt();
        if self.n <= 0.0 || sd <= 1e-9 {
            0.0
        } else {
            ((x - self.mean[i]) / sd).clamp(-self.clip_z, self.clip_z)
        }
    }

    /// The weight of component `i`.
    pub(crate) fn weight(&self, i: usize) -> f64 {
        self.weights[i]
    }

    /// Welford: `mean += (x - mean) / n; m2 += (x - mean_old) * (x - mean_new)`, after the
    /// weights so far decayed over the event time since the latest observation (`t_ms`; an
    /// earlier time decays nothing).
    pub(crate) fn observe(&mut self, x: &Vector, t_ms: i64) {
        if self.half_life_ms > 0.0 && self.clock_ms != i64::MIN && t_ms > self.clock_ms {
            let dt = (t_ms - self.clock_ms) as f64;
            let f = (-dt * std::f64::consts::LN_2 / self.half_life_ms).exp();
            self.n *= f;
            self.m2.iter_mut().for_each(|m| *m *= f);
        }
        self.clock_ms = self.clock_ms.max(t_ms);
        self.observed += 1;
        self.n += 1.0;
        // One division, not one per feature (a division costs as much as a dozen multiplies).
        let inv_n = 1.0 / self.n;
        // Over slices of a known length: no bounds check per feature, so the loop vectorises.
        let (mean, m2) = (&mut self.mean[..DIM], &mut self.m2[..DIM]);
        for ((mean, m2), x) in mean.iter_mut().zip(m2).zip(x) {
            let d = x - *mean;
            *mean += d * inv_n;
            *m2 += d * (x - *mean);
        }
        if self.observed <= SD_WARMUP || self.observed.is_multiple_of(SD_REFRESH) {
            self.refresh();
        }
    }

    /// `z = clamp((x - mean) / sd, ±clip_z) · weight`; a feature with no spread yet maps to 0.
    pub fn transform(&self, x: &Vector) -> Vector {
        let mut z = [0.0; DIM];
        if self.inv_sd.len() != DIM {
            return z;
        }
        let c = self.clip_z;
        let (mean, inv_sd, weights) =
            (&self.mean[..DIM], &self.inv_sd[..DIM], &self.weights[..DIM]);
        for i in 0..DIM {
            // max/min rather than clamp: the same for finite inputs, and the loop vectorises.
            z[i] = ((x[i] - mean[i]) * inv_sd[i]).max(-c).min(c) * weights[i];
        }
        z
    }
}
