//! Commands that talk to a running coordinator: `submit`, `txn`, `in-doubt`, `resolve`, and how they
//! find it (`Target`); the state names, ages and tables `list` prints the same way.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use treaty_client::{Client, ClientError};
use treaty_proto::pb;

use crate::dev::ClusterState;
use crate::exit::{Exit, Failure, outcome_json};

#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// Coordinator address, or several separated by commas: each is tried in turn until one
    /// answers (any coordinator instance serves clients against the same shards; a txid is the
    /// instance's that began it). Default: the one `treaty dev up` recorded under --dev-dir, else
    /// http://127.0.0.1:7600.
    #[arg(long, env = "TREATY_COORDINATOR", value_delimiter = ',')]
    pub coordinator: Vec<String>,
    /// Where `treaty dev up` keeps its cluster.
    #[arg(long, default_value = ".treaty/dev")]
    pub dev_dir: PathBuf,
    /// For an https:// coordinator: the CA (PEM) that signs its certificate. Default: the one
    /// `treaty dev up --tls` made, when the coordinator is the dev cluster's.
    #[arg(long, env = "TREATY_CLIENT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), for a coordinator that requires one. Needs --tls-key.
    #[arg(long, env = "TREATY_CLIENT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "TREATY_CLIENT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A file holding the bearer token to authenticate with (for a coordinator whose access file
    /// names it; `treaty token new` makes one). Kept off the command line, where `ps` shows it;
    /// $TREATY_TOKEN works too.
    #[arg(long, env = "TREATY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl Target {
    fn endpoints(&self) -> Vec<String> {
        let given: Vec<String> = self
            .coordinator
            .iter()
            .map(|url| url.trim().to_owned())
            .filter(|url| !url.is_empty())
            .collect();
        if !given.is_empty() {
            return given;
        }
        match ClusterState::load(&self.dev_dir) {
            Ok(state) => vec![state.coordinator],
            Err(_) => vec!["http://127.0.0.1:7600".into()],
        }
    }

    /// The TLS files to use: the flags, else those of the dev cluster (`treaty dev up --tls`)
    /// when no coordinator was named.
    fn tls_files(&self) -> Option<(PathBuf, Option<(PathBuf, PathBuf)>)> {
        let identity = self.tls_cert.clone().zip(self.tls_key.clone());
        if let Some(ca) = &self.tls_ca {
            return Some((ca.clone(), identity));
        }
        if !self.coordinator.is_empty() {
            return None;
        }
        let tls = ClusterState::load(&self.dev_dir).ok()?.tls?;
        Some((tls.ca, identity.or(Some((tls.client_cert, tls.client_key)))))
    }

    fn tls(&self) -> Result<Option<treaty_client::ClientTlsConfig>> {
        let usage =
            |error: anyhow::Error| anyhow::Error::new(Failure::new(Exit::Usage, format!("{error:#}")));
        let Some((ca, identity)) = self.tls_files() else {
            return Ok(None);
        };
        let read = |path: &Path| {
            std::fs::read(path)
                .with_context(|| format!("reading TLS file {}", path.display()))
                .map_err(usage)
        };
        let mut tls = treaty_client::ClientTlsConfig::new()
            .ca_certificate(treaty_client::Certificate::from_pem(read(&ca)?));
        if let Some((cert, key)) = identity {
            tls = tls.identity(treaty_client::Identity::from_pem(read(&cert)?, read(&key)?));
        }
        Ok(Some(tls))
    }

    /// A client of the first coordinator that answers, in order (`treaty-client`). Only a call
    /// that was never sent, or one that is safe to repeat, fails over to the next: a call that
    /// broke after it was sent is reported, never sent again elsewhere, since it may have been
    /// carried out.
    pub async fn connect(&self) -> Result<Client> {
        let mut builder = Client::builder();
        if let Some(tls) = self.tls()? {
            builder = builder.tls(tls);
        }
        if let Some(token) = self.token()? {
            builder = builder.bearer_token(&token).map_err(client_error)?;
        }
        builder.connect(self.endpoints()).await.map_err(client_error)
    }

    /// The bearer token: from --token-file, else $TREATY_TOKEN.
    fn token(&self) -> Result<Option<String>> {
        let usage = |message: String| anyhow::Error::new(Failure::new(Exit::Usage, message));
        let token = match &self.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| usage(format!("reading the token file {}: {error}", path.display())))?;
                Some(text.trim().to_owned())
            }
            None => std::env::var("TREATY_TOKEN").ok().map(|t| t.trim().to_owned()),
        };
        match token {
            Some(token) if token.is_empty() => Err(usage(match &self.token_file {
                Some(path) => format!("the token file {} is empty", path.display()),
                None => "$TREATY_TOKEN is set but empty".to_owned(),
            })),
            other => Ok(other),
        }
    }

    /// Whether calls prove who makes them (a client certificate or a token): the coordinator then
    /// records that identity, and a typed operator name is not needed.
    fn authenticates(&self) -> bool {
        self.token_file.is_some()
            || std::env::var_os("TREATY_TOKEN").is_some()
            || self.tls_files().is_some_and(|(_, identity)| identity.is_some())
    }
}

/// A client error as a `Failure`: the sentence for people (with a hint to start a coordinator
/// when none answered) and the exit code and abort fields for scripts (`exit.rs`).
pub(crate) fn client_error(error: ClientError) -> anyhow::Error {
    anyhow::Error::new(Failure::from_client(error))
}

pub async fn submit(file: &Path, target: &Target, json: bool) -> Result<()> {
    // A file that cannot be read or parsed is the caller's to fix: a usage error, nothing sent.
    let usage = |error: anyhow::Error| Failure::new(Exit::Usage, format!("{error:#}"));
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading {}", file.display()))
        .map_err(usage)?;
    let request = crate::ops_file::parse(&text, file).map_err(usage)?;
    let client = target.connect().await?;
    let response = client.submit(request).await.map_err(client_error)?;
    let outcome = response.outcome.unwrap_or_default();
    match pb::OutcomeKind::try_from(outcome.kind) {
        Ok(pb::OutcomeKind::Committed) => {}
        // Printed once, by `exit::report`: under `--json` as the one error object, whose
        // `abort` holds the cause, shard, SQLSTATE, message and retryable flag.
        Ok(pb::OutcomeKind::Aborted) => return Err(Failure::aborted(outcome.txid, &outcome).into()),
        _ => bail!(
            "transaction {}: the coordinator answered without an outcome",
            outcome.txid
        ),
    }
    if json {
        let results: Vec<serde_json::Value> = response
            .results
            .iter()
            .map(|r| serde_json::json!({"rows_affected": r.rows_affected, "rows": r.rows.len()}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"txid": outcome.txid, "outcome": outcome_json(&outcome), "results": results})
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
    Ok(())
}

pub fn outcome_text(outcome: &pb::Outcome) -> String {
    match pb::OutcomeKind::try_from(outcome.kind) {
        Ok(pb::OutcomeKind::Committed) => "COMMITTED".into(),
        Ok(pb::OutcomeKind::Aborted) => {
            let abort = crate::exit::abort_detail(outcome);
            let mut text = format!("ABORTED ({}", abort.cause);
            if !abort.shard.is_empty() {
                text += &format!(", shard {}", abort.shard);
            }
            if !abort.sqlstate.is_empty() {
                text += &format!(", SQLSTATE {}", abort.sqlstate);
            }
            text += &format!("): {}", abort.message);
            if abort.retryable {
                text += " [retryable]";
            }
            text
        }
        _ => "UNKNOWN".into(),
    }
}

pub(crate) fn state_name(state: i32) -> String {
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
        "outcome": info.outcome.as_ref().map(outcome_json),
        "participants": info.participants.iter().map(|p| serde_json::json!({
            "shard": p.shard, "state": participant_state_name(p.state), "attempts": p.attempts, "last_error": p.last_error,
        })).collect::<Vec<_>>(),
        "heuristic": info.heuristic.as_ref().map(heuristic_json),
    })
}

fn heuristic_json(heuristic: &pb::Heuristic) -> serde_json::Value {
    serde_json::json!({
        "decision": heuristic_decision(heuristic),
        "operator": heuristic.operator,
        "reason": heuristic.reason,
        "decided_at_ms": heuristic.decided_at_ms,
    })
}

fn heuristic_decision(heuristic: &pb::Heuristic) -> &'static str {
    if heuristic.commit { "COMMIT" } else { "ABORT" }
}

/// Unix milliseconds as a UTC time.
fn utc(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || format!("unix ms {ms}"),
            |time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
}

fn heuristic_text(heuristic: &pb::Heuristic) -> String {
    format!(
        "{} by {} at {}: {}",
        heuristic_decision(heuristic),
        heuristic.operator,
        utc(heuristic.decided_at_ms),
        heuristic.reason
    )
}

fn print_info(info: &pb::TransactionInfo) {
    let now = treaty_proto::now_ms();
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
    if let Some(heuristic) = &info.heuristic {
        println!("  heuristic: {}", heuristic_text(heuristic));
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
    let client = target.connect().await?;
    let info = client.transaction(txid).await.map_err(client_error)?;
    if json {
        println!("{}", info_json(&info));
    } else {
        print_info(&info);
    }
    Ok(())
}

/// `treaty in-doubt`: every branch the participants hold prepared, with the coordinator's view.
pub async fn in_doubt(target: &Target, json: bool) -> Result<()> {
    let client = target.connect().await?;
    let list = client
        .list_in_doubt(pb::ListInDoubtRequest::default())
        .await
        .map_err(client_error)?;
    if json {
        println!("{}", in_doubt_json(&list));
        return Ok(());
    }
    for down in &list.unreachable {
        println!(
            "shard {} did not answer: {} (its branches are not listed)",
            down.shard, down.error
        );
    }
    if list.branches.is_empty() {
        println!("no prepared branches on the shards that answered");
        return Ok(());
    }
    let rows: Vec<[String; 6]> = list
        .branches
        .iter()
        .map(|b| {
            [
                b.txid.to_string(),
                b.shard.clone(),
                b.gid.clone(),
                age_text(b.age_ms),
                b.coordinator_decision.clone(),
                locks_text(&b.locks),
            ]
        })
        .collect();
    print_table(["TXID", "SHARD", "GID", "AGE", "COORDINATOR", "LOCKS"], &rows);
    Ok(())
}

fn in_doubt_json(list: &pb::ListInDoubtResponse) -> serde_json::Value {
    serde_json::json!({
        "branches": list.branches.iter().map(|b| serde_json::json!({
            "txid": b.txid,
            "shard": b.shard,
            "gid": b.gid,
            "prepared_at_ms": b.prepared_at_ms,
            "age_ms": b.age_ms,
            "coordinator_decision": b.coordinator_decision,
            "heuristic": b.heuristic.as_ref().map(heuristic_json),
            "locks": b.locks.iter().map(|l| serde_json::json!({
                "locktype": l.locktype, "mode": l.mode, "relation": l.relation, "granted": l.granted,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "unreachable": list.unreachable.iter().map(|u| serde_json::json!({
            "shard": u.shard, "error": u.error,
        })).collect::<Vec<_>>(),
    })
}

pub(crate) fn age_text(age_ms: u64) -> String {
    match age_ms {
        ms if ms < 1_000 => format!("{ms}ms"),
        ms if ms < 120_000 => format!("{:.1}s", ms as f64 / 1000.0),
        ms if ms < 7_200_000 => format!("{}m", ms / 60_000),
        ms => format!("{}h", ms / 3_600_000),
    }
}

/// "RowExclusiveLock on kv; ExclusiveLock transactionid": a lock on a relation names it, any
/// other names its type; one not granted (waiting) says so.
fn locks_text(locks: &[pb::PreparedLock]) -> String {
    if locks.is_empty() {
        return "-".into();
    }
    locks
        .iter()
        .map(|l| {
            let mut text = if l.relation.is_empty() {
                format!("{} {}", l.mode, l.locktype)
            } else if l.locktype == "relation" {
                format!("{} on {}", l.mode, l.relation)
            } else {
                format!("{} {} on {}", l.mode, l.locktype, l.relation)
            };
            if !l.granted {
                text.push_str(" (waiting)");
            }
            text
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub(crate) fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `treaty resolve`: an operator's heuristic decision, logged by the coordinator and carried out.
pub async fn resolve(
    txid: u64,
    commit: bool,
    reason: String,
    operator: Option<String>,
    target: &Target,
    json: bool,
) -> Result<()> {
    // An authenticated caller is recorded by its identity (the coordinator fills it in); only a
    // coordinator without an access file needs the name typed.
    let operator = match operator {
        Some(name) => name,
        None if target.authenticates() => String::new(),
        None => std::env::var("USER")
            .ok()
            .filter(|name| !name.trim().is_empty())
            .context("no operator name: pass --operator NAME (or set $USER)")?,
    };
    let client = target.connect().await?;
    let response = client
        .resolve(pb::ResolveRequest {
            txid,
            commit,
            reason,
            operator,
        })
        .await
        .map_err(client_error)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "txid": txid,
                "decision": response.decision,
                "recorded": response.recorded,
                "shards": response.shards,
                "message": response.message,
            })
        );
    } else {
        println!("{}", response.message);
        if response.recorded {
            println!("follow it with `treaty txn {txid}` and `treaty in-doubt`");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_coordinator_answering_names_each_endpoint_and_says_how_to_start_one() {
        let dead = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let (first, second) = (dead(), dead());
        let target = Target {
            coordinator: vec![first.clone(), format!(" {second} "), String::new()],
            dev_dir: PathBuf::from("/nonexistent"),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            token_file: None,
        };
        let text = target.connect().await.err().unwrap().to_string();
        assert!(text.starts_with("no coordinator answered ("), "{text}");
        assert!(
            text.contains(&format!("{first}: ")) && text.contains(&format!("{second}: ")),
            "{text}"
        );
        assert!(text.ends_with("; is one running? try `treaty dev up`"), "{text}");
    }

    #[test]
    fn locks_read_as_mode_on_relation() {
        let lock = |locktype: &str, mode: &str, relation: &str, granted: bool| pb::PreparedLock {
            locktype: locktype.into(),
            mode: mode.into(),
            relation: relation.into(),
            granted,
        };
        let text = locks_text(&[
            lock("relation", "RowExclusiveLock", "kv", true),
            lock("transactionid", "ExclusiveLock", "", true),
            lock("tuple", "ShareLock", "kv", false),
        ]);
        assert_eq!(
            text,
            "RowExclusiveLock on kv; ExclusiveLock transactionid; ShareLock tuple on kv (waiting)"
        );
        assert_eq!(locks_text(&[]), "-");
        assert_eq!(age_text(1_500), "1.5s");
    }
}
