//! The Python tools some tests drive gatekeeper with (`openapi-spec-validator`,
//! `schemathesis`), in a virtual environment under `target/` that the first test needing it
//! creates from `tests/python/requirements.txt`: a fresh machine needs nothing installed by
//! hand, and the tools' versions are the pinned ones.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

/// Serializes creation between the tests of one binary; a lock file between binaries.
static CREATING: Mutex<()> = Mutex::new(());

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The venv's `bin/` directory, created (and the pinned tools installed) if missing or if the
/// requirements changed. Panics with the installer's output if it cannot be made: a test that
/// needs the tools fails, it is never skipped.
pub fn venv_bin() -> PathBuf {
    let _guard = CREATING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let requirements = workspace().join("tests/python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("tests/python/requirements.txt");
    let dir = workspace().join("target/gk-venv");
    let stamp = dir.join("requirements.installed");
    let bin = dir.join("bin");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return bin;
    }
    std::fs::create_dir_all(&dir).expect("target/gk-venv");
    // Another test binary may be creating it at the same moment: flock the directory.
    let lock = std::fs::File::create(workspace().join("target/gk-venv.lock")).expect("venv lock file");
    // SAFETY: flock on a file descriptor we own; released when `lock` is dropped.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return bin;
    }
    eprintln!("creating the test venv {} (pip install -r {})", dir.display(), requirements.display());
    run(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&dir));
    run(Command::new(bin.join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements));
    std::fs::write(&stamp, wanted).expect("venv stamp");
    bin
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
