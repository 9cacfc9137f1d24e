//! Writing one generation of the policy maps: entries of a [`Delta`], a generation rebuilt in
//! full, rule counters zeroed for a new rule.

use aya::maps::{Array, HashMap, LpmTrie, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key};
use gatekeeper_common::{
    Counter, GenConfig, HostV4, HostV6, Identity, LpmV4, LpmV6, PolicyKey, PolicyValue, port_class_index,
};

use super::{BpfDataplane, DataplaneError, io_err, map_err};
use crate::compile::{Compiled, Delta, diff};

impl BpfDataplane {
    /// Rewrites generation `generation` from scratch from `self.applied`.
    pub(super) fn rebuild_generation(&mut self, generation: u32) -> Result<(), DataplaneError> {
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
    pub(super) fn clear_hash<K: aya::Pod, V: aya::Pod>(
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
    pub(super) fn clear_lpm<K: aya::Pod>(
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

    pub(super) fn zero_rule_counter(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, source)| DataplaneError::Io { what: what.into(), source })?;
        let mut stats: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(self.map("GK_RULE_STATS")?).map_err(map_err("GK_RULE_STATS"))?;
        let zeros = PerCpuValues::try_from(vec![Counter::default(); cpus]).map_err(io_err("per-CPU values"))?;
        stats.set(slot, zeros, 0).map_err(map_err("GK_RULE_STATS"))
    }

    /// Writes one family's prefixes: host prefixes (`key` gives `Ok`) into the host hash named
    /// first, shorter ones (`Err`) into the LPM trie named second.
    pub(super) fn write_prefixes<N, H: aya::Pod, L: aya::Pod>(
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
    pub(super) fn write(&mut self, generation: u32, delta: &Delta) -> Result<(), DataplaneError> {
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
