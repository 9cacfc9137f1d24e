//! Atomic applies: four policy generations behind one epoch, grace periods before a retired
//! generation is rewritten, the changes each generation missed, and in-place host moves.

use aya::maps::Array;
use gatekeeper_common::{GENERATIONS, GenConfig, PolicyKey, PolicyValue};

use super::{ApplyReport, BpfDataplane, DataplaneError, map_err};
use crate::compile::{Compiled, Delta, diff};

/// Grace periods run by a background thread after each flip, so an apply rarely waits for one.
pub(super) struct Grace {
    /// Flip numbers to cover; closing it stops the thread.
    tx: std::sync::mpsc::Sender<u64>,
    /// The highest flip a completed grace period covers.
    done: std::sync::Arc<(std::sync::Mutex<u64>, std::sync::Condvar)>,
}

impl Grace {
    pub(super) fn start() -> Self {
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
pub(super) struct Behind {
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
/// [`BpfDataplane::apply_in_place`]): it only moves host addresses (no prefixes, ports, settings
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

impl BpfDataplane {
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

    /// Like [`BpfDataplane::apply_delta`], for a delta made of independent requests that each
    /// change one asset (the API's tag edits, batched): when it only moves host addresses
    /// between identities it is written into the generation in force
    /// ([`BpfDataplane::apply_in_place`]). Any interleaving of such requests is a valid order, so a
    /// packet may see one request applied and another not yet; a delta from one request that
    /// moves several assets (a reload, `POST /apply`) must use [`BpfDataplane::apply_delta`], which
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
        if delta.writes_nothing() {
            // Nothing for packets to see (a reload restating the policy with new descriptions
            // or unselected tags): no map write, no flip, flows keep their verdicts.
            self.applied.apply(&delta);
            let total = started.elapsed();
            return Ok(ApplyReport { epoch: self.epoch, entries: 0, enforced_after: total, total });
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
    pub(super) fn apply_in_place(
        &mut self,
        delta: Delta,
        started: std::time::Instant,
    ) -> Result<ApplyReport, DataplaneError> {
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
}

/// Waits until every CPU has left any RCU read-side section, so no XDP invocation that read
/// the old epoch is still running. `MEMBARRIER_CMD_GLOBAL` is `synchronize_rcu()` in the kernel.
pub(super) fn synchronize_rcu() {
    // SAFETY: membarrier takes no pointers.
    let r = unsafe {
        libc::syscall(libc::SYS_membarrier, 1 /* MEMBARRIER_CMD_GLOBAL */, 0, 0)
    };
    if r != 0 {
        // nohz_full kernels refuse it; an XDP invocation lasts microseconds, so wait well past that.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
