//! Per-key limits kept in the state store, shared by every router instance: the same
//! token buckets as [`super::rate_limits`] (one minute's allowance, refilled
//! continuously, debt bounded by one allowance), kept in one hash per key
//! (`PREFIX` + the key's name: `rl`/`rp`/`rt` for requests, `tl`/`tp`/`tt` for tokens:
//! level, size, time) and changed only by the two scripts below.
//!
//! A script runs atomically in the store, and reads the store's own clock (`TIME`), so
//! admissions from every instance are serialised and timed alike: concurrent requests
//! on any number of instances cannot together take more than the bucket holds. A key
//! idle for five minutes is dropped by the store (`PEXPIRE`); its bucket would be full
//! by then, so forgetting it changes nothing.

use std::sync::Arc;
use std::time::Duration;

use super::rate_limits::{Exceeded, Limits, Refused};
use crate::state_store::resp::Reply;
use crate::state_store::{Connection, StoreError, Target};

/// Reads a bucket (`name` `r` or `t`) refilled to now; a resized one keeps what was spent.
const BUCKET: &str = r#"
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local function bucket(name, per_minute)
  if per_minute <= 0 then return nil end
  local v = redis.call('HMGET', KEYS[1], name .. 'l', name .. 'p', name .. 't')
  local level, size, at = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  if level == nil or size == nil or at == nil then return per_minute end
  if size ~= per_minute then
    level = math.max(-per_minute, math.min(per_minute, per_minute - (size - level)))
  end
  return math.min(per_minute, level + math.max(0, now - at) * per_minute / 60000)
end
local function keep(name, level, per_minute)
  redis.call('HSET', KEYS[1], name .. 'l', tostring(level), name .. 'p', tostring(per_minute), name .. 't', tostring(now))
end
"#;

/// ARGV: requests per minute, tokens per minute (0: none), the estimate. Returns
/// `{0, 0, 0}` admitted, or `{limit, wait_ms, per_minute}`, limit 1 requests, 2 tokens.
const ADMIT: &str = r#"
local rpm, tpm, estimate = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local requests, tokens = bucket('r', rpm), bucket('t', tpm)
if requests ~= nil and requests < 1 then
  return {1, math.ceil((1 - requests) * 60000 / rpm), rpm}
end
if tokens ~= nil then
  local need = math.min(estimate, tpm)
  if tokens < need or tokens <= 0 then
    return {2, math.ceil((math.max(need, 1) - tokens) * 60000 / tpm), tpm}
  end
end
if requests ~= nil then keep('r', requests - 1, rpm) end
if tokens ~= nil then keep('t', tokens - estimate, tpm) end
redis.call('PEXPIRE', KEYS[1], 300000)
return {0, 0, 0}
"#;

/// ARGV: tokens per minute, tokens used beyond the estimate (negative: given back).
const SETTLE: &str = r#"
local tpm, extra = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens = bucket('t', tpm)
if tokens == nil then return 0 end
keep('t', math.max(-tpm, math.min(tpm, tokens - extra)), tpm)
redis.call('PEXPIRE', KEYS[1], 300000)
return 0
"#;

const ADMIT_SCRIPT: usize = 0;
const SETTLE_SCRIPT: usize = 1;

/// The limits of every key, in the store.
#[derive(Clone)]
pub struct SharedLimits {
    connection: Connection,
    prefix: Arc<str>,
    timeout: Duration,
}

impl SharedLimits {
    /// Connect (in the background) to `target`; keys are kept under `prefix`, and an
    /// admission waits for the store at most `timeout`.
    pub fn open(
        target: Target,
        prefix: &str,
        timeout: Duration,
        on_up: impl Fn(bool) + Send + 'static,
    ) -> Self {
        let scripts = vec![concat_script(ADMIT), concat_script(SETTLE)];
        let stall_limit = (timeout * 4).max(Duration::from_secs(1));
        SharedLimits {
            connection: Connection::open(target, scripts, stall_limit, on_up),
            prefix: prefix.into(),
            timeout,
        }
    }

    pub fn is_up(&self) -> bool {
        self.connection.is_up()
    }

    /// Take one request and `estimate` tokens from `key`'s shared buckets: `Ok(Ok(()))`
    /// admitted, `Ok(Err(_))` refused by the store, `Err(_)` no answer from it.
    pub async fn admit(
        &self,
        key: &str,
        limits: Limits,
        estimate: u64,
    ) -> Result<Result<(), Refused>, StoreError> {
        let name = self.name(key);
        let rpm = limits.requests_per_minute.map_or(0, u64::from).to_string();
        let tpm = limits.tokens_per_minute.unwrap_or(0).to_string();
        let estimate = estimate.to_string();
        let args: [&[u8]; 3] = [rpm.as_bytes(), tpm.as_bytes(), estimate.as_bytes()];
        let reply = self.connection.eval(ADMIT_SCRIPT, &[name.as_bytes()], &args, self.timeout).await?;
        let unexpected = || StoreError::Unexpected(format!("{reply:?}"));
        let Reply::Array(Some(items)) = &reply else { return Err(unexpected()) };
        let numbers: Vec<i64> = items
            .iter()
            .map(|item| match item {
                Reply::Integer(n) => Ok(*n),
                _ => Err(unexpected()),
            })
            .collect::<Result<_, _>>()?;
        let limit = match numbers.as_slice() {
            [0, ..] => return Ok(Ok(())),
            [1, _, _] => Exceeded::Requests,
            [2, _, _] => Exceeded::Tokens,
            _ => return Err(unexpected()),
        };
        let wait = Duration::from_millis(numbers[1].max(0) as u64);
        Ok(Err(Refused {
            limit,
            per_minute: numbers[2].max(0) as u64,
            retry_after: super::rate_limits::retry_after(wait),
        }))
    }

    /// Charge `key` the tokens it used beyond its estimate (negative: give back),
    /// without waiting for the store.
    pub fn settle(&self, key: &str, tokens_per_minute: u64, extra: i64) -> Result<(), StoreError> {
        let name = self.name(key);
        let (tpm, extra) = (tokens_per_minute.to_string(), extra.to_string());
        self.connection.eval_later(SETTLE_SCRIPT, &[name.as_bytes()], &[tpm.as_bytes(), extra.as_bytes()])
    }

    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// A script: the shared bucket code, then its own.
fn concat_script(body: &str) -> String {
    format!("{BUCKET}{body}")
}
