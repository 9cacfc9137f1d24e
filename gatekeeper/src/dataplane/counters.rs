//! Counters: outcomes and rules (per-CPU, summed), and the flow tables' fill.

use std::os::fd::AsFd as _;

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use gatekeeper_common::{Counter, FlowKey, FlowKeyV4, FlowValue, STATS_ENTRIES};

use super::{BpfDataplane, DataplaneError, Stats, io_err, map_err};

impl BpfDataplane {
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

fn sum(values: &PerCpuValues<Counter>) -> Counter {
    values.iter().fold(Counter::default(), |a, c| Counter { packets: a.packets + c.packets, bytes: a.bytes + c.bytes })
}

/// Handles of their own on the flow tables: counting walks every key (a syscall each), so it
/// runs on a thread of its own, never under the control lock.
pub struct FlowCounter {
    v4: Map,
    v6: Map,
}

impl FlowCounter {
    /// Entries in both flow tables now.
    pub fn count(&self) -> Result<usize, DataplaneError> {
        let v4: HashMap<_, FlowKeyV4, FlowValue> = HashMap::try_from(&self.v4).map_err(map_err("GK_FLOWS_V4"))?;
        let v6: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(&self.v6).map_err(map_err("GK_FLOWS_V6"))?;
        Ok(v4.keys().filter(Result::is_ok).count() + v6.keys().filter(Result::is_ok).count())
    }
}
