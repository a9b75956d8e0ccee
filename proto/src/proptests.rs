//! Property tests of request decoding and validation at the wire edge (issue 17, fuzzed inputs):
//! any bytes decoded as a `treaty.v1` message never panic, a decoded message re-encodes to
//! itself, and what the edge builds from it (values, statements, ballots, reports, ids) is either
//! a valid domain value or a typed error.
//!
//! Each property runs `PROPTEST_CASES` cases (default below, what CI runs); set it higher for a
//! longer search, e.g. `PROPTEST_CASES=100000 cargo test -p treaty-proto --lib proptests`.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config as ProptestConfig;
use prost::Message;
use treaty_types::value::{is_decimal, is_uuid};

use crate::{ApiError, BranchGid, Gid, ShardName, Value, params_from_pb, pb, validate_statement, wire};

/// Cases per property in `cargo test` (CI).
const DEFAULT_CASES: u32 = 1000;

/// `PROPTEST_CASES` when set (more on demand), else the default; printed so CI logs show it.
fn config(property: &str) -> ProptestConfig {
    ProptestConfig {
        cases: treaty_types::testing::property_cases(property, DEFAULT_CASES),
        // A failure is minimized and printed; its counterexample becomes a plain unit test.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text as clients send it, with the characters ids and SQL care about.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9:@_.-]{0,20}",
        "treaty:[a-z0-9]{1,8}:[0-9]{1,20}(@[a-z0-9_-]{1,8})?",
        "\\PC{0,12}",
        "[ 0-9eE+.-]{0,12}",
        "[0-9a-fA-F-]{30,40}",
    ]
}

fn value() -> impl Strategy<Value = pb::Value> {
    use pb::value::Kind;
    let kind = prop_oneof![
        any::<bool>().prop_map(Kind::Null),
        any::<bool>().prop_map(Kind::Bool),
        any::<i64>().prop_map(Kind::Int64),
        any::<f64>().prop_map(Kind::Float64),
        text().prop_map(Kind::Text),
        prop::collection::vec(any::<u8>(), 0..16).prop_map(Kind::Bytes),
        text().prop_map(Kind::Numeric),
        any::<i64>().prop_map(Kind::TimestamptzMicros),
        text().prop_map(Kind::Uuid),
        text().prop_map(Kind::Json),
    ];
    prop::option::weighted(0.95, kind).prop_map(|kind| pb::Value { kind })
}

fn values() -> impl Strategy<Value = Vec<pb::Value>> {
    prop::collection::vec(value(), 0..4)
}

fn options() -> impl Strategy<Value = pb::TransactionOptions> {
    (any::<[u64; 3]>(), any::<i32>(), any::<i32>(), text()).prop_map(
        |([timeout_ms, idle_timeout_ms, lock_timeout_ms], isolation, protocol, label)| {
            pb::TransactionOptions {
                timeout_ms,
                idle_timeout_ms,
                isolation,
                protocol,
                label,
                lock_timeout_ms,
            }
        },
    )
}

fn ballot() -> impl Strategy<Value = pb::Ballot> {
    use pb::ballot::Proposer;
    let proposer = prop_oneof![
        any::<u64>().prop_map(Proposer::CoordinatorIncarnation),
        text().prop_map(Proposer::Participant),
    ];
    (any::<u64>(), prop::option::of(proposer)).prop_map(|(round, proposer)| pb::Ballot { round, proposer })
}

fn peers() -> impl Strategy<Value = Vec<pb::Peer>> {
    prop::collection::vec(
        (text(), text()).prop_map(|(shard, url)| pb::Peer { shard, url }),
        0..3,
    )
}

/// Encodings of well-formed requests of every shape the edge reads, so that mutations of them
/// reach deep fields rather than failing on the first tag.
fn encoded_request() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any::<u64>(), text(), text(), values(), any::<bool>()).prop_map(
            |(txid, shard, sql, params, last)| {
                pb::ExecuteRequest {
                    txid,
                    shard,
                    sql,
                    params,
                    last,
                }
                .encode_to_vec()
            }
        ),
        (
            prop::collection::vec((text(), text(), values(), prop::option::of(any::<u64>())), 0..3),
            prop::option::of(options()),
            any::<bool>(),
        )
            .prop_map(|(ops, options, wait_for_apply)| {
                let ops = ops
                    .into_iter()
                    .map(|(shard, sql, params, expect_rows)| pb::Op {
                        shard,
                        sql,
                        params,
                        expect_rows,
                    })
                    .collect();
                pb::SubmitRequest {
                    ops,
                    options,
                    wait_for_apply,
                }
                .encode_to_vec()
            }),
        prop::option::of(options()).prop_map(|options| pb::BeginRequest { options }.encode_to_vec()),
        (
            text(),
            text(),
            values(),
            any::<[u64; 2]>(),
            any::<[i32; 2]>(),
            peers(),
            text()
        )
            .prop_map(
                |(
                    gid,
                    sql,
                    params,
                    [lock_timeout_ms, statement_timeout_ms],
                    [isolation, protocol],
                    peers,
                    database_role,
                )| {
                    pb::BranchExecuteRequest {
                        gid,
                        sql,
                        params,
                        options: Some(pb::BranchOptions {
                            isolation,
                            lock_timeout_ms,
                            statement_timeout_ms,
                            database_role,
                        }),
                        protocol,
                        peers,
                        continues: lock_timeout_ms % 2 == 1,
                    }
                    .encode_to_vec()
                }
            ),
        (text(), prop::option::of(ballot()), peers()).prop_map(|(gid, ballot, participants)| {
            pb::QueryStateRequest {
                gid,
                ballot,
                participants,
            }
            .encode_to_vec()
        }),
        (any::<u64>(), any::<bool>(), text(), text()).prop_map(|(txid, commit, reason, operator)| {
            pb::ResolveRequest {
                txid,
                commit,
                reason,
                operator,
            }
            .encode_to_vec()
        }),
    ]
}

/// A byte string: random, or an encoded request with bytes flipped, cut or spliced in.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        encoded_request(),
        (
            encoded_request(),
            prop::collection::vec((any::<Index>(), any::<u8>()), 1..4),
            any::<Index>()
        )
            .prop_map(|(mut bytes, changes, cut)| {
                if !bytes.is_empty() {
                    for (at, byte) in changes {
                        let at = at.index(bytes.len());
                        bytes[at] = byte;
                    }
                    bytes.truncate(cut.index(bytes.len() + 1));
                }
                bytes
            }),
        (
            encoded_request(),
            any::<Index>(),
            prop::collection::vec(any::<u8>(), 1..8)
        )
            .prop_map(|(mut bytes, at, spliced)| {
                let at = at.index(bytes.len() + 1);
                bytes.splice(at..at, spliced);
                bytes
            }),
    ]
}

/// Decodes `bytes` as `M`; a decoded message re-encodes to bytes that decode to the same
/// encoding again (compared as bytes: a `double` may be NaN).
fn decode_is_stable<M: Message + Default>(bytes: &[u8]) -> Result<Option<M>, TestCaseError> {
    let Ok(message) = M::decode(bytes) else {
        return Ok(None);
    };
    let encoded = message.encode_to_vec();
    let again =
        M::decode(&encoded[..]).map_err(|e| TestCaseError::fail(format!("re-decoding failed: {e}")))?;
    prop_assert_eq!(again.encode_to_vec(), encoded);
    Ok(Some(message))
}

/// A value that passed validation is one the domain can hold.
fn check_value(value: &Value) -> Result<(), TestCaseError> {
    match value {
        Value::Numeric(s) => prop_assert!(is_decimal(s), "numeric {:?}", s),
        Value::Uuid(s) => prop_assert!(is_uuid(s), "uuid {:?}", s),
        _ => {}
    }
    Ok(())
}

fn check_params(params: Vec<pb::Value>) -> Result<(), TestCaseError> {
    let count = params.len();
    match params_from_pb(params) {
        Ok(values) => {
            prop_assert_eq!(values.len(), count);
            for value in &values {
                check_value(value)?;
                // A valid value survives the way back to the wire and in again.
                let back = Value::try_from(pb::Value::from(value.clone()));
                prop_assert!(back.is_ok(), "{:?} did not round-trip: {:?}", value, back);
            }
        }
        Err(ApiError::InvalidArgument(message)) => prop_assert!(message.starts_with("parameter $")),
        Err(other) => prop_assert!(false, "not INVALID_ARGUMENT: {other:?}"),
    }
    Ok(())
}

fn check_statement(sql: &str, params: Vec<pb::Value>) -> Result<(), TestCaseError> {
    check_params(params.clone())?;
    if let Ok(values) = params_from_pb(params) {
        match validate_statement(sql, &values) {
            Ok(()) => prop_assert!(!sql.trim().is_empty()),
            Err(ApiError::InvalidArgument(_)) => {}
            Err(other) => prop_assert!(false, "not INVALID_ARGUMENT: {other:?}"),
        }
    }
    Ok(())
}

/// An id either parses to one whose text is exactly the input, or is refused.
fn check_ids(text: &str) -> Result<(), TestCaseError> {
    if let Ok(gid) = Gid::parse(text) {
        prop_assert_eq!(gid.as_str(), text);
        prop_assert_eq!(
            Gid::parse(&gid.to_string()).map(|g| g.to_string()),
            Ok(gid.to_string())
        );
    }
    if let Ok(branch) = BranchGid::parse(text) {
        prop_assert_eq!(branch.as_str(), text);
    }
    if let Ok(shard) = ShardName::new(text) {
        prop_assert_eq!(shard.as_str(), text);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config("proto: any bytes decode as every treaty.v1 request without panic"))]
    #[test]
    fn any_bytes_decode_as_every_request_without_panic(bytes in wire_bytes()) {
        // The coordinator's requests.
        decode_is_stable::<pb::BeginRequest>(&bytes)?;
        decode_is_stable::<pb::CommitRequest>(&bytes)?;
        decode_is_stable::<pb::RollbackRequest>(&bytes)?;
        decode_is_stable::<pb::GetTransactionRequest>(&bytes)?;
        decode_is_stable::<pb::ListTransactionsRequest>(&bytes)?;
        decode_is_stable::<pb::QueryDecisionRequest>(&bytes)?;
        decode_is_stable::<pb::InfoRequest>(&bytes)?;
        decode_is_stable::<pb::ListInDoubtRequest>(&bytes)?;
        decode_is_stable::<pb::ResolveRequest>(&bytes)?;
        // The participant's requests.
        decode_is_stable::<pb::PrepareRequest>(&bytes)?;
        decode_is_stable::<pb::FinishRequest>(&bytes)?;
        decode_is_stable::<pb::FinishBatchRequest>(&bytes)?;
        decode_is_stable::<pb::ExecuteAndCommitRequest>(&bytes)?;
        decode_is_stable::<pb::StatusRequest>(&bytes)?;
        decode_is_stable::<pb::ListPreparedRequest>(&bytes)?;
        decode_is_stable::<pb::CommitDecisionRequest>(&bytes)?;
        decode_is_stable::<pb::ReadDecisionsRequest>(&bytes)?;
        decode_is_stable::<pb::ListDecisionsRequest>(&bytes)?;
        decode_is_stable::<pb::ForgetDecisionsRequest>(&bytes)?;
        decode_is_stable::<pb::PreCommitRequest>(&bytes)?;
        decode_is_stable::<pb::TerminationRequest>(&bytes)?;
        // Answers the coordinator reads from participants.
        decode_is_stable::<pb::ExecuteResult>(&bytes)?;
        decode_is_stable::<pb::PrepareResponse>(&bytes)?;
        decode_is_stable::<pb::FinishResponse>(&bytes)?;
        // And the ones validated below, through the edge's conversions.
        if let Some(request) = decode_is_stable::<pb::ExecuteRequest>(&bytes)? {
            check_statement(&request.sql, request.params)?;
            check_ids(&request.shard)?;
        }
        if let Some(request) = decode_is_stable::<pb::SubmitRequest>(&bytes)? {
            for op in request.ops {
                check_statement(&op.sql, op.params)?;
                check_ids(&op.shard)?;
            }
        }
        if let Some(request) = decode_is_stable::<pb::BranchExecuteRequest>(&bytes)? {
            check_statement(&request.sql, request.params)?;
            check_ids(&request.gid)?;
        }
        if let Some(request) = decode_is_stable::<pb::QueryStateRequest>(&bytes)? {
            check_ids(&request.gid)?;
            if let Ok(ballot) = wire::ballot_from_pb(request.ballot.as_ref()) {
                // A ballot read from the wire goes back to the same wire ballot.
                let back = wire::ballot_to_pb(&ballot);
                prop_assert_eq!(Some(back), request.ballot);
            }
        }
        if let Some(response) = decode_is_stable::<pb::QueryStateResponse>(&bytes)? {
            let _ = wire::report_from_pb(&response);
        }
        if let Some(result) = decode_is_stable::<pb::ExecuteResult>(&bytes)? {
            let _ = wire::result_from_pb(result);
        }
    }
}

proptest! {
    #![proptest_config(config("proto: values are validated into domain values or refused by parameter"))]
    #[test]
    fn values_are_domain_values_or_refused_naming_the_parameter(params in values(), sql in text()) {
        check_statement(&sql, params)?;
    }
}

proptest! {
    #![proptest_config(config("proto: ids parse to themselves or are refused"))]
    #[test]
    fn ids_parse_to_themselves_or_are_refused(text in text()) {
        check_ids(&text)?;
    }
}
