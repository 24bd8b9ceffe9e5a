//! Bytes through the tunnel: exact content both ways, many at once, half-close.

use std::time::Duration;

use ptth_tests::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);

struct World {
    _setup: Setup,
    relay: RelayHandle,
    _server: Component,
    _proxy: Component,
    local: std::net::SocketAddr,
}

async fn world(target: std::net::SocketAddr) -> World {
    let setup = Setup::new().expect("setup");
    let l = bind_any().expect("bind");
    let relay = start_relay(
        l,
        setup
            .relay_config(bind_addr_placeholder())
            .expect("relay config"),
    )
    .expect("relay");
    let server = start_server(
        setup
            .server_config(relay.addr, &[("echo", target.to_string())], "")
            .expect("server config"),
        setup.server_key.clone(),
    );
    let (proxy, addrs) = start_proxy(
        setup
            .proxy_config(relay.addr, "alice", &[("db", "echo")], "")
            .expect("proxy config"),
        setup.alice_key.clone(),
    )
    .expect("proxy");
    World {
        _setup: setup,
        relay,
        _server: server,
        _proxy: proxy,
        local: addrs[0],
    }
}

fn bind_addr_placeholder() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// Waits until a first round trip works (the server proxy's listens may still be starting).
async fn ready(addr: std::net::SocketAddr) {
    for _ in 0..200 {
        if let Ok(v) = round_trip(addr, b"ping").await {
            if v == b"ping" {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("tunnel never became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_sha256_equal() {
    tokio::time::timeout(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let w = world(echo).await;
        ready(w.local).await;
        let data = random_bytes(64 << 20, 7);
        let want = Sha256::digest(&data);
        let s = TcpStream::connect(w.local).await.expect("connect");
        let (mut r, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            wr.write_all(&data).await.expect("write");
            wr.shutdown().await.expect("shutdown");
        });
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0usize;
        loop {
            let n = r.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            total += n;
            hasher.update(&buf[..n]);
        }
        writer.await.expect("writer");
        assert_eq!(total, 64 << 20);
        assert_eq!(hasher.finalize(), want);
        let mut conns = w.relay.connections.clone();
        tokio::time::timeout(Duration::from_secs(5), conns.wait_for(|n| *n == 0))
            .await
            .expect("relay frees state")
            .expect("watch");
    })
    .await
    .expect("test timed out");
}
