//! Field-level differences between an object's old and new JSON, as `apply --dry-run` and `diff`
//! show them: `tags.zone: "cell-1" -> "cell-2"`, `ips: added "10.0.0.3"`.
//!
//! Maps are compared key by key, recursively. Lists of scalars (addresses, ports, CIDRs) are
//! compared as multisets, so an added address reads as one added element rather than every
//! position after it shifting; a pure reordering is shown as the whole list changing. Lists holding
//! maps or lists are compared position by position (`ports[1]`).

use serde_json::{Map, Value, json};

/// One field that differs. `old: None` means added, `new: None` removed.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldChange {
    /// `tags.zone`, `tags["a.b/c"]`, `ports[1]`; empty for the object as a whole.
    pub path: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

impl FieldChange {
    /// `path: "a" -> "b"`, `path: added "b"`, `path: removed "a"`.
    pub fn line(&self) -> String {
        let path = if self.path.is_empty() { "(object)" } else { &self.path };
        match (&self.old, &self.new) {
            (Some(o), Some(n)) => format!("{path}: {} -> {}", compact(o), compact(n)),
            (None, Some(n)) => format!("{path}: added {}", compact(n)),
            (Some(o), None) => format!("{path}: removed {}", compact(o)),
            (None, None) => format!("{path}: unchanged"),
        }
    }

    /// `{"path", "old"?, "new"?}` for `-o json|yaml`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("path".into(), json!(self.path));
        if let Some(o) = &self.old {
            m.insert("old".into(), o.clone());
        }
        if let Some(n) = &self.new {
            m.insert("new".into(), n.clone());
        }
        Value::Object(m)
    }
}

/// The fields that differ from `old` to `new`, in key order.
pub fn fields(old: &Value, new: &Value) -> Vec<FieldChange> {
    let mut out = Vec::new();
    walk(String::new(), old, new, &mut out);
    out
}

/// The object's JSON on one line, without its `name` (said before it).
pub fn summary(object: &Value) -> String {
    match object {
        Value::Object(m) => {
            let rest: Map<String, Value> =
                m.iter().filter(|(k, _)| *k != "name").map(|(k, v)| (k.clone(), v.clone())).collect();
            compact(&Value::Object(rest))
        }
        other => compact(other),
    }
}

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn walk(path: String, old: &Value, new: &Value, out: &mut Vec<FieldChange>) {
    if old == new {
        return;
    }
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = key_path(&path, k);
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => walk(p, x, y, out),
                    (Some(x), None) => out.push(FieldChange { path: p, old: Some(x.clone()), new: None }),
                    (None, Some(y)) => out.push(FieldChange { path: p, old: None, new: Some(y.clone()) }),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.iter().chain(b).all(is_scalar) => {
            let removed = minus(a, b);
            let added = minus(b, a);
            if removed.is_empty() && added.is_empty() {
                // Same elements, another order.
                out.push(FieldChange { path, old: Some(old.clone()), new: Some(new.clone()) });
                return;
            }
            out.extend(removed.into_iter().map(|x| FieldChange {
                path: path.clone(),
                old: Some(x.clone()),
                new: None,
            }));
            out.extend(added.into_iter().map(|x| FieldChange { path: path.clone(), old: None, new: Some(x.clone()) }));
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let p = format!("{path}[{i}]");
                match (a.get(i), b.get(i)) {
                    (Some(x), Some(y)) => walk(p, x, y, out),
                    (Some(x), None) => out.push(FieldChange { path: p, old: Some(x.clone()), new: None }),
                    (None, Some(y)) => out.push(FieldChange { path: p, old: None, new: Some(y.clone()) }),
                    (None, None) => {}
                }
            }
        }
        _ => out.push(FieldChange { path, old: Some(old.clone()), new: Some(new.clone()) }),
    }
}

fn is_scalar(v: &Value) -> bool {
    !matches!(v, Value::Array(_) | Value::Object(_))
}

/// The elements of `a` not matched one for one in `b`, in `a`'s order.
fn minus<'a>(a: &'a [Value], b: &[Value]) -> Vec<&'a Value> {
    let mut left: Vec<&Value> = b.iter().collect();
    a.iter()
        .filter(|x| match left.iter().position(|y| y == x) {
            Some(i) => {
                left.swap_remove(i);
                false
            }
            None => true,
        })
        .collect()
}

/// `parent.key`, or `parent["key"]` when the key is not a plain word (tag keys may hold dots).
fn key_path(parent: &str, key: &str) -> String {
    let plain = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match (parent.is_empty(), plain) {
        (true, true) => key.to_string(),
        (false, true) => format!("{parent}.{key}"),
        (_, false) => format!("{parent}[{}]", compact(&Value::String(key.into()))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn lines(old: Value, new: Value) -> Vec<String> {
        fields(&old, &new).iter().map(FieldChange::line).collect()
    }

    #[test]
    fn nested_maps_show_changed_added_and_removed_keys() {
        let old = json!({"name": "plc-1", "tags": {"zone": "cell-1", "quarantine": "yes"}, "ips": ["10.0.0.1"]});
        let new = json!({"name": "plc-1", "tags": {"zone": "cell-2", "site": "plant-1"}, "ips": ["10.0.0.1"]});
        assert_eq!(
            lines(old, new),
            ["tags.quarantine: removed \"yes\"", "tags.site: added \"plant-1\"", "tags.zone: \"cell-1\" -> \"cell-2\""]
        );
    }

    #[test]
    fn scalar_lists_show_elements_added_and_removed() {
        let old = json!({"ips": ["10.0.0.1", "10.0.0.2", "10.0.0.2"], "ports": [502]});
        let new = json!({"ips": ["10.0.0.3", "10.0.0.2", "10.0.0.1"], "ports": [502, 102]});
        assert_eq!(lines(old, new), ["ips: removed \"10.0.0.2\"", "ips: added \"10.0.0.3\"", "ports: added 102"]);
        // A reordering alone changes the list as a whole.
        assert_eq!(lines(json!({"ips": ["a", "b"]}), json!({"ips": ["b", "a"]})), [r#"ips: ["a","b"] -> ["b","a"]"#]);
    }

    #[test]
    fn lists_of_maps_compare_by_position_and_fields_change_type() {
        let old = json!({"x": [{"a": 1}, {"a": 2}], "d": "text"});
        let new = json!({"x": [{"a": 1}, {"a": 3}, {"b": true}], "d": null, "e": {"f": [1]}});
        assert_eq!(
            lines(old, new),
            ["d: \"text\" -> null", "e: added {\"f\":[1]}", "x[1].a: 2 -> 3", "x[2]: added {\"b\":true}"]
        );
    }

    #[test]
    fn keys_that_are_not_plain_words_are_quoted_and_equal_objects_differ_nowhere() {
        let old = json!({"tags": {"app.kubernetes.io/name": "a"}});
        let new = json!({"tags": {"app.kubernetes.io/name": "b"}});
        assert_eq!(lines(old.clone(), new), [r#"tags["app.kubernetes.io/name"]: "a" -> "b""#]);
        assert!(fields(&old, &old).is_empty());
        assert_eq!(summary(&json!({"name": "n", "mode": "enforce"})), r#"{"mode":"enforce"}"#);
        let f = &fields(&json!({"a": 1}), &json!({}))[0];
        assert_eq!(f.to_json(), json!({"path": "a", "old": 1}));
    }
}
