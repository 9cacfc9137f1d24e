//! Pins in bpffs: where maps and links live so enforcement outlives the daemon, and when a
//! pinned map may be reused.

use std::path::{Path, PathBuf};

use aya::maps::MapData;
use gatekeeper_common::LAYOUT_VERSION;

use super::{DataplaneError, LoadOptions};

/// The maps and what their pinned copies must look like to be reused:
/// (name, BPF map type, key size, value size).
pub(super) const MAPS: [(&str, u32, u32, u32); 12] = [
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

/// Mounts bpffs at `/sys/fs/bpf` when the pin directory lives there and nothing is mounted yet
/// (systemd usually mounts it; minimal systems and VMs may not).
pub(super) fn ensure_bpffs(pin_dir: &Path) -> Result<(), DataplaneError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) {
        return Ok(());
    }
    let c = c"/sys/fs/bpf";
    // SAFETY: statfs into a zeroed struct with a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
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
pub fn remove_pins(pin_dir: &Path) -> std::io::Result<()> {
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)?;
    }
    Ok(())
}
