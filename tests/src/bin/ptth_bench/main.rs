//! `ptth_bench`: the tunnel against direct loopback, every figure measured in one run, each
//! beside the same figure measured directly, with the ratio; medians of interleaved rounds.
//!
//! The programs run as separate processes of the release build (their memory and CPU are read
//! from `/proc`); the load and the services behind the tunnels run in this process. Build
//! first, then run (see docs/benchmarks.md):
//!
//! ```text
//! cargo build --release --workspace && target/release/ptth_bench
//! ```

mod load;
mod scale;
mod stack;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::load::Services;
use crate::stack::{Ports, Stack, Transport};

/// Measures ptth's tunnels against direct loopback and prints one table.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Rounds of every latency and throughput figure; each figure is the median of its rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Sequential new connections per round.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Round trips per round.
    #[arg(long, default_value_t = 10_000)]
    round_trips: usize,
    /// MiB per bulk figure: one stream carries it all, 8 parallel streams an eighth each.
    #[arg(long, default_value_t = 2048)]
    bulk_mib: u64,
    /// Tunnels held at once over h2c.
    #[arg(long, default_value_t = 10_000)]
    tunnels_h2c: usize,
    /// Tunnels held at once over HTTP/1.1, through nginx, and through the peers of
    /// `--compare` (which hold two sockets per tunnel in their middle process).
    #[arg(long, default_value_t = 2_000)]
    tunnels_h1: usize,
    /// Seconds the tunnels are held between their two round trips.
    #[arg(long, default_value_t = 30)]
    hold: u64,
    /// The transports to measure, in column order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "h1,h2c,nginx"
    )]
    transports: Vec<Transport>,
    /// The figures to measure (all by default); the table leaves the others empty.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "new,rtt,bulk,crowd"
    )]
    figures: Vec<Figure>,
    /// Also measure rathole, bore and wstunnel, each that is on PATH, the same way.
    #[arg(long)]
    compare: bool,
    /// Measure one relay against three behind HAProxy instead (docs/scale-out.md): the
    /// aggregate rate of a stream to each of 12 servers at once, and `--tunnels-h1` tunnels
    /// held over them, beside direct loopback.
    #[arg(long)]
    scale_out: bool,
    /// Run the services and nothing else (the child process that [`load::Services`] starts).
    #[arg(long, hide = true)]
    serve: bool,
    /// A quick run to see that everything works (1 round, small figures); its numbers mean
    /// little.
    #[arg(long)]
    quick: bool,
}

/// A group of figures of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Figure {
    /// New connection + 1-byte echo.
    New,
    /// Round trip on an open tunnel.
    Rtt,
    /// One stream each way, 8 streams, and CPU per GiB.
    Bulk,
    /// Tunnels held at once, and peak RSS per tunnel.
    Crowd,
}

/// One column of the table: direct loopback, or a stack.
struct Column {
    name: &'static str,
    ports: Ports,
    stack: Option<Stack>,
    /// Tunnels to hold at once.
    tunnels: usize,
    new_p50: Vec<f64>,
    new_p99: Vec<f64>,
    rtt_p50: Vec<f64>,
    rtt_p99: Vec<f64>,
    upstream: Vec<f64>,
    downstream: Vec<f64>,
    parallel: Vec<f64>,
    /// CPU time of the column's programs over its bulk figures.
    cpu_seconds: f64,
    /// CPU time of the bench itself (the load and the services) over the same figures.
    load_cpu_seconds: f64,
    gib_moved: f64,
    held: Option<load::Held>,
    /// Peak RSS per held tunnel of each program, KiB.
    rss_per_tunnel: Vec<(&'static str, f64)>,
}

impl Column {
    fn new(name: &'static str, ports: Ports, stack: Option<Stack>, tunnels: usize) -> Self {
        Self {
            name,
            ports,
            stack,
            tunnels,
            new_p50: Vec::new(),
            new_p99: Vec::new(),
            rtt_p50: Vec::new(),
            rtt_p99: Vec::new(),
            upstream: Vec::new(),
            downstream: Vec::new(),
            parallel: Vec::new(),
            cpu_seconds: 0.0,
            load_cpu_seconds: 0.0,
            gib_moved: 0.0,
            held: None,
            rss_per_tunnel: Vec::new(),
        }
    }

    fn cpu(&self, ticks: f64) -> anyhow::Result<f64> {
        let Some(stack) = &self.stack else {
            return Ok(0.0);
        };
        stack
            .programs
            .iter()
            .map(|p| p.cpu_seconds(ticks))
            .sum::<anyhow::Result<f64>>()
    }
}

/// CPU time of the bench's own process so far (the load and the services), in seconds.
fn load_cpu(ticks: f64) -> anyhow::Result<f64> {
    ptth_tests::process::cpu_seconds(Path::new("/proc/self/stat"), ticks)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The `q` quantile (0..=1) of `times`, in microseconds.
fn quantile_us(times: &[Duration], q: f64) -> f64 {
    let mut v: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

/// Clock ticks per second, as `/proc/*/stat` counts CPU time.
fn ticks_per_second() -> anyhow::Result<f64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("getconf CLK_TCK")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// The folder of the release binaries: this program's own.
fn binaries() -> anyhow::Result<PathBuf> {
    let relay = ptth_tests::process::binary("ptth_relay")?;
    for bin in ["ptth_server", "ptth_proxy"] {
        ptth_tests::process::binary(bin)?;
    }
    Ok(relay.parent().context("no folder")?.to_owned())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {}", kernel.trim())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.serve {
        rlimit::increase_nofile_limit(u64::MAX)?;
        return load::serve().await;
    }
    if args.quick {
        args.rounds = 1;
        args.connections = 50;
        args.round_trips = 500;
        args.bulk_mib = 64;
        args.tunnels_h2c = 200;
        args.tunnels_h1 = 100;
        args.hold = 1;
    }
    let bin = binaries()?;
    if args.scale_out {
        rlimit::increase_nofile_limit(u64::MAX)?;
        let mut services = Services::start().await?;
        println!(
            "ptth_bench --scale-out: {}; {} round(s), medians",
            machine(),
            args.rounds
        );
        let plan = scale::Plan {
            rounds: args.rounds,
            bulk_mib: args.bulk_mib,
            tunnels: args.tunnels_h1,
            hold: Duration::from_secs(args.hold),
        };
        return scale::run(&mut services, plan).await;
    }
    if args.compare {
        for peer in [Transport::Rathole, Transport::Bore, Transport::Wstunnel] {
            let program = peer.peer_program().unwrap_or_default();
            if args.transports.contains(&peer) {
                continue;
            }
            match stack::on_path(program) {
                Some(_) => args.transports.push(peer),
                None => eprintln!("{program} is not on PATH: no {} column", peer.name()),
            }
        }
    }
    let ticks = ticks_per_second()?;
    // The load holds two sockets per tunnel (to the proxy, and the service's end); the
    // programs started below inherit the raised limit and raise their own too.
    let files = rlimit::increase_nofile_limit(u64::MAX)?;
    let mut services = Services::start().await?;
    let direct = Ports {
        echo: services.echo,
        sink: services.sink,
        source: services.source,
    };
    let tunnels_for = |t: Transport| match t {
        Transport::H2c => args.tunnels_h2c,
        _ => args.tunnels_h1,
    };
    let most = args.transports.iter().map(|&t| tunnels_for(t)).max();
    let mut columns = vec![Column::new("direct", direct, None, most.unwrap_or(0))];
    for &t in &args.transports {
        let tunnels = tunnels_for(t);
        let stack = Stack::start(&bin, t, &services, tunnels)
            .await
            .with_context(|| format!("starting the {} stack", t.name()))?;
        columns.push(Column::new(t.name(), stack.ports, Some(stack), tunnels));
    }
    println!(
        "ptth_bench: {}; {} round(s), medians; open files limit {files}",
        machine(),
        args.rounds
    );
    let bulk = args.bulk_mib << 20;
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        for c in columns
            .iter_mut()
            .filter(|_| args.figures.contains(&Figure::New))
        {
            let t = load::new_connections(c.ports.echo, args.connections)
                .await
                .with_context(|| format!("new connections, {}", c.name))?;
            c.new_p50.push(quantile_us(&t, 0.5));
            c.new_p99.push(quantile_us(&t, 0.99));
        }
        for c in columns
            .iter_mut()
            .filter(|_| args.figures.contains(&Figure::Rtt))
        {
            let t = load::round_trips(c.ports.echo, args.round_trips)
                .await
                .with_context(|| format!("round trips, {}", c.name))?;
            c.rtt_p50.push(quantile_us(&t, 0.5));
            c.rtt_p99.push(quantile_us(&t, 0.99));
        }
        for c in columns
            .iter_mut()
            .filter(|_| args.figures.contains(&Figure::Bulk))
        {
            let before = c.cpu(ticks)?;
            let load_before = load_cpu(ticks)?;
            let up = load::upstream(&mut services, c.ports.sink, 1, bulk)
                .await
                .with_context(|| format!("one stream upstream, {}", c.name))?;
            let down = load::downstream(c.ports.source, bulk)
                .await
                .with_context(|| format!("one stream downstream, {}", c.name))?;
            let parallel = load::upstream(&mut services, c.ports.sink, 8, bulk / 8)
                .await
                .with_context(|| format!("8 streams upstream, {}", c.name))?;
            c.cpu_seconds += c.cpu(ticks)? - before;
            c.load_cpu_seconds += load_cpu(ticks)? - load_before;
            c.gib_moved += 3.0 * bulk as f64 / f64::from(1u32 << 30);
            c.upstream.push(up);
            c.downstream.push(down);
            c.parallel.push(parallel);
        }
    }
    for c in columns
        .iter_mut()
        .filter(|_| args.figures.contains(&Figure::Crowd))
    {
        eprintln!("{} tunnels held for {} s: {}", c.tunnels, args.hold, c.name);
        if let Some(stack) = &c.stack {
            for p in &stack.programs {
                p.reset_peak()?;
            }
        }
        let mut peaks = Vec::new();
        let stack = &c.stack;
        let held = load::hold_tunnels(
            &[c.ports.echo],
            c.tunnels,
            Duration::from_secs(args.hold),
            || {
                if let Some(stack) = stack {
                    for p in &stack.programs {
                        peaks.push((p.name, p.peak_rss_kib()));
                    }
                }
            },
        )
        .await?;
        for (name, peak) in peaks {
            c.rss_per_tunnel
                .push((name, peak? as f64 / c.tunnels as f64));
        }
        c.held = Some(held);
    }
    print_table(&columns, &args);
    for c in &columns {
        if let (Some(stack), Some(held)) = (&c.stack, c.held)
            && held.ok < c.tunnels
        {
            let logs = stack.logs();
            let tail: Vec<&str> = logs.lines().rev().take(30).collect();
            eprintln!("last log lines of the {} stack:", c.name);
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
        }
    }
    Ok(())
}

/// Prints the figures as a Markdown table: each tunnel column beside direct, with the ratio.
fn print_table(columns: &[Column], args: &Args) {
    let mut header = String::from("| figure |");
    let mut rule = String::from("|---|");
    for c in columns {
        header.push_str(&format!(" {} |", c.name));
        rule.push_str("---|");
    }
    println!("\n{header}\n{rule}");
    let ratio_row = |what: &str, values: &dyn Fn(&Column) -> f64, digits: usize| {
        let base = values(&columns[0]);
        let mut row = format!("| {what} |");
        for (i, c) in columns.iter().enumerate() {
            let v = values(c);
            if v.is_nan() {
                row.push_str(" - |");
            } else if i == 0 {
                row.push_str(&format!(" {v:.digits$} |"));
            } else {
                row.push_str(&format!(" {v:.digits$} ({:.2}x) |", v / base));
            }
        }
        println!("{row}");
    };
    ratio_row(
        &format!(
            "new connection + 1-byte echo, p50 (µs, {} sequential)",
            args.connections
        ),
        &|c| median(&c.new_p50),
        0,
    );
    ratio_row(
        "new connection + 1-byte echo, p99 (µs)",
        &|c| median(&c.new_p99),
        0,
    );
    ratio_row(
        &format!(
            "round trip on an open tunnel, p50 (µs, {} round trips)",
            args.round_trips
        ),
        &|c| median(&c.rtt_p50),
        1,
    );
    ratio_row(
        "round trip on an open tunnel, p99 (µs)",
        &|c| median(&c.rtt_p99),
        1,
    );
    ratio_row(
        &format!("one stream upstream (MiB/s, {} MiB)", args.bulk_mib),
        &|c| median(&c.upstream),
        0,
    );
    ratio_row(
        "one stream downstream (MiB/s)",
        &|c| median(&c.downstream),
        0,
    );
    ratio_row(
        "8 streams upstream, aggregate (MiB/s)",
        &|c| median(&c.parallel),
        0,
    );
    let mut row = String::from("| tunnels held (succeeded of opened at once) |");
    for c in columns {
        match c.held {
            Some(h) => row.push_str(&format!(" {} of {} |", h.ok, c.tunnels)),
            None => row.push_str(" - |"),
        }
    }
    println!("{row}");
    let mut row = String::from("| time to open them all (s) |");
    for c in columns {
        match c.held {
            Some(h) => row.push_str(&format!(" {:.1} |", h.opened_in.as_secs_f64())),
            None => row.push_str(" - |"),
        }
    }
    println!("{row}");
    for program in ["ptth_relay", "ptth_server", "ptth_proxy"] {
        let mut row = format!("| peak RSS per held tunnel, {program} (KiB) |");
        for c in columns {
            match c.rss_per_tunnel.iter().find(|(name, _)| *name == program) {
                Some((_, kib)) => row.push_str(&format!(" {kib:.1} |")),
                None => row.push_str(" - |"),
            }
        }
        println!("{row}");
    }
    let mut row = String::from("| peak RSS per held tunnel, all processes (not nginx) (KiB) |");
    for c in columns {
        if c.stack.is_some() && c.held.is_some() {
            let sum: f64 = c.rss_per_tunnel.iter().map(|(_, kib)| kib).sum();
            row.push_str(&format!(" {sum:.1} |"));
        } else {
            row.push_str(" - |");
        }
    }
    println!("{row}");
    let mut row = String::from("| CPU seconds per GiB moved, all processes (not nginx) |");
    for c in columns {
        if c.stack.is_some() && c.gib_moved > 0.0 {
            row.push_str(&format!(" {:.2} |", c.cpu_seconds / c.gib_moved));
        } else {
            row.push_str(" - |");
        }
    }
    println!("{row}");
    let mut row = String::from("| CPU seconds per GiB moved, the load and the services |");
    for c in columns {
        if c.gib_moved > 0.0 {
            row.push_str(&format!(" {:.2} |", c.load_cpu_seconds / c.gib_moved));
        } else {
            row.push_str(" - |");
        }
    }
    println!("{row}");
}
