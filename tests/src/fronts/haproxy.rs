//! HAProxy in front of the relay, and how its request log is judged.

use super::pki::Pki;
use super::site::Site;

/// The lines of an HAProxy backend that balance among several relays by server name, as in
/// docs/scale-out.md (`tests/tests/deploy_docs.rs` checks that the page has each of them).
pub const HAPROXY_BALANCING: &[&str] = &[
    "balance uri path-only depth 3",
    "hash-type consistent",
    "option httpchk",
    "http-check send meth GET uri /v1/health",
    "http-check expect status 200",
    "option redispatch",
    "retries 3",
    "default-server check inter 1s fall 2 rise 2",
];

/// HAProxy termination states accepted in its request log: `----` is a request that ended
/// normally on both sides (a long-poll answered 204, a tunnel whose two bodies ended).
const CLEAN: &[&str] = &["----"];

/// The HAProxy configuration: TLS on `port`, everything proxied to the relay (or balanced among
/// the relays by server name, as docs/scale-out.md says), timeouts `t` seconds.
pub(super) fn config(pki: &Pki, site: &Site<'_>) -> String {
    let Site {
        port,
        relays,
        t,
        probe,
        token,
        ..
    } = *site;
    let (connections, streams) = (site.connections(), site.streams());
    let backend = match relays {
        [relay] => format!("    server relay {relay}\n"),
        // Several relays: each request goes to the relay of the server named in its path, and
        // a relay that fails its health check is left out (docs/scale-out.md).
        _ => {
            let mut b: String = HAPROXY_BALANCING
                .iter()
                .map(|l| format!("    {l}\n"))
                .collect();
            for (i, relay) in relays.iter().enumerate() {
                b.push_str(&format!("    server relay{i} {relay}\n"));
            }
            b
        }
    };
    format!(
        r#"global
    maxconn {connections}
    tune.h2.max-concurrent-streams {streams}

defaults
    log stderr format raw local0 info
    option httplog
    mode http
    timeout connect 3s
    timeout client {t}s
    timeout server {t}s
    timeout http-request 10s
    timeout http-keep-alive {t}s

frontend ptth
    bind 127.0.0.1:{port} ssl crt {combined} alpn h2,http/1.1
    option forwardfor
    option http-no-delay
    http-request return status 200 content-type text/plain string "{token}" if {{ path {probe} }}
    default_backend relay

backend relay
{backend}"#,
        combined = pki.combined.display(),
    )
}

/// Lines of HAProxy's log that report a problem: `[WARNING]` and `[ALERT]` lines, requests
/// answered 5xx or ended with a termination state other than `----`, and connection-level
/// errors (any other line).
pub(super) fn errors(log: &str, probe: &str) -> Vec<String> {
    log.lines()
        .filter(|l| problem(l, probe))
        .map(str::to_owned)
        .collect()
}

/// One request of HAProxy's `option httplog` format:
/// `client:port [date] frontend backend/server Treq/Tw/Tc/Tr/Ta status bytes cookie cookie
/// termination conns queues "request"`.
#[derive(Debug, PartialEq, Eq)]
struct HttpLogLine {
    /// The HTTP status sent to the client.
    status: u16,
    /// The four-letter termination state (`----` when the request ended normally).
    termination: String,
    /// The request line, quoted.
    request: String,
}

/// Parses a line of HAProxy's `option httplog` format; `None` for anything else.
fn parse_httplog(line: &str) -> Option<HttpLogLine> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let timers = |t: &str| {
        let parts: Vec<&str> = t.split('/').collect();
        parts.len() == 5 && parts.iter().all(|p| p.parse::<i64>().is_ok())
    };
    let i = tokens.iter().position(|t| timers(t))?;
    let status = tokens.get(i + 1)?.parse().ok()?;
    let termination = (*tokens.get(i + 5)?).to_owned();
    if termination.len() != 4 {
        return None;
    }
    let request = line[line.find('"')?..].to_owned();
    Some(HttpLogLine {
        status,
        termination,
        request,
    })
}

fn problem(line: &str, probe: &str) -> bool {
    let l = line.to_ascii_lowercase();
    if l.trim().is_empty() || l.starts_with("[notice]") {
        return false;
    }
    match parse_httplog(line) {
        // The readiness probe is answered by HAProxy itself (state `LR--`).
        Some(h) if h.request.contains(probe) => false,
        Some(h) => h.status >= 500 || !CLEAN.contains(&h.termination.as_str()),
        // `[WARNING]`, `[ALERT]`, or a connection that failed before any request (a TLS
        // handshake, an HTTP/2 protocol error): HAProxy logs those in another format.
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE: &str = "/ptth-front-probe";

    #[test]
    fn haproxy_log_lines_are_judged() {
        // Lines as HAProxy 2.6 wrote them with the test configuration.
        let poll = r#"127.0.0.1:38892 [24/Nov/2026:09:05:47.224] ptth~ relay/relay 0/0/0/1007/1007 204 107 - - ---- 2/2/1/1/0 0/0 "POST https://localhost:40929/v1/servers/db/ports/echo/listen HTTP/2.0""#;
        let probe = r#"127.0.0.1:38886 [24/Nov/2026:09:05:47.208] ptth~ ptth/<NOSRV> 0/-1/-1/-1/0 200 110 - - LR-- 1/1/0/0/0 0/0 "GET https://localhost:41005/ptth-front-probe HTTP/2.0""#;
        let parsed = parse_httplog(poll).expect("httplog line");
        assert_eq!(parsed.status, 204);
        assert_eq!(parsed.termination, "----");
        assert!(parsed.request.contains("/listen "));
        assert!(!problem(poll, PROBE));
        assert!(!problem(probe, PROBE));
        // A timeout cutting a tunnel, a relay that went away, a startup warning, a failed
        // TLS handshake (not in httplog format).
        let cut = poll.replace(" ---- ", " sD-- ").replace(" 204 ", " 200 ");
        let gone = poll.replace(" ---- ", " SC-- ").replace(" 204 ", " 503 ");
        assert!(problem(&cut, PROBE));
        assert!(problem(&gone, PROBE));
        assert!(problem(
            "[WARNING]  (1) : config : missing timeouts for frontend 'ptth'.",
            PROBE
        ));
        assert!(problem(
            "127.0.0.1:40000 [24/Nov/2026:09:05:47.208] ptth/1: SSL handshake failure",
            PROBE
        ));
    }
}
