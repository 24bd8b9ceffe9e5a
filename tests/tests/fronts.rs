//! Behind real HTTPS fronts (nginx, Caddy, HAProxy) and with the relay's own TLS: big
//! transfers, idle tunnels past the front's timeouts, long-polls cycling without errors, 401s
//! through the front, the real client address from trusted fronts only, and HTTP/2 carrying
//! every tunnel of a proxy over one TCP connection.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ptth_common::auth::{SIGNATURE, SIGNATURE_INPUT, Signer};
use ptth_common::client::http_client_builder;
use ptth_common::protocol::{self, RELAY_ANSWER_HEADER};
use ptth_tests::fronts::{CountingForwarder, FrontKind, Pki, start_front};
use ptth_tests::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(600);
/// Idle timeouts configured on the fronts.
const FRONT_TIMEOUT: Duration = Duration::from_secs(3);
/// Heartbeats well below the fronts' timeouts.
const HEARTBEAT: &str = "1s";

async fn within<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test timed out");
}

/// Everything started for one front.
struct Stack {
    setup: Setup,
    pki: Pki,
    relay: RelayHandle,
    front: Option<ptth_tests::fronts::Front>,
    /// Where clients reach the relay (the front, or the relay itself with TLS).
    public: SocketAddr,
    server: Component,
    proxy: Component,
    local: SocketAddr,
    counter: CountingForwarder,
    server_counter: CountingForwarder,
}

async fn stack(kind: Option<FrontKind>) -> Stack {
    let echo = echo_service().await.expect("echo");
    let mut setup = Setup::new().expect("setup");
    let pki = Pki::generate(setup.path()).expect("pki");
    let mut relay_extra = format!(
        "trusted_proxies = [\"127.0.0.1\"]\nlisten_timeout = \"1s\"\nheartbeat_interval = \"{HEARTBEAT}\"\nidle_timeout = \"30s\"\n"
    );
    if kind.is_none() {
        relay_extra.push_str(&format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            pki.cert.display(),
            pki.key.display()
        ));
    }
    setup.relay_extra = relay_extra;
    let relay = start_relay(
        bind_any().expect("bind"),
        setup
            .relay_config("127.0.0.1:0".parse().expect("addr"))
            .expect("config"),
    )
    .expect("relay");
    let front = match kind {
        Some(k) => Some(
            start_front(k, setup.path(), &pki, relay.addr, FRONT_TIMEOUT)
                .await
                .expect("front"),
        ),
        None => None,
    };
    let public = front.as_ref().map_or(relay.addr, |f| f.addr);
    let extra = format!(
        "ca_file = \"{}\"\nheartbeat_interval = \"{HEARTBEAT}\"",
        pki.ca.display()
    );
    let server_counter = CountingForwarder::start(public).await.expect("forwarder");
    let server_config = setup
        .server_config_url(
            &format!("https://localhost:{}", server_counter.addr.port()),
            &[("echo", echo.to_string())],
            &extra,
        )
        .expect("server config");
    let server = start_server(server_config, setup.server_key.clone());
    tokio::time::timeout(Duration::from_secs(20), relay.wait_listens(2))
        .await
        .expect("server proxy listens through the front");
    let counter = CountingForwarder::start(public).await.expect("forwarder");
    let proxy_config = setup
        .proxy_config_url(
            &format!("https://localhost:{}", counter.addr.port()),
            "alice",
            &[("db", "echo")],
            &extra,
        )
        .expect("proxy config");
    let (proxy, addrs) = start_proxy(proxy_config, setup.alice_key.clone()).expect("proxy");
    Stack {
        setup,
        pki,
        relay,
        front,
        public,
        server,
        proxy,
        local: addrs[0],
        counter,
        server_counter,
    }
}

async fn transfer_each_way(local: SocketAddr, len: usize) {
    let data = random_bytes(len, 42);
    let want = Sha256::digest(&data);
    let s = TcpStream::connect(local).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.expect("write");
        w.shutdown().await.expect("shutdown");
    });
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        total += n;
        hasher.update(&buf[..n]);
    }
    writer.await.expect("writer");
    assert_eq!(total, len);
    assert_eq!(hasher.finalize(), want, "SHA-256 differs");
}

fn client_from(s: &Stack, local: IpAddr) -> reqwest::Client {
    http_client_builder(Some(&s.pki.ca))
        .expect("builder")
        .local_address(Some(local))
        .build()
        .expect("client")
}

/// A request signed for one path and sent to another, with a forged X-Forwarded-For.
async fn tampered(
    client: &reqwest::Client,
    base: &str,
    authority: &str,
    s: &Stack,
) -> reqwest::Response {
    let signer = Signer::new(s.setup.alice_key.clone());
    let h = signer.sign("POST", authority, &protocol::connect_path("db", "echo"));
    client
        .post(format!("{base}{}", protocol::connect_path("web", "echo")))
        .header(SIGNATURE_INPUT, &h.input)
        .header(SIGNATURE, &h.signature)
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .expect("send")
}

async fn suite(kind: Option<FrontKind>) {
    let s = stack(kind).await;
    let name = format!("{kind:?}");

    // 256 MiB each way through one tunnel.
    let big = tokio::spawn(transfer_each_way(s.local, 256 << 20)).await;
    if big.is_err() {
        panic!(
            "{name}: transfer failed\nclient proxy:\n{}\nserver proxy:\n{}\nrelay:\n{}\nfront:\n{}",
            s.proxy.logs().text(),
            s.server.logs().text(),
            s.relay.component.logs().text(),
            s.front.as_ref().map(|f| f.log()).unwrap_or_default()
        );
    }

    // A tunnel idle for twice the front's idle timeout still works; meanwhile the server's
    // long-polls (listen_timeout 1 s) cycle through the front several times.
    let mut c = TcpStream::connect(s.local).await.expect("connect");
    c.write_all(b"before").await.expect("write");
    let mut buf = [0u8; 6];
    c.read_exact(&mut buf).await.expect("read");
    tokio::time::sleep(FRONT_TIMEOUT * 2).await;
    c.write_all(b"after!").await.expect("write after idle");
    c.read_exact(&mut buf).await.expect("read after idle");
    assert_eq!(&buf, b"after!");
    drop(c);
    for (who, logs) in [
        ("server proxy", s.server.logs()),
        ("client proxy", s.proxy.logs()),
        ("relay", s.relay.component.logs()),
    ] {
        let problems = logs.problems();
        assert!(
            problems.is_empty(),
            "{name}: {who} logged problems:\n{}",
            problems.join("\n")
        );
    }
    if let Some(front) = &s.front {
        let errors = front.errors();
        assert!(
            errors.is_empty(),
            "{name}: the front logged errors:\n{}",
            errors.join("\n")
        );
    }

    // A bad signature is answered 401 by the relay, through the front; the relay logs the
    // real client address, not the forged X-Forwarded-For.
    let base = format!("https://localhost:{}", s.public.port());
    let authority = format!("localhost:{}", s.public.port());
    let client = client_from(&s, "127.0.0.5".parse().expect("ip"));
    let r = tampered(&client, &base, &authority, &s).await;
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED, "{name}");
    assert!(
        r.headers().contains_key(RELAY_ANSWER_HEADER),
        "{name}: 401 not from the relay"
    );
    assert_eq!(r.text().await.expect("body").trim(), "invalid signature");
    let relay_log = s.relay.component.logs().text();
    assert!(
        relay_log.contains("client=127.0.0.5"),
        "{name}: real client address not logged:\n{relay_log}"
    );
    assert!(
        !relay_log.contains("203.0.113.9"),
        "{name}: forged X-Forwarded-For believed"
    );

    // HTTP/2: 100 concurrent tunnels share one TCP connection from the client proxy.
    s.counter.reset_peak();
    let local = s.local;
    let tasks: Vec<_> = (0..100u64)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = TcpStream::connect(local).await.expect("connect");
                let data = random_bytes(32 * 1024, i);
                c.write_all(&data).await.expect("write");
                let mut back = vec![0u8; data.len()];
                c.read_exact(&mut back).await.expect("read");
                assert!(back == data, "tunnel {i}");
                c
            })
        })
        .collect();
    let mut open = Vec::new();
    for t in tasks {
        open.push(t.await.expect("task"));
    }
    assert_eq!(
        s.counter.peak(),
        1,
        "{name}: 100 tunnels used {} TCP connections",
        s.counter.peak()
    );
    drop(open);
    assert!(
        s.counter.total() <= 2,
        "{name}: {} TCP connections in all",
        s.counter.total()
    );
    assert_eq!(
        s.server_counter.peak(),
        1,
        "{name}: the server proxy used {} TCP connections at once",
        s.server_counter.peak()
    );
    drop(s.front);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx() {
    within(suite(Some(FrontKind::Nginx))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_caddy() {
    within(suite(Some(FrontKind::Caddy))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy() {
    within(suite(Some(FrontKind::Haproxy))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_terminates_tls_itself() {
    within(suite(None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_ignored_from_untrusted_peers() {
    within(async {
        // Plain relay trusting only 127.0.0.1; the caller comes from 127.0.0.3.
        let mut setup = Setup::new().expect("setup");
        setup.relay_extra = "trusted_proxies = [\"127.0.0.1\"]".into();
        let relay = start_relay(
            bind_any().expect("bind"),
            setup
                .relay_config("127.0.0.1:0".parse().expect("a"))
                .expect("c"),
        )
        .expect("relay");
        let client = http_client_builder(None)
            .expect("builder")
            .local_address(Some("127.0.0.3".parse().expect("ip")))
            .build()
            .expect("client");
        let r = client
            .post(format!(
                "http://{}{}",
                relay.addr,
                protocol::connect_path("db", "echo")
            ))
            .header("x-forwarded-for", "203.0.113.9")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
        let log = relay.component.logs().text();
        assert!(log.contains("client=127.0.0.3"), "{log}");
        assert!(!log.contains("203.0.113.9"), "{log}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffering_nginx_is_diagnosed_within_ten_seconds() {
    within(async {
        let s = stack(Some(FrontKind::NginxBuffering)).await;
        let started = tokio::time::Instant::now();
        let limit = Duration::from_secs(10);
        let mut c = TcpStream::connect(s.local).await.expect("connect");
        c.write_all(b"hello?").await.expect("write");
        let (got, _) = tokio::time::timeout(limit, read_until_closed(&mut c))
            .await
            .expect("tunnel through a buffering front must fail within 10 s, not hang");
        assert!(got.is_empty());
        let left = limit.saturating_sub(started.elapsed());
        let diagnosed = s
            .proxy
            .logs()
            .wait_for(left, |log| log.contains("proxy_request_buffering off"))
            .await;
        assert!(
            diagnosed,
            "client proxy did not name the setting within 10 s:\n{}",
            s.proxy.logs().text()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificate_is_reported_clearly() {
    within(async {
        let s = stack(None).await;
        // A second client proxy without ca_file: the private CA is unknown to it.
        let config = s
            .setup
            .proxy_config_url(
                &format!("https://localhost:{}", s.public.port()),
                "alice",
                &[("db", "echo")],
                "",
            )
            .expect("config");
        let (proxy, addrs) = start_proxy(config, s.setup.alice_key.clone()).expect("proxy");
        let mut c = TcpStream::connect(addrs[0]).await.expect("connect");
        let (got, _) = tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut c))
            .await
            .expect("certificate error must close the socket, not hang");
        assert!(got.is_empty());
        let log = proxy.logs().text();
        assert!(
            log.contains("certificate") && log.contains("ca_file"),
            "{log}"
        );
    })
    .await;
}
