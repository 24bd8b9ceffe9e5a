//! `ptth_bench`: the tunnel against direct loopback, measured in one run, reported as ratios.
//!
//! * one stream: MiB/s of a bulk upstream to a sink (and downstream from a source)
//! * round trip: 1-byte ping-pong on an open connection
//! * new connection: connect, 1-byte ping-pong, close
//!
//! Each figure is the median of several rounds, direct and tunnel interleaved so that machine
//! noise hits both alike. Run in release: `cargo run --release -p ptth_tests --bin ptth_bench`.

use std::net::SocketAddr;
use std::time::Instant;

use ptth_tests::{World, WorldOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ROUNDS: usize = 5;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(512);
    let svc = bench_service().await?;
    let world = World::start(WorldOptions::echo(svc)).await?;
    let tunnel = world.local();
    println!(
        "ptth_bench: {ROUNDS} rounds, median, direct loopback vs tunnel (relay, server and proxy in-process)"
    );

    let (mut d, mut t) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        d.push(upstream(svc, mib).await?);
        t.push(upstream(tunnel, mib).await?);
    }
    report("one stream upstream (MiB/s)", &d, &t, true);

    let (mut d, mut t) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        d.push(downstream(svc, mib).await?);
        t.push(downstream(tunnel, mib).await?);
    }
    report("one stream downstream (MiB/s)", &d, &t, true);

    let (mut d, mut t) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        d.push(ping(svc, 2000).await?);
        t.push(ping(tunnel, 2000).await?);
    }
    report("round trip (us)", &d, &t, false);

    let (mut d, mut t) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        d.push(new_conn(svc, 200).await?);
        t.push(new_conn(tunnel, 200).await?);
    }
    report("new connection + round trip (us)", &d, &t, false);
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(what: &str, direct: &[f64], tunnel: &[f64], higher_is_better: bool) {
    let (d, t) = (median(direct), median(tunnel));
    let ratio = t / d;
    let note = if higher_is_better {
        "tunnel/direct, higher is better"
    } else {
        "tunnel/direct, lower is better"
    };
    println!("{what:36} direct {d:10.1}  tunnel {t:10.1}  ratio {ratio:5.2}x ({note})");
}

/// Service: first byte selects the mode. b'u': sink until EOF, then reply "ok". b'd': send
/// the requested MiB then close. b'p': echo single bytes.
async fn bench_service() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut mode = [0u8; 1];
                if s.read_exact(&mut mode).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 256 * 1024];
                match mode[0] {
                    b'u' => {
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                        }
                        let _ = s.write_all(b"ok").await;
                    }
                    b'd' => {
                        let mut n = [0u8; 4];
                        if s.read_exact(&mut n).await.is_err() {
                            return;
                        }
                        let total = u32::from_le_bytes(n) as usize * (1 << 20);
                        let mut sent = 0;
                        while sent < total {
                            let k = buf.len().min(total - sent);
                            if s.write_all(&buf[..k]).await.is_err() {
                                return;
                            }
                            sent += k;
                        }
                        let _ = s.shutdown().await;
                    }
                    _ => {
                        let mut b = [0u8; 1];
                        while s.read_exact(&mut b).await.is_ok() {
                            if s.write_all(&b).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}

async fn upstream(addr: SocketAddr, mib: usize) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let buf = vec![7u8; 256 * 1024];
    let start = Instant::now();
    s.write_all(b"u").await?;
    for _ in 0..mib * 4 {
        s.write_all(&buf).await?;
    }
    s.shutdown().await?;
    let mut ok = [0u8; 2];
    s.read_exact(&mut ok).await?;
    Ok(mib as f64 / start.elapsed().as_secs_f64())
}

async fn downstream(addr: SocketAddr, mib: usize) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let start = Instant::now();
    s.write_all(b"d").await?;
    s.write_all(&(mib as u32).to_le_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    anyhow::ensure!(got == mib << 20, "short downstream");
    Ok(mib as f64 / start.elapsed().as_secs_f64())
}

async fn ping(addr: SocketAddr, n: usize) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"p").await?;
    let mut b = [0u8; 1];
    s.write_all(b"x").await?;
    s.read_exact(&mut b).await?;
    let start = Instant::now();
    for _ in 0..n {
        s.write_all(b"x").await?;
        s.read_exact(&mut b).await?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / n as f64)
}

async fn new_conn(addr: SocketAddr, n: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(b"px").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / n as f64)
}
