//! Mini-batch k-means with forgetting: a reservoir sample of users, k-means++ fits whose ids
//! follow the old centroids, mini-batch steps, and repair of dead centroids.

use super::dist2;
use crate::features::{Vector, DIM};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

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
    pub(super) k: usize,
    pub(super) seed: u64,
    pub(super) init_users: usize,
    pub(super) batch_size: usize,
    /// Forgetting: counts halve every this many ms of event time.
    pub(super) forgetting_half_life_ms: f64,
    /// User ids are personal data: the sample is never written to a saved model.
    #[serde(skip)]
    pub(super) reservoir: Vec<String>,
    #[serde(skip)]
    pub(super) users_offered: u64,
    #[serde(skip, default = "unseeded_rng")]
    pub(super) rng: ChaCha8Rng,
    pub(super) centroids: Option<Array2<f64>>,
    pub(super) counts: Vec<f64>,
    pub(super) batch_sums: Array2<f64>,
    pub(super) batch_counts: Vec<f64>,
    pub(super) batch_len: usize,
    /// Number of fits and mini-batches applied (the model version).
    pub(super) updates: u64,
    /// Latest event time seen by `learn` (ms), the clock of forgetting.
    pub(super) clock_ms: i64,
    /// Dead centroids repaired so far.
    pub(super) repairs: u64,
    /// Fits and repairs since this value was made or loaded: both move centroids at once, so
    /// whatever was derived from the centroids (segment wording) is stale when this changes.
    #[serde(skip)]
    pub(super) reshapes: u64,
    /// Repairs not yet taken by [`KMeans::take_splits`]: (repaired id, the id it split).
    #[serde(default)]
    pub(super) splits: Vec<(u32, u32)>,
}

pub(super) fn unseeded_rng() -> ChaCha8Rng {
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

    pub(crate) fn repairs(&self) -> u64 {
        self.repairs
    }

    /// Points each centroid has absorbed, decayed by forgetting: its weight in the population.
    pub fn counts(&self) -> &[f64] {
        &self.counts
    }

    /// Counts fits and repairs (see the field); changes whenever centroids jump.
    pub(crate) fn reshapes(&self) -> u64 {
        self.reshapes
    }

    /// Restores the reservoir RNG after loading (it is not saved): a deterministic function of
    /// the seed and the model version.
    pub(crate) fn after_load(&mut self) {
        self.rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed_5eed ^ self.updates);
    }

    /// Offers a user seen for the first time to the reservoir sample (Algorithm R: the i-th user
    /// replaces a random slot with probability `init_users / i`).
    pub(crate) fn offer_user(&mut self, user: &str) {
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
    pub(crate) fn forget_user(&mut self, user: &str) {
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
    pub(super) fn kmeans_pp(&self, points: &[Vector], start: u64) -> Array2<f64> {
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
    pub(crate) fn distance_to(&self, j: usize, z: &Vector) -> f64 {
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

    pub(super) fn flush(&mut self, now_ms: i64) {
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
    pub(super) fn repair_dead(&mut self) {
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
    pub(crate) fn take_splits(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.splits)
    }
}

/// k-means++ starts per fit, as scikit-learn's `n_init`.
pub(super) const N_INIT: u64 = 5;
/// Lloyd passes per candidate.
pub(super) const LLOYD_PASSES: usize = 20;

/// Lloyd passes from `c`; returns the centroids, cluster sizes and inertia (sum of squared
/// distances to the nearest centroid). An emptied centroid keeps its position.
pub(super) fn lloyd(mut c: Array2<f64>, points: &[Vector]) -> (Array2<f64>, Vec<f64>, f64) {
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
pub(super) fn match_ids(
    old: &Array2<f64>,
    fresh: Array2<f64>,
    sizes: &[f64],
) -> (Array2<f64>, Vec<f64>) {
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

pub(super) fn nearest_in(c: &Array2<f64>, z: &[f64]) -> Nearest {
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
