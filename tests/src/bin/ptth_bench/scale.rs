//! `--scale-out`: one relay against three behind HAProxy, as docs/scale-out.md sets them up,
//! beside direct loopback in the same run. Twelve servers (`ptth_server` processes) offer the
//! sink and the echo; three client proxies forward every server's ports; the load spreads over
//! all of them. Figures: the aggregate rate of one stream to each server at once (medians of
//! interleaved rounds), and a crowd of tunnels spread over the servers, held, with the relays'
//! peak memory.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use ptth_tests::cluster::{Fleet, FleetPlan};
use ptth_tests::fronts::FrontKind;

use crate::load::{self, Held, Services};
use crate::median;

/// Servers behind the relays.
const SERVERS: usize = 12;
/// Client proxies; server `i` is reached through proxy `i % PROXIES`.
const PROXIES: usize = 3;

/// What `--scale-out` measures.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Rounds of the throughput figure.
    pub rounds: usize,
    /// MiB moved in each round, an equal part through each server.
    pub bulk_mib: u64,
    /// Tunnels held at once.
    pub tunnels: usize,
    /// How long they are held.
    pub hold: Duration,
}

/// One column: direct loopback, or a fleet behind HAProxy.
struct Column {
    name: String,
    fleet: Option<Fleet>,
    /// One address per server leading to the sink (direct: the sink itself, each time).
    sinks: Vec<SocketAddr>,
    /// One address per server leading to the echo.
    echoes: Vec<SocketAddr>,
    rates: Vec<f64>,
    held: Option<Held>,
    /// Peak RSS of the relays together, KiB, while the crowd was held.
    relays_kib: Option<u64>,
    /// Servers online at each relay.
    placement: Vec<usize>,
}

impl Column {
    async fn fleet(
        relays: usize,
        services: &Services,
        dir: &std::path::Path,
        plan: &Plan,
    ) -> anyhow::Result<Self> {
        let names: Vec<String> = (0..SERVERS).map(|i| format!("srv{i:02}")).collect();
        let plan = FleetPlan {
            kind: FrontKind::Haproxy,
            relays,
            servers: &names,
            proxies: PROXIES,
            ports: &[("sink", services.sink), ("echo", services.echo)],
            // The load comes from one address and opens many tunnels at once.
            relay_extra: "max_http_connections_per_ip = 1000000\n\
                          max_connections = 1000000\n\
                          max_connections_per_client = 1000000\n",
            // No idle channel is replaced during the run.
            endpoint_extra: "channel_max_age = \"1h\"\n",
            timeout: Duration::from_secs(75),
            tunnels: plan.tunnels,
        };
        let fleet = Fleet::start(plan, dir).await?;
        let through = |port: &str| -> Vec<SocketAddr> {
            names
                .iter()
                .enumerate()
                .map(|(i, name)| fleet.proxies[i % PROXIES].local(name, port))
                .collect()
        };
        let (sinks, echoes) = (through("sink"), through("echo"));
        for &echo in &echoes {
            wait_ready(echo).await.context("a server not reachable")?;
        }
        let mut placement = Vec::new();
        for i in 0..relays {
            placement.push(fleet.cluster.servers_online(i).await?.len());
        }
        Ok(Self {
            name: format!("{relays} relay{}", if relays == 1 { "" } else { "s" }),
            fleet: Some(fleet),
            sinks,
            echoes,
            rates: Vec::new(),
            held: None,
            relays_kib: None,
            placement,
        })
    }
}

/// Waits (30 s at most) until a round trip through `echo` passes.
async fn wait_ready(echo: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while load::round_trips(echo, 1).await.is_err() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no round trip through {echo}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Runs `--scale-out` and prints its table.
pub async fn run(services: &mut Services, plan: Plan) -> anyhow::Result<()> {
    ptth_tests::fronts::ensure_installed("haproxy", "haproxy")?;
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    let mut columns = vec![Column {
        name: "direct".into(),
        fleet: None,
        sinks: vec![services.sink; SERVERS],
        echoes: vec![services.echo],
        rates: Vec::new(),
        held: None,
        relays_kib: None,
        placement: Vec::new(),
    }];
    for (relays, dir) in [1, 3].into_iter().zip(&dirs) {
        let column = Column::fleet(relays, services, dir.path(), &plan)
            .await
            .with_context(|| format!("starting {relays} relay(s) behind HAProxy"))?;
        columns.push(column);
    }
    let each = (plan.bulk_mib << 20) / SERVERS as u64;
    for round in 0..plan.rounds {
        eprintln!("round {}/{}", round + 1, plan.rounds);
        for c in &mut columns {
            let rate = load::upstream_each(services, &c.sinks, each)
                .await
                .with_context(|| format!("streams to every server, {}", c.name))?;
            c.rates.push(rate);
        }
    }
    for c in &mut columns {
        eprintln!(
            "{} tunnels held for {:?}: {}",
            plan.tunnels, plan.hold, c.name
        );
        let relays: Vec<_> = c.fleet.iter().flat_map(|f| f.cluster.relays()).collect();
        for r in &relays {
            r.reset_peak()?;
        }
        let mut peak = None;
        let held = load::hold_tunnels(&c.echoes, plan.tunnels, plan.hold, || {
            if !relays.is_empty() {
                peak = Some(
                    relays
                        .iter()
                        .map(|r| r.peak_rss_kib())
                        .sum::<anyhow::Result<u64>>(),
                );
            }
        })
        .await?;
        c.held = Some(held);
        c.relays_kib = peak.transpose()?;
    }
    print(&columns, &plan);
    Ok(())
}

fn print(columns: &[Column], plan: &Plan) {
    let mut out = String::from("| figure |");
    for c in columns {
        out.push_str(&format!(" {} |", c.name));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(columns.len()));
    out.push('\n');
    let direct = median(&columns[0].rates);
    let mut row = |name: String, cell: &dyn Fn(&Column) -> String| {
        out.push_str(&format!("| {name} |"));
        for c in columns {
            out.push_str(&format!(" {} |", cell(c)));
        }
        out.push('\n');
    };
    row(
        format!(
            "{SERVERS} streams at once, one per server, aggregate (MiB/s, {} MiB)",
            plan.bulk_mib
        ),
        &|c| {
            let r = median(&c.rates);
            if c.fleet.is_none() {
                format!("{r:.0}")
            } else {
                format!("{r:.0} ({:.2}x)", r / direct)
            }
        },
    );
    row(
        "tunnels held over the servers (succeeded of opened at once)".into(),
        &|c| {
            c.held
                .map_or("-".into(), |h| format!("{} of {}", h.ok, plan.tunnels))
        },
    );
    row("time to open them all (s)".into(), &|c| {
        c.held
            .map_or("-".into(), |h| format!("{:.1}", h.opened_in.as_secs_f64()))
    });
    row(
        "peak RSS per held tunnel, the relays together (KiB)".into(),
        &|c| {
            c.relays_kib.map_or("-".into(), |k| {
                format!("{:.1}", k as f64 / plan.tunnels as f64)
            })
        },
    );
    row("servers online at each relay".into(), &|c| {
        if c.placement.is_empty() {
            "-".into()
        } else {
            c.placement
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(" / ")
        }
    });
    print!("{out}");
}
