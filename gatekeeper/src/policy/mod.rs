//! The policy core: the declarative document and its validation ([`document`], re-exported
//! here), tag [`selector`]s, segment [`membership`], the [`reference`] model of the data-plane
//! semantics, and the [`diff`] between two documents.
//!
//! Pure: std, serde (YAML through serde-saphyr), ipnet, chrono and the constants of
//! `gatekeeper-common`; no aya, no axum, no store. Everything above (compiler, data plane,
//! control, edges) builds on it.

pub mod diff;
pub mod document;
pub mod membership;
pub mod reference;
pub mod selector;

pub use document::*;
