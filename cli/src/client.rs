//! Commands that talk to a running coordinator: `submit`, `txn`, `in-doubt`, and how they find it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tonic::transport::Channel;
use treaty_proto::pb;
use treaty_proto::pb::coordinator_client::CoordinatorClient;

use crate::dev::ClusterState;

#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// Coordinator address. Default: the one `treaty dev up` recorded under --dev-dir, else
    /// http://127.0.0.1:7600.
    #[arg(long, env = "TREATY_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Where `treaty dev up` keeps its cluster.
    #[arg(long, default_value = ".treaty/dev")]
    pub dev_dir: PathBuf,
}

impl Target {
    fn endpoint(&self) -> String {
        if let Some(url) = &self.coordinator {
            return url.clone();
        }
        match ClusterState::load(&self.dev_dir) {
            Ok(state) => state.coordinator,
            Err(_) => "http://127.0.0.1:7600".into(),
        }
    }

    pub async fn connect(&self) -> Result<CoordinatorClient<Channel>> {
        let endpoint = self.endpoint();
        CoordinatorClient::connect(endpoint.clone())
            .await
            .with_context(|| {
                format!("connecting to the coordinator at {endpoint} (is it running? try `treaty dev up`)")
            })
    }
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

pub async fn submit(file: &Path, target: &Target, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let request = crate::ops_file::parse(&text, file)?;
    let mut client = target.connect().await?;
    let response = client.submit(request).await.map_err(status_error)?.into_inner();
    let outcome = response.outcome.unwrap_or_default();
    if json {
        let results: Vec<serde_json::Value> = response
            .results
            .iter()
            .map(|r| serde_json::json!({"rows_affected": r.rows_affected, "rows": r.rows.len()}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"txid": outcome.txid, "outcome": outcome_text(&outcome), "results": results})
        );
    } else {
        println!("transaction {}: {}", outcome.txid, outcome_text(&outcome));
        for (i, result) in response.results.iter().enumerate() {
            println!(
                "  op {i}: {} rows affected, {} rows returned",
                result.rows_affected,
                result.rows.len()
            );
        }
    }
    if outcome.kind != pb::OutcomeKind::Committed as i32 {
        bail!("transaction {} did not commit", outcome.txid);
    }
    Ok(())
}

pub fn outcome_text(outcome: &pb::Outcome) -> String {
    match pb::OutcomeKind::try_from(outcome.kind) {
        Ok(pb::OutcomeKind::Committed) => "COMMITTED".into(),
        Ok(pb::OutcomeKind::Aborted) => {
            let reason = outcome.abort.clone().unwrap_or_default();
            let cause = pb::AbortCause::try_from(reason.cause)
                .map_or("unknown".into(), |c| c.as_str_name().to_owned());
            let mut text = format!("ABORTED ({cause}");
            if !reason.shard.is_empty() {
                text += &format!(", shard {}", reason.shard);
            }
            if !reason.sqlstate.is_empty() {
                text += &format!(", SQLSTATE {}", reason.sqlstate);
            }
            text += &format!("): {}", reason.message);
            if reason.retryable {
                text += " [retryable]";
            }
            text
        }
        _ => "UNKNOWN".into(),
    }
}

fn state_name(state: i32) -> String {
    pb::TransactionState::try_from(state).map_or("?".into(), |s| {
        s.as_str_name()
            .trim_start_matches("TRANSACTION_STATE_")
            .to_lowercase()
    })
}

fn participant_state_name(state: i32) -> String {
    pb::ParticipantState::try_from(state).map_or("?".into(), |s| {
        s.as_str_name()
            .trim_start_matches("PARTICIPANT_STATE_")
            .to_lowercase()
    })
}

fn info_json(info: &pb::TransactionInfo) -> serde_json::Value {
    serde_json::json!({
        "txid": info.txid,
        "gid": info.gid,
        "state": state_name(info.state),
        "label": info.label,
        "recovered": info.recovered,
        "begun_at_ms": info.begun_at_ms,
        "decided_at_ms": info.decided_at_ms,
        "finished_at_ms": info.finished_at_ms,
        "outcome": info.outcome.as_ref().map(outcome_text),
        "participants": info.participants.iter().map(|p| serde_json::json!({
            "shard": p.shard, "state": participant_state_name(p.state), "attempts": p.attempts, "last_error": p.last_error,
        })).collect::<Vec<_>>(),
    })
}

fn print_info(info: &pb::TransactionInfo) {
    let now = crate::demo::now_ms();
    let age = |at: u64| {
        if at == 0 {
            "-".to_owned()
        } else {
            format!("{} ms ago", now.saturating_sub(at))
        }
    };
    println!("transaction {} ({})", info.txid, info.gid);
    println!(
        "  state:     {}{}",
        state_name(info.state),
        if info.recovered {
            " (recovered from the log)"
        } else {
            ""
        }
    );
    if !info.label.is_empty() {
        println!("  label:     {}", info.label);
    }
    println!("  begun:     {}", age(info.begun_at_ms));
    println!("  decided:   {}", age(info.decided_at_ms));
    println!("  finished:  {}", age(info.finished_at_ms));
    if let Some(outcome) = &info.outcome {
        println!("  outcome:   {}", outcome_text(outcome));
    }
    for p in &info.participants {
        let error = if p.last_error.is_empty() {
            String::new()
        } else {
            format!(", last error: {}", p.last_error)
        };
        println!(
            "  - {:<12} {:<12} attempts {}{}",
            p.shard,
            participant_state_name(p.state),
            p.attempts,
            error
        );
    }
}

pub async fn show_transaction(txid: u64, target: &Target, json: bool) -> Result<()> {
    let mut client = target.connect().await?;
    let info = client
        .get_transaction(pb::GetTransactionRequest { txid })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        println!("{}", info_json(&info));
    } else {
        print_info(&info);
    }
    Ok(())
}

pub async fn in_doubt(target: &Target, json: bool) -> Result<()> {
    let mut client = target.connect().await?;
    let request = pb::ListTransactionsRequest {
        filter: pb::ListFilter::InDoubt as i32,
        limit: 0,
    };
    let list = client
        .list_transactions(request)
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let all: Vec<_> = list.transactions.iter().map(info_json).collect();
        println!("{}", serde_json::Value::Array(all));
        return Ok(());
    }
    if list.transactions.is_empty() {
        println!("no transactions in doubt");
    }
    for info in &list.transactions {
        print_info(info);
    }
    Ok(())
}
