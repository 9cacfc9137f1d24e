//! Segment membership: which assets and prefixes belong to which segments.
//!
//! An address belongs to every segment that selects it, either through an asset whose tags
//! match the segment's selector (all of the asset's prefixes) or through the segment's own
//! `cidrs`. [`selects`] is the one definition of an asset's membership; everything else here
//! (and the compiler, the API's member listings, the Netskope mappings) goes through it. Because the data plane answers with the *longest* matching prefix, each prefix is
//! given the union of its own segments and those of every prefix containing it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;

use crate::policy::{Asset, Mode, Policy, Segment};

/// Segment indices (into `Policy::segments`), sorted.
pub type SegmentSet = BTreeSet<usize>;

/// Whether an asset with `tags` is a member of `segment` (segments without a selector hold
/// only their CIDRs).
pub fn selects(segment: &Segment, tags: &BTreeMap<String, String>) -> bool {
    segment.selector.as_ref().is_some_and(|sel| sel.matches(tags))
}

/// The assets that are members of `segment`.
pub fn member_assets<'a>(policy: &'a Policy, segment: &'a Segment) -> impl Iterator<Item = &'a Asset> + 'a {
    policy.assets.iter().filter(|a| selects(segment, &a.tags))
}

/// The segments (indices into `segments`) an asset with `tags` is a member of.
pub fn segments_of_asset(segments: &[Segment], tags: &BTreeMap<String, String>) -> Vec<usize> {
    segments.iter().enumerate().filter(|(_, s)| selects(s, tags)).map(|(i, _)| i).collect()
}

/// The addresses of the members of the segment named `segment`: its assets' prefixes and its own
/// CIDRs (empty for an unknown segment).
pub fn member_addresses(policy: &Policy, segment: &str) -> BTreeSet<IpNet> {
    let mut out = BTreeSet::new();
    let Some(seg) = policy.segments.iter().find(|s| s.name == segment) else { return out };
    out.extend(seg.cidrs.iter().copied());
    for a in member_assets(policy, seg) {
        out.extend(a.prefixes.iter().copied());
    }
    out
}

/// The prefixes a segment in `enforce` or `monitor` mode governs: its CIDRs and its members'
/// addresses. What an apply may not silently leave ungoverned.
pub fn governed(policy: &Policy) -> BTreeSet<IpNet> {
    let governs = |s: &Segment| matches!(s.mode, Mode::Enforce | Mode::Monitor);
    let mut out: BTreeSet<IpNet> =
        policy.segments.iter().filter(|s| governs(s)).flat_map(|s| s.cidrs.iter().copied()).collect();
    // Through the tag index: one pass over the assets, not one per segment.
    for (asset, segments) in policy.assets.iter().zip(segments_by_asset(policy)) {
        if segments.iter().any(|&i| governs(&policy.segments[i])) {
            out.extend(asset.prefixes.iter().copied());
        }
    }
    out
}

/// For each asset (by index into `policy.assets`), the segments selecting it, in segment order.
/// A selector with an `=`/`in` requirement only looks at the assets carrying one of its tags.
pub fn segments_by_asset(policy: &Policy) -> Vec<Vec<usize>> {
    let mut by_tag: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    for (i, asset) in policy.assets.iter().enumerate() {
        for (k, v) in &asset.tags {
            by_tag.entry((k.as_str(), v.as_str())).or_default().push(i);
        }
    }
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); policy.assets.len()];
    for (s, segment) in policy.segments.iter().enumerate() {
        let Some(selector) = &segment.selector else { continue };
        let mut consider = |i: usize| {
            // Candidates may list an asset twice (two of its tags): count it once.
            if selects(segment, &policy.assets[i].tags) && out[i].last() != Some(&s) {
                out[i].push(s);
            }
        };
        match selector.candidates() {
            Some(pairs) => pairs
                .iter()
                .flat_map(|p| by_tag.get(p).map(Vec::as_slice).unwrap_or_default())
                .for_each(|&i| consider(i)),
            None => (0..policy.assets.len()).for_each(consider),
        }
    }
    out
}

/// For each asset prefix or segment CIDR: the segments that name it directly.
pub fn direct_members(policy: &Policy) -> HashMap<IpNet, SegmentSet> {
    let mut direct: HashMap<IpNet, SegmentSet> = HashMap::new();
    for (s, segment) in policy.segments.iter().enumerate() {
        for net in &segment.cidrs {
            direct.entry(*net).or_default().insert(s);
        }
    }
    for (asset, segments) in policy.assets.iter().zip(segments_by_asset(policy)) {
        for net in &asset.prefixes {
            direct.entry(*net).or_default().extend(segments.iter().copied());
        }
    }
    direct
}

/// The set of segments of each prefix: its own plus those of every prefix containing it.
pub fn effective(direct: &HashMap<IpNet, SegmentSet>) -> HashMap<IpNet, SegmentSet> {
    let mut lengths: [BTreeSet<u8>; 2] = [BTreeSet::new(), BTreeSet::new()];
    for net in direct.keys() {
        lengths[usize::from(matches!(net, IpNet::V6(_)))].insert(net.prefix_len());
    }
    direct
        .iter()
        .map(|(net, own)| {
            let mut set = own.clone();
            for &len in lengths[usize::from(matches!(net, IpNet::V6(_)))].range(..net.prefix_len()) {
                let Ok(outer) = IpNet::new(net.addr(), len) else { continue };
                if let Some(segs) = direct.get(&outer.trunc()) {
                    set.extend(segs);
                }
            }
            (*net, set)
        })
        .collect()
}

/// The segments an address belongs to, straight from the definition (used by the reference
/// model and for `members` listings; the compiler uses the prefix tables above).
pub fn segments_of(policy: &Policy, addr: std::net::IpAddr) -> SegmentSet {
    let mut set = SegmentSet::new();
    for (s, segment) in policy.segments.iter().enumerate() {
        let by_cidr = segment.cidrs.iter().any(|n| n.contains(&addr));
        let by_asset = || member_assets(policy, segment).any(|a| a.prefixes.iter().any(|n| n.contains(&addr)));
        if by_cidr || by_asset() {
            set.insert(s);
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyDocument;

    fn policy(yaml: &str) -> Policy {
        PolicyDocument::from_yaml(yaml, "t").unwrap().validate("t").unwrap()
    }

    #[test]
    fn nested_prefixes_combine() {
        let p = policy(
            r#"
assets:
  - {name: plc, ips: [10.0.0.10], tags: {role: plc}}
  - {name: lab, ips: [10.0.0.0/28], tags: {role: lab}}
segments:
  - {name: plant, cidrs: [10.0.0.0/16]}
  - {name: plc, selector: role=plc}
  - {name: lab, selector: role=lab}
"#,
        );
        let eff = effective(&direct_members(&p));
        let get = |s: &str| eff[&s.parse::<IpNet>().unwrap()].iter().copied().collect::<Vec<_>>();
        assert_eq!(get("10.0.0.10/32"), vec![0, 1, 2]);
        assert_eq!(get("10.0.0.0/28"), vec![0, 2]);
        assert_eq!(get("10.0.0.0/16"), vec![0]);
        for addr in ["10.0.0.10", "10.0.0.3", "10.0.9.9", "10.1.0.0"] {
            let addr = addr.parse().unwrap();
            let lpm = eff
                .iter()
                .filter(|(n, _)| n.contains(&addr))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            assert_eq!(lpm, segments_of(&p, addr), "{addr}");
        }
    }

    #[test]
    fn governed_addresses_are_those_of_enforce_and_monitor_segments() {
        let p = policy(
            r#"
assets:
  - {name: a, ips: [10.0.0.1], tags: {role: plc}}
  - {name: b, ips: [10.0.0.2], tags: {role: hmi}}
  - {name: c, ips: [10.0.0.3], tags: {role: scada}}
segments:
  - {name: plc, selector: role=plc}
  - {name: hmi, selector: role=hmi, mode: label}
  - {name: scada, selector: "role in (scada)", mode: monitor}
  - {name: lab, cidrs: [10.9.0.0/16], mode: monitor}
"#,
        );
        let got: Vec<String> = governed(&p).iter().map(ToString::to_string).collect();
        assert_eq!(got, ["10.0.0.1/32", "10.0.0.3/32", "10.9.0.0/16"]);
    }

    #[test]
    fn selector_index_and_scan_agree() {
        let p = policy(
            r#"
assets:
  - {name: a, ips: [10.0.0.1], tags: {role: plc, site: x}}
  - {name: b, ips: [10.0.0.2], tags: {role: hmi}}
  - {name: c, ips: [10.0.0.3], tags: {site: x}}
segments:
  - {name: s1, selector: "role in (plc,hmi),site=x"}
  - {name: s2, selector: "!role"}
  - {name: s3, selector: "role!=plc"}
"#,
        );
        let d = direct_members(&p);
        let get = |s: &str| d[&s.parse::<IpNet>().unwrap()].iter().copied().collect::<Vec<_>>();
        assert_eq!(get("10.0.0.1/32"), vec![0]);
        assert_eq!(get("10.0.0.2/32"), vec![2]);
        assert_eq!(get("10.0.0.3/32"), vec![1, 2]);
    }
}
