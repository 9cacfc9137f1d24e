//! `cargo deny check` (deny.toml): security advisories, licences, duplicate and banned crates,
//! and where crates come from. Part of `cargo xtask test`.
//!
//! The advisory database is a git clone from GitHub that cargo-deny refreshes on every check. It
//! is fetched first on its own. Where GitHub cannot be reached (these build machines reach only
//! the package registries), the other checks still run and the step returns a warning that
//! `cargo xtask test` repeats in its summary: the advisories were NOT checked.
//! `GK_DENY_REQUIRE_ADVISORIES=1` makes that a failure (a release build should set it);
//! `GK_DENY_NO_ADVISORIES=1` skips the fetch.

use anyhow::{Context, bail};

use crate::{cargo, step};

const NO_ADVISORIES: &str = "GK_DENY_NO_ADVISORIES";
const REQUIRE_ADVISORIES: &str = "GK_DENY_REQUIRE_ADVISORIES";

/// Runs the checks; returns a warning to repeat when the advisories could not be checked.
pub fn check() -> anyhow::Result<Option<String>> {
    let flag = |name: &str| std::env::var_os(name).is_some_and(|v| v == "1");
    let mut warning = None;
    let checks: &[&str] = if flag(NO_ADVISORIES) {
        warning = Some(format!("{NO_ADVISORIES}=1: the RustSec advisories were NOT checked"));
        &["bans", "licenses", "sources"]
    } else {
        step("Fetching the RustSec advisory database (cargo deny fetch db; needs github.com)");
        let fetched = cargo()
            .args(["deny", "--log-level", "warn", "fetch", "db"])
            .status()
            .context("running cargo deny fetch")?;
        if fetched.success() {
            &["advisories", "bans", "licenses", "sources"]
        } else if flag(REQUIRE_ADVISORIES) {
            bail!(
                "cargo deny could not fetch the RustSec advisory database ({fetched}) and \
                 {REQUIRE_ADVISORIES}=1: make github.com reachable"
            );
        } else {
            warning = Some(
                "the RustSec advisory database could not be fetched (github.com unreachable): the advisories \
                 were NOT checked; licences, bans and sources were"
                    .to_string(),
            );
            &["bans", "licenses", "sources"]
        }
    };
    if let Some(w) = &warning {
        step(&format!("WARNING: {w}"));
    }
    step(&format!("Checking dependencies (cargo deny check {})", checks.join(" ")));
    let status = cargo()
        .args(["deny", "--log-level", "warn", "--locked", "check", "--hide-inclusion-graph"])
        .args(checks)
        .status()
        .context("running cargo deny check")?;
    if !status.success() {
        bail!("cargo deny check failed ({status}); deny.toml says what is allowed and why");
    }
    Ok(warning)
}
