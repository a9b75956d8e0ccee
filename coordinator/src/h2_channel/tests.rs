//! `H2Channel` against a small HTTP/2 server (the `h2` crate's) on loopback that speaks just
//! enough gRPC for `Participant/Status`: answers, error statuses, restarts, and a peer that stops
//! answering.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use treaty_proto::pb;
use treaty_proto::pb::participant_client::ParticipantClient;

use super::{H2Channel, KeepAlive};

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// `StatusResponse { shard: <the request's gid> }`.
    Echo,
    /// A trailers-only answer: FAILED_PRECONDITION.
    Refuse,
    /// Headers, then UNIMPLEMENTED in the trailers (what an older participant answers).
    UnimplementedInTrailers,
    /// An answer larger than the client's 2 MiB stream window.
    Large,
    /// The first request this server gets is reset with REFUSED_STREAM (as a server at its stream
    /// limit does); later ones are echoed.
    RefuseFirstStream,
    /// Every request is reset with REFUSED_STREAM.
    RefuseEveryStream,
    /// The first connection answers its first request with a GOAWAY saying no stream was
    /// processed (as a server shutting down does); later connections echo.
    GoAwayFirstConnection,
}

/// An echoing server never answers a request for this GID.
const NEVER_ANSWERED: &str = "treaty:c1:never";

/// Bytes in a `Large` answer: more than one stream window, so the client must give the window back.
const LARGE: usize = 3 * 1024 * 1024;

struct Server {
    address: String,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    /// Requests received so far, answered or not (on connections `serve` speaks on).
    requests: Arc<AtomicUsize>,
    /// Stops every connection from being polled (no more answers, no pongs); sockets stay open.
    hang: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(behaviour: Behaviour) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::on(listener, behaviour)
    }

    fn on(listener: TcpListener, behaviour: Behaviour) -> Server {
        let address = listener.local_addr().expect("local address").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let hang = Arc::new(Notify::new());
        let task = tokio::spawn({
            let accepted = accepted.clone();
            let requests = requests.clone();
            let hang = hang.clone();
            async move {
                // Dropped with this task, which aborts every connection: a stopped server's
                // sockets close.
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((socket, _)) = listener.accept().await {
                    let first = accepted.fetch_add(1, Ordering::SeqCst) == 0;
                    if behaviour == Behaviour::GoAwayFirstConnection && first {
                        connections.spawn(go_away_unprocessed(socket));
                        continue;
                    }
                    let connection = Connection {
                        behaviour,
                        requests: requests.clone(),
                        hang: hang.clone(),
                    };
                    connections.spawn(serve(socket, connection));
                }
            }
        });
        Server {
            address,
            accepted,
            requests,
            hang,
            task,
        }
    }

    /// Stops accepting and closes every connection; returns once the port is free again.
    async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one served connection shares with its server.
struct Connection {
    behaviour: Behaviour,
    requests: Arc<AtomicUsize>,
    hang: Arc<Notify>,
}

async fn serve(socket: TcpStream, shared: Connection) {
    let Ok(mut connection) = h2::server::handshake(socket).await else {
        return;
    };
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = shared.hang.notified() => {
                // Keep the socket open and never poll it again: no answers, no pongs.
                let _silent = connection;
                return std::future::pending().await;
            }
        };
        let Some(Ok((request, mut respond))) = next else {
            return;
        };
        let nth = shared.requests.fetch_add(1, Ordering::SeqCst);
        let refuse = match shared.behaviour {
            Behaviour::RefuseFirstStream => nth == 0,
            Behaviour::RefuseEveryStream => true,
            _ => false,
        };
        if refuse {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            continue;
        }
        tokio::spawn(answer(request, respond, shared.behaviour));
    }
}

/// Speaks just enough HTTP/2 to answer the first request with a GOAWAY whose last processed
/// stream is 0, which the `h2` server cannot be made to send once it has read the request.
async fn go_away_unprocessed(mut socket: TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut preface = [0u8; 24];
    if socket.read_exact(&mut preface).await.is_err() {
        return;
    }
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    if socket.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.is_err() {
        return;
    }
    loop {
        let mut header = [0u8; 9];
        if socket.read_exact(&mut header).await.is_err() {
            return;
        }
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0; length];
        if socket.read_exact(&mut payload).await.is_err() {
            return;
        }
        const HEADERS: u8 = 1;
        if header[3] == HEADERS {
            // GOAWAY: length 8, type 7, stream 0; last stream id 0, error code NO_ERROR.
            let mut go_away = vec![0, 0, 8, 7, 0, 0, 0, 0, 0];
            go_away.extend_from_slice(&[0; 8]);
            let _ = socket.write_all(&go_away).await;
            // Open until the client closes it, so the GOAWAY is read before any end of file.
            let _ = socket.read_to_end(&mut Vec::new()).await;
            return;
        }
    }
}

async fn answer(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    behaviour: Behaviour,
) {
    assert_eq!(request.uri().path(), "/treaty.v1.Participant/Status");
    let mut body = request.into_body();
    let mut received = BytesMut::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        received.extend_from_slice(&chunk);
    }
    // gRPC framing: 1 byte compressed flag, 4 bytes length, the message.
    let request = pb::StatusRequest::decode(&received[5..]).expect("a StatusRequest");
    match behaviour {
        Behaviour::Refuse => {
            let response = grpc_headers()
                .header("grpc-status", "9")
                .header("grpc-message", "branch is still open")
                .body(())
                .expect("response");
            let _ = respond.send_response(response, true);
        }
        Behaviour::UnimplementedInTrailers => {
            let response = grpc_headers().body(()).expect("response");
            let Ok(mut stream) = respond.send_response(response, false) else {
                return;
            };
            let _ = stream.send_trailers(grpc_trailers("12", Some("no CommitBatch here")));
        }
        _ if request.gid == NEVER_ANSWERED => std::future::pending().await,
        Behaviour::Echo
        | Behaviour::Large
        | Behaviour::RefuseFirstStream
        | Behaviour::RefuseEveryStream
        | Behaviour::GoAwayFirstConnection => {
            let response = grpc_headers().body(()).expect("response");
            let Ok(mut stream) = respond.send_response(response, false) else {
                return;
            };
            let database = if behaviour == Behaviour::Large {
                "x".repeat(LARGE)
            } else {
                String::new()
            };
            let message = pb::StatusResponse {
                shard: request.gid,
                database,
                ..Default::default()
            }
            .encode_to_vec();
            let mut frame = BytesMut::new();
            frame.put_u8(0);
            frame.put_u32(message.len() as u32);
            frame.extend_from_slice(&message);
            let _ = stream.send_data(frame.freeze(), false);
            let _ = stream.send_trailers(grpc_trailers("0", None));
        }
    }
}

fn grpc_headers() -> http::response::Builder {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
}

fn grpc_trailers(status: &'static str, message: Option<&'static str>) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static(status));
    if let Some(message) = message {
        trailers.insert("grpc-message", http::HeaderValue::from_static(message));
    }
    trailers
}

fn client(url: &str) -> ParticipantClient<H2Channel> {
    ParticipantClient::new(H2Channel::new(url, Duration::from_secs(1), None).expect("a valid URL"))
}

/// A channel that pings every 50 ms and gives up on a pong after 500 ms.
fn fast_keep_alive_channel(url: &str) -> H2Channel {
    let keep_alive = KeepAlive {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
    };
    H2Channel::with_keep_alive(url, Duration::from_secs(1), keep_alive, None).expect("a valid URL")
}

/// Waits (bounded) until the channel has received `n` more pongs than it had.
async fn await_pongs(channel: &H2Channel, n: u64) {
    let start = channel.inner.pongs.load(Ordering::Relaxed);
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while channel.inner.pongs.load(Ordering::Relaxed) < start + n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "no {n} keep-alive rounds within 10 s");
}

async fn status(
    client: &ParticipantClient<H2Channel>,
    gid: &str,
) -> Result<pb::StatusResponse, tonic::Status> {
    let mut client = client.clone();
    let request = pb::StatusRequest { gid: gid.to_owned() };
    tokio::time::timeout(Duration::from_secs(5), client.status(request))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("test call took over 5 s"))?
        .map(tonic::Response::into_inner)
}

/// A server behaving as told, and the answer to one call to it (GID `treaty:c1:1`).
async fn one_call(behaviour: Behaviour) -> (Server, Result<pb::StatusResponse, tonic::Status>) {
    let server = Server::start(behaviour).await;
    let answer = status(&client(&server.url()), "treaty:c1:1").await;
    (server, answer)
}

/// Whether one of up to `tries` calls, one after another, is answered.
async fn answered_within(client: &ParticipantClient<H2Channel>, tries: usize) -> bool {
    for _ in 0..tries {
        if status(client, "treaty:c1:again").await.is_ok() {
            return true;
        }
        tokio::task::yield_now().await;
    }
    false
}

#[tokio::test]
async fn concurrent_calls_get_their_own_answers_over_one_connection() {
    let server = Server::start(Behaviour::Echo).await;
    let client = client(&server.url());
    let calls = (0..32).map(|i| {
        let client = client.clone();
        async move { (i, status(&client, &format!("treaty:c1:{i}")).await) }
    });
    for (i, answer) in futures::future::join_all(calls).await {
        let answer = answer.expect("the server answers every call");
        assert_eq!(
            answer.shard,
            format!("treaty:c1:{i}"),
            "call {i} got another call's answer"
        );
    }
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "every call shares one connection"
    );
}

#[tokio::test]
async fn an_error_status_reaches_the_caller_with_its_code_and_message() {
    let (_server, error) = one_call(Behaviour::Refuse).await;
    let error = error.expect_err("the server refuses");
    assert_eq!(error.code(), tonic::Code::FailedPrecondition);
    assert_eq!(error.message(), "branch is still open");
}

#[tokio::test]
async fn a_participant_that_is_down_is_unavailable_and_is_reached_once_it_is_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("local address");
    drop(listener);
    let client = client(&format!("http://{address}"));

    let error = status(&client, "treaty:c1:1").await.expect_err("nothing listens");
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    assert!(error.message().contains("cannot connect"), "{error:?}");

    let server = Server::on(TcpListener::bind(address).await.expect("rebind"), Behaviour::Echo);
    let answer = status(&client, "treaty:c1:2")
        .await
        .expect("reached after the restart");
    assert_eq!(answer.shard, "treaty:c1:2");

    // The participant restarts again: its old connection is gone, a new one is opened.
    server.stop().await;
    let server = Server::on(TcpListener::bind(address).await.expect("rebind"), Behaviour::Echo);
    // A call racing the close of the old connection may fail once; the next one reconnects.
    assert!(
        answered_within(&client, 50).await,
        "calls never reached the restarted participant"
    );
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_error_status_in_the_trailers_reaches_the_caller() {
    let (_server, error) = one_call(Behaviour::UnimplementedInTrailers).await;
    let error = error.expect_err("the server has no such method");
    // participants.rs falls back from CommitBatch to Commit on exactly this code.
    assert_eq!(error.code(), tonic::Code::Unimplemented, "{error:?}");
    assert_eq!(error.message(), "no CommitBatch here");
}

#[tokio::test]
async fn an_answer_larger_than_the_stream_window_arrives_whole() {
    let (_server, answer) = one_call(Behaviour::Large).await;
    let answer = answer.expect("the whole answer: the client gives the flow-control window back as it reads");
    assert_eq!(answer.database.len(), LARGE);
}

#[tokio::test]
async fn a_healthy_connection_survives_keep_alive_rounds() {
    let server = Server::start(Behaviour::Echo).await;
    let channel = fast_keep_alive_channel(&server.url());
    let client = ParticipantClient::new(channel.clone());
    status(&client, "treaty:c1:1").await.expect("first call");
    await_pongs(&channel, 3).await;
    status(&client, "treaty:c1:2")
        .await
        .expect("a call after the pings");
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "the answered pings kept the connection"
    );
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped_and_the_next_call_reconnects() {
    let server = Server::start(Behaviour::Echo).await;
    let client = ParticipantClient::new(fast_keep_alive_channel(&server.url()));
    status(&client, "treaty:c1:1").await.expect("first call");
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);

    // The connection's socket stays open but nothing answers, not even pings.
    server.hang.notify_waiters();
    // A call sent before keep-alive gave up on the silent connection fails when it does.
    assert!(
        answered_within(&client, 10).await,
        "no call got through after the connection went silent"
    );
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        2,
        "keep-alive dropped the silent connection and the call opened a new one"
    );
}

#[tokio::test]
async fn a_stream_refused_unprocessed_is_sent_again_on_the_same_connection() {
    let (server, answer) = one_call(Behaviour::RefuseFirstStream).await;
    let answer = answer.expect("the refused call is sent once more and answered");
    assert_eq!(answer.shard, "treaty:c1:1");
    assert_eq!(server.requests.load(Ordering::SeqCst), 2);
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "a refused stream leaves its connection usable"
    );
}

#[tokio::test]
async fn a_call_refused_twice_is_unavailable_after_exactly_two_tries() {
    let (server, error) = one_call(Behaviour::RefuseEveryStream).await;
    let error = error.expect_err("every stream is refused");
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    assert!(error.message().contains("refused unprocessed"), "{error:?}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_call_above_a_goaway_is_sent_again_on_a_new_connection() {
    let (server, answer) = one_call(Behaviour::GoAwayFirstConnection).await;
    let answer = answer.expect("the call the closing connection did not process is answered on a new one");
    assert_eq!(answer.shard, "treaty:c1:1");
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_call_dropped_in_flight_leaves_the_connection_usable() {
    let server = Server::start(Behaviour::Echo).await;
    let client = client(&server.url());
    let mut dropped = client.clone();
    let request = pb::StatusRequest {
        gid: NEVER_ANSWERED.to_owned(),
    };
    tokio::select! {
        answer = dropped.status(request) => panic!("the server never answers this call: {answer:?}"),
        // Dropped once the server has it, so the stream really is in flight.
        () = async {
            while server.requests.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        } => {}
    }
    let answer = status(&client, "treaty:c1:2")
        .await
        .expect("a later call is answered");
    assert_eq!(answer.shard, "treaty:c1:2");
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "no new connection was needed"
    );
}
