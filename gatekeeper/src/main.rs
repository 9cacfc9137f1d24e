//! The `gatekeeper` binary: the daemon and its command-line tools.
use std::{path::PathBuf, process::ExitCode};

use chrono::Utc;
use gatekeeper::{
    cli::{Command, write_stderr, write_stdout},
    compile::{Capacity, Compiler, Timeouts},
    config::Config,
    policy,
};

fn main() -> ExitCode {
    // The parser is the library's, so that `cargo xtask docs` generates completions from it.
    let parsed = gatekeeper::cli::parse();
    // `run` sets up its log once it has read the configuration, which may choose the format.
    if !matches!(parsed.command, Command::Run { .. })
        && let Err(e) = gatekeeper::logging::init(gatekeeper::config::LogFormat::Text)
    {
        eprintln!("error: {:#}", anyhow::Error::from(e));
        return ExitCode::FAILURE;
    }
    let result = match (parsed.command, parsed.connection) {
        (Command::Client(cmd), Some(connection)) => return gatekeeper::cli::run(&connection, cmd),
        (Command::Client(_), None) => Err(anyhow::anyhow!("internal: a client command without its connection")),
        (Command::Run { config, detach_on_exit }, _) => run(config, detach_on_exit),
        (Command::Detach { config, pin_dir }, _) => detach(config, pin_dir),
        (Command::Check { file }, _) => check(file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            write_stderr(&format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

fn run(config: PathBuf, detach_on_exit: bool) -> anyhow::Result<()> {
    let mut config = Config::load(&config)?;
    gatekeeper::logging::init(config.log.format)?;
    config.dataplane.detach_on_exit |= detach_on_exit;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(gatekeeper::daemon::run(config))
}

fn detach(config: PathBuf, pin_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = match pin_dir {
        Some(d) => d,
        None => Config::load(&config)?.dataplane.pin_dir,
    };
    gatekeeper::dataplane::remove_pins(&dir).map_err(|e| anyhow::anyhow!("removing {}: {e}", dir.display()))?;
    write_stdout(&format!(
        "removed gatekeeper's pins under {}; programs whose daemon has exited are detached",
        dir.display()
    ))?;
    Ok(())
}

/// Reads and validates the policy at `file` (`-`: standard input).
fn read_policy(file: &std::path::Path) -> Result<policy::Policy, policy::PolicyError> {
    if file.as_os_str() != "-" {
        return policy::read_file(file).map(|(_, p)| p);
    }
    const NAME: &str = "<stdin>";
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .map_err(|error| policy::PolicyError::Read { source_name: NAME.into(), error })?;
    policy::PolicyDocument::from_yaml(&text, NAME)?.validate(NAME)
}

fn check(file: PathBuf) -> anyhow::Result<()> {
    let policy = match read_policy(&file) {
        Ok(p) => p,
        // One problem per line: a file can have many.
        Err(policy::PolicyError::Invalid { source_name, problems }) => {
            anyhow::bail!(
                "{source_name}: {} problem(s):\n  {}",
                problems.len(),
                problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  ")
            )
        }
        Err(e) => return Err(e.into()),
    };
    let compiled = Compiler::new(Timeouts::default(), Capacity::default()).compile(&policy, Utc::now())?;
    let live = policy.rules.iter().filter(|r| r.live(Utc::now())).count();
    let name = if file.as_os_str() == "-" { "<stdin>".into() } else { file.display().to_string() };
    write_stdout(&format!(
        "{name}: OK: {} assets, {} segments, {} rules ({} expired); {} prefixes, {} identities, {} policy entries",
        policy.assets.len(),
        policy.segments.len(),
        policy.rules.len(),
        policy.rules.len() - live,
        compiled.v4.len() + compiled.v6.len(),
        compiled.identities.len(),
        compiled.policy.len(),
    ))?;
    Ok(())
}
