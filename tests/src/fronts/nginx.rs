//! nginx in front of the relay, configured as docs/deploy.md says (or, for the diagnosis test,
//! left buffering request bodies), and how its logs are judged.

use std::path::Path;

use super::pki::Pki;
use super::site::Site;

/// The lines of nginx's configuration that balance among several relays by server name, as in
/// docs/scale-out.md (`tests/tests/deploy_docs.rs` checks that the page has each of them): the
/// server name taken from the path (in a `map $uri $ptth_server` block), and the hash of the
/// `upstream` block.
pub const NGINX_BALANCING: [&str; 2] = [
    r#""~^/v1/servers/([^/]+)/" $1;"#,
    "hash $ptth_server consistent;",
];

/// The nginx configuration: TLS on `port`, `/v1/` proxied to the relay (or balanced among the
/// relays by server name, as docs/scale-out.md says), timeouts `t` seconds, request buffering
/// on only when `buffering` (the mistake under test).
pub(super) fn config(buffering: bool, dir: &Path, pki: &Pki, site: &Site<'_>) -> String {
    let Site {
        port,
        relays,
        t,
        probe,
        token,
        ..
    } = *site;
    let d = dir.display();
    let (connections, streams) = (site.connections(), site.streams());
    // Past the default, file descriptors must follow (nginx raises its own limit, up to the
    // hard limit).
    let rlimit = if connections > 4096 {
        format!("worker_rlimit_nofile {connections};\n")
    } else {
        String::new()
    };
    let buffering = if buffering {
        // The mistake under test: nginx's default, request bodies buffered whole.
        "proxy_request_buffering on;"
    } else {
        "proxy_request_buffering off;"
    };
    // Several relays: each request goes to the relay of the server named in its path.
    let (balance, relay) = match relays {
        [relay] => (String::new(), relay.to_string()),
        _ => {
            let servers: String = relays
                .iter()
                .map(|r| format!("        server {r} max_fails=1 fail_timeout=2s;\n"))
                .collect();
            let [map, hash] = NGINX_BALANCING;
            (
                format!(
                    "    map $uri $ptth_server {{\n        {map}\n        default \"\";\n    }}\n\
                     upstream ptth_relays {{\n        {hash}\n{servers}    }}\n"
                ),
                "ptth_relays".to_owned(),
            )
        }
    };
    format!(
        r#"daemon off;
master_process on;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log info;
{rlimit}events {{ worker_connections {connections}; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
{balance}    server {{
        listen 127.0.0.1:{port} ssl http2;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        http2_max_concurrent_streams {streams};
        http2_chunk_size 64k;
        keepalive_requests 1000000;
        keepalive_timeout {t}s;
        client_body_timeout {t}s;
        send_timeout {t}s;
        location = {probe} {{
            return 200 "{token}";
        }}
        location /v1/ {{
            proxy_pass http://{relay};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            {buffering}
            proxy_buffering off;
            client_body_buffer_size 1m;
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 64k;
            client_max_body_size 0;
            proxy_read_timeout {t}s;
            proxy_send_timeout {t}s;
        }}
    }}
}}
"#,
        cert = pki.cert.display(),
        key = pki.key.display(),
    )
}

/// Lines of nginx's logs that report a problem: `[warn]` and worse, and lines (whatever their
/// level: nginx logs client timeouts at `[info]`) saying `timed out`, `prematurely closed` or
/// naming the upstream (nginx's word for the relay).
pub(super) fn errors(log: &str, error_log: &str) -> Vec<String> {
    let text = format!("{log}{error_log}");
    text.lines()
        .filter(|l| problem(l))
        .map(str::to_owned)
        .collect()
}

fn problem(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    [
        "[warn]",
        "[error]",
        "[crit]",
        "[alert]",
        "[emerg]",
        "timed out",
        "prematurely closed",
        "upstream",
    ]
    .iter()
    .any(|p| l.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_log_lines_are_judged() {
        let p = "2026/11/24 09:06:14 [info] 31770#31770: *44 ";
        assert!(!problem(&format!(
            "{p}client 127.0.0.6 closed keepalive connection"
        )));
        assert!(problem(&format!(
            "{p}client timed out (110: Connection timed out) while reading client request body"
        )));
        assert!(problem(&format!(
            "{p}epoll_wait() reported that client prematurely closed connection, so upstream connection is closed too"
        )));
        assert!(problem(
            "2026/11/24 09:06:14 [error] 1#1: *3 upstream timed out (110: Connection timed out) while reading upstream"
        ));
    }
}
