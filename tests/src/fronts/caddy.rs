//! Caddy in front of the relay, and how its logs are judged.

use std::path::Path;

use super::pki::Pki;
use super::site::Site;

/// Caddy 2.6 has no timer that measures the silence of a proxied stream in flight and that
/// the protocol can live with, so `t` only sets `idle`, which applies to connections with no
/// request in flight (and the proxies always keep a long-poll in flight):
/// - the server's `read_body` and `write` are total deadlines per request (Go's
///   `ReadTimeout`/`WriteTimeout`), which would cut every tunnel however busy;
/// - the transport's `read_timeout` is re-armed before each read from the relay, but an
///   upload's answer comes only when the upload ends, so it would cut every upload;
/// - the transport's `write_timeout` bounds one blocked write to the relay: a silent stream
///   has no write in progress and never trips it.
///
/// The site has no host name: the proxies reach Caddy through a [`CountingForwarder`](crate::taps::CountingForwarder), so the
/// `Host` they send names another port, and Caddy's access log only covers requests whose host
/// matches the site's unless the site has none.
pub(super) fn config(dir: &Path, pki: &Pki, site: &Site<'_>) -> String {
    let Site {
        port,
        relays,
        t,
        probe,
        token,
        ..
    } = *site;
    // One relay only (`start_balancer` refuses Caddy for several).
    let relay = relays[0];
    format!(
        r#"{{
    admin off
    auto_https off
    servers {{
        timeouts {{
            idle {t}s
        }}
    }}
}}

https://:{port} {{
    bind 127.0.0.1
    tls {cert} {key}
    log {{
        output file {access}
        format json
    }}
    respond {probe} "{token}" 200
    reverse_proxy {relay} {{
        flush_interval -1
    }}
}}
"#,
        cert = pki.cert.display(),
        key = pki.key.display(),
        access = dir.join("access.log").display(),
    )
}

/// Lines of Caddy's logs that report a problem: `warn` and `error` entries (but the warnings
/// of every start), and requests answered 5xx.
pub(super) fn errors(log: &str, access: &str) -> Vec<String> {
    log.lines()
        .filter(|l| problem(l))
        .chain(
            access
                .lines()
                .filter(|l| status(l).is_some_and(|s| s >= 500)),
        )
        .map(str::to_owned)
        .collect()
}

/// Warnings Caddy 2.6 logs at every start with the test configuration.
const START_WARNINGS: &[&str] = &[
    "Caddyfile input is not formatted",
    "admin endpoint disabled",
    "no OCSP stapling",
    "automatic HTTPS is completely disabled",
];

fn problem(line: &str) -> bool {
    let warn = line.contains("\"level\":\"warn\"");
    let bad = warn || line.contains("\"level\":\"error\"") || line.contains("\"level\":\"fatal\"");
    bad && !(warn && START_WARNINGS.iter().any(|w| line.contains(w)))
}

/// The `"status":NNN` of a Caddy access log entry.
fn status(line: &str) -> Option<u16> {
    let rest = &line[line.find("\"status\":")? + "\"status\":".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caddy_log_lines_are_judged() {
        assert!(!problem(
            r#"{"level":"warn","ts":1.0,"logger":"admin","msg":"admin endpoint disabled"}"#
        ));
        assert!(problem(
            r#"{"level":"error","ts":1.0,"logger":"http.log.error","msg":"dial tcp 127.0.0.1:1: connect: connection refused"}"#
        ));
        assert_eq!(
            status(r#"{"size":0,"status":204,"resp_headers":{}}"#),
            Some(204)
        );
    }
}
