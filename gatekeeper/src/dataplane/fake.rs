//! An in-memory data plane behind the [`Dataplane`] trait, for control-plane tests (REST API,
//! TLS, Netskope) that cannot load the XDP program (no root, no BPF).
//!
//! It holds what the maps would hold as one [`Compiled`]: there is a single copy and no packet
//! runs concurrently with an apply, so generations, grace periods and in-place moves have
//! nothing to protect here. Attachments are bookkeeping only. [`FakeDataplane::test_run`] judges
//! a frame by interpreting the compiled maps the way the XDP program's `judge` does, **without a
//! flow table**: every packet is judged as the first packet of a new flow.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use gatekeeper_common::{
    CFG_ANY_ANY, CFG_ANY_ENFORCE, CFG_ANY_MONITOR, CFG_DST_ANY, CFG_SRC_ANY, Counter, GOVERN_ENFORCE, ID_ANY, IdDrops,
    LOOPBACK_IFINDEX, NO_RULE, OUTCOME_DROP_DEFAULT, OUTCOME_DROP_DENY_RULE, OUTCOME_DROP_MALFORMED,
    OUTCOME_MONITOR_DEFAULT, OUTCOME_MONITOR_DENY_RULE, OUTCOME_MONITOR_MALFORMED, OUTCOME_PASS_ALLOWED,
    OUTCOME_PASS_MALFORMED, OUTCOME_PASS_NEIGHBOR, OUTCOME_PASS_NON_IP, OUTCOME_PASS_UNGOVERNED, PORT_CLASS_NONE,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_OTHER, PROTO_TCP, PROTO_UDP, PolicyKey, STATS_COUNTERS,
};

use super::{ApplyReport, CounterSnapshot, Dataplane, DataplaneError, FlowCounter, LoadOptions, Stats, XdpAttachMode};
use crate::{
    compile::{Compiled, Delta, diff},
    policy::reference::{self, Frame, Header},
};

/// XDP actions, as `BPF_PROG_TEST_RUN` reports them (`enum xdp_action` in the kernel).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// The mode [`FakeDataplane::attach`] reports.
const FAKE_MODE: &str = "fake";

/// What the program's per-CPU counters would hold, summed.
#[derive(Debug)]
struct Counters {
    /// Indexed by `OUTCOME_*` / `EVENT_*`, like `GK_STATS`.
    by_outcome: Vec<Counter>,
    /// By rule slot, like `GK_RULE_STATS` (sparse: most slots are never used).
    by_rule: BTreeMap<u32, Counter>,
    /// By charged identity, like `GK_ID_DROPS`.
    by_identity: BTreeMap<u32, IdDrops>,
}

/// The in-memory data plane: see the module documentation.
#[derive(Debug)]
pub struct FakeDataplane {
    applied: Compiled,
    epoch: u32,
    /// Rule counter slots, as in `GK_RULE_STATS`: a rule beyond them is not counted.
    rule_slots: u32,
    attachments: Vec<(String, &'static str)>,
    /// Behind a lock because [`Dataplane::test_run`] counts through `&self`.
    counters: Mutex<Counters>,
    /// How many of the next policy writes to refuse (see [`FakeDataplane::refusals`]).
    refuse: Arc<AtomicUsize>,
}

impl FakeDataplane {
    /// Empty maps, as a freshly loaded program has; `options` gives the rule-slot capacity etc.
    pub fn new(options: &LoadOptions) -> Self {
        Self {
            applied: Compiled::empty(),
            epoch: 0,
            rule_slots: options.rule_slots,
            attachments: Vec::new(),
            counters: Mutex::new(Counters {
                by_outcome: vec![Counter::default(); STATS_COUNTERS as usize],
                by_rule: BTreeMap::new(),
                by_identity: BTreeMap::new(),
            }),
            refuse: Arc::default(),
        }
    }

    /// A handle that makes the next `n` policy writes fail (set it to `n`) as a kernel refusing
    /// a map update would: the tests of what a refused write leaves behind.
    pub fn refusals(&self) -> Arc<AtomicUsize> {
        self.refuse.clone()
    }

    /// Whether this write is one to refuse.
    fn refused(&self) -> Result<(), DataplaneError> {
        let take = self.refuse.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match take {
            Ok(_) => Err(DataplaneError::Io {
                what: "writing the policy maps (refused as the test asked)".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            }),
            Err(_) => Ok(()),
        }
    }

    /// The counter of the rule in `slot`: the packets [`Dataplane::test_run`] saw it decide.
    pub fn rule_counter(&self, slot: u32) -> Counter {
        self.counters().by_rule.get(&slot).copied().unwrap_or_default()
    }

    /// The counters; a panic elsewhere cannot leave them half-updated (each update is a few
    /// additions), so a poisoned lock is still good to read.
    fn counters(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every apply ends here: one copy of the maps, so applying is trivially atomic.
    fn apply_now(&mut self, delta: Delta, started: Instant) -> ApplyReport {
        {
            // A slot newly given to a rule starts from zero, as the real apply zeroes it.
            let mut counters = self.counters();
            for slot in &delta.new_slots {
                counters.by_rule.remove(slot);
            }
        }
        self.applied.apply(&delta);
        // As the real apply: nothing for packets to see, no flip.
        if !delta.writes_nothing() {
            self.epoch = self.epoch.wrapping_add(1);
        }
        let elapsed = started.elapsed();
        ApplyReport { epoch: self.epoch, entries: delta.len(), enforced_after: elapsed, total: elapsed }
    }

    /// `(OUTCOME_*, deciding rule slot or NO_RULE)` for `frame`, judged as the XDP program
    /// judges a packet that starts a flow (there is no flow table here).
    /// `(OUTCOME_*, deciding rule or NO_RULE, identity charged with a policy drop)`.
    fn judge(&self, frame: &[u8]) -> (u32, u32, Option<u32>) {
        let compiled = &self.applied;
        let h = match reference::parse(frame) {
            Frame::NonIp => return (OUTCOME_PASS_NON_IP, NO_RULE, None),
            Frame::Unattributable => return (unattributable(compiled.config.flags), NO_RULE, None),
            Frame::Ip(h) => h,
        };
        if h.neighbor {
            return (OUTCOME_PASS_NEIGHBOR, NO_RULE, None);
        }
        let src = compiled.identity(h.src);
        let dst = compiled.identity(h.dst);
        let governing = src.flags | dst.flags;
        if governing == 0 {
            let outcome = if h.malformed { OUTCOME_PASS_MALFORMED } else { OUTCOME_PASS_UNGOVERNED };
            return (outcome, NO_RULE, None);
        }
        let enforce = governing & GOVERN_ENFORCE != 0;
        if h.malformed {
            let outcome = if enforce { OUTCOME_DROP_MALFORMED } else { OUTCOME_MONITOR_MALFORMED };
            return (outcome, NO_RULE, None);
        }
        let (allowed, rule) = decide(compiled, proto_class(h.proto), port_class(compiled, &h), src.id, dst.id);
        if allowed {
            (OUTCOME_PASS_ALLOWED, rule, None)
        } else {
            // Charged as the program charges: the destination when it is governed.
            let charged = if dst.flags != 0 { dst.id } else { src.id };
            let (outcome, rule) = denied(enforce, rule);
            (outcome, rule, Some(charged))
        }
    }
}

/// A frame whose addresses cannot be read governs no known segment: assume the strictest mode
/// the policy has.
fn unattributable(cfg_flags: u32) -> u32 {
    if cfg_flags & CFG_ANY_ENFORCE != 0 {
        OUTCOME_DROP_MALFORMED
    } else if cfg_flags & CFG_ANY_MONITOR != 0 {
        OUTCOME_MONITOR_MALFORMED
    } else {
        OUTCOME_PASS_MALFORMED
    }
}

/// Rules can only name these protocols, so the compiler keys every other one as `PROTO_OTHER`.
fn proto_class(proto: u8) -> u8 {
    match proto {
        PROTO_ICMP | PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => proto,
        _ => PROTO_OTHER,
    }
}

/// The destination port's class; packets without ports (ICMP, other protocols, later
/// fragments) share `PORT_CLASS_NONE` with ports no port-restricted rule covers.
fn port_class(compiled: &Compiled, h: &Header) -> u32 {
    let Some((_, dport)) = h.ports else { return PORT_CLASS_NONE };
    // Only TCP and UDP carry ports; `port_classes` is `[TCP, UDP]`.
    let l4 = if h.proto == PROTO_TCP { 0 } else { 1 };
    compiled.port_classes[l4].get(usize::from(dport)).copied().unwrap_or(PORT_CLASS_NONE)
}

/// Judges a flow start as the program's `decide` does: `(allowed, deciding rule or NO_RULE)`.
/// The exact `(src, dst)` key always; a wildcard key only when the `CFG_*` flags say some rule
/// has `any` on that side (the program skips lookups that cannot hit, so entries the flags do
/// not announce are invisible to it, and to us). Deny beats allow; the lowest slot counts.
fn decide(compiled: &Compiled, proto: u8, port_class: u32, src: u32, dst: u32) -> (bool, u32) {
    let flags = compiled.config.flags;
    let lookups = [
        (true, src, dst),
        (flags & CFG_DST_ANY != 0, src, ID_ANY),
        (flags & CFG_SRC_ANY != 0, ID_ANY, dst),
        (flags & CFG_ANY_ANY != 0, ID_ANY, ID_ANY),
    ];
    let (mut allow, mut deny) = (NO_RULE, NO_RULE);
    for (_, src, dst) in lookups.into_iter().filter(|&(enabled, _, _)| enabled) {
        // Compiled keys carry generation 0 (the default).
        let key = PolicyKey { proto, port_class, src, dst, ..PolicyKey::default() };
        if let Some(v) = compiled.policy.get(&key) {
            allow = allow.min(v.allow_rule);
            deny = deny.min(v.deny_rule);
        }
    }
    if deny != NO_RULE {
        (false, deny)
    } else if allow != NO_RULE {
        (true, allow)
    } else {
        (false, NO_RULE)
    }
}

/// The outcome of a flow start no rule allows: dropped under an enforcing segment, counted as
/// would-drop when only monitoring segments govern it.
fn denied(enforce: bool, rule: u32) -> (u32, u32) {
    let outcome = match (enforce, rule != NO_RULE) {
        (true, true) => OUTCOME_DROP_DENY_RULE,
        (true, false) => OUTCOME_DROP_DEFAULT,
        (false, true) => OUTCOME_MONITOR_DENY_RULE,
        (false, false) => OUTCOME_MONITOR_DEFAULT,
    };
    (outcome, rule)
}

/// The XDP action for an outcome: only the `DROP_*` outcomes drop.
fn action(outcome: u32) -> u32 {
    match outcome {
        OUTCOME_DROP_DENY_RULE | OUTCOME_DROP_DEFAULT | OUTCOME_DROP_MALFORMED => XDP_DROP,
        _ => XDP_PASS,
    }
}

fn add(counter: &mut Counter, bytes: u64) {
    counter.packets += 1;
    counter.bytes += bytes;
}

impl Dataplane for FakeDataplane {
    fn applied(&self) -> &Compiled {
        &self.applied
    }

    fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Fails only when [`FakeDataplane::refusals`] asks.
    fn apply(&mut self, new: Compiled) -> Result<ApplyReport, DataplaneError> {
        self.refused()?;
        let started = Instant::now();
        let delta = diff(&self.applied, &new);
        Ok(self.apply_now(delta, started))
    }

    /// Fails only when [`FakeDataplane::refusals`] asks.
    fn apply_delta(&mut self, delta: Delta) -> Result<ApplyReport, DataplaneError> {
        self.refused()?;
        Ok(self.apply_now(delta, Instant::now()))
    }

    /// Like [`Dataplane::apply_delta`]: with a single copy of the maps, writing "in place" is
    /// no different, so the epoch moves by one (the real in-place write moves it by
    /// `GENERATIONS`), and not at all when nothing is written.
    fn apply_moves(&mut self, delta: Delta) -> Result<ApplyReport, DataplaneError> {
        self.refused()?;
        Ok(self.apply_now(delta, Instant::now()))
    }

    /// Records the interface (once) and reports the mode `"fake"`, whatever was asked.
    fn attach(&mut self, interface: &str, _mode: XdpAttachMode) -> Result<&'static str, DataplaneError> {
        if !self.attachments.iter().any(|(i, _)| i == interface) {
            self.attachments.push((interface.to_string(), FAKE_MODE));
        }
        Ok(FAKE_MODE)
    }

    fn attachments(&self) -> Vec<(String, &'static str)> {
        self.attachments.clone()
    }

    fn detach_all(&mut self) -> Result<(), DataplaneError> {
        self.attachments.clear();
        Ok(())
    }

    fn took_over(&self) -> bool {
        false
    }

    /// The outcomes of the frames [`Dataplane::test_run`] judged (no other traffic exists).
    fn stats(&self) -> Result<Stats, DataplaneError> {
        Ok(Stats { by_outcome: self.counters().by_outcome.clone() })
    }

    /// Frames of [`Dataplane::test_run`] count on the loopback block, as `BPF_PROG_TEST_RUN`'s do;
    /// no other interface sees traffic.
    fn counters(&self, ifindexes: &[u32]) -> Result<CounterSnapshot, DataplaneError> {
        let c = self.counters();
        let zero = vec![Counter::default(); STATS_COUNTERS as usize];
        let interfaces = ifindexes
            .iter()
            .map(|&i| (i, if i == LOOPBACK_IFINDEX { c.by_outcome.clone() } else { zero.clone() }))
            .collect();
        let rules = self
            .applied
            .rule_slots
            .values()
            .filter(|&&slot| slot < self.rule_slots)
            .map(|&slot| (slot, c.by_rule.get(&slot).copied().unwrap_or_default()))
            .collect();
        let id_drops = c.by_identity.iter().map(|(&id, &d)| (id, d)).collect();
        Ok(CounterSnapshot { interfaces, rules, id_drops, flow_capacity: [0, 0] })
    }

    /// There is no flow table.
    fn flow_counter(&self) -> Result<Option<FlowCounter>, DataplaneError> {
        Ok(None)
    }

    /// Judges `frame` as the XDP program judges a packet that **starts a flow**: this data plane
    /// is stateless, with no flow table, so every packet is judged as a new flow. A reply, or
    /// any later packet of a flow the real program would pass as established, is judged on its
    /// own here (usually dropped under an enforcing segment), and policy changes revoke nothing.
    /// Counts one packet and the frame's bytes in the outcome's counter, and in the deciding
    /// rule's counter when a rule decided. Returns the XDP action (1 drop, 2 pass).
    fn test_run(&self, frame: &[u8]) -> Result<u32, DataplaneError> {
        let (outcome, rule, charged) = self.judge(frame);
        let bytes = frame.len() as u64;
        let mut counters = self.counters();
        if let Some(c) = counters.by_outcome.get_mut(outcome as usize) {
            add(c, bytes);
        }
        if let Some(id) = charged {
            let d = counters.by_identity.entry(id).or_default();
            if action(outcome) == XDP_DROP {
                d.dropped += 1;
            } else {
                d.would_drop += 1;
            }
        }
        // Out-of-range slots have no counter, as in the program.
        if rule != NO_RULE && rule < self.rule_slots {
            add(counters.by_rule.entry(rule).or_default(), bytes);
        }
        Ok(action(outcome))
    }
}
