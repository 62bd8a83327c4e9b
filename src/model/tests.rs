use super::kmeans::*;
use super::scaler::*;
use super::value::*;
use crate::features::{Vector, DIM};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[cfg(test)]
mod kmeans_tests {
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
