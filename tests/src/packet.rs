//! Ethernet frames built by hand for BPF_PROG_TEST_RUN: every header the data plane parses,
//! with knobs for the awkward cases (VLAN stacks, extension headers, fragments, truncation).

use std::net::IpAddr;

/// What to put above the IP header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP (v4) or ICMPv6, by the packet's family.
    Icmp {
        ty: u8,
        id: u16,
    },
    /// Any other protocol number with a few payload bytes.
    Other {
        proto: u8,
    },
}

impl L4 {
    pub fn proto(&self, v6: bool) -> u8 {
        match self {
            Self::Tcp { .. } => 6,
            Self::Udp { .. } => 17,
            Self::Icmp { .. } => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            Self::Other { proto } => *proto,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match *self {
            Self::Tcp { sport, dport } => {
                let mut b = vec![0u8; 20];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[12] = 5 << 4;
                b[13] = 0x02; // SYN
                b
            }
            Self::Udp { sport, dport } => {
                let mut b = vec![0u8; 8];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[4..6].copy_from_slice(&8u16.to_be_bytes());
                b
            }
            Self::Icmp { ty, id } => {
                let mut b = vec![0u8; 8];
                b[0] = ty;
                b[4..6].copy_from_slice(&id.to_be_bytes());
                b
            }
            Self::Other { .. } => vec![0xab; 8],
        }
    }
}

/// A frame description; [`Frame::build`] renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// VLAN tags, outermost first: (TPID, VLAN id).
    pub vlans: Vec<(u16, u16)>,
    /// IPv6 extension headers before the L4 header: (type, length field). Type 44 is a fragment
    /// header whose length field is taken as the fragment offset (in 8-octet units).
    pub ext: Vec<(u8, u8)>,
    /// IPv4 fragment offset in 8-octet units (0 = first or unfragmented).
    pub frag_offset: u16,
    /// IPv4 header words (IHL); 5 is a plain header.
    pub ihl: u8,
    /// Overwrite the IP version nibble (None: correct).
    pub version: Option<u8>,
    /// Cut the frame to this many bytes.
    pub truncate: Option<usize>,
}

impl Frame {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self { src, dst, l4, vlans: vec![], ext: vec![], frag_offset: 0, ihl: 5, version: None, truncate: None }
    }

    /// The reply: addresses and ports swapped (ICMP echo request becomes reply).
    pub fn reply(&self) -> Self {
        let l4 = match self.l4 {
            L4::Tcp { sport, dport } => L4::Tcp { sport: dport, dport: sport },
            L4::Udp { sport, dport } => L4::Udp { sport: dport, dport: sport },
            L4::Icmp { ty, id } => L4::Icmp {
                ty: match ty {
                    8 => 0,
                    128 => 129,
                    t => t,
                },
                id,
            },
            ref other => other.clone(),
        };
        Self { src: self.dst, dst: self.src, l4, ..self.clone() }
    }

    pub fn build(&self) -> Vec<u8> {
        let v6 = self.src.is_ipv6();
        let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        let mut ethertype = if v6 { 0x86ddu16 } else { 0x0800 };
        if !self.vlans.is_empty() {
            f.extend_from_slice(&self.vlans[0].0.to_be_bytes());
            for (i, &(_, vid)) in self.vlans.iter().enumerate() {
                f.extend_from_slice(&vid.to_be_bytes());
                let next = self.vlans.get(i + 1).map_or(ethertype, |v| v.0);
                f.extend_from_slice(&next.to_be_bytes());
            }
            ethertype = 0; // already written
        }
        if ethertype != 0 {
            f.extend_from_slice(&ethertype.to_be_bytes());
        }
        let l4 = self.l4.bytes();
        let proto = self.l4.proto(v6);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let opts = usize::from(self.ihl.saturating_sub(5)) * 4;
                let total = 20 + opts + l4.len();
                let mut ip = vec![0u8; 20 + opts];
                ip[0] = (self.version.unwrap_or(4) << 4) | (self.ihl & 0x0f);
                ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                ip[6..8].copy_from_slice(&(self.frag_offset & 0x1fff).to_be_bytes());
                ip[8] = 64;
                ip[9] = proto;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                f.extend_from_slice(&ip);
            }
            (s, d) => {
                let to16 = |a: IpAddr| match a {
                    IpAddr::V6(a) => a.octets(),
                    IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                };
                let mut chain = Vec::new();
                let kinds: Vec<u8> = self.ext.iter().map(|e| e.0).chain(std::iter::once(proto)).collect();
                for (i, &(ty, len)) in self.ext.iter().enumerate() {
                    let next = kinds[i + 1];
                    match ty {
                        44 => {
                            let off = u16::from(len) << 3;
                            chain.extend_from_slice(&[next, 0]);
                            chain.extend_from_slice(&off.to_be_bytes());
                            chain.extend_from_slice(&[0, 0, 0, 1]);
                        }
                        51 => {
                            let size = (usize::from(len) + 2) * 4;
                            let mut h = vec![0u8; size];
                            h[0] = next;
                            h[1] = len;
                            chain.extend_from_slice(&h);
                        }
                        _ => {
                            let size = (usize::from(len) + 1) * 8;
                            let mut h = vec![0u8; size];
                            h[0] = next;
                            h[1] = len;
                            chain.extend_from_slice(&h);
                        }
                    }
                }
                let mut ip = vec![0u8; 40];
                ip[0] = self.version.unwrap_or(6) << 4;
                ip[4..6].copy_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
                ip[6] = kinds[0];
                ip[7] = 64;
                ip[8..24].copy_from_slice(&to16(s));
                ip[24..40].copy_from_slice(&to16(d));
                f.extend_from_slice(&ip);
                f.extend_from_slice(&chain);
            }
        }
        f.extend_from_slice(&l4);
        if let Some(n) = self.truncate {
            f.truncate(n.max(14));
        }
        f
    }
}

/// A non-IP frame (ARP request).
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0; 20]);
    f
}

#[cfg(test)]
mod tests {
    use gatekeeper::policy::reference::{Frame as Parsed, parse};

    use super::*;

    #[test]
    fn frames_parse_as_described() {
        let f = Frame::new("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), L4::Tcp { sport: 1, dport: 502 });
        let Parsed::Ip(h) = parse(&f.build()) else { panic!() };
        assert_eq!(h.ports, Some((1, 502)));
        let mut g = Frame::new("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap(), L4::Udp { sport: 7, dport: 9 });
        g.ext = vec![(0, 0), (60, 1), (51, 1), (44, 0)];
        g.vlans = vec![(0x88a8, 1), (0x8100, 2)];
        let Parsed::Ip(h) = parse(&g.build()) else { panic!() };
        assert_eq!((h.ports, h.malformed), (Some((7, 9)), false));
        g.ext.push((44, 3));
        let Parsed::Ip(h) = parse(&g.build()) else { panic!() };
        assert_eq!((h.ports, h.proto), (None, 17), "later fragment: no ports");
        assert_eq!(parse(&arp()), Parsed::NonIp);
    }
}
