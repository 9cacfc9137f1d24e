//! What changed between two documents: object changes (for the store and the audit log), the
//! `kubectl apply`-style merge of a partial document, and the assets that differ between two
//! validated policies (for incremental compiles).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{Value, value::RawValue};

use super::{Asset, AssetSpec, Policy, PolicyDocument, RuleSpec, SegmentSpec};

/// The kinds of objects a document holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Asset,
    Segment,
    Rule,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Asset => "asset",
            Self::Segment => "segment",
            Self::Rule => "rule",
        }
    }
}

/// One object created, replaced or deleted (`None` on the missing side).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub kind: Kind,
    pub name: String,
    pub old: Option<Spec>,
    pub new: Option<Spec>,
}

/// An object's JSON text, serialized once: the store keeps it, the audit log records it and a
/// response embeds it as is (a reload of 100k assets must not serialize each object thrice).
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Spec(Box<RawValue>);

impl Spec {
    /// `x` as JSON (`None` only if it cannot be serialized, which our objects always can).
    pub fn of<T: Serialize>(x: &T) -> Option<Self> {
        serde_json::value::to_raw_value(x).ok().map(Self)
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Spec {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Change {
    /// `create`, `update` or `delete`.
    pub fn op(&self) -> &'static str {
        match (&self.old, &self.new) {
            (None, _) => "create",
            (_, None) => "delete",
            _ => "update",
        }
    }

    /// The change that puts the object back as it was.
    pub fn inverse(&self) -> Change {
        Change { kind: self.kind, name: self.name.clone(), old: self.new.clone(), new: self.old.clone() }
    }
}

/// The changes that undo `changes`, last first.
pub fn inverse(changes: &[Change]) -> Vec<Change> {
    changes.iter().rev().map(Change::inverse).collect()
}

/// Every object change between two documents, in document order.
pub fn changes(old: &PolicyDocument, new: &PolicyDocument) -> Vec<Change> {
    fn kind_changes<T: Serialize + PartialEq>(
        kind: Kind,
        old: &[T],
        new: &[T],
        name: impl Fn(&T) -> &str,
    ) -> Vec<Change> {
        let old_by: HashMap<&str, &T> = old.iter().map(|x| (name(x), x)).collect();
        let new_names: HashSet<&str> = new.iter().map(&name).collect();
        let mut out = Vec::new();
        for n in new {
            match old_by.get(name(n)) {
                Some(o) if *o == n => {}
                Some(o) => out.push(Change { kind, name: name(n).into(), old: Spec::of(o), new: Spec::of(n) }),
                None => out.push(Change { kind, name: name(n).into(), old: None, new: Spec::of(n) }),
            }
        }
        for o in old {
            if !new_names.contains(name(o)) {
                out.push(Change { kind, name: name(o).into(), old: Spec::of(o), new: None });
            }
        }
        out
    }
    let mut out = kind_changes(Kind::Asset, &old.assets, &new.assets, |a: &AssetSpec| &a.name);
    out.extend(kind_changes(Kind::Segment, &old.segments, &new.segments, |s: &SegmentSpec| &s.name));
    out.extend(kind_changes(Kind::Rule, &old.rules, &new.rules, |r: &RuleSpec| &r.name));
    out
}

/// Replaces the items of `list` named like those of `items`, appends the others. Linear in
/// both lengths: a policy file restating 100k assets merges in one pass.
pub fn upsert<T>(list: &mut Vec<T>, items: impl IntoIterator<Item = T>, name: impl Fn(&T) -> &str) {
    let mut at: HashMap<String, usize> = list.iter().enumerate().map(|(i, x)| (name(x).to_string(), i)).collect();
    for item in items {
        match at.get(name(&item)).copied() {
            Some(i) => list[i] = item,
            None => {
                at.insert(name(&item).to_string(), list.len());
                list.push(item);
            }
        }
    }
}

/// `file` merged into `base`, like `kubectl apply`: objects `file` names replace those of the
/// same kind and name; other objects of `base` stay. `file`'s objects are moved, not copied.
pub fn merged(base: &PolicyDocument, file: PolicyDocument) -> PolicyDocument {
    let mut out = base.clone();
    upsert(&mut out.assets, file.assets, |a| &a.name);
    upsert(&mut out.segments, file.segments, |s| &s.name);
    upsert(&mut out.rules, file.rules, |r| &r.name);
    out
}

/// Names of the assets that differ between `old` and `new` (edited, added or removed).
pub fn changed_assets(old: &Policy, new: &Policy) -> Vec<String> {
    let before: HashMap<&str, &Asset> = old.assets.iter().map(|a| (a.name.as_str(), a)).collect();
    let after: HashMap<&str, &Asset> = new.assets.iter().map(|a| (a.name.as_str(), a)).collect();
    let mut changed: Vec<String> =
        new.assets.iter().filter(|a| before.get(a.name.as_str()) != Some(a)).map(|a| a.name.clone()).collect();
    changed.extend(old.assets.iter().filter(|a| !after.contains_key(a.name.as_str())).map(|a| a.name.clone()));
    changed
}

/// RFC 7396 JSON Merge Patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(yaml: &str) -> PolicyDocument {
        PolicyDocument::from_yaml(yaml, "t").unwrap()
    }

    #[test]
    fn merge_replaces_named_objects_keeps_the_others_in_order() {
        let base = doc(
            "assets:\n  - {name: a, ips: [10.0.0.1]}\n  - {name: b, ips: [10.0.0.2]}\n  - {name: c, ips: [10.0.0.3]}\n",
        );
        let file = doc(
            "assets:\n  - {name: b, ips: [10.0.0.9]}\n  - {name: d, ips: [10.0.0.4]}\n  - {name: d, ips: [10.0.0.5]}\n",
        );
        let m = merged(&base, file);
        let got: Vec<(&str, &str)> = m.assets.iter().map(|a| (a.name.as_str(), a.ips[0].as_str())).collect();
        // The file's last word on a name wins, as it always did.
        assert_eq!(got, [("a", "10.0.0.1"), ("b", "10.0.0.9"), ("c", "10.0.0.3"), ("d", "10.0.0.5")]);
    }
}
