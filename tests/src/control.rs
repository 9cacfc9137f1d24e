//! The control state the API, TLS and Netskope tests serve, built as `gatekeeper run` builds it.
//!
//! Those tests need a data plane only because the control layer enforces every change: as root
//! they run over the loaded XDP program; without root (or with `GK_FAKE_DATAPLANE=1`) over the
//! in-memory fake, whose verdicts follow the same compiled maps.

use std::path::Path;

use gatekeeper::{
    compile::Timeouts,
    control::{Control, Enforcer, Handle, Store, expiry},
    dataplane::LoadOptions,
};

/// Whether the tests run over the in-memory data plane.
pub fn fake_dataplane() -> bool {
    // SAFETY: geteuid has no preconditions.
    std::env::var_os("GK_FAKE_DATAPLANE").is_some_and(|v| v == "1") || unsafe { libc::geteuid() } != 0
}

/// An enforcer over the XDP program (root) or the in-memory fake (see [`fake_dataplane`]).
pub fn enforcer() -> Enforcer {
    if fake_dataplane() {
        Enforcer::fake(Timeouts::default())
    } else {
        Enforcer::with_options(LoadOptions::default(), Timeouts::default())
            .expect("load the XDP program (root; GK_FAKE_DATAPLANE=1 runs over the in-memory data plane)")
    }
}

/// The control state over the store at `store_path`: the stored state (and Netskope
/// integration) loaded and enforced, with rule expiry running as in the daemon.
pub fn control(store_path: &Path) -> Handle {
    let store = Store::open(store_path).expect("open the store");
    let prepared = Control::prepare(store, None, None, "store").expect("the stored state is valid");
    let (control, _) = prepared.enforce(enforcer()).expect("enforce the stored state");
    let handle = Handle::new(control);
    expiry::spawn(&handle).expect("start the expiry thread");
    handle
}
