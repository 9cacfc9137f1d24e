//! The `gatekeeper` binary: the daemon and its command-line tools.
use std::{path::PathBuf, process::ExitCode};

use chrono::Utc;
use clap::{Parser, Subcommand};
use gatekeeper::{
    compile::{Capacity, Compiler, Timeouts},
    config::Config,
    policy,
};

#[derive(Parser)]
#[command(name = "gatekeeper", version, about = "Agentless microsegmentation gatekeeper for OT networks")]
struct Cli {
    #[command(flatten)]
    connection: gatekeeper::cli::Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to the bridge ports and enforce the policy (SIGHUP reloads; SIGTERM stops, enforcement stays).
    Run {
        #[arg(long, short, default_value = "/etc/gatekeeper/gatekeeper.toml")]
        config: PathBuf,
        /// Detach from the interfaces and remove the pins on exit (default: enforcement stays).
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Remove gatekeeper's programs, links and pins (for maintenance; stop the daemon first).
    Detach {
        #[arg(long, short, default_value = "/etc/gatekeeper/gatekeeper.toml")]
        config: PathBuf,
        /// The pin directory, instead of reading it from the configuration.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Validate a policy file without touching the data plane.
    Check { file: PathBuf },
    #[command(flatten)]
    Client(gatekeeper::cli::ClientCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` sets up its log once it has read the configuration, which may choose the format.
    if !matches!(cli.command, Command::Run { .. })
        && let Err(e) = gatekeeper::logging::init(gatekeeper::config::LogFormat::Text)
    {
        eprintln!("error: {:#}", anyhow::Error::from(e));
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Client(cmd) => return gatekeeper::cli::run(&cli.connection, cmd),
        Command::Run { config, detach_on_exit } => run(config, detach_on_exit),
        Command::Detach { config, pin_dir } => detach(config, pin_dir),
        Command::Check { file } => check(file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
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
    println!("removed gatekeeper's pins under {}; programs whose daemon has exited are detached", dir.display());
    Ok(())
}

fn check(file: PathBuf) -> anyhow::Result<()> {
    let policy = match policy::read_file(&file) {
        Ok((_, p)) => p,
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
    println!(
        "{}: OK: {} assets, {} segments, {} rules ({} expired); {} prefixes, {} identities, {} policy entries",
        file.display(),
        policy.assets.len(),
        policy.segments.len(),
        policy.rules.len(),
        policy.rules.len() - live,
        compiled.v4.len() + compiled.v6.len(),
        compiled.identities.len(),
        compiled.policy.len(),
    );
    Ok(())
}
