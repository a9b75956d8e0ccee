//! Conversions between the protocol's termination types ([`Ballot`], [`ReportedState`], [`Report`])
//! and statement results ([`StatementResult`]), and their `treaty.v1` wire forms, shared by the
//! coordinator and the participant so that both read a peer's ballot or a result the same way. Pure: a malformed message is an error naming the field.

use treaty_commit_protocol::participant::Report;
use treaty_commit_protocol::termination::{Ballot, Proposer, ReportedState};
use treaty_commit_protocol::transport::{Column, StatementResult};
use treaty_types::ShardName;

use crate::pb;

/// A wire message that does not describe a ballot or a state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("ballot missing from a three-phase message")]
    MissingBallot,
    #[error("ballot names no proposer (neither coordinator_incarnation nor participant is set)")]
    NoProposer,
    #[error("ballot's participant {name:?} is not a valid shard name: {reason}")]
    BadProposer { name: String, reason: String },
    #[error("reported state {0} is not one this version knows")]
    UnknownState(i32),
}

/// A statement's result on the wire.
pub fn result_to_pb(result: StatementResult) -> pb::ExecuteResult {
    pb::ExecuteResult {
        columns: result
            .columns
            .into_iter()
            .map(|c| pb::Column {
                name: c.name,
                type_name: c.type_name,
            })
            .collect(),
        rows: result
            .rows
            .into_iter()
            .map(|row| pb::Row {
                values: row.into_iter().map(pb::Value::from).collect(),
            })
            .collect(),
        rows_affected: result.rows_affected,
    }
}

/// A cell as a participant sent it. Not re-validated: it came from PostgreSQL, and a value this
/// version's syntax checks would refuse (say a numeric `Infinity`) must reach the client unchanged.
fn cell_from_pb(value: pb::Value) -> treaty_types::Value {
    use pb::value::Kind;
    use treaty_types::Value;
    match value.kind {
        None | Some(Kind::Null(_)) => Value::Null,
        Some(Kind::Bool(b)) => Value::Bool(b),
        Some(Kind::Int64(i)) => Value::Int64(i),
        Some(Kind::Float64(f)) => Value::Float64(f),
        Some(Kind::Text(s)) => Value::Text(s),
        Some(Kind::Bytes(b)) => Value::Bytes(b),
        Some(Kind::Numeric(s)) => Value::Numeric(s),
        Some(Kind::TimestamptzMicros(t)) => Value::TimestamptzMicros(t),
        Some(Kind::Uuid(s)) => Value::Uuid(s),
        Some(Kind::Json(s)) => Value::Json(s),
    }
}

/// A participant's result as the domain holds it.
pub fn result_from_pb(result: pb::ExecuteResult) -> StatementResult {
    StatementResult {
        columns: result
            .columns
            .into_iter()
            .map(|c| Column {
                name: c.name,
                type_name: c.type_name,
            })
            .collect(),
        rows: result
            .rows
            .into_iter()
            .map(|row| row.values.into_iter().map(cell_from_pb).collect())
            .collect(),
        rows_affected: result.rows_affected,
    }
}

pub fn ballot_to_pb(ballot: &Ballot) -> pb::Ballot {
    pb::Ballot {
        round: ballot.round,
        proposer: Some(match &ballot.proposer {
            Proposer::Coordinator { incarnation } => {
                pb::ballot::Proposer::CoordinatorIncarnation(*incarnation)
            }
            Proposer::Participant(shard) => pb::ballot::Proposer::Participant(shard.to_string()),
        }),
    }
}

pub fn ballot_from_pb(ballot: Option<&pb::Ballot>) -> Result<Ballot, WireError> {
    let ballot = ballot.ok_or(WireError::MissingBallot)?;
    let proposer = match &ballot.proposer {
        None => return Err(WireError::NoProposer),
        Some(pb::ballot::Proposer::CoordinatorIncarnation(incarnation)) => Proposer::Coordinator {
            incarnation: *incarnation,
        },
        Some(pb::ballot::Proposer::Participant(name)) => {
            Proposer::Participant(ShardName::new(name).map_err(|e| WireError::BadProposer {
                name: name.clone(),
                reason: e.to_string(),
            })?)
        }
    };
    Ok(Ballot {
        round: ballot.round,
        proposer,
    })
}

pub fn state_to_pb(state: ReportedState) -> pb::ReportedState {
    match state {
        ReportedState::Prepared => pb::ReportedState::Prepared,
        ReportedState::PreCommitted => pb::ReportedState::PreCommitted,
        ReportedState::Committed => pb::ReportedState::Committed,
        ReportedState::Aborted => pb::ReportedState::Aborted,
    }
}

/// A `QueryState` answer as the machines take it.
pub fn report_to_pb(report: &Report) -> pb::QueryStateResponse {
    match report {
        Report::State(state) => pb::QueryStateResponse {
            state: state_to_pb(*state) as i32,
            refused: false,
            promised: None,
        },
        Report::Refused { promised } => pb::QueryStateResponse {
            state: pb::ReportedState::Unspecified as i32,
            refused: true,
            promised: Some(ballot_to_pb(promised)),
        },
    }
}

pub fn report_from_pb(response: &pb::QueryStateResponse) -> Result<Report, WireError> {
    if response.refused {
        return Ok(Report::Refused {
            promised: ballot_from_pb(response.promised.as_ref())?,
        });
    }
    let state = match pb::ReportedState::try_from(response.state) {
        Ok(pb::ReportedState::Prepared) => ReportedState::Prepared,
        Ok(pb::ReportedState::PreCommitted) => ReportedState::PreCommitted,
        Ok(pb::ReportedState::Committed) => ReportedState::Committed,
        Ok(pb::ReportedState::Aborted) => ReportedState::Aborted,
        Ok(pb::ReportedState::Unspecified) | Err(_) => return Err(WireError::UnknownState(response.state)),
    };
    Ok(Report::State(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ballots_and_reports_round_trip() {
        let shard = ShardName::new("s1").unwrap();
        for ballot in [
            Ballot::COORDINATOR,
            Ballot {
                round: 7,
                proposer: Proposer::Coordinator { incarnation: 3 },
            },
            Ballot {
                round: 2,
                proposer: Proposer::Participant(shard.clone()),
            },
        ] {
            assert_eq!(ballot_from_pb(Some(&ballot_to_pb(&ballot))), Ok(ballot.clone()));
            let refused = Report::Refused { promised: ballot };
            assert_eq!(report_from_pb(&report_to_pb(&refused)), Ok(refused));
        }
        for state in [
            ReportedState::Prepared,
            ReportedState::PreCommitted,
            ReportedState::Committed,
            ReportedState::Aborted,
        ] {
            let report = Report::State(state);
            assert_eq!(report_from_pb(&report_to_pb(&report)), Ok(report));
        }
    }

    #[test]
    fn malformed_messages_name_the_problem() {
        assert_eq!(ballot_from_pb(None), Err(WireError::MissingBallot));
        let no_proposer = pb::Ballot {
            round: 1,
            proposer: None,
        };
        assert_eq!(ballot_from_pb(Some(&no_proposer)), Err(WireError::NoProposer));
        let bad = pb::QueryStateResponse {
            state: 99,
            ..Default::default()
        };
        assert_eq!(report_from_pb(&bad), Err(WireError::UnknownState(99)));
    }
}
