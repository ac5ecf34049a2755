//! `docs/cli.md` is `router --help`, written by this test so that it cannot drift from
//! the flags: it fails when the two differ. After changing a flag, regenerate it with
//! `UPDATE_CLI_REFERENCE=1 cargo test --test cli_reference`.

use std::path::Path;
use std::process::Command;

const HEADER: &str = "# Command-line reference\n\n\
Generated from `router --help` by `tests/cli_reference.rs`; do not edit by hand \
(`UPDATE_CLI_REFERENCE=1 cargo test --test cli_reference` rewrites it). Flags are \
grouped by the subsystem that owns them (`src/config/`).\n\n";

fn reference() -> String {
    let out =
        Command::new(env!("CARGO_BIN_EXE_router")).arg("--help").env("COLUMNS", "100").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let help: Vec<&str> = help.lines().map(str::trim_end).collect();
    format!("{HEADER}```text\n{}\n```\n", help.join("\n").trim_end())
}

#[test]
fn docs_cli_md_is_router_help() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/cli.md");
    let expected = reference();
    if std::env::var_os("UPDATE_CLI_REFERENCE").is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        written == expected,
        "docs/cli.md differs from `router --help`: run UPDATE_CLI_REFERENCE=1 cargo test --test cli_reference"
    );
}

#[test]
fn help_is_in_sections_by_subsystem() {
    let help = reference();
    let headings: Vec<&str> = help
        .lines()
        .filter(|l| !l.starts_with(' ') && l.ends_with(':'))
        .map(|l| l.trim_end_matches(':'))
        .collect();
    for section in [
        "Serving",
        "Fleet",
        "Policy",
        "KV events (kv-aware)",
        "Resilience",
        "Admission",
        "Discovery",
        "Telemetry",
    ] {
        assert!(headings.contains(&section), "no {section} section in router --help: {headings:?}");
    }
    // Every flag sits in a section: none is left under the generic "Options".
    let options = help.split("\nOptions:\n").nth(1).unwrap().split("\nServing:\n").next().unwrap();
    let stray: Vec<&str> = options
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("--") && !l.starts_with("--help") && !l.starts_with("--version"))
        .collect();
    assert!(stray.is_empty(), "flags outside any section: {stray:?}");
}
