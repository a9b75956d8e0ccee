//! Where the simulation's randomness comes from and what faults it may inject. Every random choice
//! is drawn from a generator seeded by the seed *and a key* naming the choice (the message kind,
//! shard and GID, and how many times that key was drawn before), not from one shared stream, so a
//! choice does not depend on the order tokio polls tasks woken at the same virtual instant.
//!
//! `Life` is one incarnation of a process (the coordinator): once it dies, every call its handles
//! make hangs forever, as calls of a killed process do.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

/// Fault rates, and whether faults are on at all (off once the run heals).
#[derive(Debug, Clone, Copy)]
pub struct FaultRates {
    pub drop_request: f64,
    pub drop_answer: f64,
    pub duplicate: f64,
    /// A delay long enough to overtake timeouts and reorder rounds.
    pub long_delay: f64,
    pub statement_fails: f64,
    pub vote_no: f64,
}

impl FaultRates {
    pub fn random(rng: &mut StdRng) -> Self {
        let scale = rng.random_range(0.0..1.0_f64);
        Self {
            drop_request: 0.1 * scale,
            drop_answer: 0.1 * scale,
            duplicate: 0.15 * scale,
            long_delay: 0.08 * scale,
            statement_fails: rng.random_range(0.0..0.05),
            vote_no: rng.random_range(0.0..0.08),
        }
    }
}

/// The seed's random choices, each drawn from a generator keyed by what it is for.
pub struct Chance {
    seed: u64,
    drawn: Mutex<BTreeMap<String, u64>>,
    /// `None` once healed: no more faults.
    rates: Mutex<Option<FaultRates>>,
}

impl Chance {
    pub fn new(seed: u64, rates: FaultRates) -> Self {
        Self {
            seed,
            drawn: Mutex::new(BTreeMap::new()),
            rates: Mutex::new(Some(rates)),
        }
    }

    /// A generator for the next choice about `key`.
    pub fn rng(&self, key: &str) -> StdRng {
        let mut drawn = self.drawn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = drawn.entry(key.to_owned()).or_insert(0);
        *count += 1;
        StdRng::seed_from_u64(mix(self.seed, fnv1a(key.as_bytes()), *count))
    }

    /// The fault rates, while faults are on.
    pub fn faults(&self) -> Option<FaultRates> {
        *self.rates.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn heal(&self) {
        *self.rates.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// splitmix64 over the three inputs.
fn mix(seed: u64, key: u64, count: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(key.rotate_left(17))
        .wrapping_add(count.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What happens to one request and its answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fate {
    pub request_delay_ms: u64,
    pub drop_request: bool,
    /// Applied a second time, this long after the first.
    pub duplicate_after_ms: Option<u64>,
    pub drop_answer: bool,
    pub answer_delay_ms: u64,
}

impl Fate {
    pub fn draw(rng: &mut StdRng, rates: Option<FaultRates>, duplicable: bool) -> Self {
        let Some(rates) = rates else {
            return Self {
                request_delay_ms: rng.random_range(0..3),
                answer_delay_ms: rng.random_range(0..3),
                ..Self::default()
            };
        };
        let delay = |rng: &mut StdRng| {
            if rng.random_bool(rates.long_delay) {
                rng.random_range(100..1_500)
            } else {
                rng.random_range(0..25)
            }
        };
        let request_delay_ms = delay(rng);
        let answer_delay_ms = delay(rng);
        Self {
            request_delay_ms,
            drop_request: rng.random_bool(rates.drop_request),
            duplicate_after_ms: (duplicable && rng.random_bool(rates.duplicate))
                .then(|| rng.random_range(0..400)),
            drop_answer: rng.random_bool(rates.drop_answer),
            answer_delay_ms,
        }
    }
}

/// One incarnation of a process. Cloned into every handle the incarnation uses.
#[derive(Clone)]
pub struct Life {
    pub number: u64,
    dead: Arc<watch::Sender<bool>>,
}

impl Life {
    pub fn new(number: u64) -> Self {
        Self {
            number,
            dead: Arc::new(watch::Sender::new(false)),
        }
    }

    pub fn kill(&self) {
        self.dead.send_replace(true);
    }

    pub fn is_dead(&self) -> bool {
        *self.dead.borrow()
    }

    /// Returns while alive; a dead process's call never returns.
    pub async fn check(&self) {
        if self.is_dead() {
            std::future::pending::<()>().await;
        }
    }

    /// Completes when the process dies.
    pub async fn died(&self) {
        let mut receiver = self.dead.subscribe();
        let _ = receiver.wait_for(|dead| *dead).await;
    }
}
