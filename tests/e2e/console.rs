//! The web console (`--console-addr`) against a live cluster: in headless Chromium, the
//! transactions page lists a transaction the test committed, and the in-doubt page shows a
//! transaction the test left prepared (a paused vote), with its age; the pages' script runs. Over
//! plain HTTP, the resolve form refuses a GET, an empty reason and a cross-site post, and with a
//! reason resolves the transaction, which the list then shows finished.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use treaty_harness::{ClusterSpec, LocalCluster, PgOptions};
use treaty_proto::pb;
use treaty_proto::pb::admin_client::AdminClient;

use crate::fixture::*;

const WITHIN: Duration = Duration::from_secs(30);
/// How long one Chromium run may take before the test gives up on it.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);
const LABEL: &str = "console-e2e";

struct ConsoleCluster {
    test: TestCluster,
    /// `127.0.0.1:PORT` of the console.
    console: String,
    /// The in-doubt transaction's txid and GID.
    in_doubt: (u64, String),
    /// The committed transaction's txid.
    committed: u64,
    /// Shard 2's participant, whose prepare reply is paused.
    paused: AdminClient<tonic::transport::Channel>,
}

/// A three-shard cluster with the console on, a committed two-shard transaction labelled
/// [`LABEL`], and a transaction whose shard-2 vote is paused: prepared on every shard, undecided,
/// its branches listed by `ListInDoubt` (a vote timeout far longer than the test keeps it so).
async fn start() -> Result<ConsoleCluster> {
    let dir = tempfile::Builder::new().prefix("treaty-e2e-").tempdir()?;
    let console = format!("127.0.0.1:{}", treaty_harness::os::free_loopback_port()?);
    let spec = ClusterSpec {
        shards: 3,
        base_dir: dir.path().to_path_buf(),
        pg: PgOptions {
            fsync: false,
            ..PgOptions::default()
        },
        // The file store: a resolve by hand is a logged heuristic decision.
        coordinator_args: [
            "--vote-timeout-ms",
            "600000",
            "--lock-timeout-ms",
            "2000",
            "--decision-store",
            "file",
            "--console-addr",
            &console,
        ]
        .map(String::from)
        .to_vec(),
        participant_args: ["--in-doubt-after-ms", "600000", "--reconcile-interval-ms", "200"]
            .map(String::from)
            .to_vec(),
        database: DATABASE.into(),
        coordinator_port: 0,
        // Participant agents: the test arms a failpoint in shard 2's.
        in_process: false,
        tls: None,
    };
    let cluster = LocalCluster::start(spec)
        .await
        .context("starting the test cluster")?;
    let test = TestCluster { cluster, dir };
    for shard in 0..3 {
        test.sql(shard, "CREATE TABLE kv (k bigint PRIMARY KEY, v text NOT NULL)")
            .await?;
    }
    let mut client = test.client().await?;

    let mut request = submit(vec![
        insert(&test.shard(0), 1, "a"),
        insert(&test.shard(1), 1, "b"),
    ]);
    request.options = Some(pb::TransactionOptions {
        label: LABEL.into(),
        ..pb::TransactionOptions::default()
    });
    let response = client.submit(request).await?.into_inner();
    ensure!(committed(&response.outcome), "{response:?}");
    let committed_txid = response.outcome.map(|o| o.txid).unwrap_or_default();

    let mut paused = AdminClient::connect(test.cluster.participants[2].endpoint()).await?;
    paused
        .set_failpoint(pb::SetFailpointRequest {
            name: "participant::before-prepare-reply".into(),
            actions: "pause".into(),
        })
        .await?;
    let txid = begin(&mut client).await?;
    for shard in 0..3 {
        execute(
            &mut client,
            txid,
            &test.shard(shard),
            "INSERT INTO kv (k, v) VALUES ($1, $2)",
            vec![int(2), text("in doubt")],
        )
        .await?;
    }
    let mut committer = client.clone();
    // Its answer comes once the transaction is resolved; the test does not wait for it.
    tokio::spawn(async move {
        committer
            .commit(pb::CommitRequest {
                txid,
                wait_for_apply: false,
            })
            .await
    });
    let coordinator = client.info(pb::InfoRequest {}).await?.into_inner().coordinator_id;
    let gid = format!("treaty:{coordinator}:{txid}");
    eventually("the branch prepared on all three shards", WITHIN, || async {
        let listed = client
            .clone()
            .list_in_doubt(pb::ListInDoubtRequest::default())
            .await?
            .into_inner();
        Ok(listed.branches.iter().filter(|b| b.gid == gid).count() == 3)
    })
    .await?;
    Ok(ConsoleCluster {
        test,
        console,
        in_doubt: (txid, gid),
        committed: committed_txid,
        paused,
    })
}

// ---- headless Chromium ----

fn chromium() -> Result<PathBuf> {
    let path = std::env::var_os("TREATY_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !path.is_file() {
        bail!(
            "headless Chromium is needed for the console test and {} is missing: run \
             scripts/ensure-chromium.sh (installs Debian's chromium package), or set TREATY_CHROMIUM",
            path.display()
        );
    }
    Ok(path)
}

/// The page's DOM after Chromium loaded it and ran its scripts (`--dump-dom`); `extra` adds
/// flags (say, a virtual-time budget, so that the page's refresh timer fires before the dump).
async fn rendered_dom(url: &str, extra: &[&str]) -> Result<String> {
    let profile = tempfile::Builder::new().prefix("treaty-chromium-").tempdir()?;
    let mut command = tokio::process::Command::new(chromium()?);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg("--dump-dom")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(CHROMIUM_TIMEOUT, command.output())
        .await
        .with_context(|| format!("chromium did not finish loading {url} within {CHROMIUM_TIMEOUT:?}"))?
        .context("running chromium")?;
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success() && dom.contains("</html>"),
        "chromium --dump-dom {url}: {}\nstdout: {dom}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(dom)
}

/// The `<tr ...>...</tr>` whose opening tag contains `marker`.
fn row<'a>(dom: &'a str, marker: &str) -> Option<&'a str> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind("<tr")?;
    let end = at + dom[at..].find("</tr>")?;
    Some(&dom[start..end])
}

/// The text of the first `<td class="age">` in `row`.
fn age_cell(row: &str) -> Option<&str> {
    let open = r#"<td class="age">"#;
    let start = row.find(open)? + open.len();
    let end = start + row[start..].find("</td>")?;
    Some(&row[start..end])
}

#[tokio::test]
async fn headless_chromium_shows_a_transaction_the_test_made_and_an_in_doubt_one_with_its_age() -> Result<()>
{
    let c = start().await?;
    let (txid, gid) = &c.in_doubt;
    let base = format!("http://{}", c.console);

    let dom = rendered_dom(&format!("{base}/transactions"), &[]).await?;
    assert!(
        dom.contains(r#"data-live="on""#),
        "the page's script ran in Chromium: {dom}"
    );
    let listed = row(&dom, &format!(r#"data-txid="{}""#, c.committed))
        .with_context(|| format!("transaction {} is listed: {dom}", c.committed))?;
    assert!(listed.contains(LABEL), "{listed}");
    assert!(listed.contains(">committed<"), "{listed}");
    let undecided = row(&dom, &format!(r#"data-txid="{txid}""#))
        .with_context(|| format!("transaction {txid} is listed: {dom}"))?;
    assert!(undecided.contains(">preparing<"), "{undecided}");

    // With virtual time, the page's 2 s refresh runs before the dump: the rows below are then the
    // ones its script fetched as JSON and put in place.
    let dom = rendered_dom(&format!("{base}/in-doubt"), &["--virtual-time-budget=5000"]).await?;
    assert!(dom.contains(r#"data-live="on""#), "{dom}");
    assert!(
        dom.contains(r#"<span id="refreshed" class="ok">live, refreshed 2"#),
        "the page refreshed itself from its JSON endpoint: {dom}"
    );
    for shard in 0..3 {
        let marker = format!(r#"data-gid="{gid}" data-shard="{}""#, c.test.shard(shard));
        let branch = row(&dom, &marker).with_context(|| format!("{marker} is listed: {dom}"))?;
        let age = age_cell(branch).with_context(|| format!("an age is shown: {branch}"))?;
        assert!(
            age.ends_with(" ms") || age.ends_with(" s") || age.contains(" min"),
            "the age reads as a duration: {age:?}"
        );
        assert!(
            branch.contains("RowExclusiveLock"),
            "its locks are shown: {branch}"
        );
        assert!(branch.contains("in progress"), "{branch}");
    }

    let dom = rendered_dom(&format!("{base}/transactions/{txid}"), &[]).await?;
    assert!(dom.contains("Timeline"), "{dom}");
    for shard in 0..3 {
        assert!(
            dom.contains(&format!("shard {}", c.test.shard(shard))),
            "the timeline has shard {shard}'s phases: {dom}"
        );
    }
    Ok(())
}

// ---- plain HTTP ----

struct HttpResponse {
    status: u16,
    body: String,
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`, so the body ends at EOF).
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<HttpResponse> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    // The console's own address unless the test names another host.
    let host = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("host"))
        .map_or(addr, |(_, value)| value);
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers
        .iter()
        .filter(|(name, _)| !name.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(WITHIN, stream.read_to_end(&mut raw))
        .await
        .context("the console did not answer in time")??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("a response head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("a status line: {head}"))?;
    Ok(HttpResponse {
        status,
        body: body.to_owned(),
    })
}

async fn json(addr: &str, path: &str) -> Result<serde_json::Value> {
    let response = http(addr, "GET", path, &[], "").await?;
    ensure!(
        response.status == 200,
        "GET {path}: {} {}",
        response.status,
        response.body
    );
    Ok(serde_json::from_str(&response.body)?)
}

const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

#[tokio::test]
async fn the_console_resolve_form_needs_a_reason_and_then_resolves_the_transaction() -> Result<()> {
    let mut c = start().await?;
    let (txid, gid) = c.in_doubt.clone();
    let addr = c.console.clone();

    let listed = json(&addr, "/api/in-doubt").await?;
    let branches = listed["branches"].as_array().context("branches")?;
    assert_eq!(
        branches.iter().filter(|b| b["gid"] == gid.as_str()).count(),
        3,
        "{listed}"
    );

    // A page on another site whose DNS name was rebound to the console's address.
    let rebound = http(
        &addr,
        "GET",
        "/api/in-doubt",
        &[("Host", "attacker.example:80")],
        "",
    )
    .await?;
    assert_eq!(rebound.status, 421, "{}", rebound.body);

    let get = http(&addr, "GET", "/resolve", &[], "").await?;
    assert_eq!(get.status, 405, "a resolve is a POST: {}", get.body);

    let empty = http(
        &addr,
        "POST",
        "/resolve",
        &[FORM],
        &format!("txid={txid}&decision=abort&operator=alice&reason=++"),
    )
    .await?;
    assert_eq!(empty.status, 400, "{}", empty.body);
    assert!(empty.body.contains("a reason is required"), "{}", empty.body);

    let cross_site = http(
        &addr,
        "POST",
        "/resolve",
        &[FORM, ("Origin", "http://attacker.example")],
        &format!("txid={txid}&decision=abort&operator=alice&reason=x"),
    )
    .await?;
    assert_eq!(cross_site.status, 403, "{}", cross_site.body);

    let transaction = json(&addr, &format!("/api/transactions/{txid}")).await?;
    assert_eq!(
        transaction["transaction"]["state"], "preparing",
        "the refusals changed nothing: {transaction}"
    );

    let resolved = http(
        &addr,
        "POST",
        "/resolve",
        &[FORM, ("Origin", &format!("http://{addr}"))],
        &format!("txid={txid}&decision=abort&operator=alice&reason=ticket+42%3A+shard+2+stuck"),
    )
    .await?;
    assert_eq!(resolved.status, 200, "{}", resolved.body);
    assert!(
        resolved.body.contains("heuristic ABORT recorded"),
        "{}",
        resolved.body
    );

    // Shard 2's paused reply released, every branch rolls back; the list shows the transaction
    // finished, aborted by the operator, and nothing is left in doubt.
    c.paused.clear_failpoints(pb::ClearFailpointsRequest {}).await?;
    eventually("the transaction is listed as finished", WITHIN, || async {
        let list = json(&addr, "/api/transactions?state=finished").await?;
        let transactions = list["transactions"].as_array().context("transactions")?;
        Ok(transactions
            .iter()
            .any(|t| t["txid"] == txid && t["state"] == "aborted"))
    })
    .await?;
    eventually("nothing in doubt", WITHIN, || async {
        let listed = json(&addr, "/api/in-doubt").await?;
        Ok(listed["branches"].as_array().is_some_and(|b| b.is_empty()))
    })
    .await?;
    let detail = json(&addr, &format!("/api/transactions/{txid}")).await?;
    let heuristic = &detail["transaction"]["heuristic"];
    assert_eq!(heuristic["decision"], "ABORT", "{detail}");
    assert_eq!(heuristic["operator"], "alice", "{detail}");
    assert_eq!(heuristic["reason"], "ticket 42: shard 2 stuck", "{detail}");
    let page = http(&addr, "GET", &format!("/transactions/{txid}"), &[], "").await?;
    assert!(page.body.contains("ticket 42: shard 2 stuck"), "{}", page.body);
    assert!(page.body.contains("state-aborted"), "{}", page.body);
    for shard in 0..3 {
        assert!(c.test.prepared(shard).await?.is_empty(), "shard {shard}");
    }
    Ok(())
}
