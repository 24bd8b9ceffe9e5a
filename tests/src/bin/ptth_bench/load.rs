//! The load: the services behind the tunnels (echo, sink, source) and each figure's
//! measurement, the same code for every transport and for direct loopback.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Size of the buffers the load reads and writes with.
const BUF: usize = 256 * 1024;
/// Upper bound on any single step (a connect, a round trip, a transfer).
const STEP: Duration = Duration::from_secs(120);

/// What the sink saw of one connection: its bytes, from its first byte to its EOF (times in
/// the service process's own clock, comparable with each other).
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub bytes: u64,
    pub first: Duration,
    pub eof: Duration,
}

/// The services behind the tunnels, in a child process of their own (as a real service would
/// be, and a process may hold only so many sockets: the load holds the tunnels' other ends).
#[derive(Debug)]
pub struct Services {
    /// Sends back what it receives; FIN after EOF.
    pub echo: SocketAddr,
    /// Reads until EOF and reports what it received.
    pub sink: SocketAddr,
    /// Reads an 8-byte little-endian count, sends that many bytes and closes.
    pub source: SocketAddr,
    sink_reports: mpsc::Receiver<Received>,
    /// The child process, killed when dropped.
    _process: tokio::process::Child,
}

impl Services {
    /// Starts the services' process (this program with `--serve`).
    pub async fn start() -> anyhow::Result<Self> {
        let mut process = tokio::process::Command::new(std::env::current_exe()?)
            .arg("--serve")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let out = process.stdout.take().context("services' stdout")?;
        let mut lines = tokio::io::BufReader::new(out).lines();
        let first = lines.next_line().await?.context("services' addresses")?;
        let addrs: Vec<SocketAddr> = first
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("services' addresses")?;
        let [echo, sink, source] = addrs[..] else {
            bail!("services printed {first:?}");
        };
        let (tx, sink_reports) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let n: Vec<u64> = line
                    .split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect();
                if let [bytes, first, eof] = n[..] {
                    let report = Received {
                        bytes,
                        first: Duration::from_nanos(first),
                        eof: Duration::from_nanos(eof),
                    };
                    if tx.send(report).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Self {
            echo,
            sink,
            source,
            sink_reports,
            _process: process,
        })
    }

    /// The next report of the sink.
    async fn received(&mut self) -> anyhow::Result<Received> {
        tokio::time::timeout(STEP, self.sink_reports.recv())
            .await
            .context("the sink saw no end of the transfer")?
            .context("the services' process ended")
    }
}

/// Runs the services (what `--serve` runs in the child process): prints the echo's, the
/// sink's and the source's addresses on one line, then a line `bytes first_ns eof_ns` for
/// each connection the sink has read to its end.
pub async fn serve() -> anyhow::Result<()> {
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let source = TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "{} {} {}",
        echo.local_addr()?,
        sink.local_addr()?,
        source.local_addr()?
    );
    let epoch = Instant::now();
    let (tx, mut reports) = mpsc::channel::<String>(1024);
    tokio::spawn(serve_each(echo, |mut s| async move {
        let (mut r, mut w) = s.split();
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
    }));
    tokio::spawn(serve_each(sink, move |mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = vec![0u8; BUF];
            let mut bytes = 0u64;
            let mut first = None;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        first.get_or_insert_with(Instant::now);
                        bytes += n as u64;
                    }
                    Err(_) => return,
                }
            }
            let eof = Instant::now();
            let first = first.unwrap_or(eof);
            let line = format!(
                "{bytes} {} {}",
                (first - epoch).as_nanos(),
                (eof - epoch).as_nanos()
            );
            let _ = tx.send(line).await;
        }
    }));
    tokio::spawn(serve_each(source, |mut s| async move {
        let mut n = [0u8; 8];
        if s.read_exact(&mut n).await.is_err() {
            return;
        }
        let mut left = u64::from_le_bytes(n);
        let buf = vec![0x5au8; BUF];
        while left > 0 {
            let k = (left as usize).min(BUF);
            if s.write_all(&buf[..k]).await.is_err() {
                return;
            }
            left -= k as u64;
        }
        let _ = s.shutdown().await;
    }));
    let mut out = tokio::io::stdout();
    while let Some(line) = reports.recv().await {
        out.write_all(format!("{line}\n").as_bytes()).await?;
        out.flush().await?;
    }
    Ok(())
}

async fn serve_each<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    while let Ok((s, _)) = listener.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(handle(s));
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One byte there and back on `s`.
async fn ping(s: &mut TcpStream) -> anyhow::Result<()> {
    let step = async {
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        anyhow::ensure!(&b == b"x", "wrong echo");
        anyhow::Ok(())
    };
    tokio::time::timeout(STEP, step)
        .await
        .context("round trip timed out")?
}

/// `n` sequential new connections to the echo at `addr`: connect, send 1 byte, receive its
/// echo, each timed from before the connect to the echo.
pub async fn new_connections(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let mut s = connect(addr).await?;
        ping(&mut s).await?;
        times.push(start.elapsed());
    }
    Ok(times)
}

/// `n` round trips of 1 byte on one open connection to the echo at `addr`.
pub async fn round_trips(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut s = connect(addr).await?;
    for _ in 0..10 {
        ping(&mut s).await?;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        ping(&mut s).await?;
        times.push(start.elapsed());
    }
    Ok(times)
}

/// Sends `bytes` on each of `streams` connections to the sink at `addr` at once; the
/// aggregate rate in MiB/s as the sink received it (first byte of any to the last EOF).
pub async fn upstream(
    services: &mut Services,
    addr: SocketAddr,
    streams: usize,
    bytes: u64,
) -> anyhow::Result<f64> {
    upstream_each(services, &vec![addr; streams], bytes).await
}

/// Sends `bytes` on one connection to each of `sinks` (addresses that lead to the sink) at
/// once; the aggregate rate in MiB/s as the sink received it (first byte of any to the last
/// EOF).
pub async fn upstream_each(
    services: &mut Services,
    sinks: &[SocketAddr],
    bytes: u64,
) -> anyhow::Result<f64> {
    let streams = sinks.len();
    let senders: Vec<_> = sinks
        .iter()
        .map(|&addr| {
            tokio::spawn(async move {
                let mut s = connect(addr).await?;
                let buf = vec![7u8; BUF];
                let mut left = bytes;
                while left > 0 {
                    let k = (left as usize).min(BUF);
                    s.write_all(&buf[..k]).await?;
                    left -= k as u64;
                }
                s.shutdown().await?;
                // Wait for the far side's close, so that the tunnel is gone before the next
                // figure.
                let mut b = [0u8; 1];
                let _ = s.read(&mut b).await;
                anyhow::Ok(())
            })
        })
        .collect();
    let mut reports = Vec::with_capacity(streams);
    for _ in 0..streams {
        reports.push(services.received().await?);
    }
    for s in senders {
        tokio::time::timeout(STEP, s)
            .await
            .context("sender hung")???;
    }
    let total: u64 = reports.iter().map(|r| r.bytes).sum();
    if total != bytes * streams as u64 {
        bail!(
            "the sink received {total} bytes of {}",
            bytes * streams as u64
        );
    }
    let first = reports.iter().map(|r| r.first).min().context("no report")?;
    let eof = reports.iter().map(|r| r.eof).max().context("no report")?;
    Ok(mib_per_s(total, eof - first))
}

/// Receives `bytes` from the source at `addr`; the rate in MiB/s, timed here from the first
/// byte to EOF.
pub async fn downstream(addr: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut s = connect(addr).await?;
    s.write_all(&bytes.to_le_bytes()).await?;
    let mut buf = vec![0u8; BUF];
    let mut got = 0u64;
    let mut first = None;
    let receive = async {
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
            first.get_or_insert_with(Instant::now);
            got += n as u64;
        }
    };
    tokio::time::timeout(STEP, receive)
        .await
        .context("downstream timed out")??;
    let eof = Instant::now();
    if got != bytes {
        bail!("received {got} bytes of {bytes}");
    }
    Ok(mib_per_s(got, eof - first.unwrap_or(eof)))
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / f64::from(1u32 << 20) / took.as_secs_f64().max(1e-9)
}

/// How a crowd of tunnels fared.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// Tunnels that made both round trips.
    pub ok: usize,
    /// Time until every tunnel had made (or failed) its first round trip.
    pub opened_in: Duration,
}

/// Opens `n` tunnels at once to the echo, through each of `echoes` in turn (addresses that
/// lead to it), one round trip on each, holds them for `hold`, then another round trip on
/// each; `measure` runs while they are all still open.
pub async fn hold_tunnels<F>(
    echoes: &[SocketAddr],
    n: usize,
    hold: Duration,
    measure: F,
) -> anyhow::Result<Held>
where
    F: FnOnce(),
{
    anyhow::ensure!(!echoes.is_empty(), "no address that leads to the echo");
    let start = Instant::now();
    let opens: Vec<_> = (0..n)
        .map(|i| {
            let addr = echoes[i % echoes.len()];
            tokio::spawn(async move {
                let mut s = connect(addr).await.ok()?;
                ping(&mut s).await.ok()?;
                Some(s)
            })
        })
        .collect();
    let mut open = Vec::with_capacity(n);
    for o in opens {
        if let Some(s) = o.await? {
            open.push(s);
        }
    }
    let opened_in = start.elapsed();
    tokio::time::sleep(hold).await;
    let again: Vec<_> = open
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let ok = ping(&mut s).await.is_ok();
                (ok, s)
            })
        })
        .collect();
    let mut ok = 0;
    let mut keep = Vec::with_capacity(n);
    for a in again {
        let (fine, s) = a.await?;
        ok += usize::from(fine);
        keep.push(s);
    }
    measure();
    drop(keep);
    Ok(Held { ok, opened_in })
}
