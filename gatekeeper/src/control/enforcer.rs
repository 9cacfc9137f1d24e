//! The one path from a validated policy to the data plane: compile (incrementally when only
//! assets change), then apply atomically. Whatever fails, the policy in force stays exactly as
//! it was.

use chrono::Utc;

use crate::{
    compile::{Capacity, CompileError, Compiler, Timeouts},
    dataplane::{ApplyReport, BpfDataplane, Dataplane, DataplaneError, LoadOptions, fake::FakeDataplane},
    policy::{Asset, Policy, PolicyError, diff::changed_assets},
};

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("policy does not fit the data plane: {0}")]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// Above one changed asset in this many, a change is compiled in full rather than incrementally.
const INCREMENTAL_SHARE: usize = 8;

/// The one path from a desired policy to the data plane: compile, then apply atomically.
/// Whatever fails, the policy in force stays exactly as it was.
pub struct Enforcer {
    compiler: Compiler,
    dataplane: Box<dyn Dataplane>,
    policy: Policy,
    /// Asset name to its position in `policy.assets`.
    index: std::collections::HashMap<String, usize>,
}

impl Enforcer {
    /// An enforcer over `dataplane`, whose maps hold `capacity` per generation.
    pub fn new(dataplane: Box<dyn Dataplane>, timeouts: Timeouts, capacity: Capacity) -> Self {
        Self {
            compiler: Compiler::new(timeouts, capacity),
            dataplane,
            policy: Policy::default(),
            index: Default::default(),
        }
    }

    /// An enforcer over the XDP program loaded with `options` (pinned when `options` says so).
    pub fn with_options(options: LoadOptions, timeouts: Timeouts) -> Result<Self, EnforceError> {
        let capacity = options.capacity();
        Ok(Self::new(Box::new(BpfDataplane::load(options)?), timeouts, capacity))
    }

    /// An enforcer over the in-memory data plane (control-plane tests without root).
    pub fn fake(timeouts: Timeouts) -> Self {
        let options = LoadOptions::default();
        Self::new(Box::new(FakeDataplane::new(&options)), timeouts, options.capacity())
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// What one policy generation may hold.
    pub fn capacity(&self) -> Capacity {
        self.compiler.capacity
    }

    pub fn dataplane(&self) -> &dyn Dataplane {
        self.dataplane.as_ref()
    }

    pub fn dataplane_mut(&mut self) -> &mut dyn Dataplane {
        self.dataplane.as_mut()
    }

    /// Puts `policy` in force. When only assets differ from the policy in force, only the
    /// changed assets are compiled.
    pub fn apply(&mut self, policy: Policy) -> Result<ApplyReport, EnforceError> {
        let now = Utc::now();
        let same_rules = self.policy.segments == policy.segments && self.policy.rules == policy.rules;
        let changed = if same_rules { changed_assets(&self.policy, &policy) } else { vec![] };
        // Incremental pays per changed asset, a full compile per asset in the policy: when a
        // large share changes (a reload restating the assets), the full compile is cheaper.
        let result = if same_rules && changed.len() <= policy.assets.len() / INCREMENTAL_SHARE {
            let names: Vec<&str> = changed.iter().map(String::as_str).collect();
            let delta = self.compiler.update_assets(&policy, &names, self.dataplane.applied(), now)?;
            self.dataplane.apply_delta(delta)
        } else {
            let compiled = self.compiler.compile(&policy, now)?;
            self.dataplane.apply(compiled)
        };
        match result {
            Ok(report) => {
                self.policy = policy;
                self.reindex();
                Ok(report)
            }
            Err(e) => {
                // The compiler moved ahead of the maps: compile the next change in full.
                self.compiler.reset();
                Err(e.into())
            }
        }
    }

    /// Replaces (or with `None` removes) assets of the policy in force, by name (each at most
    /// once), and compiles only those changes: the path of tag edits. On error the policy in
    /// force is unchanged.
    pub fn apply_assets(&mut self, changes: Vec<(String, Option<Asset>)>) -> Result<ApplyReport, EnforceError> {
        // Only the changed assets are saved for a rollback: cloning the whole list would make
        // a tag edit cost as much as the policy is large.
        let mut undo: Vec<(String, Option<Asset>)> = Vec::with_capacity(changes.len());
        for (name, asset) in &changes {
            let previous = self.index.get(name).map(|&i| self.policy.assets[i].clone());
            undo.push((name.clone(), previous));
            self.put_asset(name, asset.clone());
        }
        let given: Vec<(&str, Option<&Asset>)> =
            changes.iter().map(|(n, _)| (n.as_str(), self.index.get(n).map(|&i| &self.policy.assets[i]))).collect();
        let result = self
            .compiler
            .update_assets_given(&self.policy, &given, self.dataplane.applied(), Utc::now())
            .map_err(EnforceError::from)
            // Each change is one request's asset: the moves may be written in place.
            .and_then(|delta| self.dataplane.apply_moves(delta).map_err(EnforceError::from));
        if result.is_err() {
            // Put the assets back as they were; the compiler starts over from a full compile.
            for (name, previous) in undo.into_iter().rev() {
                self.put_asset(&name, previous);
            }
            self.compiler.reset();
        }
        result
    }

    /// Sets, adds or (with `None`) removes one asset. Order does not matter to the compiler,
    /// so removal swaps the last asset into the hole.
    fn put_asset(&mut self, name: &str, asset: Option<Asset>) {
        match (self.index.get(name).copied(), asset) {
            (Some(i), Some(a)) => self.policy.assets[i] = a,
            (Some(i), None) => {
                self.policy.assets.swap_remove(i);
                self.index.remove(name);
                if let Some(moved) = self.policy.assets.get(i) {
                    self.index.insert(moved.name.clone(), i);
                }
            }
            (None, Some(a)) => {
                self.index.insert(a.name.clone(), self.policy.assets.len());
                self.policy.assets.push(a);
            }
            (None, None) => {}
        }
    }

    fn reindex(&mut self) {
        self.index = self.policy.assets.iter().enumerate().map(|(i, a)| (a.name.clone(), i)).collect();
    }

    /// Compiles the policy in force again in full (a rule expired).
    pub fn refresh(&mut self) -> Result<ApplyReport, EnforceError> {
        let compiled = self.compiler.compile(&self.policy, Utc::now())?;
        Ok(self.dataplane.apply(compiled)?)
    }
}
