//! Builds the XDP program (`gatekeeper-ebpf`) with the nightly toolchain and bpf-linker, so a
//! plain `cargo build` produces a daemon with its data plane embedded.
//! `cargo xtask` installs the nightly `rust-src` and bpf-linker this needs.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    git_revision();
    // Without the `xdp` feature (only `cargo xtask`, see Cargo.toml) nothing is embedded.
    if std::env::var_os("CARGO_FEATURE_XDP").is_none() {
        return Ok(());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("gatekeeper crate has no parent directory")?
        .join("gatekeeper-ebpf");
    let root = root.to_str().context("non-UTF-8 path to gatekeeper-ebpf")?;
    println!("cargo:rerun-if-changed={root}/src");
    println!("cargo:rerun-if-changed={root}/../gatekeeper-common/src");
    quiet_nested_cargo();
    aya_build::build_ebpf(
        [aya_build::Package { name: "gatekeeper-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the XDP program (run `cargo xtask setup` if nightly rust-src or bpf-linker is missing)")
}

/// `GK_GIT_REV` for `gatekeeper --version`: the short commit built, or "unknown" outside git.
fn git_revision() {
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    let rev = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=GK_GIT_REV={rev}");
    // Rerun on a new commit: it moves HEAD itself (detached) or the branch HEAD names (a loose
    // ref, or one in packed-refs). Only existing files: cargo reruns on every build for a missing one.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD".to_string(), "packed-refs".to_string()].into_iter().chain(branch) {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]).filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

/// aya-build forwards every stderr line of its nested `cargo build` as a `cargo:warning`, so each
/// fresh build printed some 40 "Compiling ..." lines. The nested cargo inherits this process's
/// environment: quiet mode drops its progress lines, while rustc's diagnostics still arrive (as JSON
/// on stdout, which aya-build also forwards) and so do cargo's own errors.
fn quiet_nested_cargo() {
    // SAFETY: a build script is single-threaded here; aya-build starts its threads later.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
}
