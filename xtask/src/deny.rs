//! `cargo deny check` (deny.toml): security advisories, licences, duplicate and banned crates,
//! and where crates come from. Part of `cargo xtask test`.
//!
//! The advisory database is a git clone from GitHub that cargo-deny refreshes on every check. It
//! is fetched first on its own, so that a network failure fails the step saying so. On a machine
//! that cannot reach GitHub, `GK_DENY_NO_ADVISORIES=1` runs the other checks and says loudly
//! that the advisories were not checked.

use anyhow::{Context, bail};

use crate::{cargo, step};

const NO_ADVISORIES: &str = "GK_DENY_NO_ADVISORIES";

pub fn check() -> anyhow::Result<()> {
    let skip_advisories = std::env::var_os(NO_ADVISORIES).is_some_and(|v| v == "1");
    let checks: &[&str] = if skip_advisories {
        step(&format!("WARNING: {NO_ADVISORIES}=1: the RustSec advisories are NOT checked"));
        &["bans", "licenses", "sources"]
    } else {
        step("Fetching the RustSec advisory database (cargo deny fetch db; needs github.com)");
        let fetched = cargo()
            .args(["deny", "--log-level", "warn", "fetch", "db"])
            .status()
            .context("running cargo deny fetch")?;
        if !fetched.success() {
            bail!(
                "cargo deny could not fetch the RustSec advisory database ({fetched}), so the advisories \
                 cannot be checked: make github.com reachable, or set {NO_ADVISORIES}=1 to check \
                 everything else without them"
            );
        }
        &["advisories", "bans", "licenses", "sources"]
    };
    step(&format!("Checking dependencies (cargo deny check {})", checks.join(" ")));
    let status = cargo()
        .args(["deny", "--log-level", "warn", "--locked", "check", "--hide-inclusion-graph"])
        .args(checks)
        .status()
        .context("running cargo deny check")?;
    if !status.success() {
        bail!("cargo deny check failed ({status}); deny.toml says what is allowed and why");
    }
    Ok(())
}
