//! The relay's limits on what a caller can hold: connections that make no request, and what
//! they may send. Each test shows the limit, and that the relay stays healthy past it.

use std::sync::Arc;
use std::time::Duration;

use ptth_common::keys::PrivateKey;
use ptth_common::protocol::{self, CHANNEL_ID_HEADER, ChannelId};
use ptth_tests::fronts::Pki;
use ptth_tests::*;
use reqwest::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(60);
/// The relay's `http_idle_timeout` in these tests.
const IDLE: &str = "1s";
/// How long a test waits for the relay to close a connection: well past [`IDLE`], well short
/// of the default `http_idle_timeout` (10 s).
const CLOSED_WITHIN: Duration = Duration::from_secs(5);

/// A relay with `http_idle_timeout` at [`IDLE`], with `extra` lines.
fn relay(extra: &str) -> (Setup, RelayHandle) {
    let mut setup = Setup::new().expect("setup");
    setup.relay_extra = format!("http_idle_timeout = \"{IDLE}\"\n{extra}");
    let relay = setup.start_relay().expect("relay");
    (setup, relay)
}

/// Reads `s` (whatever the relay sends) until it is closed; fails the test if it is still
/// open after [`CLOSED_WITHIN`].
async fn expect_closed(s: &mut (impl AsyncRead + Unpin), what: &str) {
    let deadline = Instant::now() + CLOSED_WITHIN;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("{what}: still open after {CLOSED_WITHIN:?}"),
        }
    }
}

/// The relay still answers a new caller at once.
async fn expect_healthy(relay: &RelayHandle) {
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        http_client_builder(None)
            .expect("builder")
            .build()
            .expect("client")
            .get(format!("http://{}/v1/", relay.addr))
            .send(),
    )
    .await
    .expect("relay answers in time")
    .expect("answer");
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn connections_that_make_no_request_are_closed() {
    within(LIMIT, async {
        let (_setup, relay) = relay("");
        // A few bytes of the HTTP/2 preface, then nothing.
        let mut preface = TcpStream::connect(relay.addr).await.expect("connect");
        preface
            .write_all(b"PRI * HTTP/2.0\r\n")
            .await
            .expect("write");
        // An HTTP/1.1 request head that never ends (slowloris).
        let mut head = TcpStream::connect(relay.addr).await.expect("connect");
        head.write_all(b"POST /v1/servers/db/ports/echo/listen HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        // Silence from the start.
        let mut silent = TcpStream::connect(relay.addr).await.expect("connect");
        // A complete HTTP/2 connection that opens no stream: it answers the relay's pings.
        let tcp = TcpStream::connect(relay.addr).await.expect("connect");
        let (_send, h2) = h2::client::handshake(tcp).await.expect("h2 handshake");
        let h2 = tokio::spawn(h2);
        expect_closed(&mut preface, "part of the HTTP/2 preface").await;
        expect_closed(&mut head, "part of a request head").await;
        expect_closed(&mut silent, "silence").await;
        tokio::time::timeout(CLOSED_WITHIN, h2)
            .await
            .expect("an HTTP/2 connection without streams is closed")
            .expect("join")
            .ok();
        expect_healthy(&relay).await;
    })
    .await;
}

#[tokio::test]
async fn tls_connections_that_make_no_request_are_closed() {
    within(LIMIT, async {
        let dir = tempfile::tempdir().expect("dir");
        let pki = Pki::generate(dir.path()).expect("pki");
        let (_setup, relay) = relay(&format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            pki.cert.display(),
            pki.key.display()
        ));
        let tls = Arc::new(ptth_common::client::tls_config(Some(&pki.ca)).expect("tls config"));
        let connect = || async {
            let tcp = TcpStream::connect(relay.addr).await.expect("connect");
            let name =
                tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("name");
            tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .expect("TLS handshake")
        };
        // The handshake done, then silence.
        let mut silent = connect().await;
        // HTTP/2 over TLS, and no stream.
        let (_send, h2) = h2::client::handshake(connect().await)
            .await
            .expect("h2 handshake");
        let h2 = tokio::spawn(h2);
        // A TLS handshake that never finishes.
        let mut half = TcpStream::connect(relay.addr).await.expect("connect");
        half.write_all(&[0x16, 0x03, 0x01, 0x00, 0x50])
            .await
            .expect("write");
        expect_closed(&mut silent, "TLS and silence").await;
        expect_closed(&mut half, "part of a TLS handshake").await;
        tokio::time::timeout(CLOSED_WITHIN, h2)
            .await
            .expect("an HTTP/2 connection without streams is closed")
            .expect("join")
            .ok();
    })
    .await;
}

/// Connections carrying requests are not idle, however quiet their tunnels: a tunnel left
/// silent for three times `http_idle_timeout` carries on over the same channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_requests_in_flight_stay_open() {
    within(LIMIT, async {
        let echo = echo_service().await.expect("echo");
        let mut opts = WorldOptions::echo(echo);
        opts.relay_extra = format!("http_idle_timeout = \"{IDLE}\"\n");
        let world = World::start(opts).await.expect("world");
        let mut tunnel = TcpStream::connect(world.local()).await.expect("connect");
        let mut echoed = [0u8; 5];
        tunnel.write_all(b"first").await.expect("write");
        tunnel.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(&echoed, b"first");
        // Time passing is what is tested: three times the relay's limit.
        tokio::time::sleep(Duration::from_secs(3)).await;
        tunnel.write_all(b"later").await.expect("write");
        tunnel
            .read_exact(&mut echoed)
            .await
            .expect("the tunnel outlived http_idle_timeout");
        assert_eq!(&echoed, b"later");
        tunnel.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        tunnel.read_to_end(&mut rest).await.expect("EOF");
        assert!(rest.is_empty());
        transfer_each_way(world.local(), 1000, 2).await;
        for logs in [
            world.proxy.logs(),
            world.server.as_ref().expect("server").logs(),
        ] {
            let problems = logs.problems();
            assert!(problems.is_empty(), "{}", problems.join("\n"));
        }
    })
    .await;
}

/// `listen` and `connect` take no body: one with data is refused (413) and nothing of it is
/// kept, over HTTP/1.1 and HTTP/2, with a length and without; an empty body of unknown length
/// is accepted, and a caller whose signature fails learns only that (401).
#[tokio::test]
async fn listen_and_connect_refuse_bodies() {
    within(LIMIT, async {
        let (setup, relay) = relay("");
        let id = || ChannelId::random().expect("id").to_string();
        let listen = protocol::listen_path("db", "echo");
        let connect = protocol::connect_path("db", "echo");
        for h2c in [false, true] {
            let signed = |key: &PrivateKey| {
                let c = SignedClient::new(relay.addr, key);
                if h2c { c.h2c() } else { c }
            };
            let (db, alice) = (signed(&setup.server_key), signed(&setup.alice_key));
            let stranger = signed(&PrivateKey::generate().expect("key"));
            let refused = |r: reqwest::Response| async move {
                let status = r.status();
                (status, r.text().await.expect("body").trim().to_owned())
            };
            let takes_no_body = (
                StatusCode::PAYLOAD_TOO_LARGE,
                "this request takes no body".into(),
            );
            for (client, path) in [(&db, &listen), (&alice, &connect)] {
                let sized = client
                    .post(path)
                    .header(CHANNEL_ID_HEADER, id())
                    .body("hello");
                let r = sized.send().await.expect("send");
                assert_eq!(refused(r).await, takes_no_body, "{path}, sized, h2c {h2c}");
                let (tx, body) = HandBody::channel();
                let streamed = client.post(path).header(CHANNEL_ID_HEADER, id()).body(body);
                let answer = tokio::spawn(streamed.send());
                tx.send(Ok(bytes::Bytes::from_static(b"x")))
                    .await
                    .expect("chunk");
                let r = answer.await.expect("join").expect("send");
                assert_eq!(
                    refused(r).await,
                    takes_no_body,
                    "{path}, streamed, h2c {h2c}"
                );
                drop(tx);
            }
            let r = stranger
                .post(&listen)
                .header(CHANNEL_ID_HEADER, id())
                .body("hello")
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(
                *relay.channels.borrow(),
                0,
                "a refused request left a channel"
            );
            // An empty body of unknown length is no body.
            let (tx, body) = HandBody::channel();
            drop(tx);
            let r = db
                .post(&listen)
                .header(CHANNEL_ID_HEADER, id())
                .body(body)
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), StatusCode::OK, "empty streamed body, h2c {h2c}");
            drop(r);
            relay
                .expect_channels(
                    0,
                    Duration::from_secs(10),
                    "the channel ends with its answer",
                )
                .await;
        }
        expect_healthy(&relay).await;
    })
    .await;
}

/// A `{server}` or `{port}` segment that is not a name is refused (400) before it is used or
/// logged: a `%0a` in it cannot forge a log line.
#[tokio::test]
async fn path_segments_are_names_or_refused_unlogged() {
    within(LIMIT, async {
        let (setup, relay) = relay("");
        let forged = "x%0aFORGED%20line";
        let db = SignedClient::new(relay.addr, &setup.server_key);
        // bob may connect to db/other only: a port he may not use is refused and logged.
        let bob = SignedClient::new(relay.addr, &setup.bob_key);
        let channel = ChannelId::random().expect("id");
        let id = channel.to_string();
        let calls = [
            (
                &bob,
                protocol::connect_path("db", forged),
                "invalid port name",
            ),
            (
                &bob,
                protocol::connect_path(forged, "other"),
                "invalid server name",
            ),
            (
                &db,
                protocol::listen_path("db", forged),
                "invalid port name",
            ),
            (
                &db,
                protocol::listen_path(forged, "echo"),
                "invalid server name",
            ),
            (
                &db,
                protocol::downstream_path(forged, channel),
                "invalid server name",
            ),
            (
                &bob,
                protocol::upstream_path(forged, channel),
                "invalid server name",
            ),
        ];
        for (client, path, reason) in calls {
            let r = client
                .post(&path)
                .header(CHANNEL_ID_HEADER, id.as_str())
                .send()
                .await
                .expect("send");
            let status = r.status();
            let text = r.text().await.expect("body");
            assert_eq!(
                (status, text.trim()),
                (StatusCode::BAD_REQUEST, reason),
                "{path}"
            );
        }
        // A refusal that is logged names a valid port.
        let r = bob
            .post(&protocol::connect_path("db", "echo"))
            .header(CHANNEL_ID_HEADER, id.as_str())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let logs = relay.component.logs().text();
        assert!(logs.contains("connect denied by allow list"), "{logs}");
        assert!(
            !logs.lines().any(|l| l.starts_with("FORGED")),
            "a path segment forged a log line:\n{logs}"
        );
    })
    .await;
}

/// A flood of refused requests leaves a bounded number of log lines, which say how many were
/// left out.
#[tokio::test]
async fn refusals_are_logged_at_a_bounded_rate() {
    within(LIMIT, async {
        let (setup, relay) = relay("");
        let stranger = SignedClient::new(relay.addr, &PrivateKey::generate().expect("key"));
        let bob = SignedClient::new(relay.addr, &setup.bob_key);
        for _ in 0..100 {
            let id = ChannelId::random().expect("id").to_string();
            let r = stranger
                .post(&protocol::listen_path("db", "echo"))
                .header(CHANNEL_ID_HEADER, id.as_str())
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
            let r = bob
                .post(&protocol::connect_path("db", "echo"))
                .header(CHANNEL_ID_HEADER, id.as_str())
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), StatusCode::FORBIDDEN);
        }
        let logs = relay.component.logs().text();
        for line in ["request refused", "connect denied by allow list"] {
            let n = logs.lines().filter(|l| l.contains(line)).count();
            assert!(
                (1..=10).contains(&n),
                "{n} lines of {line:?} for 100 refusals:\n{logs}"
            );
        }
    })
    .await;
}

/// HTTP/2 spoken byte by byte, to do what no well-behaved client does.
mod raw_h2 {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// A connection to the relay, plain or TLS.
    pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

    /// Frame type `HEADERS`.
    pub const HEADERS: u8 = 1;
    /// Frame type `RST_STREAM`.
    pub const RST_STREAM: u8 = 3;
    /// Frame type `SETTINGS`.
    pub const SETTINGS: u8 = 4;
    /// Frame type `GOAWAY`.
    pub const GOAWAY: u8 = 7;
    /// Frame type `CONTINUATION`.
    pub const CONTINUATION: u8 = 9;
    /// Flag `END_HEADERS` (of `HEADERS` and `CONTINUATION`).
    pub const END_HEADERS: u8 = 0x4;
    /// Flag `ACK` (of `SETTINGS`).
    pub const ACK: u8 = 0x1;
    /// Error code `ENHANCE_YOUR_CALM`.
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    /// A frame received.
    #[derive(Debug)]
    pub struct Frame {
        /// Its 9-byte header.
        pub head: [u8; 9],
        /// Its type.
        pub kind: u8,
        /// Its payload.
        pub payload: Vec<u8>,
    }

    /// The bytes of a frame.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("frame length");
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// An HPACK block for `POST /` with `:authority x` (static table only).
    pub fn post_root() -> Vec<u8> {
        vec![0x83, 0x86, 0x84, 0x01, 0x01, b'x']
    }

    /// Frame type `RST_STREAM`'s error code `REFUSED_STREAM`.
    pub const REFUSED_STREAM: u32 = 0x7;

    /// `value` as an HPACK integer with an `n`-bit prefix, the prefix's other bits `flags`.
    fn integer(out: &mut Vec<u8>, flags: u8, n: u32, value: usize) {
        let max = (1usize << n) - 1;
        if value < max {
            out.push(flags | u8::try_from(value).expect("small"));
            return;
        }
        out.push(flags | u8::try_from(max).expect("prefix"));
        let mut rest = value - max;
        while rest >= 128 {
            out.push(u8::try_from(rest % 128).expect("7 bits") | 0x80);
            rest /= 128;
        }
        out.push(u8::try_from(rest).expect("7 bits"));
    }

    /// An HPACK block for a `POST` to `path` at `authority` with `headers`, without the
    /// dynamic table or Huffman coding.
    pub fn post(authority: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut out = vec![0x83, 0x86];
        // Literals without indexing, names from the static table (:path 4, :authority 1).
        for (index, value) in [(4, path), (1, authority)] {
            integer(&mut out, 0, 4, index);
            integer(&mut out, 0, 7, value.len());
            out.extend_from_slice(value.as_bytes());
        }
        for (name, value) in headers {
            out.push(0);
            integer(&mut out, 0, 7, name.len());
            out.extend_from_slice(name.as_bytes());
            integer(&mut out, 0, 7, value.len());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// Sends the client preface and empty settings; reads the relay's settings (id, value)
    /// and acknowledges them.
    pub async fn handshake(io: &mut dyn Io) -> Vec<(u16, u32)> {
        io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("preface");
        io.write_all(&frame(SETTINGS, 0, 0, &[]))
            .await
            .expect("settings");
        let settings = read_frame(io).await.expect("the relay's settings");
        assert_eq!(settings.kind, SETTINGS);
        io.write_all(&frame(SETTINGS, ACK, 0, &[]))
            .await
            .expect("ack");
        settings
            .payload
            .chunks_exact(6)
            .map(|c| {
                (
                    u16::from_be_bytes([c[0], c[1]]),
                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect()
    }

    /// The next frame, or `None` at the end of the connection.
    pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(io: &mut R) -> Option<Frame> {
        let mut head = [0u8; 9];
        io.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            head,
            kind: head[3],
            payload,
        })
    }

    /// Reads frames until the connection ends: the error code of the GOAWAY among them.
    pub async fn goaway(io: &mut dyn Io) -> Option<u32> {
        let mut code = None;
        while let Some(f) = read_frame(io).await {
            if f.kind == GOAWAY && f.payload.len() >= 8 {
                code = Some(u32::from_be_bytes([
                    f.payload[4],
                    f.payload[5],
                    f.payload[6],
                    f.payload[7],
                ]));
            }
        }
        code
    }
}

/// Connects to the relay over HTTP/2: plain (h2c) or with TLS (ALPN `h2`).
async fn h2_connection(relay: &RelayHandle, tls: Option<&Pki>) -> Box<dyn raw_h2::Io> {
    let tcp = TcpStream::connect(relay.addr).await.expect("connect");
    let Some(pki) = tls else {
        return Box::new(tcp);
    };
    let mut config = ptth_common::client::tls_config(Some(&pki.ca)).expect("tls config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    Box::new(tls)
}

/// A relay serving h2c, and one serving TLS.
fn h2_relays(dir: &std::path::Path) -> Vec<(Setup, RelayHandle, Option<Pki>)> {
    let pki = Pki::generate(dir).expect("pki");
    let (plain_setup, plain) = relay("");
    let (tls_setup, tls) = relay(&format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        pki.cert.display(),
        pki.key.display()
    ));
    vec![(plain_setup, plain, None), (tls_setup, tls, Some(pki))]
}

/// The relay's HTTP/2 settings are its own, not the library's defaults.
#[tokio::test]
async fn http2_limits_are_announced() {
    within(LIMIT, async {
        let dir = tempfile::tempdir().expect("dir");
        for (_setup, relay, pki) in h2_relays(dir.path()) {
            let mut io = h2_connection(&relay, pki.as_ref()).await;
            let settings = raw_h2::handshake(&mut *io).await;
            let get = |id: u16| settings.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
            assert_eq!(get(3), Some(32_768), "MAX_CONCURRENT_STREAMS: {settings:?}");
            assert_eq!(
                get(6),
                Some(16 * 1024),
                "MAX_HEADER_LIST_SIZE: {settings:?}"
            );
            assert_eq!(get(5), Some(64 * 1024), "MAX_FRAME_SIZE: {settings:?}");
            assert_eq!(
                get(4),
                Some(1024 * 1024),
                "INITIAL_WINDOW_SIZE: {settings:?}"
            );
        }
    })
    .await;
}

/// A header block that never ends (CONTINUATION after CONTINUATION) is cut off with a
/// GOAWAY long before it could grow, plain and with TLS.
#[tokio::test]
async fn continuation_floods_are_cut_off() {
    within(LIMIT, async {
        let dir = tempfile::tempdir().expect("dir");
        for (_setup, relay, pki) in h2_relays(dir.path()) {
            let mut io = h2_connection(&relay, pki.as_ref()).await;
            raw_h2::handshake(&mut *io).await;
            let mut flood = raw_h2::frame(raw_h2::HEADERS, 0, 1, &raw_h2::post_root());
            let junk = [0x40u8; 1024];
            for _ in 0..1000 {
                flood.extend(raw_h2::frame(raw_h2::CONTINUATION, 0, 1, &junk));
            }
            // The relay may close the connection while this is on its way.
            let _ = io.write_all(&flood).await;
            let code = tokio::time::timeout(CLOSED_WITHIN, raw_h2::goaway(&mut *io))
                .await
                .expect("the connection is closed");
            // An error, not NO_ERROR: that would be the relay's idle close, not the flood's.
            assert!(
                code.is_some_and(|c| c != 0),
                "GOAWAY {code:?} (tls: {})",
                pki.is_some()
            );
            expect_healthy_h2(&relay, pki.as_ref()).await;
        }
    })
    .await;
}

/// Streams opened and reset at once, by the thousand (CVE-2023-44487), get the connection
/// closed with ENHANCE_YOUR_CALM, plain and with TLS; the relay serves others meanwhile.
#[tokio::test]
async fn rapid_resets_are_cut_off() {
    within(LIMIT, async {
        let dir = tempfile::tempdir().expect("dir");
        for (_setup, relay, pki) in h2_relays(dir.path()) {
            let mut io = h2_connection(&relay, pki.as_ref()).await;
            raw_h2::handshake(&mut *io).await;
            let mut flood = Vec::new();
            for i in 0..10_000u32 {
                let stream = 2 * i + 1;
                flood.extend(raw_h2::frame(
                    raw_h2::HEADERS,
                    raw_h2::END_HEADERS,
                    stream,
                    &raw_h2::post_root(),
                ));
                flood.extend(raw_h2::frame(
                    raw_h2::RST_STREAM,
                    0,
                    stream,
                    &8u32.to_be_bytes(),
                ));
            }
            let _ = io.write_all(&flood).await;
            let code = tokio::time::timeout(CLOSED_WITHIN, raw_h2::goaway(&mut *io))
                .await
                .expect("the connection is closed");
            assert_eq!(
                code,
                Some(raw_h2::ENHANCE_YOUR_CALM),
                "tls: {}",
                pki.is_some()
            );
            expect_healthy_h2(&relay, pki.as_ref()).await;
        }
    })
    .await;
}

/// The relay still answers a new caller over HTTP/2 at once.
async fn expect_healthy_h2(relay: &RelayHandle, pki: Option<&Pki>) {
    let io = h2_connection(relay, pki).await;
    let (send, h2) = h2::client::handshake(io).await.expect("h2 handshake");
    tokio::spawn(h2);
    let mut send = send.ready().await.expect("ready");
    let request = http::Request::post("http://localhost/v1/")
        .body(())
        .expect("request");
    let (answer, _) = send.send_request(request, true).expect("send");
    let answer = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .expect("answered in time")
        .expect("answer");
    assert_eq!(answer.status(), 404);
}

/// Request heads past the limits are refused before any handler sees them: over HTTP/1.1 a
/// head over 256 KiB, or with more than 100 headers, gets 431; over HTTP/2, plain and with
/// TLS, a header list over 16 KiB gets 431 on its stream, and the connection goes on. The
/// relay serves others meanwhile.
#[tokio::test]
async fn oversized_request_heads_are_refused() {
    within(LIMIT, async {
        let (_setup, relay) = relay("");
        let url = format!("http://{}/v1/", relay.addr);
        let http = http_client_builder(None)
            .expect("builder")
            .build()
            .expect("client");
        let big = "x".repeat(300 * 1024);
        let r = http.post(&url).header("x-big", &big).send().await;
        assert_eq!(
            r.map(|r| r.status()).ok(),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        let mut many = http.post(&url);
        for i in 0..101 {
            many = many.header(format!("x-h{i}"), "v");
        }
        let r = many.send().await;
        assert_eq!(
            r.map(|r| r.status()).ok(),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        expect_healthy(&relay).await;
        // HTTP/2, plain and with TLS: just under the limit is served, over it is not.
        let dir = tempfile::tempdir().expect("dir");
        for (_setup, relay, pki) in h2_relays(dir.path()) {
            let io = h2_connection(&relay, pki.as_ref()).await;
            let (send, h2) = h2::client::handshake(io).await.expect("h2 handshake");
            tokio::spawn(h2);
            let mut send = send.ready().await.expect("ready");
            for (size, expected) in [
                (8 * 1024, http::StatusCode::NOT_FOUND),
                (20 * 1024, http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
            ] {
                let request = http::Request::post("http://localhost/v1/")
                    .header("x-big", "x".repeat(size))
                    .body(())
                    .expect("request");
                let answer = match send.send_request(request, true) {
                    Ok((answer, _)) => tokio::time::timeout(Duration::from_secs(5), answer)
                        .await
                        .expect("answered in time")
                        .ok(),
                    Err(_) => None,
                };
                let status = answer.map(|a| a.status());
                assert_eq!(
                    status,
                    Some(expected),
                    "{size} bytes, TLS {}",
                    pki.is_some()
                );
                send = send.ready().await.expect("the connection goes on");
            }
            expect_healthy_h2(&relay, pki.as_ref()).await;
        }
    })
    .await;
}

/// A source service: each connection sends 8 bytes (a seed), then gets an endless stream of
/// 64 KiB chunks, `random_bytes(64 KiB, seed)`, `random_bytes(64 KiB, seed + 1)`, ...
async fn source_service() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            // Small buffers at both ends keep the kernel's share of 100 stopped tunnels small.
            let _ = socket2::SockRef::from(&s).set_send_buffer_size(128 * 1024);
            tokio::spawn(async move {
                let mut seed = [0u8; 8];
                if s.read_exact(&mut seed).await.is_err() {
                    return;
                }
                let mut seed = u64::from_le_bytes(seed);
                while s.write_all(&random_bytes(64 * 1024, seed)).await.is_ok() {
                    seed += 1;
                }
            });
        }
    });
    addr
}

/// A tunnel reading a [`source_service`] stream and checking every byte of it.
struct Reading {
    stream: TcpStream,
    seed: u64,
    /// The chunk being checked, and how far.
    chunk: Vec<u8>,
    at: usize,
}

impl Reading {
    async fn open(local: std::net::SocketAddr, seed: u64) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(128 * 1024).expect("SO_RCVBUF");
        let mut stream = socket.connect(local).await.expect("connect");
        stream.write_all(&seed.to_le_bytes()).await.expect("seed");
        Self {
            stream,
            seed,
            chunk: random_bytes(64 * 1024, seed),
            at: 0,
        }
    }

    /// Reads exactly `len` more bytes, each the one the source must have sent.
    async fn read_checked(&mut self, mut len: usize) {
        let mut buf = vec![0u8; 64 * 1024];
        while len > 0 {
            let want = len.min(buf.len()).min(self.chunk.len() - self.at);
            let n = self.stream.read(&mut buf[..want]).await.expect("read");
            assert!(n > 0, "the tunnel ended");
            assert_eq!(&buf[..n], &self.chunk[self.at..self.at + n], "bytes differ");
            self.at += n;
            len -= n;
            if self.at == self.chunk.len() {
                self.seed += 1;
                self.chunk = random_bytes(64 * 1024, self.seed);
                self.at = 0;
            }
        }
    }
}

/// 100 tunnels whose readers stop reading while their services keep writing: the relay's
/// memory stays flat (it holds a bounded amount per stream, and flow control stops the rest
/// at the service), and the tunnels outlive the relay's `idle_timeout` paused (the silence
/// of an upload that the relay itself holds back is not its endpoint's), then carry on with
/// every byte in order. Over HTTP/1.1 and h2c, with the programs as processes; over h2c the
/// stopped streams, which share the endpoints' connections with every other channel, must not
/// stall those (the heartbeats of idle channels among them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stop_reading_cost_the_relay_a_bounded_amount() {
    use ptth_tests::process::{LogsOnFailure, free_port, start, wait_listening};
    within(Duration::from_secs(120), async {
        let source = source_service().await;
        for scheme in ["http", "h2c"] {
            let mut setup = Setup::new().expect("setup");
            setup.relay_extra = "heartbeat_interval = \"1s\"\nidle_timeout = \"3s\"\n".into();
            let relay_addr = free_port().expect("port");
            let dir = setup.path().to_owned();
            let _logs = LogsOnFailure(dir.clone());
            std::fs::write(dir.join("relay.toml"), setup.relay_toml(relay_addr)).expect("toml");
            let start = |bin, toml: &str| start(&dir, bin, toml);
            let mut relay = start("ptth_relay", "relay.toml");
            wait_listening(relay_addr, &mut relay).await.expect("relay");
            let url = format!("{scheme}://{relay_addr}");
            setup
                .server_config_url(&url, &[("source", source.to_string())], "heartbeat_interval = \"1s\"")
                .expect("server.toml");
            let _server = start("ptth_server", "server.toml");
            let local = free_port().expect("port");
            std::fs::write(
                dir.join("proxy.toml"),
                format!(
                    "relay_url = \"{url}\"\nkey_file = \"alice.key\"\nheartbeat_interval = \"1s\"\n\
                     [[forwards]]\nlisten = \"{local}\"\nserver = \"db\"\nport = \"source\"\n"
                ),
            )
            .expect("proxy.toml");
            let mut proxy = start("ptth_proxy", "proxy.toml");
            wait_listening(local, &mut proxy).await.expect("proxy");
            let before = relay.rss_kib().expect("rss");
            let mut tunnels = Vec::new();
            for i in 0..100u64 {
                let mut t = Reading::open(local, i * 1_000_000).await;
                t.read_checked(64 * 1024).await;
                tunnels.push(t);
            }
            // Every reader stops; the services write on until flow control stops them: the
            // relay's memory then stays the same over a second.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            let mut blocked = relay.rss_kib().expect("rss");
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = relay.rss_kib().expect("rss");
                if now == blocked {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "{scheme}: the relay's memory keeps changing");
                blocked = now;
            }
            tokio::time::sleep(Duration::from_secs(4)).await;
            let later = relay.rss_kib().expect("rss");
            assert!(
                later <= blocked + 4 * 1024,
                "{scheme}: the relay's memory grew while the readers were stopped: {blocked} -> {later} KiB"
            );
            // At most one HTTP/2 stream window (1 MiB) of unread upload, and the chunk being
            // passed on (hyper's HTTP/1.1 buffers take less).
            let per_tunnel = blocked.saturating_sub(before) / 100;
            assert!(
                per_tunnel <= 2048,
                "{scheme}: {per_tunnel} KiB per stopped tunnel ({before} -> {blocked} KiB)"
            );
            eprintln!("{scheme}: relay RSS {before} KiB, {blocked} KiB with 100 stopped readers, {later} KiB 4 s later");
            // Paused for longer than idle_timeout, every tunnel carries on, exact.
            for t in &mut tunnels {
                t.read_checked(1024 * 1024).await;
            }
        }
    })
    .await;
}

/// Callers whose signatures do not verify cost the relay nothing that lasts: after a warm-up,
/// 20,000 such requests (over HTTP/1.1 and h2c, with bodies, to every endpoint) leave its
/// memory where it was, and it answers at once afterwards. (The relay as a process, so that
/// its memory is its own.) Over h2c the bodies' data in flight when the relay answers is
/// answered with resets, which must not end the connection (they did after 1,024).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_floods_cost_the_relay_nothing_that_lasts() {
    use ptth_tests::process::{LogsOnFailure, free_port, start, wait_listening};
    within(Duration::from_secs(120), async {
        let setup = Setup::new().expect("setup");
        let addr = free_port().expect("port");
        let dir = setup.path().to_owned();
        let _logs = LogsOnFailure(dir.clone());
        std::fs::write(dir.join("relay.toml"), setup.relay_toml(addr)).expect("toml");
        let mut relay = start(&dir, "ptth_relay", "relay.toml");
        wait_listening(addr, &mut relay).await.expect("listening");
        let stranger = PrivateKey::generate().expect("key");
        let flood = |count: usize| {
            let stranger = stranger.clone();
            async move {
                let clients = [
                    SignedClient::new(addr, &stranger),
                    SignedClient::new(addr, &stranger).h2c(),
                ];
                let id = ChannelId::random().expect("id");
                let paths = [
                    protocol::listen_path("db", "echo"),
                    protocol::connect_path("db", "echo"),
                    protocol::downstream_path("db", id),
                    protocol::upstream_path("db", id),
                ];
                let mut tasks = tokio::task::JoinSet::new();
                for worker in 0..50 {
                    let client = clients[worker % 2].clone();
                    let paths = paths.clone();
                    tasks.spawn(async move {
                        for i in 0..count / 50 {
                            let r = client
                                .post(&paths[i % paths.len()])
                                .header(CHANNEL_ID_HEADER, id.to_string())
                                .body(vec![b'x'; 1024])
                                .send()
                                .await
                                .expect("answer");
                            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
                        }
                    });
                }
                while let Some(t) = tasks.join_next().await {
                    t.expect("worker");
                }
            }
        };
        flood(2_000).await;
        let before = relay.rss_kib().expect("rss");
        flood(20_000).await;
        let after = relay.rss_kib().expect("rss");
        assert!(
            after <= before + 8 * 1024,
            "the relay's memory grew from {before} to {after} KiB over 20,000 refused requests"
        );
        eprintln!(
            "relay RSS {before} KiB after a warm-up, {after} KiB after 20,000 refused requests"
        );
        let r = SignedClient::new(addr, &setup.server_key)
            .post(&protocol::listen_path("db", "echo"))
            .header(
                CHANNEL_ID_HEADER,
                ChannelId::random().expect("id").to_string(),
            )
            .send()
            .await
            .expect("answer");
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "the relay still serves its principals"
        );
    })
    .await;
}

/// Streams past the 32,768 an HTTP/2 connection may have open at once are refused
/// (`REFUSED_STREAM`), plain and with TLS. The streams held open are alice's signed uploads,
/// each waiting (`accept_timeout`) for a channel that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_limit_are_refused() {
    use ptth_common::auth::{SIGNATURE, SIGNATURE_INPUT, Signer};
    within(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().expect("dir");
        for (setup, relay, pki) in h2_relays(dir.path()) {
            let mut io = h2_connection(&relay, pki.as_ref()).await;
            raw_h2::handshake(&mut *io).await;
            let authority = if pki.is_some() {
                format!("localhost:{}", relay.addr.port())
            } else {
                relay.addr.to_string()
            };
            let alice = Signer::new(setup.alice_key.clone());
            let limit = 32_768u32;
            let (mut read, mut write) = tokio::io::split(io);
            let refused = tokio::spawn(async move {
                let last = 2 * limit + 1;
                while let Some(f) = raw_h2::read_frame(&mut read).await {
                    let stream =
                        u32::from_be_bytes(f.head[5..9].try_into().expect("4 bytes")) & 0x7fff_ffff;
                    if f.kind == raw_h2::RST_STREAM && stream == last {
                        return Some(u32::from_be_bytes(f.payload[..4].try_into().expect("code")));
                    }
                }
                None
            });
            // Streams 1, 3, ... up to one past the limit.
            let mut batch = Vec::new();
            for i in 0..=limit {
                let id = ChannelId::random().expect("id");
                let path = protocol::upstream_path("db", id);
                let h = alice.sign("POST", &authority, &path);
                let block = raw_h2::post(
                    &authority,
                    &path,
                    &[(SIGNATURE_INPUT, &h.input), (SIGNATURE, &h.signature)],
                );
                batch.extend(raw_h2::frame(
                    raw_h2::HEADERS,
                    raw_h2::END_HEADERS,
                    2 * i + 1,
                    &block,
                ));
                if batch.len() > 1 << 20 || i == limit {
                    write.write_all(&batch).await.expect("write");
                    batch.clear();
                }
            }
            let code = tokio::time::timeout(Duration::from_secs(30), refused)
                .await
                .expect("an answer for the stream past the limit")
                .expect("reader");
            assert_eq!(code, Some(raw_h2::REFUSED_STREAM), "TLS {}", pki.is_some());
            drop(write);
            expect_healthy_h2(&relay, pki.as_ref()).await;
        }
    })
    .await;
}
