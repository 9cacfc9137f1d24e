//! The declarative policy document (assets, segments, rules) and its validation.
//!
//! [`PolicyDocument`] is what users write (YAML or JSON); [`Policy`] is the validated form every
//! other module works on. Validation collects every problem it finds, each naming the entry and
//! field, so one `gatekeeper check` run shows all of them.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    path::Path,
};

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::policy::selector::{self, Selector};

/// What users write.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Document)]
pub struct PolicyDocument {
    #[serde(default)]
    pub assets: Vec<AssetSpec>,
    #[serde(default)]
    pub segments: Vec<SegmentSpec>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// A device: its addresses and tags (segments select assets by tag).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Asset)]
pub struct AssetSpec {
    pub name: String,
    /// Addresses or CIDRs (IPv4 or IPv6).
    #[serde(default)]
    pub ips: Vec<String>,
    /// Tag values are text: `floor: 3` and `"floor": "3"` are the same tag, stored and returned
    /// as `"3"` (numbers and booleans are read as their text).
    #[serde(default, deserialize_with = "text_tags")]
    pub tags: BTreeMap<String, Scalar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn text_tags<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Scalar>, D::Error> {
    let tags = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(tags.into_iter().map(|(k, v)| (k, Scalar::Str(v.to_string()))).collect())
}

/// A set of addresses: the assets its selector matches, and CIDRs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Segment)]
pub struct SegmentSpec {
    pub name: String,
    /// A tag selector, e.g. `zone=cell-1,role in (plc,hmi)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Addresses or CIDRs that belong to the segment whatever the assets say.
    #[serde(default)]
    pub cidrs: Vec<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Traffic from one segment to another (or `any`), allowed or denied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Rule)]
pub struct RuleSpec {
    pub name: String,
    /// A segment name or `any`.
    pub from: String,
    /// A segment name or `any`.
    pub to: String,
    #[serde(default)]
    pub protocol: Protocol,
    /// Destination ports: a number or a range `"lo-hi"` (TCP and UDP only).
    #[serde(default)]
    pub ports: Vec<Scalar>,
    #[serde(default)]
    pub action: Action,
    /// When the rule stops acting (RFC 3339); it stays stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A YAML/JSON scalar accepted where a string is meant (`floor: 3`, `ports: [502, "1-2"]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Scalar {
    Int(i64),
    Str(String),
    Bool(bool),
    Float(f64),
}

// A scalar is any of JSON's: `oneOf` would refuse an integer (it is also a number).
impl utoipa::PartialSchema for Scalar {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
        ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([Type::String, Type::Number, Type::Boolean]))
            .description(Some("Text; a number or boolean is read as its text"))
            .into()
    }
}

impl utoipa::ToSchema for Scalar {}

/// What `#[serde(untagged)]` would read (an integer past `i64` is a float), without buffering
/// each value first, and with an error that says what is accepted.
impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(i64::try_from(v).map_or(Scalar::Float(v as f64), Scalar::Int))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Scalar, E> {
                Ok(i64::try_from(v).map_or(Scalar::Float(v as f64), Scalar::Int))
            }
            fn visit_u128<E>(self, v: u128) -> Result<Scalar, E> {
                Ok(i64::try_from(v).map_or(Scalar::Float(v as f64), Scalar::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(i) => write!(f, "{i}"),
            Self::Str(s) => f.write_str(s),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Float(x) => write!(f, "{x}"),
        }
    }
}

/// How a segment governs traffic to and from its members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Default deny: what no rule allows is dropped.
    #[default]
    Enforce,
    /// What no rule allows passes and is counted as would-drop.
    Monitor,
    /// The segment only names addresses for rules; it governs nothing by itself.
    Label,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl Protocol {
    /// IP protocol number, `None` for any.
    pub fn number(self) -> Option<u8> {
        match self {
            Self::Any => None,
            Self::Tcp => Some(6),
            Self::Udp => Some(17),
            Self::Icmp => Some(1),
            Self::Icmpv6 => Some(58),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// The reserved endpoint name matching every address.
pub const ANY: &str = "any";

/// A rule endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Any,
    Segment(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str(ANY),
            Self::Segment(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Asset {
    pub name: String,
    pub prefixes: Vec<IpNet>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub name: String,
    pub selector: Option<Selector>,
    pub cidrs: Vec<IpNet>,
    pub mode: Mode,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub from: Endpoint,
    pub to: Endpoint,
    pub protocol: Protocol,
    /// Inclusive port ranges; empty means every port (and port-less packets).
    pub ports: Vec<(u16, u16)>,
    pub action: Action,
    pub expires: Option<DateTime<Utc>>,
}

impl Rule {
    /// Whether the rule still matches at `now`.
    pub fn live(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

/// A validated policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub assets: Vec<Asset>,
    pub segments: Vec<Segment>,
    pub rules: Vec<Rule>,
}

impl Policy {
    /// The earliest expiry still in the future: when the policy must be compiled again.
    pub fn next_expiry(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.rules.iter().filter_map(|r| r.expires).filter(|e| *e > now).min()
    }
}

/// One problem in a policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The entry, e.g. `rules[2] "hmi-to-plc"`.
    pub entry: String,
    pub field: &'static str,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.entry, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.entry, self.field, self.reason)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{source_name}: cannot read: {error}")]
    Read { source_name: String, error: std::io::Error },
    #[error("{source_name}: {error}")]
    Syntax { source_name: String, error: String },
    #[error("{source_name}: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid { source_name: String, problems: Vec<Problem> },
}

impl PolicyDocument {
    /// Parses YAML (JSON is YAML too) within [`yaml_budget`]. `source_name` names the input in
    /// errors; a parse error also names the path (`assets[3].ips[0]`), line and column.
    pub fn from_yaml(text: &str, source_name: &str) -> Result<Self, PolicyError> {
        let syntax = |error: String| PolicyError::Syntax { source_name: source_name.to_string(), error };
        if text.len() > MAX_DOCUMENT_BYTES {
            return Err(syntax(format!("{} bytes; a policy document has at most {MAX_DOCUMENT_BYTES}", text.len())));
        }
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        check_nesting(text).map_err(syntax)?;
        // Tracking the path costs every document a few percent more parse time; only a failed
        // one needs it, so that one is parsed again to name the entry and field at fault.
        serde_saphyr::from_str_with_options(text, yaml_options()).map_err(|first| {
            let mut path = None;
            let error = serde_saphyr::with_deserializer_from_str_with_options(text, yaml_options(), |de| {
                serde_path_to_error::deserialize::<_, Self>(de).map_err(|e| {
                    path = Some(e.path().to_string());
                    e.into_inner()
                })
            })
            .err()
            .map_or_else(|| describe_yaml_error(&first, None), |e| describe_yaml_error(&e, path.as_deref()));
            syntax(error)
        })
    }

    pub fn validate(&self, source_name: &str) -> Result<Policy, PolicyError> {
        let mut problems = Vec::new();
        let policy = validate(self, &mut problems);
        if problems.is_empty() {
            Ok(policy)
        } else {
            Err(PolicyError::Invalid { source_name: source_name.to_string(), problems })
        }
    }
}

/// How deep a document may nest. A policy is a few levels deep (list, object, tag map); a
/// parser fed thousands of levels spends seconds to minutes on them, so they are refused first.
pub const MAX_NESTING: usize = 32;
/// The largest policy document: six times the bench's 100,000-asset file (10 MB), which is
/// already more addresses than the data plane's default maps hold.
pub const MAX_DOCUMENT_BYTES: usize = 64 << 20;
/// Events one alias-free document of [`MAX_DOCUMENT_BYTES`] written like the bench's file has
/// (1.6 M per 10 MB), with room; denser text (`[a,b,c]`) reaches it sooner.
const MAX_YAML_EVENTS: usize = 16_000_000;
/// Events replayed from aliases in all: an anchor may be shared, not multiplied into a bomb.
pub const MAX_ALIAS_REPLAY: usize = 1_000_000;

/// What parsing one policy document may cost before it is refused with a precise error.
pub fn yaml_budget() -> Option<serde_saphyr::Budget> {
    serde_saphyr::budget! {
        max_events: MAX_YAML_EVENTS,
        max_nodes: MAX_YAML_EVENTS,
        max_total_scalar_bytes: MAX_DOCUMENT_BYTES,
        max_depth: MAX_NESTING,
        flow_nesting_limit: MAX_NESTING,
        max_documents: 1,
        // Many aliases of one anchor (a shared tag set) is legitimate; what an alias costs is
        // bounded by the replay limit instead of this heuristic.
        enforce_alias_anchor_ratio: false,
    }
}

/// The parser's options: the budget, and the reading serde_yaml gave (YAML 1.2 booleans only,
/// `0755` and `1_000` stay text, `.inf` is a number), so a stored tag never changes its text.
/// Duplicate keys and merge keys (`<<`) are refused, and so is an unquoted boolean, number or
/// null where text is meant (`name: false`, `name: ~`): YAML reads those as other types, and
/// an object named "false" is a mistake, not a name. Tag values and ports still take them.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: yaml_budget(),
        alias_limits: serde_saphyr::alias_limits! { max_total_replayed_events: MAX_ALIAS_REPLAY },
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        merge_keys: serde_saphyr::MergeKeyPolicy::Error,
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        non_finite_float_policy: serde_saphyr::options::NonFiniteFloatPolicy::PassThrough,
        with_snippet: false,
        no_schema: true,
    }
}

/// One line: `path: what at line L, column C`. Budget breaches say which limit, in our terms.
fn describe_yaml_error(e: &serde_saphyr::Error, path: Option<&str>) -> String {
    use serde_saphyr::{Error, budget::BudgetBreach};
    // An error inside an alias's replay is wrapped; the limit that tripped is the cause.
    let mut cause = e.without_snippet();
    while let Error::AliasError { error, .. } = cause {
        cause = error.without_snippet();
    }
    let budget = match cause {
        Error::Budget { breach: BudgetBreach::Depth { .. }, .. } => {
            Some(format!("nested deeper than {MAX_NESTING} levels"))
        }
        Error::Budget { breach: BudgetBreach::Events { .. } | BudgetBreach::Nodes { .. }, .. } => {
            Some(format!("over the parse budget: more than {MAX_YAML_EVENTS} YAML events"))
        }
        Error::Budget { breach: BudgetBreach::ScalarBytes { .. }, .. } => {
            Some(format!("over the parse budget: more than {MAX_DOCUMENT_BYTES} bytes of values"))
        }
        Error::Budget { breach: BudgetBreach::Documents { .. }, .. } => {
            Some("more than one YAML document (`---`); a policy is one".into())
        }
        Error::Budget { breach, .. } => Some(format!("over the parse budget: {breach:?}")),
        Error::AliasReplayLimitExceeded { .. } | Error::AliasExpansionLimitExceeded { .. } => Some(format!(
            "over the parse budget: aliases expand to more than {MAX_ALIAS_REPLAY} events (an alias bomb?)"
        )),
        Error::AliasReplayStackDepthExceeded { max_depth, .. } => {
            Some(format!("over the parse budget: aliases nest deeper than {max_depth}"))
        }
        _ => None,
    };
    let message = match budget {
        Some(m) => match e.location() {
            Some(l) => format!("{m} at line {}, column {}", l.line(), l.column()),
            None => m,
        },
        None => e.render_with_options(serde_saphyr::render_options! {
            formatter: &serde_saphyr::UserMessageFormatter,
            snippets: serde_saphyr::SnippetMode::Off,
        }),
    };
    // serde_path_to_error writes `?` for a key it could not name (a duplicate) and `.` for the root.
    let path = path.map(|p| p.trim_end_matches('?').trim_end_matches('.')).filter(|p| !p.is_empty());
    match path {
        Some(p) => format!("{p}: {message}"),
        None => message,
    }
}

/// Refuses text nesting deeper than [`MAX_NESTING`], in flow (`[`, `{`) or block (indentation)
/// style, in one pass and before any parsing. Quoted strings and comments do not count.
fn check_nesting(text: &str) -> Result<(), String> {
    let too_deep = |line: usize| Err(format!("line {line}: nested deeper than {MAX_NESTING} levels"));
    let mut flow = 0usize;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches([' ', '-']).len();
        // A block level takes at least one column (YAML's least indentation).
        if flow == 0 && indent > MAX_NESTING * 4 {
            return too_deep(n + 1);
        }
        let mut quote: Option<char> = None;
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    flow += 1;
                    if flow > MAX_NESTING {
                        return too_deep(n + 1);
                    }
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Reads, parses and validates a policy file: the document as written and its validated form.
/// Errors name the file, and each problem its entry and field.
pub fn read_file(path: &Path) -> Result<(PolicyDocument, Policy), PolicyError> {
    use std::io::Read;
    let name = path.display().to_string();
    let read_error = |error| PolicyError::Read { source_name: name.clone(), error };
    // A file past the limit is refused by its first byte over it, without reading the rest.
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_DOCUMENT_BYTES as u64 + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(PolicyError::Syntax {
            source_name: name.clone(),
            error: format!("more than {MAX_DOCUMENT_BYTES} bytes; a policy document has at most that"),
        });
    }
    let text =
        String::from_utf8(bytes).map_err(|e| read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    let doc = PolicyDocument::from_yaml(&text, &name)?;
    let policy = doc.validate(&name)?;
    Ok((doc, policy))
}

/// Names: 1 to 63 of letters, digits, `.`, `_`, `-`, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Parses an address (a host prefix) or a CIDR whose host bits are zero.
pub fn parse_prefix(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    let net: IpNet = text.parse().map_err(|_| format!("{text:?} is not an IP address or CIDR"))?;
    if net.trunc() != net {
        return Err(format!("{text:?} has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

/// Parses `502`, `"502"` or `"20000-20010"`.
pub fn parse_port_range(spec: &Scalar) -> Result<(u16, u16), String> {
    let port = |s: &str| -> Result<u16, String> {
        s.trim().parse::<u16>().map_err(|_| format!("{s:?} is not a port (0-65535)"))
    };
    match spec {
        Scalar::Int(i) => u16::try_from(*i).map(|p| (p, p)).map_err(|_| format!("{i} is not a port (0-65535)")),
        Scalar::Str(s) => {
            let (lo, hi) = match s.split_once('-') {
                Some((a, b)) => (port(a)?, port(b)?),
                None => {
                    let p = port(s)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(format!("range {s:?} runs backwards"));
            }
            Ok((lo, hi))
        }
        other => Err(format!("{other} is not a port or port range")),
    }
}

fn entry(kind: &str, index: usize, name: &str) -> String {
    format!("{kind}[{index}] {name:?}")
}

fn check_names<'a>(kind: &str, names: impl Iterator<Item = &'a str>, problems: &mut Vec<Problem>) {
    let mut seen = HashSet::new();
    for (i, name) in names.enumerate() {
        if !valid_name(name) {
            problems.push(Problem {
                entry: entry(kind, i, name),
                field: "name",
                reason: "names are 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit".into(),
            });
        } else if !seen.insert(name) {
            problems.push(Problem { entry: entry(kind, i, name), field: "name", reason: "duplicate name".into() });
        }
    }
}

/// Tags one asset may carry.
pub const MAX_TAGS: usize = 64;
/// Characters a description may hold.
pub const MAX_DESCRIPTION: usize = 1024;

/// A description is text for people: no control characters (they would forge log lines and
/// terminal output), at most [`MAX_DESCRIPTION`] characters.
fn check_description(entry: &dyn Fn() -> String, text: Option<&str>, problems: &mut Vec<Problem>) {
    let Some(text) = text else { return };
    if text.chars().any(char::is_control) {
        problems.push(Problem {
            entry: entry(),
            field: "description",
            reason: "control characters are not allowed".into(),
        });
    } else if text.chars().count() > MAX_DESCRIPTION {
        problems.push(Problem {
            entry: entry(),
            field: "description",
            reason: format!("at most {MAX_DESCRIPTION} characters"),
        });
    }
}

fn validate(doc: &PolicyDocument, problems: &mut Vec<Problem>) -> Policy {
    check_names("assets", doc.assets.iter().map(|a| a.name.as_str()), problems);
    check_names("segments", doc.segments.iter().map(|s| s.name.as_str()), problems);
    check_names("rules", doc.rules.iter().map(|r| r.name.as_str()), problems);

    let mut policy = Policy::default();
    for (i, a) in doc.assets.iter().enumerate() {
        let e = || entry("assets", i, &a.name);
        let mut prefixes = Vec::new();
        for ip in &a.ips {
            match parse_prefix(ip) {
                Ok(p) => prefixes.push(p),
                Err(reason) => problems.push(Problem { entry: e(), field: "ips", reason }),
            }
        }
        if a.tags.len() > MAX_TAGS {
            problems.push(Problem {
                entry: e(),
                field: "tags",
                reason: format!("{} tags; an asset has at most {MAX_TAGS}", a.tags.len()),
            });
        }
        check_description(&e, a.description.as_deref(), problems);
        let mut tags = BTreeMap::new();
        for (k, v) in &a.tags {
            let v = v.to_string();
            if !selector::valid_key(k) {
                problems.push(Problem { entry: e(), field: "tags", reason: format!("invalid tag key {k:?}") });
            } else if !selector::valid_value(&v) {
                problems.push(Problem {
                    entry: e(),
                    field: "tags",
                    reason: format!("invalid value {v:?} for tag {k:?} (letters, digits, '.', '_', '-'; at most 63)"),
                });
            }
            tags.insert(k.clone(), v);
        }
        prefixes.sort();
        prefixes.dedup();
        policy.assets.push(Asset { name: a.name.clone(), prefixes, tags });
    }

    let segment_names: HashSet<&str> = doc.segments.iter().map(|s| s.name.as_str()).collect();
    for (i, s) in doc.segments.iter().enumerate() {
        let e = || entry("segments", i, &s.name);
        if s.name == ANY {
            problems.push(Problem { entry: e(), field: "name", reason: "\"any\" is reserved for rules".into() });
        }
        check_description(&e, s.description.as_deref(), problems);
        let selector = match s.selector.as_deref().map(Selector::parse) {
            None => None,
            Some(Ok(sel)) => Some(sel),
            Some(Err(err)) => {
                problems.push(Problem { entry: e(), field: "selector", reason: err.to_string() });
                None
            }
        };
        let mut cidrs = Vec::new();
        for c in &s.cidrs {
            match parse_prefix(c) {
                Ok(p) => cidrs.push(p),
                Err(reason) => problems.push(Problem { entry: e(), field: "cidrs", reason }),
            }
        }
        cidrs.sort();
        cidrs.dedup();
        policy.segments.push(Segment { name: s.name.clone(), selector, cidrs, mode: s.mode });
    }

    for (i, r) in doc.rules.iter().enumerate() {
        let e = || entry("rules", i, &r.name);
        check_description(&e, r.description.as_deref(), problems);
        let mut endpoint = |field: &'static str, name: &str| {
            if name == ANY {
                Endpoint::Any
            } else {
                if !segment_names.contains(name) {
                    problems.push(Problem { entry: e(), field, reason: format!("unknown segment {name:?}") });
                }
                Endpoint::Segment(name.to_string())
            }
        };
        let from = endpoint("from", &r.from);
        let to = endpoint("to", &r.to);
        let mut ports = Vec::new();
        if !r.ports.is_empty() && !matches!(r.protocol, Protocol::Tcp | Protocol::Udp) {
            problems.push(Problem {
                entry: e(),
                field: "ports",
                reason: format!("ports need protocol tcp or udp, not {:?}", r.protocol),
            });
        } else {
            for p in &r.ports {
                match parse_port_range(p) {
                    Ok(range) => ports.push(range),
                    Err(reason) => problems.push(Problem { entry: e(), field: "ports", reason }),
                }
            }
        }
        policy.rules.push(Rule {
            name: r.name.clone(),
            from,
            to,
            protocol: r.protocol,
            ports,
            action: r.action,
            expires: r.expires,
        });
    }
    policy
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
assets:
  - name: plc-1
    ips: [10.0.0.10, "fd00::10"]
    tags: {role: plc, site: plant-1, floor: 3}
segments:
  - name: plc
    selector: role=plc,site=plant-1
    mode: enforce
  - name: publishers
    cidrs: [192.0.2.0/28]
rules:
  - name: hmi-to-plc-modbus
    from: publishers
    to: plc
    protocol: tcp
    ports: [502, "20000-20010"]
    action: allow
    expires: 2026-12-31T00:00:00Z
"#;

    /// The README's sample policy is a valid policy: the documentation does not drift.
    #[test]
    fn the_readme_sample_policy_is_valid() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("## The policy file").expect("the README's policy section")..];
        let start = section.find("```yaml\n").expect("a YAML block") + "```yaml\n".len();
        let yaml = &section[start..start + section[start..].find("```").expect("its end")];
        let doc = PolicyDocument::from_yaml(yaml, "README.md").unwrap();
        doc.validate("README.md").unwrap();
        assert!(doc.assets.len() == 1 && doc.segments.len() == 3 && doc.rules.len() == 1, "{doc:?}");
    }

    #[test]
    fn sample_document_validates() {
        let p = PolicyDocument::from_yaml(SAMPLE, "sample").unwrap().validate("sample").unwrap();
        assert_eq!(p.assets[0].prefixes.len(), 2);
        assert_eq!(p.assets[0].tags["floor"], "3");
        assert_eq!(p.segments[1].mode, Mode::Enforce, "mode defaults to enforce");
        assert_eq!(p.rules[0].ports, vec![(502, 502), (20000, 20010)]);
        assert_eq!(p.rules[0].from, Endpoint::Segment("publishers".into()));
        assert!(p.rules[0].expires.is_some());
    }

    fn problems(yaml: &str) -> Vec<String> {
        match PolicyDocument::from_yaml(yaml, "t.yaml").and_then(|d| d.validate("t.yaml")) {
            Ok(_) => vec![],
            Err(PolicyError::Invalid { problems, .. }) => problems.iter().map(ToString::to_string).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn every_problem_is_reported_with_entry_and_field() {
        let got = problems(
            r#"
assets:
  - {name: a, ips: [10.0.0.300, 10.0.0.5/24], tags: {"bad key": x}}
  - {name: a}
segments:
  - {name: s, selector: "role in (x"}
  - {name: any}
rules:
  - {name: r, from: nope, to: s, protocol: icmp, ports: [1]}
  - {name: r2, from: any, to: s, protocol: tcp, ports: ["9-1", 70000]}
"#,
        );
        let expect = [
            "assets[1] \"a\": name: duplicate name",
            "assets[0] \"a\": ips: \"10.0.0.300\" is not an IP address or CIDR",
            "assets[0] \"a\": ips: \"10.0.0.5/24\" has host bits set; did you mean 10.0.0.0/24?",
            "assets[0] \"a\": tags: invalid tag key \"bad key\"",
            "segments[0] \"s\": selector: bad selector \"role in (x\" at position 10: expected ',' or ')' in the set",
            "segments[1] \"any\": name: \"any\" is reserved for rules",
            "rules[0] \"r\": from: unknown segment \"nope\"",
            "rules[0] \"r\": ports: ports need protocol tcp or udp, not Icmp",
            "rules[1] \"r2\": ports: range \"9-1\" runs backwards",
            "rules[1] \"r2\": ports: 70000 is not a port (0-65535)",
        ];
        assert_eq!(got, expect);
    }

    #[test]
    fn unknown_fields_and_bad_enums_are_syntax_errors() {
        let got = problems("segments:\n  - {name: s, selecter: role=plc}\n");
        assert!(got[0].contains("unknown field `selecter`"), "{got:?}");
        let got = problems("segments:\n  - {name: s, mode: audit}\n");
        assert!(got[0].contains("unknown variant `audit`"), "{got:?}");
        assert!(got[0].starts_with("t.yaml: "), "{got:?}");
    }

    #[test]
    fn tags_are_text_and_descriptions_plain() {
        let a = PolicyDocument::from_yaml("assets:\n  - {name: a, tags: {line: 1, ok: true, f: 1.5}}\n", "t").unwrap();
        let b: PolicyDocument =
            serde_json::from_str(r#"{"assets": [{"name": "a", "tags": {"line": "1", "ok": "true", "f": "1.5"}}]}"#)
                .unwrap();
        assert_eq!(a, b, "a number and its text are the same tag: never a diff");
        assert_eq!(serde_json::to_value(&a.assets[0]).unwrap()["tags"]["line"], "1", "returned as text");
        let p = problems(
            "assets:\n  - {name: a, description: \"x\\ny\"}\nsegments:\n  - {name: s, cidrs: [10.0.0.0/8], description: \"\\u001b[31m\"}\n",
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().all(|m| m.contains("description: control characters")), "{p:?}");
        let many: String = (0..65).map(|i| format!("t{i}: x, ")).collect();
        let p = problems(&format!("assets:\n  - {{name: a, tags: {{{many}}}}}\n"));
        assert!(p[0].contains("65 tags; an asset has at most 64"), "{p:?}");
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let e = PolicyDocument::from_yaml(&deep, "body").unwrap_err().to_string();
        assert!(e.contains("nested deeper than 32"), "refused before the parser sees it: {e}");
        let block: String = (0..200).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
        assert!(PolicyDocument::from_yaml(&block, "body").unwrap_err().to_string().contains("nested deeper"));
        // Brackets in strings and comments are text, and a real policy passes.
        let fine = "assets:\n  - {name: a, ips: [10.0.0.1], description: \"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"} # [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n";
        assert_eq!(PolicyDocument::from_yaml(fine, "t").unwrap().assets.len(), 1);
    }

    /// The one-line error `from_yaml` gives for `yaml`.
    fn syntax_error(yaml: &str) -> String {
        match PolicyDocument::from_yaml(yaml, "t.yaml") {
            Err(e @ PolicyError::Syntax { .. }) => e.to_string(),
            other => panic!("not a syntax error: {other:?}"),
        }
    }

    #[test]
    fn a_syntax_error_names_its_line_and_column() {
        let e = syntax_error("segments:\n  - {name: s, cidrs: [10.0.0.0/8]}\nrules:\n  - {name: a, from: x\n");
        assert!(e.starts_with("t.yaml: "), "{e}");
        assert!(e.contains("unclosed bracket '{' at line 4, column 5"), "{e}");
        let e = syntax_error("assets:\n  - name: a\n   ips: [10.0.0.1]\n");
        assert!(e.contains("line 3, column"), "{e}");
        assert!(!e.contains('\n'), "one line, no snippet: {e}");
    }

    #[test]
    fn a_type_error_names_entry_field_and_line() {
        let e = syntax_error("assets:\n  - name: a\n  - name: b\n    ips:\n      - 10.0.0.1\n      - {v4: 10.0.0.2}\n");
        assert!(e.starts_with("t.yaml: assets[1].ips[1]: "), "{e}");
        assert!(e.contains("at line 6, column 9"), "{e}");
        let e = syntax_error("rules:\n  - {name: r, from: any, to: any, protocol: tcp, ports: [502, [1, 2]]}\n");
        assert!(e.starts_with("t.yaml: rules[0].ports[1]: "), "{e}");
        assert!(e.contains("a string, number or boolean") && e.contains("line 2, column"), "{e}");
        let e = syntax_error("assets:\n  - name: a\n    tags: {site: [x]}\n");
        assert!(e.starts_with("t.yaml: assets[0].tags.site: ") && e.contains("line 3"), "{e}");
        let e = syntax_error("rules:\n  - {name: r, from: any, to: any, expires: tomorrow}\n");
        assert!(e.starts_with("t.yaml: rules[0].expires: ") && e.contains("line 2"), "{e}");
        let e = syntax_error("assets:\n  - ips: [10.0.0.1]\n");
        assert!(e.contains("assets[0]: missing field `name` at line 2"), "{e}");
        // YAML's booleans, numbers and nulls are not text: a segment is not named "false".
        for (value, line) in [("false", 2), ("~", 2), ("null", 2), ("502", 2)] {
            let e = syntax_error(&format!("segments:\n  - name: {value}\n"));
            assert!(e.starts_with("t.yaml: segments[0].name: ") && e.contains(&format!("line {line}")), "{value}: {e}");
        }
        assert_eq!(
            PolicyDocument::from_yaml("segments:\n  - name: \"false\"\n", "t").unwrap().segments[0].name,
            "false"
        );
        // A port out of range is the validator's: entry and field, every one reported.
        assert_eq!(
            problems("rules:\n  - {name: r, from: any, to: any, protocol: tcp, ports: [70000]}\n"),
            ["rules[0] \"r\": ports: 70000 is not a port (0-65535)"]
        );
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let e = syntax_error("assets:\n  - name: a\n    ips: [10.0.0.1]\n    name: b\n");
        assert!(e.contains("assets[0]: duplicate mapping key `name`") && e.contains("line 4"), "{e}");
        let e = syntax_error("assets:\n  - {name: a, tags: {site: x, site: y}}\n");
        assert!(e.contains("duplicate mapping key `site`") && e.contains("line 2"), "{e}");
        let e = syntax_error("rules: []\nassets: []\nrules: []\n");
        assert!(e.contains("duplicate mapping key `rules`") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn an_alias_bomb_is_refused_by_the_budget() {
        // One anchor of 1,000 addresses replayed 1,100 times: 1.1 M events from 30 KB.
        let ips: Vec<String> = (0..1000).map(|i| format!("10.0.{}.{}", i / 256, i % 256)).collect();
        let mut bomb = format!("assets:\n  - name: a0\n    ips: &ips [{}]\n", ips.join(", "));
        for i in 1..=1100 {
            bomb += &format!("  - {{name: a{i}, ips: *ips}}\n");
        }
        let e = syntax_error(&bomb);
        assert!(e.contains(&format!("aliases expand to more than {MAX_ALIAS_REPLAY} events")), "{e}");
        assert!(e.contains("at line "), "{e}");
        // The classic nested bomb cannot even start: a list is no address.
        let mut laughs = "assets:\n  - {name: a, ips: &a [x, x, x, x, x, x, x, x, x, x]}\n".to_string();
        for (i, (prev, next)) in
            ["a", "b", "c", "d", "e", "f", "g", "h"].iter().zip(["b", "c", "d", "e", "f", "g", "h", "i"]).enumerate()
        {
            laughs += &format!("  - {{name: l{i}, ips: &{next} [{}]}}\n", vec![format!("*{prev}"); 10].join(", "));
        }
        assert!(syntax_error(&laughs).contains("assets[1].ips[0]: "), "refused at the first replay");
        // Sharing an anchor is not a bomb: 2,000 assets with one tag set.
        let mut shared = "assets:\n  - {name: a0, tags: &plant {site: plant-1, role: plc}}\n".to_string();
        for i in 1..2000 {
            shared += &format!("  - {{name: a{i}, tags: *plant}}\n");
        }
        let p = PolicyDocument::from_yaml(&shared, "t").unwrap().validate("t").unwrap();
        assert_eq!((p.assets.len(), p.assets[1999].tags["site"].as_str()), (2000, "plant-1"));
    }

    #[test]
    fn depth_size_and_documents_have_limits() {
        // Nesting the text check lets through is read as it streams: refused at its first level,
        // the rest never parsed.
        let e = syntax_error(&format!("assets:\n  - name: a\n    tags: {{x: {}{}}}\n", "[".repeat(30), "]".repeat(30)));
        assert!(e.contains("assets[0].tags.x: invalid type: sequence") && e.contains("line 3, column 12"), "{e}");
        let e = syntax_error(&format!("{}\nassets: []\n", " ".repeat(MAX_DOCUMENT_BYTES)));
        assert!(e.contains(&format!("a policy document has at most {MAX_DOCUMENT_BYTES}")), "{e}");
        let e = syntax_error("assets: []\n---\nrules: []\n");
        assert!(e.contains("more than one YAML document (`---`)") && e.contains("line 2, column 1"), "{e}");
        assert!(syntax_error("assets:\n  - {name: a, <<: {ips: [10.0.0.1]}}\n").contains("merge key"));
        // A file over the limit is refused without being read whole (a sparse file: no disk).
        let path = std::env::temp_dir().join(format!("gk-policy-huge-{}.yaml", std::process::id()));
        std::fs::File::create(&path).and_then(|f| f.set_len(MAX_DOCUMENT_BYTES as u64 * 16)).unwrap();
        let e = read_file(&path).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(e.contains(&format!("more than {MAX_DOCUMENT_BYTES} bytes")) && e.contains("gk-policy-huge"), "{e}");
    }

    #[test]
    fn scalars_read_as_yaml_1_2_and_stay_text() {
        // YAML 1.1 words are not booleans, and numbers keep their spelling where it carries.
        let d = PolicyDocument::from_yaml(
            "assets:\n  - {name: a, tags: {a: yes, b: on, c: 010, d: 1_000, e: 0x10, f: True, g: 1.5, h: 9223372036854775808}}\n",
            "t",
        )
        .unwrap();
        let tags: Vec<String> = d.assets[0].tags.values().map(ToString::to_string).collect();
        assert_eq!(tags, ["yes", "on", "010", "1_000", "16", "true", "1.5", "9223372036854776000"]);
        let d =
            PolicyDocument::from_yaml("rules:\n  - {name: r, from: any, to: any, ports: [502, \"1-2\", true]}\n", "t")
                .unwrap();
        assert_eq!(d.rules[0].ports, [Scalar::Int(502), Scalar::Str("1-2".into()), Scalar::Bool(true)]);
        // What the serializer writes reads back the same, strings that look like numbers included.
        let text = serde_saphyr::to_string(&d).unwrap();
        assert_eq!(PolicyDocument::from_yaml(&text, "t").unwrap(), d, "{text}");
        let tagged = PolicyDocument::from_yaml(
            &serde_saphyr::to_string(&PolicyDocument::from_yaml(SAMPLE, "t").unwrap()).unwrap(),
            "t",
        );
        assert_eq!(tagged.unwrap(), PolicyDocument::from_yaml(SAMPLE, "t").unwrap());
    }

    #[test]
    fn empty_document_is_an_empty_policy() {
        assert_eq!(PolicyDocument::from_yaml("  \n", "x").unwrap(), PolicyDocument::default());
    }
}
