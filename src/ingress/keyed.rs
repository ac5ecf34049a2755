//! What a request with an API key must pass after its body is read, and how its usage
//! is metered: the key's model allow-list, its requests- and tokens-per-minute limits,
//! and for a stream that did not ask for its usage, the body rewritten to ask the engine
//! for it (the chunk is taken out again by [`crate::response::metered`]).
//!
//! A request reserves of its key's tokens everything it may cost before it is admitted:
//! its prompt (about four bytes of JSON per token) and its output allowance, the most
//! tokens it may generate: `max_tokens` (or `max_completion_tokens`,
//! `max_output_tokens`) times `n` times the prompts of a batch; when it names none, the
//! key's `default_max_tokens`, else what the model's context leaves. Concurrent
//! requests cannot together spend more than the key has: each holds its reservation
//! until the engine's usage settles it (or, for a client that left, what it was sent).

use std::time::Instant;

use bytes::Bytes;

use super::multipart;
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
    pub(super) async fn read_request(
        &self,
        endpoint: Endpoint,
        generates: bool,
        content_type: Option<&str>,
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
        let form = content_type.and_then(multipart::boundary);
        let is_form = form.is_some();
        let mut unreadable_form = None;
        let mut facts = match (endpoint, form) {
            (Endpoint::ChatCompletions | Endpoint::Completions, _) => request_facts::parse_inference(&body)?,
            (Endpoint::Other, _) if body.is_empty() => BodyFacts::default(),
            // A form (audio): its `model` field routes it, and passes the allow-list.
            (Endpoint::Other, Some(boundary)) => {
                let model = boundary.and_then(|b| multipart::field(&body, b, "model", MAX_MODEL_NAME));
                match model {
                    Ok(model) => BodyFacts { model: model.map(str::to_owned), ..BodyFacts::default() },
                    Err(error) => {
                        unreadable_form = Some(error);
                        BodyFacts::default()
                    }
                }
            }
            // Not ours to judge: a body that is not JSON goes to the replica as it came.
            (Endpoint::Other, None) => request_facts::parse(&body).unwrap_or_default(),
        };
        let Some(caller) = caller else { return Ok((body, facts, None)) };
        if caller.models.is_some() {
            if let Some(error) = unreadable_form {
                return Err(RouterError::BadForm(error.to_string()));
            }
            // A key kept to some models names one of them: a body without a model (or
            // with `null`) is refused, not left for the engine's default model. Bodiless
            // calls (a stored response's retrieval or cancel) run no model.
            match &facts.model {
                Some(model) if !caller.allows(model) => {
                    return Err(RouterError::ModelNotAllowed(model.clone()));
                }
                Some(_) => {}
                None if body.is_empty() => {}
                None => return Err(RouterError::BadRequest(FactsError::MissingModel)),
            }
        }
        // What the key decides in the body itself: its cache salt, its priority floor.
        if !is_form && let Some(rewritten) = self.keyed_members(caller, &body, &facts, generates)? {
            body = rewritten;
            facts = match endpoint {
                Endpoint::Other => request_facts::parse(&body).unwrap_or_default(),
                _ => request_facts::parse_inference(&body)?,
            };
        }
        // About four bytes of prompt JSON per token; the engine's usage settles it.
        let prompt_bytes = facts.prompt.as_ref().map_or(body.len(), |range| range.len());
        let prompt = (prompt_bytes / 4 + 1) as u64;
        let output = if generates { self.output_allowance(&facts, caller, prompt) } else { 0 };
        let reserved = prompt.saturating_add(output);
        let ledger = match self.rate_limits.admit(&caller.name, caller.limits, reserved, started).await {
            Ok(ledger) => ledger,
            Err(refused) => {
                self.metrics
                    .key_rate_limited
                    .with_label_values(&[&*caller.name, refused.limit.label()])
                    .inc();
                return Err(RouterError::RateLimited(refused));
            }
        };
        let counters = crate::metrics::KEY_TOKEN_KINDS
            .map(|kind| self.metrics.key_tokens.with_label_values(&[&*caller.name, kind]));
        let meter = Meter {
            key: caller.name.clone(),
            limits: self.rate_limits.clone(),
            ledger,
            reserved,
            prompt,
            strip_usage_chunk,
            counters,
        };
        Ok((body, facts, Some(meter)))
    }

    /// The body with what the key decides in it, when that differs from what the client
    /// sent: an isolated key's `cache_salt` (in place of any the client set: it could
    /// name another tenant's), and a `priority` no more urgent than the key's band
    /// allows the engines' priority scheduling.
    fn keyed_members(
        &self,
        caller: &ApiKey,
        body: &[u8],
        facts: &BodyFacts,
        generates: bool,
    ) -> Result<Option<Bytes>, RouterError> {
        let salt = caller
            .cache_salt
            .as_deref()
            .filter(|salt| generates && facts.cache_salt.as_deref() != Some(*salt))
            .map(|salt| serde_json::to_string(salt).expect("a string serialises"));
        let floor =
            caller.priority.engine_floor().filter(|_| memchr::memmem::find(body, b"\"priority\"").is_some());
        if salt.is_none() && floor.is_none() {
            return Ok(None);
        }
        let members = Members::parse(body).map_err(|e| FactsError::NotJson(e.to_string()))?;
        let floored = floor.filter(|&floor| {
            members
                .get("priority")
                .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok())
                .and_then(|p| p.as_f64())
                .is_some_and(|p| p < floor as f64)
        });
        if floored.is_some() {
            self.metrics.stripped_fields.with_label_values(&["priority"]).inc();
        }
        let floored = floored.map(|floor| floor.to_string());
        let mut set: Vec<(&str, &[u8])> = Vec::new();
        if let Some(salt) = &salt {
            set.push(("cache_salt", salt.as_bytes()));
        }
        if let Some(floor) = &floored {
            set.push(("priority", floor.as_bytes()));
        }
        Ok((!set.is_empty()).then(|| Bytes::from(members.rewrite(|_| true, &set))))
    }

    /// The most tokens a request that generates (chat, completions, responses) may
    /// generate, reserved with its prompt; the others (embeddings, scores, tokenising)
    /// reserve none.
    fn output_allowance(&self, facts: &BodyFacts, caller: &ApiKey, prompt: u64) -> u64 {
        let per_generation = facts.max_tokens.or(caller.default_max_tokens).unwrap_or_else(|| {
            let context = facts.model.as_deref().and_then(|m| self.dispatcher.registry.max_model_len(m));
            context.map_or(0, |context| context.saturating_sub(prompt))
        });
        per_generation.saturating_mul(facts.generations.max(1))
    }
}

/// Longest model name read from a form.
const MAX_MODEL_NAME: usize = 1024;

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
