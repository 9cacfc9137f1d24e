//! Pins in bpffs: where maps and links live so enforcement outlives the daemon (and a refusal when
//! they would not), the lock that keeps a second daemon off them, and when a pinned map may be
//! reused.

use std::{
    fs::File,
    os::{
        fd::AsRawFd as _,
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _, fs::OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use aya::maps::MapData;
use gatekeeper_common::LAYOUT_VERSION;

use super::{DataplaneError, LoadOptions, io_err};

/// The maps and what their pinned copies must look like to be reused:
/// (name, BPF map type, key size, value size).
pub(super) const MAPS: [(&str, u32, u32, u32); 13] = [
    ("GK_EPOCH", 2, 4, 4),
    ("GK_GEN_CONFIG", 2, 4, 32),
    ("GK_HOSTS_V4", 1, 8, 8),
    ("GK_HOSTS_V6", 1, 20, 8),
    ("GK_IDS_V4", 11, 12, 8),
    ("GK_IDS_V6", 11, 24, 8),
    ("GK_PORT_CLASS", 2, 4, 4),
    ("GK_POLICY", 1, 16, 8),
    ("GK_FLOWS_V4", 9, 16, 16),
    ("GK_FLOWS_V6", 9, 40, 16),
    ("GK_STATS", 6, 4, 16),
    ("GK_RULE_STATS", 6, 4, 16),
    ("GK_ID_DROPS", 10, 4, 16),
];

impl LoadOptions {
    pub(super) fn max_entries(&self, map: &str) -> Option<u32> {
        Some(match map {
            "GK_FLOWS_V4" | "GK_FLOWS_V6" => self.flow_table_size,
            "GK_HOSTS_V4" | "GK_HOSTS_V6" => self.host_entries,
            "GK_IDS_V4" | "GK_IDS_V6" => self.prefix_entries,
            "GK_POLICY" => self.policy_entries,
            "GK_RULE_STATS" => self.rule_slots,
            _ => return None,
        })
    }
}

/// A mount from a `mountinfo` table.
struct Mount {
    id: u64,
    /// The superblock's device (major, minor): the same for every mount of one bpffs instance.
    dev: (u32, u32),
    point: String,
    fstype: String,
}

fn mountinfo(path: &str) -> std::io::Result<Vec<Mount>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let (major, minor) = f.get(2)?.split_once(':')?;
            Some(Mount {
                id: f.first()?.parse().ok()?,
                dev: (major.parse().ok()?, minor.parse().ok()?),
                point: f.get(4)?.replace("\\040", " "),
                fstype: f.get(sep + 1)?.to_string(),
            })
        })
        .collect())
}

/// The id of the mount `path` is on (`statx`, Linux 5.8+).
fn mount_id(path: &Path) -> std::io::Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statx into a zeroed struct with a NUL-terminated path.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r =
        unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), libc::AT_STATX_SYNC_AS_STAT, libc::STATX_MNT_ID, &mut stx) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(std::io::Error::other("statx gave no mount id (Linux 5.8 or later is needed)"));
    }
    Ok(stx.stx_mnt_id)
}

/// Whether this process shares PID 1's mount namespace (`None`: cannot tell).
fn same_mount_ns_as_init() -> Option<bool> {
    let ns = |p: &str| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    Some(ns("/proc/self/ns/mnt")? == ns("/proc/1/ns/mnt")?)
}

/// The refusal when pins would not outlive the daemon: why, and how to fix it.
fn not_persistent(pin_dir: &Path, why: &str) -> DataplaneError {
    DataplaneError::Io {
        what: format!("refusing to pin under {}", pin_dir.display()),
        source: std::io::Error::other(format!(
            "{why}, so the pins, and with them every XDP program, would vanish when this daemon stops or \
             crashes: the network would fall open. `ip netns exec` does this (it gives the process a private \
             mount namespace with a fresh /sys). Start the daemon with `nsenter --net=/run/netns/NAME gatekeeper \
             run ...` instead (it switches only the network namespace), or mount a bpffs outside /sys in the \
             host's mount namespace (`mkdir -p /run/gatekeeper/bpffs && mount -t bpf bpf /run/gatekeeper/bpffs`) \
             and set [dataplane] pin_dir under it, or set [dataplane] ephemeral = true to enforce only while the \
             daemon runs"
        )),
    }
}

/// Makes sure the pins under `pin_dir` will outlive this process: `pin_dir` must be in a bpffs
/// that is also mounted in PID 1's mount namespace. Mounts bpffs at `/sys/fs/bpf` when the pin
/// directory lives there, nothing is mounted yet (systemd usually mounts it; minimal systems and
/// VMs may not) and this process shares PID 1's mount namespace. A process in a private mount
/// namespace (`ip netns exec`, some containers) is refused: a bpffs only it sees dies with it.
pub(super) fn ensure_persistent_bpffs(pin_dir: &Path) -> Result<(), DataplaneError> {
    let existing = pin_dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    let own = mountinfo("/proc/self/mountinfo").map_err(io_err("reading /proc/self/mountinfo"))?;
    // PID 1's mounts: the namespace that lives as long as the system (or the container).
    let init = mountinfo("/proc/1/mountinfo").ok().filter(|m| !m.is_empty());
    let id = mount_id(existing).map_err(io_err(format!("finding the mount of {}", existing.display())))?;
    let Some(mount) = own.iter().find(|m| m.id == id) else {
        return Err(DataplaneError::Io {
            what: format!("finding the mount of {}", existing.display()),
            source: std::io::Error::other(format!("mount {id} is not in /proc/self/mountinfo")),
        });
    };
    let unverified = |what: &str| {
        tracing::warn!(
            pin_dir = %pin_dir.display(),
            "cannot verify that the pins outlive this process (PID 1's mount table is unreadable); {what}"
        );
    };
    if mount.fstype == "bpf" {
        let shared = match &init {
            Some(init) => Some(init.iter().any(|m| m.fstype == "bpf" && m.dev == mount.dev)),
            None => same_mount_ns_as_init().filter(|same| *same),
        };
        return match shared {
            Some(true) => Ok(()),
            Some(false) => Err(not_persistent(
                pin_dir,
                &format!(
                    "the bpffs mounted at {} exists only in this process's mount namespace, not in PID 1's",
                    mount.point
                ),
            )),
            None => {
                unverified("pinning anyway");
                Ok(())
            }
        };
    }
    let root = Path::new("/sys/fs/bpf");
    if !(pin_dir.starts_with(root) && root.starts_with(existing)) {
        return Err(DataplaneError::Io {
            what: format!("pin_dir {}", pin_dir.display()),
            source: std::io::Error::other(format!(
                "not in a bpffs ({} is on {} mounted at {}); mount one (`mount -t bpf bpf DIR`) or choose a \
                 directory under /sys/fs/bpf",
                existing.display(),
                mount.fstype,
                mount.point
            )),
        });
    }
    // Nothing is mounted at /sys/fs/bpf here: a bpffs mounted now outlives us only if this is
    // PID 1's mount namespace (the mount `existing` is on is one of PID 1's).
    let in_init_ns = match &init {
        Some(init) => Some(init.iter().any(|m| m.id == id)),
        None => same_mount_ns_as_init(),
    };
    match in_init_ns {
        Some(true) => {}
        Some(false) => {
            return Err(not_persistent(
                pin_dir,
                "this process runs in a private mount namespace (not PID 1's) where no bpffs is mounted at \
                 /sys/fs/bpf; a bpffs mounted here would exist only in this namespace",
            ));
        }
        None => unverified("mounting bpffs at /sys/fs/bpf anyway"),
    }
    let c = c"/sys/fs/bpf";
    // SAFETY: mount with NUL-terminated strings and no data.
    let r = unsafe { libc::mount(c"bpf".as_ptr(), c.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(DataplaneError::Io {
            what: "mounting bpffs at /sys/fs/bpf".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Directories this process holds the lock of, by (device, inode).
static HELD: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

fn held() -> std::sync::MutexGuard<'static, Vec<(u64, u64)>> {
    HELD.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An exclusive `flock` on the pin directory itself (bpffs holds no regular files, so there is
/// no lock file): held while a daemon uses the pins, released when it exits, however it exits.
/// `/proc/locks` names the holder's pid.
pub(super) struct PinLock {
    _dir: File,
    key: (u64, u64),
}

impl Drop for PinLock {
    fn drop(&mut self) {
        let mut held = held();
        if let Some(i) = held.iter().position(|k| *k == self.key) {
            held.swap_remove(i);
        }
    }
}

enum Locked {
    Ours(PinLock),
    /// Another process holds it: its pid when `/proc/locks` shows it.
    Busy(Option<u32>),
}

fn try_lock(dir: &Path, create: bool) -> std::io::Result<Locked> {
    // A concurrent `detach` may remove the directory between open and flock: the lock must be
    // on the directory the path names once it is held.
    for _ in 0..8 {
        if create {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(dir)?;
        let meta = file.metadata()?;
        let key = (meta.dev(), meta.ino());
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(Locked::Busy(lock_holder(key)));
            }
            return Err(e);
        }
        match std::fs::metadata(dir) {
            Ok(now) if (now.dev(), now.ino()) == key => {
                held().push(key);
                return Ok(Locked::Ours(PinLock { _dir: file, key }));
            }
            Err(e) if !create || e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => continue,
        }
    }
    Err(std::io::Error::other("the directory kept being replaced while it was being locked"))
}

/// The pid holding a `flock` on the file `(dev, ino)`, from `/proc/locks`.
fn lock_holder((dev, ino): (u64, u64)) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str())).then(|| f.get(4)?.parse().ok()).flatten()
    })
}

/// `pid 1234 (gatekeeper run --config ...)`, or what is known of the holder.
fn describe_holder(pid: Option<u32>) -> String {
    let Some(pid) = pid else { return "a process whose pid is not visible here".into() };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline)
        .split(['\0', ' ', '\n', '\t'])
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let cmdline: String = cmdline.chars().take(200).collect();
    if cmdline.is_empty() { format!("pid {pid}") } else { format!("pid {pid} ({cmdline})") }
}

/// Takes the exclusive lock on `pin_dir` (creating it), before any pin is read or replaced. A
/// second daemon on the same directory is refused, naming the first one's pid.
pub(super) fn lock_pin_dir(pin_dir: &Path) -> Result<PinLock, DataplaneError> {
    match try_lock(pin_dir, true).map_err(io_err(format!(
        "locking {} (is a bpffs mounted there? `mount -t bpf bpf /sys/fs/bpf`)",
        pin_dir.display()
    )))? {
        Locked::Ours(lock) => Ok(lock),
        Locked::Busy(pid) => Err(DataplaneError::Io {
            what: format!("pin_dir {}", pin_dir.display()),
            source: std::io::Error::other(format!(
                "locked by {}, another daemon; refusing to start: two daemons on one pin_dir would take each \
                 other's XDP links over. Stop that daemon first, or give this one its own pin_dir (and interfaces)",
                describe_holder(pid)
            )),
        }),
    }
}
/// `<pin_dir>/v<LAYOUT_VERSION>`.
pub fn pin_version_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{LAYOUT_VERSION}"))
}

/// Whether the map pinned at `path` can be reused as `name`.
pub(super) fn compatible(path: &Path, name: &str, options: &LoadOptions) -> bool {
    let Some(&(_, ty, key, value)) = MAPS.iter().find(|m| m.0 == name) else { return false };
    let Ok(info) = MapData::from_pin(path).and_then(|m| m.info()) else { return false };
    let max_ok = options.max_entries(name).is_none_or(|n| info.max_entries() == n.max(1));
    info.key_size() == key && info.value_size() == value && max_ok && info.map_type().is_ok_and(|t| t as u32 == ty)
}

/// Removes every pin under `pin_dir` (all layout versions). Pinned links whose daemon has
/// exited are released with their pin, which detaches the program; maps go with their last user.
/// Refused while another process (a running daemon) holds the pin directory's lock: the daemon
/// would keep reporting a policy nobody enforces. The daemon holding it removes its own pins
/// (`detach_on_exit`).
pub fn remove_pins(pin_dir: &Path) -> std::io::Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    let meta = std::fs::metadata(pin_dir)?;
    let _lock = if held().contains(&(meta.dev(), meta.ino())) {
        None
    } else {
        match try_lock(pin_dir, false)? {
            Locked::Ours(lock) => Some(lock),
            Locked::Busy(pid) => {
                return Err(std::io::Error::other(format!(
                    "locked by {}, a running daemon; stop it first (SIGTERM keeps the \
                     enforcement pinned, then detach), or stop it with `detach_on_exit`",
                    describe_holder(pid)
                )));
            }
        }
    };
    std::fs::remove_dir_all(pin_dir)
}
