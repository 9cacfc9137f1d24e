//! Builds the XDP program (`gatekeeper-ebpf`) with the nightly toolchain and bpf-linker, so a
//! plain `cargo build` produces a daemon with its data plane embedded.
//! `cargo xtask` installs the nightly `rust-src` and bpf-linker this needs.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
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

/// aya-build forwards every stderr line of its nested `cargo build` as a `cargo:warning`, so each
/// fresh build printed some 40 "Compiling ..." lines. The nested cargo inherits this process's
/// environment: quiet mode drops its progress lines, while rustc's diagnostics still arrive (as JSON
/// on stdout, which aya-build also forwards) and so do cargo's own errors.
fn quiet_nested_cargo() {
    // SAFETY: a build script is single-threaded here; aya-build starts its threads later.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
}
