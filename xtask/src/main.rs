//! `cargo xtask`: every set-up, build, test and demo step of the project.
//!
//! Each command first runs the set-up it needs (idempotent; skipped when already done), so a
//! fresh machine needs nothing but `cargo xtask demo` or `cargo xtask test`.
mod deb;
mod demo;
mod deny;
mod docs;
mod setup;

use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (nightly rust-src, bpf-linker, Debian packages).
    Setup,
    /// Build the daemon with its XDP program.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit, differential (BPF_PROG_TEST_RUN) and lab (real XDP traffic). Needs root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the Debian package (target/debian/gatekeeper_*.deb) with cargo-deb.
    Deb,
    /// Build a lab bridge with OT hosts, enforce a sample policy and show what is allowed and blocked.
    Demo,
    /// Measure per-packet cost, bridge throughput against nftables and policy apply time; writes
    /// bench/results/ and the figures in README.md. Takes several minutes. Needs root.
    Bench {
        /// Compare with an earlier results file (e.g. bench/results/latest.json).
        #[arg(long)]
        compare: Option<String>,
        /// Sections to run: program, bridge, control (default: all).
        #[arg(long)]
        only: Option<String>,
        /// A quick run on tiny sizes (what `cargo xtask test` runs); leaves README.md alone.
        #[arg(long)]
        smoke: bool,
    },
    /// Write the gatekeeper shell completions (bash, zsh, fish, elvish) and man pages.
    Docs {
        /// Directory to write `completions/` and `man/` into.
        #[arg(long, default_value = "target/docs")]
        out: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::all(),
        Cmd::Build { release } => setup::all().and_then(|()| build(release)),
        Cmd::Test { args } => test(&args),
        Cmd::Deb => deb::command(),
        Cmd::Demo => demo::run(),
        Cmd::Bench { compare, only, smoke } => bench(compare, only, smoke),
        Cmd::Docs { out } => docs::run(&out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn step(msg: &str) {
    eprintln!("==> {msg}");
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Into::into).unwrap_or_default()
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (BPF programs, network namespaces); run it as root");
    }
    Ok(())
}

/// Builds the daemon; returns the path of the binary.
pub fn build(release: bool) -> anyhow::Result<()> {
    step(&format!("Building gatekeeper ({}) with its XDP program", if release { "release" } else { "debug" }));
    let mut c = cargo();
    c.args(["build", "-p", "gatekeeper"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

fn test(args: &[String]) -> anyhow::Result<()> {
    require_root("cargo xtask test")?;
    setup::all()?;
    step("Checking formatting (cargo fmt --all --check)");
    if !cargo().args(["fmt", "--all", "--check"]).status().is_ok_and(|s| s.success()) {
        bail!("the code is not formatted: run `cargo fmt --all`");
    }
    let deny_warning = deny::check()?;
    build(false)?;
    // tests/tests/deb.rs installs it into a clean Debian root.
    let deb = deb::build()?;
    step("Running every test (unit, differential against the reference model, lab with real traffic)");
    let deb = deb.to_string_lossy();
    let (mut passed, mut failed, mut ok) = cargo_test(args, &[("GATEKEEPER_DEB", &deb)])?;
    if args.is_empty() {
        // As root the API, TLS and Netskope tests run over the XDP program; run them once more
        // over the in-memory data plane, as they run for a developer without root.
        step("Running the API, CLI, TLS and Netskope tests again over the in-memory data plane (as without root)");
        let control_tests =
            ["-p", "gatekeeper-tests", "--test", "api", "--test", "cli", "--test", "tls", "--test", "netskope"];
        let args: Vec<String> = control_tests.iter().map(ToString::to_string).collect();
        let (p, f, o) = cargo_test(&args, &[("GK_FAKE_DATAPLANE", "1")])?;
        (passed, failed, ok) = (passed + p, failed + f, ok && o);
    }
    println!("tests: {passed} passed, {failed} failed");
    if let Some(w) = deny_warning {
        println!("WARNING: {w}");
    }
    if !ok || failed > 0 {
        bail!("cargo test failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// `cargo test ARGS` with `env`, its output passed through; returns the tests passed and failed
/// (added up over the test binaries) and whether cargo succeeded.
fn cargo_test(args: &[String], env: &[(&str, &str)]) -> anyhow::Result<(u64, u64, bool)> {
    let mut c = cargo();
    c.arg("test").args(args).envs(env.iter().copied()).stdout(std::process::Stdio::piped());
    let mut child = c.spawn().context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| -> u64 {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim().strip_suffix(word).map(|n| {
                                n.trim()
                                    .trim_start_matches("ok.")
                                    .trim_start_matches("FAILED.")
                                    .trim()
                                    .parse()
                                    .unwrap_or(0)
                            })
                        })
                        .unwrap_or(0)
                };
                passed += count("passed");
                failed += count("failed");
            }
        }
    }
    let status = child.wait()?;
    Ok((passed, failed, status.success()))
}

fn bench(compare: Option<String>, only: Option<String>, smoke: bool) -> anyhow::Result<()> {
    require_root("cargo xtask bench")?;
    setup::all()?;
    step("Building the benchmark (release)");
    run(cargo().args(["build", "--release", "-p", "gatekeeper-bench"]))?;
    step("Benchmarking (progress below; figures at the end)");
    let mut c = std::process::Command::new(workspace_root().join("target/release/gatekeeper-bench"));
    c.current_dir(workspace_root());
    if smoke {
        c.arg("--smoke");
    } else {
        c.args(["--readme", "README.md"]);
    }
    if let Some(old) = compare {
        c.args(["--compare", &old]);
    }
    if let Some(only) = only {
        c.args(["--only", &only]);
    }
    run(&mut c)
}
