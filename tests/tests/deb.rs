//! The Debian package (`cargo xtask deb`, which `cargo xtask test` builds and names in
//! `GATEKEEPER_DEB`) installed into a clean Debian root (mmdebstrap, minbase, the host's
//! release): it installs, its sample policy passes `gatekeeper check`, its sample configuration
//! loads, the API's tokens are made random and 0600 for the service user, the configuration and
//! policy are conffiles, a reinstall keeps the tokens and a purge removes what the package made.
//! Needs root (chroot). The root's tarball is cached under target/deb-root/, so only the first run
//! downloads (about a minute); every command has a hard time limit.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

const CONFFILES: &[&str] = &["/etc/gatekeeper/gatekeeper.toml", "/etc/gatekeeper/policy.yaml"];
const TOKENS: &[&str] = &["etc/gatekeeper/admin.token", "etc/gatekeeper/reader.token"];
const MIRROR: &str = "http://deb.debian.org/debian";
/// Directories of test roots, one per test process; a killed run's is removed by the next.
const ROOT_PREFIX: &str = "gatekeeper-deb-test-";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").into()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from)
}

/// Runs `program args..` under `timeout` (killed after `limit`); returns its stdout.
fn sh(limit: Duration, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("timeout")
        .args(["--kill-after=5", &limit.as_secs().to_string(), program])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        let timed_out = if out.status.code() == Some(124) { ", timed out" } else { "" };
        bail!(
            "{program} {args:?} failed ({}{timed_out}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The package to test: `GATEKEEPER_DEB`, else the newest `target/debian/gatekeeper_*.deb`.
fn deb() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("GATEKEEPER_DEB") {
        return Ok(PathBuf::from(p));
    }
    let dir = target_dir().join("debian");
    let newest = fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("gatekeeper_"))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max();
    match newest {
        Some((_, p)) => Ok(p),
        None => bail!("no gatekeeper_*.deb in {}: build it first (`cargo xtask deb`)", dir.display()),
    }
}

/// The host's Debian release: the package's binary is linked against its C library.
fn codename() -> anyhow::Result<String> {
    let release = fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_string())
        .filter(|c| !c.is_empty())
        .context("/etc/os-release has no VERSION_CODENAME: not a Debian release")
}

/// The cached tarball of a minbase root of `codename`, made if missing.
fn root_tarball(codename: &str) -> anyhow::Result<PathBuf> {
    let dir = target_dir().join("deb-root");
    fs::create_dir_all(&dir)?;
    let tarball = dir.join(format!("{codename}-minbase.tar"));
    if tarball.is_file() {
        return Ok(tarball);
    }
    // Written aside and renamed, so that an interrupted download leaves no half a root behind.
    let partial = dir.join(format!("{codename}-minbase.partial.tar"));
    let partial_s = partial.to_str().context("non-UTF-8 target path")?;
    let made = sh(
        Duration::from_secs(300),
        "mmdebstrap",
        &["--variant=minbase", "--format=tar", "--quiet", codename, partial_s, MIRROR],
    );
    if let Err(e) = made {
        let _ = fs::remove_file(&partial);
        return Err(e.context("mmdebstrap (installed by `cargo xtask setup`)"));
    }
    fs::rename(&partial, &tarball)?;
    Ok(tarball)
}

/// A Debian root unpacked for one test, removed on drop (nothing is mounted in it).
struct Root(PathBuf);

impl Root {
    fn unpack(tarball: &Path) -> anyhow::Result<Self> {
        sweep_stale_roots();
        let root = Self(std::env::temp_dir().join(format!("{ROOT_PREFIX}{}", std::process::id())));
        let _ = fs::remove_dir_all(&root.0);
        fs::create_dir_all(&root.0)?;
        sh(Duration::from_secs(120), "tar", &["-xf", path(tarball)?, "-C", root.path()?])?;
        Ok(root)
    }

    fn path(&self) -> anyhow::Result<&str> {
        path(&self.0)
    }

    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p.trim_start_matches('/'))
    }

    fn chroot(&self, args: &[&str]) -> anyhow::Result<String> {
        sh(Duration::from_secs(120), "chroot", &[&[self.path()?], args].concat())
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().with_context(|| format!("non-UTF-8 path {}", p.display()))
}

/// Removes roots left by test processes that no longer run.
fn sweep_stale_roots() {
    for entry in fs::read_dir(std::env::temp_dir()).into_iter().flatten().filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(ROOT_PREFIX)
            && pid.parse::<u32>().is_ok()
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The uid and the passwd line of `user` in `root`.
fn passwd(root: &Root, user: &str) -> Option<(u32, String)> {
    let passwd = fs::read_to_string(root.join("etc/passwd")).ok()?;
    let line = passwd.lines().find(|l| l.split(':').next() == Some(user))?;
    Some((line.split(':').nth(2)?.parse().ok()?, line.to_string()))
}

#[test]
fn the_package_installs_into_a_clean_debian_root() {
    let started = Instant::now();
    let deb = deb().unwrap();
    let tarball = root_tarball(&codename().unwrap()).unwrap();
    let root = Root::unpack(&tarball).unwrap();
    fs::copy(&deb, root.join("tmp/gatekeeper.deb")).unwrap();
    let prepared = started.elapsed();

    root.chroot(&["dpkg", "-i", "/tmp/gatekeeper.deb"]).unwrap();

    // The sample policy passes `gatekeeper check`, run by the installed binary.
    let checked = root.chroot(&["gatekeeper", "check", "/etc/gatekeeper/policy.yaml"]).unwrap();
    assert!(checked.starts_with("/etc/gatekeeper/policy.yaml: OK: 3 assets, 2 segments, 2 rules"), "{checked}");

    // The sample configuration loads and names the tokens the package made.
    let config = gatekeeper::config::Config::load(&root.join("etc/gatekeeper/gatekeeper.toml")).unwrap();
    let api = config.api.expect("the sample configuration serves the API");
    assert_eq!(api.admin_token_file.as_deref(), Some(Path::new("/etc/gatekeeper/admin.token")));
    assert_eq!(api.reader_token_file.as_deref(), Some(Path::new("/etc/gatekeeper/reader.token")));
    assert_eq!(config.policy.file.as_deref(), Some(Path::new("/etc/gatekeeper/policy.yaml")));

    // dpkg holds the configuration and the policy as conffiles (an upgrade keeps edits).
    let listed = root.chroot(&["dpkg-query", "-W", "-f=${Conffiles}", "gatekeeper"]).unwrap();
    let mut conffiles: Vec<&str> = listed.lines().filter_map(|l| l.split_whitespace().next()).collect();
    conffiles.sort_unstable();
    assert_eq!(conffiles, CONFFILES, "{listed}");

    // A system user without a login, owning the state directory and the tokens.
    let (uid, line) = passwd(&root, "gatekeeper").expect("postinst made the gatekeeper user");
    assert!(uid < 1000 && line.ends_with(":/var/lib/gatekeeper:/usr/sbin/nologin"), "{line}");
    let state = fs::metadata(root.join("var/lib/gatekeeper")).unwrap();
    assert_eq!((state.uid(), format!("{:o}", state.permissions().mode() & 0o7777)), (uid, "700".into()));
    let mut tokens = Vec::new();
    for token in TOKENS {
        let meta = fs::metadata(root.join(token)).unwrap();
        assert_eq!(format!("{:o}", meta.permissions().mode() & 0o7777), "600", "{token}");
        assert_eq!(meta.uid(), uid, "{token} belongs to the service user");
        let text = fs::read_to_string(root.join(token)).unwrap();
        let t = text.trim_end().to_string();
        assert!(t.len() == 64 && t.chars().all(|c| c.is_ascii_hexdigit()), "{token}: 32 random bytes in hex");
        tokens.push(t);
    }
    assert_ne!(tokens[0], tokens[1], "the admin and reader tokens differ");

    // The unit is installed, not enabled: the sample ports are placeholders.
    let unit = ["lib/systemd/system/gatekeeper.service", "usr/lib/systemd/system/gatekeeper.service"]
        .iter()
        .find_map(|p| fs::read_to_string(root.join(p)).ok())
        .expect("the systemd unit is installed");
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID") && unit.contains("User=gatekeeper"), "{unit}");
    assert!(!root.join("etc/systemd/system/multi-user.target.wants/gatekeeper.service").exists());

    // A reinstall (as an upgrade) keeps the tokens.
    root.chroot(&["dpkg", "-i", "/tmp/gatekeeper.deb"]).unwrap();
    for (token, before) in TOKENS.iter().zip(&tokens) {
        assert_eq!(fs::read_to_string(root.join(token)).unwrap().trim_end(), before, "{token} kept");
    }

    // Purge removes the binary, the tokens, the state and the user.
    root.chroot(&["dpkg", "--purge", "gatekeeper"]).unwrap();
    for gone in ["usr/bin/gatekeeper", TOKENS[0], TOKENS[1], "var/lib/gatekeeper", CONFFILES[0]] {
        assert!(!root.join(gone).exists(), "{gone} is left after purge");
    }
    assert!(passwd(&root, "gatekeeper").is_none(), "the gatekeeper user is left after purge");
    eprintln!(
        "deb test: {:.1} s ({:.1} s preparing the root, the rest in dpkg and checks)",
        started.elapsed().as_secs_f64(),
        prepared.as_secs_f64()
    );
}
