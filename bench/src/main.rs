//! `cargo xtask bench`: gatekeeper's figures, measured side by side in one run.
//!
//! 1. `program`: the XDP program's own cost per packet (BPF_PROG_TEST_RUN, net of an empty
//!    program) by packet kind, family, hot/cold, rule count and asset count.
//! 2. `bridge`: packets per second through a lab bridge with no filter, gatekeeper, and the
//!    nftables equivalents, allowed and denied traffic, by rule count.
//! 3. `control`: compiling and applying a full policy, and one tag change.
//! 4. `api`: tag changes through the REST API: PATCH latency and changes per second.
//!
//! Every section runs interleaved rounds and reports min and median. Results go to
//! `bench/results/` as JSON (and an SVG plot); `--compare OLD.json` prints the change.
mod api;
mod bridge;
mod control;
mod program;
mod report;
mod synth;

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug, Clone)]
#[command(name = "gatekeeper-bench")]
pub struct Args {
    /// A quick run of every section on small sizes (what `cargo xtask test` runs).
    #[arg(long)]
    smoke: bool,
    /// Sections to run (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Compare with an earlier results file.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Rewrite the figures section of this README.
    #[arg(long)]
    readme: Option<PathBuf>,
    /// CPU to pin the benchmark to.
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Measure nothing: report (and with --readme, write the figures) from this results file.
    #[arg(long)]
    from: Option<PathBuf>,
}

/// What a run measures.
#[derive(Debug, Clone)]
pub struct Options {
    pub smoke: bool,
    pub rounds: usize,
    pub rules: Vec<usize>,
    pub assets: Vec<usize>,
    pub bridge_rules: Vec<usize>,
}

impl Options {
    pub fn full() -> Self {
        Self {
            smoke: false,
            rounds: 7,
            rules: vec![10, 1_000, 100_000],
            assets: vec![10, 10_000, 1_000_000],
            bridge_rules: vec![10, 1_000, 10_000],
        }
    }

    pub fn smoke() -> Self {
        Self { smoke: true, rounds: 1, rules: vec![10], assets: vec![10], bridge_rules: vec![10] }
    }

    /// Rounds of the bridge section (each measurement there takes a fraction of a second).
    pub fn bridge_rounds(&self) -> usize {
        if self.smoke { 1 } else { 5 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub date: String,
    pub pinned_cpu: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub smoke: bool,
    pub program: Vec<program::Cell>,
    pub bridge: Vec<bridge::Cell>,
    pub control: Option<control::Control>,
    #[serde(default)]
    pub api: Option<api::Api>,
}

pub fn progress(msg: &str) {
    eprintln!("[bench {}] {msg}", chrono::Local::now().format("%H:%M:%S"));
}

/// (min, median) of a sample.
pub fn stats(xs: &[f64]) -> (f64, f64) {
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
    (v[0], median)
}

fn machine(cpu: usize, cores: usize) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    Machine {
        cpu: model,
        cores,
        kernel,
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        pinned_cpu: cpu,
    }
}

/// Pins this thread (and the threads it starts) to one CPU, so runs are comparable.
fn pin(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<Results> {
    let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
    let cpu = args.cpu.min(cores - 1);
    pin(cpu)?;
    let opts = if args.smoke { Options::smoke() } else { Options::full() };
    let want = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let mut results = Results {
        machine: machine(cpu, cores),
        smoke: args.smoke,
        program: vec![],
        bridge: vec![],
        control: None,
        api: None,
    };
    if want("program") {
        results.program = program::run(&opts)?;
    }
    if want("bridge") {
        results.bridge = bridge::run(&opts)?;
    }
    if want("control") {
        results.control = Some(control::run(&opts)?);
    }
    if want("api") {
        results.api = Some(api::run(&opts)?);
    }
    Ok(results)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let results = match &args.from {
        Some(file) => std::fs::read_to_string(file)
            .map_err(anyhow::Error::from)
            .and_then(|t| serde_json::from_str::<Results>(&t).map_err(anyhow::Error::from)),
        None => run(&args),
    };
    let result =
        results.and_then(|r| if args.from.is_some() { report::render(&r, &args) } else { report::write(&r, &args) });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatekeeper-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
