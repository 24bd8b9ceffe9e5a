//! Aborts propagate: whatever breaks, all four streams and both TCP sockets close within 2 s,
//! and the relay frees the connection's state.

use std::net::SocketAddr;
use std::time::Duration;

use ptth_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const LIMIT: Duration = Duration::from_secs(60);
const PROPAGATION: Duration = Duration::from_secs(2);

/// A one-connection service; `f` gets the accepted socket.
async fn service<F, Fut>(f: F) -> SocketAddr
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let (s, _) = l.accept().await.expect("accept");
        f(s).await;
    });
    addr
}

/// Keeps writing to `w` until it fails; returns how it failed.
fn spawn_writer(
    mut w: tokio::net::tcp::OwnedWriteHalf,
) -> tokio::task::JoinHandle<std::io::ErrorKind> {
    tokio::spawn(async move {
        let chunk = random_bytes(64 * 1024, 5);
        loop {
            if let Err(e) = w.write_all(&chunk).await {
                return e.kind();
            }
        }
    })
}

/// For a socket that is read and written at once: the reset must show on one side or the
/// other (whichever syscall meets it first consumes the error; the other then sees EOF or a
/// broken pipe).
async fn expect_reset_while_writing(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    writer: tokio::task::JoinHandle<std::io::ErrorKind>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let read_end = tokio::time::timeout(PROPAGATION, async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return None,
                Err(e) => return Some(e.kind()),
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("local socket still readable 2 s after the abort");
    let write_end = tokio::time::timeout(PROPAGATION, writer)
        .await
        .expect("local socket still writable 2 s after the abort")
        .expect("join");
    use std::io::ErrorKind::ConnectionReset;
    assert!(
        read_end == Some(ConnectionReset) || write_end == ConnectionReset,
        "abort reached the local socket without a reset (read: {read_end:?}, write: {write_end:?})"
    );
}

/// The local socket must be reset, not closed cleanly: a clean EOF would pass the truncated
/// stream off as complete.
async fn expect_closed(r: &mut tokio::net::tcp::OwnedReadHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(PROPAGATION, async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return Err("clean EOF"),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(_) => return Err("an error other than a reset"),
                Ok(_) => {}
            }
        }
    })
    .await;
    match closed {
        Err(_) => panic!("local socket still open {PROPAGATION:?} after the abort"),
        Ok(Err(what)) => panic!("abort reached the local socket as {what}, not as a reset"),
        Ok(Ok(())) => {}
    }
}

async fn expect_state_freed(w: &World) {
    w.relay
        .expect_no_tunnels(PROPAGATION, "relay still holds the connection's state")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_reset_mid_transfer_reaches_the_client() {
    within(LIMIT, async {
        let (reset_tx, reset_rx) = oneshot::channel();
        let svc = service(|mut s| async move {
            let mut buf = vec![0u8; 256 * 1024];
            let _ = s.read_exact(&mut buf).await;
            s.write_all(b"partial answer").await.expect("write");
            s.set_zero_linger().expect("linger");
            drop(s);
            let _ = reset_tx.send(());
        })
        .await;
        let w = World::start(WorldOptions::echo(svc)).await.expect("world");
        let (mut r, wr) = TcpStream::connect(w.local())
            .await
            .expect("connect")
            .into_split();
        let writer = spawn_writer(wr);
        reset_rx.await.expect("service reset");
        expect_reset_while_writing(&mut r, writer).await;
        expect_state_freed(&w).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_close_mid_upstream_reaches_the_client() {
    within(LIMIT, async {
        let (closed_tx, closed_rx) = oneshot::channel();
        let svc = service(|mut s| async move {
            let mut buf = vec![0u8; 256 * 1024];
            let _ = s.read_exact(&mut buf).await;
            drop(s);
            let _ = closed_tx.send(());
        })
        .await;
        let w = World::start(WorldOptions::echo(svc)).await.expect("world");
        let (mut r, wr) = TcpStream::connect(w.local())
            .await
            .expect("connect")
            .into_split();
        let writer = spawn_writer(wr);
        closed_rx.await.expect("service closed");
        expect_reset_while_writing(&mut r, writer).await;
        expect_state_freed(&w).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_mid_downstream_reaches_the_service() {
    within(LIMIT, async {
        let (failed_tx, failed_rx) = oneshot::channel();
        let svc = service(|mut s| async move {
            let chunk = random_bytes(64 * 1024, 9);
            let failed = loop {
                if let Err(e) = s.write_all(&chunk).await {
                    break e.kind();
                }
            };
            let _ = failed_tx.send(failed);
        })
        .await;
        let w = World::start(WorldOptions::echo(svc)).await.expect("world");
        let mut c = TcpStream::connect(w.local()).await.expect("connect");
        let mut buf = vec![0u8; 1 << 20];
        c.read_exact(&mut buf).await.expect("some downstream bytes");
        drop(c);
        let failed = tokio::time::timeout(PROPAGATION, failed_rx)
            .await
            .expect("service still writing 2 s after the client closed")
            .expect("service");
        assert_eq!(failed, std::io::ErrorKind::ConnectionReset);
        expect_state_freed(&w).await;
    })
    .await;
}

/// Writes to `w` until one write stays pending for a while: the path behind it is then full
/// (socket buffers and HTTP/2 windows), and the uploading endpoint waits for flow control.
/// Waiting here only finds that state; no assertion depends on how long it takes. A write that
/// is merely slow (a loaded machine) is given a second, longer chance before it counts as a
/// stall.
async fn write_until_stalled(w: &mut TcpStream) {
    let chunk = random_bytes(64 * 1024, 11);
    loop {
        let write = w.write_all(&chunk);
        tokio::pin!(write);
        let mut pending = 0;
        for wait in [Duration::from_millis(500), Duration::from_millis(1500)] {
            match tokio::time::timeout(wait, &mut write).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => panic!("write failed before the stall: {e}"),
                Err(_) => pending += 1,
            }
        }
        if pending == 2 {
            return;
        }
    }
}

/// Expects `s` to be reset within [`PROPAGATION`] (`what` names the abort for the message).
async fn expect_socket_reset(s: &TcpStream, what: &str) {
    let error = async {
        s.ready(tokio::io::Interest::ERROR).await.expect("ready");
        match s.take_error() {
            Ok(Some(e)) => e.kind(),
            other => panic!("error readiness without an error: {other:?}"),
        }
    };
    let kind = tokio::time::timeout(PROPAGATION, error)
        .await
        .unwrap_or_else(|_| panic!("socket not reset {PROPAGATION:?} after {what}"));
    assert_eq!(kind, std::io::ErrorKind::ConnectionReset, "after {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_during_a_stalled_upstream_reaches_the_service() {
    within(LIMIT, async {
        // The service never reads: the client's bytes fill every buffer on the way.
        let (sock_tx, sock_rx) = oneshot::channel();
        let svc = service(|s| async move {
            let _ = sock_tx.send(s);
        })
        .await;
        let w = World::start(WorldOptions::echo(svc)).await.expect("world");
        let mut c = TcpStream::connect(w.local()).await.expect("connect");
        let s = sock_rx.await.expect("service accepted");
        write_until_stalled(&mut c).await;
        c.set_zero_linger().expect("linger");
        drop(c);
        expect_socket_reset(&s, "the client reset its stalled upstream").await;
        expect_state_freed(&w).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_reset_during_a_stalled_downstream_reaches_the_client() {
    within(LIMIT, async {
        // The client never reads: the service's bytes fill every buffer on the way.
        let (reset_tx, reset_rx) = oneshot::channel();
        let svc = service(|mut s| async move {
            write_until_stalled(&mut s).await;
            s.set_zero_linger().expect("linger");
            drop(s);
            let _ = reset_tx.send(());
        })
        .await;
        let w = World::start(WorldOptions::echo(svc)).await.expect("world");
        let c = TcpStream::connect(w.local()).await.expect("connect");
        reset_rx.await.expect("service reset");
        expect_socket_reset(&c, "the service reset its stalled downstream").await;
        expect_state_freed(&w).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_proxy_killed_closes_the_client() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut w = World::start(WorldOptions::echo(echo)).await.expect("world");
        let (mut r, mut wr) = TcpStream::connect(w.local())
            .await
            .expect("connect")
            .into_split();
        wr.write_all(b"hi").await.expect("write");
        let mut buf = [0u8; 2];
        r.read_exact(&mut buf).await.expect("echo");
        w.server.take().expect("server").kill();
        expect_closed(&mut r).await;
        expect_state_freed(&w).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_proxy_killed_closes_the_service() {
    within(LIMIT, async {
        let (eof_tx, eof_rx) = oneshot::channel();
        let svc = service(|mut s| async move {
            let mut buf = [0u8; 1024];
            let end = loop {
                match s.read(&mut buf).await {
                    Ok(0) => break None,
                    Err(e) => break Some(e.kind()),
                    Ok(n) => {
                        if let Err(e) = s.write_all(&buf[..n]).await {
                            break Some(e.kind());
                        }
                    }
                }
            };
            let _ = eof_tx.send(end);
        })
        .await;
        let w = World::start(WorldOptions::echo(svc)).await.expect("world");
        let mut c = TcpStream::connect(w.local()).await.expect("connect");
        c.write_all(b"hi").await.expect("write");
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await.expect("echo");
        w.proxy.kill();
        let end = tokio::time::timeout(PROPAGATION, eof_rx)
            .await
            .expect("service socket still open 2 s after the client proxy died")
            .expect("service");
        assert_eq!(
            end,
            Some(std::io::ErrorKind::ConnectionReset),
            "the service must see an abort, not a clean end"
        );
        w.relay
            .expect_no_tunnels(PROPAGATION, "relay still holds the connection's state")
            .await;
    })
    .await;
}

/// Endpoints shut down with tunnels open reset the tunnels' sockets and end every task they
/// started, their connections to the relay included, within their shutdown grace: over
/// HTTP/1.1 (a connection per request) and over h2c (one connection shared by all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_stop_within_their_grace_with_tunnels_open() {
    within(LIMIT, async {
        for scheme in ["http", "h2c"] {
            let echo = echo_service().await.expect("echo");
            let setup = Setup::new().expect("setup");
            let relay = setup.start_relay().expect("relay");
            let url = format!("{scheme}://{}", relay.addr);
            let server_config = setup
                .server_config_url(&url, &[("echo", echo.to_string())], "")
                .expect("server config");
            let server = start_server(server_config, setup.server_key.clone());
            relay
                .expect_server_channels(2, Duration::from_secs(20), "server proxy listens")
                .await;
            let proxy_config = setup
                .proxy_config_url(&url, "alice", &[("db", "echo")], "")
                .expect("proxy config");
            let (proxy, addrs) = start_proxy(proxy_config, setup.alice_key.clone()).expect("proxy");
            let mut held = Vec::new();
            for i in 0..2u8 {
                let (mut r, mut w) = TcpStream::connect(addrs[0])
                    .await
                    .expect("connect")
                    .into_split();
                w.write_all(&[i; 4]).await.expect("write");
                let mut echoed = [0u8; 4];
                r.read_exact(&mut echoed).await.expect("echo");
                assert_eq!(echoed, [i; 4]);
                held.push((r, w));
            }
            let (proxy_logs, server_logs) = (proxy.logs().clone(), server.logs().clone());
            let (proxy_stopped, server_stopped) = tokio::join!(proxy.stop(), server.stop());
            for (who, stopped, logs) in [
                ("client proxy", proxy_stopped, proxy_logs),
                ("server proxy", server_stopped, server_logs),
            ] {
                let text = logs.text();
                assert!(stopped, "{scheme}: the {who} did not stop:\n{text}");
                assert!(
                    text.contains("shutting down"),
                    "{scheme}: the {who} never began its shutdown:\n{text}"
                );
                assert!(
                    !text.contains("still running after the shutdown grace"),
                    "{scheme}: the {who} left tasks running:\n{text}"
                );
            }
            for (r, _w) in &mut held {
                expect_closed(r).await;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restart_while_server_waits_then_new_connection_works() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let w = World::start(WorldOptions::echo(echo)).await.expect("world");
        assert_eq!(
            round_trip(w.local(), b"before").await.expect("before"),
            b"before"
        );
        let (mut r, _wr) = TcpStream::connect(w.local())
            .await
            .expect("connect")
            .into_split();
        let World {
            setup,
            relay,
            server,
            proxy,
            forwards,
        } = w;
        let addr = relay.addr;
        relay.component.stop().await;
        // The tunnel that was open dies with the relay.
        expect_closed(&mut r).await;
        let relay = start_relay(
            std::net::TcpListener::bind(addr).expect("rebind the same port"),
            setup.relay_config(addr).expect("config"),
        )
        .expect("restart relay");
        relay
            .expect_server_channels(
                2,
                Duration::from_secs(10),
                "server proxy came back by itself",
            )
            .await;
        let after = round_trip(forwards[0], b"after").await;
        assert!(
            after.as_ref().is_ok_and(|a| a == b"after"),
            "{after:?}\nclient proxy:\n{}\nserver proxy:\n{}\nrelay:\n{}",
            proxy.logs().text(),
            server.as_ref().map(|s| s.logs().text()).unwrap_or_default(),
            relay.component.logs().text()
        );
        drop((server, proxy));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_is_offline_at_once() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut w = World::start(WorldOptions::echo(echo)).await.expect("world");
        // One connection first: the server's channels have carried a connection.
        assert_eq!(
            round_trip(w.local(), b"hi").await.expect("round trip"),
            b"hi"
        );
        w.relay
            .expect_server_channels(2, PROPAGATION, "server channels ready again")
            .await;
        w.server.take().expect("server").kill();
        // The relay notices the dropped channels without waiting for them to time out.
        let mut ready = w.relay.ready_server_channels.clone();
        tokio::time::timeout(PROPAGATION, ready.wait_for(|n| *n == 0))
            .await
            .expect("relay still counts the dead server's channels")
            .expect("watch");
        // A connect is refused as "server offline" at once, not queued until accept_timeout.
        let alice = SignedClient::new(w.relay.addr, &w.setup.alice_key);
        let r = tokio::time::timeout(
            PROPAGATION,
            alice
                .post(&ptth_common::protocol::connect_path("db", "echo"))
                .header(
                    ptth_common::protocol::CHANNEL_ID_HEADER,
                    ptth_common::protocol::ChannelId::random()
                        .expect("id")
                        .to_string(),
                )
                .send(),
        )
        .await
        .expect("connect to a dead server must be answered at once")
        .expect("send");
        assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.text().await.expect("body").trim(), "server offline");
    })
    .await;
}
