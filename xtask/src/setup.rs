//! Idempotent set-up of everything the build and the tests need.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::{run, step};

/// Debian packages the lab and tests use.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip and bridge, for the lab's namespaces, veths and bridge"),
    ("iputils-ping", "ping, for ICMP checks"),
    ("nftables", "nft, the baseline the benchmark compares against"),
    ("procps", "sysctl, for the benchmark lab"),
    ("ca-certificates", "the system's roots, which the Netskope client trusts for HTTPS"),
    ("dpkg-dev", "dpkg-shlibdeps, with which cargo-deb finds the package's library dependencies"),
    ("mmdebstrap", "a clean Debian root, into which the package test installs the .deb"),
];

/// Cargo tools installed with `cargo install --locked`, as (crate, version, why); each of these
/// versions builds on the project's rustc (1.95).
const CARGO_TOOLS: &[(&str, &str, &str)] = &[
    ("cargo-deny", "0.20.2", "advisories, licences, duplicate and source checks in `cargo xtask test`"),
    ("cargo-deb", "3.8.0", "`cargo xtask deb` and the package test"),
];

pub fn all() -> anyhow::Result<()> {
    rustfmt()?;
    nightly_rust_src()?;
    bpf_linker()?;
    packages()?;
    cargo_tools()?;
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rustfmt() -> anyhow::Result<()> {
    if output(Command::new("cargo").args(["fmt", "--version"])).is_none() {
        step("Adding rustfmt (the tests check formatting)");
        run(Command::new("rustup").args(["component", "add", "rustfmt"]))?;
    }
    Ok(())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    if output(Command::new("rustup").arg("--version")).is_none() {
        bail!("rustup is not installed; gatekeeper's XDP program needs a rustup-managed nightly toolchain");
    }
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("Installing the nightly Rust toolchain (the XDP program needs -Z build-std)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let installed = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        step("Adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    // bpf-linker loads the nightly's libLLVM; rustup puts it on the library path.
    if output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])).is_some() {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot failed")?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}: the nightly toolchain ships none", lib.display()))?;
    let major: String = llvm["libLLVM.so.".len()..].chars().take_while(char::is_ascii_digit).collect();
    if major.is_empty() {
        bail!("cannot tell the LLVM version of {llvm}");
    }
    step(&format!("Building bpf-linker against the nightly's LLVM {major} (about a minute)"));
    // A prefix whose lib/ holds libLLVM.so, as llvm-sys expects; it stays, since bpf-linker's
    // run path points at it.
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = home.join("gatekeeper-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".to_string(), llvm.clone()] {
        let link = prefix_lib.join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link).with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", "^0.13", "--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))?;
    if output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])).is_none() {
        bail!("bpf-linker was installed but does not run");
    }
    Ok(())
}

/// Installs each of [`CARGO_TOOLS`] that is missing or at another version.
fn cargo_tools() -> anyhow::Result<()> {
    for (krate, version, why) in CARGO_TOOLS {
        let subcommand = krate.trim_start_matches("cargo-");
        // Both print `<name> <version>` (cargo-deb: `cargo-deb 3.8.0`, cargo-deny: `cargo-deny 0.20.2`).
        let found = output(Command::new("cargo").args([subcommand, "--version"])).unwrap_or_default();
        if found.split_whitespace().nth(1) == Some(*version) {
            continue;
        }
        step(&format!("Installing {krate} {version} ({why}; a few minutes)"));
        run(Command::new("cargo").args(["install", "--locked", krate, "--version", version]))?;
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&(&str, &str)> = PACKAGES.iter().filter(|(p, _)| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
    for (p, why) in &missing {
        step(&format!("Installing Debian package {p} ({why})"));
    }
    crate::require_root(&format!("installing {}", names.join(" ")))?;
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&names)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
