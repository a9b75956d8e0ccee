//! The fault proxy over real TCP on 127.0.0.1: forwarding, black holes, resets, delays, named
//! partitions, and the loopback-only rule.

// Test helpers outside `#[test]` functions unwrap too (`allow-unwrap-in-tests` covers only those).
#![allow(clippy::unwrap_used)]

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use treaty_harness::{Fault, FaultNetwork, FaultProxy, HarnessError};

/// Long enough to never fire on a healthy machine; only guards against a hung test.
const GUARD: Duration = Duration::from_secs(10);
/// How long bytes must stay away to count as not forwarded under `Drop`.
const ABSENT: Duration = Duration::from_millis(300);

/// An echo server on 127.0.0.1; runs until the test's runtime ends.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(GUARD, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap()
}

async fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    tokio::time::timeout(GUARD, stream.read_exact(&mut buf))
        .await
        .expect("read timed out")
        .unwrap();
    buf
}

/// Sends `msg` and expects it back.
async fn assert_echo(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    assert_eq!(read_exact(stream, msg.len()).await, msg);
}

/// Asserts that nothing arrives on `stream` within [`ABSENT`].
async fn assert_nothing_arrives(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(ABSENT, stream.read(&mut buf)).await {
        Err(_elapsed) => {}
        Ok(result) => panic!("expected silence, got {result:?}"),
    }
}

/// Asserts that the connection was torn down: a read ends in an error (RST) or EOF.
async fn assert_torn_down(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let result = tokio::time::timeout(GUARD, stream.read(&mut buf))
        .await
        .expect("connection stayed open");
    assert!(
        matches!(result, Err(_) | Ok(0)),
        "expected an error or EOF, got {result:?}"
    );
}

/// Asserts that the connection was reset (RST), not closed: a read fails with ECONNRESET.
async fn assert_reset(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let result = tokio::time::timeout(GUARD, stream.read(&mut buf))
        .await
        .expect("connection stayed open");
    match result {
        Err(error) => assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}"),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
}

/// A connection through `proxy` plus the target's end of it, so that each end can be driven.
async fn pair(proxy: &FaultProxy, target: &TcpListener) -> (TcpStream, TcpStream) {
    let client = connect(proxy.addr()).await;
    let (server, _) = tokio::time::timeout(GUARD, target.accept())
        .await
        .unwrap()
        .unwrap();
    (client, server)
}

#[tokio::test]
async fn none_forwards_both_ways_and_half_close() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = FaultProxy::start("none", target.local_addr().unwrap())
        .await
        .unwrap();
    assert_eq!(proxy.fault(), Fault::None);
    assert_eq!(proxy.endpoint(), format!("http://{}", proxy.addr()));
    assert_eq!(proxy.target(), target.local_addr().unwrap());
    assert_eq!(proxy.name(), "none");

    let (mut client, mut server) = pair(&proxy, &target).await;
    client.write_all(b"ping").await.unwrap();
    assert_eq!(read_exact(&mut server, 4).await, b"ping");
    server.write_all(b"pong!").await.unwrap();
    assert_eq!(read_exact(&mut client, 5).await, b"pong!");

    // The client's FIN reaches the server, and the server can still answer afterwards.
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(GUARD, server.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    server.write_all(b"bye").await.unwrap();
    drop(server);
    let mut rest = Vec::new();
    tokio::time::timeout(GUARD, client.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, b"bye");

    let stats = proxy.stats();
    assert_eq!(stats.connections, 1);
    assert_eq!(stats.bytes_forwarded, 4 + 5 + 3);
    assert_eq!(stats.resets, 0);
}

#[tokio::test]
async fn drop_black_holes_both_directions_and_none_restores() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = FaultProxy::start("drop", target.local_addr().unwrap())
        .await
        .unwrap();
    let (mut client, mut server) = pair(&proxy, &target).await;
    client.write_all(b"hello").await.unwrap();
    assert_eq!(read_exact(&mut server, 5).await, b"hello");

    proxy.set(Fault::Drop);
    assert_eq!(proxy.fault(), Fault::Drop);
    // Writes succeed (the proxy reads on), but nothing arrives either way.
    client.write_all(b"lost request").await.unwrap();
    server.write_all(b"lost answer").await.unwrap();
    tokio::join!(
        assert_nothing_arrives(&mut server),
        assert_nothing_arrives(&mut client)
    );

    // A new connection is accepted but black-holed too.
    let mut during = connect(proxy.addr()).await;
    during.write_all(b"also lost").await.unwrap();
    assert_nothing_arrives(&mut during).await;

    // Healing resets the connections whose streams have holes; fresh ones work.
    proxy.set(Fault::None);
    assert_reset(&mut client).await;
    assert_torn_down(&mut server).await;
    assert_reset(&mut during).await;
    let (mut client, mut server) = pair(&proxy, &target).await;
    client.write_all(b"again").await.unwrap();
    assert_eq!(read_exact(&mut server, 5).await, b"again");
    server.write_all(b"back").await.unwrap();
    assert_eq!(read_exact(&mut client, 4).await, b"back");
}

#[tokio::test]
async fn drop_without_traffic_keeps_the_connection() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start("idle", echo).await.unwrap();
    let mut client = connect(proxy.addr()).await;
    assert_echo(&mut client, b"before").await;
    // Nothing was lost while the link was down, so the stream carries on.
    proxy.set(Fault::Drop);
    proxy.set(Fault::None);
    assert_echo(&mut client, b"after").await;
    assert_eq!(proxy.stats().resets, 0);
}

#[tokio::test]
async fn reset_aborts_existing_and_new_connections() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = FaultProxy::start("reset", target.local_addr().unwrap())
        .await
        .unwrap();
    let (mut client, mut server) = pair(&proxy, &target).await;
    client.write_all(b"x").await.unwrap();
    assert_eq!(read_exact(&mut server, 1).await, b"x");

    proxy.set(Fault::Reset);
    assert_reset(&mut client).await;
    assert_reset(&mut server).await;

    let mut fresh = connect(proxy.addr()).await;
    assert_reset(&mut fresh).await;
    assert!(proxy.stats().resets >= 2, "{:?}", proxy.stats());

    proxy.set(Fault::None);
    let (mut client, mut server) = pair(&proxy, &target).await;
    client.write_all(b"ok").await.unwrap();
    assert_eq!(read_exact(&mut server, 2).await, b"ok");
}

#[tokio::test]
async fn reset_sticks_even_when_undone_at_once() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start("blink", echo).await.unwrap();
    let mut old = connect(proxy.addr()).await;
    assert_echo(&mut old, b"one").await;
    // The connection tasks may never observe `Reset` itself; the reset must happen anyway.
    proxy.set(Fault::Reset);
    proxy.set(Fault::None);
    assert_reset(&mut old).await;
    let mut new = connect(proxy.addr()).await;
    assert_echo(&mut new, b"two").await;
}

#[tokio::test]
async fn reset_connections_resets_once_and_keeps_the_fault() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start("once", echo).await.unwrap();
    let mut old = connect(proxy.addr()).await;
    assert_echo(&mut old, b"one").await;

    proxy.reset_connections();
    assert_reset(&mut old).await;
    assert_eq!(proxy.fault(), Fault::None);
    let mut new = connect(proxy.addr()).await;
    assert_echo(&mut new, b"two").await;
    assert_eq!(proxy.stats().resets, 1);
}

#[tokio::test]
async fn delay_forwards_everything_in_order() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start("delay", echo).await.unwrap();
    let client = connect(proxy.addr()).await;
    let (mut r, mut w) = client.into_split();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected = data.clone();
    let proxy_w = proxy.clone();
    let writer = tokio::spawn(async move {
        proxy_w.set(Fault::Delay(Duration::from_millis(5)));
        // Many chunks under Delay, then the rest after switching back mid-stream: chunks still
        // held back must go first.
        for (i, chunk) in data.chunks(10_000).enumerate() {
            if i == 60 {
                proxy_w.set(Fault::None);
            }
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(GUARD, r.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "bytes reordered or changed");
    assert_eq!(proxy.stats().bytes_forwarded, 2 * expected.len() as u64);
}

#[tokio::test]
async fn network_partition_cuts_both_directions_and_heal_restores() {
    let (a, b, c) = (echo_server().await, echo_server().await, echo_server().await);
    let mut net = FaultNetwork::new();
    let a_to_b = net.link("a", "b", b).await.unwrap();
    let b_to_a = net.link("b", "a", a).await.unwrap();
    let a_to_c = net.link("a", "c", c).await.unwrap();
    assert!(matches!(
        net.link("a", "b", b).await,
        Err(HarnessError::Invalid(_))
    ));
    assert_eq!(net.get("a", "b").map(FaultProxy::addr), Some(a_to_b.addr()));
    assert!(net.get("c", "a").is_none());
    let names: Vec<(&str, &str)> = net.links().map(|(from, to, _)| (from, to)).collect();
    assert_eq!(names, [("a", "b"), ("a", "c"), ("b", "a")]);

    net.partition(&["a"], &["b"]);
    assert_eq!(a_to_b.fault(), Fault::Drop);
    assert_eq!(b_to_a.fault(), Fault::Drop);
    assert_eq!(a_to_c.fault(), Fault::None);
    for proxy in [&a_to_b, &b_to_a] {
        let mut stream = connect(proxy.addr()).await;
        stream.write_all(b"across").await.unwrap();
        assert_nothing_arrives(&mut stream).await;
    }
    let mut unaffected = connect(a_to_c.addr()).await;
    assert_echo(&mut unaffected, b"a to c").await;

    net.set_between(&["c"], &["a"], Fault::Delay(Duration::from_millis(1)));
    assert_eq!(a_to_c.fault(), Fault::Delay(Duration::from_millis(1)));
    assert_eq!(a_to_b.fault(), Fault::Drop);

    net.heal();
    for (_, _, proxy) in net.links() {
        assert_eq!(proxy.fault(), Fault::None);
        let mut stream = connect(proxy.addr()).await;
        assert_echo(&mut stream, b"healed").await;
    }
}

#[tokio::test]
async fn non_loopback_addresses_are_refused() {
    let outside: SocketAddr = "192.0.2.1:5432".parse().unwrap();
    assert!(matches!(
        FaultProxy::start("out", outside).await,
        Err(HarnessError::Invalid(_))
    ));
    let echo = echo_server().await;
    let listen: SocketAddr = "0.0.0.0:0".parse().unwrap();
    assert!(matches!(
        FaultProxy::start_on("wide", listen, echo).await,
        Err(HarnessError::Invalid(_))
    ));
    let mut net = FaultNetwork::new();
    assert!(net.link("a", "b", outside).await.is_err());
    assert_eq!(net.links().count(), 0);
}

#[tokio::test]
async fn unreachable_target_resets_the_client() {
    // A port that was free a moment ago: nothing listens there.
    let port = treaty_harness::free_loopback_port().unwrap();
    let proxy = FaultProxy::start("nowhere", SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    let mut client = connect(proxy.addr()).await;
    assert_reset(&mut client).await;
}

#[tokio::test]
async fn shutdown_closes_connections_and_stops_listening() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start("stop", echo).await.unwrap();
    let addr = proxy.addr();
    let mut client = connect(addr).await;
    assert_echo(&mut client, b"hi").await;

    proxy.shutdown();
    assert_torn_down(&mut client).await;
    // The accept task drops the listener asynchronously: poll until connects are refused.
    tokio::time::timeout(GUARD, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("still listening after shutdown");

    // Dropping the last handle shuts down as well; a proxy can come back on the same address.
    let again = FaultProxy::start_on("again", addr, echo).await.unwrap();
    let mut client = connect(addr).await;
    assert_echo(&mut client, b"back").await;
    drop(again);
    assert_torn_down(&mut client).await;
}
