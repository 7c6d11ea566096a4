//! Running a child process with a time limit (and optionally a watch that
//! may kill it earlier) and bounded captured output, or streaming its
//! stdout into a consumer.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The most output kept from each of stdout and stderr.
pub const MAX_CAPTURE: usize = 4096;

/// What a finished (or killed) child did.
#[derive(Debug)]
pub struct Finished {
    /// `None` when it was killed.
    pub status: Option<ExitStatus>,
    /// Why it was killed, if it was.
    pub killed: Option<Killed>,
    pub stdout: String,
    pub stderr: String,
}

/// Why a child was killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Killed {
    /// It ran past its deadline.
    Timeout,
    /// The watch said so, for this reason.
    Watch(String),
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

fn capture(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = MAX_CAPTURE.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        // The receiver may have given up waiting; nothing to do then.
        let _ = tx.send(String::from_utf8_lossy(&kept).into_owned());
    });
    rx
}

/// Run `cmd` to completion or kill it after `timeout`.
pub fn run(cmd: Command, timeout: Duration) -> std::io::Result<Finished> {
    run_watched(cmd, timeout, || None)
}

/// [`run`], also killing the child as soon as `watch` (asked every 50 ms)
/// gives a reason.
pub fn run_watched(
    mut cmd: Command,
    timeout: Duration,
    mut watch: impl FnMut() -> Option<String>,
) -> std::io::Result<Finished> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let out = child.stdout.take().map(capture);
    let err = child.stderr.take().map(capture);
    let started = Instant::now();
    let mut watched = Instant::now();
    let (status, killed) = loop {
        if let Some(status) = child.try_wait()? {
            break (Some(status), None);
        }
        let killed = if started.elapsed() >= timeout {
            Some(Killed::Timeout)
        } else if watched.elapsed() >= Duration::from_millis(50) {
            watched = Instant::now();
            watch().map(Killed::Watch)
        } else {
            None
        };
        if let Some(killed) = killed {
            // Already exited or not ours to kill any more: either way it is done.
            let _ = child.kill();
            let _ = child.wait();
            break (None, Some(killed));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Finished {
        status,
        killed,
        stdout: join(out),
        stderr: join(err),
    })
}

/// A grandchild may keep the pipes open after the child exits: wait a
/// moment for the output, not for the grandchild.
fn join(rx: Option<mpsc::Receiver<String>>) -> String {
    rx.and_then(|rx| rx.recv_timeout(Duration::from_secs(1)).ok())
        .unwrap_or_default()
}

/// The most a streamed child may write after its consumer is done.
const MAX_TRAILER: u64 = 1 << 20;

/// How [`stream`] ended.
#[derive(Debug)]
pub enum Streamed<T> {
    /// The consumer returned (the child was killed if it had not exited).
    Done(T),
    /// The child ran past its deadline and was killed.
    TimedOut,
    /// The consumer got everything but the child failed: its stderr.
    Failed(String),
}

/// Run `cmd` with its stdout handed to `consume` on this thread; the child
/// is killed when `consume` returns early (it stopped reading, e.g. at a
/// limit) or after `timeout` (a watchdog thread kills it, so a stalled
/// stream ends). A consumer's error wins over the child's complaint about
/// the pipe it closed; a child that failed after a consumer that did not is
/// [`Streamed::Failed`].
pub fn stream<T, E>(
    mut cmd: Command,
    timeout: Duration,
    consume: impl FnOnce(&mut std::process::ChildStdout) -> Result<T, E>,
) -> std::io::Result<Streamed<Result<T, E>>> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let Some(mut stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(std::io::Error::other("no stdout"));
    };
    let err = child.stderr.take().map(capture);
    let child = std::sync::Arc::new(std::sync::Mutex::new(child));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let timed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let child = child.clone();
        let timed_out = timed_out.clone();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                if let Ok(mut c) = child.lock() {
                    let _ = c.kill();
                }
            }
        })
    };
    let result = consume(&mut stdout);
    // A consumer that is done may leave a little (a tar stream's padding):
    // read it, so the child can finish writing and exit by itself. One that
    // stopped early (an error) gets the child killed.
    let finished = result.is_ok()
        && std::io::copy(&mut (&mut stdout).take(MAX_TRAILER), &mut std::io::sink())
            .is_ok_and(|n| n < MAX_TRAILER);
    drop(stdout);
    let status = loop {
        let Ok(mut c) = child.lock() else {
            break None;
        };
        if !finished {
            let _ = c.kill();
        }
        match c.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(_) => break None,
        }
        drop(c);
        // The watchdog kills it at the deadline.
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = done_tx.send(());
    let _ = watchdog.join();
    if timed_out.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(Streamed::TimedOut);
    }
    let stderr = join(err);
    Ok(match (&result, status) {
        (Ok(_), Some(s)) if !s.success() => Streamed::Failed(stderr.trim().to_string()),
        _ => Streamed::Done(result),
    })
}
