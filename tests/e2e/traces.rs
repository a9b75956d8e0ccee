//! Traces across processes: with `--otlp-endpoint` pointed at an OTLP receiver in this test
//! process, one cross-shard transaction is one trace, continuing the client's `traceparent`,
//! whose spans come from the coordinator and from every participant it touched, named with the
//! transaction's txid, GID and shard.

use std::collections::BTreeMap;
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
use treaty_proto::pb;

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

    fn spans_of_trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// What one transaction's trace must hold once fully exported: the coordinator's transaction span
/// (closed last, when the transaction finished) with its txid, GID and outcome; per shard, the
/// coordinator's spans for that shard's statement and for its phase two (a COMMIT PREPARED, or
/// the decision branch's commit under `--decision-store shard`); and from each shard's own
/// participant, spans for the calls it served naming the txid, GID and shard.
fn complete(spans: &[ReceivedSpan], txid: u64, shards: &[String]) -> bool {
    let txid = txid.to_string();
    let coordinator: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == "treaty-coordinator")
        .collect();
    let transaction = coordinator.iter().find(|s| {
        s.name == "transaction"
            && s.attributes.get("txid") == Some(&txid)
            && s.attributes.get("outcome").map(String::as_str) == Some("committed")
    });
    let Some(gid) = transaction.and_then(|t| t.attributes.get("gid")) else {
        return false;
    };
    let names = |s: &ReceivedSpan, shard: &String| {
        s.attributes.get("shard") == Some(shard)
            && s.attributes.get("gid") == Some(gid)
            && s.attributes.get("txid") == Some(&txid)
    };
    shards.iter().all(|shard| {
        let coordinator_did = |name: &str| coordinator.iter().any(|s| s.name == name && names(s, shard));
        let participant_served = |method: &str| {
            spans.iter().any(|s| {
                s.service == "treaty-participant"
                    && s.instance_shard.as_ref() == Some(shard)
                    && s.name == format!("treaty.v1.Participant/{method}")
                    && names(s, shard)
            })
        };
        coordinator_did("execute")
            && (coordinator_did("commit") || coordinator_did("commit_decision"))
            && participant_served("Execute")
            && (participant_served("CommitBatch") || participant_served("CommitDecision"))
    })
}

#[tokio::test]
async fn one_cross_shard_transaction_is_one_trace_over_coordinator_and_participants() -> Result<()> {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await?;
    let export = vec![
        "--otlp-endpoint".to_owned(),
        endpoint,
        "--otlp-export-interval-ms".to_owned(),
        "100".to_owned(),
    ];
    let t = TestCluster::start(Options {
        coordinator_args: export.clone(),
        participant_args: export,
    })
    .await?;
    let mut client = t.client().await?;
    let shards = vec![t.shard(0), t.shard(1)];

    // The client's span is the parent: its traceparent rides on Begin only, and the whole
    // transaction (its later calls carry none) stays in that one trace.
    let mut request = tonic::Request::new(pb::BeginRequest { options: None });
    request
        .metadata_mut()
        .insert("traceparent", CLIENT_TRACEPARENT.parse()?);
    let txid = client.begin(request).await?.into_inner().txid;
    for (k, shard) in shards.iter().enumerate() {
        execute(
            &mut client,
            txid,
            shard,
            "INSERT INTO kv (k, v) VALUES ($1, $2)",
            vec![int(k as i64), text("traced")],
        )
        .await
        .with_context(|| format!("insert on {shard}"))?;
    }
    let outcome = commit_applied(&mut client, txid).await?;
    assert_eq!(outcome.kind, pb::OutcomeKind::Committed as i32, "{outcome:?}");

    eventually("the transaction's whole trace at the receiver", WITHIN, || {
        let whole = complete(&receiver.spans_of_trace(CLIENT_TRACE_ID), txid, &shards);
        async move { Ok(whole) }
    })
    .await?;

    // Nothing of it went to another trace: every span naming the transaction is in the client's.
    let spans = receiver.spans.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let strays: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.attributes.get("txid") == Some(&txid.to_string()) && s.trace_id != CLIENT_TRACE_ID)
        .collect();
    assert!(
        strays.is_empty(),
        "spans of txid {txid} outside its trace: {strays:#?}"
    );
    let mut by_service: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for span in receiver.spans_of_trace(CLIENT_TRACE_ID) {
        let service = match span.instance_shard {
            Some(shard) => format!("{} ({shard})", span.service),
            None => span.service,
        };
        by_service.entry(service).or_default().insert(span.name);
    }
    println!("trace {CLIENT_TRACE_ID}: {by_service:#?}");
    Ok(())
}
