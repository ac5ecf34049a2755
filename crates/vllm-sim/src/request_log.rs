//! The last N requests a simulated replica received, for tests to inspect: headers,
//! the routing-relevant body fields, and whether the prompt came as text or as ids.
//! Served on `GET /sim/requests`.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Serialize)]
pub struct LoggedRequest {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub max_tokens: Option<Value>,
    pub session_id: Option<Value>,
    pub user: Option<Value>,
    pub prompt_from_text: Option<bool>,
    pub prompt_tokens: Option<usize>,
    pub kv_transfer_params: Option<Value>,
}

pub struct RequestLog {
    capacity: usize,
    entries: Mutex<VecDeque<LoggedRequest>>,
}

impl RequestLog {
    pub fn new(capacity: usize) -> Self {
        RequestLog { capacity, entries: Mutex::new(VecDeque::with_capacity(capacity.min(1024))) }
    }

    pub fn push(&self, entry: LoggedRequest) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock().expect("request log lock");
        if entries.len() == self.capacity {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    pub fn entries(&self) -> Vec<LoggedRequest> {
        self.entries.lock().expect("request log lock").iter().cloned().collect()
    }
}
