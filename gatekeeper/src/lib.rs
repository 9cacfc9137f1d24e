//! Gatekeeper: agentless microsegmentation for OT networks.
//!
//! Layers, each importing only those below it (a test, `tests/layers.rs`, holds the code to it):
//!
//! 1. [`policy`], the policy core: the document and its validation, selectors, segment
//!    membership, the reference model, the diff between documents. Pure.
//! 2. [`compile`]: policy to map contents, with stable numbering and small deltas.
//! 3. [`dataplane`]: loading, pinning and attaching the XDP program, atomic generations, map
//!    writes, counters, test runs; an in-memory fake behind the same trait.
//! 4. [`control`]: the one change path (validate, compile, commit with its audit, then enforce), the store,
//!    the Netskope integration's state and generated objects, credentials, telemetry. [`tls`]
//!    (certificates, the server configuration) sits beside it for the edges.
//! 5. Edges, which never import each other: [`api`] (REST, with its Netskope routes), [`cli`],
//!    [`metrics`], [`netskope_sync`] (the worker talking to Netskope).
//! 6. The daemon wiring: [`daemon`] and its [`config`], the only modules that read the
//!    configuration and start the edges; [`logging`], the process's log set-up.
pub mod api;
pub mod cli;
pub mod compile;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod logging;
pub mod metrics;
pub mod netskope_sync;
pub mod policy;
pub mod tls;
