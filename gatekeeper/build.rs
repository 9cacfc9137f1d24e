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
    aya_build::build_ebpf(
        [aya_build::Package { name: "gatekeeper-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the XDP program (run `cargo xtask setup` if nightly rust-src or bpf-linker is missing)")
}
