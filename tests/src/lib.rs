//! Test support for gatekeeper: hand-built frames for BPF_PROG_TEST_RUN and a lab of network
//! namespaces (hosts, a bridge appliance, veth links) for real traffic. `cargo xtask demo` uses
//! the same lab. [`netskope_fake`] is a fake Netskope One tenant for the integration's tests;
//! [`control`] the control state the API, TLS and Netskope tests serve.
pub mod control;
pub mod lab;
pub mod netskope_fake;
pub mod packet;
pub mod python;
