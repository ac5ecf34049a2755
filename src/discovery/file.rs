//! `--replicas-file PATH`: the replica set written in a file, re-read when it changes.
//!
//! One replica per line, optionally after its role; `#` starts a comment:
//!
//! ```text
//! # decode (or, outside P/D mode, every) replica
//! http://10.0.0.5:8000
//! decode http://10.0.0.6:8000
//! prefill http://10.0.0.7:8000
//! ```
//!
//! The file is read every `--discovery-interval` and applied when its contents change.
//! Reading it whole each time (it is small) rather than watching inotify events works
//! the same for an edit in place, a rename over it and a Kubernetes ConfigMap's symlink
//! swap. A file that cannot be read or has a bad line is logged and ignored: the last
//! good set stays in rotation.
//!
//! A file caught half-written must not be taken for a smaller fleet, so two more rules:
//! every line ends with a newline (a last line without one is still being written: the
//! file is read again at the next interval), and a file with no replica at all means
//! "no replicas" only when it says `none` on a line of its own (an empty file is what a
//! writer leaves between truncating and writing). The safe way to update the file is to
//! write a new one beside it and rename it over the old one, which readers see whole.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{Member, Membership, Role};
use crate::replicas::ReplicaUrl;

/// Parse a replicas file. Errors name the first bad line.
pub fn parse(text: &str) -> Result<BTreeSet<Member>, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the last line has no newline: the file is incomplete (write it whole, then rename it into place)".into());
    }
    let mut members = BTreeSet::new();
    let mut none = false;
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line == "none" {
            none = true;
            continue;
        }
        let mut words = line.split_whitespace();
        let (role, url) = match (words.next(), words.next(), words.next()) {
            (Some(url), None, _) => (Role::Main, url),
            (Some(role), Some(url), None) => {
                let role = Role::parse(role).ok_or_else(|| {
                    format!("line {}: role `{role}` is not prefill, decode or replica", number + 1)
                })?;
                (role, url)
            }
            _ => return Err(format!("line {}: expected `[ROLE] URL`, got `{line}`", number + 1)),
        };
        let url = ReplicaUrl::parse(url).map_err(|e| format!("line {}: {e}", number + 1))?;
        members.insert(Member::new(role, &url));
    }
    match (members.is_empty(), none) {
        (true, false) => Err("no replicas: write `none` on a line of its own to mean an empty fleet".into()),
        (false, true) => Err("`none` and replicas in one file".into()),
        _ => Ok(members),
    }
}

/// Read the file now (once; an error if it is missing or bad, so the router does not
/// start on a typo), then follow its changes until the task is dropped.
pub async fn follow(
    path: PathBuf,
    interval: Duration,
    mut membership: Membership,
) -> Result<JoinHandle<()>, String> {
    let text = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| format!("--replicas-file {}: {e}", path.display()))?;
    let members =
        check(parse(&text), &membership).map_err(|e| format!("--replicas-file {}: {e}", path.display()))?;
    membership.apply(members).await;
    Ok(tokio::spawn(async move {
        let mut last = text;
        loop {
            tokio::time::sleep(interval).await;
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(text) => text,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "replicas file unreadable: keeping the last set");
                    continue;
                }
            };
            if text == last {
                continue;
            }
            match check(parse(&text), &membership) {
                Ok(members) => {
                    tracing::info!(path = %path.display(), replicas = members.len(), "replicas file changed");
                    membership.apply(members).await;
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "bad replicas file: keeping the last set");
                }
            }
            last = text;
        }
    }))
}

/// A prefill replica outside P/D mode is a mistake in the file, not something to skip.
fn check(
    parsed: Result<BTreeSet<Member>, String>,
    membership: &Membership,
) -> Result<BTreeSet<Member>, String> {
    let members = parsed?;
    if !membership.has_prefill()
        && let Some(m) = members.iter().find(|m| m.role == Role::Prefill)
    {
        return Err(format!("prefill replica {} but the router is not in P/D mode", m.name));
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_comments_and_blank_lines() {
        let members = parse(
            "# fleet\n\nhttp://a:1\ndecode http://b:2/  # trailing slash is fine\n  prefill   http://c:3\nreplica http://a:1\n",
        )
        .unwrap();
        let got: Vec<(Role, &str)> = members.iter().map(|m| (m.role, m.name.as_str())).collect();
        assert_eq!(
            got,
            [(Role::Main, "http://a:1"), (Role::Main, "http://b:2"), (Role::Prefill, "http://c:3")]
        );
        assert!(parse("none\n").unwrap().is_empty(), "an empty fleet said explicitly");
        assert!(parse("# all gone\nnone # for now\n").unwrap().is_empty());
    }

    #[test]
    fn a_half_written_or_empty_file_is_not_a_smaller_fleet() {
        assert!(parse("").unwrap_err().contains("none"), "empty: a writer between truncate and write");
        assert!(parse("# only comments\n\n").unwrap_err().contains("none"));
        assert!(
            parse("http://a:1\nhttp://b:2").unwrap_err().contains("incomplete"),
            "cut before the newline"
        );
        assert!(parse("http://a:1\nhttp://b:80").unwrap_err().contains("incomplete"));
        assert!(parse("none\nhttp://a:1\n").unwrap_err().contains("`none` and replicas"));
    }

    #[test]
    fn bad_lines_are_named() {
        assert!(parse("http://a:1\nmiddle http://b:2\n").unwrap_err().starts_with("line 2: role `middle`"));
        assert!(parse("ftp://a:1\n").unwrap_err().starts_with("line 1:"));
        assert!(parse("decode http://a:1 extra\n").unwrap_err().contains("expected `[ROLE] URL`"));
        assert!(parse("http://a:1/v1\n").unwrap_err().contains("no path"));
    }
}
