//! Several relays behind one load balancer (HAProxy or nginx), as docs/scale-out.md sets them
//! up: the relays are processes of the build under test, each with its own address and admin
//! listener and the same keys and allow lists; the balancer sends each request to the relay of
//! the server named in its path. A relay can be killed and started again on the same address.
//! For `tests/tests/scale_out.rs` and the benchmark.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ptth_common::keys::PrivateKey;

use crate::fronts::{Front, FrontKind, Pki, start_balancer};
use crate::process::{Program, binary, free_port, try_spawn, wait_listening};

/// One relay of a [`Cluster`].
#[derive(Debug)]
pub struct Member {
    /// Where it listens (plain HTTP; the balancer's backend address), kept across restarts.
    pub addr: SocketAddr,
    /// Its admin listener (`/metrics`, `/api/status`).
    pub admin: SocketAddr,
    /// Its configuration file.
    config: PathBuf,
    /// The running process; `None` while killed.
    program: Option<Program>,
    /// How many times it has been started (its log files are numbered so).
    starts: usize,
}

/// Relays behind a load balancer.
#[derive(Debug)]
pub struct Cluster {
    /// The relays, in the balancer's order.
    pub members: Vec<Member>,
    /// The balancer (TLS with the test's CA; the proxies' `relay_url` is [`Cluster::url`]).
    pub front: Front,
    dir: PathBuf,
}

impl Cluster {
    /// Starts `n` relays, each on a configuration made of its own `listen` and `admin_listen`
    /// followed by `shared` (keys, allow lists and settings, the same for all: nothing else is
    /// shared), and `kind` (HAProxy or nginx) in front of them, with inactivity timeouts of
    /// `timeout`, sized for `tunnels` tunnels. Files and logs go to `dir`.
    pub async fn start(
        kind: FrontKind,
        dir: &Path,
        pki: &Pki,
        shared: &str,
        n: usize,
        timeout: Duration,
        tunnels: usize,
    ) -> anyhow::Result<Self> {
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let (addr, admin) = (free_port()?, free_port()?);
            let config = dir.join(format!("relay{i}.toml"));
            std::fs::write(
                &config,
                format!("listen = \"{addr}\"\nadmin_listen = \"{admin}\"\n{shared}"),
            )
            .with_context(|| format!("writing {}", config.display()))?;
            let mut member = Member {
                addr,
                admin,
                config,
                program: None,
                starts: 0,
            };
            member.start(dir).await?;
            members.push(member);
        }
        let addrs: Vec<SocketAddr> = members.iter().map(|m| m.addr).collect();
        let front = start_balancer(kind, dir, pki, &addrs, timeout, tunnels).await?;
        Ok(Self {
            members,
            front,
            dir: dir.to_owned(),
        })
    }

    /// The `relay_url` of the proxies: the balancer, by the name its certificate carries.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.front.addr.port())
    }

    /// The relays running now.
    pub fn relays(&self) -> impl Iterator<Item = &Program> {
        self.members.iter().filter_map(|m| m.program.as_ref())
    }

    /// Kills relay `i` with SIGKILL, as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(program) = self.members[i].program.take() {
            program.kill();
        }
    }

    /// Starts relay `i` again, on its address, and waits until it listens.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let dir = self.dir.clone();
        self.members[i].start(&dir).await
    }

    /// Relay `i`'s `/api/status` (servers online, tunnels open), as JSON.
    pub async fn status(&self, i: usize) -> anyhow::Result<serde_json::Value> {
        let url = format!("http://{}/api/status", self.members[i].admin);
        let answer = crate::http_client_builder(None)?
            .timeout(Duration::from_secs(5))
            .build()?
            .get(&url)
            .send()
            .await?
            .error_for_status()?;
        Ok(serde_json::from_slice(&answer.bytes().await?)?)
    }

    /// The names of the servers online at relay `i`.
    pub async fn servers_online(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let status = self.status(i).await?;
        let servers = status["servers"].as_array().context("servers")?;
        Ok(servers
            .iter()
            .filter(|s| s["online"].as_bool() == Some(true))
            .filter_map(|s| s["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// The servers of the tunnels open at relay `i`, one entry per tunnel.
    pub async fn tunnel_servers(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let status = self.status(i).await?;
        let tunnels = status["tunnels"].as_array().context("tunnels")?;
        Ok(tunnels
            .iter()
            .filter_map(|t| t["server"].as_str().map(str::to_owned))
            .collect())
    }
}

impl Member {
    /// Starts the relay on its configuration and waits until it listens.
    async fn start(&mut self, dir: &Path) -> anyhow::Result<()> {
        let name = self
            .config
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("relay")
            .to_owned();
        let log = dir.join(format!("{name}.{}.log", self.starts));
        self.starts += 1;
        let mut program = Program::ptth(
            &binary("ptth_relay")?,
            &self.config,
            "info",
            log,
            "ptth_relay",
        )?;
        wait_listening(self.addr, &mut program).await?;
        self.program = Some(program);
        Ok(())
    }
}

/// What a [`Fleet`] runs on its [`Cluster`].
#[derive(Debug, Clone, Copy)]
pub struct FleetPlan<'a> {
    /// The balancer in front of the relays.
    pub kind: FrontKind,
    /// How many relays.
    pub relays: usize,
    /// The servers' names; each is a `ptth_server` process.
    pub servers: &'a [String],
    /// How many client proxies (`ptth_proxy` processes, `client0`, `client1`, ...), each
    /// allowed every port of every server and forwarding all of them.
    pub proxies: usize,
    /// The ports every server offers, and their targets.
    pub ports: &'a [(&'a str, SocketAddr)],
    /// Added to the relays' shared configuration (limits, say).
    pub relay_extra: &'a str,
    /// Added to the configuration of every server and proxy (`channel_max_age`, say).
    pub endpoint_extra: &'a str,
    /// Inactivity timeouts of the balancer.
    pub timeout: Duration,
    /// Tunnels the balancer is sized for.
    pub tunnels: usize,
}

/// Servers and client proxies through a [`Cluster`], as in docs/scale-out.md: the relays share
/// one configuration with every key and allow list; the endpoints know only the balancer.
#[derive(Debug)]
pub struct Fleet {
    /// The relays and their balancer.
    pub cluster: Cluster,
    /// The server proxies, by name.
    pub servers: BTreeMap<String, Program>,
    /// The client proxies.
    pub proxies: Vec<FleetProxy>,
}

/// A client proxy of a [`Fleet`].
#[derive(Debug)]
pub struct FleetProxy {
    /// Its process.
    pub program: Program,
    /// Its local address for each server and port.
    pub locals: BTreeMap<(String, String), SocketAddr>,
}

impl FleetProxy {
    /// Its local address for `server`'s `port`.
    pub fn local(&self, server: &str, port: &str) -> SocketAddr {
        self.locals[&(server.to_owned(), port.to_owned())]
    }
}

impl Fleet {
    /// Starts everything of `plan`, with its files and logs in `dir`; returns once every proxy
    /// has bound its local ports (not yet once every server is reachable).
    pub async fn start(plan: FleetPlan<'_>, dir: &Path) -> anyhow::Result<Self> {
        let pki = Pki::generate(dir)?;
        let mut shared = format!("trusted_proxies = [\"127.0.0.1\"]\n{}\n", plan.relay_extra);
        for name in plan.servers {
            let key = new_key(dir, name)?;
            shared.push_str(&format!(
                "[[servers]]\nname = \"{name}\"\npublic_key = \"{key}\"\n"
            ));
        }
        let allow: Vec<String> = plan.servers.iter().map(|n| format!("\"{n}/*\"")).collect();
        for p in 0..plan.proxies {
            let key = new_key(dir, &format!("client{p}"))?;
            shared.push_str(&format!(
                "[[clients]]\nname = \"client{p}\"\npublic_key = \"{key}\"\nallow = [{}]\n",
                allow.join(", ")
            ));
        }
        let cluster = Cluster::start(
            plan.kind,
            dir,
            &pki,
            &shared,
            plan.relays,
            plan.timeout,
            plan.tunnels,
        )
        .await?;
        let endpoint = format!(
            "relay_url = \"{}\"\nca_file = \"{}\"\n{}\n",
            cluster.url(),
            pki.ca.display(),
            plan.endpoint_extra
        );
        let mut servers = BTreeMap::new();
        for name in plan.servers {
            let mut text =
                format!("{endpoint}name = \"{name}\"\nkey_file = \"{name}.key\"\n[ports]\n");
            for (port, target) in plan.ports {
                text.push_str(&format!("{port} = \"{target}\"\n"));
            }
            let program = try_spawn(dir, "ptth_server", &format!("server-{name}.toml"), &text)?;
            servers.insert(name.clone(), program);
        }
        let mut proxies = Vec::new();
        for p in 0..plan.proxies {
            let mut text = format!("{endpoint}key_file = \"client{p}.key\"\n");
            for name in plan.servers {
                for (port, _) in plan.ports {
                    text.push_str(&format!(
                        "[[forwards]]\nlisten = \"127.0.0.1:0\"\nserver = \"{name}\"\nport = \"{port}\"\n"
                    ));
                }
            }
            let mut program = try_spawn(dir, "ptth_proxy", &format!("proxy{p}.toml"), &text)?;
            // Each forward on a port of its own choosing, which the proxy logs.
            let mut locals = BTreeMap::new();
            for name in plan.servers {
                for (port, _) in plan.ports {
                    let line = program
                        .logged(&[
                            "forwarding",
                            &format!(" server={name} "),
                            &format!(" port={port} "),
                        ])
                        .await?;
                    let local: SocketAddr = line
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix("listen="))
                        .and_then(|a| a.parse().ok())
                        .with_context(|| format!("no listen= in {line}"))?;
                    locals.insert((name.clone(), (*port).to_owned()), local);
                }
            }
            proxies.push(FleetProxy { program, locals });
        }
        Ok(Self {
            cluster,
            servers,
            proxies,
        })
    }
}

/// A fresh key written as `dir/name.key`; its public key.
fn new_key(dir: &Path, name: &str) -> anyhow::Result<String> {
    let key = PrivateKey::generate()?;
    key.write_new(&dir.join(format!("{name}.key")))?;
    Ok(key.public().to_string())
}
