//! Bytes through the tunnel: exact content both ways, many at once, half-close, idleness.

use std::time::Duration;

use ptth_tests::taps::CountingForwarder;
use ptth_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_sha256_equal() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let w = World::start(WorldOptions::echo(echo)).await.expect("world");
        transfer_each_way(w.local(), 64 << 20, 7).await;
        w.relay
            .expect_no_tunnels(Duration::from_secs(5), "relay frees the connection's state")
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_connections() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let w = World::start(WorldOptions::echo(echo)).await.expect("world");
        let local = w.local();
        let tasks: Vec<_> = (0..100u64)
            .map(|i| tokio::spawn(transfer_each_way(local, 64 * 1024 + i as usize, i)))
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        w.relay
            .expect_no_tunnels(Duration::from_secs(5), "relay frees every connection")
            .await;
    })
    .await;
}

/// A service that reads the whole request until EOF, then sends `reply` and closes.
async fn reply_after_eof(
    reply: Vec<u8>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.expect("read request");
        s.write_all(&reply).await.expect("write reply");
        s.shutdown().await.expect("shutdown");
        req
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_still_receives_whole_reply() {
    within(LIMIT, async {
        let reply = random_bytes(3 << 20, 11);
        let (svc, task) = reply_after_eof(reply.clone()).await;
        let w = World::start(WorldOptions::echo(svc)).await.expect("world");
        let got = round_trip(w.local(), b"the request")
            .await
            .expect("round trip");
        assert_eq!(got.len(), reply.len());
        assert!(got == reply, "reply differs");
        assert_eq!(task.await.expect("service"), b"the request");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_half_close_still_receives_whole_upstream() {
    within(LIMIT, async {
        // The service greets, shuts down its write side at once, then reads everything.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let svc = l.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            s.write_all(b"hello, send me everything")
                .await
                .expect("greet");
            s.shutdown().await.expect("shutdown");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            got
        });
        let w = World::start(WorldOptions::echo(svc)).await.expect("world");
        let mut s = TcpStream::connect(w.local()).await.expect("connect");
        let mut greeting = Vec::new();
        s.read_to_end(&mut greeting)
            .await
            .expect("EOF after greeting");
        assert_eq!(greeting, b"hello, send me everything");
        let upstream = random_bytes(5 << 20, 3);
        s.write_all(&upstream)
            .await
            .expect("upstream after the service's FIN");
        s.shutdown().await.expect("shutdown");
        let got = task.await.expect("service");
        assert!(got == upstream, "upstream differs ({} bytes)", got.len());
        w.relay
            .expect_no_tunnels(Duration::from_secs(5), "relay frees the connection's state")
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_an_idle_tunnel_open_past_idle_timeout() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut opts = WorldOptions::echo(echo);
        opts.relay_extra = "idle_timeout = \"1s\"\nheartbeat_interval = \"200ms\"".into();
        opts.server_extra = "heartbeat_interval = \"200ms\"".into();
        opts.proxy_extra = "heartbeat_interval = \"200ms\"".into();
        let w = World::start(opts).await.expect("world");
        let mut s = TcpStream::connect(w.local()).await.expect("connect");
        s.write_all(b"one").await.expect("write");
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf).await.expect("read");
        // Idle for three idle timeouts: only heartbeats cross.
        tokio::time::sleep(Duration::from_secs(3)).await;
        s.write_all(b"two").await.expect("write after idle");
        s.read_exact(&mut buf).await.expect("read after idle");
        assert_eq!(&buf, b"two");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_closes_a_silent_connection_after_idle_timeout() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut opts = WorldOptions::echo(echo);
        // Heartbeats far apart: the tunnel is silent for longer than idle_timeout.
        opts.relay_extra = "idle_timeout = \"1s\"".into();
        opts.server_extra = "heartbeat_interval = \"60s\"".into();
        opts.proxy_extra = "heartbeat_interval = \"60s\"".into();
        let w = World::start(opts).await.expect("world");
        let mut s = TcpStream::connect(w.local()).await.expect("connect");
        s.write_all(b"x").await.expect("write");
        let mut buf = [0u8; 1];
        s.read_exact(&mut buf).await.expect("read");
        let started = tokio::time::Instant::now();
        let (rest, reset) =
            tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut s))
                .await
                .expect("the relay closes the idle tunnel");
        assert!(rest.is_empty());
        assert!(
            reset,
            "an idle timeout is an abort: the local socket must be reset"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "closed before idle_timeout"
        );
        w.relay
            .expect_no_tunnels(Duration::from_secs(5), "relay frees the connection's state")
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_closes_are_never_reported_as_aborts() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let w = World::start(WorldOptions::echo(echo)).await.expect("world");
        for i in 0..300u64 {
            let data = random_bytes(100 + i as usize, i);
            let got = round_trip(w.local(), &data).await.expect("round trip");
            assert!(got == data, "round trip {i}");
        }
        w.relay
            .expect_no_tunnels(Duration::from_secs(5), "relay frees every connection")
            .await;
        let server = w.server.as_ref().expect("server");
        for (who, logs) in [
            ("client proxy", w.proxy.logs()),
            ("server proxy", server.logs()),
        ] {
            let text = logs.text();
            assert!(
                !text.contains("aborted"),
                "{who} reported a clean close as an abort:\n{text}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_carries_every_tunnel_of_a_proxy_on_one_connection() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let setup = Setup::new().expect("setup");
        let relay = setup.start_relay().expect("relay");
        let server_counter = CountingForwarder::start(relay.addr)
            .await
            .expect("forwarder");
        let server_config = setup
            .server_config_url(
                &format!("h2c://{}", server_counter.addr),
                &[("echo", echo.to_string())],
                "",
            )
            .expect("server config");
        let server = start_server(server_config, setup.server_key.clone());
        relay
            .expect_server_channels(2, Duration::from_secs(20), "server proxy listens over h2c")
            .await;
        let counter = CountingForwarder::start(relay.addr)
            .await
            .expect("forwarder");
        let proxy_config = setup
            .proxy_config_url(
                &format!("h2c://{}", counter.addr),
                "alice",
                &[("db", "echo")],
                "",
            )
            .expect("proxy config");
        let (proxy, addrs) = start_proxy(proxy_config, setup.alice_key.clone()).expect("proxy");
        transfer_each_way(addrs[0], 1024, 1).await;
        assert_eq!(
            counter.total(),
            1,
            "the client proxy dialled more than once"
        );
        counter.reset_peak();
        let tunnels: Vec<_> = (0..100u64)
            .map(|i| tokio::spawn(transfer_each_way(addrs[0], 64 * 1024 + i as usize, i)))
            .collect();
        for t in tunnels {
            t.await.expect("tunnel");
        }
        assert_eq!(
            counter.peak(),
            1,
            "100 tunnels over h2c used more than one connection"
        );
        assert_eq!(counter.total(), 1, "the client proxy reconnected");
        assert_eq!(
            server_counter.total(),
            1,
            "the server proxy used more than one connection"
        );
        relay
            .expect_no_tunnels(Duration::from_secs(5), "relay frees every connection")
            .await;
        for (who, logs) in [
            ("client proxy", proxy.logs()),
            ("server proxy", server.logs()),
        ] {
            let problems = logs.problems();
            assert!(
                problems.is_empty(),
                "{who} logged problems:\n{}",
                problems.join("\n")
            );
        }
    })
    .await;
}

/// Over HTTP/1.1 each request of a channel has a TCP connection of its own, and nothing else
/// is dialled: a server proxy keeping two channels makes exactly four connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_dials_one_connection_per_request_and_no_more() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let setup = Setup::new().expect("setup");
        let relay = setup.start_relay().expect("relay");
        let counter = CountingForwarder::start(relay.addr)
            .await
            .expect("forwarder");
        let server_config = setup
            .server_config_url(
                &format!("http://{}", counter.addr),
                &[("echo", echo.to_string())],
                "listen_pool = 2",
            )
            .expect("server config");
        let server = start_server(server_config, setup.server_key.clone());
        relay
            .expect_server_channels(2, Duration::from_secs(20), "two channels ready")
            .await;
        // A channel is ready once both its requests have arrived, and the pool opens no more.
        assert_eq!(counter.total(), 4, "connections for two channels");
        assert!(server.stop().await, "server proxy stops within its grace");
    })
    .await;
}
