//! Idle keep-alive connections to the replicas, ready for the next request.
//!
//! Connections are kept per thread: a socket is registered with the event loop of the
//! thread that opened it, and reused on another thread it would wake that thread for
//! every read (see [`crate::serving_threads`]).
//!
//! A connection goes back to the pool only after its response was read to the end, so
//! whoever takes it next starts on a clean request boundary. An idle connection the
//! replica has closed (vLLM's server closes idle ones after a few seconds) is noticed
//! when it is taken: its socket is readable, which an idle HTTP/1.1 connection never
//! is otherwise, so it is dropped and the next one tried. Between requests,
//! [`Pool::reap`] closes those the replica closed (else their sockets sit in
//! CLOSE_WAIT), those idle past the timeout, and those to replicas that left the set.

use std::collections::HashMap;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// Idle connections per thread and replica, newest last.
#[derive(Debug)]
pub struct Pool {
    idle: Mutex<HashMap<ThreadId, HashMap<String, Vec<Idle>>>>,
    max_idle_per_replica: usize,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    stream: TcpStream,
    since: Instant,
}

impl Pool {
    pub fn new(max_idle_per_replica: usize, idle_timeout: Duration) -> Self {
        Pool { idle: Mutex::new(HashMap::new()), max_idle_per_replica, idle_timeout }
    }

    /// The most recently used live connection to `replica`, if any.
    pub fn take(&self, replica: &str) -> Option<TcpStream> {
        loop {
            let idle = {
                let mut threads = self.idle.lock().expect("pool lock");
                threads.get_mut(&thread::current().id())?.get_mut(replica)?.pop()?
            };
            if idle.since.elapsed() < self.idle_timeout && still_open(&idle.stream) {
                return Some(idle.stream);
            }
        }
    }

    /// Keep `stream` for the next request to `replica`.
    pub fn put(&self, replica: &str, stream: TcpStream) {
        let mut threads = self.idle.lock().expect("pool lock");
        let map = threads.entry(thread::current().id()).or_default();
        let list = match map.get_mut(replica) {
            Some(list) => list,
            None => map.entry(replica.to_owned()).or_default(),
        };
        if list.len() >= self.max_idle_per_replica {
            // The oldest are the likeliest to have been closed by the replica.
            list.remove(0);
        }
        list.push(Idle { stream, since: Instant::now() });
    }

    /// Close the idle connections that are too old, that their replica closed, or
    /// whose replica `member` no longer names; how many stay.
    pub fn reap(&self, member: impl Fn(&str) -> bool) -> usize {
        let mut threads = self.idle.lock().expect("pool lock");
        let mut kept = 0;
        for map in threads.values_mut() {
            map.retain(|replica, list| {
                if !member(replica) {
                    return false;
                }
                list.retain(|idle| idle.since.elapsed() < self.idle_timeout && still_open(&idle.stream));
                kept += list.len();
                !list.is_empty()
            });
        }
        kept
    }

    /// Idle connections held for `replica`, on all threads.
    #[cfg(test)]
    fn idle_count(&self, replica: &str) -> usize {
        self.idle.lock().expect("pool lock").values().filter_map(|m| m.get(replica)).map(Vec::len).sum()
    }
}

/// An idle connection whose socket is readable was closed by the peer (or broke the
/// protocol by sending unasked-for bytes): either way it cannot carry a request. The
/// readiness check costs no system call when the socket has not been reported
/// readable; when it has, one non-blocking read tells.
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut byte = [0u8; 1];
            matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn a_connection_closed_by_the_replica_is_not_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(8, Duration::from_secs(60));
        let (open, _server_open) = pair(&listener).await;
        let (closed, server_closed) = pair(&listener).await;
        pool.put("r", open);
        pool.put("r", closed);
        drop(server_closed);
        // Let the FIN arrive and the reactor see it (bounded).
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let idle = pool.idle.lock().unwrap();
            if idle[&thread::current().id()]["r"].last().is_some_and(|i| !still_open(&i.stream)) {
                break;
            }
        }
        let taken = pool.take("r").expect("the open one is left");
        assert_eq!(pool.idle_count("r"), 0);
        let mut taken = taken;
        taken.write_all(b"x").await.unwrap();
        assert!(pool.take("r").is_none());
        assert!(pool.take("other").is_none());
    }

    #[tokio::test]
    async fn the_reaper_closes_what_the_replica_closed_and_what_left() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(8, Duration::from_secs(60));
        let (a, _server_a) = pair(&listener).await;
        let (b, server_b) = pair(&listener).await;
        let (c, _server_c) = pair(&listener).await;
        pool.put("r", a);
        pool.put("r", b);
        pool.put("gone", c);
        drop(server_b);
        let mut kept = usize::MAX;
        for _ in 0..100 {
            kept = pool.reap(|replica| replica == "r");
            if kept == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(kept, 1, "the closed one and the one to a replica that left are gone");
        assert_eq!((pool.idle_count("r"), pool.idle_count("gone")), (1, 0));
    }

    #[tokio::test]
    async fn idle_connections_are_bounded_and_expire() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(2, Duration::from_secs(60));
        let mut servers = Vec::new();
        for _ in 0..3 {
            let (c, s) = pair(&listener).await;
            servers.push(s);
            pool.put("r", c);
        }
        assert_eq!(pool.idle_count("r"), 2);
        let expiring = Pool::new(2, Duration::ZERO);
        let (c, _s) = pair(&listener).await;
        expiring.put("r", c);
        assert!(expiring.take("r").is_none());
    }
}
