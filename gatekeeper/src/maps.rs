//! The data plane from user space: load the XDP program, attach it, write compiled policies into
//! its maps atomically, and read its counters.
//!
//! # Atomic apply
//! Policy maps hold four generations; the program uses `epoch % 4`, read once per packet. An
//! apply brings the next generation up to date (the deltas it missed, then the new one), flips
//! the epoch with one 4-byte store, and returns: packets see the old policy or the new one, never
//! a mix, and a change touching a few assets writes a few entries. The generation written next
//! was retired three flips earlier; before touching it the apply makes sure an RCU grace period
//! begun after that retirement has passed (a background thread runs `membarrier(GLOBAL)`, which
//! is `synchronize_rcu()`, after every flip), so no packet is still reading it; the wait is off
//! the request path unless applies come faster than grace periods end. The epoch also tags every
//! flow, so established flows are judged again under the new policy on their next packet. If a
//! write fails, the epoch never moves and that generation is rebuilt in full next time.
//!
//! Tag changes that only move host addresses between existing identities are written into the
//! generation in force instead ([`Dataplane::apply_in_place`]): one atomic replacement per
//! address, and the epoch moves by [`GENERATIONS`] so flows are judged again; no grace period.
//!
//! # Pinning: restarts without a gap
//! With a pin directory, the maps and the XDP links are pinned in bpffs under
//! `<pin_dir>/v<LAYOUT_VERSION>/{maps,links}`. The program keeps enforcing when the daemon stops,
//! crashes or is upgraded. A starting daemon reuses compatible pinned maps (flows included),
//! writes its policy into the generation the running program does not use, flips the epoch, and
//! swaps its own program onto the pinned links atomically (`bpf_link_update`). Pins of another
//! layout version, or maps whose type or sizes differ, are never reused: fresh maps are created,
//! and the old program keeps running on its own maps until the link is swapped.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key},
    programs::{
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use gatekeeper_common::{
    Counter, DEFAULT_FLOW_ENTRIES, DEFAULT_HOST_ENTRIES, DEFAULT_POLICY_ENTRIES, DEFAULT_PREFIX_ENTRIES,
    DEFAULT_RULE_SLOTS, FlowKey, FlowKeyV4, FlowValue, GENERATIONS, GenConfig, HostV4, HostV6, Identity,
    LAYOUT_VERSION, LpmV4, LpmV6, OUTCOME_DROP_DEFAULT, OUTCOME_DROP_DENY_RULE, OUTCOME_DROP_MALFORMED,
    OUTCOME_MONITOR_DEFAULT, OUTCOME_MONITOR_DENY_RULE, OUTCOME_MONITOR_MALFORMED, OUTCOME_PASS_MALFORMED, PolicyKey,
    PolicyValue, STATS_ENTRIES, port_class_index,
};

use crate::compile::{Capacity, Compiled, Delta, diff};

/// The XDP object built by `build.rs` from `gatekeeper-ebpf`.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gatekeeper"));
const PROGRAM_NAME: &str = "gatekeeper";
/// Helper programs for benchmarks (`gk_empty`, `gk_redirect`, `gk_sink`); see `gatekeeper-ebpf/src/bench.rs`.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gatekeeper-bench"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("map {map}: {error}")]
    Map { map: &'static str, error: MapError },
    #[error("the XDP program object has no map {0}")]
    MissingMap(&'static str),
    #[error("interface {interface}: cannot attach in {mode} mode: {error}")]
    Attach { interface: String, mode: &'static str, error: ProgramError },
    #[error("{0}")]
    System(String),
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |error| DataplaneError::Map { map, error }
}

/// How to attach to an interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// Native (driver) mode if the driver supports it, generic otherwise.
    #[default]
    Auto,
    Native,
    Generic,
}

/// Counters summed over CPUs, by outcome (`OUTCOME_*` / `EVENT_*` index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub by_outcome: Vec<Counter>,
}

impl Stats {
    fn sum(&self, outcomes: &[u32]) -> u64 {
        outcomes.iter().map(|&o| self.by_outcome[o as usize].packets).sum()
    }
    pub fn dropped(&self) -> u64 {
        self.sum(&[OUTCOME_DROP_DENY_RULE, OUTCOME_DROP_DEFAULT, OUTCOME_DROP_MALFORMED])
    }
    pub fn would_drop(&self) -> u64 {
        self.sum(&[OUTCOME_MONITOR_DENY_RULE, OUTCOME_MONITOR_DEFAULT, OUTCOME_MONITOR_MALFORMED])
    }
    pub fn malformed(&self) -> u64 {
        self.sum(&[OUTCOME_DROP_MALFORMED, OUTCOME_MONITOR_MALFORMED, OUTCOME_PASS_MALFORMED])
    }
    pub fn total(&self) -> u64 {
        self.by_outcome[..=OUTCOME_PASS_MALFORMED as usize].iter().map(|c| c.packets).sum()
    }
    pub fn passed(&self) -> u64 {
        self.total() - self.dropped()
    }
}

/// Map sizes chosen at load time (all generations together).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub flow_table_size: u32,
    /// Entries of each host hash (IPv4, IPv6).
    pub host_entries: u32,
    /// Entries of each LPM trie (IPv4, IPv6).
    pub prefix_entries: u32,
    pub policy_entries: u32,
    pub rule_slots: u32,
    /// Pin maps and links here (bpffs), so enforcement outlives the daemon. `None`: nothing is
    /// pinned and dropping the `Dataplane` detaches (tests and benchmarks).
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            flow_table_size: DEFAULT_FLOW_ENTRIES,
            host_entries: DEFAULT_HOST_ENTRIES,
            prefix_entries: DEFAULT_PREFIX_ENTRIES,
            policy_entries: DEFAULT_POLICY_ENTRIES,
            rule_slots: DEFAULT_RULE_SLOTS,
            pin_dir: None,
        }
    }
}

/// The maps and what their pinned copies must look like to be reused:
/// (name, BPF map type, key size, value size).
const MAPS: [(&str, u32, u32, u32); 12] = [
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
    fn max_entries(&self, map: &str) -> Option<u32> {
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
fn ensure_bpffs(pin_dir: &Path) -> Result<(), DataplaneError> {
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
        return Err(DataplaneError::System(format!(
            "mounting bpffs at /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        )));
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// `<pin_dir>/v<LAYOUT_VERSION>`.
pub fn pin_version_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{LAYOUT_VERSION}"))
}

/// Whether the map pinned at `path` can be reused as `name`.
fn compatible(path: &Path, name: &str, options: &LoadOptions) -> bool {
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

impl LoadOptions {
    /// What one generation may hold: a third of each map, the generations share it.
    pub fn capacity(&self) -> Capacity {
        let half = |n: u32| (n / GENERATIONS) as usize;
        Capacity {
            hosts_v4: half(self.host_entries),
            prefixes_v4: half(self.prefix_entries),
            hosts_v6: half(self.host_entries),
            prefixes_v6: half(self.prefix_entries),
            policy: half(self.policy_entries),
            rules: self.rule_slots as usize,
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    pub epoch: u32,
    /// Entries written per generation.
    pub entries: usize,
    /// From the start of the apply to the epoch flip: when packets start seeing the new policy.
    pub enforced_after: std::time::Duration,
    /// The whole apply, including the wait for in-flight packets and the standby update.
    pub total: std::time::Duration,
}

/// The loaded program, its maps and its attachments.
pub struct Dataplane {
    ebpf: Ebpf,
    epoch: u32,
    applied: Compiled,
    links: Vec<(String, XdpLinkId, &'static str)>,
    /// Pinned links (pinned mode), by interface.
    pinned: Vec<(String, PinnedLink, &'static str)>,
    /// `<pin_dir>/v<LAYOUT_VERSION>` in pinned mode.
    pin_dir: Option<(PathBuf, PathBuf)>,
    /// The maps came from pins with unknown contents: the first apply rewrites every generation.
    adopted: bool,
    /// The maps were taken over from a running enforcement (stays true after the first apply).
    took_over: bool,
    /// Per generation: the changes applied since it was last written.
    behind: [Behind; GENERATIONS as usize],
    /// Per generation: its contents are unknown (a write failed); rebuild it in full.
    dirty: [bool; GENERATIONS as usize],
    /// Per generation: the flip that retired it (0: never active).
    retired_at: [u64; GENERATIONS as usize],
    flips: u64,
    grace: Grace,
}

/// Grace periods run by a background thread after each flip, so an apply rarely waits for one.
struct Grace {
    /// Flip numbers to cover; closing it stops the thread.
    tx: std::sync::mpsc::Sender<u64>,
    /// The highest flip a completed grace period covers.
    done: std::sync::Arc<(std::sync::Mutex<u64>, std::sync::Condvar)>,
}

impl Grace {
    fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let done = std::sync::Arc::new((std::sync::Mutex::new(0u64), std::sync::Condvar::new()));
        let d = done.clone();
        std::thread::Builder::new()
            .name("gk-grace".into())
            .spawn(move || {
                while let Ok(mut flip) = rx.recv() {
                    while let Ok(later) = rx.try_recv() {
                        flip = later;
                    }
                    // Begun after `flip` was stored: when it ends, no packet still reads an
                    // epoch from before that flip.
                    synchronize_rcu();
                    let (lock, cv) = &*d;
                    if let Ok(mut g) = lock.lock() {
                        *g = (*g).max(flip);
                    }
                    cv.notify_all();
                }
            })
            .expect("spawning the grace-period thread");
        Self { tx, done }
    }

    fn after_flip(&self, flip: u64) {
        let _ = self.tx.send(flip);
    }

    /// Blocks until a grace period begun after flip `flip` has ended.
    fn wait(&self, flip: u64) {
        let (lock, cv) = &*self.done;
        let Ok(mut g) = lock.lock() else { return synchronize_rcu() };
        while *g < flip {
            g = match cv.wait(g) {
                Ok(g) => g,
                Err(_) => return synchronize_rcu(),
            };
        }
    }
}

/// The changes a generation missed, merged: the last change of each key wins, so catching
/// up writes each key once, and recording a small delta costs as little as the delta, however
/// much is already pending (tag edits written in place never flip, so a lot may be). The order
/// of the writes does not matter: no packet reads a generation being caught up.
#[derive(Default)]
struct Behind {
    v4: std::collections::HashMap<ipnet::Ipv4Net, Option<gatekeeper_common::Identity>>,
    v6: std::collections::HashMap<ipnet::Ipv6Net, Option<gatekeeper_common::Identity>>,
    ports: std::collections::HashMap<(u32, u16), u32>,
    policy: std::collections::HashMap<PolicyKey, Option<PolicyValue>>,
    config: Option<GenConfig>,
}

impl Behind {
    fn add(&mut self, d: &Delta) {
        self.v4.extend(d.v4.iter().copied());
        self.v6.extend(d.v6.iter().copied());
        self.ports.extend(d.ports.iter().map(|&(l4, port, class)| ((l4, port), class)));
        self.policy.extend(d.policy.iter().copied());
        self.config = d.config.or(self.config);
    }

    fn into_delta(self) -> Delta {
        Delta {
            v4: self.v4.into_iter().collect(),
            v6: self.v6.into_iter().collect(),
            ports: self.ports.into_iter().map(|((l4, port), class)| (l4, port, class)).collect(),
            policy: self.policy.into_iter().collect(),
            config: self.config,
            ..Delta::default()
        }
    }
}

/// Whether `delta` can be written into the generation in force (see
/// [`Dataplane::apply_in_place`]): it only moves host addresses (no prefixes, ports, settings
/// or rule slots), and its policy entries are all new, for identities that appear with it.
fn in_place(delta: &Delta) -> bool {
    let appearing: std::collections::HashSet<u32> =
        delta.identities.iter().filter(|(_, segs)| segs.is_some()).map(|(id, _)| *id).collect();
    !(delta.v4.is_empty() && delta.v6.is_empty())
        && delta.v4.iter().all(|(n, _)| n.prefix_len() == 32)
        && delta.v6.iter().all(|(n, _)| n.prefix_len() == 128)
        && delta.ports.is_empty()
        && delta.config.is_none()
        && delta.new_slots.is_empty()
        && delta.rule_slots.is_none()
        && delta.identities.iter().all(|(_, segs)| segs.is_some())
        && delta.policy.iter().all(|(k, v)| v.is_some() && (appearing.contains(&k.src) || appearing.contains(&k.dst)))
}

impl Dataplane {
    /// Loads the XDP program and creates its maps (empty: every packet passes as ungoverned),
    /// or, with a pin directory, reuses the compatible pinned maps of a running enforcement.
    pub fn load(options: LoadOptions) -> Result<Self, DataplaneError> {
        // Older kernels charge BPF memory to RLIMIT_MEMLOCK; raising it is harmless elsewhere.
        let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: plain syscall with a valid pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
        let mut loader = EbpfLoader::new();
        for (name, _, _, _) in MAPS {
            if let Some(n) = options.max_entries(name) {
                loader.map_max_entries(name, n.max(1));
            }
        }
        let mut adopted = false;
        let mut map_paths = Vec::new();
        let pin_dir = match &options.pin_dir {
            None => None,
            Some(dir) => {
                ensure_bpffs(dir)?;
                let vdir = pin_version_dir(dir);
                let maps = vdir.join("maps");
                std::fs::create_dir_all(&maps).map_err(|e| {
                    DataplaneError::System(format!(
                        "creating {}: {e} (is a bpffs mounted there? `mount -t bpf bpf /sys/fs/bpf`)",
                        maps.display()
                    ))
                })?;
                std::fs::create_dir_all(vdir.join("links"))
                    .map_err(|e| DataplaneError::System(format!("creating {}: {e}", vdir.display())))?;
                let pinned: Vec<bool> = MAPS.iter().map(|m| maps.join(m.0).exists()).collect();
                let all_ok = MAPS.iter().zip(&pinned).all(|(m, &p)| p && compatible(&maps.join(m.0), m.0, &options));
                if all_ok {
                    adopted = true;
                } else if pinned.iter().any(|p| *p) {
                    // Never reuse a map that does not fit: start from fresh maps. A running old
                    // program keeps its own maps until its link is swapped over.
                    tracing::warn!(dir = %maps.display(), "pinned maps are incompatible with this version; replacing them");
                    for m in MAPS {
                        let _ = std::fs::remove_file(maps.join(m.0));
                    }
                }
                map_paths = MAPS.iter().map(|m| (m.0, maps.join(m.0))).collect();
                Some((dir.clone(), vdir))
            }
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(PROGRAM_OBJECT)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DataplaneError::System(format!("the XDP object has no program {PROGRAM_NAME}")))?
            .try_into()?;
        program.load()?;
        let mut dp = Self {
            ebpf,
            epoch: 0,
            applied: Compiled::empty(),
            links: Vec::new(),
            pinned: Vec::new(),
            pin_dir,
            adopted,
            took_over: adopted,
            behind: Default::default(),
            dirty: [false; GENERATIONS as usize],
            retired_at: [0; GENERATIONS as usize],
            flips: 0,
            grace: Grace::start(),
        };
        if adopted {
            let epoch_map: Array<_, u32> = Array::try_from(dp.map("GK_EPOCH")?).map_err(map_err("GK_EPOCH"))?;
            dp.epoch = epoch_map.get(&0, 0).map_err(map_err("GK_EPOCH"))?;
            tracing::info!(epoch = dp.epoch, "adopted the pinned data plane; enforcement continues");
        }
        Ok(dp)
    }

    /// Whether the maps were adopted from pins of a running enforcement.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Whether this data plane took over a running enforcement's pinned maps (even after its
    /// first apply): removing the pins would then open the network.
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// What the maps hold now.
    pub fn applied(&self) -> &Compiled {
        &self.applied
    }

    fn program(&self) -> Result<&Xdp, DataplaneError> {
        let p = self.ebpf.program(PROGRAM_NAME).ok_or(DataplaneError::System("program missing".into()))?;
        Ok(p.try_into()?)
    }

    fn program_mut(&mut self) -> Result<&mut Xdp, DataplaneError> {
        let p = self.ebpf.program_mut(PROGRAM_NAME).ok_or(DataplaneError::System("program missing".into()))?;
        Ok(p.try_into()?)
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DataplaneError> {
        self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))
    }

    /// Attaches to `interface`; returns the mode used ("native" or "generic"), or "replaced"
    /// when the program was swapped onto a pinned link already on the interface.
    pub fn attach(&mut self, interface: &str, mode: XdpAttachMode) -> Result<&'static str, DataplaneError> {
        if let Some((dir, vdir)) = self.pin_dir.clone() {
            // A pinned link of this or an older layout: swap our program onto it atomically.
            let mut candidates = vec![vdir.join("links").join(interface)];
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.filter_map(Result::ok) {
                    let p = e.path().join("links").join(interface);
                    if e.path() != vdir && p.exists() {
                        candidates.push(p);
                    }
                }
            }
            for path in candidates.into_iter().filter(|p| p.exists()) {
                let replaced = PinnedLink::from_pin(&path)
                    .map_err(|e| DataplaneError::System(format!("{}: {e}", path.display())))
                    .and_then(|pinned| {
                        let link = XdpLink::try_from(FdLink::from(pinned))
                            .map_err(|e| DataplaneError::System(format!("{}: {e}", path.display())))?;
                        Ok(self.program_mut()?.attach_to_link(link)?)
                    });
                match replaced {
                    Ok(id) => {
                        let link = self.program_mut()?.take_link(id)?;
                        let fd = FdLink::try_from(link).map_err(|e| DataplaneError::System(format!("link: {e}")))?;
                        let own = vdir.join("links").join(interface);
                        if path != own {
                            let _ = std::fs::remove_file(&path);
                        }
                        let _ = std::fs::remove_file(&own);
                        let pinned = fd
                            .pin(&own)
                            .map_err(|e| DataplaneError::System(format!("pinning {}: {e}", own.display())))?;
                        self.pinned.push((interface.to_string(), pinned, "replaced"));
                        return Ok("replaced");
                    }
                    Err(e) => {
                        tracing::warn!(link = %path.display(), error = %e, "stale link pin; removing it");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        let tries: &[(XdpMode, &'static str)] = match mode {
            XdpAttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
            XdpAttachMode::Native => &[(XdpMode::Driver, "native")],
            XdpAttachMode::Generic => &[(XdpMode::Skb, "generic")],
        };
        let mut last = None;
        for &(m, name) in tries {
            match self.program_mut()?.attach(interface, m) {
                Ok(id) => {
                    if let Some((_, vdir)) = self.pin_dir.clone() {
                        let link = self.program_mut()?.take_link(id)?;
                        let fd = FdLink::try_from(link).map_err(|e| DataplaneError::System(format!("link: {e}")))?;
                        let path = vdir.join("links").join(interface);
                        let pinned = fd
                            .pin(&path)
                            .map_err(|e| DataplaneError::System(format!("pinning {}: {e}", path.display())))?;
                        self.pinned.push((interface.to_string(), pinned, name));
                    } else {
                        self.links.push((interface.to_string(), id, name));
                    }
                    return Ok(name);
                }
                Err(error) => last = Some((name, error)),
            }
        }
        let (mode, error) = last.ok_or(DataplaneError::System("no attach mode".into()))?;
        Err(DataplaneError::Attach { interface: interface.to_string(), mode, error })
    }

    /// Interfaces attached, with their mode.
    pub fn attachments(&self) -> Vec<(String, &'static str)> {
        self.links
            .iter()
            .map(|(i, _, m)| (i.clone(), *m))
            .chain(self.pinned.iter().map(|(i, _, m)| (i.clone(), *m)))
            .collect()
    }

    /// Detaches from every interface (traffic then flows unfiltered) and removes every pin.
    pub fn detach_all(&mut self) -> Result<(), DataplaneError> {
        for (_, pinned, _) in std::mem::take(&mut self.pinned) {
            // Unpinning leaves us the last reference; dropping it detaches.
            let _ = pinned.unpin();
        }
        if let Some((dir, _)) = self.pin_dir.take() {
            remove_pins(&dir).map_err(|e| DataplaneError::System(format!("removing {}: {e}", dir.display())))?;
        }
        let links = std::mem::take(&mut self.links);
        let mut first_err = None;
        for (_, id, _) in links {
            if let Err(e) = self.program_mut()?.detach(id) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Makes `new` the policy in force, atomically for traffic. On error nothing changed.
    pub fn apply(&mut self, new: Compiled) -> Result<ApplyReport, DataplaneError> {
        let started = std::time::Instant::now();
        let delta = diff(&self.applied, &new);
        self.apply_delta_from(delta, started)
    }

    /// Applies `delta` (from [`diff`] or [`crate::compile::Compiler::update_assets`]) to what
    /// the maps hold, atomically for traffic. On error nothing changed.
    pub fn apply_delta(&mut self, delta: Delta) -> Result<ApplyReport, DataplaneError> {
        self.apply_delta_from(delta, std::time::Instant::now())
    }

    /// Like [`Dataplane::apply_delta`], for a delta made of independent requests that each
    /// change one asset (the API's tag edits, batched): when it only moves host addresses
    /// between identities it is written into the generation in force
    /// ([`Dataplane::apply_in_place`]). Any interleaving of such requests is a valid order, so a
    /// packet may see one request applied and another not yet; a delta from one request that
    /// moves several assets (a reload, `POST /apply`) must use [`Dataplane::apply_delta`], which
    /// never shows a packet a mix.
    pub fn apply_moves(&mut self, delta: Delta) -> Result<ApplyReport, DataplaneError> {
        let started = std::time::Instant::now();
        let active = (self.epoch % GENERATIONS) as usize;
        if !self.adopted && !self.dirty[active] && in_place(&delta) {
            return self.apply_in_place(delta, started);
        }
        self.apply_delta_from(delta, started)
    }

    fn apply_delta_from(&mut self, delta: Delta, started: std::time::Instant) -> Result<ApplyReport, DataplaneError> {
        if self.adopted {
            return self.apply_adopted(delta, started);
        }
        let gens = GENERATIONS as usize;
        let active = (self.epoch % GENERATIONS) as usize;
        let target = (active + 1) % gens;
        // No packet may still be reading the generation we are about to write.
        self.grace.wait(self.retired_at[target]);
        for &slot in &delta.new_slots {
            self.zero_rule_counter(slot)?;
        }
        let caught_up = if self.dirty[target] {
            self.rebuild_generation(target as u32)
        } else {
            let missed = std::mem::take(&mut self.behind[target]).into_delta();
            self.write(target as u32, &missed)
        };
        if let Err(e) = caught_up.and_then(|()| self.write(target as u32, &delta)) {
            // The generation is half-written but unused: rebuild it in full next time.
            self.dirty[target] = true;
            self.behind[target] = Behind::default();
            return Err(e);
        }
        if let Err(e) = self.set_epoch(self.epoch.wrapping_add(1)) {
            // Written but never used, and ahead of what we know: rebuild it next time.
            self.dirty[target] = true;
            return Err(e);
        }
        self.dirty[target] = false;
        let epoch = self.epoch;
        self.flips += 1;
        self.retired_at[active] = self.flips;
        self.grace.after_flip(self.flips);
        for g in (0..gens).filter(|&g| g != target) {
            self.fall_behind(g, &delta);
        }
        self.applied.apply(&delta);
        let enforced_after = started.elapsed();
        Ok(ApplyReport { epoch, entries: delta.len(), enforced_after, total: enforced_after })
    }

    /// Records that generation `g` missed `delta`.
    fn fall_behind(&mut self, g: usize, delta: &Delta) {
        if !self.dirty[g] {
            self.behind[g].add(delta);
        }
    }

    /// Moves host addresses between identities in the generation in force. Each host entry is
    /// replaced atomically, so every packet sees an address with its old identity or its new
    /// one, never neither; the policy entries of identities that appear are written first (no
    /// address points at them yet), and nothing a packet may still be reading is removed. The
    /// epoch then moves by [`GENERATIONS`]: the same generation, but every flow is judged again.
    /// No grace period is needed, so tag changes do not queue behind one.
    fn apply_in_place(&mut self, delta: Delta, started: std::time::Instant) -> Result<ApplyReport, DataplaneError> {
        let active = self.epoch % GENERATIONS;
        let policy = Delta { policy: delta.policy.clone(), ..Delta::default() };
        let hosts = Delta { v4: delta.v4.clone(), v6: delta.v6.clone(), ..Delta::default() };
        let written = self.write(active, &policy).and_then(|()| self.write(active, &hosts));
        if let Err(e) = written {
            // Put the addresses' old identities back. The new identities' policy entries stay:
            // a packet may still be reading one, and nothing points at them any more. The
            // generation is rebuilt in full before it is written again, and the epoch moves so
            // a flow opened while part of the change was visible is judged again.
            let back = Delta {
                v4: delta.v4.iter().map(|(n, _)| (*n, self.applied.v4.get(n).copied())).collect(),
                v6: delta.v6.iter().map(|(n, _)| (*n, self.applied.v6.get(n).copied())).collect(),
                ..Delta::default()
            };
            if let Err(back_err) = self.write(active, &back) {
                tracing::error!(error = %back_err, "could not undo a failed in-place write");
            }
            self.dirty[active as usize] = true;
            self.behind[active as usize] = Behind::default();
            if let Err(epoch_err) = self.set_epoch(self.epoch.wrapping_add(GENERATIONS)) {
                tracing::error!(error = %epoch_err, "could not move the epoch after a failed in-place write");
            }
            return Err(e);
        }
        self.set_epoch(self.epoch.wrapping_add(GENERATIONS))?;
        let epoch = self.epoch;
        for g in (0..GENERATIONS as usize).filter(|&g| g != active as usize) {
            self.fall_behind(g, &delta);
        }
        self.applied.apply(&delta);
        let enforced_after = started.elapsed();
        Ok(ApplyReport { epoch, entries: delta.len(), enforced_after, total: enforced_after })
    }

    fn set_epoch(&mut self, epoch: u32) -> Result<(), DataplaneError> {
        let mut epoch_map: Array<_, u32> = Array::try_from(self.map("GK_EPOCH")?).map_err(map_err("GK_EPOCH"))?;
        epoch_map.set(0, epoch, 0).map_err(map_err("GK_EPOCH"))?;
        self.epoch = epoch;
        Ok(())
    }

    /// The first apply over adopted maps: their contents are unknown (the previous daemon may
    /// have died mid-apply), so a generation not in use is cleared and written in full, the
    /// epoch flips, and after a grace period the others are rewritten the same way.
    fn apply_adopted(&mut self, delta: Delta, started: std::time::Instant) -> Result<ApplyReport, DataplaneError> {
        let mut target = Compiled::empty();
        target.apply(&delta);
        let previous = std::mem::replace(&mut self.applied, target);
        let new_gen = (self.epoch + 1) % GENERATIONS;
        let slots: Vec<u32> = self.applied.rule_slots.values().copied().collect();
        let written =
            slots.iter().try_for_each(|&s| self.zero_rule_counter(s)).and_then(|()| self.rebuild_generation(new_gen));
        if let Err(e) = written {
            self.applied = previous;
            return Err(e);
        }
        let epoch = self.epoch.wrapping_add(1);
        let mut epoch_map: Array<_, u32> = Array::try_from(self.map("GK_EPOCH")?).map_err(map_err("GK_EPOCH"))?;
        epoch_map.set(0, epoch, 0).map_err(map_err("GK_EPOCH"))?;
        self.epoch = epoch;
        self.adopted = false;
        let enforced_after = started.elapsed();
        synchronize_rcu();
        for g in (0..GENERATIONS).filter(|&g| g != new_gen) {
            // The new policy is in force already; a generation that cannot be written now is
            // rebuilt when it is next used.
            if let Err(e) = self.rebuild_generation(g) {
                tracing::warn!(generation = g, error = %e, "standby generation not rewritten; it will be rebuilt");
                self.dirty[g as usize] = true;
            }
        }
        Ok(ApplyReport { epoch, entries: delta.len(), enforced_after, total: started.elapsed() })
    }

    /// Rewrites generation `generation` from scratch from `self.applied`.
    fn rebuild_generation(&mut self, generation: u32) -> Result<(), DataplaneError> {
        let g = generation as u8;
        self.clear_lpm::<LpmV4>("GK_IDS_V4", |k| k.generation == g)?;
        self.clear_lpm::<LpmV6>("GK_IDS_V6", |k| k.generation == g)?;
        self.clear_hash::<HostV4, Identity>("GK_HOSTS_V4", |k| k.generation == g)?;
        self.clear_hash::<HostV6, Identity>("GK_HOSTS_V6", |k| k.generation == g)?;
        self.clear_hash::<PolicyKey, PolicyValue>("GK_POLICY", |k| k.generation == g)?;
        let mut ports: Vec<(u32, u16, u32)> = Vec::new();
        for l4 in 0..2u32 {
            for (port, class) in self.applied.port_classes[l4 as usize].iter().enumerate() {
                ports.push((l4, port as u16, *class));
            }
        }
        let full = Delta { ports, config: Some(self.applied.config), ..diff(&Compiled::empty(), &self.applied) };
        self.write(generation, &full)
    }

    /// Removes the entries of hash map `name` whose key `of_gen` picks.
    fn clear_hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        of_gen: impl Fn(&K) -> bool,
    ) -> Result<(), DataplaneError> {
        let mut map: HashMap<_, K, V> = HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        let keys: Vec<K> = map.keys().filter_map(Result::ok).filter(|k| of_gen(k)).collect();
        for k in keys {
            let _ = map.remove(&k);
        }
        Ok(())
    }

    /// Removes the entries of LPM trie `name` whose key data `of_gen` picks.
    fn clear_lpm<K: aya::Pod>(
        &mut self,
        name: &'static str,
        of_gen: impl Fn(&K) -> bool,
    ) -> Result<(), DataplaneError> {
        let mut map: LpmTrie<_, K, Identity> = LpmTrie::try_from(self.map(name)?).map_err(map_err(name))?;
        let keys: Vec<Key<K>> = map.keys().filter_map(Result::ok).filter(|k| of_gen(&k.data())).collect();
        for k in keys {
            let _ = map.remove(&k);
        }
        Ok(())
    }

    fn zero_rule_counter(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| DataplaneError::System(format!("{what}: {e}")))?;
        let mut stats: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(self.map("GK_RULE_STATS")?).map_err(map_err("GK_RULE_STATS"))?;
        let zeros = PerCpuValues::try_from(vec![Counter::default(); cpus])
            .map_err(|e| DataplaneError::System(format!("per-CPU values: {e}")))?;
        stats.set(slot, zeros, 0).map_err(map_err("GK_RULE_STATS"))
    }

    /// Writes one family's prefixes: host prefixes (`key` gives `Ok`) into the host hash named
    /// first, shorter ones (`Err`) into the LPM trie named second.
    fn write_prefixes<N, H: aya::Pod, L: aya::Pod>(
        &mut self,
        [host_map, lpm_map]: [&'static str; 2],
        entries: &[(N, Option<Identity>)],
        key: impl Fn(&N) -> Result<H, Key<L>>,
    ) -> Result<(), DataplaneError> {
        let [hosts, lpm] = self.ebpf.maps_disjoint_mut([host_map, lpm_map]);
        let mut hosts: HashMap<_, H, Identity> =
            HashMap::try_from(hosts.ok_or(DataplaneError::MissingMap(host_map))?).map_err(map_err(host_map))?;
        let mut lpm: LpmTrie<_, L, Identity> =
            LpmTrie::try_from(lpm.ok_or(DataplaneError::MissingMap(lpm_map))?).map_err(map_err(lpm_map))?;
        for (net, v) in entries {
            match key(net) {
                Ok(k) => match v {
                    Some(v) => hosts.insert(k, v, 0),
                    None => ignore_missing(hosts.remove(&k)),
                }
                .map_err(map_err(host_map))?,
                Err(k) => match v {
                    Some(v) => lpm.insert(&k, v, 0),
                    None => ignore_missing(lpm.remove(&k)),
                }
                .map_err(map_err(lpm_map))?,
            }
        }
        Ok(())
    }

    /// Writes `delta` into generation `generation`; stops at the first refused entry.
    fn write(&mut self, generation: u32, delta: &Delta) -> Result<(), DataplaneError> {
        let g = generation as u8;
        self.write_prefixes(["GK_HOSTS_V4", "GK_IDS_V4"], &delta.v4, |net| {
            let addr = net.addr().octets();
            if net.prefix_len() == 32 {
                Ok(HostV4 { generation: g, _pad: [0; 3], addr })
            } else {
                Err(Key::new(8 + u32::from(net.prefix_len()), LpmV4 { generation: g, addr, _pad: [0; 3] }))
            }
        })?;
        self.write_prefixes(["GK_HOSTS_V6", "GK_IDS_V6"], &delta.v6, |net| {
            let addr = net.addr().octets();
            if net.prefix_len() == 128 {
                Ok(HostV6 { generation: g, _pad: [0; 3], addr })
            } else {
                Err(Key::new(8 + u32::from(net.prefix_len()), LpmV6 { generation: g, addr, _pad: [0; 3] }))
            }
        })?;
        {
            let mut classes: Array<_, u32> =
                Array::try_from(self.map("GK_PORT_CLASS")?).map_err(map_err("GK_PORT_CLASS"))?;
            for &(l4, port, class) in &delta.ports {
                (classes.set(port_class_index(generation, l4, port), class, 0).map_err(map_err("GK_PORT_CLASS")))?;
            }
        }
        {
            let mut policy: HashMap<_, PolicyKey, PolicyValue> =
                HashMap::try_from(self.map("GK_POLICY")?).map_err(map_err("GK_POLICY"))?;
            for (k, v) in &delta.policy {
                let key = PolicyKey { generation: g, ..*k };
                (match v {
                    Some(v) => policy.insert(key, v, 0),
                    None => ignore_missing(policy.remove(&key)),
                }
                .map_err(map_err("GK_POLICY")))?;
            }
        }
        if let Some(cfg) = delta.config {
            let mut config: Array<_, GenConfig> =
                Array::try_from(self.map("GK_GEN_CONFIG")?).map_err(map_err("GK_GEN_CONFIG"))?;
            (config.set(generation, cfg, 0).map_err(map_err("GK_GEN_CONFIG")))?;
        }
        Ok(())
    }

    /// Counters by outcome, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, DataplaneError> {
        let map = self.ebpf.map("GK_STATS").ok_or(DataplaneError::MissingMap("GK_STATS"))?;
        let stats: PerCpuArray<_, Counter> = PerCpuArray::try_from(map).map_err(map_err("GK_STATS"))?;
        let mut by_outcome = Vec::with_capacity(STATS_ENTRIES as usize);
        for i in 0..STATS_ENTRIES {
            by_outcome.push(sum(&stats.get(&i, 0).map_err(map_err("GK_STATS"))?));
        }
        Ok(Stats { by_outcome })
    }

    /// The counter of the rule in `slot`, summed over CPUs.
    pub fn rule_counter(&self, slot: u32) -> Result<Counter, DataplaneError> {
        let map = self.ebpf.map("GK_RULE_STATS").ok_or(DataplaneError::MissingMap("GK_RULE_STATS"))?;
        let stats: PerCpuArray<_, Counter> = PerCpuArray::try_from(map).map_err(map_err("GK_RULE_STATS"))?;
        Ok(sum(&stats.get(&slot, 0).map_err(map_err("GK_RULE_STATS"))?))
    }

    /// Number of entries in the flow tables (IPv4 and IPv6).
    pub fn flow_count(&self) -> Result<usize, DataplaneError> {
        let v4 = self.ebpf.map("GK_FLOWS_V4").ok_or(DataplaneError::MissingMap("GK_FLOWS_V4"))?;
        let v4: HashMap<_, FlowKeyV4, FlowValue> = HashMap::try_from(v4).map_err(map_err("GK_FLOWS_V4"))?;
        let v6 = self.ebpf.map("GK_FLOWS_V6").ok_or(DataplaneError::MissingMap("GK_FLOWS_V6"))?;
        let v6: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(v6).map_err(map_err("GK_FLOWS_V6"))?;
        Ok(v4.keys().filter(Result::is_ok).count() + v6.keys().filter(Result::is_ok).count())
    }

    /// Forgets every flow (tests use it between independent cases).
    pub fn clear_flows(&mut self) -> Result<(), DataplaneError> {
        self.clear_hash::<FlowKeyV4, FlowValue>("GK_FLOWS_V4", |_| true)?;
        self.clear_hash::<FlowKey, FlowValue>("GK_FLOWS_V6", |_| true)
    }

    /// A handle on the loaded program for [`test_run_fd`], usable from other threads while
    /// this `Dataplane` applies policies.
    pub fn program_fd(&self) -> Result<std::os::fd::OwnedFd, DataplaneError> {
        use std::os::fd::AsFd as _;
        let fd = self.program()?.fd()?.as_fd().try_clone_to_owned();
        fd.map_err(|e| DataplaneError::System(format!("dup program fd: {e}")))
    }

    /// Runs the program once on `frame` through BPF_PROG_TEST_RUN: returns the XDP action.
    pub fn test_run(&self, frame: &[u8]) -> Result<u32, DataplaneError> {
        let opts = TestRunOptions { data_in: Some(frame), repeat: 1, ..Default::default() };
        Ok(self.program()?.test_run(opts)?.return_value)
    }

    /// Runs the program `repeat` times on `frame`: returns the action and mean time per run.
    pub fn test_run_timed(&self, frame: &[u8], repeat: u32) -> Result<(u32, std::time::Duration), DataplaneError> {
        let opts = TestRunOptions { data_in: Some(frame), repeat, ..Default::default() };
        let r = self.program()?.test_run(opts)?;
        Ok((r.return_value, r.duration))
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        // Pinned links stay: enforcement outlives the daemon. Unpinned ones go with us.
        let links = std::mem::take(&mut self.links);
        for (_, id, _) in links {
            if let Ok(p) = self.program_mut() {
                let _ = p.detach(id);
            }
        }
    }
}

/// Removing what is already gone is not an error: the goal state is reached.
/// A removal of a key that is not there is done. (Merged catch-ups remove keys a generation
/// never had: added and removed again while it was behind.)
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn sum(values: &PerCpuValues<Counter>) -> Counter {
    values.iter().fold(Counter::default(), |a, c| Counter { packets: a.packets + c.packets, bytes: a.bytes + c.bytes })
}

/// Waits until every CPU has left any RCU read-side section, so no XDP invocation that read
/// the old epoch is still running. `MEMBARRIER_CMD_GLOBAL` is `synchronize_rcu()` in the kernel.
fn synchronize_rcu() {
    // SAFETY: membarrier takes no pointers.
    let r = unsafe {
        libc::syscall(libc::SYS_membarrier, 1 /* MEMBARRIER_CMD_GLOBAL */, 0, 0)
    };
    if r != 0 {
        // nohz_full kernels refuse it; an XDP invocation lasts microseconds, so wait well past that.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `BPF_PROG_TEST_RUN` on a program fd: runs it `repeat` times on `frame`; returns the last
/// action and the mean time per run in nanoseconds.
pub fn test_run_fd(prog: std::os::fd::BorrowedFd<'_>, frame: &[u8], repeat: u32) -> std::io::Result<(u32, u32)> {
    test_run_raw(prog, frame, repeat, 0, 0)
}

/// `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`: the program's redirects really
/// transmit, `batch` frames at a time. Runs in the calling thread's network namespace.
pub fn test_run_live_fd(
    prog: std::os::fd::BorrowedFd<'_>,
    frame: &[u8],
    repeat: u32,
    batch: u32,
) -> std::io::Result<()> {
    const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
    test_run_raw(prog, frame, repeat, BPF_F_TEST_XDP_LIVE_FRAMES, batch).map(|_| ())
}

fn test_run_raw(
    prog: std::os::fd::BorrowedFd<'_>,
    frame: &[u8],
    repeat: u32,
    flags: u32,
    batch_size: u32,
) -> std::io::Result<(u32, u32)> {
    use std::os::fd::AsRawFd as _;
    /// The `test` member of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let mut attr = TestAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        flags,
        batch_size,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix of the size passed; `frame` outlives the call.
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &raw mut attr, std::mem::size_of::<TestAttr>() as u32)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((attr.retval, attr.duration))
}
