//! The programs as separate processes: started from their binaries, watched through `/proc`
//! (memory, CPU, open files), killed. For the benchmark, and for the tests that kill a program
//! or change its clock.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The binary of `program` (`ptth_relay`, `ptth_server` or `ptth_proxy`) of the build this
/// test or benchmark belongs to: `cargo test --workspace` and `cargo build` put them beside
/// the test's own folder.
pub fn binary(program: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the executable's folder")?;
    // A test runs from target/PROFILE/deps, a binary (the bench) from target/PROFILE.
    let candidates = [dir.join(program), dir.join("..").join(program)];
    candidates.into_iter().find(|p| p.is_file()).with_context(|| {
        format!(
            "{program} is not built beside {}: build the workspace first (`cargo build \
             --workspace`, with `--release` for the benchmark; `cargo test --workspace` builds it too)",
            exe.display()
        )
    })
}

/// A loopback address for a program started apart (a child process, a front) to listen on:
/// free a moment ago.
///
/// Taken below the kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), where
/// outgoing connections and listeners on port 0 take theirs, so that no connection of a test
/// running in parallel takes it before the program binds it; and handed out in turn from a
/// random start, so that one process never hands it out twice. Where the range leaves no room
/// below it (or cannot be read), any port free now.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    /// The lowest port handed out: below it are well-known services' ports.
    const FLOOR: u32 = 10_000;
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(0);
    if ephemeral > FLOOR + 1_000 {
        let span = ephemeral - FLOOR;
        let start = *START.get_or_init(|| {
            let random = std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                std::process::id(),
            );
            (random % u64::from(span)) as u32
        });
        for _ in 0..64 {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let port = FLOOR + start.wrapping_add(n) % span;
            let port = u16::try_from(port).context("port")?;
            if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                return Ok(listener.local_addr()?);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One running program, killed when dropped.
#[derive(Debug)]
pub struct Program {
    /// What it is called in reports.
    pub name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Program {
    /// Starts a ptth program with `--config config`, logging at `level`.
    pub fn ptth(
        bin: &Path,
        config: &Path,
        level: &str,
        log: PathBuf,
        name: &'static str,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(config).args(["--log-level", level]);
        Self::start(name, cmd, log)
    }

    /// Starts `cmd`, its output going to `log`.
    pub fn start(name: &'static str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child, log })
    }

    fn proc_file(&self, file: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/{file}", self.child.id()))
    }

    /// Peak resident memory since the last [`Program::reset_peak`], in KiB.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmHWM:")
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(self.proc_file("status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in /proc/PID/status"))
    }

    /// Starts a new peak memory measurement from the current resident memory.
    pub fn reset_peak(&self) -> anyhow::Result<()> {
        std::fs::write(self.proc_file("clear_refs"), "5").context("clear_refs")
    }

    /// CPU time (user and system) used so far, in seconds.
    pub fn cpu_seconds(&self, ticks_per_second: f64) -> anyhow::Result<f64> {
        cpu_seconds(&self.proc_file("stat"), ticks_per_second)
    }

    /// Open file descriptors now (sockets included).
    pub fn open_files(&self) -> anyhow::Result<usize> {
        Ok(std::fs::read_dir(self.proc_file("fd"))?.count())
    }

    /// The program's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An error if the program has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited with {status}:\n{}", self.name, self.log());
        }
        Ok(())
    }

    /// Asks it to stop (SIGTERM) and waits at most `limit` for it to exit: its exit status,
    /// or an error if it is still running (it is then killed).
    pub fn terminate(mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} still running {limit:?} after SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends it `signal` (`TERM`, `HUP`, ...).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()?;
        anyhow::ensure!(sent.success(), "kill -{signal} failed");
        Ok(())
    }

    /// Waits at most `limit` for it to exit: its exit status, or an error if it still runs.
    pub async fn exited(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} still running after {limit:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (at most 20 s) until its log has a line with every one of `words`: that line.
    pub async fn logged(&mut self, words: &[&str]) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| words.iter().all(|w| l.contains(w))) {
                return Ok(line.to_owned());
            }
            if Instant::now() > deadline {
                bail!("{}: no line with {words:?}:\n{log}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills it with SIGKILL, as a crash or the OOM killer would, and reaps it (what dropping
    /// it does).
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the ptth program `bin` on the configuration file `dir/config`, logging at `info` to
/// `dir/config.log`.
fn launch(dir: &Path, bin: &'static str, config: &str) -> anyhow::Result<Program> {
    let log = dir.join(format!("{config}.log"));
    Program::ptth(&binary(bin)?, &dir.join(config), "info", log, bin)
}

/// Starts the ptth program `bin` on the configuration file `dir/config`, logging at `info` to
/// `dir/config.log`. Fails the test if it cannot be started.
pub fn start(dir: &Path, bin: &'static str, config: &str) -> Program {
    launch(dir, bin, config).unwrap_or_else(|e| panic!("starting {bin}: {e:#}"))
}

/// Writes `text` to `dir/config` and starts `bin` on it, logging at `info` to
/// `dir/config.log`.
pub fn try_spawn(
    dir: &Path,
    bin: &'static str,
    config: &str,
    text: &str,
) -> anyhow::Result<Program> {
    let path = dir.join(config);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    launch(dir, bin, config)
}

/// [`try_spawn`], failing the test if `bin` cannot be started.
pub fn spawn(dir: &Path, bin: &'static str, config: &str, text: &str) -> Program {
    try_spawn(dir, bin, config, text).unwrap_or_else(|e| panic!("starting {bin}: {e:#}"))
}

/// Starts the ptth program `bin` with `--config config`, logging at `info` to `log`, its clock
/// moved by `offset` (faketime's syntax: `+30s`). Fails the test if it cannot be started.
///
/// The program is started itself, with libfaketime preloaded as the `faketime` wrapper would
/// preload it: the wrapper would stay the program's parent, and killing it would leave the
/// program running.
pub fn start_with_clock(bin: &'static str, config: &Path, offset: &str, log: PathBuf) -> Program {
    let libfaketime = libfaketime().expect("libfaketime");
    let mut cmd = Command::new(binary(bin).expect(bin));
    cmd.env("LD_PRELOAD", libfaketime)
        .env("FAKETIME", offset)
        .arg("--config")
        .arg(config)
        .args(["--log-level", "info"]);
    Program::start(bin, cmd, log).unwrap_or_else(|e| panic!("starting {bin}: {e:#}"))
}

/// libfaketime, from Debian's `faketime` package (installed if missing): in
/// `/usr/lib/<target triple>/faketime/`, or `/usr/lib/faketime/` elsewhere.
fn libfaketime() -> anyhow::Result<PathBuf> {
    const NAME: &str = "faketime/libfaketime.so.1";
    crate::fronts::ensure_installed("faketime", "faketime")?;
    let lib = Path::new("/usr/lib");
    let mut candidates = vec![lib.join(NAME)];
    for entry in std::fs::read_dir(lib)?.flatten() {
        candidates.push(entry.path().join(NAME));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("no {NAME} under {}", lib.display()))
}

/// Waits until `addr` accepts connections, while `program` runs (at most 10 s).
pub async fn wait_listening(addr: SocketAddr, program: &mut Program) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        program.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{} did not listen on {addr}:\n{}",
                program.name,
                program.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// CPU time (user and system) of the process whose `/proc/PID/stat` is `stat`, in seconds.
pub fn cpu_seconds(stat: &Path, ticks_per_second: f64) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(stat)?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after `)`.
    let ticks: f64 = fields.get(11).context("utime")?.parse::<f64>()?
        + fields.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / ticks_per_second)
}

/// Prints the programs' logs (the `.log` files of a folder) if the test fails: keep one alive
/// for as long as the programs whose logs it prints.
#[derive(Debug)]
pub struct LogsOnFailure(pub PathBuf);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                eprintln!("--- {}\n{text}", e.path().display());
            }
        }
    }
}
