//! The proxies trust the system's root certificates when no `ca_file` is set.
//!
//! The "system roots" here are the test CA, put in place through `SSL_CERT_FILE` (which the
//! system-root loader honours). Environment variables are process-wide, so this test binary
//! holds this one test only and sets the variable before any other thread exists.
#![allow(unsafe_code)]

use std::time::Duration;

use ptth_tests::fronts::Pki;
use ptth_tests::*;

#[test]
fn system_roots_are_trusted_by_default() {
    let mut setup = Setup::new().expect("setup");
    let pki = Pki::generate(setup.path()).expect("pki");
    // SAFETY: single-test binary; no other thread runs yet, so nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var("SSL_CERT_FILE", &pki.ca) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        within(Duration::from_secs(60), async {
            let echo = echo_service().await.expect("echo");
            setup.relay_extra = format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                pki.cert.display(),
                pki.key.display()
            );
            let relay = setup.start_relay().expect("relay");
            let url = format!("https://localhost:{}", relay.addr.port());
            // No ca_file anywhere.
            let server = start_server(
                setup
                    .server_config_url(&url, &[("echo", echo.to_string())], "")
                    .expect("server config"),
                setup.server_key.clone(),
            );
            relay
                .expect_server_channels(
                    2,
                    Duration::from_secs(20),
                    "server proxy trusts the relay's certificate",
                )
                .await;
            let (proxy, addrs) = start_proxy(
                setup
                    .proxy_config_url(&url, "alice", &[("db", "echo")], "")
                    .expect("proxy config"),
                setup.alice_key.clone(),
            )
            .expect("proxy");
            assert_eq!(
                round_trip(addrs[0], b"trusted").await.expect("round trip"),
                b"trusted"
            );
            drop((server, proxy));
        })
        .await;
    });
}
