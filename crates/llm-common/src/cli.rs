//! Command-line helpers the three binaries share: clap errors as one line, exit codes.

use clap::Parser;

/// Parse a binary's command line: `--help` and `--version` print and exit 0, errors
/// print one line and exit 2.
pub fn parse_args<T: Parser>() -> Result<T, std::process::ExitCode> {
    T::try_parse().map_err(|e| {
        if e.use_stderr() {
            eprintln!("{}", one_line_error(&e));
            std::process::ExitCode::from(2)
        } else {
            let _ = e.print();
            std::process::ExitCode::SUCCESS
        }
    })
}

/// Clap's error as one line: its first line, the lines it introduces with a colon
/// (such as missing arguments), and the accepted values when it lists them.
pub fn one_line_error(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let mut lines = rendered.lines().map(str::trim);
    let mut line = lines.next().unwrap_or("error: invalid arguments").to_owned();
    if line.ends_with(':') {
        for detail in lines.by_ref().take_while(|l| !l.is_empty()) {
            line.push(' ');
            line.push_str(detail);
        }
    }
    if let Some(values) = lines.find(|l| l.starts_with("[possible values:")) {
        line.push(' ');
        line.push_str(values);
    }
    line
}
