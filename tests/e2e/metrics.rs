//! Prometheus metrics on the real processes (`--metrics-addr`): every service answers a plain
//! HTTP GET of `/metrics` with the metrics the operator docs list; a branch held prepared (a
//! participant paused before COMMIT PREPARED, or a coordinator crashed after its decision) shows in
//! its shard's oldest-prepared-age gauge, and in the coordinator's in-doubt gauge, until it is
//! finished (released, or the coordinator restarted), and both return to 0; and every metric the
//! shipped alert rules and Grafana dashboard use is in a live scrape.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use treaty_proto::pb;
use treaty_proto::pb::admin_client::AdminClient;

use crate::fixture::*;

const WITHIN: Duration = Duration::from_secs(30);

/// The fixture's cluster with every service serving metrics on a free loopback port.
async fn start() -> Result<TestCluster> {
    let metrics = || ["--metrics-addr", "127.0.0.1:0"].map(String::from).to_vec();
    TestCluster::start(Options {
        coordinator_args: metrics(),
        participant_args: metrics(),
        ..Options::default()
    })
    .await
}

fn coordinator_metrics(t: &TestCluster) -> Result<SocketAddr> {
    t.cluster
        .coordinator
        .metrics_addr()
        .context("the coordinator announced no metrics address")
}

fn participant_metrics(t: &TestCluster, shard: usize) -> Result<SocketAddr> {
    t.cluster.participants[shard]
        .metrics_addr()
        .with_context(|| format!("participant {shard} announced no metrics address"))
}

/// `GET /metrics` over a plain TCP connection: the body of a 200 answer in the OpenMetrics format.
async fn scrape(addr: SocketAddr) -> Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("scraping {addr} took over 10 s"))??;
    let text = String::from_utf8(response).context("the scrape is not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "scraping {addr}: {head}");
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "scraping {addr}: {head}"
    );
    ensure!(
        body.trim_end().ends_with("# EOF"),
        "an OpenMetrics body ends with # EOF"
    );
    Ok(body.to_owned())
}

/// The value of the first sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((series_name, rest)) => (series_name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let all = labels
                .iter()
                .all(|(key, value)| series_labels.contains(&format!("{key}=\"{value}\"")));
            (series_name == name && all).then(|| value.parse().ok()).flatten()
        })
}

/// Every sample name a scrape can show, from its `# TYPE` lines (so a family with no sample yet,
/// a counter never incremented, counts too).
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            _ => &[""],
        };
        for suffix in suffixes {
            names.insert(format!("{name}{suffix}"));
        }
    }
    names
}

/// The coordinator's metrics the operator docs promise (README "Metrics").
const COORDINATOR_METRICS: &[&str] = &[
    "treaty_transactions_begun_total",
    "treaty_transactions_finished_total",
    "treaty_transactions_in_flight",
    "treaty_transactions_in_doubt",
    "treaty_transaction_seconds_bucket",
    "treaty_execute_seconds_bucket",
    "treaty_prepare_seconds_bucket",
    "treaty_decision_durable_seconds_bucket",
    "treaty_phase_two_seconds_bucket",
    "treaty_decision_store_write_seconds_bucket",
    "treaty_decision_log_records_total",
    "treaty_decision_log_batches_total",
    "treaty_decision_log_batch_records_bucket",
    "treaty_decision_log_write_seconds_bucket",
    "treaty_phase_two_retries_total",
    "treaty_link_errors_total",
    "treaty_link_retries_total",
    "treaty_link_connections_total",
    "treaty_redrives_total",
    "treaty_recoveries_total",
    "treaty_heuristic_decisions_total",
];

/// A participant's.
const PARTICIPANT_METRICS: &[&str] = &[
    "treaty_participant_database_up",
    "treaty_participant_prepared_branches",
    "treaty_participant_oldest_prepared_branch_age_seconds",
    "treaty_participant_open_branches",
    "treaty_participant_pool_connections_in_use",
    "treaty_participant_pool_connections_idle",
    "treaty_participant_pool_connections_max",
    "treaty_participant_votes_total",
    "treaty_participant_prepare_seconds_bucket",
    "treaty_participant_phase_two_total",
    "treaty_participant_phase_two_seconds_bucket",
    "treaty_participant_recovered_branches_total",
    "treaty_participant_recovery_pass_errors_total",
    "treaty_participant_dirty_connections_closed_total",
    "treaty_participant_session_checks_total",
];

#[tokio::test]
async fn a_prepared_branch_shows_in_its_shards_oldest_age_and_the_in_doubt_gauge_until_finished() -> Result<()>
{
    let t = start().await?;
    let coordinator = coordinator_metrics(&t)?;
    let s1_metrics = participant_metrics(&t, 1)?;
    let mut client = t.client().await?;

    // One cross-shard transaction, committed: counted, timed, nothing left in doubt.
    let response = client
        .submit(submit(vec![
            insert(&t.shard(0), 1, "a"),
            insert(&t.shard(1), 1, "a"),
        ]))
        .await?
        .into_inner();
    ensure!(committed(&response.outcome), "{response:?}");
    let scraped = scrape(coordinator).await?;
    let names = exposed_names(&scraped);
    for name in COORDINATOR_METRICS {
        ensure!(
            names.contains(*name),
            "the coordinator does not expose {name}:\n{scraped}"
        );
    }
    let finished = sample(
        &scraped,
        "treaty_transactions_finished_total",
        &[
            ("protocol", "two_phase"),
            ("outcome", "committed"),
            ("cause", "none"),
        ],
    );
    ensure!(
        finished >= Some(1.0),
        "committed transactions: {finished:?}\n{scraped}"
    );
    // Timed: the votes, the decision made durable (the decision branch's COMMIT).
    ensure!(
        sample(&scraped, "treaty_prepare_seconds_count", &[]) >= Some(1.0),
        "{scraped}"
    );
    ensure!(
        sample(
            &scraped,
            "treaty_decision_durable_seconds_count",
            &[("store", "shard")]
        ) >= Some(1.0),
        "{scraped}"
    );
    ensure!(
        sample(
            &scraped,
            "treaty_transactions_begun_total",
            &[("protocol", "two_phase")]
        ) >= Some(1.0),
        "{scraped}"
    );
    eventually("nothing in doubt once the commit was applied", WITHIN, || async {
        let scraped = scrape(coordinator).await?;
        Ok(sample(&scraped, "treaty_transactions_in_doubt", &[]) == Some(0.0))
    })
    .await?;
    for shard in 0..3 {
        let scraped = scrape(participant_metrics(&t, shard)?).await?;
        let names = exposed_names(&scraped);
        for name in PARTICIPANT_METRICS {
            ensure!(
                names.contains(*name),
                "participant {shard} does not expose {name}:\n{scraped}"
            );
        }
        let name = t.shard(shard);
        let labels = [("shard", name.as_str())];
        ensure!(
            sample(&scraped, "treaty_participant_database_up", &labels) == Some(1.0),
            "{scraped}"
        );
        ensure!(
            sample(&scraped, "treaty_participant_prepared_branches", &labels) == Some(0.0),
            "{scraped}"
        );
    }

    // Shard 1 holds its COMMIT PREPARED: the transaction is decided (its decision row committed
    // on shard 0) but its branch on shard 1 stays prepared, and phase two cannot finish.
    let mut s1 = AdminClient::connect(t.cluster.participants[1].endpoint()).await?;
    s1.set_failpoint(pb::SetFailpointRequest {
        name: "participant::before-commit-prepared".into(),
        actions: "pause".into(),
    })
    .await?;
    let txid = begin(&mut client).await?;
    for shard in [0, 1] {
        execute(
            &mut client,
            txid,
            &t.shard(shard),
            "INSERT INTO kv (k, v) VALUES ($1, $2)",
            vec![int(2), text("held")],
        )
        .await?;
    }
    let outcome = client
        .commit(pb::CommitRequest {
            txid,
            wait_for_apply: false,
        })
        .await?
        .into_inner();
    ensure!(outcome.kind == pb::OutcomeKind::Committed as i32, "{outcome:?}");

    let s1_labels = [("shard", "s1")];
    eventually(
        "shard 1's oldest prepared branch older than 0 s",
        WITHIN,
        || async {
            let scraped = scrape(s1_metrics).await?;
            let age = sample(
                &scraped,
                "treaty_participant_oldest_prepared_branch_age_seconds",
                &s1_labels,
            );
            let prepared = sample(&scraped, "treaty_participant_prepared_branches", &s1_labels);
            Ok(age.is_some_and(|age| age > 0.0) && prepared >= Some(1.0))
        },
    )
    .await?;
    eventually(
        "the coordinator's in-doubt gauge at 1 or more",
        WITHIN,
        || async {
            let scraped = scrape(coordinator).await?;
            Ok(sample(&scraped, "treaty_transactions_in_doubt", &[]) >= Some(1.0))
        },
    )
    .await?;
    // The GID never becomes a label: bounded label sets only.
    for addr in [coordinator, s1_metrics] {
        let scraped = scrape(addr).await?;
        ensure!(
            !scraped.contains("treaty:"),
            "a GID in the metrics of {addr}:\n{scraped}"
        );
    }

    // Released: the branch commits, phase two ends, and both gauges are back at 0.
    s1.clear_failpoints(pb::ClearFailpointsRequest {}).await?;
    eventually("shard 1's prepared-branch gauges back at 0", WITHIN, || async {
        let scraped = scrape(s1_metrics).await?;
        let age = sample(
            &scraped,
            "treaty_participant_oldest_prepared_branch_age_seconds",
            &s1_labels,
        );
        let prepared = sample(&scraped, "treaty_participant_prepared_branches", &s1_labels);
        Ok(age == Some(0.0) && prepared == Some(0.0))
    })
    .await?;
    eventually("the coordinator's in-doubt gauge back at 0", WITHIN, || async {
        let scraped = scrape(coordinator).await?;
        Ok(sample(&scraped, "treaty_transactions_in_doubt", &[]) == Some(0.0))
    })
    .await?;
    let kv = t.kv(1).await?;
    ensure!(
        kv.iter().any(|(k, _)| *k == 2),
        "the held branch committed: {kv:?}"
    );
    Ok(())
}

#[tokio::test]
async fn branches_left_prepared_by_a_crashed_coordinator_age_until_its_restart_finishes_them() -> Result<()> {
    let metrics = || ["--metrics-addr", "127.0.0.1:0"].map(String::from).to_vec();
    let mut t = TestCluster::start(Options {
        // The decision is the log's commit record; the coordinator dies right after forcing it.
        coordinator_args: [
            metrics(),
            ["--crash-at", "after-commit-decision", "--decision-store", "file"]
                .map(String::from)
                .to_vec(),
        ]
        .concat(),
        participant_args: metrics(),
        ..Options::default()
    })
    .await?;
    submit_into_crash(&mut t, 1).await?;

    // The coordinator is gone; every shard's participant shows its prepared branch growing older.
    for shard in 0..3 {
        let addr = participant_metrics(&t, shard)?;
        let name = t.shard(shard);
        eventually(
            &format!("{name}'s oldest prepared branch older than 0 s"),
            WITHIN,
            || async {
                let scraped = scrape(addr).await?;
                let labels = [("shard", name.as_str())];
                let age = sample(
                    &scraped,
                    "treaty_participant_oldest_prepared_branch_age_seconds",
                    &labels,
                );
                let prepared = sample(&scraped, "treaty_participant_prepared_branches", &labels);
                Ok(age.is_some_and(|age| age > 0.0) && prepared == Some(1.0))
            },
        )
        .await?;
    }

    // Restarted, it recovers the logged commit and finishes it: every gauge back at 0.
    t.cluster.coordinator.restart().await?;
    let coordinator = coordinator_metrics(&t)?;
    for shard in 0..3 {
        let addr = participant_metrics(&t, shard)?;
        let name = t.shard(shard);
        eventually(
            &format!("{name}'s prepared-branch gauges back at 0"),
            WITHIN,
            || async {
                let scraped = scrape(addr).await?;
                let labels = [("shard", name.as_str())];
                let age = sample(
                    &scraped,
                    "treaty_participant_oldest_prepared_branch_age_seconds",
                    &labels,
                );
                let prepared = sample(&scraped, "treaty_participant_prepared_branches", &labels);
                Ok(age == Some(0.0) && prepared == Some(0.0))
            },
        )
        .await?;
    }
    eventually(
        "the coordinator's in-doubt and in-flight gauges at 0",
        WITHIN,
        || async {
            let scraped = scrape(coordinator).await?;
            Ok(sample(&scraped, "treaty_transactions_in_doubt", &[]) == Some(0.0)
                && sample(&scraped, "treaty_transactions_in_flight", &[]) == Some(0.0))
        },
    )
    .await?;
    let scraped = scrape(coordinator).await?;
    ensure!(
        sample(&scraped, "treaty_recoveries_total", &[]) == Some(1.0),
        "{scraped}"
    );
    ensure!(
        sample(&scraped, "treaty_redrives_total", &[("source", "commit")]) == Some(1.0),
        "{scraped}"
    );
    for shard in 0..3 {
        ensure!(
            t.kv(shard).await?.iter().any(|(k, _)| *k == 1),
            "shard {shard} committed"
        );
    }
    Ok(())
}

/// Every `treaty_*` name in `text` (PromQL in the alert rules, queries in the dashboard).
fn referenced_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("treaty_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // `treaty_` inside a longer word (a job or file name) is not a metric.
        let preceded_by_word = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
        if !preceded_by_word {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn every_metric_the_alert_rules_and_the_dashboard_use_is_in_a_live_scrape() -> Result<()> {
    let t = start().await?;
    let mut exposed = exposed_names(&scrape(coordinator_metrics(&t)?).await?);
    for shard in 0..3 {
        exposed.extend(exposed_names(&scrape(participant_metrics(&t, shard)?).await?));
    }
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring");
    for file in ["alerts.yml", "grafana-dashboard.json"] {
        let path = docs.join(file);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let used = referenced_names(&text);
        ensure!(!used.is_empty(), "{file} uses no treaty_ metric");
        let missing: Vec<&String> = used.iter().filter(|name| !exposed.contains(*name)).collect();
        if !missing.is_empty() {
            bail!("{file} uses metrics no service exposes: {missing:?}\nexposed: {exposed:?}");
        }
    }
    Ok(())
}
