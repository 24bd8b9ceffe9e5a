//! The programs under test, as separate processes of the release build, so that each one's
//! memory and CPU can be read from `/proc`: a relay, a `ptth_server` offering the bench's
//! services and a `ptth_proxy` forwarding local ports to them, talking HTTP/1.1, h2c, or
//! HTTPS through nginx; or, for comparison, rathole, bore or wstunnel doing the same job.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ptth_tests::Setup;
use ptth_tests::fronts::{Front, FrontKind, Pki, start_front};
use ptth_tests::process::{Program, free_port, wait_listening};

use crate::load::Services;

/// How the proxies reach the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// `http://`: HTTP/1.1, two TCP connections per tunnel on each side.
    H1,
    /// `h2c://`: HTTP/2 without TLS, every tunnel of a proxy on one TCP connection.
    H2c,
    /// `https://` through nginx: HTTP/2 with TLS to nginx, HTTP/1.1 from nginx to the relay.
    Nginx,
    /// rathole: its server in the middle, its client next to the services (plain TCP).
    Rathole,
    /// bore: `bore server` in the middle, one `bore local` per service.
    Bore,
    /// wstunnel: its client at the load (`-L` per service), its server next to the services
    /// (plain WebSocket).
    Wstunnel,
}

impl Transport {
    /// The column heading.
    pub fn name(self) -> &'static str {
        match self {
            Self::H1 => "HTTP/1.1",
            Self::H2c => "h2c",
            Self::Nginx => "nginx TLS",
            Self::Rathole => "rathole",
            Self::Bore => "bore",
            Self::Wstunnel => "wstunnel",
        }
    }

    /// For the peers: the program that must be on `PATH`.
    pub fn peer_program(self) -> Option<&'static str> {
        match self {
            Self::H1 | Self::H2c | Self::Nginx => None,
            Self::Rathole => Some("rathole"),
            Self::Bore => Some("bore"),
            Self::Wstunnel => Some("wstunnel"),
        }
    }
}

/// The path of `program` if it is on `PATH`.
pub fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// The local ports of a stack: where the load connects to reach each service.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    pub source: SocketAddr,
}

/// A relay, a server proxy and a client proxy (and nginx in front of the relay, for
/// [`Transport::Nginx`]), or a peer's processes, running.
#[derive(Debug)]
pub struct Stack {
    pub transport: Transport,
    pub ports: Ports,
    /// ptth: the relay, the server proxy and the client proxy; a peer: its processes.
    pub programs: Vec<Program>,
    front: Option<Front>,
    /// The folder of the configuration files and logs, removed with the stack.
    _dir: tempfile::TempDir,
}

impl Stack {
    /// Starts the programs found in `bin` for `transport` in front of `services`, sized for
    /// `tunnels` at once; returns once a round trip passes through.
    pub async fn start(
        bin: &Path,
        transport: Transport,
        services: &Services,
        tunnels: usize,
    ) -> anyhow::Result<Self> {
        let mut stack = match transport.peer_program() {
            None => Self::start_ptth(bin, transport, services, tunnels).await?,
            Some(program) => {
                let program =
                    on_path(program).with_context(|| format!("{program} is not on PATH"))?;
                Self::start_peer(&program, transport, services).await?
            }
        };
        stack.wait_ready().await?;
        Ok(stack)
    }

    async fn start_ptth(
        bin: &Path,
        transport: Transport,
        services: &Services,
        tunnels: usize,
    ) -> anyhow::Result<Self> {
        let mut setup = Setup::new()?;
        // The load comes from one address and opens many tunnels at once.
        setup.relay_extra = "max_http_connections_per_ip = 1000000\n\
                             max_connections = 1000000\n\
                             max_connections_per_client = 1000000\n"
            .into();
        let dir = setup.path().to_owned();
        let relay_addr = free_port()?;
        let relay_toml = dir.join("relay.toml");
        std::fs::write(&relay_toml, setup.relay_toml(relay_addr))?;
        let mut relay = Program::ptth(
            &bin.join("ptth_relay"),
            &relay_toml,
            "warn",
            dir.join("relay.log"),
            "ptth_relay",
        )?;
        wait_listening(relay_addr, &mut relay).await?;
        let (url, extra, front) = match transport {
            Transport::H1 => (format!("http://{relay_addr}"), String::new(), None),
            Transport::H2c => (format!("h2c://{relay_addr}"), String::new(), None),
            Transport::Rathole | Transport::Bore | Transport::Wstunnel => {
                bail!("{} is not a ptth transport", transport.name())
            }
            Transport::Nginx => {
                let pki = Pki::generate(&dir)?;
                let front = start_front(
                    FrontKind::Nginx,
                    &dir,
                    &pki,
                    relay_addr,
                    Duration::from_secs(75),
                    tunnels,
                )
                .await?;
                let url = format!("https://localhost:{}", front.addr.port());
                let extra = format!("ca_file = \"{}\"\n", pki.ca.display());
                (url, extra, Some(front))
            }
        };
        let server_config = setup.server_config_url(
            &url,
            &[
                ("echo", services.echo.to_string()),
                ("sink", services.sink.to_string()),
                ("source", services.source.to_string()),
            ],
            &extra,
        )?;
        drop(server_config);
        let server = Program::ptth(
            &bin.join("ptth_server"),
            &dir.join("server.toml"),
            "warn",
            dir.join("server.log"),
            "ptth_server",
        )?;
        let ports = Ports {
            echo: free_port()?,
            sink: free_port()?,
            source: free_port()?,
        };
        let mut proxy_toml = format!("relay_url = \"{url}\"\nkey_file = \"alice.key\"\n{extra}\n");
        for (local, port) in [
            (ports.echo, "echo"),
            (ports.sink, "sink"),
            (ports.source, "source"),
        ] {
            proxy_toml.push_str(&format!(
                "[[forwards]]\nlisten = \"{local}\"\nserver = \"db\"\nport = \"{port}\"\n"
            ));
        }
        std::fs::write(dir.join("proxy.toml"), proxy_toml)?;
        let proxy = Program::ptth(
            &bin.join("ptth_proxy"),
            &dir.join("proxy.toml"),
            "warn",
            dir.join("proxy.log"),
            "ptth_proxy",
        )?;
        Ok(Self {
            transport,
            ports,
            programs: vec![relay, server, proxy],
            front,
            _dir: setup.dir,
        })
    }

    /// Starts a peer (`program` is its binary) doing the same job: local ports at the load
    /// that lead to the services.
    async fn start_peer(
        program: &Path,
        transport: Transport,
        services: &Services,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let ports = Ports {
            echo: free_port()?,
            sink: free_port()?,
            source: free_port()?,
        };
        let pairs = [
            ("echo", ports.echo, services.echo),
            ("sink", ports.sink, services.sink),
            ("source", ports.source, services.source),
        ];
        let mut programs = Vec::new();
        match transport {
            Transport::Rathole => {
                let control = free_port()?;
                let mut server = format!(
                    "[server]\nbind_addr = \"{control}\"\ndefault_token = \"ptth-bench\"\n"
                );
                let mut client = format!(
                    "[client]\nremote_addr = \"{control}\"\ndefault_token = \"ptth-bench\"\n"
                );
                for (name, local, service) in pairs {
                    server.push_str(&format!(
                        "[server.services.{name}]\nbind_addr = \"{local}\"\n"
                    ));
                    client.push_str(&format!(
                        "[client.services.{name}]\nlocal_addr = \"{service}\"\n"
                    ));
                }
                std::fs::write(d.join("server.toml"), server)?;
                std::fs::write(d.join("client.toml"), client)?;
                let mut cmd = Command::new(program);
                cmd.arg("--server").arg(d.join("server.toml"));
                programs.push(Program::start("rathole server", cmd, d.join("server.log"))?);
                let mut cmd = Command::new(program);
                cmd.arg("--client").arg(d.join("client.toml"));
                programs.push(Program::start("rathole client", cmd, d.join("client.log"))?);
            }
            Transport::Bore => {
                // bore's control port is fixed (7835).
                let mut cmd = Command::new(program);
                cmd.args(["server", "--min-port", "1024"]);
                programs.push(Program::start("bore server", cmd, d.join("server.log"))?);
                wait_listening("127.0.0.1:7835".parse()?, &mut programs[0]).await?;
                for (name, local, service) in pairs {
                    let mut cmd = Command::new(program);
                    cmd.arg("local")
                        .arg(service.port().to_string())
                        .args(["--local-host", "127.0.0.1", "--to", "127.0.0.1", "--port"])
                        .arg(local.port().to_string());
                    let log = d.join(format!("local-{name}.log"));
                    programs.push(Program::start("bore local", cmd, log)?);
                }
            }
            Transport::Wstunnel => {
                let server = free_port()?;
                let mut cmd = Command::new(program);
                cmd.arg("server").arg(format!("ws://{server}"));
                programs.push(Program::start(
                    "wstunnel server",
                    cmd,
                    d.join("server.log"),
                )?);
                let mut cmd = Command::new(program);
                cmd.arg("client");
                for (_, local, service) in pairs {
                    cmd.arg("-L").arg(format!("tcp://{local}:{service}"));
                }
                cmd.arg(format!("ws://{server}"));
                programs.push(Program::start(
                    "wstunnel client",
                    cmd,
                    d.join("client.log"),
                )?);
            }
            Transport::H1 | Transport::H2c | Transport::Nginx => {
                bail!("{} is not a peer", transport.name())
            }
        }
        Ok(Self {
            transport,
            ports,
            programs,
            front: None,
            _dir: dir,
        })
    }

    /// Waits until a round trip passes through the stack.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for p in &mut self.programs {
                p.check_running()?;
            }
            if crate::load::round_trips(self.ports.echo, 1).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no round trip through {}:\n{}",
                    self.transport.name(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the programs (and the front) logged.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in &self.programs {
            out.push_str(&format!("--- {}\n{}", p.name, p.log()));
        }
        if let Some(f) = &self.front {
            out.push_str(&format!("--- nginx\n{}{}", f.log(), f.error_log()));
        }
        out
    }
}
