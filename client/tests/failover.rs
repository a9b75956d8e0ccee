//! The failover rules (crate docs of `treaty-client`) against real tonic servers on loopback:
//! fake coordinators that answer canned replies, fail chosen calls, and count every call they
//! receive, so a test can tell which instance a call reached and that it reached no other.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};
use treaty_client::{Client, ClientError, Rpc, pb};

/// What a fake coordinator does with one RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Answer,
    /// Receives the call, then answers UNAVAILABLE: the caller cannot tell whether it ran.
    Unavailable,
    /// Receives the call and refuses it: a decision.
    InvalidArgument,
    /// Receives the call and never answers.
    Hang,
}

#[derive(Default)]
struct Calls(HashMap<&'static str, AtomicUsize>);

impl Calls {
    fn new() -> Self {
        let names = [
            "Begin",
            "Execute",
            "Commit",
            "Rollback",
            "Submit",
            "GetTransaction",
            "Info",
        ];
        Calls(names.into_iter().map(|n| (n, AtomicUsize::new(0))).collect())
    }
    fn count(&self, rpc: &str) -> usize {
        self.0.get(rpc).map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

struct FakeCoordinator {
    name: &'static str,
    first_txid: u64,
    calls: Arc<Calls>,
    behaviour: HashMap<&'static str, Behaviour>,
}

impl FakeCoordinator {
    /// Counts the call and carries out its behaviour: `Ok(())` means answer normally.
    async fn receive(&self, rpc: &'static str) -> Result<(), Status> {
        if let Some(count) = self.calls.0.get(rpc) {
            count.fetch_add(1, Ordering::SeqCst);
        }
        match self.behaviour.get(rpc).copied().unwrap_or(Behaviour::Answer) {
            Behaviour::Answer => Ok(()),
            Behaviour::Unavailable => Err(Status::unavailable(format!("{}: the answer was lost", self.name))),
            Behaviour::InvalidArgument => Err(Status::invalid_argument(format!("{}: refused", self.name))),
            Behaviour::Hang => std::future::pending().await,
        }
    }

    fn committed(&self, txid: u64) -> pb::Outcome {
        pb::Outcome {
            txid,
            kind: pb::OutcomeKind::Committed as i32,
            abort: None,
        }
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for FakeCoordinator {
    async fn begin(&self, _: Request<pb::BeginRequest>) -> Result<Response<pb::BeginResponse>, Status> {
        self.receive("Begin").await?;
        Ok(Response::new(pb::BeginResponse {
            txid: self.first_txid,
        }))
    }
    async fn execute(&self, _: Request<pb::ExecuteRequest>) -> Result<Response<pb::ExecuteResult>, Status> {
        self.receive("Execute").await?;
        Ok(Response::new(pb::ExecuteResult {
            rows_affected: 1,
            ..Default::default()
        }))
    }
    async fn commit(&self, request: Request<pb::CommitRequest>) -> Result<Response<pb::Outcome>, Status> {
        self.receive("Commit").await?;
        Ok(Response::new(self.committed(request.into_inner().txid)))
    }
    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::Outcome>, Status> {
        self.receive("Rollback").await?;
        Ok(Response::new(pb::Outcome {
            txid: request.into_inner().txid,
            kind: pb::OutcomeKind::Aborted as i32,
            abort: None,
        }))
    }
    async fn submit(&self, _: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        self.receive("Submit").await?;
        Ok(Response::new(pb::SubmitResponse {
            outcome: Some(self.committed(self.first_txid)),
            results: vec![],
        }))
    }
    async fn get_transaction(
        &self,
        request: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::TransactionInfo>, Status> {
        self.receive("GetTransaction").await?;
        let txid = request.into_inner().txid;
        Ok(Response::new(pb::TransactionInfo {
            txid,
            gid: format!("treaty:{}:{txid}", self.name),
            ..Default::default()
        }))
    }
    async fn list_transactions(
        &self,
        _: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        Ok(Response::new(pb::ListTransactionsResponse::default()))
    }
    async fn query_decision(
        &self,
        _: Request<pb::QueryDecisionRequest>,
    ) -> Result<Response<pb::QueryDecisionResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        self.receive("Info").await?;
        Ok(Response::new(pb::InfoResponse {
            coordinator_id: self.name.into(),
            ..Default::default()
        }))
    }
    async fn list_in_doubt(
        &self,
        _: Request<pb::ListInDoubtRequest>,
    ) -> Result<Response<pb::ListInDoubtResponse>, Status> {
        Ok(Response::new(pb::ListInDoubtResponse::default()))
    }
    async fn resolve(&self, _: Request<pb::ResolveRequest>) -> Result<Response<pb::ResolveResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
}

/// A fake coordinator serving on 127.0.0.1 (its listener is bound before `start` returns, so a
/// connect right after succeeds without waiting).
struct Fake {
    url: String,
    calls: Arc<Calls>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Fake {
    async fn start(name: &'static str, first_txid: u64, behaviour: &[(&'static str, Behaviour)]) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding loopback");
        let url = format!("http://{}", listener.local_addr().expect("a bound address"));
        let calls = Arc::new(Calls::new());
        let service = FakeCoordinator {
            name,
            first_txid,
            calls: Arc::clone(&calls),
            behaviour: behaviour.iter().copied().collect(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(pb::coordinator_server::CoordinatorServer::new(service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .expect("serving the fake coordinator");
        });
        Fake {
            url,
            calls,
            stop: Some(stop),
            task,
        }
    }

    fn count(&self, rpc: &str) -> usize {
        self.calls.count(rpc)
    }

    /// Stops serving and waits until the listener is closed: a connect after this is refused.
    async fn stop(mut self) -> Arc<Calls> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("the fake coordinator stopped");
        self.calls
    }
}

/// An address where nothing listens: a port the kernel gave us, released.
fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding loopback");
    let url = format!("http://{}", listener.local_addr().expect("a bound address"));
    drop(listener);
    url
}

fn submit_request() -> pb::SubmitRequest {
    pb::SubmitRequest {
        ops: vec![treaty_client::op("s0", "INSERT INTO t VALUES (1)")],
        ..Default::default()
    }
}

#[tokio::test]
async fn connect_skips_a_dead_endpoint_and_calls_go_to_the_first_that_answered() {
    let dead = dead_endpoint();
    let a = Fake::start("a", 1, &[]).await;
    let b = Fake::start("b", 1, &[]).await;
    let client = Client::connect([dead.clone(), a.url.clone(), b.url.clone()])
        .await
        .unwrap();
    assert_eq!(client.current_endpoint(), a.url);
    assert_eq!(client.endpoints(), vec![dead, a.url.clone(), b.url.clone()]);

    let response = client.submit(submit_request()).await.unwrap();
    assert!(treaty_client::committed(response.outcome.as_ref()));
    assert_eq!(client.info().await.unwrap().coordinator_id, "a");
    assert_eq!((a.count("Submit"), b.count("Submit")), (1, 0));
}

#[tokio::test]
async fn when_no_endpoint_answers_the_error_names_every_endpoint() {
    let (first, second) = (dead_endpoint(), dead_endpoint());
    let error = Client::connect([first.clone(), second.clone()])
        .await
        .unwrap_err();
    let ClientError::NoCoordinator { failures } = &error else {
        panic!("expected NoCoordinator, got {error:?}");
    };
    let named: Vec<&str> = failures.iter().map(|f| f.endpoint.as_str()).collect();
    assert_eq!(named, vec![first.as_str(), second.as_str()]);
    let text = error.to_string();
    assert!(text.starts_with("no coordinator answered ("), "{text}");
    assert!(text.contains(&first) && text.contains(&second), "{text}");
    assert!(text.contains("refused"), "says why: {text}");

    // The same for a call, when the client connects lazily.
    let client = Client::builder()
        .connect_lazy([first.clone(), second.clone()])
        .unwrap();
    let error = client.submit(submit_request()).await.unwrap_err();
    let ClientError::NoCoordinator { failures } = &error else {
        panic!("expected NoCoordinator, got {error:?}");
    };
    assert_eq!(failures.len(), 2, "{error}");
    assert!(error.to_string().contains(&first) && error.to_string().contains(&second));
}

#[tokio::test]
async fn no_endpoints_or_a_bad_one_is_refused_before_connecting() {
    let none: [&str; 0] = [];
    assert!(matches!(
        Client::connect(none).await,
        Err(ClientError::NoEndpoints)
    ));
    let error = Client::connect(["http://bad host:1"]).await.unwrap_err();
    assert!(matches!(error, ClientError::InvalidEndpoint { .. }), "{error:?}");
}

#[tokio::test]
async fn a_submit_that_broke_after_it_was_sent_is_not_sent_to_the_next_endpoint() {
    let a = Fake::start("a", 1, &[("Submit", Behaviour::Unavailable)]).await;
    let b = Fake::start("b", 1, &[]).await;
    let client = Client::connect([a.url.clone(), b.url.clone()]).await.unwrap();

    let error = client.submit(submit_request()).await.unwrap_err();
    let ClientError::OutcomeUnknown {
        rpc, txid, endpoint, ..
    } = &error
    else {
        panic!("expected OutcomeUnknown, got {error:?}");
    };
    assert_eq!(
        (*rpc, *txid, endpoint.as_str()),
        (Rpc::Submit, None, a.url.as_str())
    );
    assert_eq!(a.count("Submit"), 1);
    assert_eq!(
        b.count("Submit"),
        0,
        "a submit that may have run is never re-sent"
    );
    assert!(error.to_string().contains("look the transaction up"), "{error}");
    assert_eq!(client.current_endpoint(), a.url);
}

#[tokio::test]
async fn a_submit_that_timed_out_is_not_sent_to_the_next_endpoint() {
    let a = Fake::start("a", 1, &[("Submit", Behaviour::Hang)]).await;
    let b = Fake::start("b", 1, &[]).await;
    let client = Client::builder()
        .request_timeout(Duration::from_millis(300))
        .connect([a.url.clone(), b.url.clone()])
        .await
        .unwrap();
    let error = client.submit(submit_request()).await.unwrap_err();
    assert!(
        matches!(&error, ClientError::OutcomeUnknown { rpc: Rpc::Submit, endpoint, .. } if *endpoint == a.url),
        "{error:?}"
    );
    assert_eq!((a.count("Submit"), b.count("Submit")), (1, 0));
}

#[tokio::test]
async fn a_submit_that_could_not_be_sent_goes_to_the_next_endpoint() {
    let dead = dead_endpoint();
    let b = Fake::start("b", 1, &[]).await;
    // Lazy: the first call finds the first endpoint dead when it connects, so it was never sent.
    let client = Client::builder().connect_lazy([dead, b.url.clone()]).unwrap();
    let response = client.submit(submit_request()).await.unwrap();
    assert!(treaty_client::committed(response.outcome.as_ref()));
    assert_eq!(b.count("Submit"), 1);
    assert_eq!(
        client.current_endpoint(),
        b.url,
        "the endpoint that answered is now current"
    );
}

#[tokio::test]
async fn a_refusal_is_returned_and_not_failed_over() {
    let a = Fake::start("a", 1, &[("Submit", Behaviour::InvalidArgument)]).await;
    let b = Fake::start("b", 1, &[]).await;
    let client = Client::connect([a.url.clone(), b.url.clone()]).await.unwrap();
    let error = client.submit(submit_request()).await.unwrap_err();
    assert_eq!(
        error.status().map(Status::code),
        Some(Code::InvalidArgument),
        "{error:?}"
    );
    assert!(matches!(error, ClientError::Rpc { rpc: Rpc::Submit, .. }));
    assert_eq!((a.count("Submit"), b.count("Submit")), (1, 0));
}

#[tokio::test]
async fn begin_is_retried_on_the_next_endpoint_and_the_transaction_stays_there() {
    let a = Fake::start("a", 100, &[("Begin", Behaviour::Unavailable)]).await;
    let b = Fake::start("b", 200, &[]).await;
    let client = Client::connect([a.url.clone(), b.url.clone()]).await.unwrap();

    let txn = client.begin(None).await.unwrap();
    assert_eq!((txn.txid(), txn.endpoint()), (200, b.url.as_str()));
    assert_eq!((a.count("Begin"), b.count("Begin")), (1, 1));
    assert_eq!(client.current_endpoint(), b.url);

    txn.execute("s0", "UPDATE t SET v = 1", vec![]).await.unwrap();
    let outcome = txn.commit(false).await.unwrap();
    assert!(treaty_client::committed(Some(&outcome)));
    assert_eq!(txn.status().await.unwrap().gid, "treaty:b:200");
    assert_eq!((a.count("Execute"), b.count("Execute")), (0, 1));
    assert_eq!((a.count("Commit"), b.count("Commit")), (0, 1));
    assert_eq!(a.count("GetTransaction"), 0);
}

#[tokio::test]
async fn a_commit_whose_answer_was_lost_is_outcome_unknown_with_its_txid_and_not_resent() {
    let a = Fake::start("a", 7, &[("Commit", Behaviour::Unavailable)]).await;
    let b = Fake::start("b", 7, &[]).await;
    let client = Client::connect([a.url.clone(), b.url.clone()]).await.unwrap();
    let txn = client.begin(None).await.unwrap();
    let error = txn.commit(false).await.unwrap_err();
    assert!(
        matches!(&error, ClientError::OutcomeUnknown { rpc: Rpc::Commit, txid: Some(7), endpoint, .. } if *endpoint == a.url),
        "{error:?}"
    );
    assert!(error.to_string().contains("transaction 7"), "{error}");
    assert_eq!((a.count("Commit"), b.count("Commit")), (1, 0));
    // The lookup the error asks for goes to the instance that ran it.
    let info = client.transaction_on(&a.url, 7).await.unwrap();
    assert_eq!(info.gid, "treaty:a:7");
    assert_eq!(b.count("GetTransaction"), 0);
}

#[tokio::test]
async fn a_transaction_whose_coordinator_stopped_is_not_continued_elsewhere() {
    let a = Fake::start("a", 3, &[]).await;
    let b = Fake::start("b", 3, &[]).await;
    let client = Client::connect([a.url.clone(), b.url.clone()]).await.unwrap();
    let txn = client.begin(None).await.unwrap();
    let a_url = a.url.clone();
    a.stop().await;

    let error = txn.execute("s0", "UPDATE t SET v = 1", vec![]).await.unwrap_err();
    assert!(
        matches!(
            &error,
            ClientError::CoordinatorUnreachable { txid: Some(3), .. }
                | ClientError::OutcomeUnknown { txid: Some(3), .. }
        ),
        "{error:?}"
    );
    let error = txn.commit(false).await.unwrap_err();
    assert!(
        matches!(&error, ClientError::CoordinatorUnreachable { rpc: Rpc::Commit, txid: Some(3), endpoint, .. } if *endpoint == a_url),
        "{error:?}"
    );
    assert_eq!(
        (b.count("Execute"), b.count("Commit")),
        (0, 0),
        "txid 3 means nothing on b"
    );
}

#[tokio::test]
async fn lookups_and_begin_move_on_when_the_current_coordinator_stopped() {
    let a = Fake::start("a", 1, &[]).await;
    let b = Fake::start("b", 2, &[]).await;
    let client = Client::connect([a.url.clone(), b.url.clone()]).await.unwrap();
    assert_eq!(client.info().await.unwrap().coordinator_id, "a");
    let a_calls = a.stop().await;

    assert_eq!(client.info().await.unwrap().coordinator_id, "b");
    assert_eq!(client.current_endpoint(), b.url);
    let txn = client.begin(None).await.unwrap();
    assert_eq!(txn.endpoint(), b.url);
    assert_eq!(a_calls.count("Begin"), 0);
    assert_eq!((b.count("Info"), b.count("Begin")), (1, 1));
}
