//! Clustering quality measures used by the demo, replay summaries and tests. Pure.

use std::collections::HashMap;

fn choose2(n: u64) -> f64 {
    (n as f64) * (n as f64 - 1.0) / 2.0
}

/// Adjusted Rand index (Hubert & Arabie 1985) between two labelings of the same items:
/// 1 for identical partitions (up to renaming), about 0 for independent ones.
pub fn adjusted_rand_index(a: &[u32], b: &[u32]) -> f64 {
    assert_eq!(a.len(), b.len(), "labelings of the same items");
    let n = a.len() as u64;
    if n < 2 {
        return 1.0;
    }
    let mut table: HashMap<(u32, u32), u64> = HashMap::new();
    let mut rows: HashMap<u32, u64> = HashMap::new();
    let mut cols: HashMap<u32, u64> = HashMap::new();
    for (&x, &y) in a.iter().zip(b) {
        *table.entry((x, y)).or_default() += 1;
        *rows.entry(x).or_default() += 1;
        *cols.entry(y).or_default() += 1;
    }
    let index: f64 = table.values().map(|&c| choose2(c)).sum();
    let sum_a: f64 = rows.values().map(|&c| choose2(c)).sum();
    let sum_b: f64 = cols.values().map(|&c| choose2(c)).sum();
    let expected = sum_a * sum_b / choose2(n);
    let max = (sum_a + sum_b) / 2.0;
    if (max - expected).abs() < f64::EPSILON {
        return 1.0;
    }
    (index - expected) / (max - expected)
}

/// Ranks with ties given their average rank (1-based).
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            r[idx[k]] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation (Pearson correlation of tie-averaged ranks).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "paired samples");
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        cov += (x - ma) * (y - mb);
        va += (x - ma) * (x - ma);
        vb += (y - mb) * (y - mb);
    }
    if va == 0.0 || vb == 0.0 {
        0.0
    } else {
        cov / (va * vb).sqrt()
    }
}

/// Share of segment moves that return a user to the segment they left within their last two
/// moves (A → B → A), among all moves.
pub fn flapping_share(moves_per_user: &HashMap<String, Vec<u32>>) -> f64 {
    let (mut moves, mut flaps) = (0u64, 0u64);
    for path in moves_per_user.values() {
        moves += path.len().saturating_sub(1) as u64;
        flaps += path.windows(3).filter(|w| w[0] == w[2]).count() as u64;
    }
    if moves == 0 {
        0.0
    } else {
        flaps as f64 / moves as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn ari_known_values() {
        assert_relative_eq!(adjusted_rand_index(&[0, 0, 1, 1], &[5, 5, 7, 7]), 1.0);
        // scikit-learn: adjusted_rand_score([0,0,1,1],[0,0,1,2]) = 0.5714285714
        assert_relative_eq!(
            adjusted_rand_index(&[0, 0, 1, 1], &[0, 0, 1, 2]),
            0.571_428_571_4,
            epsilon = 1e-9
        );
        // scikit-learn: adjusted_rand_score([0,0,1,1],[0,1,0,1]) = -0.5
        assert_relative_eq!(
            adjusted_rand_index(&[0, 0, 1, 1], &[0, 1, 0, 1]),
            -0.5,
            epsilon = 1e-9
        );
    }

    #[test]
    fn spearman_known_values() {
        // scipy.stats.spearmanr([1,2,3,4,5],[5,6,7,8,7]).correlation = 0.8207826816681233
        assert_relative_eq!(
            spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[5.0, 6.0, 7.0, 8.0, 7.0]),
            0.820_782_681_668_123_3,
            epsilon = 1e-12
        );
        assert_relative_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), -1.0);
    }

    #[test]
    fn flapping_counts_returns() {
        let mut m = HashMap::new();
        m.insert("a".to_string(), vec![1, 2, 1]);
        m.insert("b".to_string(), vec![3, 4]);
        assert_relative_eq!(flapping_share(&m), 1.0 / 3.0);
    }
}
