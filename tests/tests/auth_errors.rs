//! Each cause of a refused signature, seen from both ends: the relay's log line names the
//! cause and what to do, and the endpoint's message says what to do from what the relay's
//! answer tells it (its one-line reason, the authority it checked, its clock) and no more: an
//! unknown key, a bad signature and a signature over another authority get one answer.
//!
//! The relay and the client proxies run in-process, but for the clock test, which runs
//! `ptth_proxy` under faketime: `cargo build --workspace` before running this file alone.

use std::net::SocketAddr;
use std::time::Duration;

use ptth_common::auth::{RELAY_AUTHORITY, SIGNATURE, SIGNATURE_INPUT, SIGNED_AUTHORITY, Signer};
use ptth_common::keys::PrivateKey;
use ptth_common::protocol::{CHANNEL_ID_HEADER, ChannelId, connect_path};
use ptth_tests::process::{LogsOnFailure, start_with_clock};
use ptth_tests::*;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(60);

/// A relay (in-process) with `setup`'s keys and `extra` lines in its relay.toml.
fn relay(setup: &mut Setup, extra: &str) -> RelayHandle {
    setup.relay_extra = extra.to_owned();
    setup.start_relay().expect("relay")
}

/// A client proxy (in-process) forwarding `db/echo` through `url` as alice, signing with
/// `key`. No server runs: the proxy's channels are refused or wait, which is all it takes.
fn proxy(setup: &Setup, url: &str, key: &PrivateKey) -> Component {
    let config = setup
        .proxy_config_url(url, "alice", &[("db", "echo")], "")
        .expect("proxy config");
    start_proxy(config, key.clone()).expect("proxy").0
}

/// The first line of `logs` (waiting at most 20 s for it) that has every one of `words`.
async fn line_with(what: &str, logs: &Logs, words: &[&str]) -> String {
    let find = |text: &str| {
        text.lines()
            .find(|l| words.iter().all(|w| l.contains(w)))
            .map(str::to_owned)
    };
    logs.wait_for(Duration::from_secs(20), |text| find(text).is_some())
        .await;
    let text = logs.text();
    find(&text).unwrap_or_else(|| panic!("{what}: no line with {words:?}:\n{text}"))
}

/// A front between an endpoint and the relay that edits each request's head, over HTTP/1.1
/// (one request per connection, as the endpoints send over `http://`). With `replay`, it
/// sends a `connect` or `listen` to the relay twice: first on a connection of its own, whose
/// answer it waits for and drops, then for real.
async fn front(relay: SocketAddr, edit: fn(&str) -> String, replay: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut caller, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some((head, rest)) = read_head(&mut caller).await else {
                    return;
                };
                let head = edit(&head);
                let request_line = head.lines().next().unwrap_or_default();
                if replay
                    && (request_line.contains("/connect ") || request_line.contains("/listen "))
                {
                    let Ok(mut first) = TcpStream::connect(relay).await else {
                        return;
                    };
                    let sent = first.write_all(head.as_bytes()).await;
                    if sent.is_err() || first.write_all(&rest).await.is_err() {
                        return;
                    }
                    // Its answer's head: the relay has taken the request in.
                    let _ = read_head(&mut first).await;
                }
                let Ok(mut relay) = TcpStream::connect(relay).await else {
                    return;
                };
                if relay.write_all(head.as_bytes()).await.is_ok()
                    && relay.write_all(&rest).await.is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut caller, &mut relay).await;
                }
            });
        }
    });
    addr
}

/// An HTTP/1.1 head (up to its blank line, at most 64 KiB) and the bytes read after it.
async fn read_head(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((String::from_utf8(buf).ok()?, rest));
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// nginx's `proxy_set_header Host $host;`: the `Host` without its port.
fn host_without_port(head: &str) -> String {
    head.split_inclusive("\r\n")
        .map(|line| match line.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("host") => {
                let host = value
                    .trim()
                    .rsplit_once(':')
                    .map_or(value.trim(), |(h, _)| h);
                format!("host: {host}\r\n")
            }
            _ => line.to_owned(),
        })
        .collect()
}

/// A front that drops the `Signature` header.
fn without_signature(head: &str) -> String {
    head.split_inclusive("\r\n")
        .filter(|line| {
            !line
                .split_once(':')
                .is_some_and(|(name, _)| name.eq_ignore_ascii_case(SIGNATURE))
        })
        .collect()
}

#[tokio::test]
async fn an_unknown_key_is_named_at_the_relay_and_the_endpoint_asks_for_it() {
    within(LIMIT, async {
        let mut setup = Setup::new().expect("setup");
        let relay = relay(&mut setup, "");
        let stranger = PrivateKey::generate().expect("key");
        let key = stranger.public().to_string();
        let proxy = proxy(&setup, &format!("http://{}", relay.addr), &stranger);
        line_with(
            "relay",
            relay.component.logs(),
            &[
                "INFO",
                &format!(
                    "request refused: unknown key {key}: if this caller is yours, add its public \
                     key to relay.toml, under [[servers]] or [[clients]]"
                ),
                "client=127.0.0.1",
            ],
        )
        .await;
        line_with(
            "proxy",
            proxy.logs(),
            &[&format!(
                "no channel to db/echo: relay answered 401 Unauthorized: invalid signature: is \
                 our public key ({key}) in relay.toml, under [[servers]] or [[clients]] with our \
                 name? If relay.toml sets `authorities`, it must include `127.0.0.1:{}`",
                relay.addr.port()
            )],
        )
        .await;
    })
    .await;
}

/// The case: a front that drops the port from `Host` (nginx's `$host`) before a relay
/// without `authorities`. Then the same proxy, straight to a relay whose `authorities` lack
/// the name it signs for.
#[tokio::test]
async fn a_signature_for_another_authority_says_which_and_what_to_set() {
    within(LIMIT, async {
        let mut setup = Setup::new().expect("setup");
        let relay = relay(&mut setup, "");
        let front = front(relay.addr, host_without_port, false).await;
        let signed_for = front.to_string();
        let behind_front = proxy(&setup, &format!("http://{front}"), &setup.alice_key);
        let line = line_with(
            "relay",
            relay.component.logs(),
            &[&format!(
                "request refused: the signature by key {} is for another authority: \
                 \"{signed_for}\", but the request arrived as \"127.0.0.1\": a front in between \
                 changes the Host; set `authorities = [\"{signed_for}\"]` in relay.toml (or make \
                 the front pass the Host on unchanged)",
                setup.alice_key.public()
            )],
        )
        .await;
        assert!(line.contains(" INFO "), "{line}");
        line_with(
            "proxy",
            behind_front.logs(),
            &[&format!(
                "relay answered 401 Unauthorized: invalid signature: the relay saw this request \
                 as `127.0.0.1`, but we signed it for `{signed_for}`: a front in between changes \
                 the Host; set `authorities = [\"{signed_for}\"]` in relay.toml (or make the \
                 front keep the Host)"
            )],
        )
        .await;

        let relay = relay_named(&mut setup, "relay.test");
        let signed_for = relay.addr.to_string();
        let proxy = proxy(&setup, &format!("http://{signed_for}"), &setup.alice_key);
        line_with(
            "relay with authorities",
            relay.component.logs(),
            &[&format!(
                "is for another authority: \"{signed_for}\", which is not in `authorities` \
                 [\"relay.test\"]: add it there in relay.toml if this relay answers to that name \
                 (or give the caller a relay_url with one of those)"
            )],
        )
        .await;
        // The relay checked no authority of the request's: it says nothing of one.
        line_with(
            "proxy, relay with authorities",
            proxy.logs(),
            &[&format!(
                "invalid signature: is our public key ({}) in relay.toml, under [[servers]] or \
                 [[clients]] with our name? If relay.toml sets `authorities`, it must include \
                 `{signed_for}`",
                setup.alice_key.public()
            )],
        )
        .await;
    })
    .await;
}

/// A relay whose `authorities` is `name` alone.
fn relay_named(setup: &mut Setup, name: &str) -> RelayHandle {
    relay(setup, &format!("authorities = [\"{name}\"]"))
}

/// `ptth_proxy` 95 s ahead of the relay, then 95 s behind (each with a relay of its own, whose
/// refusals are not rate-limited away by the other's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_that_differ_are_measured_at_both_ends() {
    within(LIMIT, async {
        let mut setup = Setup::new().expect("setup");
        let _logs = LogsOnFailure(setup.path().to_owned());
        for (offset, relay_words, proxy_words) in [
            (
                "+95s",
                [
                    "s ahead of the relay's clock (at most 45 s allowed): the clocks differ by 9",
                    "s: sync them (NTP)",
                ],
                "s ahead of the relay's (the clocks may differ by at most 45 s): sync the clocks \
                 (NTP)",
            ),
            (
                "-95s",
                [
                    "s before the relay's clock, and expired (valid at most 60 s): the clocks \
                     differ by 9",
                    "s, or the request took that long to come: sync the clocks (NTP)",
                ],
                "s behind the relay's (the clocks may differ by at most 45 s): sync the clocks \
                 (NTP)",
            ),
        ] {
            let relay = relay(&mut setup, "");
            setup
                .proxy_config(relay.addr, "alice", &[("db", "echo")], "")
                .expect("proxy config");
            let config = setup.path().join("proxy-alice.toml");
            let log = setup.path().join(format!("proxy{offset}.log"));
            let mut proxy = start_with_clock("ptth_proxy", &config, offset, log);
            line_with(
                offset,
                relay.component.logs(),
                &["request refused: signed 9", relay_words[0], relay_words[1]],
            )
            .await;
            proxy
                .logged(&[
                    "relay answered 401 Unauthorized: signature expired or not yet valid: check \
                     the clocks: our clock is 9",
                    proxy_words,
                ])
                .await
                .expect("the clocks named");
        }
    })
    .await;
}

/// A front that sends a request twice: the second is refused as a replay.
#[tokio::test]
async fn a_replayed_request_is_refused_and_the_front_suspected() {
    within(LIMIT, async {
        let mut setup = Setup::new().expect("setup");
        let relay = relay(&mut setup, "");
        let front = front(relay.addr, str::to_owned, true).await;
        let proxy = proxy(&setup, &format!("http://{front}"), &setup.alice_key);
        line_with(
            "relay",
            relay.component.logs(),
            &[
                "request refused: replayed request: the same signed request came twice: a front \
               in between that retries requests, or a replay by someone who saw it (use TLS)",
            ],
        )
        .await;
        line_with(
            "proxy",
            proxy.logs(),
            &[
                "relay answered 401 Unauthorized: replayed request: the relay had seen this \
               signed request before: a front in between may send requests twice",
            ],
        )
        .await;
    })
    .await;
}

/// A front that drops the `Signature` header.
#[tokio::test]
async fn missing_signature_headers_point_at_the_front() {
    within(LIMIT, async {
        let mut setup = Setup::new().expect("setup");
        let relay = relay(&mut setup, "");
        let front = front(relay.addr, without_signature, false).await;
        let proxy = proxy(&setup, &format!("http://{front}"), &setup.alice_key);
        line_with(
            "relay",
            relay.component.logs(),
            &[
                "request refused: missing or malformed signature headers: signature missing: \
               not a ptth endpoint (a scan?), or a front in between drops or alters the \
               Signature and Signature-Input headers",
            ],
        )
        .await;
        line_with(
            "proxy",
            proxy.logs(),
            &[
                "relay answered 401 Unauthorized: missing or malformed signature: a front in \
               between may drop or alter the Signature and Signature-Input headers",
            ],
        )
        .await;
    })
    .await;
}

/// An answer without its `Date`: status, sorted headers, body.
async fn answer(r: reqwest::Response) -> (StatusCode, Vec<(String, String)>, bytes::Bytes) {
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
}

/// An unknown key, a known key's signature over another path, and a known key's signature
/// over another authority (which it names) are answered alike, byte for byte but the date,
/// while the relay's log tells them apart. The answer names the authority the relay checked.
#[tokio::test]
async fn unknown_key_bad_signature_and_other_authority_get_one_answer() {
    within(LIMIT, async {
        let mut setup = Setup::new().expect("setup");
        let relay = relay(&mut setup, "");
        let authority = relay.addr.to_string();
        let path = connect_path("db", "echo");
        let http = http_client_builder(None)
            .expect("builder")
            .build()
            .expect("client");
        let send = |signer: &Signer, signed_path: &str, signed_for: &str| {
            let h = signer.sign("POST", signed_for, signed_path);
            http.post(format!("http://{authority}{path}"))
                .header(SIGNATURE_INPUT, h.input)
                .header(SIGNATURE, h.signature)
                .header(SIGNED_AUTHORITY, h.authority)
                .header(CHANNEL_ID_HEADER, ChannelId::random().expect("id").to_string())
                .send()
        };
        let stranger = Signer::new(PrivateKey::generate().expect("key"));
        let alice = Signer::new(setup.alice_key.clone());
        let unknown = answer(send(&stranger, &path, &authority).await.expect("send")).await;
        let other_path = connect_path("db", "other");
        let bad = answer(send(&alice, &other_path, &authority).await.expect("send")).await;
        let elsewhere = answer(send(&alice, &path, "relay.test:8443").await.expect("send")).await;
        assert_eq!(unknown.0, StatusCode::UNAUTHORIZED);
        assert_eq!(&unknown.2[..], b"invalid signature\n");
        assert!(
            unknown
                .1
                .contains(&(RELAY_AUTHORITY.to_owned(), authority.clone())),
            "{:?}",
            unknown.1
        );
        assert_eq!(bad, unknown, "a bad signature");
        assert_eq!(elsewhere, unknown, "a signature over another authority");
        let logs = relay.component.logs();
        let key = setup.alice_key.public();
        for words in [
            "request refused: unknown key ".to_owned(),
            format!("request refused: the signature by key {key} does not verify over [\"{authority}\"]: a front in between may rewrite the path"),
            format!("request refused: the signature by key {key} is for another authority: \"relay.test:8443\", but the request arrived as \"{authority}\""),
        ] {
            line_with("relay", logs, &[&words]).await;
        }
    })
    .await;
}
