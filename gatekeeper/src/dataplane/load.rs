//! Loading the XDP program and its maps (fresh, or adopted from the pins of a running
//! enforcement), and the [`BpfDataplane`] handle the other modules work on.

use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{Xdp, links::PinnedLink, xdp::XdpLinkId},
};
use gatekeeper_common::GENERATIONS;

use super::{
    DataplaneError, LoadOptions,
    generations::{Behind, Grace},
    io_err, map_err,
    pin::{MAPS, PinLock, compatible, ensure_persistent_bpffs, lock_pin_dir, pin_version_dir},
};
use crate::compile::Compiled;
use std::path::PathBuf;

/// The XDP object built by `build.rs` from `gatekeeper-ebpf`.
#[cfg(feature = "xdp")]
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gatekeeper"));
/// Built without the `xdp` feature (`cargo xtask` only): loading fails with [`DataplaneError::NotEmbedded`].
#[cfg(not(feature = "xdp"))]
static PROGRAM_OBJECT: &[u8] = &[];
pub(super) const PROGRAM_NAME: &str = "gatekeeper";
/// Helper programs for benchmarks (`gk_empty`, `gk_redirect`, `gk_sink`); see `gatekeeper-ebpf/src/bench.rs`.
#[cfg(feature = "xdp")]
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gatekeeper-bench"));
#[cfg(not(feature = "xdp"))]
pub static BENCH_OBJECT: &[u8] = &[];

/// The loaded program, its maps and its attachments.
pub struct BpfDataplane {
    pub(super) ebpf: Ebpf,
    pub(super) epoch: u32,
    pub(super) applied: Compiled,
    pub(super) links: Vec<(String, XdpLinkId, &'static str)>,
    /// Pinned links (pinned mode), by interface.
    pub(super) pinned: Vec<(String, PinnedLink, &'static str)>,
    /// ifindexes of the interfaces attached, resolved when attaching (see `note_ifindex`).
    pub(super) ifindexes: Vec<u32>,
    /// `<pin_dir>/v<LAYOUT_VERSION>` in pinned mode.
    pub(super) pin_dir: Option<(PathBuf, PathBuf)>,
    /// The maps came from pins with unknown contents: the first apply rewrites every generation.
    pub(super) adopted: bool,
    /// The maps were taken over from a running enforcement (stays true after the first apply).
    pub(super) took_over: bool,
    /// Per generation: the changes applied since it was last written.
    pub(super) behind: [Behind; GENERATIONS as usize],
    /// Per generation: its contents are unknown (a write failed); rebuild it in full.
    pub(super) dirty: [bool; GENERATIONS as usize],
    /// Per generation: the flip that retired it (0: never active).
    pub(super) retired_at: [u64; GENERATIONS as usize],
    pub(super) flips: u64,
    pub(super) grace: Grace,
    /// The exclusive lock on the pin directory (pinned mode), held as long as this data plane.
    _pin_lock: Option<PinLock>,
}

impl BpfDataplane {
    /// Loads the XDP program and creates its maps (empty: every packet passes as ungoverned),
    /// or, with a pin directory, reuses the compatible pinned maps of a running enforcement.
    ///
    /// With a pin directory, refuses (before touching any pin) when the pins would not outlive
    /// this process (a bpffs private to its mount namespace, as under `ip netns exec`) or when
    /// another process holds the pin directory's lock (a second daemon), naming its pid.
    pub fn load(options: LoadOptions) -> Result<Self, DataplaneError> {
        if PROGRAM_OBJECT.is_empty() {
            return Err(DataplaneError::NotEmbedded);
        }
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
        let mut pin_lock = None;
        let pin_dir = match &options.pin_dir {
            None => None,
            Some(dir) => {
                // Before any pin is read or replaced: the pins must outlive this process, and no
                // other daemon may be using them.
                ensure_persistent_bpffs(dir)?;
                pin_lock = Some(lock_pin_dir(dir)?);
                let vdir = pin_version_dir(dir);
                let maps = vdir.join("maps");
                std::fs::create_dir_all(&maps).map_err(io_err(format!(
                    "creating {} (is a bpffs mounted there? `mount -t bpf bpf /sys/fs/bpf`)",
                    maps.display()
                )))?;
                std::fs::create_dir_all(vdir.join("links")).map_err(io_err(format!("creating {}", vdir.display())))?;
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
        let program: &mut Xdp =
            ebpf.program_mut(PROGRAM_NAME).ok_or(DataplaneError::MissingProgram(PROGRAM_NAME))?.try_into()?;
        program.load()?;
        let mut dp = Self {
            ebpf,
            epoch: 0,
            applied: Compiled::empty(),
            links: Vec::new(),
            pinned: Vec::new(),
            ifindexes: Vec::new(),
            pin_dir,
            adopted,
            took_over: adopted,
            behind: Default::default(),
            dirty: [false; GENERATIONS as usize],
            retired_at: [0; GENERATIONS as usize],
            flips: 0,
            grace: Grace::start(),
            _pin_lock: pin_lock,
        };
        if adopted {
            let epoch_map: Array<_, u32> = Array::try_from(dp.map("GK_EPOCH")?).map_err(map_err("GK_EPOCH"))?;
            dp.epoch = epoch_map.get(&0, 0).map_err(map_err("GK_EPOCH"))?;
            tracing::info!(epoch = dp.epoch, "adopted the pinned data plane; enforcement continues");
            // Identity ids start again with this daemon's compiler: drops charged to the old
            // daemon's ids would be counted for the wrong segments.
            let mut drops: aya::maps::PerCpuHashMap<_, u32, gatekeeper_common::IdDrops> =
                aya::maps::PerCpuHashMap::try_from(dp.map("GK_ID_DROPS")?).map_err(map_err("GK_ID_DROPS"))?;
            let ids: Vec<u32> = drops.keys().filter_map(Result::ok).collect();
            for id in ids {
                let _ = drops.remove(&id);
            }
        }
        Ok(dp)
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

    pub(super) fn program(&self) -> Result<&Xdp, DataplaneError> {
        let p = self.ebpf.program(PROGRAM_NAME).ok_or(DataplaneError::MissingProgram(PROGRAM_NAME))?;
        Ok(p.try_into()?)
    }

    pub(super) fn program_mut(&mut self) -> Result<&mut Xdp, DataplaneError> {
        let p = self.ebpf.program_mut(PROGRAM_NAME).ok_or(DataplaneError::MissingProgram(PROGRAM_NAME))?;
        Ok(p.try_into()?)
    }

    pub(super) fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DataplaneError> {
        self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))
    }
}

impl Drop for BpfDataplane {
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
