//! The value model: P(any spend in the horizon) by logistic SGD, times the expected spend
//! given a purchase from a log-normal regression, both with AdaGrad; progressive validation.

use super::dot;
use crate::features::{Vector, DIM};
use crate::validation::{Report, Validation};
use serde::{Deserialize, Serialize};

/// Online linear regression trained by SGD with AdaGrad step sizes and an L2 penalty.
///
/// Per example: `e = w·x + b - y`; `g_i = e·x_i + l2·w_i`; `G_i += g_i²`;
/// `w_i -= lr · g_i / sqrt(G_i + 1e-8)` (the bias the same, without L2).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sgd {
    pub(super) w: Vec<f64>,
    pub(super) b: f64,
    pub(super) g2: Vec<f64>,
    pub(super) g2_b: f64,
    pub(super) lr: f64,
    pub(super) l2: f64,
    pub(super) trained: u64,
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
    pub(super) fn step(&mut self, x: &Vector, e: f64) {
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
    pub(super) buy: Sgd,
    pub(super) log_spend: Sgd,
    /// Running share of windows with spend, mean of `ln(spend)` and variance of the residuals
    /// (exponential windows of [`MEMORY`] labels after the first ones).
    pub(super) base_rate: f64,
    pub(super) mean_log: f64,
    pub(super) log_var: f64,
    pub(super) labels: u64,
    pub(super) buyers: u64,
    pub(super) predicted_sum: f64,
    pub(super) actual_sum: f64,
    pub(super) abs_err_sum: f64,
    pub(super) sq_err_sum: f64,
    pub(super) log_loss_sum: f64,
    /// AUC, Pearson, Gini and deciles of the same progressive scores.
    #[serde(default)]
    pub(super) validation: Validation,
}

/// Labels, and labels with spend, after which the model alone gives the value.
pub(super) const WARM_LABELS: f64 = 1_000.0;
pub(super) const WARM_BUYERS: f64 = 100.0;
/// Labels the running base rate, mean and variance remember (plain means before that many).
pub(super) const MEMORY: f64 = 5_000.0;
/// Largest `ln(spend)` and residual variance believed: spends beyond e^25 are not currency, and
/// a variance past 4 (a factor e^2 from the correction alone) is a model still learning.
pub(super) const MAX_LOG_SPEND: f64 = 25.0;
pub(super) const MAX_LOG_VAR: f64 = 4.0;

pub(super) fn running(mean: &mut f64, x: f64, n: u64) {
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

    pub(super) fn logit_offset(&self) -> f64 {
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
    pub(crate) fn spend_if_buying(&self, x: &Vector) -> f64 {
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
    pub(crate) fn maturity(&self) -> f64 {
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
    pub(crate) fn errors(&self) -> (f64, f64) {
        let n = self.labels.max(1) as f64;
        (self.abs_err_sum / n, (self.sq_err_sum / n).sqrt())
    }

    /// Progressive AUC, Pearson, normalised Gini and deciles (labels after the first).
    pub(crate) fn validation(&self) -> Report {
        self.validation.report()
    }

    /// Progressive mean log loss of the purchase propensity (ln 2 ≈ 0.69 is a coin).
    pub(crate) fn log_loss(&self) -> f64 {
        self.log_loss_sum / self.labels.saturating_sub(1).max(1) as f64
    }
}

impl Default for ValueModel {
    /// The configuration's defaults (a saved model from before this model loads with it).
    fn default() -> Self {
        Self::new(0.05, 1e-4)
    }
}
