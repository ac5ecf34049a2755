//! One pipelined connection to the store, kept open by a task of its own.
//!
//! Callers hand the task a command and, if they want it, a channel for the reply;
//! the task writes commands as they come (many per write when they queue up) and
//! matches replies to callers in order, as RESP2 pipelining does. A caller waits at most
//! its own timeout. The connection is dropped, failing every waiting caller at once, when
//! the store closes it, breaks the protocol ([`super::resp`]'s bounds), sends a reply
//! nobody asked for, says a script is gone (`NOSCRIPT`: the reconnect loads them
//! again), or leaves its oldest call unanswered for longer than the stall limit (a store
//! that accepts and never answers). Then the task reconnects with backoff (0.1 s doubling
//! to 5 s), and until it has, every call fails at once: a caller never waits on a store
//! that is known to be down.
//!
//! Each (re)connection authenticates (`AUTH`), selects the database (`SELECT`) and loads
//! the scripts (`SCRIPT LOAD`) before it is marked up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::resp::{self, ProtocolError, Reply};
use super::{StoreError, Target};

/// Calls waiting to be written or answered, at most.
const MAX_PENDING: usize = 4096;
/// Bytes written at once when calls queue up.
const MAX_WRITE: usize = 64 * 1024;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

type Waiter = Option<oneshot::Sender<Reply>>;

struct Call {
    frame: BytesMut,
    reply: Waiter,
}

/// The handle callers use; the task behind it ends when every handle is dropped.
#[derive(Clone)]
pub struct Connection {
    calls: mpsc::Sender<Call>,
    up: Arc<AtomicBool>,
    scripts: Arc<std::sync::OnceLock<Vec<String>>>,
}

impl Connection {
    /// Start the task that connects to `target` and keeps `scripts` loaded there;
    /// `on_up` hears every change of reachability.
    pub fn open(
        target: Target,
        scripts: Vec<String>,
        stall_limit: Duration,
        on_up: impl Fn(bool) + Send + 'static,
    ) -> Connection {
        let (tx, rx) = mpsc::channel(MAX_PENDING);
        let connection = Connection {
            calls: tx,
            up: Arc::new(AtomicBool::new(false)),
            scripts: Arc::new(std::sync::OnceLock::new()),
        };
        let task = Task {
            target,
            scripts,
            stall_limit,
            up: connection.up.clone(),
            shas: connection.scripts.clone(),
        };
        tokio::spawn(task.run(rx, on_up));
        connection
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Run script `script` (its index in the list given to [`Connection::open`]) with
    /// these keys and arguments, and wait at most `timeout` for its reply.
    pub async fn eval(
        &self,
        script: usize,
        keys: &[&[u8]],
        args: &[&[u8]],
        timeout: Duration,
    ) -> Result<Reply, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(self.evalsha(script, keys, args)?, Some(tx))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Reply::Error(error))) => Err(StoreError::Replied(error)),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(StoreError::Down),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    /// Run a script and do not wait for its reply.
    pub fn eval_later(&self, script: usize, keys: &[&[u8]], args: &[&[u8]]) -> Result<(), StoreError> {
        self.send(self.evalsha(script, keys, args)?, None)
    }

    fn evalsha(&self, script: usize, keys: &[&[u8]], args: &[&[u8]]) -> Result<BytesMut, StoreError> {
        if !self.is_up() {
            return Err(StoreError::Down);
        }
        let sha = self.scripts.get().and_then(|shas| shas.get(script)).ok_or(StoreError::Down)?;
        let count = keys.len().to_string();
        let mut parts: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), count.as_bytes()];
        parts.extend_from_slice(keys);
        parts.extend_from_slice(args);
        let mut frame = BytesMut::new();
        resp::encode(&mut frame, &parts);
        Ok(frame)
    }

    fn send(&self, frame: BytesMut, reply: Waiter) -> Result<(), StoreError> {
        self.calls.try_send(Call { frame, reply }).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => StoreError::Busy,
            mpsc::error::TrySendError::Closed(_) => StoreError::Down,
        })
    }
}

struct Task {
    target: Target,
    scripts: Vec<String>,
    stall_limit: Duration,
    up: Arc<AtomicBool>,
    shas: Arc<std::sync::OnceLock<Vec<String>>>,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Store(String),
    #[error("every handle is gone")]
    Closed,
}

impl Task {
    async fn run(self, mut calls: mpsc::Receiver<Call>, on_up: impl Fn(bool)) {
        let mut backoff = BACKOFF_FIRST;
        let mut was_up = None;
        loop {
            let ended = match tokio::time::timeout(self.target.connect_timeout, self.connect()).await {
                Ok(Ok(stream)) => {
                    self.up.store(true, Ordering::Relaxed);
                    on_up(true);
                    tracing::info!(store = %self.target, "connected to the state store");
                    was_up = Some(true);
                    backoff = BACKOFF_FIRST;
                    let ended = self.serve(stream, &mut calls).await;
                    self.up.store(false, Ordering::Relaxed);
                    on_up(false);
                    ended
                }
                Ok(Err(error)) => Err(error),
                Err(_) => {
                    Err(Broken::Store(format!("no connection within {:?}", self.target.connect_timeout)))
                }
            };
            match ended {
                Err(Broken::Closed) | Ok(()) => return,
                Err(error) if was_up != Some(false) => {
                    tracing::warn!(store = %self.target, %error, "the state store is unreachable; limits fall back to this instance's share");
                    if was_up.is_none() {
                        on_up(false);
                    }
                    was_up = Some(false);
                }
                Err(error) => {
                    tracing::debug!(store = %self.target, %error, "the state store is still unreachable")
                }
            }
            // Down: every call fails at once until the next attempt.
            let retry_at = Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(retry_at) => break,
                    call = calls.recv() => match call {
                        Some(_) => {} // its waiter, dropped, tells the caller
                        None => return,
                    },
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn connect(&self) -> Result<TcpStream, Broken> {
        let mut stream = TcpStream::connect(&self.target.address).await?;
        stream.set_nodelay(true)?;
        let mut buf = BytesMut::new();
        if let Some(password) = &self.target.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            auth.extend(self.target.username.as_deref().map(str::as_bytes));
            auth.push(password.as_bytes());
            expect_ok(&mut stream, &mut buf, &auth).await?;
        }
        if self.target.database != 0 {
            expect_ok(&mut stream, &mut buf, &[b"SELECT", self.target.database.to_string().as_bytes()])
                .await?;
        }
        let mut shas = Vec::with_capacity(self.scripts.len());
        for script in &self.scripts {
            match round_trip(&mut stream, &mut buf, &[b"SCRIPT", b"LOAD", script.as_bytes()]).await? {
                Reply::Bulk(Some(sha)) => shas.push(String::from_utf8_lossy(&sha).into_owned()),
                other => return Err(Broken::Store(format!("SCRIPT LOAD answered {other:?}"))),
            }
        }
        if self.shas.get().is_some_and(|known| *known != shas) {
            return Err(Broken::Store("the store hashed the scripts differently than before".into()));
        }
        let _ = self.shas.set(shas);
        Ok(stream)
    }

    /// Carry calls and replies until the connection breaks or every handle is gone.
    async fn serve(&self, stream: TcpStream, calls: &mut mpsc::Receiver<Call>) -> Result<(), Broken> {
        let (mut read, mut write) = stream.into_split();
        let mut waiting: VecDeque<(Waiter, Instant)> = VecDeque::new();
        let mut inbox = BytesMut::with_capacity(4096);
        let mut outbox = BytesMut::new();
        loop {
            let stalled_at = waiting.front().map(|(_, sent)| *sent + self.stall_limit);
            tokio::select! {
                call = calls.recv(), if waiting.len() < MAX_PENDING => {
                    let Some(call) = call else { return Err(Broken::Closed) };
                    let now = Instant::now();
                    outbox.extend_from_slice(&call.frame);
                    waiting.push_back((call.reply, now));
                    while outbox.len() < MAX_WRITE && waiting.len() < MAX_PENDING {
                        let Ok(call) = calls.try_recv() else { break };
                        outbox.extend_from_slice(&call.frame);
                        waiting.push_back((call.reply, now));
                    }
                    write.write_all(&outbox).await?;
                    outbox.clear();
                }
                read_bytes = read.read_buf(&mut inbox) => {
                    if read_bytes? == 0 {
                        return Err(Broken::Store("the store closed the connection".into()));
                    }
                    while let Some((reply, used)) = resp::parse(&inbox)? {
                        inbox.advance(used);
                        let Some((waiter, _)) = waiting.pop_front() else {
                            return Err(Broken::Store("a reply nobody asked for".into()));
                        };
                        let lost_script = matches!(&reply, Reply::Error(e) if e.starts_with("NOSCRIPT"));
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(reply);
                        }
                        if lost_script {
                            return Err(Broken::Store("the store lost the scripts (NOSCRIPT)".into()));
                        }
                    }
                }
                _ = tokio::time::sleep_until(stalled_at.unwrap_or_else(Instant::now)), if stalled_at.is_some() => {
                    return Err(Broken::Store(format!("no reply within {:?}", self.stall_limit)));
                }
            }
        }
    }
}

/// Send one command and read its reply, before the connection is shared.
async fn round_trip(stream: &mut TcpStream, buf: &mut BytesMut, args: &[&[u8]]) -> Result<Reply, Broken> {
    let mut frame = BytesMut::new();
    resp::encode(&mut frame, args);
    stream.write_all(&frame).await?;
    loop {
        if let Some((reply, used)) = resp::parse(buf)? {
            buf.advance(used);
            return Ok(reply);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(Broken::Store("the store closed the connection".into()));
        }
    }
}

async fn expect_ok(stream: &mut TcpStream, buf: &mut BytesMut, args: &[&[u8]]) -> Result<(), Broken> {
    match round_trip(stream, buf, args).await? {
        Reply::Simple(ok) if ok == "OK" => Ok(()),
        Reply::Error(error) => {
            Err(Broken::Store(format!("{} refused: {error}", String::from_utf8_lossy(args[0]))))
        }
        other => Err(Broken::Store(format!("{} answered {other:?}", String::from_utf8_lossy(args[0])))),
    }
}
