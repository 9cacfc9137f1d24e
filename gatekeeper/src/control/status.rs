//! The status readers see without waiting for the control lock: published after each change,
//! with the flow count sampled on a thread of its own (counting walks the whole flow table).

use std::{
    sync::{Arc, RwLock, Weak},
    time::Duration,
};

use chrono::{DateTime, Utc};

use crate::{compile::Capacity, dataplane::FlowCounter};

/// What `GET /status` shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusView {
    pub epoch: u32,
    /// When the last change was applied, and how long it took (ms).
    pub last_apply: Option<(DateTime<Utc>, f64)>,
    pub interfaces: Vec<(String, &'static str)>,
    /// Assets, segments, rules.
    pub objects: [usize; 3],
    /// IPv4 hosts, IPv4 prefixes, IPv6 hosts, IPv6 prefixes.
    pub prefixes: [usize; 4],
    pub policy_entries: usize,
    pub rules: usize,
    pub capacity: Capacity,
    /// Entries in the flow tables at the last sample (`None`: not sampled yet, or no table).
    pub flows: Option<usize>,
    /// The same, per table: IPv4, IPv6.
    pub flows_by_family: Option<[usize; 2]>,
}

#[derive(Debug, Default)]
pub struct StatusBoard {
    view: RwLock<StatusView>,
}

impl StatusBoard {
    /// Replaces the view; the flow sample stays.
    pub fn publish(&self, view: StatusView) {
        let mut v = self.view.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *v = StatusView { flows: v.flows, flows_by_family: v.flows_by_family, ..view };
    }

    pub fn get(&self) -> StatusView {
        self.view.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_flows(&self, n: [usize; 2]) {
        let mut v = self.view.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        v.flows = Some(n[0] + n[1]);
        v.flows_by_family = Some(n);
    }
}

/// Counts the flow tables every `every` into `board`, until the board is dropped.
pub fn spawn_flow_sampler(
    counter: FlowCounter,
    board: &Arc<StatusBoard>,
    every: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let board: Weak<StatusBoard> = Arc::downgrade(board);
    std::thread::Builder::new().name("gk-flows".into()).spawn(move || {
        loop {
            let Some(b) = board.upgrade() else { return };
            match counter.count() {
                Ok(n) => b.set_flows(n),
                Err(e) => tracing::warn!(error = %e, "counting the flow tables failed"),
            }
            drop(b);
            std::thread::sleep(every);
        }
    })
}
