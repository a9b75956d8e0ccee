//! A Zipfian rank sampler (Gray et al., "Quickly generating billion-record synthetic databases",
//! the generator YCSB uses): rank 0 is the hottest, rank `n - 1` the coldest. Set-up is O(n) once;
//! each sample is O(1).

use rand::Rng;

/// Draws ranks in `0..n` with probability proportional to `1 / (rank + 1)^theta`.
#[derive(Debug, Clone)]
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

impl Zipf {
    /// `n >= 1` items, `theta` in `(0, 1)` (0.99 is YCSB's default; larger is more skewed).
    pub fn new(n: u64, theta: f64) -> Result<Zipf, String> {
        if n == 0 {
            return Err("a Zipf distribution needs at least one item".into());
        }
        if !(theta > 0.0 && theta < 1.0) {
            return Err(format!("--zipf-theta must be in (0, 1), got {theta}"));
        }
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2.min(n), theta);
        let alpha = 1.0 / (1.0 - theta);
        let eta = if n > 1 {
            (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan)
        } else {
            0.0
        };
        Ok(Zipf {
            n,
            theta,
            alpha,
            zetan,
            eta,
        })
    }

    /// One rank in `0..n`.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        if self.n == 1 {
            return 0;
        }
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        let rank = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.n - 1)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn samples_stay_in_range_and_favour_low_ranks() {
        let zipf = Zipf::new(1000, 0.99).expect("valid parameters");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = vec![0u64; 1000];
        for _ in 0..100_000 {
            let rank = zipf.sample(&mut rng);
            assert!(rank < 1000);
            counts[rank as usize] += 1;
        }
        // Rank 0 is the most frequent, and the first 10 ranks take far more than 1% of draws.
        let max = counts.iter().copied().max().unwrap_or(0);
        assert_eq!(counts[0], max);
        let head: u64 = counts[..10].iter().sum();
        assert!(head > 20_000, "head {head}");
        // Rank 0 with theta 0.99 over 1000 items: about 1/zeta(1000) ≈ 13%.
        assert!((10_000..16_000).contains(&counts[0]), "rank 0: {}", counts[0]);
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(Zipf::new(0, 0.5).is_err());
        assert!(Zipf::new(10, 1.0).is_err());
        assert!(Zipf::new(10, 0.0).is_err());
        assert!(Zipf::new(1, 0.5).is_ok());
    }
}
