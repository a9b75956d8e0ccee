//! The decision RPCs of the `Participant` service (`--decision-store shard`): `CommitDecision`,
//! `ReadDecisions`, `ListDecisions` and `ForgetDecisions`, checked and converted here; the work is
//! the agent's (`agent/decision.rs`) and `decisions.rs`'s.

use tonic::{Response, Status};
use treaty_proto::{CoordinatorId, Gid, ShardName, pb};

use super::{ParticipantService, invalid, parse_gid};
use crate::decisions::{self, Outcome, RowCommit, StoredDecision};
use crate::failpoints;

/// Most GIDs one `ReadDecisions` or `ForgetDecisions` may name: each is a row locked (or
/// deleted) in one transaction, so a huge batch would hold them all at once.
const MAX_GIDS: usize = 10_000;

/// A GID whose decision this shard keeps: it must name this shard as its decision shard.
fn decision_gid(text: &str, me: &ShardName) -> Result<Gid, Status> {
    let gid = parse_gid(text)?;
    match gid.decision_shard() {
        Some(shard) if shard == me => Ok(gid),
        Some(shard) => Err(invalid(format!(
            "gid {gid} keeps its decision on shard {shard}, not on this one ({me})"
        ))),
        None => Err(invalid(format!(
            "gid {gid} names no decision shard (expected treaty:<coordinator>:<txid>@{me}); its \
             decision is in the coordinator's own store"
        ))),
    }
}

fn decision_gids(texts: &[String], me: &ShardName) -> Result<Vec<Gid>, Status> {
    if texts.len() > MAX_GIDS {
        return Err(invalid(format!(
            "{} gids in one call; at most {MAX_GIDS}",
            texts.len()
        )));
    }
    texts.iter().map(|text| decision_gid(text, me)).collect()
}

/// The shards a commit row names, checked: valid names, no repeats.
fn participants(texts: Vec<String>) -> Result<Vec<ShardName>, Status> {
    let mut shards: Vec<ShardName> = Vec::with_capacity(texts.len());
    for text in texts {
        let shard =
            ShardName::new(&text).map_err(|e| invalid(format!("participants: shard {text:?}: {e}")))?;
        if shards.contains(&shard) {
            return Err(invalid(format!("participants: shard {shard} is listed twice")));
        }
        shards.push(shard);
    }
    Ok(shards)
}

fn decision_to_pb(outcome: Outcome) -> pb::Decision {
    match outcome {
        Outcome::Commit => pb::Decision::Commit,
        Outcome::Abort => pb::Decision::Abort,
    }
}

fn stored_to_pb(row: StoredDecision) -> pb::StoredDecision {
    pb::StoredDecision {
        gid: row.gid,
        decision: decision_to_pb(row.outcome) as i32,
        participants: row.participants,
        decided_at_ms: row.decided_at_ms,
    }
}

/// One answer per requested GID, in request order (repeats answered again); a GID without a row
/// is DECISION_UNSPECIFIED.
fn in_request_order(requested: Vec<String>, rows: Vec<StoredDecision>) -> Vec<pb::StoredDecision> {
    let mut found: std::collections::HashMap<String, StoredDecision> =
        rows.into_iter().map(|row| (row.gid.clone(), row)).collect();
    let mut answers = Vec::with_capacity(requested.len());
    for (index, gid) in requested.iter().enumerate() {
        // The last request for a GID takes the row; earlier repeats get a copy.
        let row = if requested[index + 1..].contains(gid) {
            found.get(gid).cloned()
        } else {
            found.remove(gid)
        };
        answers.push(row.map_or_else(
            || pb::StoredDecision {
                gid: gid.clone(),
                decision: pb::Decision::Unspecified as i32,
                ..Default::default()
            },
            stored_to_pb,
        ));
    }
    answers
}

impl ParticipantService {
    pub(super) async fn commit_decision_call(
        &self,
        request: pb::CommitDecisionRequest,
    ) -> Result<Response<pb::CommitDecisionResponse>, Status> {
        let gid = decision_gid(&request.gid, self.agent.shard())?;
        let participants = participants(request.participants)?;
        let agent = self.agent.clone();
        let outcome = if request.standalone {
            self.spawn(async move { agent.commit_decision_standalone(&gid, &participants).await })
                .await?
        } else {
            self.spawn(async move { agent.commit_decision(&gid, participants).await })
                .await?
        };
        // The decision is made (either way); its answer is lost.
        failpoints::reply(failpoints::BEFORE_COMMIT_DECISION_REPLY).await?;
        Ok(Response::new(match outcome {
            RowCommit::Committed => pb::CommitDecisionResponse {
                committed: true,
                message: String::new(),
            },
            RowCommit::NotCommitted(message) => pb::CommitDecisionResponse {
                committed: false,
                message,
            },
        }))
    }

    pub(super) async fn read_decisions_call(
        &self,
        request: pb::ReadDecisionsRequest,
    ) -> Result<Response<pb::ReadDecisionsResponse>, Status> {
        let gids = decision_gids(&request.gids, self.agent.shard())?;
        let conclude_abort = request.conclude_abort;
        let agent = self.agent.clone();
        let rows = self
            .spawn(async move { Ok(decisions::read(agent.pool(), &gids, conclude_abort).await?) })
            .await?;
        Ok(Response::new(pb::ReadDecisionsResponse {
            decisions: in_request_order(request.gids, rows),
        }))
    }

    pub(super) async fn list_decisions_call(
        &self,
        request: pb::ListDecisionsRequest,
    ) -> Result<Response<pb::ListDecisionsResponse>, Status> {
        let coordinator = match request.coordinator.as_str() {
            "" => None,
            id => Some(CoordinatorId::new(id).map_err(|e| invalid(format!("coordinator: {e}")))?),
        };
        let limit = match request.limit {
            0 => decisions::DEFAULT_LIST,
            limit => limit.min(decisions::MAX_LIST),
        };
        let agent = self.agent.clone();
        let rows = self
            .spawn(async move {
                Ok(decisions::list(agent.pool(), Outcome::Commit, coordinator.as_ref(), limit).await?)
            })
            .await?;
        Ok(Response::new(pb::ListDecisionsResponse {
            decisions: rows.into_iter().map(stored_to_pb).collect(),
        }))
    }

    pub(super) async fn forget_decisions_call(
        &self,
        request: pb::ForgetDecisionsRequest,
    ) -> Result<Response<pb::ForgetDecisionsResponse>, Status> {
        let gids: Vec<String> = decision_gids(&request.gids, self.agent.shard())?
            .iter()
            .map(Gid::to_string)
            .collect();
        let agent = self.agent.clone();
        let deleted = self
            .spawn(async move { Ok(decisions::delete(agent.pool(), Outcome::Commit, &gids).await?) })
            .await?;
        Ok(Response::new(pb::ForgetDecisionsResponse { deleted }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_gid_must_name_this_shard() {
        let me = ShardName::new("s0").unwrap();
        assert!(decision_gid("treaty:c1:7@s0", &me).is_ok());
        let other = decision_gid("treaty:c1:7@s1", &me).unwrap_err();
        assert_eq!(other.code(), tonic::Code::InvalidArgument);
        assert!(other.message().contains("on shard s1"), "{}", other.message());
        let none = decision_gid("treaty:c1:7", &me).unwrap_err();
        assert!(
            none.message().contains("names no decision shard"),
            "{}",
            none.message()
        );
        assert_eq!(
            decision_gid("nope", &me).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn participants_are_checked_shard_names_without_repeats() {
        assert_eq!(participants(vec!["s0".into(), "s1".into()]).unwrap().len(), 2);
        assert!(participants(vec!["s0".into(), "s0".into()]).is_err());
        assert!(participants(vec!["a'b".into()]).is_err());
        assert!(participants(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn answers_follow_the_request_with_repeats_and_missing_rows() {
        let row = |gid: &str| StoredDecision {
            gid: gid.into(),
            outcome: Outcome::Commit,
            participants: vec!["s1".into()],
            decided_at_ms: 5,
        };
        let requested = vec!["b".to_owned(), "a".to_owned(), "b".to_owned(), "c".to_owned()];
        let answers = in_request_order(requested, vec![row("a"), row("b")]);
        let gids: Vec<&str> = answers.iter().map(|a| a.gid.as_str()).collect();
        assert_eq!(gids, ["b", "a", "b", "c"]);
        let commit = pb::Decision::Commit as i32;
        assert_eq!(answers[0].decision, commit);
        assert_eq!(answers[2].decision, commit);
        assert_eq!(answers[2].participants, ["s1"]);
        assert_eq!(answers[3].decision, pb::Decision::Unspecified as i32);
    }
}
