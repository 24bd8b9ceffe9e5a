//! `ptth_demo`: the whole system on loopback in one command.
//!
//! Generates fresh keys, writes relay.toml, server.toml and proxy.toml to a temporary folder,
//! starts a relay, a server proxy offering a small built-in echo service, and a client proxy
//! forwarding a local port to it; proves a round trip and tells you what to type to try it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ptth_common::config::{ProxyConfig, RelayConfig, ServerConfig};
use ptth_common::keys::PrivateKey;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const GREETING: &str = "ptth demo echo service: every line you send comes back.\n";

fn usage() -> ! {
    eprintln!(
        "usage: ptth_demo [--port N] [--once] [--log-level LEVEL]\n\n  \
         --port N     local port of the forward (default: any free port)\n  \
         --once       exit after proving the round trip\n  \
         --log-level  log filter for the three components (default: warn)"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut port = 0u16;
    let mut once = false;
    let mut level = "warn".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => {
                port = args
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--once" => once = true,
            "--log-level" => level = args.next().unwrap_or_else(|| usage()),
            "--help" | "-h" => usage(),
            _ => usage(),
        }
    }
    ptth_common::cli::init_logging(Some(&level)).map_err(anyhow::Error::msg)?;
    // Before anything is written: Ctrl-C at any point must still remove the folder with the
    // private keys in it.
    // The first Ctrl-C (or SIGTERM) stops the demo; a second exits at once.
    let mut signals = ptth_common::cli::signals();
    let signal = tokio_util::sync::CancellationToken::new();
    let stop = signal.clone();
    tokio::spawn(async move {
        while signals.next().await != ptth_common::cli::Signal::Drain {}
        stop.cancel();
    });
    let dir = tempfile::tempdir()?;
    let path = dir.path();
    println!("ptth demo: files in {}", path.display());

    let server_pub = ptth_common::cli::keygen(&path.join("db.key"))?;
    let client_pub = ptth_common::cli::keygen(&path.join("alice.key"))?;
    println!("  generated keys db.key ({server_pub}) and alice.key ({client_pub})");

    let echo = echo_service().await?;
    let relay_listener = TcpListener::bind("127.0.0.1:0").await?;
    let relay_addr = relay_listener.local_addr()?;
    let forward_listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| {
            format!("cannot bind 127.0.0.1:{port} (try --port with another number)")
        })?;
    let forward_addr = forward_listener.local_addr()?;

    let relay_toml = format!(
        "listen = \"{relay_addr}\"\n\n[[servers]]\nname = \"db\"\npublic_key = \"{server_pub}\"\n\n\
         [[clients]]\nname = \"alice\"\npublic_key = \"{client_pub}\"\nallow = [\"db/echo\"]\n"
    );
    let server_toml = format!(
        "relay_url = \"http://{relay_addr}\"\nname = \"db\"\nkey_file = \"db.key\"\n\n[ports]\necho = \"{echo}\"\n"
    );
    let proxy_toml = format!(
        "relay_url = \"http://{relay_addr}\"\nkey_file = \"alice.key\"\n\n[[forwards]]\nlisten = \"{forward_addr}\"\nserver = \"db\"\nport = \"echo\"\n"
    );
    for (name, text) in [
        ("relay.toml", &relay_toml),
        ("server.toml", &server_toml),
        ("proxy.toml", &proxy_toml),
    ] {
        std::fs::write(path.join(name), text)?;
    }
    let relay_config = RelayConfig::load(&path.join("relay.toml"))?;
    let server_config = ServerConfig::load(&path.join("server.toml"))?;
    let proxy_config = ProxyConfig::load(&path.join("proxy.toml"))?;
    let server_key = PrivateKey::load(server_config.key_file.as_deref().context("no key_file")?)?;
    let client_key = PrivateKey::load(proxy_config.key_file.as_deref().context("no key_file")?)?;

    let token = CancellationToken::new();
    let relay = ptth_relay::run(relay_listener, relay_config, token.child_token())?;
    let mut ready = relay.ready_server_channels();
    let server = ptth_server::run(server_config.clone(), server_key, token.child_token())?;
    let relay_task = tokio::spawn(relay.into_future());
    let server_task = tokio::spawn(server.into_future());
    println!("  relay        http://{relay_addr}");
    println!("  ptth_server  offers db/echo -> built-in echo service at {echo}");

    let mut proxy_task = None;
    let proved = async {
        tokio::time::timeout(
            Duration::from_secs(10),
            ready.wait_for(|n| *n >= server_config.listen_pool),
        )
        .await
        .context("the server proxy did not reach the relay in 10 s")??;
        // The client proxy starts once the server is online, so that its first channels find
        // it at the relay rather than being refused as "server offline" and tried again.
        let proxy = ptth_proxy::run(
            vec![forward_listener],
            proxy_config,
            client_key,
            token.child_token(),
        )?;
        proxy_task = Some(tokio::spawn(proxy.into_future()));
        println!("  ptth_proxy   listens on {forward_addr} -> db/echo");
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), prove(forward_addr))
            .await
            .context("round trip timed out")??;
        anyhow::Ok((answer, started.elapsed()))
    };
    let proved = tokio::select! {
        r = proved => Some(r),
        () = signal.cancelled() => None,
    };
    match proved {
        None => {}
        Some(Err(e)) => {
            token.cancel();
            return Err(e);
        }
        Some(Ok((answer, took))) => {
            println!(
                "\nround trip OK in {:.1} ms: sent \"hello through ptth\", got back {answer:?}",
                took.as_secs_f64() * 1000.0
            );
            if !once {
                let (ip, port) = (forward_addr.ip(), forward_addr.port());
                println!(
                    "\nTry it yourself (the demo runs until Ctrl-C), with any TCP client:\n\n    \
                     nc {ip} {port}\n    telnet {ip} {port}\n\n\
                     Type a line and press Enter: it travels proxy -> relay -> server -> echo \
                     service and back. The configuration files are in {dir} while the demo \
                     runs; docs/configuration.md explains each setting.",
                    dir = path.display()
                );
                signal.cancelled().await;
            }
        }
    }
    token.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = tokio::join!(relay_task, server_task);
        if let Some(proxy_task) = proxy_task {
            let _ = proxy_task.await;
        }
    })
    .await;
    println!("ptth demo stopped");
    Ok(())
}

async fn prove(addr: SocketAddr) -> anyhow::Result<String> {
    let s = TcpStream::connect(addr).await?;
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    let greeting = lines.next_line().await?.unwrap_or_default();
    if format!("{greeting}\n") != GREETING {
        bail!("unexpected greeting {greeting:?}");
    }
    w.write_all(b"hello through ptth\n").await?;
    let line = lines.next_line().await?.unwrap_or_default();
    if line != "echo: hello through ptth" {
        bail!("unexpected answer {line:?}");
    }
    w.shutdown().await?;
    if lines.next_line().await?.is_some() {
        bail!("data after the end");
    }
    Ok(line)
}

/// The built-in service: a greeting, then each line echoed back.
async fn echo_service() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                if w.write_all(GREETING.as_bytes()).await.is_err() {
                    return;
                }
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("echo: {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}
