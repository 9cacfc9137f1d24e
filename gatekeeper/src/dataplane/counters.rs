//! Counters: outcomes per interface, rules and charged identities (per-CPU, summed), and the
//! flow tables' fill.

use std::os::fd::AsFd as _;

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use gatekeeper_common::{
    Counter, FlowKey, FlowKeyV4, FlowValue, IdDrops, LOOPBACK_IFINDEX, STATS_COUNTERS, STATS_IFINDEX_LIMIT, stats_index,
};

use super::{BpfDataplane, CounterSnapshot, DataplaneError, Stats, io_err, map_err};

impl BpfDataplane {
    /// Counters by outcome, summed over CPUs and over the interfaces counted: those attached,
    /// the loopback block (frames of `BPF_PROG_TEST_RUN`) and the shared block of large ifindexes.
    pub fn stats(&self) -> Result<Stats, DataplaneError> {
        let mut by_outcome = vec![Counter::default(); STATS_COUNTERS as usize];
        for (_, block) in self.interface_blocks(&self.counted_ifindexes())? {
            for (total, c) in by_outcome.iter_mut().zip(block) {
                *total = add(*total, c);
            }
        }
        Ok(Stats { by_outcome })
    }

    /// The ifindexes whose blocks [`BpfDataplane::stats`] sums, each once.
    fn counted_ifindexes(&self) -> Vec<u32> {
        let mut blocks = vec![0, LOOPBACK_IFINDEX];
        for &i in &self.ifindexes {
            let block = if i < STATS_IFINDEX_LIMIT { i } else { 0 };
            if !blocks.contains(&block) {
                blocks.push(block);
            }
        }
        blocks
    }

    /// The block of each of `ifindexes` in `GK_STATS`, summed over CPUs.
    fn interface_blocks(&self, ifindexes: &[u32]) -> Result<Vec<(u32, Vec<Counter>)>, DataplaneError> {
        let map = self.ebpf.map("GK_STATS").ok_or(DataplaneError::MissingMap("GK_STATS"))?;
        let stats: PerCpuArray<_, Counter> = PerCpuArray::try_from(map).map_err(map_err("GK_STATS"))?;
        ifindexes
            .iter()
            .map(|&i| {
                let block = (0..STATS_COUNTERS)
                    .map(|c| stats.get(&stats_index(i, c), 0).map(|v| sum(&v)).map_err(map_err("GK_STATS")))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((i, block))
            })
            .collect()
    }

    /// Everything `/metrics` reports of the counters: the blocks of `ifindexes`, every rule slot
    /// of the policy in force, every identity charged with drops.
    pub fn counters(&self, ifindexes: &[u32]) -> Result<CounterSnapshot, DataplaneError> {
        let interfaces = self.interface_blocks(ifindexes)?;
        let map = self.ebpf.map("GK_RULE_STATS").ok_or(DataplaneError::MissingMap("GK_RULE_STATS"))?;
        let stats: PerCpuArray<_, Counter> = PerCpuArray::try_from(map).map_err(map_err("GK_RULE_STATS"))?;
        let rules = self
            .applied
            .rule_slots
            .values()
            .filter(|&&slot| slot < stats.len())
            .map(|&slot| stats.get(&slot, 0).map(|v| (slot, sum(&v))).map_err(map_err("GK_RULE_STATS")))
            .collect::<Result<Vec<_>, _>>()?;
        let map = self.ebpf.map("GK_ID_DROPS").ok_or(DataplaneError::MissingMap("GK_ID_DROPS"))?;
        let drops: PerCpuHashMap<_, u32, IdDrops> = PerCpuHashMap::try_from(map).map_err(map_err("GK_ID_DROPS"))?;
        // An entry evicted or created while walking is missed or seen once: a key that vanished
        // between the key walk and its lookup is simply skipped.
        let id_drops = drops
            .iter()
            .filter_map(Result::ok)
            .map(|(id, per_cpu)| {
                let d = per_cpu.iter().fold(IdDrops::default(), |a, c| IdDrops {
                    dropped: a.dropped + c.dropped,
                    would_drop: a.would_drop + c.would_drop,
                });
                (id, d)
            })
            .collect();
        let size = |name: &'static str| -> Result<u32, DataplaneError> {
            match self.ebpf.map(name) {
                Some(Map::LruHashMap(data)) => Ok(data.info().map_err(map_err(name))?.max_entries()),
                _ => Err(DataplaneError::MissingMap(name)),
            }
        };
        let flow_capacity = [size("GK_FLOWS_V4")?, size("GK_FLOWS_V6")?];
        Ok(CounterSnapshot { interfaces, rules, id_drops, flow_capacity })
    }

    /// The counter of the rule in `slot`, summed over CPUs.
    pub fn rule_counter(&self, slot: u32) -> Result<Counter, DataplaneError> {
        let map = self.ebpf.map("GK_RULE_STATS").ok_or(DataplaneError::MissingMap("GK_RULE_STATS"))?;
        let stats: PerCpuArray<_, Counter> = PerCpuArray::try_from(map).map_err(map_err("GK_RULE_STATS"))?;
        Ok(sum(&stats.get(&slot, 0).map_err(map_err("GK_RULE_STATS"))?))
    }

    /// The drops charged to identity `id` so far, summed over CPUs (zero if none).
    pub fn id_drops(&self, id: u32) -> Result<IdDrops, DataplaneError> {
        let map = self.ebpf.map("GK_ID_DROPS").ok_or(DataplaneError::MissingMap("GK_ID_DROPS"))?;
        let drops: PerCpuHashMap<_, u32, IdDrops> = PerCpuHashMap::try_from(map).map_err(map_err("GK_ID_DROPS"))?;
        match drops.get(&id, 0) {
            Ok(per_cpu) => Ok(per_cpu.iter().fold(IdDrops::default(), |a, c| IdDrops {
                dropped: a.dropped + c.dropped,
                would_drop: a.would_drop + c.would_drop,
            })),
            Err(aya::maps::MapError::KeyNotFound) => Ok(IdDrops::default()),
            Err(e) => Err(map_err("GK_ID_DROPS")(e)),
        }
    }

    /// Handles of its own on the flow tables, for counting them on another thread.
    pub fn flow_counter(&self) -> Result<FlowCounter, DataplaneError> {
        let dup = |name: &'static str| -> Result<Map, DataplaneError> {
            let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
            let Map::LruHashMap(data) = map else { return Err(DataplaneError::MissingMap(name)) };
            let fd = data.fd().as_fd().try_clone_to_owned().map_err(io_err(format!("dup map {name}")))?;
            MapData::from_fd(fd).map(Map::LruHashMap).map_err(map_err(name))
        };
        Ok(FlowCounter { v4: dup("GK_FLOWS_V4")?, v6: dup("GK_FLOWS_V6")? })
    }

    /// Forgets every flow (tests use it between independent cases).
    pub fn clear_flows(&mut self) -> Result<(), DataplaneError> {
        self.clear_hash::<FlowKeyV4, FlowValue>("GK_FLOWS_V4", |_| true)?;
        self.clear_hash::<FlowKey, FlowValue>("GK_FLOWS_V6", |_| true)
    }
}

fn add(a: Counter, b: Counter) -> Counter {
    Counter { packets: a.packets + b.packets, bytes: a.bytes + b.bytes }
}

fn sum(values: &PerCpuValues<Counter>) -> Counter {
    values.iter().fold(Counter::default(), |a, c| add(a, *c))
}

/// The ifindex of interface `name` in this network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Handles of their own on the flow tables: counting walks every key (a syscall each), so it
/// runs on a thread of its own, never under the control lock.
pub struct FlowCounter {
    v4: Map,
    v6: Map,
}

impl FlowCounter {
    /// Entries in the IPv4 and the IPv6 flow table now.
    pub fn count(&self) -> Result<[usize; 2], DataplaneError> {
        let v4: HashMap<_, FlowKeyV4, FlowValue> = HashMap::try_from(&self.v4).map_err(map_err("GK_FLOWS_V4"))?;
        let v6: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(&self.v6).map_err(map_err("GK_FLOWS_V6"))?;
        Ok([v4.keys().filter(Result::is_ok).count(), v6.keys().filter(Result::is_ok).count()])
    }
}
