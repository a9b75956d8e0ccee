//! `treaty list`: the transactions a running coordinator tracks (its `ListTransactions` RPC), one
//! line each (txid, GID, state, protocol, shards, age) or one JSON object, filtered as the RPC
//! allows: everything, the undecided (`active`), or the decided with phase two unfinished
//! (`in-doubt`), at most `--limit` of them.

use anyhow::Result;
use treaty_proto::{Protocol, pb};

use crate::client::{Target, age_text, client_error, print_table, state_name};

/// Which transactions to list: the RPC's `ListFilter`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Every transaction the coordinator still tracks.
    All,
    /// Not decided yet.
    Active,
    /// Decided, phase two unfinished.
    InDoubt,
}

impl Filter {
    fn wire(self) -> pb::ListFilter {
        match self {
            Filter::All => pb::ListFilter::Unspecified,
            Filter::Active => pb::ListFilter::Active,
            Filter::InDoubt => pb::ListFilter::InDoubt,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Filter::All => "all",
            Filter::Active => "active",
            Filter::InDoubt => "in-doubt",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Which transactions: all, active (undecided) or in-doubt (decided, phase two unfinished).
    #[arg(long, value_enum, default_value = "all")]
    pub filter: Filter,
    /// At most this many transactions (1 to 1000000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub limit: u32,
    #[command(flatten)]
    pub target: Target,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: &ListArgs) -> Result<()> {
    let client = args.target.connect().await?;
    let list = client
        .list_transactions(pb::ListTransactionsRequest {
            filter: args.filter.wire() as i32,
            limit: args.limit,
        })
        .await
        .map_err(client_error)?;
    let now_ms = treaty_proto::now_ms();
    if args.json {
        println!("{}", list_json(&list, args.filter, now_ms));
    } else if list.transactions.is_empty() {
        println!("no transactions (filter: {})", args.filter.name());
    } else {
        print_table(
            ["TXID", "GID", "STATE", "PROTOCOL", "SHARDS", "AGE"],
            &rows(&list, now_ms),
        );
    }
    Ok(())
}

/// `two-phase`, `three-phase`, or `-` when the coordinator did not say.
fn protocol_name(protocol: i32) -> &'static str {
    match pb::Protocol::try_from(protocol) {
        Ok(pb::Protocol::TwoPhase) => Protocol::TwoPhase.name(),
        Ok(pb::Protocol::ThreePhase) => Protocol::ThreePhase.name(),
        _ => "-",
    }
}

fn shards(info: &pb::TransactionInfo) -> Vec<&str> {
    info.participants.iter().map(|p| p.shard.as_str()).collect()
}

/// Milliseconds since the transaction began; `None` when the coordinator does not know (a
/// transaction recovered from the log).
fn age_ms(info: &pb::TransactionInfo, now_ms: u64) -> Option<u64> {
    (info.begun_at_ms != 0).then(|| now_ms.saturating_sub(info.begun_at_ms))
}

fn rows(list: &pb::ListTransactionsResponse, now_ms: u64) -> Vec<[String; 6]> {
    list.transactions
        .iter()
        .map(|info| {
            let shards = shards(info);
            [
                info.txid.to_string(),
                info.gid.clone(),
                format!(
                    "{}{}",
                    state_name(info.state),
                    if info.recovered { " (recovered)" } else { "" }
                ),
                protocol_name(info.protocol).to_owned(),
                if shards.is_empty() {
                    "-".to_owned()
                } else {
                    shards.join(",")
                },
                age_ms(info, now_ms).map_or_else(|| "-".to_owned(), age_text),
            ]
        })
        .collect()
}

fn list_json(list: &pb::ListTransactionsResponse, filter: Filter, now_ms: u64) -> serde_json::Value {
    serde_json::json!({
        "filter": filter.name(),
        "transactions": list.transactions.iter().map(|info| serde_json::json!({
            "txid": info.txid,
            "gid": info.gid,
            "state": state_name(info.state),
            "protocol": protocol_name(info.protocol),
            "shards": shards(info),
            "label": info.label,
            "recovered": info.recovered,
            "begun_at_ms": info.begun_at_ms,
            "age_ms": age_ms(info, now_ms),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        list: ListArgs,
    }

    fn parse(args: &[&str]) -> Result<ListArgs, String> {
        Cli::try_parse_from(std::iter::once("list").chain(args.iter().copied()))
            .map(|cli| cli.list)
            .map_err(|e| e.to_string())
    }

    fn info(
        txid: u64,
        state: pb::TransactionState,
        protocol: pb::Protocol,
        shards: &[&str],
    ) -> pb::TransactionInfo {
        pb::TransactionInfo {
            txid,
            gid: format!("treaty:c1:{txid}"),
            state: state as i32,
            protocol: protocol as i32,
            participants: shards
                .iter()
                .map(|shard| pb::ParticipantInfo {
                    shard: (*shard).into(),
                    ..Default::default()
                })
                .collect(),
            begun_at_ms: 10_000,
            ..Default::default()
        }
    }

    #[test]
    fn filters_and_limits_reach_the_request_and_bad_ones_are_refused() {
        let args = parse(&[]).unwrap();
        assert_eq!((args.filter, args.limit), (Filter::All, 1000));
        assert_eq!(args.filter.wire(), pb::ListFilter::Unspecified);
        let args = parse(&["--filter", "in-doubt", "--limit", "5"]).unwrap();
        assert_eq!((args.filter.wire(), args.limit), (pb::ListFilter::InDoubt, 5));
        assert_eq!(
            parse(&["--filter", "active"]).unwrap().filter.wire(),
            pb::ListFilter::Active
        );

        let error = parse(&["--filter", "prepared"]).unwrap_err();
        assert!(
            error.contains("prepared") && error.contains("in-doubt"),
            "{error}"
        );
        let error = parse(&["--limit", "0"]).unwrap_err();
        assert!(error.contains("--limit") && error.contains('0'), "{error}");
        let error = parse(&["--limit", "many"]).unwrap_err();
        assert!(error.contains("many"), "{error}");
    }

    #[test]
    fn each_transaction_shows_txid_gid_state_protocol_shards_and_age() {
        let mut recovered = info(
            8,
            pb::TransactionState::Committing,
            pb::Protocol::TwoPhase,
            &["s0", "s2"],
        );
        recovered.recovered = true;
        recovered.begun_at_ms = 0;
        let list = pb::ListTransactionsResponse {
            transactions: vec![
                info(
                    7,
                    pb::TransactionState::Preparing,
                    pb::Protocol::ThreePhase,
                    &["s0", "s1"],
                ),
                recovered,
                info(9, pb::TransactionState::Active, pb::Protocol::Unspecified, &[]),
            ],
        };
        let rows = rows(&list, 11_500);
        assert_eq!(
            rows[0],
            ["7", "treaty:c1:7", "preparing", "three-phase", "s0,s1", "1.5s"].map(String::from)
        );
        assert_eq!(
            rows[1],
            [
                "8",
                "treaty:c1:8",
                "committing (recovered)",
                "two-phase",
                "s0,s2",
                "-"
            ]
            .map(String::from)
        );
        assert_eq!(
            rows[2],
            ["9", "treaty:c1:9", "active", "-", "-", "1.5s"].map(String::from)
        );

        let json = list_json(&list, Filter::InDoubt, 11_500);
        assert_eq!(json["filter"], "in-doubt");
        assert_eq!(json["transactions"][0]["protocol"], "three-phase");
        assert_eq!(json["transactions"][0]["shards"], serde_json::json!(["s0", "s1"]));
        assert_eq!(json["transactions"][0]["age_ms"], 1_500);
        assert_eq!(json["transactions"][1]["state"], "committing");
        assert_eq!(json["transactions"][1]["recovered"], true);
        assert!(json["transactions"][1]["age_ms"].is_null());
    }
}
