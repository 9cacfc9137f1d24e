//! XDP links: attaching to bridge ports (pinned, or swapped atomically onto a running
//! enforcement's pinned link) and detaching.

use aya::programs::{
    XdpMode,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};

use super::{BpfDataplane, DataplaneError, XdpAttachMode, io_err, pin::remove_pins};

impl BpfDataplane {
    /// Attaches to `interface`; returns the mode used ("native" or "generic"), or "replaced"
    /// when the program was swapped onto a pinned link already on the interface.
    pub fn attach(&mut self, interface: &str, mode: XdpAttachMode) -> Result<&'static str, DataplaneError> {
        if let Some((dir, vdir)) = self.pin_dir.clone() {
            // A pinned link of this or an older layout: swap our program onto it atomically.
            let mut candidates = vec![vdir.join("links").join(interface)];
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.filter_map(Result::ok) {
                    let p = e.path().join("links").join(interface);
                    if e.path() != vdir && p.exists() {
                        candidates.push(p);
                    }
                }
            }
            for path in candidates.into_iter().filter(|p| p.exists()) {
                let link_err = |source| DataplaneError::Link { path: path.clone(), source };
                let replaced = PinnedLink::from_pin(&path).map_err(link_err).and_then(|pinned| {
                    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
                    Ok(self.program_mut()?.attach_to_link(link)?)
                });
                match replaced {
                    Ok(id) => {
                        let link = self.program_mut()?.take_link(id)?;
                        let own = vdir.join("links").join(interface);
                        let fd = FdLink::try_from(link)
                            .map_err(|source| DataplaneError::Link { path: own.clone(), source })?;
                        if path != own {
                            let _ = std::fs::remove_file(&path);
                        }
                        let _ = std::fs::remove_file(&own);
                        let pinned =
                            fd.pin(&own).map_err(|source| DataplaneError::Pin { path: own.clone(), source })?;
                        self.pinned.push((interface.to_string(), pinned, "replaced"));
                        self.note_ifindex(interface);
                        return Ok("replaced");
                    }
                    Err(e) => {
                        tracing::warn!(link = %path.display(), error = %e, "stale link pin; removing it");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        let tries: &[(XdpMode, &'static str)] = match mode {
            XdpAttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
            XdpAttachMode::Native => &[(XdpMode::Driver, "native")],
            XdpAttachMode::Generic => &[(XdpMode::Skb, "generic")],
        };
        let mut last = None;
        for &(m, name) in tries {
            match self.program_mut()?.attach(interface, m) {
                Ok(id) => {
                    if let Some((_, vdir)) = self.pin_dir.clone() {
                        let link = self.program_mut()?.take_link(id)?;
                        let path = vdir.join("links").join(interface);
                        let fd = FdLink::try_from(link)
                            .map_err(|source| DataplaneError::Link { path: path.clone(), source })?;
                        let pinned =
                            fd.pin(&path).map_err(|source| DataplaneError::Pin { path: path.clone(), source })?;
                        self.pinned.push((interface.to_string(), pinned, name));
                    } else {
                        self.links.push((interface.to_string(), id, name));
                    }
                    self.note_ifindex(interface);
                    return Ok(name);
                }
                Err(error) => last = Some((name, error)),
            }
        }
        let Some((mode, error)) = last else { unreachable!("every attach mode has at least one try") };
        Err(DataplaneError::Attach { interface: interface.to_string(), mode, error })
    }

    /// Remembers the ifindex of an interface just attached, resolved now: this thread is in the
    /// interface's network namespace, which a later reader (the counters) may not be.
    fn note_ifindex(&mut self, interface: &str) {
        if let Some(i) = super::ifindex(interface)
            && !self.ifindexes.contains(&i)
        {
            self.ifindexes.push(i);
        }
    }

    /// Interfaces attached, with their mode.
    pub fn attachments(&self) -> Vec<(String, &'static str)> {
        self.links
            .iter()
            .map(|(i, _, m)| (i.clone(), *m))
            .chain(self.pinned.iter().map(|(i, _, m)| (i.clone(), *m)))
            .collect()
    }

    /// Detaches from every interface (traffic then flows unfiltered) and removes every pin.
    pub fn detach_all(&mut self) -> Result<(), DataplaneError> {
        for (_, pinned, _) in std::mem::take(&mut self.pinned) {
            // Unpinning leaves us the last reference; dropping it detaches.
            let _ = pinned.unpin();
        }
        if let Some((dir, _)) = self.pin_dir.take() {
            remove_pins(&dir).map_err(io_err(format!("removing {}", dir.display())))?;
        }
        let links = std::mem::take(&mut self.links);
        self.ifindexes.clear();
        let mut first_err = None;
        for (_, id, _) in links {
            if let Err(e) = self.program_mut()?.detach(id) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), |e| Err(e.into()))
    }
}
