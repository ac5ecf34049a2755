//! What a request with an API key must pass after its body is read, and how its usage
//! is metered: the key's model allow-list, its requests- and tokens-per-minute limits
//! (the prompt estimated at about four bytes of JSON per token, settled later with the
//! engine's usage), and for a stream that did not ask for its usage, the body rewritten
//! to ask the engine for it (the chunk is taken out again by
//! [`crate::response::metered`]).

use std::time::Instant;

use bytes::Bytes;

use super::request_facts::{self, BodyFacts, FactsError};
use super::{Endpoint, Ingress};
use crate::admission::ApiKey;
use crate::dispatch::pd::members::Members;
use crate::error::RouterError;
use crate::response::metered::Meter;

impl Ingress {
    /// The request's facts, and for a keyed request its admission by the key: the
    /// model allow-list and the rate limits, and how its usage will be metered (for a
    /// stream, the engine is asked for its usage chunk, which the client will not see
    /// unless it asked for it).
    pub(super) fn read_request(
        &self,
        endpoint: Endpoint,
        mut body: Bytes,
        caller: Option<&ApiKey>,
        started: Instant,
    ) -> Result<(Bytes, BodyFacts, Option<Meter>), RouterError> {
        let inference = endpoint != Endpoint::Other;
        let mut strip_usage_chunk = false;
        if caller.is_some() && inference {
            let members = Members::parse(&body).map_err(|e| FactsError::NotJson(e.to_string()))?;
            if let Some(asked) = usage_asked(&members) {
                body = asked;
                strip_usage_chunk = true;
            }
        }
        let facts = match endpoint {
            Endpoint::ChatCompletions | Endpoint::Completions => request_facts::parse_inference(&body)?,
            // Not ours to judge: a non-JSON body goes to the replica as it came.
            Endpoint::Other if body.is_empty() => BodyFacts::default(),
            Endpoint::Other => request_facts::parse(&body).unwrap_or_default(),
        };
        let Some(caller) = caller else { return Ok((body, facts, None)) };
        if let Some(model) = &facts.model
            && !caller.allows(model)
        {
            return Err(RouterError::ModelNotAllowed(model.clone()));
        }
        // About four bytes of prompt JSON per token; the engine's usage settles it.
        let prompt_bytes = facts.prompt.as_ref().map_or(body.len(), |range| range.len());
        let estimate = (prompt_bytes / 4 + 1) as u64;
        if let Err(refused) = self.rate_limits.admit(&caller.name, caller.limits, estimate, started) {
            self.metrics.key_rate_limited.with_label_values(&[&*caller.name, refused.limit.label()]).inc();
            return Err(RouterError::RateLimited(refused));
        }
        let counters = crate::metrics::KEY_TOKEN_KINDS
            .map(|kind| self.metrics.key_tokens.with_label_values(&[&*caller.name, kind]));
        let meter = Meter {
            key: caller.name.clone(),
            limits: self.rate_limits.clone(),
            estimate,
            strip_usage_chunk,
            counters,
        };
        Ok((body, facts, Some(meter)))
    }
}

/// For a stream that did not ask for its usage: the body asking for it
/// (`stream_options.include_usage`, other stream options kept). None when it is not a
/// stream or already asks.
fn usage_asked(members: &Members) -> Option<Bytes> {
    if !members.is_set("stream") {
        return None;
    }
    let mut options = match members.get("stream_options") {
        Some(raw) => match serde_json::from_str::<serde_json::Value>(raw.get()) {
            Ok(serde_json::Value::Object(options)) => options,
            // Not an object: the engine will refuse it as it stands.
            _ => return None,
        },
        None => serde_json::Map::new(),
    };
    if options.get("include_usage") == Some(&serde_json::Value::Bool(true)) {
        return None;
    }
    options.insert("include_usage".into(), true.into());
    let options = serde_json::Value::Object(options).to_string();
    Some(Bytes::from(members.rewrite(|_| true, &[("stream_options", options.as_bytes())])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(body: &str) -> Option<String> {
        let members = Members::parse(body.as_bytes()).unwrap();
        usage_asked(&members).map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn a_stream_is_asked_for_its_usage_once() {
        assert_eq!(
            asked(r#"{"model":"m","stream":true}"#).unwrap(),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#
        );
        let kept =
            asked(r#"{"stream":true,"stream_options":{"continuous_usage_stats":true},"n":1}"#).unwrap();
        let kept: serde_json::Value = serde_json::from_str(&kept).unwrap();
        assert_eq!(
            kept["stream_options"],
            serde_json::json!({"continuous_usage_stats": true, "include_usage": true})
        );
        assert_eq!(kept["n"], 1);
        assert_eq!(asked(r#"{"stream":true,"stream_options":{"include_usage":true}}"#), None, "already asks");
        assert_eq!(asked(r#"{"stream":false}"#), None, "not a stream");
        assert_eq!(asked(r#"{"stream":true,"stream_options":"x"}"#), None, "the engine refuses it as it is");
    }
}
