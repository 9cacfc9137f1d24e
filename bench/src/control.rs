//! Section 3: the control plane: compile and apply a full policy, then one asset's tag change.

use std::time::Instant;

use chrono::Utc;
use gatekeeper::{
    compile::{Compiler, Timeouts},
    dataplane::{BpfDataplane as Dataplane, LoadOptions},
};
use serde::{Deserialize, Serialize};

use crate::{Options, progress, stats, synth};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Control {
    pub assets: usize,
    pub segments: usize,
    pub rules: usize,
    pub full_compile_ms: f64,
    pub full_apply_ms: f64,
    pub full_entries: usize,
    /// One asset moved to another segment, per change: compile, apply up to the epoch flip
    /// (enforced), the whole apply; total = compile + enforced.
    pub change_compile_ms: Vec<f64>,
    pub change_enforce_ms: Vec<f64>,
    pub change_apply_ms: Vec<f64>,
    pub change_total_ms_min: f64,
    pub change_total_ms_median: f64,
    pub change_apply_ms_median: f64,
    pub change_entries: usize,
}

pub fn run(opts: &Options) -> anyhow::Result<Control> {
    let (assets, segments, rules, changes) = if opts.smoke { (1000, 10, 100, 3) } else { (100_000, 1000, 10_000, 9) };
    progress(&format!("control plane: {assets} assets, {segments} segments, {rules} rules"));
    let load = LoadOptions::default();
    let mut dp = Dataplane::load(load.clone())?;
    let mut compiler = Compiler::new(Timeouts::default(), load.capacity());
    let mut policy = synth::policy(assets, segments, rules);
    let t = Instant::now();
    let compiled = compiler.compile(&policy, Utc::now())?;
    let full_compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let report = dp.apply(compiled)?;
    let full_apply_ms = t.elapsed().as_secs_f64() * 1e3;
    progress(&format!(
        "  full policy: compile {full_compile_ms:.0} ms, apply {full_apply_ms:.0} ms ({} entries)",
        report.entries
    ));
    let (mut cc, mut ce, mut ca, mut total, mut entries) = (vec![], vec![], vec![], vec![], 0);
    for i in 0..changes {
        // Isolated edits, as an operator or a SIEM makes them: far enough apart that the grace
        // period of the previous apply has ended (back-to-back edits are the API section's).
        std::thread::sleep(std::time::Duration::from_millis(40));
        // Move asset i to the next segment, as a tag edit would.
        let asset = &mut policy.assets[i];
        let seg: usize = asset.tags["seg"].parse()?;
        asset.tags.insert("seg".into(), ((seg + 1) % segments).to_string());
        let name = policy.assets[i].name.clone();
        let t = Instant::now();
        let delta = compiler.update_assets(&policy, &[name.as_str()], dp.applied(), Utc::now())?;
        let c = t.elapsed().as_secs_f64() * 1e3;
        // The path of an API tag edit: a move between existing identities is written in place.
        let r = dp.apply_moves(delta)?;
        let (e, a) = (r.enforced_after.as_secs_f64() * 1e3, r.total.as_secs_f64() * 1e3);
        entries = r.entries;
        cc.push(c);
        ce.push(e);
        ca.push(a);
        total.push(c + e);
    }
    let (min, median) = stats(&total);
    let (_, apply_median) = stats(&ca);
    progress(&format!("  tag change: enforced after {median:.1} ms median ({entries} entries written)"));
    Ok(Control {
        assets,
        segments,
        rules,
        full_compile_ms,
        full_apply_ms,
        full_entries: report.entries,
        change_compile_ms: cc,
        change_enforce_ms: ce,
        change_apply_ms: ca,
        change_total_ms_min: min,
        change_total_ms_median: median,
        change_apply_ms_median: apply_median,
        change_entries: entries,
    })
}
