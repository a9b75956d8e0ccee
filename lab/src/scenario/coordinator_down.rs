//! The `await-convergence` step: with the coordinator down (and kept down), watch whether the
//! participants finish the transactions in doubt without it. Three-phase commit should (when every
//! participant is up and reachable); two-phase commit cannot, and neither can 3PC while one
//! participant is cut off (the termination guard needs every participant's state). With the shard
//! store and other coordinator instances running, those instances finish them instead.
//!
//! The step takes a snapshot of what is in doubt (Treaty GIDs in `pg_prepared_xacts`), polls every
//! shard until nothing is prepared and every marker is all-or-nothing, or the bound passes, and
//! then classifies each transaction that was in doubt. `expectation_reasons` compares that with
//! `expect.converged_while_coordinator_down` and `expect.outcome_while_coordinator_down`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use treaty_harness::LocalCluster;
use treaty_proto::BranchGid;

use super::checker;
use super::spec::{DownOutcome, Expect};
use super::timeline::Timeline;

/// Between two looks at the shards.
const POLL: Duration = Duration::from_millis(50);
/// How long the step waits for a coordinator that is going down (its failpoint fired) to exit.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// What the shards hold at one moment.
#[derive(Debug, Default)]
struct ShardState {
    /// txid -> shards where a branch of it is prepared.
    prepared: BTreeMap<u64, BTreeSet<String>>,
    /// Prepared Treaty branches per shard (every shard listed, 0 included).
    prepared_by_shard: BTreeMap<String, usize>,
    /// txid -> (shard, PostgreSQL's local transaction id) of each of its prepared branches.
    prepared_xids: BTreeMap<u64, Vec<(String, u64)>>,
    /// marker id -> (declared shards, shards where its marker is committed).
    markers: checker::Markers,
    /// (shard, local transaction that wrote it) -> marker id, for every committed marker row.
    marker_rows: checker::MarkerRows,
}

impl ShardState {
    fn prepared_branches(&self) -> usize {
        self.prepared_by_shard.values().sum()
    }

    /// The marker of `txid`, a transaction in doubt in `start`. A submitted transaction's marker
    /// carries its client's id, not the txid: it is the row a branch prepared in `start` wrote
    /// (a committed row keeps the branch's local transaction id as its `xmin`). An interactive
    /// one's carries the txid, which also finds it when only shards not prepared at the start
    /// hold it.
    fn marker_of(&self, txid: u64, start: &ShardState) -> Option<&(Vec<String>, BTreeSet<String>)> {
        start
            .prepared_xids
            .get(&txid)
            .into_iter()
            .flatten()
            .find_map(|(shard, xid)| self.marker_rows.get(&(shard.clone(), *xid)))
            .and_then(|id| self.markers.get(id))
            .or_else(|| self.markers.get(&txid))
    }

    fn half_applied(&self) -> Vec<u64> {
        self.markers
            .iter()
            .filter(|(_, (declared, present))| !declared.iter().all(|s| present.contains(s)))
            .map(|(txid, _)| *txid)
            .collect()
    }

    /// Nothing prepared anywhere and every marker all-or-nothing.
    fn converged(&self) -> bool {
        self.prepared_branches() == 0 && self.half_applied().is_empty()
    }
}

async fn read_state(cluster: &LocalCluster) -> Result<ShardState> {
    let mut state = ShardState::default();
    for (shard, branches) in checker::prepared_with_xids(cluster).await? {
        state.prepared_by_shard.insert(shard.clone(), branches.len());
        for (gid, xid) in branches {
            // Only Treaty GIDs are listed; one that does not parse is still counted above. A
            // branch GID names its transaction's GID and the shard.
            if let Ok(branch) = BranchGid::parse(&gid) {
                let txid = branch.gid().txid();
                state.prepared.entry(txid).or_default().insert(shard.clone());
                state
                    .prepared_xids
                    .entry(txid)
                    .or_default()
                    .push((shard.clone(), xid));
            }
        }
    }
    (state.markers, state.marker_rows) = checker::read_markers_with_rows(cluster).await?;
    Ok(state)
}

/// What one `await-convergence` step saw; part of the scenario's JSON result.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DownObservation {
    /// Nothing prepared on any shard and every marker all-or-nothing, before the bound.
    pub converged: bool,
    /// Until convergence, or the whole bound.
    pub waited_ms: u64,
    pub within_ms: u64,
    /// The coordinator was still down when the step ended (nothing restarts it meanwhile).
    pub coordinator_stayed_down: bool,
    /// Transactions with a branch prepared when the step began.
    pub in_doubt: Vec<u64>,
    /// Of those, when the step ended: marker on every shard it declared, nothing prepared.
    pub committed: Vec<u64>,
    /// No marker anywhere, nothing prepared.
    pub aborted: Vec<u64>,
    /// Every branch prepared at the start still prepared, no marker: nobody decided.
    pub undecided: Vec<u64>,
    /// Some branches finished, others still prepared (or a half-applied marker).
    pub partly_decided: Vec<u64>,
    /// Prepared Treaty branches left per shard when the step ended.
    pub prepared_left: BTreeMap<String, usize>,
}

impl DownObservation {
    pub fn prepared_branches(&self) -> usize {
        self.prepared_left.values().sum()
    }

    /// The outcome of transaction `txid`, if it was in doubt.
    pub fn outcome_of(&self, txid: u64) -> Option<&'static str> {
        [
            (&self.committed, "committed"),
            (&self.aborted, "aborted"),
            (&self.undecided, "undecided"),
            (&self.partly_decided, "partly decided"),
        ]
        .into_iter()
        .find(|(list, _)| list.contains(&txid))
        .map(|(_, name)| name)
    }

    /// "3 prepared branches (s0: 1, s1: 1, s2: 1)".
    pub fn blocked_text(&self) -> String {
        let per_shard: Vec<String> = self
            .prepared_left
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(shard, n)| format!("{shard}: {n}"))
            .collect();
        format!(
            "{} prepared branches ({})",
            self.prepared_branches(),
            per_shard.join(", ")
        )
    }

    /// The timeline line for the end of the step.
    pub fn summary(&self) -> String {
        if self.converged {
            format!(
                "converged while the coordinator was down after {} ms: in doubt {:?}, committed {:?}, aborted {:?}",
                self.waited_ms, self.in_doubt, self.committed, self.aborted
            )
        } else {
            format!(
                "still blocked after {} ms with the coordinator down: {}; in doubt {:?}: undecided {:?}, partly decided {:?}, committed {:?}, aborted {:?}",
                self.waited_ms,
                self.blocked_text(),
                self.in_doubt,
                self.undecided,
                self.partly_decided,
                self.committed,
                self.aborted
            )
        }
    }
}

/// Sorts each transaction in doubt at the start by how it stands at the end.
fn classify(start: &ShardState, end: &ShardState) -> [Vec<u64>; 4] {
    let (mut committed, mut aborted, mut undecided, mut partly) = (vec![], vec![], vec![], vec![]);
    for (txid, prepared_at_start) in &start.prepared {
        let still_prepared = end.prepared.get(txid).cloned().unwrap_or_default();
        let marker = end.marker_of(*txid, start);
        let list = match marker {
            Some((declared, present)) if still_prepared.is_empty() => {
                if declared.iter().all(|s| present.contains(s)) {
                    &mut committed
                } else {
                    &mut partly
                }
            }
            None if still_prepared.is_empty() => &mut aborted,
            None if prepared_at_start.is_subset(&still_prepared) => &mut undecided,
            _ => &mut partly,
        };
        list.push(*txid);
    }
    [committed, aborted, undecided, partly]
}

/// Carries out the step: the coordinator must be down (it is given [`EXIT_GRACE`] to finish
/// exiting); waits at most `within` for the participants to converge; notes both ends in the
/// timeline.
pub async fn observe(
    cluster: &mut LocalCluster,
    step: usize,
    within: Duration,
    timeline: &Timeline,
) -> Result<DownObservation> {
    let grace = Instant::now() + EXIT_GRACE;
    while cluster.coordinator.try_exit_status().is_none() {
        if Instant::now() > grace {
            bail!(
                "step {step}: `await-convergence` needs the coordinator down, but it is still running \
                 (trigger the step with at = \"exit=coordinator\" after a crash)"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let start = read_state(cluster).await?;
    timeline.note(format!(
        "step {step}: coordinator down (kept down); waiting up to {} ms for {} to finish without it; in doubt: txids {:?} ({} prepared branches)",
        within.as_millis(),
        // With other instances running (the shard store), they may be the ones that finish.
        if cluster.extra_coordinators.is_empty() {
            "the participants".to_string()
        } else {
            format!(
                "the participants and the other {} coordinator instance(s)",
                cluster.extra_coordinators.len()
            )
        },
        start.prepared.keys().collect::<Vec<_>>(),
        start.prepared_branches()
    ));
    let mut last = None;
    let converged = loop {
        // A shard that cannot be read (its PostgreSQL is down) is simply not converged yet.
        if let Ok(state) = read_state(cluster).await {
            let converged = state.converged();
            last = Some(state);
            if converged {
                break true;
            }
        }
        if started.elapsed() >= within {
            break false;
        }
        tokio::time::sleep(POLL).await;
    };
    let waited = started.elapsed();
    let end = match last {
        Some(state) => state,
        None => read_state(cluster).await?,
    };
    let [committed, aborted, undecided, partly_decided] = classify(&start, &end);
    let observation = DownObservation {
        converged,
        waited_ms: waited.as_millis() as u64,
        within_ms: within.as_millis() as u64,
        coordinator_stayed_down: cluster.coordinator.try_exit_status().is_some(),
        in_doubt: start.prepared.keys().copied().collect(),
        committed,
        aborted,
        undecided,
        partly_decided,
        prepared_left: end.prepared_by_shard,
    };
    timeline.note(format!("step {step}: {}", observation.summary()));
    Ok(observation)
}

/// Why the scenario fails on its `expect.*_while_coordinator_down` lines; empty when they hold
/// (or are unset).
pub fn expectation_reasons(expect: &Expect, observed: Option<&DownObservation>) -> Vec<String> {
    let wanted_outcome = expect
        .outcome_while_coordinator_down
        .as_deref()
        .and_then(|text| DownOutcome::parse(text).ok());
    if expect.converged_while_coordinator_down.is_none() && wanted_outcome.is_none() {
        return Vec::new();
    }
    let Some(observed) = observed else {
        return vec![
            "the `await-convergence` step never ran, so nothing was shown while the coordinator was down"
                .into(),
        ];
    };
    let mut reasons = Vec::new();
    if !observed.coordinator_stayed_down {
        reasons.push("the coordinator came back during `await-convergence`".into());
    }
    match (expect.converged_while_coordinator_down, observed.converged) {
        (Some(true), false) => reasons.push(format!(
            "expected the participants to converge while the coordinator was down; still blocked after {} ms: {}",
            observed.waited_ms,
            observed.blocked_text()
        )),
        (Some(false), true) => reasons.push(format!(
            "expected the participants NOT to converge while the coordinator was down; they converged after {} ms",
            observed.waited_ms
        )),
        _ => {}
    }
    if let Some(wanted) = wanted_outcome {
        if observed.in_doubt.is_empty() {
            reasons.push(format!(
                "no transaction was in doubt when the coordinator went down, so outcome_while_coordinator_down = \"{}\" was not shown",
                wanted.name()
            ));
        }
        let off: Vec<String> = observed
            .in_doubt
            .iter()
            .filter_map(|txid| {
                let outcome = observed.outcome_of(*txid).unwrap_or("unclassified");
                (outcome != wanted.name()).then(|| format!("txid {txid} {outcome}"))
            })
            .collect();
        if !off.is_empty() {
            reasons.push(format!(
                "expected every transaction in doubt to end {} while the coordinator was down: {}",
                wanted.name(),
                off.join(", ")
            ));
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(shards: &[&str]) -> BTreeSet<String> {
        shards.iter().map(|s| s.to_string()).collect()
    }

    fn state(prepared: &[(u64, &[&str])], markers: &[(u64, &[&str], &[&str])]) -> ShardState {
        let mut state = ShardState::default();
        for (txid, shards) in prepared {
            for shard in *shards {
                *state.prepared_by_shard.entry(shard.to_string()).or_default() += 1;
            }
            state.prepared.insert(*txid, set(shards));
        }
        for (txid, declared, present) in markers {
            state.markers.insert(
                *txid,
                (declared.iter().map(|s| s.to_string()).collect(), set(present)),
            );
        }
        state
    }

    const ALL: &[&str] = &["s0", "s1", "s2"];

    #[test]
    fn each_transaction_in_doubt_is_classified_by_how_it_ended() {
        let start = state(&[(1, ALL), (2, ALL), (3, ALL), (4, ALL)], &[]);
        let end = state(
            &[(3, ALL), (4, &["s1", "s2"])],
            &[(1, ALL, ALL), (4, ALL, &["s0"])],
        );
        let [committed, aborted, undecided, partly] = classify(&start, &end);
        assert_eq!(committed, vec![1]);
        assert_eq!(aborted, vec![2]);
        assert_eq!(undecided, vec![3]);
        assert_eq!(partly, vec![4]);
        assert!(!end.converged());
        assert!(state(&[], &[(1, ALL, ALL)]).converged());
        assert!(
            !state(&[], &[(1, ALL, &["s0"])]).converged(),
            "half-applied is not converged"
        );
    }

    #[test]
    fn a_submitted_transaction_is_matched_to_its_marker_by_the_branch_that_wrote_it() {
        // Txid 9 was prepared on every shard as local transactions 100, 200, 300; its marker
        // carries the client's id. Txid 10 (local 101, 201, 301) ended with no marker.
        let id = 1 << 48;
        let mut start = state(&[(9, ALL), (10, ALL)], &[]);
        for (txid, base) in [(9, 100), (10, 101)] {
            let xids = ALL
                .iter()
                .zip([0, 100, 200])
                .map(|(s, d)| (s.to_string(), base + d));
            start.prepared_xids.insert(txid, xids.collect());
        }
        let mut end = state(&[], &[(id, ALL, ALL)]);
        for (shard, xmin) in ALL.iter().zip([100, 200, 300]) {
            end.marker_rows.insert((shard.to_string(), xmin), id);
        }
        let [committed, aborted, undecided, partly] = classify(&start, &end);
        assert_eq!(committed, vec![9]);
        assert_eq!(aborted, vec![10]);
        assert!(undecided.is_empty() && partly.is_empty());
        // Without the rows' origin the marker is not found, and a committed one would pass for
        // aborted: that is what the match is for.
        end.marker_rows.clear();
        assert_eq!(classify(&start, &end)[1], vec![9, 10]);
    }

    fn observation(converged: bool) -> DownObservation {
        DownObservation {
            converged,
            waited_ms: if converged { 1200 } else { 6000 },
            within_ms: 6000,
            coordinator_stayed_down: true,
            in_doubt: vec![5],
            committed: if converged { vec![5] } else { vec![] },
            aborted: vec![],
            undecided: if converged { vec![] } else { vec![5] },
            partly_decided: vec![],
            prepared_left: if converged {
                BTreeMap::from([("s0".into(), 0)])
            } else {
                BTreeMap::from([("s0".into(), 1), ("s1".into(), 1), ("s2".into(), 0)])
            },
        }
    }

    fn expect(converged: Option<bool>, outcome: Option<&str>) -> Expect {
        Expect {
            converged_while_coordinator_down: converged,
            outcome_while_coordinator_down: outcome.map(String::from),
            ..Expect::default()
        }
    }

    #[test]
    fn the_expectations_hold_or_say_what_was_seen() {
        // 3PC: finished without the coordinator, the in-flight transaction committed.
        let finished = observation(true);
        assert!(expectation_reasons(&expect(Some(true), Some("committed")), Some(&finished)).is_empty());
        // 2PC: blocked, nobody decided.
        let blocked = observation(false);
        assert!(expectation_reasons(&expect(Some(false), Some("undecided")), Some(&blocked)).is_empty());
        // Either way round is a failure that says what happened.
        let reasons = expectation_reasons(&expect(Some(true), None), Some(&blocked));
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(
            reasons[0].contains("still blocked after 6000 ms: 2 prepared branches (s0: 1, s1: 1)"),
            "{reasons:?}"
        );
        let reasons = expectation_reasons(&expect(Some(false), Some("aborted")), Some(&finished));
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].contains("converged after 1200 ms"), "{reasons:?}");
        assert!(reasons[1].contains("txid 5 committed"), "{reasons:?}");
        // Unset: nothing to check, even without the step.
        assert!(expectation_reasons(&Expect::default(), None).is_empty());
        let reasons = expectation_reasons(&expect(Some(true), None), None);
        assert!(reasons[0].contains("never ran"), "{reasons:?}");
        // An outcome over nothing in doubt shows nothing.
        let mut empty = observation(true);
        empty.in_doubt.clear();
        empty.committed.clear();
        let reasons = expectation_reasons(&expect(None, Some("committed")), Some(&empty));
        assert!(reasons[0].contains("no transaction was in doubt"), "{reasons:?}");
    }

    #[test]
    fn the_observation_serialises_with_its_outcomes() {
        let value = serde_json::to_value(observation(false)).unwrap();
        assert_eq!(value["converged"], serde_json::json!(false));
        assert_eq!(value["undecided"], serde_json::json!([5]));
        assert_eq!(value["prepared_left"]["s1"], serde_json::json!(1));
        assert!(
            observation(false)
                .summary()
                .starts_with("still blocked after 6000 ms")
        );
        assert!(
            observation(true)
                .summary()
                .starts_with("converged while the coordinator was down after 1200 ms")
        );
    }
}
