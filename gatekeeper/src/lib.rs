//! Gatekeeper: agentless microsegmentation for OT networks.
//!
//! * [`policy`]: the declarative document and its validation; [`selector`]: tag selectors.
//! * [`segment`]: which addresses belong to which segments.
//! * [`compile`]: policy to map contents, with stable numbering and small deltas.
//! * [`maps`]: loading the XDP program, writing a compiled policy atomically, reading counters.
//! * [`reference`]: the plain-Rust reference model of the data-plane semantics.
//! * [`config`], [`daemon`]: the `gatekeeper run` daemon; [`api`], [`cli`], [`store`]: its REST API,
//!   command line and embedded store; [`tls`]: the API's HTTPS; [`metrics`]: Prometheus metrics.
//! * [`netskope`]: Netskope One private apps follow segment membership.
pub mod api;
pub mod cli;
pub mod compile;
pub mod config;
pub mod daemon;
pub mod maps;
pub mod metrics;
pub mod netskope;
pub mod policy;
pub mod reference;
pub mod segment;
pub mod selector;
pub mod store;
pub mod tls;
