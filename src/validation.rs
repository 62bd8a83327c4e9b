//! Progressive validation of the value model, as the CDPs report it: every matured label is
//! scored before the model learns from it, and the scores are kept in bounded histograms, so
//! the figures cover every label ever seen at a fixed memory. Pure.
//!
//! - The purchase propensity: AUC (probability that a buyer was ranked above a non-buyer) from
//!   the predicted probabilities of buyers and non-buyers in [`P_BINS`] bins.
//! - The value: Pearson's r from running sums (exact), and from labels binned by predicted and by
//!   actual spend in bands a factor 2^(1/4) wide: the normalised Gini (how much of the ideal
//!   ranking's gain the predicted ranking achieves) and a decile table (labels in tenths by
//!   predicted value, at the bands' resolution: mean predicted against mean actual).

use serde::{Deserialize, Serialize};

/// Bins of predicted probability (width 1 %).
const P_BINS: usize = 100;
/// Bands of spend per doubling, and bands in all (up to 2^40 in currency).
const BANDS_PER_OCTAVE: f64 = 4.0;
const BANDS: usize = 160;

/// Scores of matured labels. Empty histograms (a saved model from before it) fill as labels
/// mature.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Validation {
    /// Predicted propensity of labels with spend, and of labels without.
    buyers: Vec<f64>,
    others: Vec<f64>,
    /// By band of predicted value: labels, Σ predicted, Σ actual.
    by_predicted: Vec<[f64; 3]>,
    /// By band of actual spend: labels, Σ actual (the ideal ranking).
    by_actual: Vec<[f64; 2]>,
    /// n, Σp, Σa, Σp², Σa², Σpa of predicted value p and actual spend a.
    sums: [f64; 6],
}

/// One tenth of the labels, by predicted value (highest first).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Decile {
    pub labels: u64,
    pub mean_predicted: f64,
    pub mean_actual: f64,
}

/// The figures, as replay and `segments` print them and the metrics export them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub labels: u64,
    pub propensity_auc: f64,
    pub value_pearson: f64,
    pub value_normalised_gini: f64,
    pub deciles: Vec<Decile>,
}

fn band(x: f64) -> usize {
    let b = (x.max(0.0).ln_1p() / std::f64::consts::LN_2 * BANDS_PER_OCTAVE).floor();
    if b.is_finite() {
        (b as usize).min(BANDS - 1)
    } else {
        0
    }
}

impl Validation {
    /// Scores one label: predicted propensity `p` and value `predicted`, actual spend `actual`.
    pub fn score(&mut self, p: f64, predicted: f64, actual: f64) {
        if self.buyers.len() != P_BINS {
            self.buyers = vec![0.0; P_BINS];
            self.others = vec![0.0; P_BINS];
            self.by_predicted = vec![[0.0; 3]; BANDS];
            self.by_actual = vec![[0.0; 2]; BANDS];
        }
        let bin = ((p * P_BINS as f64) as usize).min(P_BINS - 1);
        let actual = actual.max(0.0);
        if actual > 0.0 {
            self.buyers[bin] += 1.0;
        } else {
            self.others[bin] += 1.0;
        }
        let row = &mut self.by_predicted[band(predicted)];
        row[0] += 1.0;
        row[1] += predicted;
        row[2] += actual;
        let row = &mut self.by_actual[band(actual)];
        row[0] += 1.0;
        row[1] += actual;
        let s = &mut self.sums;
        for (i, v) in [
            1.0,
            predicted,
            actual,
            predicted * predicted,
            actual * actual,
            predicted * actual,
        ]
        .into_iter()
        .enumerate()
        {
            s[i] += v;
        }
    }

    /// AUC of the propensity: ties (same bin) count a half. 0.5 until both outcomes were seen.
    pub(crate) fn auc(&self) -> f64 {
        let (pos, neg) = (
            self.buyers.iter().sum::<f64>(),
            self.others.iter().sum::<f64>(),
        );
        if pos == 0.0 || neg == 0.0 {
            return 0.5;
        }
        let mut below = 0.0;
        let mut wins = 0.0;
        for (b, o) in self.buyers.iter().zip(&self.others) {
            wins += b * (below + 0.5 * o);
            below += o;
        }
        wins / (pos * neg)
    }

    /// Pearson's r of predicted value against actual spend; 0 without spread.
    pub(crate) fn pearson(&self) -> f64 {
        let [n, sp, sa, spp, saa, spa] = self.sums;
        let cov = n * spa - sp * sa;
        let var = (n * spp - sp * sp) * (n * saa - sa * sa);
        if n < 2.0 || var <= 0.0 {
            0.0
        } else {
            cov / var.sqrt()
        }
    }

    /// Gini of the gains curve over `bins` ordered highest first (count, Σ actual).
    fn gini(bins: impl Iterator<Item = (f64, f64)>, n: f64, total: f64) -> f64 {
        let (mut y, mut area) = (0.0, 0.0);
        for (count, actual) in bins {
            let dy = actual / total;
            area += count / n * (y + dy / 2.0);
            y += dy;
        }
        2.0 * area - 1.0
    }

    /// The predicted ranking's Gini over the ideal one's (1: as good as sorting by the outcome;
    /// 0: no better than chance). 0 before any spend.
    pub(crate) fn normalised_gini(&self) -> f64 {
        let (n, total) = (self.sums[0], self.sums[2]);
        if n == 0.0 || total <= 0.0 {
            return 0.0;
        }
        let model = Self::gini(
            self.by_predicted.iter().rev().map(|r| (r[0], r[2])),
            n,
            total,
        );
        let ideal = Self::gini(self.by_actual.iter().rev().map(|r| (r[0], r[1])), n, total);
        if ideal > 0.0 {
            model / ideal
        } else {
            0.0
        }
    }

    /// Labels in (about) tenths by predicted value, highest first: a band is not split, so a
    /// tenth holds whole bands and is as near a tenth as they allow.
    pub(crate) fn deciles(&self) -> Vec<Decile> {
        let n = self.sums[0];
        let mut out = Vec::new();
        let mut acc = [0.0; 3];
        let mut seen = 0.0;
        for r in self.by_predicted.iter().rev() {
            acc = [acc[0] + r[0], acc[1] + r[1], acc[2] + r[2]];
            seen += r[0];
            if acc[0] > 0.0 && (seen >= n * (out.len() + 1) as f64 / 10.0 || seen >= n) {
                out.push(Decile {
                    labels: acc[0] as u64,
                    mean_predicted: acc[1] / acc[0],
                    mean_actual: acc[2] / acc[0],
                });
                acc = [0.0; 3];
            }
        }
        out
    }

    pub fn report(&self) -> Report {
        Report {
            labels: self.sums[0] as u64,
            propensity_auc: self.auc(),
            value_pearson: self.pearson(),
            value_normalised_gini: self.normalised_gini(),
            deciles: self.deciles(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn a_perfect_ranking_scores_one_and_a_blind_one_a_half() {
        let mut perfect = Validation::default();
        let mut blind = Validation::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for i in 0..10_000 {
            let spend = if i % 3 == 0 {
                rng.random::<f64>() * 1_000.0
            } else {
                0.0
            };
            let p = if spend > 0.0 { 0.9 } else { 0.1 };
            perfect.score(p, spend, spend);
            blind.score(0.3, 100.0, spend);
        }
        assert!((perfect.auc() - 1.0).abs() < 1e-12);
        assert!((blind.auc() - 0.5).abs() < 1e-12);
        assert!((perfect.pearson() - 1.0).abs() < 1e-9);
        assert_eq!(blind.pearson(), 0.0);
        assert!(
            perfect.normalised_gini() > 0.99,
            "{}",
            perfect.normalised_gini()
        );
        assert!(blind.normalised_gini().abs() < 1e-9);
    }

    #[test]
    fn auc_is_the_share_of_buyer_non_buyer_pairs_ranked_right() {
        let mut v = Validation::default();
        // Buyers at 0.8 and 0.4, non-buyers at 0.6 and 0.2: 3 of 4 pairs right.
        v.score(0.8, 1.0, 5.0);
        v.score(0.4, 1.0, 5.0);
        v.score(0.6, 1.0, 0.0);
        v.score(0.2, 1.0, 0.0);
        assert!((v.auc() - 0.75).abs() < 1e-12);
    }

    #[test]
    fn deciles_cover_every_label_highest_first_and_show_calibration() {
        let mut v = Validation::default();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for _ in 0..50_000 {
            let mean = (rng.random::<f64>() * 8.0).exp();
            // Calibrated: the outcome's mean is the prediction.
            let actual = if rng.random::<f64>() < 0.5 {
                2.0 * mean
            } else {
                0.0
            };
            v.score(0.5, mean, actual);
        }
        let d = v.deciles();
        assert_eq!(d.iter().map(|d| d.labels).sum::<u64>(), 50_000);
        assert!((8..=11).contains(&d.len()), "{d:?}");
        assert!(d
            .windows(2)
            .all(|w| w[0].mean_predicted > w[1].mean_predicted));
        for x in &d {
            let ratio = x.mean_actual / x.mean_predicted;
            assert!((0.85..1.15).contains(&ratio), "{x:?}");
        }
    }
}
