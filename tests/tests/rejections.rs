//! Every refusal: connect failures seen through the client proxy (socket closed at once, clear
//! log line), and each authentication and authorisation rejection seen at the relay's API.

use std::net::SocketAddr;
use std::time::Duration;

use ptth_common::auth::{SIGNATURE, SIGNATURE_INPUT, Signer, unix_now};
use ptth_common::frame::{self, Item};
use ptth_common::keys::PrivateKey;
use ptth_common::protocol::{self, CHANNEL_ID_HEADER, ChannelId};
use ptth_tests::*;
use reqwest::StatusCode;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(60);

fn relay_client(addr: SocketAddr, key: &PrivateKey) -> SignedClient {
    SignedClient::new(addr, key)
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
        // An offline server may be moving to another relay behind a load balancer: the proxy
        // tries again for 5 s before it gives up (docs/scale-out.md).
        connect_fails(
            &w,
            "alice",
            "web",
            "x",
            Duration::from_secs(5) + quick,
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
            &["connect to db/dead failed", "could not reach its target"],
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

        // A server channel on `slow` that never answers the connection it is given: the relay
        // gives up after accept_timeout (1 s here).
        let db = relay_client(w.relay.addr, &w.setup.server_key);
        let slow = HandChannel::server(&db, "slow").await;
        // The server proxy keeps listen_pool (2) channels on each of its two ports, so a fifth
        // ready channel can only be this one.
        w.relay
            .expect_server_channels(2 * 2 + 1, Duration::from_secs(10), "channel ready")
            .await;
        connect_fails(
            &w,
            "alice",
            "db",
            "slow",
            Duration::from_secs(4),
            &[
                "connect to db/slow failed",
                "did not take the connection in time",
            ],
        )
        .await;
        drop(slow);
    })
    .await;
}

/// A channel ID for a hand-made `connect` or `listen`, as an endpoint chooses one.
fn fresh_id() -> String {
    ChannelId::random().expect("id").to_string()
}

fn plain_http() -> reqwest::Client {
    http_client_builder(None)
        .expect("builder")
        .build()
        .expect("client")
}

async fn echo_world() -> World {
    let echo = echo_service().await.expect("echo");
    World::start(WorldOptions::echo(echo)).await.expect("world")
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
            "authorities = [\"relay.test\", \"Relay.Test:8443\", \"other.test:443\"]".into();
        let w = World::start(opts).await.expect("world");
        let signer = Signer::new(w.setup.server_key.clone());
        let path = protocol::listen_path("db", "echo");
        let http = plain_http();
        let send = |authority: String| {
            let h = signer.sign("POST", &authority, &path);
            http.post(format!("http://{}{}", w.relay.addr, path))
                .header(SIGNATURE_INPUT, h.input)
                .header(SIGNATURE, h.signature)
                .header(CHANNEL_ID_HEADER, fresh_id())
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
            assert_eq!(r.status(), StatusCode::OK, "signed for {named}");
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
        let w = echo_world().await;
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
        let w = echo_world().await;
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
                .header(CHANNEL_ID_HEADER, fresh_id())
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
        let w = echo_world().await;
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

/// A channel opened by hand: the answer to its `connect` or `listen` (its download), the
/// writer of its upload's body and the upload's answer to come.
struct HandChannel {
    id: ChannelId,
    download: reqwest::Response,
    upload: Option<tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>>,
    uploaded: tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
    /// Download bytes read but not yet decoded.
    pending: bytes::Bytes,
    frames: frame::Decoder,
}

impl HandChannel {
    /// A channel of `db` for connections to `port`: `listen` and `downstream`.
    async fn server(db: &SignedClient, port: &str) -> Self {
        let id = ChannelId::random().expect("id");
        let download = db
            .post(&protocol::listen_path("db", port))
            .header(CHANNEL_ID_HEADER, id.to_string());
        Self::open(db, id, download, protocol::downstream_path("db", id)).await
    }

    /// A channel of a client for connections to `server/port`: `connect` and `upstream`.
    async fn client(client: &SignedClient, server: &str, port: &str) -> Self {
        let id = ChannelId::random().expect("id");
        let download = client
            .post(&protocol::connect_path(server, port))
            .header(CHANNEL_ID_HEADER, id.to_string());
        Self::open(client, id, download, protocol::upstream_path(server, id)).await
    }

    async fn open(
        relay: &SignedClient,
        id: ChannelId,
        download: reqwest::RequestBuilder,
        upload_path: String,
    ) -> Self {
        let (upload, body) = HandBody::channel();
        let request = relay.post(&upload_path).body(body);
        let uploaded = tokio::spawn(request.send());
        // Something to send, so that nothing on the way holds the request's head back.
        upload
            .send(Ok(frame::heartbeat()))
            .await
            .expect("upload open");
        let download = download.send().await.expect("download");
        assert_eq!(download.status(), StatusCode::OK, "channel opened");
        assert_eq!(
            download.headers()[CHANNEL_ID_HEADER].to_str().expect("id"),
            id.to_string()
        );
        let mut channel = Self {
            id,
            download,
            upload: Some(upload),
            uploaded,
            pending: bytes::Bytes::new(),
            frames: frame::Decoder::new(),
        };
        assert_eq!(
            channel.next().await,
            Some(Item::Attached),
            "upload attached"
        );
        channel
    }

    /// Sends frames on the upload.
    async fn send(&self, frames: &[bytes::Bytes]) {
        let mut all = bytes::BytesMut::new();
        for f in frames {
            all.extend_from_slice(f);
        }
        let upload = self.upload.as_ref().expect("upload open");
        upload.send(Ok(all.freeze())).await.expect("upload open");
    }

    /// The next item of the download, heartbeats left out; `None` once it has ended or failed.
    async fn next(&mut self) -> Option<Item> {
        loop {
            while let Some(item) = self.frames.decode(&mut self.pending).expect("valid frames") {
                if item != Item::Heartbeat {
                    return Some(item);
                }
            }
            self.pending = self.download.chunk().await.ok()??;
        }
    }

    /// Ends the upload's body and returns the status of its answer.
    async fn finish(&mut self) -> StatusCode {
        drop(self.upload.take());
        (&mut self.uploaded)
            .await
            .expect("join")
            .expect("upload answer")
            .status()
    }
}

#[tokio::test]
async fn channel_ids_belong_to_their_owners_and_are_single_use() {
    within(LIMIT, async {
        let w = echo_world().await;
        let addr = w.relay.addr;
        let db = relay_client(addr, &w.setup.server_key);
        let web = relay_client(addr, &w.setup.web_key);
        let alice = relay_client(addr, &w.setup.alice_key);
        let bob = relay_client(addr, &w.setup.bob_key);
        let mine = HandChannel::client(&alice, "db", "echo").await;
        let id = mine.id;

        // The ID is alice's: another channel with it is refused, by whoever opens it.
        let r = alice
            .post(&protocol::connect_path("db", "echo"))
            .header(CHANNEL_ID_HEADER, id.to_string())
            .send()
            .await
            .expect("send");
        assert_eq!(
            status_and_text(r).await,
            (StatusCode::CONFLICT, "channel id in use".to_owned())
        );
        // Its upload is alice's alone, and taken once.
        for (who, server, what) in [
            (&bob, "db", "another client"),
            (&db, "db", "a server"),
            (&alice, "web", "another server's path"),
            (&alice, "db", "a second upload"),
        ] {
            let r = who
                .post(&protocol::upstream_path(server, id))
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{what}");
        }
        // A server's channel: its upload is the server's, under its own name only.
        let theirs = HandChannel::server(&db, "raw").await;
        let sid = theirs.id;
        for (who, name, want) in [
            (&web, "web", StatusCode::NOT_FOUND),
            (&web, "db", StatusCode::FORBIDDEN),
            (&alice, "db", StatusCode::FORBIDDEN),
            (&db, "db", StatusCode::NOT_FOUND),
        ] {
            let r = who
                .post(&protocol::downstream_path(name, sid))
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), want, "downstream of {name} by another");
        }
        // A client channel's ID is no server's channel, and malformed IDs are nobody's.
        let r = db
            .post(&protocol::downstream_path("db", id))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = alice
            .post("/v1/servers/db/channels/not-an-id/upstream")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        drop((mine, theirs));
    })
    .await;
}

#[tokio::test]
async fn channels_need_a_channel_id() {
    within(LIMIT, async {
        let w = echo_world().await;
        let alice = relay_client(w.relay.addr, &w.setup.alice_key);
        let db = relay_client(w.relay.addr, &w.setup.server_key);
        for id in [
            None,
            Some("not-an-id"),
            Some("0123456789ABCDEF0123456789ABCDEF"),
        ] {
            for mut request in [
                alice.post(&protocol::connect_path("db", "echo")),
                db.post(&protocol::listen_path("db", "echo")),
            ] {
                if let Some(id) = id {
                    request = request.header(CHANNEL_ID_HEADER, id);
                }
                let (status, text) = status_and_text(request.send().await.expect("send")).await;
                assert_eq!(
                    (status, text.as_str()),
                    (StatusCode::BAD_REQUEST, "missing or malformed channel id"),
                    "{id:?}"
                );
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_connection_between_two_channels_by_hand() {
    within(LIMIT, async {
        let w = echo_world().await;
        let db = relay_client(w.relay.addr, &w.setup.server_key);
        let alice = relay_client(w.relay.addr, &w.setup.alice_key);
        let mut server = HandChannel::server(&db, "raw").await;
        let mut client = HandChannel::client(&alice, "db", "raw").await;
        // Two connections in a row on the same two channels.
        for round in 0..2u8 {
            client
                .send(&[frame::open(), frame::data(&[b'c', round])])
                .await;
            assert_eq!(server.next().await, Some(Item::Open), "round {round}");
            assert_eq!(
                server.next().await,
                Some(Item::Data(bytes::Bytes::from(vec![b'c', round])))
            );
            server
                .send(&[frame::open(), frame::data(&[b's', round]), frame::end()])
                .await;
            assert_eq!(client.next().await, Some(Item::Open));
            assert_eq!(
                client.next().await,
                Some(Item::Data(bytes::Bytes::from(vec![b's', round])))
            );
            assert_eq!(client.next().await, Some(Item::End));
            client.send(&[frame::end()]).await;
            assert_eq!(server.next().await, Some(Item::End));
            w.relay
                .expect_no_tunnels(Duration::from_secs(5), "connection over")
                .await;
        }
        // Retired: END while idle, then the end of the body, is a clean end.
        client.send(&[frame::end()]).await;
        assert_eq!(client.finish().await, StatusCode::OK);
        server.send(&[frame::end()]).await;
        assert_eq!(server.finish().await, StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn relay_treats_uploads_out_of_protocol_as_aborts() {
    within(LIMIT, async {
        let w = echo_world().await;
        let db = relay_client(w.relay.addr, &w.setup.server_key);
        let alice = relay_client(w.relay.addr, &w.setup.alice_key);
        let cut = bytes::Bytes::from_static(&[frame::TYPE_DATA, 0, 0, 0, 9, 1]);
        let cases: [(&str, Vec<bytes::Bytes>, bool); 5] = [
            ("DATA before OPEN", vec![frame::data(b"hi")], false),
            ("FAILED from a client", vec![frame::failed("no")], false),
            ("no END", vec![frame::open(), frame::data(b"hi")], true),
            ("cut inside a frame", vec![frame::open(), cut], true),
            (
                "ATTACHED",
                vec![frame::open(), frame::data(b"hi"), frame::attached()],
                true,
            ),
        ];
        for (what, upload, opens) in cases {
            let mut server = HandChannel::server(&db, "raw").await;
            let mut client = HandChannel::client(&alice, "db", "raw").await;
            client.send(&upload).await;
            // The client's channel ends: its upload is answered 410, its download fails, and
            // nothing of the connection reaches it.
            assert_eq!(client.finish().await, StatusCode::GONE, "upload: {what}");
            while let Some(item) = client.next().await {
                assert_eq!(
                    item,
                    Item::Attached,
                    "{what}: the client's download went on"
                );
            }
            if opens {
                // Joined with the server's channel, which ends too (it may have seen the
                // connection open, and what came before the bad frame).
                while let Some(item) = server.next().await {
                    assert!(
                        matches!(item, Item::Open | Item::Data(_)),
                        "{what}: {item:?} on the server's download"
                    );
                }
                assert_eq!(server.finish().await, StatusCode::GONE, "server: {what}");
            } else {
                // Never joined: the server's channel lives on, and is retired cleanly.
                server.send(&[frame::end()]).await;
                assert_eq!(server.next().await, None, "{what}");
                assert_eq!(server.finish().await, StatusCode::OK, "server: {what}");
            }
            w.relay
                .expect_no_tunnels(Duration::from_secs(5), "the relay frees the tunnel")
                .await;
        }
    })
    .await;
}

/// With `extra` in relay.toml, the client proxy's channel takes the one place: another
/// `connect` is refused with `refusal`.
async fn connection_limit_is_enforced(extra: &str, refusal: &str) {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut opts = WorldOptions::echo(echo);
        // The server proxy keeps 2 idle channels on `echo`; allow 2 per port and 1 client
        // channel: the client proxy's.
        opts.relay_extra = format!("max_listens_per_port = 2\n{extra}");
        let w = World::start(opts).await.expect("world");
        let db = relay_client(w.relay.addr, &w.setup.server_key);
        let r = db
            .post(&protocol::listen_path("db", "echo"))
            .header(CHANNEL_ID_HEADER, fresh_id())
            .send()
            .await
            .expect("send");
        assert_eq!(
            status_and_text(r).await,
            (
                StatusCode::TOO_MANY_REQUESTS,
                "too many idle channels on this port".to_owned()
            )
        );
        // A connection open: another channel is refused with 503, and the one channel carries
        // the next connection after.
        let mut first = TcpStream::connect(w.local()).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut first, b"a")
            .await
            .expect("write");
        let mut b = [0u8; 1];
        first.read_exact(&mut b).await.expect("echo");
        let alice = relay_client(w.relay.addr, &w.setup.alice_key);
        let r = alice
            .post(&protocol::connect_path("db", "echo"))
            .header(CHANNEL_ID_HEADER, fresh_id())
            .send()
            .await
            .expect("send");
        let (status, text) = status_and_text(r).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(text, refusal);
        drop(first);
        // Once the client proxy's channel has closed, its place is free.
        let World {
            relay,
            proxy,
            server,
            ..
        } = w;
        proxy.stop().await;
        let ready = relay.ready_server_channels.clone();
        let mut channels = relay.channels.clone();
        tokio::time::timeout(
            Duration::from_secs(5),
            channels.wait_for(|n| *n == *ready.borrow()),
        )
        .await
        .expect("the proxy's channel closed")
        .expect("relay running");
        let mine = HandChannel::client(&alice, "db", "echo").await;
        drop((mine, server));
    })
    .await;
}

#[tokio::test]
async fn relay_limits_are_enforced() {
    connection_limit_is_enforced("max_connections = 1", "relay at channel limit").await;
}

#[tokio::test]
async fn per_client_connection_limit_is_enforced() {
    connection_limit_is_enforced(
        "max_connections_per_client = 1",
        "too many channels for this client",
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

/// Before its signature verifies, a caller learns nothing of the configuration: an unknown
/// server, an unknown port, a port the client may not use and a channel that does not exist
/// all get the same answer as a good path, byte for byte (headers too, but the date). The
/// signature is checked before any of them is looked up, so the time taken is that of the
/// check alone.
#[tokio::test]
async fn unauthenticated_callers_learn_nothing_of_the_configuration() {
    within(LIMIT, async {
        let w = echo_world().await;
        let stranger = relay_client(w.relay.addr, &PrivateKey::generate().expect("key"));
        let id = ChannelId::random().expect("id");
        let paths = [
            protocol::connect_path("db", "echo"),
            protocol::connect_path("db", "nosuch"),
            protocol::connect_path("nosuch", "echo"),
            protocol::connect_path("web", "echo"),
            protocol::listen_path("db", "echo"),
            protocol::listen_path("nosuch", "echo"),
            protocol::downstream_path("db", id),
            protocol::upstream_path("nosuch", id),
        ];
        // bob, allowed db/other only, signs for db/other: a signature for another path.
        let bob = Signer::new(w.setup.bob_key.clone());
        let signed_elsewhere = bob.sign(
            "POST",
            &w.relay.addr.to_string(),
            &protocol::connect_path("db", "other"),
        );
        let answer = |r: reqwest::Response| async move {
            let status = r.status();
            let mut headers: Vec<(String, String)> = r
                .headers()
                .iter()
                .filter(|(name, _)| *name != "date")
                .map(|(n, v)| {
                    (
                        n.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            headers.sort();
            (status, headers, r.bytes().await.expect("body"))
        };
        let mut answers = Vec::new();
        for path in &paths {
            let r = stranger
                .post(path)
                .header(CHANNEL_ID_HEADER, id.to_string())
                .send()
                .await
                .expect("send");
            answers.push((format!("unknown key, {path}"), answer(r).await));
            let r = plain_http()
                .post(format!("http://{}{path}", w.relay.addr))
                .header(SIGNATURE_INPUT, &signed_elsewhere.input)
                .header(SIGNATURE, &signed_elsewhere.signature)
                .header(CHANNEL_ID_HEADER, id.to_string())
                .send()
                .await
                .expect("send");
            answers.push((
                format!("bob's key signed elsewhere, {path}"),
                answer(r).await,
            ));
        }
        let (_, first) = &answers[0];
        assert_eq!(first.0, StatusCode::UNAUTHORIZED);
        assert_eq!(&first.2[..], b"invalid signature\n");
        for (what, a) in &answers {
            assert_eq!(a, first, "{what}");
        }
    })
    .await;
}
