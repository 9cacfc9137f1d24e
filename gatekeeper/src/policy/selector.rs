//! Tag selectors in Kubernetes label-selector syntax.
//!
//! `k=v` (or `k==v`), `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` (has the tag), `!k` (lacks it);
//! requirements joined by commas must all hold. As in Kubernetes, `k!=v` and `k notin (..)` also
//! match assets that do not carry `k` at all.

use std::{collections::BTreeMap, fmt};

/// A parse error, with the byte position in the selector text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad selector {text:?} at position {position}: {reason}")]
pub struct SelectorError {
    pub text: String,
    pub position: usize,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    pub fn matches(&self, tags: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Equals(k, v) => tags.get(k) == Some(v),
            Self::NotEquals(k, v) => tags.get(k) != Some(v),
            Self::In(k, vs) => tags.get(k).is_some_and(|t| vs.contains(t)),
            Self::NotIn(k, vs) => !tags.get(k).is_some_and(|t| vs.contains(t)),
            Self::Exists(k) => tags.contains_key(k),
            Self::NotExists(k) => !tags.contains_key(k),
        }
    }
}

/// A parsed selector: all requirements must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        Parser { text, pos: 0 }.selector()
    }

    pub fn matches(&self, tags: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(tags))
    }

    /// Tag pairs of which an asset must carry at least one to match (from the most selective
    /// `=` or `in` requirement), so callers can use an index instead of scanning every asset.
    /// `None` when the selector has no such requirement.
    pub fn candidates(&self) -> Option<Vec<(&str, &str)>> {
        self.requirements
            .iter()
            .filter_map(|r| match r {
                Requirement::Equals(k, v) => Some(vec![(k.as_str(), v.as_str())]),
                Requirement::In(k, vs) => Some(vs.iter().map(|v| (k.as_str(), v.as_str())).collect()),
                _ => None,
            })
            .min_by_key(Vec::len)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::NotEquals(k, v) => write!(f, "{k}!={v}")?,
                Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(","))?,
                Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(","))?,
                Requirement::Exists(k) => write!(f, "{k}")?,
                Requirement::NotExists(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

/// Tag keys: a letter or digit, then letters, digits, `.`, `_`, `-`, `/`; at most 253 bytes.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key.starts_with(|c: char| c.is_ascii_alphanumeric())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

/// Tag values: letters, digits, `.`, `_`, `-`; may be empty; at most 63 bytes.
pub fn valid_value(value: &str) -> bool {
    value.len() <= 63 && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn err<T>(&self, reason: impl Into<String>) -> Result<T, SelectorError> {
        Err(SelectorError { text: self.text.to_string(), position: self.pos, reason: reason.into() })
    }

    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn skip_ws(&mut self) {
        while self.rest().starts_with(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn word(&mut self) -> &str {
        self.skip_ws();
        let start = self.pos;
        while self.rest().starts_with(|c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')) {
            self.pos += 1;
        }
        &self.text[start..self.pos]
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        let start = self.pos;
        let key = self.word().to_string();
        if key.is_empty() {
            return self.err("expected a tag key");
        }
        if !valid_key(&key) {
            self.pos = start;
            return self.err(format!("invalid tag key {key:?}"));
        }
        Ok(key)
    }

    fn value(&mut self) -> Result<String, SelectorError> {
        let value = self.word().to_string();
        if !valid_value(&value) {
            return self.err(format!("invalid tag value {value:?}"));
        }
        Ok(value)
    }

    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
        if !self.eat("(") {
            return self.err("expected '(' after in/notin");
        }
        let mut values = Vec::new();
        loop {
            let v = self.value()?;
            if v.is_empty() {
                return self.err("expected a value in the set");
            }
            values.push(v);
            if self.eat(")") {
                return Ok(values);
            }
            if !self.eat(",") {
                return self.err("expected ',' or ')' in the set");
            }
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        if self.eat("!") {
            return Ok(Requirement::NotExists(self.key()?));
        }
        let key = self.key()?;
        if self.eat("==") || self.eat("=") {
            return Ok(Requirement::Equals(key, self.value()?));
        }
        if self.eat("!=") {
            return Ok(Requirement::NotEquals(key, self.value()?));
        }
        // `in` / `notin` must stand as words: `k inx` is not `k in x`.
        let save = self.pos;
        match self.word() {
            "in" => Ok(Requirement::In(key, self.set()?)),
            "notin" => Ok(Requirement::NotIn(key, self.set()?)),
            "" => {
                self.pos = save;
                Ok(Requirement::Exists(key))
            }
            other => {
                let other = other.to_string();
                self.pos = save;
                self.err(format!("unexpected {other:?}; expected =, !=, in, notin, ',' or the end"))
            }
        }
    }

    fn selector(mut self) -> Result<Selector, SelectorError> {
        self.skip_ws();
        if self.rest().is_empty() {
            return self.err("empty selector (it would select every asset); write the requirement out");
        }
        let mut requirements = vec![self.requirement()?];
        while self.eat(",") {
            requirements.push(self.requirement()?);
        }
        self.skip_ws();
        if !self.rest().is_empty() {
            return self.err(format!("unexpected {:?}", self.rest()));
        }
        Ok(Selector { requirements })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn parses_every_form() {
        let s = Selector::parse("role=plc, site==plant-1,zone!=dmz,tier in (a, b),x notin (c),critical,!quarantine")
            .unwrap();
        assert_eq!(
            s.requirements,
            vec![
                Requirement::Equals("role".into(), "plc".into()),
                Requirement::Equals("site".into(), "plant-1".into()),
                Requirement::NotEquals("zone".into(), "dmz".into()),
                Requirement::In("tier".into(), vec!["a".into(), "b".into()]),
                Requirement::NotIn("x".into(), vec!["c".into()]),
                Requirement::Exists("critical".into()),
                Requirement::NotExists("quarantine".into()),
            ]
        );
        // Display is canonical and parses back to the same selector.
        assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn matching_follows_kubernetes() {
        let plc = tags(&[("role", "plc"), ("site", "plant-1")]);
        let bare = tags(&[]);
        assert!(Selector::parse("role=plc,site=plant-1").unwrap().matches(&plc));
        assert!(!Selector::parse("role=plc,site=plant-2").unwrap().matches(&plc));
        assert!(Selector::parse("zone!=dmz").unwrap().matches(&bare), "!= matches a missing key");
        assert!(Selector::parse("zone notin (dmz)").unwrap().matches(&bare));
        assert!(!Selector::parse("zone in (dmz)").unwrap().matches(&bare));
        assert!(Selector::parse("role in (hmi,plc)").unwrap().matches(&plc));
        assert!(!Selector::parse("role notin (hmi,plc)").unwrap().matches(&plc));
        assert!(Selector::parse("role").unwrap().matches(&plc));
        assert!(!Selector::parse("!role").unwrap().matches(&plc));
        assert!(Selector::parse("!quarantine").unwrap().matches(&plc));
    }

    #[test]
    fn rejects_bad_selectors_with_position() {
        for (text, pos) in [
            ("", 0),
            ("role=", 5), // empty value is allowed by k8s; here it parses, checked below
            ("role in plc", 8),
            ("role in (plc", 12),
            ("role in ()", 9),
            ("=plc", 0),
            ("role=plc,", 9),
            ("role=plc;site=x", 8),
            ("role inx (a)", 5),
            ("-role=a", 0),
        ] {
            let r = Selector::parse(text);
            if text == "role=" {
                assert_eq!(r.unwrap().requirements, vec![Requirement::Equals("role".into(), String::new())]);
                continue;
            }
            let e = r.expect_err(text);
            assert_eq!(e.position, pos, "{text:?}: {e}");
        }
    }

    #[test]
    fn candidates_pick_the_smallest_positive_requirement() {
        let s = Selector::parse("role in (a,b,c),site=x,!q").unwrap();
        assert_eq!(s.candidates(), Some(vec![("site", "x")]));
        assert_eq!(Selector::parse("!q,z").unwrap().candidates(), None);
    }
}
