//! A fake KV events publisher that speaks ZMTP 3.0 at the byte level, for the hostile
//! tests: it completes the handshake as a PUB socket, reads the router's subscription,
//! and then sends whatever the test writes, well-formed or not.
//!
//! Written apart from the router's own ZMTP code, from the protocol (RFC 23), so the two
//! do not share a mistake.

#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A listening fake publisher; each router connection arrives as a [`Subscriber`].
pub struct FakePublisher {
    pub endpoint: String,
    subscribers: mpsc::UnboundedReceiver<Subscriber>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakePublisher {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakePublisher {
    pub async fn start() -> FakePublisher {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
        let (tx, subscribers) = mpsc::unbounded_channel();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Some(subscriber) = Subscriber::handshake(stream).await {
                        let _ = tx.send(subscriber);
                    }
                });
            }
        });
        FakePublisher { endpoint, subscribers, accept }
    }

    /// The next router connection that completed the handshake and subscribed (10 s).
    pub async fn subscriber(&mut self) -> Subscriber {
        tokio::time::timeout(Duration::from_secs(10), self.subscribers.recv())
            .await
            .expect("the router subscribes within 10 s")
            .expect("publisher running")
    }
}

/// One subscribed connection.
pub struct Subscriber {
    stream: TcpStream,
    /// The subscription message's body (`0x01` + topic).
    pub subscription: Vec<u8>,
}

fn frame(out: &mut Vec<u8>, flags: u8, body: &[u8]) {
    if body.len() > 255 {
        out.push(flags | 0x02);
        out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    } else {
        out.push(flags);
        out.push(body.len() as u8);
    }
    out.extend_from_slice(body);
}

async fn read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let flags = stream.read_u8().await.ok()?;
    let size = if flags & 0x02 != 0 {
        stream.read_u64().await.ok()?
    } else {
        u64::from(stream.read_u8().await.ok()?)
    };
    if size > 1 << 20 {
        return None;
    }
    let mut body = vec![0; size as usize];
    stream.read_exact(&mut body).await.ok()?;
    Some((flags, body))
}

impl Subscriber {
    async fn handshake(mut stream: TcpStream) -> Option<Subscriber> {
        let mut greeting = [0u8; 64];
        greeting[0] = 0xff;
        greeting[9] = 0x7f;
        greeting[10] = 3;
        greeting[11] = 1;
        greeting[12..16].copy_from_slice(b"NULL");
        greeting[32] = 1;
        stream.write_all(&greeting).await.ok()?;
        let mut theirs = [0u8; 64];
        stream.read_exact(&mut theirs).await.ok()?;
        let mut ready = vec![5];
        ready.extend_from_slice(b"READY");
        ready.push(11);
        ready.extend_from_slice(b"Socket-Type");
        ready.extend_from_slice(&3u32.to_be_bytes());
        ready.extend_from_slice(b"PUB");
        let mut out = Vec::new();
        frame(&mut out, 0x04, &ready);
        stream.write_all(&out).await.ok()?;
        let (flags, _their_ready) = read_frame(&mut stream).await?;
        assert_eq!(flags & 0x04, 0x04, "READY is a command");
        let (_, subscription) = read_frame(&mut stream).await?;
        Some(Subscriber { stream, subscription })
    }

    /// Bytes as they are, framing or not.
    pub async fn raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// One well-framed message.
    pub async fn message(&mut self, frames: &[&[u8]]) {
        let mut out = Vec::new();
        for (i, body) in frames.iter().enumerate() {
            frame(&mut out, if i + 1 < frames.len() { 0x01 } else { 0 }, body);
        }
        self.raw(&out).await;
    }

    /// A batch as vLLM publishes it: `[topic, sequence, payload]`.
    pub async fn batch(&mut self, sequence: u64, payload: &[u8]) {
        self.message(&[b"", &sequence.to_be_bytes(), payload]).await;
    }

    /// Whether the router closes this connection within `within`.
    pub async fn closed_by_router(&mut self, within: Duration) -> bool {
        let mut sink = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// msgpack of a batch `[ts, [events...]]` in the array encoding.
pub fn batch_payload(events: Vec<rmpv::Value>) -> Vec<u8> {
    let batch = rmpv::Value::Array(vec![rmpv::Value::F64(1.0), rmpv::Value::Array(events)]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &batch).unwrap();
    out
}

/// `["BlockStored", hashes, parent, token_ids, block_size, null, null]`.
pub fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32], block_size: u64) -> rmpv::Value {
    use rmpv::Value as V;
    V::Array(vec![
        V::from("BlockStored"),
        V::Array(hashes.iter().map(|&h| V::from(h)).collect()),
        parent.map_or(V::Nil, V::from),
        V::Array(tokens.iter().map(|&t| V::from(t)).collect()),
        V::from(block_size),
        V::Nil,
        V::Nil,
    ])
}
