//! Traces across processes: with `--otlp-endpoint` pointed at an OTLP receiver in this test
//! process, one cross-shard transaction is one trace (continuing the client's `traceparent` when
//! it sends one, its own otherwise) whose spans come from the coordinator and from every
//! participant it touched, each named with the transaction's txid, GID and shard.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;
use treaty_proto::pb;
use treaty_proto::pb::coordinator_client::CoordinatorClient;

use crate::fixture::*;

/// The batch exporters send every 100 ms here (`--otlp-export-interval-ms`).
const WITHIN: Duration = Duration::from_secs(20);

/// The client's trace: the transaction must continue it.
const CLIENT_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// One span as received, flattened with its resource.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    /// The `treaty.shard` resource attribute (a participant's).
    instance_shard: Option<String>,
    name: String,
    trace_id: String,
    attributes: BTreeMap<String, String>,
}

/// An OTLP/gRPC receiver: keeps every span exported to it.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

fn value_text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), value_text(kv.value.as_ref())))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(ReceivedSpan {
                        service: resource.get("service.name").cloned().unwrap_or_default(),
                        instance_shard: resource.get("treaty.shard").cloned(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves on a loopback port until the test ends; the endpoint to give the services.
    async fn start(&self) -> Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(self.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        Ok(endpoint)
    }

    /// Every span received so far.
    fn all(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The coordinator's span of transaction `txid`, once it is exported (it closes last, when the
/// transaction finished): its trace id and GID.
fn transaction(spans: &[ReceivedSpan], txid: u64, outcome: &str) -> Option<(String, String)> {
    spans
        .iter()
        .find(|s| {
            s.service == "treaty-coordinator"
                && s.name == "transaction"
                && s.attributes.get("txid") == Some(&txid.to_string())
                && s.attributes.get("outcome").map(String::as_str) == Some(outcome)
        })
        .and_then(|s| Some((s.trace_id.clone(), s.attributes.get("gid")?.clone())))
}

/// One trace's spans about one transaction on one shard: `coordinator` says whether the
/// coordinator made a span `name` for it, `participant` whether that shard's own participant
/// served `method` for it; both named with the txid, GID and shard.
struct OnShard<'a> {
    spans: &'a [ReceivedSpan],
    txid: String,
    gid: &'a str,
    shard: &'a str,
}

impl OnShard<'_> {
    fn names(&self, span: &ReceivedSpan) -> bool {
        span.attributes.get("shard").map(String::as_str) == Some(self.shard)
            && span.attributes.get("gid").map(String::as_str) == Some(self.gid)
            && span.attributes.get("txid") == Some(&self.txid)
    }

    fn coordinator(&self, name: &str) -> bool {
        self.spans
            .iter()
            .any(|s| s.service == "treaty-coordinator" && s.name == name && self.names(s))
    }

    fn participant(&self, method: &str) -> bool {
        self.spans.iter().any(|s| {
            s.service == "treaty-participant"
                && s.instance_shard.as_deref() == Some(self.shard)
                && s.name == format!("treaty.v1.Participant/{method}")
                && self.names(s)
        })
    }
}

/// Whether the trace `trace_id` holds transaction `txid`'s spans on every shard that `expected`
/// asks for.
fn complete(
    receiver: &Receiver,
    txid: u64,
    shards: &[String],
    expected: impl Fn(&OnShard<'_>) -> bool,
) -> bool {
    let all = receiver.all();
    let Some((trace_id, gid)) = transaction(&all, txid, "committed") else {
        return false;
    };
    let spans: Vec<ReceivedSpan> = all.into_iter().filter(|s| s.trace_id == trace_id).collect();
    shards.iter().all(|shard| {
        expected(&OnShard {
            spans: &spans,
            txid: txid.to_string(),
            gid: &gid,
            shard,
        })
    })
}

/// A cluster exporting to `receiver` every 100 ms, with `coordinator_args` besides.
async fn traced_cluster(receiver: &Receiver, coordinator_args: &[&str]) -> Result<TestCluster> {
    let endpoint = receiver.start().await?;
    let export = vec![
        "--otlp-endpoint".to_owned(),
        endpoint,
        "--otlp-export-interval-ms".to_owned(),
        "100".to_owned(),
    ];
    let mut coordinator = export.clone();
    coordinator.extend(coordinator_args.iter().map(|a| (*a).to_owned()));
    TestCluster::start(Options {
        coordinator_args: coordinator,
        participant_args: export,
        ..Options::default()
    })
    .await
}

/// Inserts one row on each shard in transaction `txid`.
async fn insert_on(client: &mut CoordinatorClient<Channel>, txid: u64, shards: &[String]) -> Result<()> {
    for (k, shard) in shards.iter().enumerate() {
        execute(
            client,
            txid,
            shard,
            "INSERT INTO kv (k, v) VALUES ($1, $2)",
            vec![int(k as i64), text("traced")],
        )
        .await
        .with_context(|| format!("insert on {shard}"))?;
    }
    Ok(())
}

/// Which services made the spans of trace `trace_id`, and their names (printed for the record).
fn summary(receiver: &Receiver, trace_id: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut by_service: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for span in receiver.all().into_iter().filter(|s| s.trace_id == trace_id) {
        let service = match span.instance_shard {
            Some(shard) => format!("{} ({shard})", span.service),
            None => span.service,
        };
        by_service.entry(service).or_default().insert(span.name);
    }
    by_service
}

#[tokio::test]
async fn one_cross_shard_transaction_is_one_trace_over_coordinator_and_participants() -> Result<()> {
    let receiver = Receiver::default();
    let t = traced_cluster(&receiver, &[]).await?;
    let mut client = t.client().await?;
    let shards = vec![t.shard(0), t.shard(1)];

    // The client's span is the parent: its traceparent rides on Begin only, and the whole
    // transaction (its later calls carry none) stays in that one trace.
    let mut request = tonic::Request::new(pb::BeginRequest { options: None });
    request
        .metadata_mut()
        .insert("traceparent", CLIENT_TRACEPARENT.parse()?);
    let txid = client.begin(request).await?.into_inner().txid;
    insert_on(&mut client, txid, &shards).await?;
    let outcome = commit_applied(&mut client, txid).await?;
    assert_eq!(outcome.kind, pb::OutcomeKind::Committed as i32, "{outcome:?}");

    // Under `--decision-store shard` (the default) the first shard's branch commits with the
    // decision row; the second is prepared and committed.
    eventually("the transaction's whole trace at the receiver", WITHIN, || {
        let whole = complete(&receiver, txid, &shards, |on| {
            on.coordinator("execute")
                && on.participant("Execute")
                && ((on.coordinator("commit_decision") && on.participant("CommitDecision"))
                    || (on.coordinator("prepare")
                        && on.participant("Prepare")
                        && on.coordinator("commit")
                        && on.participant("CommitBatch")))
        });
        async move { Ok(whole) }
    })
    .await?;
    let (trace_id, _) = transaction(&receiver.all(), txid, "committed").context("the transaction span")?;
    assert_eq!(
        trace_id, CLIENT_TRACE_ID,
        "the transaction continues the client's trace"
    );

    // Nothing of it went to another trace: every span naming the transaction is in the client's.
    let strays: Vec<ReceivedSpan> = receiver
        .all()
        .into_iter()
        .filter(|s| s.attributes.get("txid") == Some(&txid.to_string()) && s.trace_id != CLIENT_TRACE_ID)
        .collect();
    assert!(
        strays.is_empty(),
        "spans of txid {txid} outside its trace: {strays:#?}"
    );
    println!(
        "trace {CLIENT_TRACE_ID}: {:#?}",
        summary(&receiver, CLIENT_TRACE_ID)
    );
    Ok(())
}

#[tokio::test]
async fn without_a_client_traceparent_the_transaction_is_its_own_one_trace() -> Result<()> {
    let receiver = Receiver::default();
    // Decisions in the file log: every branch is prepared, then committed.
    let t = traced_cluster(&receiver, &["--decision-store", "file"]).await?;
    let mut client = t.client().await?;
    let shards = vec![t.shard(0), t.shard(1)];

    let txid = begin(&mut client).await?;
    insert_on(&mut client, txid, &shards).await?;
    let outcome = commit_applied(&mut client, txid).await?;
    assert_eq!(outcome.kind, pb::OutcomeKind::Committed as i32, "{outcome:?}");

    eventually("the transaction's whole trace at the receiver", WITHIN, || {
        let whole = complete(&receiver, txid, &shards, |on| {
            on.coordinator("execute")
                && on.coordinator("prepare")
                && on.coordinator("commit")
                && on.participant("Execute")
                && on.participant("Prepare")
                && on.participant("CommitBatch")
        });
        async move { Ok(whole) }
    })
    .await?;
    let (trace_id, _) = transaction(&receiver.all(), txid, "committed").context("the transaction span")?;
    assert!(
        receiver
            .all()
            .iter()
            .any(|s| s.trace_id == trace_id && s.name == "decision_durable"),
        "the decision's forced write is in the trace"
    );
    let strays: Vec<ReceivedSpan> = receiver
        .all()
        .into_iter()
        .filter(|s| s.attributes.get("txid") == Some(&txid.to_string()) && s.trace_id != trace_id)
        .collect();
    assert!(
        strays.is_empty(),
        "spans of txid {txid} outside its trace: {strays:#?}"
    );
    println!("trace {trace_id}: {:#?}", summary(&receiver, &trace_id));
    Ok(())
}
