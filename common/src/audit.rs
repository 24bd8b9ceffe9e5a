//! The audit log: one JSON line per security-relevant event (a tunnel opened or closed, a
//! request refused, a configuration reloaded), apart from the program's log. Its fields are
//! documented in docs/operations.md.
//!
//! With `audit_log` set, the lines are appended to that file by a thread of their own, so that
//! no task waits on the disk; otherwise they go to the program's log under the target
//! `ptth_audit`, at info level. Secrets never enter it: events carry names, addresses, counts
//! and reasons only.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde_json::{Map, Value};

/// Lines that may wait for the writer thread; past that, lines are dropped and counted (a disk
/// that cannot keep up must not stall tunnels).
pub const AUDIT_QUEUE: usize = 16 * 1024;

/// The audit log of one program.
#[derive(Debug)]
pub struct Audit {
    program: &'static str,
    sink: Sink,
    /// Lines dropped because the writer thread could not keep up.
    dropped: Counter,
}

#[derive(Debug)]
enum Sink {
    /// The program's log, target `ptth_audit`.
    Log,
    /// A file, written by a thread of its own.
    File {
        to_writer: SyncSender<Message>,
        /// Set to ask the writer to open the file again (after log rotation).
        reopen: Arc<AtomicBool>,
    },
}

/// What the writer thread is told.
#[derive(Debug)]
enum Message {
    Line(String),
    /// Look at the reopen flag.
    Wake,
    /// Write everything before this, then answer.
    Flush(std::sync::mpsc::Sender<()>),
}

impl Audit {
    /// An audit log for `program` that writes to the program's log.
    pub fn to_log(program: &'static str) -> Self {
        Self {
            program,
            sink: Sink::Log,
            dropped: Counter::default(),
        }
    }

    /// An audit log for `program` appended to the file `path` (created with mode 0600 if
    /// absent).
    pub fn to_file(program: &'static str, path: &Path) -> std::io::Result<Self> {
        let file = open(path)?;
        let (to_writer, from_program) = sync_channel(AUDIT_QUEUE);
        let path = path.to_owned();
        let reopen = Arc::new(AtomicBool::new(false));
        let flag = reopen.clone();
        // Detached: it ends once every line is written and the sender is gone.
        std::thread::Builder::new()
            .name("ptth-audit".into())
            .spawn(move || write_lines(path, file, &flag, from_program))?;
        Ok(Self {
            program,
            sink: Sink::File { to_writer, reopen },
            dropped: Counter::default(),
        })
    }

    /// Records `event` with `fields` (a JSON object; anything else is recorded under
    /// `"fields"`): one line with `time` (RFC 3339, UTC), `program` and `event` first. The
    /// fields are made only if the line is written (the log's filter may leave it out).
    pub fn record(&self, event: &str, fields: impl FnOnce() -> Value) {
        if matches!(self.sink, Sink::Log)
            && !tracing::enabled!(target: "ptth_audit", tracing::Level::INFO)
        {
            return;
        }
        let fields = fields();
        let mut line = Map::new();
        line.insert("time".into(), rfc3339_now().into());
        line.insert("program".into(), self.program.into());
        line.insert("event".into(), event.into());
        match fields {
            Value::Object(fields) => line.extend(fields),
            Value::Null => {}
            other => {
                line.insert("fields".into(), other);
            }
        }
        let line = Value::Object(line).to_string();
        match &self.sink {
            Sink::Log => tracing::info!(target: "ptth_audit", "{line}"),
            Sink::File { to_writer, .. } => match to_writer.try_send(Message::Line(line)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    let n = self.dropped.inc() + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(dropped = n, "the audit log cannot keep up; lines dropped");
                    }
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.dropped.inc();
                }
            },
        }
    }

    /// Whether the lines go to a file of their own (else to the log).
    pub fn is_file(&self) -> bool {
        matches!(self.sink, Sink::File { .. })
    }

    /// The count of lines dropped so far because the file could not keep up (a handle that
    /// follows it, for the metrics).
    pub fn dropped(&self) -> Counter {
        self.dropped.clone()
    }

    /// Opens the file again before the next line (after a log rotation moved it away); a
    /// no-op without a file. Never blocks.
    pub fn reopen(&self) {
        if let Sink::File { to_writer, reopen } = &self.sink {
            reopen.store(true, Ordering::Release);
            // A full queue wakes the writer anyway.
            let _ = to_writer.try_send(Message::Wake);
        }
    }

    /// Waits, at most `limit`, until every line recorded so far is written (a no-op without
    /// a file): whether they were. Blocks the thread: call it at exit, from a blocking task.
    pub fn flush(&self, limit: Duration) -> bool {
        let Sink::File { to_writer, .. } = &self.sink else {
            return true;
        };
        let (done, written) = std::sync::mpsc::channel();
        let deadline = std::time::Instant::now() + limit;
        let mut message = Message::Flush(done);
        loop {
            match to_writer.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        written.recv_timeout(left).is_ok()
    }
}

/// Now, in RFC 3339 (UTC, milliseconds), as the audit log writes times.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Opens `path` for appending, mode 0600 when created.
fn open(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The writer thread: appends lines, flushing whenever the queue is empty.
fn write_lines(path: PathBuf, file: File, reopen: &AtomicBool, from_program: Receiver<Message>) {
    let mut out = BufWriter::new(file);
    let mut failed = false;
    while let Ok(message) = from_program.recv() {
        let mut next = Some(message);
        while let Some(message) = next.take() {
            if reopen.swap(false, Ordering::AcqRel) {
                let _ = out.flush();
                match open(&path) {
                    Ok(file) => {
                        out = BufWriter::new(file);
                        failed = false;
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot reopen the audit log; writing on to the old file")
                    }
                }
            }
            match message {
                Message::Line(line) => {
                    let written = out
                        .write_all(line.as_bytes())
                        .and_then(|()| out.write_all(b"\n"));
                    if let Err(e) = written
                        && !std::mem::replace(&mut failed, true)
                    {
                        tracing::error!(path = %path.display(), error = %e, "cannot write the audit log");
                    }
                }
                Message::Wake => {}
                Message::Flush(done) => {
                    let _ = out.flush();
                    let _ = done.send(());
                }
            }
            next = from_program.try_recv().ok();
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_objects_with_time_program_and_event_first() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::to_file("ptth_relay", &path).expect("audit");
        audit.record(
            "tunnel_opened",
            || serde_json::json!({"server": "db", "port": "pg"}),
        );
        audit.record("config_reloaded", || Value::Null);
        assert!(audit.flush(Duration::from_secs(5)));
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["program"], "ptth_relay");
        assert_eq!(lines[0]["event"], "tunnel_opened");
        assert_eq!(lines[0]["server"], "db");
        assert!(lines[0]["time"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert_eq!(lines[1]["event"], "config_reloaded");
        assert!(text.starts_with("{\"time\":"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // After a rotation, lines go to the new file.
        let rotated = dir.path().join("audit.jsonl.1");
        std::fs::rename(&path, &rotated).expect("rename");
        audit.reopen();
        audit.record("tunnel_closed", || Value::Null);
        assert!(audit.flush(Duration::from_secs(5)));
        let text = std::fs::read_to_string(&path).expect("read new");
        assert_eq!(text.lines().count(), 1);
        assert_eq!(audit.dropped().get(), 0);
    }
}
