//! The process's log: `tracing` events to stderr, as text or JSON lines.
//!
//! - `GATEKEEPER_LOG`: the filter (`tracing_subscriber::EnvFilter` directives, default `info`);
//!   one that does not parse is an error, not a silent `info`.
//! - `GATEKEEPER_LOG_FORMAT` (`text` or `json`) beats the configuration's `[log] format`.
//! - ANSI colours only when stderr is a terminal (and `NO_COLOR` is unset).
//! - Under systemd with stderr connected to the journal (`JOURNAL_STREAM` names stderr's device
//!   and inode), text lines carry no timestamp: journald stamps each line itself. JSON lines keep
//!   theirs, since a JSON record is read on its own by whatever ships it.

use std::{io::IsTerminal as _, os::unix::fs::MetadataExt as _};

use tracing_subscriber::{EnvFilter, filter::ParseError};

use crate::config::LogFormat;

pub const FILTER_VAR: &str = "GATEKEEPER_LOG";
pub const FORMAT_VAR: &str = "GATEKEEPER_LOG_FORMAT";
const DEFAULT_FILTER: &str = "info";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{FILTER_VAR}={value:?} is not a log filter")]
    Filter { value: String, source: ParseError },
    #[error("{FORMAT_VAR}={0:?}: expected \"text\" or \"json\"")]
    Format(String),
    #[error("setting up the log")]
    Init(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What stderr is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stderr {
    pub terminal: bool,
    /// Device and inode, to compare with `JOURNAL_STREAM`.
    pub dev_ino: Option<(u64, u64)>,
}

impl Stderr {
    pub fn current() -> Self {
        let stderr = std::io::stderr();
        let dev_ino = std::os::fd::AsFd::as_fd(&stderr)
            .try_clone_to_owned()
            .ok()
            .and_then(|fd| std::fs::File::from(fd).metadata().ok())
            .map(|m| (m.dev(), m.ino()));
        Self { terminal: stderr.is_terminal(), dev_ino }
    }
}

/// How the log is written, chosen from the environment, the configuration and stderr.
#[derive(Debug)]
pub struct Setup {
    pub format: LogFormat,
    pub filter: EnvFilter,
    pub ansi: bool,
    pub timestamps: bool,
}

/// Chooses the log's setup. `env` reads an environment variable (unset or empty: `None`).
pub fn choose(env: impl Fn(&str) -> Option<String>, configured: LogFormat, stderr: Stderr) -> Result<Setup, LogError> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    let directives = var(FILTER_VAR).unwrap_or_else(|| DEFAULT_FILTER.into());
    let filter = EnvFilter::builder()
        .parse(&directives)
        .map_err(|source| LogError::Filter { value: directives.clone(), source })?;
    let format = match var(FORMAT_VAR).as_deref() {
        None => configured,
        Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => return Err(LogError::Format(other.into())),
    };
    // systemd sets JOURNAL_STREAM to "DEV:INODE" of the stream it connected; a child whose
    // stderr was redirected elsewhere inherits the variable, hence the comparison.
    let journal = var("JOURNAL_STREAM")
        .and_then(|v| {
            let (dev, ino) = v.split_once(':')?;
            Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
        })
        .is_some_and(|stream| stderr.dev_ino == Some(stream));
    let ansi = format == LogFormat::Text && stderr.terminal && !journal && var("NO_COLOR").is_none();
    let timestamps = format == LogFormat::Json || !journal;
    Ok(Setup { format, filter, ansi, timestamps })
}

/// Installs the process's subscriber; call once, before anything logs.
pub fn init(configured: LogFormat) -> Result<(), LogError> {
    let setup = choose(|name| std::env::var(name).ok(), configured, Stderr::current())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(setup.filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(setup.ansi);
    let result = match (setup.format, setup.timestamps) {
        (LogFormat::Json, _) => builder.json().try_init(),
        (LogFormat::Text, true) => builder.try_init(),
        (LogFormat::Text, false) => builder.without_time().try_init(),
    };
    result.map_err(LogError::Init)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIPE: Stderr = Stderr { terminal: false, dev_ino: Some((9, 77)) };
    const TERMINAL: Stderr = Stderr { terminal: true, dev_ino: Some((25, 3)) };

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn defaults_to_info_text_with_timestamps() {
        let s = choose(env(&[]), LogFormat::Text, PIPE).unwrap();
        assert_eq!((s.format, s.ansi, s.timestamps), (LogFormat::Text, false, true));
        assert_eq!(s.filter.to_string(), "info");
        // An empty variable, as systemd's `Environment=GATEKEEPER_LOG=` leaves, is unset.
        let s = choose(env(&[(FILTER_VAR, ""), (FORMAT_VAR, "")]), LogFormat::Json, PIPE).unwrap();
        assert_eq!((s.format, s.filter.to_string()), (LogFormat::Json, "info".to_string()));
    }

    #[test]
    fn the_environment_beats_the_configuration() {
        assert_eq!(choose(env(&[]), LogFormat::Json, PIPE).unwrap().format, LogFormat::Json);
        let s = choose(env(&[(FORMAT_VAR, "text")]), LogFormat::Json, PIPE).unwrap();
        assert_eq!(s.format, LogFormat::Text);
        let s = choose(env(&[(FORMAT_VAR, "json")]), LogFormat::Text, PIPE).unwrap();
        assert_eq!(s.format, LogFormat::Json);
        let s = choose(env(&[(FILTER_VAR, "warn,gatekeeper=debug")]), LogFormat::Text, PIPE).unwrap();
        assert_eq!(s.filter.to_string(), "gatekeeper=debug,warn");
    }

    #[test]
    fn colours_only_on_a_terminal() {
        assert!(choose(env(&[]), LogFormat::Text, TERMINAL).unwrap().ansi);
        assert!(!choose(env(&[]), LogFormat::Text, PIPE).unwrap().ansi);
        assert!(!choose(env(&[("NO_COLOR", "1")]), LogFormat::Text, TERMINAL).unwrap().ansi);
        assert!(!choose(env(&[]), LogFormat::Json, TERMINAL).unwrap().ansi);
    }

    #[test]
    fn the_journal_gets_no_colours_and_no_timestamps() {
        let s = choose(env(&[("JOURNAL_STREAM", "9:77")]), LogFormat::Text, PIPE).unwrap();
        assert_eq!((s.ansi, s.timestamps), (false, false));
        // Even if a terminal claimed to be the journal's stream.
        let s = choose(env(&[("JOURNAL_STREAM", "25:3")]), LogFormat::Text, TERMINAL).unwrap();
        assert_eq!((s.ansi, s.timestamps), (false, false));
        // JSON records keep their timestamp.
        assert!(choose(env(&[("JOURNAL_STREAM", "9:77")]), LogFormat::Json, PIPE).unwrap().timestamps);
        // Inherited from a parent whose stderr was the journal, or malformed: not the journal.
        for stream in ["9:78", "9", "x:77", ""] {
            let s = choose(env(&[("JOURNAL_STREAM", stream)]), LogFormat::Text, TERMINAL).unwrap();
            assert_eq!((s.ansi, s.timestamps), (true, true), "JOURNAL_STREAM={stream:?}");
        }
        let unknown = Stderr { terminal: false, dev_ino: None };
        assert!(choose(env(&[("JOURNAL_STREAM", "9:77")]), LogFormat::Text, unknown).unwrap().timestamps);
    }

    #[test]
    fn a_bad_filter_or_format_is_an_error() {
        for bad in ["gatekeeper=loud", "info,[{", "=debug="] {
            let e = choose(env(&[(FILTER_VAR, bad)]), LogFormat::Text, PIPE).unwrap_err();
            assert!(matches!(e, LogError::Filter { .. }), "{bad:?}: {e:?}");
            assert_eq!(e.to_string(), format!("GATEKEEPER_LOG={bad:?} is not a log filter"));
            assert!(std::error::Error::source(&e).is_some(), "the parser's reason is kept");
        }
        let e = choose(env(&[(FORMAT_VAR, "JSON")]), LogFormat::Text, PIPE).unwrap_err();
        assert_eq!(e.to_string(), "GATEKEEPER_LOG_FORMAT=\"JSON\": expected \"text\" or \"json\"");
    }
}
