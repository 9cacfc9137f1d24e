//! The data plane from user space: load the XDP program, attach it, write compiled policies into
//! its maps atomically, and read its counters.
//!
//! * [`load`]: the program, its maps and the [`BpfDataplane`] handle; [`pin`]: bpffs pins and
//!   their compatibility; [`attach`]: XDP links;
//! * [`generations`]: atomic applies (generations, epochs, grace periods, in-place moves);
//!   [`writer`]: map writes of one generation;
//! * [`counters`]: outcome and rule counters, flow counts; [`testrun`]: BPF_PROG_TEST_RUN;
//! * [`fake`]: an in-memory data plane behind the same [`Dataplane`] trait, for tests without
//!   root.
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
//! A change that writes no entry (a policy restated, a tag no selector uses) writes nothing and
//! leaves the epoch where it is.
//!
//! Tag changes that only move host addresses between existing identities are written into the
//! generation in force instead (`generations::apply_in_place`): one atomic replacement per
//! address, and the epoch moves by [`gatekeeper_common::GENERATIONS`] so flows are judged again;
//! no grace period.
//!
//! # Pinning: restarts without a gap
//! With a pin directory, the maps and the XDP links are pinned in bpffs under
//! `<pin_dir>/v<LAYOUT_VERSION>/{maps,links}`. The program keeps enforcing when the daemon stops,
//! crashes or is upgraded. A starting daemon reuses compatible pinned maps (flows included),
//! writes its policy into the generation the running program does not use, flips the epoch, and
//! swaps its own program onto the pinned links atomically (`bpf_link_update`). Pins of another
//! layout version, or maps whose type or sizes differ, are never reused: fresh maps are created,
//! and the old program keeps running on its own maps until the link is swapped.

mod attach;
mod counters;
pub mod fake;
mod generations;
mod load;
mod pin;
mod testrun;
mod writer;

use std::path::PathBuf;

use aya::{
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};
use gatekeeper_common::{
    Counter, DEFAULT_FLOW_ENTRIES, DEFAULT_HOST_ENTRIES, DEFAULT_POLICY_ENTRIES, DEFAULT_PREFIX_ENTRIES,
    DEFAULT_RULE_SLOTS, IdDrops, OUTCOME_DROP_DEFAULT, OUTCOME_DROP_DENY_RULE, OUTCOME_DROP_MALFORMED,
    OUTCOME_MONITOR_DEFAULT, OUTCOME_MONITOR_DENY_RULE, OUTCOME_MONITOR_MALFORMED, OUTCOME_PASS_MALFORMED,
};

pub use self::{
    counters::{FlowCounter, ifindex},
    load::{BENCH_OBJECT, BpfDataplane},
    pin::{pin_version_dir, remove_pins},
    testrun::{test_run_fd, test_run_live_fd},
};
use crate::compile::{Capacity, Compiled, Delta};

/// What the control layer needs of a data plane: the loaded XDP program ([`BpfDataplane`]) or,
/// for control-plane tests without root, the in-memory [`fake::FakeDataplane`].
pub trait Dataplane: Send {
    /// What the policy maps hold now (generation-independent).
    fn applied(&self) -> &Compiled;
    /// The policy epoch in force.
    fn epoch(&self) -> u32;
    /// Makes `new` the policy in force, atomically for traffic. On error nothing changed. This
    /// and the other applies write nothing and keep the epoch when no entry changes
    /// ([`Delta::writes_nothing`]).
    fn apply(&mut self, new: Compiled) -> Result<ApplyReport, DataplaneError>;
    /// Applies `delta` to what the maps hold, atomically for traffic. On error nothing changed.
    fn apply_delta(&mut self, delta: Delta) -> Result<ApplyReport, DataplaneError>;
    /// Like [`Dataplane::apply_delta`] for a delta of independent one-asset requests, which may
    /// be written into the generation in force (see [`BpfDataplane::apply_moves`]).
    fn apply_moves(&mut self, delta: Delta) -> Result<ApplyReport, DataplaneError>;
    /// Attaches to `interface`; returns the mode used.
    fn attach(&mut self, interface: &str, mode: XdpAttachMode) -> Result<&'static str, DataplaneError>;
    /// Interfaces attached, with their mode.
    fn attachments(&self) -> Vec<(String, &'static str)>;
    /// Detaches from every interface and removes every pin.
    fn detach_all(&mut self) -> Result<(), DataplaneError>;
    /// Whether a running enforcement's pinned maps were taken over (removing them would open
    /// the network).
    fn took_over(&self) -> bool;
    /// Counters by outcome, summed over CPUs.
    fn stats(&self) -> Result<Stats, DataplaneError>;
    /// The counters `/metrics` reports: per interface (`ifindexes`), per rule, per identity.
    fn counters(&self, ifindexes: &[u32]) -> Result<CounterSnapshot, DataplaneError>;
    /// A handle that counts the flow tables without borrowing the data plane (`None`: no flow
    /// table).
    fn flow_counter(&self) -> Result<Option<FlowCounter>, DataplaneError>;
    /// Judges `frame` once: returns the XDP action (1 drop, 2 pass).
    fn test_run(&self, frame: &[u8]) -> Result<u32, DataplaneError>;
}

impl Dataplane for BpfDataplane {
    fn applied(&self) -> &Compiled {
        BpfDataplane::applied(self)
    }
    fn epoch(&self) -> u32 {
        BpfDataplane::epoch(self)
    }
    fn apply(&mut self, new: Compiled) -> Result<ApplyReport, DataplaneError> {
        BpfDataplane::apply(self, new)
    }
    fn apply_delta(&mut self, delta: Delta) -> Result<ApplyReport, DataplaneError> {
        BpfDataplane::apply_delta(self, delta)
    }
    fn apply_moves(&mut self, delta: Delta) -> Result<ApplyReport, DataplaneError> {
        BpfDataplane::apply_moves(self, delta)
    }
    fn attach(&mut self, interface: &str, mode: XdpAttachMode) -> Result<&'static str, DataplaneError> {
        BpfDataplane::attach(self, interface, mode)
    }
    fn attachments(&self) -> Vec<(String, &'static str)> {
        BpfDataplane::attachments(self)
    }
    fn detach_all(&mut self) -> Result<(), DataplaneError> {
        BpfDataplane::detach_all(self)
    }
    fn took_over(&self) -> bool {
        BpfDataplane::took_over(self)
    }
    fn stats(&self) -> Result<Stats, DataplaneError> {
        BpfDataplane::stats(self)
    }
    fn counters(&self, ifindexes: &[u32]) -> Result<CounterSnapshot, DataplaneError> {
        BpfDataplane::counters(self, ifindexes)
    }
    fn flow_counter(&self) -> Result<Option<FlowCounter>, DataplaneError> {
        BpfDataplane::flow_counter(self).map(Some)
    }
    fn test_run(&self, frame: &[u8]) -> Result<u32, DataplaneError> {
        BpfDataplane::test_run(self, frame)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("this build has no XDP program embedded (built without the `xdp` feature)")]
    NotEmbedded,
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("map {map}: {error}")]
    Map { map: &'static str, error: MapError },
    #[error("the XDP program object has no map {0}")]
    MissingMap(&'static str),
    #[error("the XDP program object has no program {0}")]
    MissingProgram(&'static str),
    #[error("interface {interface}: cannot attach in {mode} mode: {error}")]
    Attach { interface: String, mode: &'static str, error: ProgramError },
    #[error("link {}: {source}", path.display())]
    Link { path: PathBuf, source: LinkError },
    #[error("pinning {}: {source}", path.display())]
    Pin { path: PathBuf, source: PinError },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The in-memory fake was asked for something only a loaded program can do.
    #[error("the in-memory data plane cannot {0}")]
    Unsupported(&'static str),
}

pub(crate) fn map_err(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |error| DataplaneError::Map { map, error }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Io { what, source }
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

/// The counters at one moment, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// By ifindex (0: the block shared by ifindexes of `STATS_IFINDEX_LIMIT` and above), each
    /// indexed by `OUTCOME_*` / `EVENT_*`.
    pub interfaces: Vec<(u32, Vec<Counter>)>,
    /// By rule slot of the policy in force.
    pub rules: Vec<(u32, Counter)>,
    /// By identity charged with policy drops (see [`gatekeeper_common::IdDrops`]).
    pub id_drops: Vec<(u32, IdDrops)>,
    /// Sizes of the IPv4 and IPv6 flow tables (0: no flow table).
    pub flow_capacity: [u32; 2],
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

impl LoadOptions {
    /// What one generation may hold: the generations share each map equally.
    pub fn capacity(&self) -> Capacity {
        Capacity::of_maps(self.host_entries, self.prefix_entries, self.policy_entries, self.rule_slots)
    }
}

/// What an apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    pub epoch: u32,
    /// Entries written per generation.
    pub entries: usize,
    /// From the start of the apply to when packets start seeing the new policy (the epoch flip,
    /// or the last in-place write).
    pub enforced_after: std::time::Duration,
    /// The whole apply (after adopting pins, including the standby generation's update).
    pub total: std::time::Duration,
}
