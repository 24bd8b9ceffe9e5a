//! Every refusal: connect failures seen through the client proxy (socket closed at once, clear
//! log line), and each authentication and authorisation rejection seen at the relay's API.

use std::net::SocketAddr;
use std::time::Duration;

use ptth_common::auth::{SIGNATURE, SIGNATURE_INPUT, Signer, unix_now};
use ptth_common::client::{RelayClient, http_client, http_client_builder};
use ptth_common::config::RelayUrl;
use ptth_common::keys::PrivateKey;
use ptth_common::protocol::{self, CONNECTION_ID_HEADER};
use ptth_tests::*;
use reqwest::StatusCode;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(60);

fn relay_client(addr: SocketAddr, key: &PrivateKey) -> RelayClient {
    let url = RelayUrl::parse(&format!("http://{addr}")).expect("url");
    RelayClient::new(http_client(&url, None).expect("client"), url, key.clone())
}

/// Runs a client proxy on this test's thread (so its logs are captured) forwarding
/// `server/port` as `client`; connects once and checks that the local socket is closed
/// promptly with nothing received, then that the log names the failure.
async fn connect_fails(
    w: &World,
    client: &str,
    server: &str,
    port: &str,
    within_: Duration,
    want: &[&str],
) {
    let logs = Logs::default();
    let _guard = tracing::subscriber::set_default(logs.subscriber());
    let key = if client == "alice" {
        w.setup.alice_key.clone()
    } else {
        w.setup.bob_key.clone()
    };
    let config = w
        .setup
        .proxy_config(w.relay.addr, client, &[(server, port)], "")
        .expect("proxy config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let local = listener.local_addr().expect("addr");
    let token = tokio_util::sync::CancellationToken::new();
    let proxy = ptth_proxy::run(vec![listener], config, key, token.clone()).expect("proxy");
    let proxy = tokio::spawn(proxy.into_future());
    let mut s = TcpStream::connect(local).await.expect("connect");
    let mut buf = Vec::new();
    let r = tokio::time::timeout(within_, s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "local socket not closed within {within_:?}");
    assert!(buf.is_empty(), "received {buf:?}");
    let text = logs.text();
    for w in want {
        assert!(text.contains(w), "log lacks {w:?}:\n{text}");
    }
    token.cancel();
    let _ = proxy.await;
}

#[tokio::test]
async fn connect_failures_close_the_socket_with_a_clear_log_line() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut opts = WorldOptions::echo(echo);
        opts.ports
            .push(("dead".into(), closed_port().expect("closed port")));
        opts.relay_extra = "accept_timeout = \"1s\"".into();
        let w = World::start(opts).await.expect("world");
        let quick = Duration::from_secs(2);
        connect_fails(
            &w,
            "alice",
            "web",
            "x",
            quick,
            &["status=503", "server offline"],
        )
        .await;
        connect_fails(
            &w,
            "alice",
            "db",
            "nope",
            quick,
            &["status=404", "unknown port"],
        )
        .await;
        connect_fails(
            &w,
            "alice",
            "db",
            "dead",
            quick,
            &["status=502", "could not connect to its target"],
        )
        .await;
        connect_fails(
            &w,
            "bob",
            "db",
            "echo",
            quick,
            &["status=403", "not allowed"],
        )
        .await;

        // A server that listens on `slow` but never accepts: the relay gives up after
        // accept_timeout (1 s here).
        let db = relay_client(w.relay.addr, &w.setup.server_key);
        let path = protocol::listen_path("db", "slow");
        let listen = tokio::spawn(async move { db.post(&path).send().await });
        // The server proxy keeps at most listen_pool (2) listens on each of its two ports, so
        // a fifth waiting listen can only be this one.
        w.relay
            .expect_listens(2 * 2 + 1, Duration::from_secs(10), "listen registered")
            .await;
        connect_fails(
            &w,
            "alice",
            "db",
            "slow",
            Duration::from_secs(4),
            &["status=504", "did not take the connection in time"],
        )
        .await;
        let offered = listen.await.expect("join").expect("listen answer");
        assert_eq!(offered.status(), StatusCode::OK);
        assert!(offered.headers().contains_key(CONNECTION_ID_HEADER));

        // A connect whose upstream never comes (something in front of the client holds it
        // back): the answer says so.
        let db = relay_client(w.relay.addr, &w.setup.server_key);
        let path = protocol::listen_path("db", "slow");
        let listen = tokio::spawn(async move { db.post(&path).send().await });
        w.relay
            .expect_listens(2 * 2 + 1, Duration::from_secs(10), "listen registered")
            .await;
        let alice = relay_client(w.relay.addr, &w.setup.alice_key);
        let r = alice
            .post(&protocol::connect_path("db", "slow"))
            .header(CONNECTION_ID_HEADER, fresh_id())
            .send()
            .await
            .expect("send");
        assert_eq!(
            status_and_text(r).await,
            (
                StatusCode::GATEWAY_TIMEOUT,
                "your upstream did not reach the relay: a reverse proxy on the way holds \
                 request bodies back (nginx: proxy_request_buffering off)"
                    .to_owned()
            )
        );
        drop(listen.await.expect("join").expect("listen answer"));
    })
    .await;
}

/// A connection ID for a hand-made `connect`, as a client chooses one.
fn fresh_id() -> String {
    protocol::ConnId::random().expect("id").to_string()
}

fn plain_http() -> reqwest::Client {
    http_client_builder(None)
        .expect("builder")
        .build()
        .expect("client")
}

async fn world_with_short_listens() -> World {
    let echo = echo_service().await.expect("echo");
    let mut opts = WorldOptions::echo(echo);
    opts.relay_extra = "listen_timeout = \"1s\"".into();
    World::start(opts).await.expect("world")
}

async fn status_and_text(r: reqwest::Response) -> (StatusCode, String) {
    let s = r.status();
    (s, r.text().await.expect("body").trim().to_owned())
}

#[tokio::test]
async fn signatures_must_name_a_configured_authority() {
    within(LIMIT, async {
        // No server proxy: it would sign for 127.0.0.1:PORT, which this relay refuses.
        let mut opts = WorldOptions::echo(closed_port().expect("port"));
        opts.ports.clear();
        opts.relay_extra =
            "authorities = [\"relay.test\", \"Relay.Test:8443\", \"other.test:443\"]\n\
             listen_timeout = \"1s\""
                .into();
        let w = World::start(opts).await.expect("world");
        let signer = Signer::new(w.setup.server_key.clone());
        let path = protocol::listen_path("db", "echo");
        let http = plain_http();
        let send = |authority: String| {
            let h = signer.sign("POST", &authority, &path);
            http.post(format!("http://{}{}", w.relay.addr, path))
                .header(SIGNATURE_INPUT, h.input)
                .header(SIGNATURE, h.signature)
                .send()
        };
        // Names are compared lowercased; `other.test:443` also stands for `other.test`.
        for named in [
            "relay.test",
            "relay.test:8443",
            "other.test",
            "other.test:443",
        ] {
            let r = send(named.into()).await.expect("send");
            assert_eq!(r.status(), StatusCode::NO_CONTENT, "signed for {named}");
        }
        // Signed for the address the request really went to, which is not a configured name.
        for other in [
            w.relay.addr.to_string(),
            "relay.test:4000".into(),
            "other.test:80".into(),
            "third.test".into(),
        ] {
            let r = send(other.clone()).await.expect("send");
            let (status, text) = status_and_text(r).await;
            assert_eq!(
                (status, text.as_str()),
                (StatusCode::UNAUTHORIZED, "invalid signature"),
                "signed for {other}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn unknown_key_and_bad_signature_get_the_same_401() {
    within(LIMIT, async {
        let w = world_with_short_listens().await;
        let stranger = relay_client(w.relay.addr, &PrivateKey::generate().expect("key"));
        let unknown = stranger
            .post(&protocol::connect_path("db", "echo"))
            .send()
            .await
            .expect("send");
        let unknown = status_and_text(unknown).await;
        // A valid signature for one path, sent to another (tampered path).
        let signer = Signer::new(w.setup.alice_key.clone());
        let h = signer.sign(
            "POST",
            &w.relay.addr.to_string(),
            &protocol::connect_path("db", "echo"),
        );
        let http = plain_http();
        let tampered = http
            .post(format!(
                "http://{}{}",
                w.relay.addr,
                protocol::connect_path("web", "echo")
            ))
            .header(SIGNATURE_INPUT, &h.input)
            .header(SIGNATURE, &h.signature)
            .send()
            .await
            .expect("send");
        let tampered = status_and_text(tampered).await;
        assert_eq!(
            unknown,
            (StatusCode::UNAUTHORIZED, "invalid signature".to_owned())
        );
        assert_eq!(tampered, unknown);
        assert!(
            http.post(format!(
                "http://{}{}",
                w.relay.addr,
                protocol::connect_path("db", "echo")
            ))
            .send()
            .await
            .expect("send")
            .status()
                == StatusCode::UNAUTHORIZED,
            "unsigned request must get 401"
        );
    })
    .await;
}

#[tokio::test]
async fn replayed_and_stale_requests_are_refused() {
    within(LIMIT, async {
        let w = world_with_short_listens().await;
        let path = protocol::connect_path("web", "x");
        let signer = Signer::new(w.setup.alice_key.clone());
        let authority = w.relay.addr.to_string();
        let url = format!("http://{authority}{path}");
        let http = plain_http();
        let h = signer.sign("POST", &authority, &path);
        let send = |h: &ptth_common::auth::SignedHeaders| {
            http.post(&url)
                .header(SIGNATURE_INPUT, &h.input)
                .header(SIGNATURE, &h.signature)
                .header(CONNECTION_ID_HEADER, fresh_id())
                .send()
        };
        let first = send(&h).await.expect("send");
        assert_eq!(
            first.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "web is offline"
        );
        let again = status_and_text(send(&h).await.expect("send")).await;
        assert_eq!(
            again,
            (StatusCode::UNAUTHORIZED, "replayed request".to_owned())
        );
        let old = signer.sign_with("POST", &authority, &path, unix_now() - 61, &[7; 16]);
        let r = send(&old).await.expect("send");
        assert!(
            r.headers().contains_key(reqwest::header::DATE),
            "401 carries Date for skew"
        );
        assert_eq!(
            status_and_text(r).await,
            (
                StatusCode::UNAUTHORIZED,
                "signature expired or not yet valid: check the clocks".to_owned()
            )
        );
    })
    .await;
}

#[tokio::test]
async fn keys_may_only_act_as_themselves() {
    within(LIMIT, async {
        let w = world_with_short_listens().await;
        let db = relay_client(w.relay.addr, &w.setup.server_key);
        let alice = relay_client(w.relay.addr, &w.setup.alice_key);
        let bob = relay_client(w.relay.addr, &w.setup.bob_key);
        // Server key listening as another server.
        let r = db
            .post(&protocol::listen_path("web", "x"))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // A client key cannot listen.
        let r = alice
            .post(&protocol::listen_path("db", "x"))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // A server key cannot connect.
        let r = db
            .post(&protocol::connect_path("db", "echo"))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // Bob's allow list grants only db/other.
        let r = bob
            .post(&protocol::connect_path("db", "echo"))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // Not a POST.
        let r = plain_http()
            .get(format!(
                "http://{}{}",
                w.relay.addr,
                protocol::connect_path("db", "echo")
            ))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    })
    .await;
}

#[tokio::test]
async fn connection_ids_belong_to_their_owners_and_are_single_use() {
    within(LIMIT, async {
        // Default listen_timeout: the hand-made listen below must still wait when the
        // connect arrives, however loaded the machine.
        let echo = echo_service().await.expect("echo");
        let w = World::start(WorldOptions::echo(echo)).await.expect("world");
        let addr = w.relay.addr;
        let db = relay_client(addr, &w.setup.server_key);
        let web = relay_client(addr, &w.setup.web_key);
        let alice = relay_client(addr, &w.setup.alice_key);
        let bob = relay_client(addr, &w.setup.bob_key);
        let (id, connect, listened) = offer_by_hand(&w, &db, &alice).await;

        // Another server cannot take or refuse it, under either name; nor can a client.
        for (who, name, want) in [
            (&web, "web", StatusCode::NOT_FOUND),
            (&web, "db", StatusCode::FORBIDDEN),
            (&alice, "db", StatusCode::FORBIDDEN),
        ] {
            for path in [
                protocol::downstream_path(name, id),
                protocol::refuse_path(name, id),
            ] {
                let r = who.post(&path).send().await.expect("send");
                assert_eq!(r.status(), want, "{path}");
            }
        }
        // The ID is the client's: another connect with it is refused.
        let r = alice
            .post(&protocol::connect_path("db", "raw"))
            .header(CONNECTION_ID_HEADER, id.to_string())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::CONFLICT);

        // The server takes it (its downstream arrives), and the connect is answered.
        let d = db.clone();
        let downstream = tokio::spawn(async move {
            d.post(&protocol::downstream_path("db", id))
                .body(ptth_common::frame::end().to_vec())
                .send()
                .await
        });
        let connected = connect.await.expect("join").expect("connect");
        assert_eq!(connected.status(), StatusCode::OK);
        assert_eq!(
            connected.headers()[CONNECTION_ID_HEADER]
                .to_str()
                .expect("h"),
            id.to_string()
        );

        // Single use: a second answer, accepting or refusing, is refused.
        for path in [
            protocol::downstream_path("db", id),
            protocol::refuse_path("db", id),
        ] {
            let r = db.post(&path).send().await.expect("send");
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        }
        // Foreign client: 404 for upstream; the owner's server cannot send upstream either.
        let r = bob
            .post(&protocol::upstream_path("db", id))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = db
            .post(&protocol::upstream_path("db", id))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        // A malformed ID is 404 too.
        let r = alice
            .post("/v1/servers/db/connections/not-an-id/upstream")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        drop((listened, connected));
        downstream.abort();
    })
    .await;
}

#[tokio::test]
async fn connects_need_a_connection_id() {
    within(LIMIT, async {
        let w = world_with_short_listens().await;
        let alice = relay_client(w.relay.addr, &w.setup.alice_key);
        for id in [
            None,
            Some("not-an-id"),
            Some("0123456789ABCDEF0123456789ABCDEF"),
        ] {
            let mut request = alice.post(&protocol::connect_path("db", "echo"));
            if let Some(id) = id {
                request = request.header(CONNECTION_ID_HEADER, id);
            }
            let (status, text) = status_and_text(request.send().await.expect("send")).await;
            assert_eq!(
                (status, text.as_str()),
                (
                    StatusCode::BAD_REQUEST,
                    "missing or malformed connection id"
                ),
                "{id:?}"
            );
        }
    })
    .await;
}

/// A `listen` by `db` on port `raw` and a `connect` by `alice` to it, by hand: the connection
/// ID alice chose, her connect still waiting for its answer, and the listen's answer (whose
/// body is the upstream; dropping it aborts the connection).
async fn offer_by_hand(
    w: &World,
    db: &RelayClient,
    alice: &RelayClient,
) -> (
    protocol::ConnId,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
    reqwest::Response,
) {
    let l = db.clone();
    let listen =
        tokio::spawn(async move { l.post(&protocol::listen_path("db", "raw")).send().await });
    // The server proxy keeps 2 listens on `echo`: a third waiting listen is this one.
    w.relay
        .expect_listens(3, Duration::from_secs(10), "listen registered")
        .await;
    let id = protocol::ConnId::random().expect("id");
    let connect = alice
        .post(&protocol::connect_path("db", "raw"))
        .header(CONNECTION_ID_HEADER, id.to_string());
    let connect = tokio::spawn(connect.send());
    let offered = listen.await.expect("join").expect("listen");
    assert_eq!(offered.status(), StatusCode::OK);
    let given: protocol::ConnId = offered.headers()[CONNECTION_ID_HEADER]
        .to_str()
        .expect("header")
        .parse()
        .expect("id");
    assert_eq!(given, id, "the listen was given the client's ID");
    (id, connect, offered)
}

/// The items of a whole download body: heartbeats left out.
fn items(body: &[u8]) -> Vec<ptth_common::frame::Item> {
    let mut decoder = ptth_common::frame::Decoder::new();
    let mut chunk = bytes::Bytes::copy_from_slice(body);
    let mut out = Vec::new();
    while let Some(item) = decoder.decode(&mut chunk).expect("valid frames") {
        if item != ptth_common::frame::Item::Heartbeat {
            out.push(item);
        }
    }
    out
}

#[tokio::test]
async fn relay_treats_uploads_without_end_or_with_bad_frames_as_aborts() {
    within(LIMIT, async {
        use ptth_common::frame::{self, Item};
        let echo = echo_service().await.expect("echo");
        let w = World::start(WorldOptions::echo(echo)).await.expect("world");
        let db = relay_client(w.relay.addr, &w.setup.server_key);
        let alice = relay_client(w.relay.addr, &w.setup.alice_key);
        let mut attached_in_upload = frame::data(b"hi").to_vec();
        attached_in_upload.extend_from_slice(&frame::attached());
        attached_in_upload.extend_from_slice(&frame::end());
        let mut after_end = frame::end().to_vec();
        after_end.extend_from_slice(&frame::heartbeat());
        let mut clean = frame::data(b"hi").to_vec();
        clean.extend_from_slice(&frame::end());
        let cases: [(&str, Vec<u8>, StatusCode); 5] = [
            ("no END", frame::data(b"hi").to_vec(), StatusCode::GONE),
            (
                "cut inside a frame",
                vec![frame::TYPE_DATA, 0, 0, 0, 9, 1],
                StatusCode::GONE,
            ),
            ("ATTACHED", attached_in_upload, StatusCode::GONE),
            ("bytes after END", after_end, StatusCode::GONE),
            ("well formed", clean, StatusCode::OK),
        ];
        for (what, downstream_body, want) in cases {
            let (id, connect, listened) = offer_by_hand(&w, &db, &alice).await;
            let d = db.clone();
            let downstream = tokio::spawn(async move {
                d.post(&protocol::downstream_path("db", id))
                    .body(downstream_body)
                    .send()
                    .await
            });
            let a = alice.clone();
            let upstream = tokio::spawn(async move {
                a.post(&protocol::upstream_path("db", id))
                    .body(frame::end().to_vec())
                    .send()
                    .await
            });
            let connected = connect.await.expect("join");
            let downstream = downstream.await.expect("join").expect("downstream");
            assert_eq!(downstream.status(), want, "downstream: {what}");
            // The client's download fails rather than ending, unless the upload was clean (an
            // upload that fails at once may fail the answer before its headers have gone).
            let body = match connected {
                Ok(r) if r.status() == StatusCode::OK => r.bytes().await.map(drop),
                Ok(r) => panic!("connect: {what}: {}", r.status()),
                Err(e) => Err(e),
            };
            assert_eq!(body.is_ok(), want == StatusCode::OK, "connect body: {what}");
            let upstream = upstream.await.expect("join").expect("upstream");
            if want == StatusCode::OK {
                assert_eq!(upstream.status(), StatusCode::OK, "upstream: {what}");
                // The server's download: the client's END, and ATTACHED (before or after it).
                let got = listened.bytes().await.expect("listen body");
                let mut got = items(&got);
                got.sort_by_key(|i| matches!(i, Item::End));
                assert_eq!(got, [Item::Attached, Item::End], "listen body");
            } else {
                drop(listened);
            }
            w.relay
                .expect_no_connections(Duration::from_secs(5), "relay frees the connection")
                .await;
        }
    })
    .await;
}

/// With `extra` in relay.toml, one open tunnel blocks the next connect with `refusal`.
async fn connection_limit_is_enforced(extra: &str, refusal: &str) {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut opts = WorldOptions::echo(echo);
        // The server proxy keeps 2 listens on `echo`; allow 2 per port and 1 connection.
        opts.relay_extra = format!("max_listens_per_port = 2\n{extra}");
        let w = World::start(opts).await.expect("world");
        let db = relay_client(w.relay.addr, &w.setup.server_key);
        let r = db
            .post(&protocol::listen_path("db", "echo"))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        // One tunnel open: the next connect is refused with 503, and works again after.
        let mut first = TcpStream::connect(w.local()).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut first, b"a")
            .await
            .expect("write");
        let mut b = [0u8; 1];
        first.read_exact(&mut b).await.expect("echo");
        let alice = relay_client(w.relay.addr, &w.setup.alice_key);
        let r = alice
            .post(&protocol::connect_path("db", "echo"))
            .header(CONNECTION_ID_HEADER, fresh_id())
            .send()
            .await
            .expect("send");
        let (status, text) = status_and_text(r).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(text, refusal);
        drop(first);
        w.relay
            .expect_no_connections(Duration::from_secs(5), "freed")
            .await;
        assert_eq!(round_trip(w.local(), b"again").await.expect("rt"), b"again");
    })
    .await;
}

#[tokio::test]
async fn relay_limits_are_enforced() {
    connection_limit_is_enforced("max_connections = 1", "relay at connection limit").await;
}

#[tokio::test]
async fn per_client_connection_limit_is_enforced() {
    connection_limit_is_enforced(
        "max_connections_per_client = 1",
        "too many connections for this client",
    )
    .await;
}

#[tokio::test]
async fn relay_serves_at_most_max_http_connections() {
    within(LIMIT, async {
        let mut setup = Setup::new().expect("setup");
        setup.relay_extra = "max_http_connections = 1".into();
        let relay = setup.start_relay().expect("relay");
        // The first connection takes the only slot, even idle.
        let hog = TcpStream::connect(relay.addr).await.expect("connect");
        let url = format!("http://{}/v1/", relay.addr);
        let mut second = tokio::spawn(async move { plain_http().get(&url).send().await });
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut second)
                .await
                .is_err(),
            "a second connection was served beyond max_http_connections"
        );
        drop(hog);
        let r = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("served once the slot is free")
            .expect("join")
            .expect("answer");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    })
    .await;
}

#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    within(LIMIT, async {
        let mut setup = Setup::new().expect("setup");
        setup.relay_extra = "max_http_connections_per_ip = 1".into();
        let relay = setup.start_relay().expect("relay");
        let from = |ip: &str| {
            http_client_builder(None)
                .expect("builder")
                .local_address(Some(ip.parse().expect("ip")))
                .build()
                .expect("client")
        };
        let url = format!("http://{}/v1/", relay.addr);
        // 127.0.0.3 holds its one connection (a silent socket)...
        let hog = tokio::net::TcpSocket::new_v4().expect("socket");
        hog.bind("127.0.0.3:0".parse().expect("a")).expect("bind");
        let hog = hog.connect(relay.addr).await.expect("connect");
        // ...so its next one is closed at once, while 127.0.0.4 is served.
        assert!(from("127.0.0.3").get(&url).send().await.is_err());
        let r = from("127.0.0.4")
            .get(&url)
            .send()
            .await
            .expect("other address served");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        drop(hog);
    })
    .await;
}

#[tokio::test]
async fn silent_connections_are_closed() {
    within(LIMIT, async {
        let setup = Setup::new().expect("setup");
        let relay = setup.start_relay().expect("relay");
        let mut silent = TcpStream::connect(relay.addr).await.expect("connect");
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a silent connection kept its slot: {closed:?}"
        );
    })
    .await;
}
