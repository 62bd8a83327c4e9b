//! The online models: a running standardiser, mini-batch k-means (segments) and a two-part value
//! model of AdaGrad SGD regressions (purchase propensity × spend given a purchase). Pure and
//! deterministic: seeded RNG, no clock, no I/O.

use crate::features::{Vector, DIM};
use crate::validation::{Report, Validation};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Running mean and variance per feature, used to standardise vectors; each standardised
/// component is then multiplied by its group's weight. With a half-life, the moments are
/// exponentially weighted in event time (West's weighted Welford: before each observation the
/// weights so far decay by `2^(-Δt / half-life)`), so the scale follows the population as it is
/// now: a year of sweeps otherwise leaves recency and tenure z-scores of everyone near +1.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scaler {
    /// Total weight of the observations (their count without a half-life).
    n: f64,
    mean: Vec<f64>,
    m2: Vec<f64>,
    weights: Vec<f64>,
    clip_z: f64,
    /// Half-life of the observations' weights in event time (ms); 0 keeps every observation
    /// (and a model saved before it had one).
    #[serde(default)]
    half_life_ms: f64,
    /// Latest event time observed (ms), the clock of the decay.
    #[serde(default = "no_time")]
    clock_ms: i64,
    /// Observations, for the refresh schedule of the cached spread.
    #[serde(default)]
    observed: u64,
    /// 1 / standard deviation per feature (0 where there is no spread yet), refreshed on every
    /// observation for the first thousand and every 256th after: the spread then moves slowly,
    /// and 50 square roots per event are a tenth of the engine's time.
    #[serde(skip)]
    inv_sd: Vec<f64>,
}

/// Observations after which the cached spread is refreshed only every [`SD_REFRESH`].
const SD_WARMUP: u64 = 1024;

fn no_time() -> i64 {
    i64::MIN
}
const SD_REFRESH: u64 = 256;

impl Scaler {
    pub fn new(clip_z: f64) -> Self {
        Self::weighted(clip_z, [1.0; DIM])
    }

    pub fn weighted(clip_z: f64, weights: Vector) -> Self {
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
    pub fn with_half_life(mut self, ms: f64) -> Self {
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
    pub fn weight(&self, i: usize) -> f64 {
        self.weights[i]
    }

    /// Welford: `mean += (x - mean) / n; m2 += (x - mean_old) * (x - mean_new)`, after the
    /// weights so far decayed over the event time since the latest observation (`t_ms`; an
    /// earlier time decays nothing).
    pub fn observe(&mut self, x: &Vector, t_ms: i64) {
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

/// Distances from one point to the centroids, nearest first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Nearest {
    pub best: usize,
    pub best_dist: f64,
    pub second_dist: f64,
}

/// Mini-batch k-means with per-centroid counts (Sculley 2010), fitted in three stages:
///
/// 1. A seeded reservoir sample (Algorithm R) of user ids is kept as users first appear.
/// 2. At `fit` milestones the caller passes the sampled users' *current* vectors: the first fit
///    seeds with k-means++ and refines with Lloyd passes; later fits (refits) do the same and
///    match the new centroids to the existing ids, so no segment is renumbered. Refits repair
///    what an unlucky early sample did (for example a backlog read one topic at a time).
/// 3. Between fits, every event moves its nearest centroid by a mini-batch step.
///
/// Centroid ids are row indices and never change meaning.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KMeans {
    k: usize,
    seed: u64,
    init_users: usize,
    batch_size: usize,
    /// Forgetting: counts halve every this many ms of event time.
    forgetting_half_life_ms: f64,
    /// User ids are personal data: the sample is never written to a saved model.
    #[serde(skip)]
    reservoir: Vec<String>,
    #[serde(skip)]
    users_offered: u64,
    #[serde(skip, default = "unseeded_rng")]
    rng: ChaCha8Rng,
    centroids: Option<Array2<f64>>,
    counts: Vec<f64>,
    batch_sums: Array2<f64>,
    batch_counts: Vec<f64>,
    batch_len: usize,
    /// Number of fits and mini-batches applied (the model version).
    updates: u64,
    /// Latest event time seen by `learn` (ms), the clock of forgetting.
    clock_ms: i64,
    /// Dead centroids repaired so far.
    repairs: u64,
    /// Fits and repairs since this value was made or loaded: both move centroids at once, so
    /// whatever was derived from the centroids (segment wording) is stale when this changes.
    #[serde(skip)]
    reshapes: u64,
    /// Repairs not yet taken by [`KMeans::take_splits`]: (repaired id, the id it split).
    #[serde(default)]
    splits: Vec<(u32, u32)>,
}

fn unseeded_rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(0)
}

impl KMeans {
    pub fn new(k: usize, seed: u64, init_users: usize, batch_size: usize) -> Self {
        Self::with_forgetting(k, seed, init_users, batch_size, f64::INFINITY)
    }

    pub fn with_forgetting(
        k: usize,
        seed: u64,
        init_users: usize,
        batch_size: usize,
        forgetting_half_life_ms: f64,
    ) -> Self {
        Self {
            k,
            seed,
            init_users,
            batch_size,
            forgetting_half_life_ms,
            clock_ms: i64::MIN,
            repairs: 0,
            reshapes: 0,
            splits: Vec::new(),
            reservoir: Vec::with_capacity(init_users),
            users_offered: 0,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_5eed),
            centroids: None,
            counts: vec![0.0; k],
            batch_sums: Array2::zeros((k, DIM)),
            batch_counts: vec![0.0; k],
            batch_len: 0,
            updates: 0,
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn is_seeded(&self) -> bool {
        self.centroids.is_some()
    }

    pub fn version(&self) -> u64 {
        self.updates
    }

    pub fn centroids(&self) -> Option<&Array2<f64>> {
        self.centroids.as_ref()
    }

    pub fn repairs(&self) -> u64 {
        self.repairs
    }

    /// Points each centroid has absorbed, decayed by forgetting: its weight in the population.
    pub fn counts(&self) -> &[f64] {
        &self.counts
    }

    /// Counts fits and repairs (see the field); changes whenever centroids jump.
    pub fn reshapes(&self) -> u64 {
        self.reshapes
    }

    /// Restores the reservoir RNG after loading (it is not saved): a deterministic function of
    /// the seed and the model version.
    pub fn after_load(&mut self) {
        self.rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed_5eed ^ self.updates);
    }

    /// Offers a user seen for the first time to the reservoir sample (Algorithm R: the i-th user
    /// replaces a random slot with probability `init_users / i`).
    pub fn offer_user(&mut self, user: &str) {
        self.users_offered += 1;
        if self.reservoir.len() < self.init_users {
            self.reservoir.push(user.to_owned());
        } else {
            let slot = self.rng.random_range(0..self.users_offered);
            if let Some(r) = self.reservoir.get_mut(slot as usize) {
                *r = user.to_owned();
            }
        }
    }

    /// Forgets a user (erasure): they leave the sample.
    pub fn forget_user(&mut self, user: &str) {
        self.reservoir.retain(|u| u != user);
    }

    /// The sampled users, whose current vectors `fit` wants.
    pub fn sample(&self) -> &[String] {
        &self.reservoir
    }

    /// Seeds (first call) or refits (later calls) on standardised `points`. Needs at least `k`.
    ///
    /// Candidates: [`N_INIT`] k-means++ starts, and (on a refit) the current centroids; each is
    /// refined by Lloyd passes and the one with the lowest inertia on `points` wins, so a refit
    /// never makes the model worse on its sample. Fresh centroids are matched to the existing ids.
    pub fn fit(&mut self, points: &[Vector]) {
        if points.len() < self.k {
            return;
        }
        let mut best: Option<(f64, Array2<f64>, Vec<f64>, bool)> = None;
        let mut consider = |c: Array2<f64>, fresh: bool| {
            let (c, sizes, inertia) = lloyd(c, points);
            if best.as_ref().is_none_or(|b| inertia < b.0) {
                best = Some((inertia, c, sizes, fresh));
            }
        };
        for start in 0..N_INIT {
            consider(self.kmeans_pp(points, start), true);
        }
        if let Some(current) = self.centroids.clone() {
            consider(current, false);
        }
        let Some((_, fresh, sizes, is_fresh)) = best else {
            return;
        };
        let (centroids, counts) = match self.centroids.take() {
            Some(old) if is_fresh => match_ids(&old, fresh, &sizes),
            _ => (fresh, sizes),
        };
        self.counts = counts.iter().map(|n| n.max(1.0)).collect();
        self.centroids = Some(centroids);
        self.batch_sums.fill(0.0);
        self.batch_counts.iter_mut().for_each(|b| *b = 0.0);
        self.batch_len = 0;
        self.updates += 1;
        self.reshapes += 1;
    }

    /// Sum of squared distances of `points` to their nearest centroid (0 before seeding).
    pub fn inertia(&self, points: &[Vector]) -> f64 {
        self.centroids.as_ref().map_or(0.0, |c| {
            points
                .iter()
                .map(|p| nearest_in(c, p).best_dist.powi(2))
                .sum()
        })
    }

    /// k-means++ seeding (Arthur & Vassilvitskii 2007) with a seeded RNG per start.
    fn kmeans_pp(&self, points: &[Vector], start: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed
                .wrapping_add(self.updates.wrapping_mul(1_000))
                .wrapping_add(start),
        );
        let mut c = Array2::zeros((self.k, DIM));
        let first = rng.random_range(0..points.len());
        c.row_mut(0)
            .assign(&ndarray::ArrayView1::from(&points[first][..]));
        let mut d2: Vec<f64> = points.iter().map(|p| dist2(p, &points[first])).collect();
        for j in 1..self.k {
            let total: f64 = d2.iter().sum();
            let pick = if total > 0.0 {
                // Sample proportionally to squared distance to the nearest chosen centroid.
                let mut r = rng.random::<f64>() * total;
                d2.iter()
                    .position(|&d| {
                        r -= d;
                        r <= 0.0
                    })
                    .unwrap_or(points.len() - 1)
            } else {
                rng.random_range(0..points.len())
            };
            c.row_mut(j)
                .assign(&ndarray::ArrayView1::from(&points[pick][..]));
            for (d, p) in d2.iter_mut().zip(points) {
                *d = d.min(dist2(p, &points[pick]));
            }
        }
        c
    }

    /// Nearest and second-nearest centroid of `z`. `None` until seeded.
    pub fn nearest(&self, z: &Vector) -> Option<Nearest> {
        self.centroids.as_ref().map(|c| nearest_in(c, z))
    }

    /// Distance from `z` to centroid `j`.
    pub fn distance_to(&self, j: usize, z: &Vector) -> f64 {
        self.centroids.as_ref().map_or(f64::INFINITY, |c| {
            dist2(c.row(j).as_slice().unwrap_or(&[]), z).sqrt()
        })
    }

    /// Adds `z` (seen at event time `t_ms`), assigned to centroid `j`, to the current mini-batch;
    /// applies the batch when full: for each centroid with `b` points summing to `s`,
    /// `n += b; c += (s - b·c) / n`, i.e. every point moves its centroid with learning rate
    /// `1 / n` (Sculley's per-centre rate). Before that, counts are forgotten:
    /// `n *= 2^(-Δt / forgetting_half_life)` over the event time since the last batch, so the
    /// rate never falls below about one over a half-life's worth of points and centroids follow
    /// drift.
    pub fn learn(&mut self, j: usize, z: &Vector, t_ms: i64) {
        let mut row = self.batch_sums.row_mut(j);
        match row.as_slice_mut() {
            // Rows of a standard-layout array are contiguous: a plain slice loop vectorises.
            Some(sums) => sums.iter_mut().zip(z).for_each(|(s, x)| *s += x),
            None => row.iter_mut().zip(z).for_each(|(s, x)| *s += x),
        }
        self.batch_counts[j] += 1.0;
        self.batch_len += 1;
        if self.batch_len >= self.batch_size {
            self.flush(t_ms.max(self.clock_ms));
        }
    }

    fn flush(&mut self, now_ms: i64) {
        let Some(c) = self.centroids.as_mut() else {
            return;
        };
        if self.clock_ms != i64::MIN && self.forgetting_half_life_ms.is_finite() {
            let dt = (now_ms - self.clock_ms).max(0) as f64;
            let f = (-dt * std::f64::consts::LN_2 / self.forgetting_half_life_ms).exp();
            self.counts.iter_mut().for_each(|n| *n *= f);
        }
        self.clock_ms = now_ms;
        for j in 0..self.k {
            let b = self.batch_counts[j];
            if b > 0.0 {
                self.counts[j] += b;
                let n = self.counts[j];
                let sums = self.batch_sums.row(j);
                c.row_mut(j)
                    .iter_mut()
                    .zip(sums)
                    .for_each(|(c, s)| *c += (s - b * *c) / n);
            }
        }
        self.batch_sums.fill(0.0);
        self.batch_counts.iter_mut().for_each(|b| *b = 0.0);
        self.batch_len = 0;
        self.updates += 1;
        self.repair_dead();
    }

    /// A centroid whose count fell below 1 % of the mean (it attracts nobody any more) is moved
    /// next to the largest centroid, slightly perturbed, and takes half its count: the largest
    /// segment is split. No other centroid changes, so no other id changes meaning.
    fn repair_dead(&mut self) {
        let Some(c) = self.centroids.as_mut() else {
            return;
        };
        let mean = self.counts.iter().sum::<f64>() / self.k as f64;
        for dead in 0..self.k {
            if self.counts[dead] >= 0.01 * mean {
                continue;
            }
            let big = (0..self.k)
                .max_by(|&a, &b| self.counts[a].total_cmp(&self.counts[b]))
                .unwrap_or(0);
            if big == dead {
                continue;
            }
            let donor = c.row(big).to_owned();
            for (d, x) in c.row_mut(dead).iter_mut().zip(donor.iter()) {
                *d = x + (self.rng.random::<f64>() - 0.5) * 0.1;
            }
            self.counts[big] /= 2.0;
            self.counts[dead] = self.counts[big];
            self.repairs += 1;
            self.reshapes += 1;
            self.splits.push((dead as u32, big as u32));
        }
    }

    /// The repairs since the last call: (repaired id, the id whose segment it split).
    pub fn take_splits(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.splits)
    }
}

/// k-means++ starts per fit, as scikit-learn's `n_init`.
const N_INIT: u64 = 5;
/// Lloyd passes per candidate.
const LLOYD_PASSES: usize = 20;

/// Lloyd passes from `c`; returns the centroids, cluster sizes and inertia (sum of squared
/// distances to the nearest centroid). An emptied centroid keeps its position.
fn lloyd(mut c: Array2<f64>, points: &[Vector]) -> (Array2<f64>, Vec<f64>, f64) {
    let k = c.nrows();
    let mut counts = vec![0.0; k];
    for _ in 0..LLOYD_PASSES {
        let mut sums = Array2::<f64>::zeros((k, DIM));
        counts = vec![0.0; k];
        for p in points {
            let j = nearest_in(&c, p).best;
            counts[j] += 1.0;
            sums.row_mut(j).iter_mut().zip(p).for_each(|(s, x)| *s += x);
        }
        for j in 0..k {
            if counts[j] > 0.0 {
                let mean = sums.row(j).mapv(|s| s / counts[j]);
                c.row_mut(j).assign(&mean);
            }
        }
    }
    let inertia = points
        .iter()
        .map(|p| nearest_in(&c, p).best_dist.powi(2))
        .sum();
    (c, counts, inertia)
}

/// Gives each fresh centroid the id of an old one, closest pairs first, so ids keep meaning.
fn match_ids(old: &Array2<f64>, fresh: Array2<f64>, sizes: &[f64]) -> (Array2<f64>, Vec<f64>) {
    let k = old.nrows();
    let mut pairs: Vec<(f64, usize, usize)> = Vec::with_capacity(k * k);
    for (i, n) in fresh.outer_iter().enumerate() {
        for (j, o) in old.outer_iter().enumerate() {
            let d = dist2(n.as_slice().unwrap_or(&[]), o.as_slice().unwrap_or(&[]));
            pairs.push((d, i, j));
        }
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut used_new, mut used_old) = (vec![false; k], vec![false; k]);
    let mut matched = Array2::zeros((k, DIM));
    let mut counts = vec![0.0; k];
    for (_, i, j) in pairs {
        if !used_new[i] && !used_old[j] {
            used_new[i] = true;
            used_old[j] = true;
            matched.row_mut(j).assign(&fresh.row(i));
            counts[j] = sizes[i];
        }
    }
    (matched, counts)
}

fn nearest_in(c: &Array2<f64>, z: &[f64]) -> Nearest {
    let mut best = (0, f64::INFINITY);
    let mut second = f64::INFINITY;
    for (j, row) in c.outer_iter().enumerate() {
        let d = dist2(row.as_slice().unwrap_or(&[]), z);
        if d < best.1 {
            second = best.1;
            best = (j, d);
        } else if d < second {
            second = d;
        }
    }
    Nearest {
        best: best.0,
        best_dist: best.1.sqrt(),
        second_dist: second.sqrt(),
    }
}

/// Online linear regression trained by SGD with AdaGrad step sizes and an L2 penalty.
///
/// Per example: `e = w·x + b - y`; `g_i = e·x_i + l2·w_i`; `G_i += g_i²`;
/// `w_i -= lr · g_i / sqrt(G_i + 1e-8)` (the bias the same, without L2).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sgd {
    w: Vec<f64>,
    b: f64,
    g2: Vec<f64>,
    g2_b: f64,
    lr: f64,
    l2: f64,
    trained: u64,
}

impl Sgd {
    pub fn new(lr: f64, l2: f64) -> Self {
        Self {
            w: vec![0.0; DIM],
            b: 0.0,
            g2: vec![0.0; DIM],
            g2_b: 0.0,
            lr,
            l2,
            trained: 0,
        }
    }

    pub fn predict(&self, x: &Vector) -> f64 {
        self.b + dot(&self.w, x)
    }

    /// One SGD step towards `y` (the errors that matter are scored by [`ValueModel`], in
    /// currency, before its regressions learn).
    pub fn train(&mut self, x: &Vector, y: f64) {
        let e = self.predict(x) - y;
        self.step(x, e);
    }

    /// One AdaGrad step for the error `e` of a prediction for `x` (the gradient of squared
    /// error for [`Sgd::train`]; of log loss, `σ(·) - y`, for a logistic use).
    fn step(&mut self, x: &Vector, e: f64) {
        self.trained += 1;
        for i in 0..DIM {
            let g = e * x[i] + self.l2 * self.w[i];
            self.g2[i] += g * g;
            self.w[i] -= self.lr * g / (self.g2[i] + 1e-8).sqrt();
        }
        self.g2_b += e * e;
        self.b -= self.lr * e / (self.g2_b + 1e-8).sqrt();
    }

    pub fn examples(&self) -> u64 {
        self.trained
    }
}

/// The expected net spend of a user over the value horizon, in currency, as a two-part
/// ("hurdle") model trained online on delayed labels:
///
/// `E[spend] = P(buy) · E[spend | buy]`. `P(buy) = σ(logit(r) + f(x))` is a logistic regression
/// on whether the window had any net spend, offset by the running base rate `r`; `E[spend | buy]
/// = exp(μ(x) + σ²/2)` is the mean of a log-normal whose `μ(x) = m + g(x)` is a linear regression
/// of `ln(spend)` around its running mean `m` over windows with spend, and `σ²` the running
/// variance of its residuals (scored before each step). The offsets make the model calibrated
/// from its first labels (with no signal yet it predicts the population's mean spend) while the
/// AdaGrad regressions `f` and `g` learn what separates users. Regressing `ln(1 + spend)` over all
/// windows and publishing `expm1` of it (what this replaced) gives a geometric mean, far below the
/// mean when most windows are empty: about 0.11× the spend on a held-out cohort.
///
/// Every label is scored before the models learn from it (progressive validation): the sums of
/// predicted and actual spend give the calibration, and the propensity's log loss is kept.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ValueModel {
    buy: Sgd,
    log_spend: Sgd,
    /// Running share of windows with spend, mean of `ln(spend)` and variance of the residuals
    /// (exponential windows of [`MEMORY`] labels after the first ones).
    base_rate: f64,
    mean_log: f64,
    log_var: f64,
    labels: u64,
    buyers: u64,
    predicted_sum: f64,
    actual_sum: f64,
    abs_err_sum: f64,
    sq_err_sum: f64,
    log_loss_sum: f64,
    /// AUC, Pearson, Gini and deciles of the same progressive scores.
    #[serde(default)]
    validation: Validation,
}

/// Labels, and labels with spend, after which the model alone gives the value.
const WARM_LABELS: f64 = 1_000.0;
const WARM_BUYERS: f64 = 100.0;
/// Labels the running base rate, mean and variance remember (plain means before that many).
const MEMORY: f64 = 5_000.0;
/// Largest `ln(spend)` and residual variance believed: spends beyond e^25 are not currency, and
/// a variance past 4 (a factor e^2 from the correction alone) is a model still learning.
const MAX_LOG_SPEND: f64 = 25.0;
const MAX_LOG_VAR: f64 = 4.0;

fn running(mean: &mut f64, x: f64, n: u64) {
    *mean += (x - *mean) * (1.0 / n as f64).max(1.0 / MEMORY);
}

impl ValueModel {
    pub fn new(lr: f64, l2: f64) -> Self {
        Self {
            buy: Sgd::new(lr, l2),
            log_spend: Sgd::new(lr, l2),
            base_rate: 0.0,
            mean_log: 0.0,
            log_var: 0.0,
            labels: 0,
            buyers: 0,
            predicted_sum: 0.0,
            actual_sum: 0.0,
            abs_err_sum: 0.0,
            sq_err_sum: 0.0,
            log_loss_sum: 0.0,
            validation: Validation::default(),
        }
    }

    fn logit_offset(&self) -> f64 {
        let r = self.base_rate.clamp(1e-4, 1.0 - 1e-4);
        (r / (1.0 - r)).ln()
    }

    /// P(any net spend within the horizon); 0 before the first label.
    pub fn purchase_probability(&self, x: &Vector) -> f64 {
        if self.labels == 0 {
            return 0.0;
        }
        let z = (self.logit_offset() + self.buy.predict(x)).clamp(-35.0, 35.0);
        1.0 / (1.0 + (-z).exp())
    }

    /// Expected spend given a purchase: the log-normal mean `exp(μ + σ²/2)`.
    pub fn spend_if_buying(&self, x: &Vector) -> f64 {
        if self.buyers == 0 {
            return 0.0;
        }
        let mu = (self.mean_log + self.log_spend.predict(x)).min(MAX_LOG_SPEND);
        (mu + self.log_var.min(MAX_LOG_VAR) / 2.0).exp()
    }

    /// Expected net spend over the horizon, in currency.
    pub fn predict(&self, x: &Vector) -> f64 {
        self.purchase_probability(x) * self.spend_if_buying(x)
    }

    /// Scores the prediction for `x` against the label `spend` (net spend in the window; a
    /// negative one counts as none), then learns from it.
    pub fn train(&mut self, x: &Vector, spend: f64) {
        let spend = if spend.is_finite() {
            spend.max(0.0)
        } else {
            0.0
        };
        let bought = spend > 0.0;
        let predicted = self.predict(x);
        if self.labels > 0 {
            let p = self.purchase_probability(x).clamp(1e-6, 1.0 - 1e-6);
            self.log_loss_sum -= if bought { p.ln() } else { (1.0 - p).ln() };
            self.validation.score(p, predicted, spend);
        }
        self.predicted_sum += predicted;
        self.actual_sum += spend;
        self.abs_err_sum += (predicted - spend).abs();
        self.sq_err_sum += (predicted - spend).powi(2);
        let y = if bought { 1.0 } else { 0.0 };
        if self.labels > 0 {
            let e = self.purchase_probability(x) - y;
            self.buy.step(x, e);
        }
        self.labels += 1;
        running(&mut self.base_rate, y, self.labels);
        if bought {
            let y = spend.ln().min(MAX_LOG_SPEND);
            self.buyers += 1;
            if self.buyers > 1 {
                let r = y - self.mean_log - self.log_spend.predict(x);
                running(&mut self.log_var, r * r, self.buyers - 1);
                self.log_spend.train(x, y - self.mean_log);
            }
            running(&mut self.mean_log, y, self.buyers);
        }
    }

    /// How far the model is trusted over the cold-start rule, in [0, 1]: it rises linearly to 1
    /// at [`WARM_LABELS`] labels of which [`WARM_BUYERS`] had spend (the regressions need
    /// examples of both parts before their weights mean more than the offsets).
    pub fn maturity(&self) -> f64 {
        (self.labels as f64 / WARM_LABELS)
            .min(self.buyers as f64 / WARM_BUYERS)
            .min(1.0)
    }

    /// Labels learned from.
    pub fn labels(&self) -> u64 {
        self.labels
    }

    /// Σ predicted ÷ Σ actual over the labels so far, each predicted before it was learned
    /// (1 is calibrated; 0 before any spend was seen).
    pub fn calibration(&self) -> f64 {
        if self.actual_sum > 0.0 {
            self.predicted_sum / self.actual_sum
        } else {
            0.0
        }
    }

    /// Progressive mean absolute and root mean squared error, in currency.
    pub fn errors(&self) -> (f64, f64) {
        let n = self.labels.max(1) as f64;
        (self.abs_err_sum / n, (self.sq_err_sum / n).sqrt())
    }

    /// Progressive AUC, Pearson, normalised Gini and deciles (labels after the first).
    pub fn validation(&self) -> Report {
        self.validation.report()
    }

    /// Progressive mean log loss of the purchase propensity (ln 2 ≈ 0.69 is a coin).
    pub fn log_loss(&self) -> f64 {
        self.log_loss_sum / self.labels.saturating_sub(1).max(1) as f64
    }
}

impl Default for ValueModel {
    /// The configuration's defaults (a saved model from before this model loads with it).
    fn default() -> Self {
        Self::new(0.05, 1e-4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    fn blob(rng: &mut ChaCha8Rng, centre: f64) -> Vector {
        let mut v = [0.0; DIM];
        v.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = if i < 3 { centre } else { 0.0 } + rng.random::<f64>() * 0.2);
        v
    }

    #[test]
    fn scaler_standardises() {
        let mut s = Scaler::new(5.0);
        for x in [1.0, 2.0, 3.0, 4.0] {
            let mut v = [0.0; DIM];
            v[0] = x;
            s.observe(&v, 0);
        }
        let mut v = [0.0; DIM];
        v[0] = 2.5;
        assert_relative_eq!(s.transform(&v)[0], 0.0, epsilon = 1e-12);
        v[0] = 1e9;
        assert_eq!(s.transform(&v)[0], 5.0);
        assert_eq!(s.transform(&v)[1], 0.0);
    }

    #[test]
    fn with_a_half_life_the_scale_follows_the_population_as_it_is_now() {
        const DAY: i64 = 86_400_000;
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut forgetting = Scaler::new(5.0).with_half_life(7.0 * DAY as f64);
        let mut keeping = Scaler::new(5.0);
        // A year at mean 0, then ten weeks (ten half-lives) at mean 10 (sd 1 throughout), one
        // observation an hour.
        for h in 0..(435 * 24) {
            let t = h * DAY / 24;
            let mut v = [0.0; DIM];
            v[0] = if h < 365 * 24 { 0.0 } else { 10.0 } + rng.random::<f64>() * 3.46 - 1.73;
            forgetting.observe(&v, t);
            keeping.observe(&v, t);
        }
        let mut v = [0.0; DIM];
        v[0] = 10.0;
        let now = forgetting.transform(&v)[0];
        assert!(now.abs() < 0.1, "centred on the present: {now}");
        assert!(keeping.transform(&v)[0] > 2.0, "centred on the year");
        v[0] = 11.0;
        let one_sd = forgetting.transform(&v)[0] - now;
        assert!((0.9..1.1).contains(&one_sd), "the present spread: {one_sd}");
        let stale = keeping.transform(&v)[0] - keeping.transform(&[10.0; DIM])[0];
        assert!(stale < 0.5, "the year's spread: {stale}");
    }

    #[test]
    fn kmeans_finds_separated_blobs_and_keeps_ids() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let scaler = Scaler::new(100.0);
        let mut identity = scaler.clone();
        // A scaler that leaves the data nearly unchanged: mean 0, sd 1.
        for s in [-1.0, 1.0] {
            identity.observe(&[s; DIM], 0);
        }
        let mut km = KMeans::new(3, 7, 30, 8);
        let centres = [0.0, 10.0, 20.0];
        let points: Vec<Vector> = (0..30)
            .map(|i| identity.transform(&blob(&mut rng, centres[i % 3])))
            .collect();
        km.fit(&points);
        assert!(km.is_seeded());
        let ids: Vec<usize> = centres
            .iter()
            .map(|&c| km.nearest(&blob(&mut rng, c)).unwrap().best)
            .collect();
        let mut distinct = ids.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "each blob has its own centroid: {ids:?}");
        for _ in 0..1000 {
            let i = rng.random_range(0..3);
            let z = blob(&mut rng, centres[i]);
            let j = km.nearest(&z).unwrap().best;
            km.learn(j, &z, 0);
        }
        for (i, &c) in centres.iter().enumerate() {
            let z = blob(&mut rng, c);
            let n = km.nearest(&z).unwrap();
            assert_eq!(
                n.best, ids[i],
                "segment ids are stable while centroids move"
            );
            assert!(n.best_dist < 1.0 && n.second_dist > 5.0);
        }
        assert!(km.version() > 0);
        // A refit on fresh data keeps every blob on its id.
        let points: Vec<Vector> = (0..60).map(|i| blob(&mut rng, centres[i % 3])).collect();
        km.fit(&points);
        for (i, &c) in centres.iter().enumerate() {
            assert_eq!(km.nearest(&blob(&mut rng, c)).unwrap().best, ids[i]);
        }
    }

    #[test]
    fn kmeans_is_deterministic_for_a_seed() {
        let run = || {
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let mut s = Scaler::new(5.0);
            let mut km = KMeans::new(4, 11, 50, 4);
            let mut seen = Vec::new();
            for i in 0..200i64 {
                let v = blob(&mut rng, (i % 4) as f64 * 3.0);
                s.observe(&v, 0);
                km.offer_user(&format!("u{i}"));
                seen.push(v);
                if i == 60 {
                    let pts: Vec<Vector> = seen.iter().map(|v| s.transform(v)).collect();
                    km.fit(&pts);
                }
                if km.is_seeded() {
                    let z = s.transform(&v);
                    let j = km.nearest(&z).unwrap().best;
                    km.learn(j, &z, i);
                }
            }
            assert_eq!(km.sample().len(), 50);
            km.centroids().unwrap().clone()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn sgd_learns_a_linear_target() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut sgd = Sgd::new(0.1, 0.0);
        for _ in 0..20_000 {
            let mut x = [0.0; DIM];
            x[0] = rng.random::<f64>() * 2.0 - 1.0;
            x[1] = rng.random::<f64>() * 2.0 - 1.0;
            sgd.train(&x, 3.0 * x[0] - 2.0 * x[1] + 1.0);
        }
        let mut x = [0.0; DIM];
        x[0] = 0.5;
        x[1] = -0.5;
        assert_relative_eq!(sgd.predict(&x), 3.5, epsilon = 0.05);
        assert_eq!(sgd.examples(), 20_000);
    }
}

#[cfg(test)]
mod value_tests {
    use super::*;

    /// Users whose purchase odds follow `x[0]` and whose log-normal spend follows `x[1]`.
    fn population(rng: &mut ChaCha8Rng) -> (Vector, f64) {
        let mut x = [0.0; DIM];
        x[0] = rng.random::<f64>() * 2.0 - 1.0;
        x[1] = rng.random::<f64>() * 2.0 - 1.0;
        let p = 1.0 / (1.0 + (-(-1.5 + 1.5 * x[0])).exp());
        let spend = if rng.random::<f64>() < p {
            let u1: f64 = rng.random::<f64>().max(1e-12);
            let u2: f64 = rng.random();
            let n = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (4.0 + 0.8 * x[1] + 0.7 * n).exp()
        } else {
            0.0
        };
        (x, spend)
    }

    #[test]
    fn the_value_is_calibrated_in_currency_once_trained() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut m = ValueModel::new(0.05, 1e-4);
        for _ in 0..50_000 {
            let (x, y) = population(&mut rng);
            m.train(&x, y);
        }
        let (mut predicted, mut actual, mut buyers_p, mut others_p) = (0.0, 0.0, 0.0, 0.0);
        for _ in 0..20_000 {
            let (x, y) = population(&mut rng);
            predicted += m.predict(&x);
            actual += y;
            if x[0] > 0.5 {
                buyers_p += m.purchase_probability(&x);
            } else if x[0] < -0.5 {
                others_p += m.purchase_probability(&x);
            }
        }
        let ratio = predicted / actual;
        assert!(
            (0.9..=1.1).contains(&ratio),
            "Σ predicted ÷ Σ actual {ratio:.3}"
        );
        assert!(buyers_p > 2.0 * others_p, "propensity follows the odds");
        assert!(
            (0.8..=1.25).contains(&m.calibration()),
            "{}",
            m.calibration()
        );
        assert!(m.log_loss() < std::f64::consts::LN_2, "{}", m.log_loss());
    }

    #[test]
    fn with_no_signal_yet_the_value_is_the_population_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut m = ValueModel::new(0.05, 1e-4);
        assert_eq!(m.predict(&[0.0; DIM]), 0.0);
        let mut total = 0.0;
        for _ in 0..2_000 {
            let (_, y) = population(&mut rng);
            // Features that say nothing: only the offsets can learn.
            m.train(&[0.0; DIM], y);
            total += y;
        }
        let mean = total / 2_000.0;
        let ratio = m.predict(&[0.0; DIM]) / mean;
        assert!((0.8..=1.25).contains(&ratio), "{ratio:.3}");
    }
}

#[cfg(test)]
mod forgetting_tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn at(x: f64) -> Vector {
        [x; DIM]
    }

    fn seeded(half_life_ms: f64) -> KMeans {
        let mut km = KMeans::with_forgetting(2, 1, 10, 1, half_life_ms);
        let pts: Vec<Vector> = (0..10)
            .map(|i| at(if i % 2 == 0 { 0.0 } else { 10.0 }))
            .collect();
        km.fit(&pts);
        km
    }

    #[test]
    fn forgetting_lets_a_centroid_follow_drift() {
        let drift = |half_life: f64| {
            let mut km = seeded(half_life);
            let j = km.nearest(&at(0.0)).unwrap().best;
            // A thousand points at 0, then the population moves to 3 over ten days.
            for i in 0..1_000 {
                km.learn(j, &at(0.0), i);
            }
            for i in 0..240 {
                km.learn(j, &at(3.0), 1_000 + i * HOUR);
            }
            km.centroids().unwrap()[[j, 0]]
        };
        let (with, without) = (drift(24.0 * HOUR as f64), drift(f64::INFINITY));
        assert!(with > 2.5, "with forgetting the centroid follows: {with}");
        assert!(without < 1.0, "without, old points pin it: {without}");
    }

    #[test]
    fn a_dead_centroid_splits_the_largest() {
        let mut km = seeded(HOUR as f64);
        let live = km.nearest(&at(10.0)).unwrap().best;
        let dead = 1 - live;
        // Nobody comes near `dead` for days: its count decays to nothing.
        for i in 0..500 {
            km.learn(live, &at(10.0), i * HOUR / 10);
        }
        assert!(km.repairs() >= 1);
        let c = km.centroids().unwrap();
        assert!(
            (c[[dead, 0]] - 10.0).abs() < 0.2,
            "moved next to the largest: {}",
            c[[dead, 0]]
        );
    }
}
