//! `cargo xtask deb`: the Debian package, built by cargo-deb from `[package.metadata.deb]` in
//! gatekeeper/Cargo.toml (binary, systemd unit, sample configuration and policy, maintainer
//! scripts under packaging/). `tests/tests/deb.rs` installs it into a clean Debian root.

use anyhow::{Context, bail};

use crate::{cargo, step, workspace_root};

/// Builds the release daemon and packages it; returns the path of the `.deb`.
pub fn build() -> anyhow::Result<std::path::PathBuf> {
    crate::build(true)?;
    step("Packaging gatekeeper (cargo deb)");
    let out = cargo()
        .args(["deb", "-p", "gatekeeper", "--no-build", "--fast"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo deb")?;
    if !out.status.success() {
        bail!("cargo deb failed ({})", out.status);
    }
    // cargo-deb prints the path of the package it wrote, last.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(|l| workspace_root().join(l))
        .with_context(|| format!("cargo deb printed no .deb path: {stdout}"))?;
    if !path.is_file() {
        bail!("cargo deb said it wrote {}, which is not a file", path.display());
    }
    eprintln!("{}", path.display());
    Ok(path)
}

/// `cargo xtask deb`.
pub fn command() -> anyhow::Result<()> {
    crate::setup::all()?;
    build().map(drop)
}
