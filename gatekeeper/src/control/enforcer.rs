//! The one path from a validated policy to the data plane: compile (incrementally when only
//! assets change), then apply atomically. Staging and publishing are separate steps so that the
//! control layer can make a change durable between them: compiling touches no map, so a change
//! the store refuses is never seen by a packet. Whatever fails, the policy in force stays
//! exactly as it was.

use chrono::Utc;

use crate::{
    compile::{Capacity, CompileError, Compiled, Compiler, Delta, Timeouts},
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

/// A change compiled for the data plane and not yet written into it ([`Enforcer::stage`]).
#[must_use = "a staged change is published or aborted"]
pub struct Staged {
    step: Step,
    next: Next,
}

enum Step {
    Full(Compiled),
    Delta(Delta),
    Moves(Delta),
}

/// What the enforcer's policy becomes once published: the staged policy, or (assets staged in
/// place) the assets to put back on an abort.
enum Next {
    Policy(Policy),
    Assets { undo: Vec<(String, Option<Asset>)> },
}

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

    /// Compiles `policy` (only the changed assets when only assets differ from the policy in
    /// force) without touching the data plane: no packet sees it until it is published, so the
    /// caller can make the change durable first and [`Enforcer::abort`] it if that fails.
    pub fn stage(&mut self, policy: Policy) -> Result<Staged, EnforceError> {
        let now = Utc::now();
        let same_rules = self.policy.segments == policy.segments && self.policy.rules == policy.rules;
        let changed = if same_rules { changed_assets(&self.policy, &policy) } else { vec![] };
        // Incremental pays per changed asset, a full compile per asset in the policy: when a
        // large share changes (a reload restating the assets), the full compile is cheaper.
        let step = if same_rules && changed.len() <= policy.assets.len() / INCREMENTAL_SHARE {
            let names: Vec<&str> = changed.iter().map(String::as_str).collect();
            Step::Delta(self.compiler.update_assets(&policy, &names, self.dataplane.applied(), now)?)
        } else {
            Step::Full(self.compiler.compile(&policy, now)?)
        };
        Ok(Staged { step, next: Next::Policy(policy) })
    }

    /// Like [`Enforcer::stage`] for replacing (or with `None` removing) assets by name (each at
    /// most once), compiling only those changes: the path of tag edits. Until the staged change
    /// is published or aborted, [`Enforcer::policy`] already shows it; the data plane does not.
    pub fn stage_assets(&mut self, changes: Vec<(String, Option<Asset>)>) -> Result<Staged, EnforceError> {
        // Only the changed assets are saved for a rollback: cloning the whole list would make
        // a tag edit cost as much as the policy is large.
        let mut undo: Vec<(String, Option<Asset>)> = Vec::with_capacity(changes.len());
        for (name, asset) in changes {
            let previous = self.index.get(&name).map(|&i| self.policy.assets[i].clone());
            self.put_asset(&name, asset);
            undo.push((name, previous));
        }
        let given: Vec<(&str, Option<&Asset>)> =
            undo.iter().map(|(n, _)| (n.as_str(), self.index.get(n).map(|&i| &self.policy.assets[i]))).collect();
        match self.compiler.update_assets_given(&self.policy, &given, self.dataplane.applied(), Utc::now()) {
            // Each change is one request's asset: the moves may be written in place.
            Ok(delta) => Ok(Staged { step: Step::Moves(delta), next: Next::Assets { undo } }),
            Err(e) => {
                self.unstage(Next::Assets { undo });
                Err(e.into())
            }
        }
    }

    /// Writes a staged change into the data plane, atomically for traffic. On error the policy
    /// in force is unchanged.
    pub fn publish(&mut self, staged: Staged) -> Result<ApplyReport, EnforceError> {
        let result = match staged.step {
            Step::Full(compiled) => self.dataplane.apply(compiled),
            Step::Delta(delta) => self.dataplane.apply_delta(delta),
            Step::Moves(delta) => self.dataplane.apply_moves(delta),
        };
        match result {
            Ok(report) => {
                if let Next::Policy(policy) = staged.next {
                    self.policy = policy;
                    self.reindex();
                }
                Ok(report)
            }
            Err(e) => {
                self.unstage(staged.next);
                Err(e.into())
            }
        }
    }

    /// Drops a staged change (the store refused it): the data plane never saw it.
    pub fn abort(&mut self, staged: Staged) {
        self.unstage(staged.next);
    }

    fn unstage(&mut self, next: Next) {
        if let Next::Assets { undo } = next {
            for (name, previous) in undo.into_iter().rev() {
                self.put_asset(&name, previous);
            }
        }
        // The compiler moved ahead of the maps: compile the next change in full.
        self.compiler.reset();
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
