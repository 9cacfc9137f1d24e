//! The crate's layers, checked on its source text (`src/**/*.rs`; `lib.rs` only declares modules).
//!
//! Top-level modules, lowest layer first (`src/x.rs` and `src/x/mod.rs` are `x`, `src/x/y.rs` is `x::y`):
//!
//! 0. `policy` (document, selector, membership, reference, diff): the pure policy core.
//! 1. `compile`.
//! 2. `dataplane`.
//! 3. `control`, and `tls` beside it as a standalone library.
//! 4. The edges `api`, `cli`, `metrics`, `netskope_sync`, each its own group.
//! 5. The wiring: `daemon`, `config`, `logging`, and the binary `main.rs` (which names the library `gatekeeper::`).
//!
//! Rules (comments, doc links and string literals do not count; `#[cfg(test)] mod tests` does):
//!
//! 1. A module refers to `crate::M` (in a `use`, grouped or not, or inline in code) only if `M` is
//!    its own top-level module or lies in a lower layer: edges never refer to other edges, `tls`
//!    and `control` not to each other, and nothing below the wiring to `daemon` or `config`. The
//!    exceptions are in [`SAME_LAYER_ALLOWED`]. `super::` and `self::` paths count once resolved
//!    (`super::*` in a file's `mod tests` is the file's own module).
//! 2. The lower layers do not use some external crates, listed in [`FORBIDDEN_CRATES`].
//! 3. No import cycle among sibling modules (for example `control::a` -> `control::b` ->
//!    `control::a`), nor among the top-level modules. Items of the parent module are not nodes.
//!
//! A new top-level module must be added to [`LAYERS`].
use std::collections::{BTreeMap, BTreeSet};

/// The layer of each top-level module.
const LAYERS: &[(&str, u8)] = &[
    ("policy", 0),
    ("compile", 1),
    ("dataplane", 2),
    ("control", 3),
    ("tls", 3),
    ("api", 4),
    ("cli", 4),
    ("metrics", 4),
    ("netskope_sync", 4),
    ("daemon", 5),
    ("config", 5),
    ("logging", 5),
    ("main", 5),
];

/// The layer of the edges, which never refer to each other.
const EDGES: u8 = 4;

/// References between different modules of one layer that are allowed, as (from, to).
const SAME_LAYER_ALLOWED: &[(&str, &str)] =
    &[("daemon", "config"), ("main", "config"), ("main", "daemon"), ("logging", "config"), ("main", "logging")];

const CORE_FORBIDDEN: &[&str] =
    &["aya", "axum", "rusqlite", "tokio", "prometheus", "ureq", "rustls", "tokio_rustls", "hyper", "libc"];

/// External crates a top-level module must not use.
const FORBIDDEN_CRATES: &[(&str, &[&str])] = &[
    ("policy", CORE_FORBIDDEN),
    ("compile", CORE_FORBIDDEN),
    ("dataplane", &["axum", "rusqlite", "tokio", "prometheus", "ureq", "rustls"]),
    ("control", &["axum", "hyper", "ureq"]),
];

#[test]
fn the_crate_follows_its_layers() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&src, &src, &mut files);
    assert!(files.iter().any(|(p, _)| p == "lib.rs"), "no sources found under {}", src.display());
    let found = violations(&files);
    assert!(found.is_empty(), "{} layering violation(s):\n{}", found.len(), found.join("\n"));
}

/// Every `.rs` file under `dir`, as (path relative to `root` with `/` separators, text).
fn read_tree(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_tree(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).unwrap().components();
            let rel: Vec<_> = rel.map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            out.push((rel.join("/"), std::fs::read_to_string(&path).unwrap()));
        }
    }
}

/// All violations of the rules in `files` (paths relative to `src`), each as `file:line: what`.
fn violations(files: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut parsed = Vec::new();
    for (path, text) in files {
        let Some(module) = module_of(path) else { continue };
        if layer(&module[0]).is_none() {
            out.push(format!("{path}: top-level module `{}` is not in LAYERS", module[0]));
            continue;
        }
        parsed.push(parse(path, &module, text));
    }
    let known = known_modules(&parsed);
    let mut graphs = Graphs::new();
    for file in &parsed {
        for r in &file.refs {
            check_crates(file, r, &mut out);
            let Some(target) = resolve(&r.scope, &r.segs, file.module[0] == "main") else { continue };
            check_layers(file, r, &target, &mut out);
            add_edge(&mut graphs, &known, file, r, &target);
        }
    }
    out.extend(cycles(&graphs));
    out
}

fn layer(top: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == top).map(|&(_, l)| l)
}

/// The module a file defines, or `None` for `lib.rs` and files that are not Rust.
fn module_of(path: &str) -> Option<Vec<String>> {
    let mut segs: Vec<String> = path.strip_suffix(".rs")?.split('/').map(String::from).collect();
    if segs.len() > 1 && segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    (segs != ["lib"]).then_some(segs)
}

// ---- Tokens: identifiers, `::` and punctuation; comments and literals dropped ----

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

struct Token {
    tok: Tok,
    line: usize,
}

/// Splits `text` into tokens, skipping whitespace, comments, string, char and number literals.
fn tokenize(text: &str) -> Vec<Token> {
    let c: Vec<char> = text.chars().collect();
    let (mut i, mut line, mut out) = (0, 1, Vec::new());
    while i < c.len() {
        let start_line = line;
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if c[i..].starts_with(&['/', '/']) {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i..].starts_with(&['/', '*']) {
            i = skip_block_comment(&c, i, &mut line);
        } else if ch == '"' {
            i = skip_string(&c, i + 1, &mut line);
        } else if ch == '\'' {
            i = skip_char_or_lifetime(&c, i);
        } else if ch.is_ascii_digit() {
            i = skip_number(&c, i);
        } else if ch.is_alphabetic() || ch == '_' {
            let end = word_end(&c, i);
            let word: String = c[i..end].iter().collect();
            let (next, ident) = after_word(&c, &word, end, &mut line);
            if let Some(ident) = ident {
                out.push(Token { tok: Tok::Ident(ident), line: start_line });
            }
            i = next;
        } else if c[i..].starts_with(&[':', ':']) {
            out.push(Token { tok: Tok::PathSep, line });
            i += 2;
        } else {
            out.push(Token { tok: Tok::Punct(ch), line });
            i += 1;
        }
    }
    out
}

fn word_end(c: &[char], mut i: usize) -> usize {
    while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
        i += 1;
    }
    i
}

/// Handles what follows a word ending at `end`: a literal prefix (`b"`, `r#"`, `b'`...), a raw
/// identifier (`r#name`) or a plain identifier. Returns where to go on and the identifier, if any.
fn after_word(c: &[char], word: &str, end: usize, line: &mut usize) -> (usize, Option<String>) {
    let next = c.get(end).copied();
    match (word, next) {
        ("b" | "c", Some('"')) => (skip_string(c, end + 1, line), None),
        ("b", Some('\'')) => (skip_char_or_lifetime(c, end), None),
        ("r" | "br" | "cr", Some('"' | '#')) => {
            let hashes = c[end..].iter().take_while(|&&h| h == '#').count();
            if c.get(end + hashes) == Some(&'"') {
                (skip_raw_string(c, end + hashes + 1, hashes, line), None)
            } else if word == "r" && hashes == 1 {
                let ident_end = word_end(c, end + 1);
                (ident_end, Some(c[end + 1..ident_end].iter().collect()))
            } else {
                (end, Some(word.to_string()))
            }
        }
        _ => (end, Some(word.to_string())),
    }
}

fn skip_block_comment(c: &[char], mut i: usize, line: &mut usize) -> usize {
    let mut depth = 0;
    while i < c.len() {
        if c[i..].starts_with(&['/', '*']) {
            depth += 1;
            i += 2;
        } else if c[i..].starts_with(&['*', '/']) {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            *line += usize::from(c[i] == '\n');
            i += 1;
        }
    }
    i
}

/// Skips a string body starting after its opening quote; returns the index after the closing one.
fn skip_string(c: &[char], mut i: usize, line: &mut usize) -> usize {
    while i < c.len() {
        match c[i] {
            '"' => return i + 1,
            '\\' => {
                *line += usize::from(c.get(i + 1) == Some(&'\n'));
                i += 2;
            }
            ch => {
                *line += usize::from(ch == '\n');
                i += 1;
            }
        }
    }
    i
}

fn skip_raw_string(c: &[char], mut i: usize, hashes: usize, line: &mut usize) -> usize {
    while i < c.len() {
        if c[i] == '"' && c[i + 1..].iter().take(hashes).filter(|&&h| h == '#').count() == hashes {
            return i + 1 + hashes;
        }
        *line += usize::from(c[i] == '\n');
        i += 1;
    }
    i
}

/// Skips a char literal (`'x'`, `'\n'`, `'\u{..}'`) or just the quote of a lifetime (`'a`).
fn skip_char_or_lifetime(c: &[char], i: usize) -> usize {
    if c.get(i + 1) == Some(&'\\') {
        let mut j = i + 3;
        while j < c.len() && c[j] != '\'' && c[j] != '\n' {
            j += 1;
        }
        j + 1
    } else if c.get(i + 2) == Some(&'\'') {
        i + 3
    } else {
        i + 1
    }
}

fn skip_number(c: &[char], mut i: usize) -> usize {
    loop {
        i = word_end(c, i);
        if c.get(i) == Some(&'.') && c.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
            i += 1;
        } else {
            return i;
        }
    }
}

// ---- Paths: every `use` tree leaf, `extern crate` and multi-segment path in code ----

/// A path as written (`segs`), where it is (`line`), in which module (`scope`, with inline `mod`s).
struct Ref {
    segs: Vec<String>,
    line: usize,
    scope: Vec<String>,
}

struct Parsed {
    path: String,
    module: Vec<String>,
    refs: Vec<Ref>,
    inline_modules: Vec<Vec<String>>,
}

fn parse(path: &str, module: &[String], text: &str) -> Parsed {
    let toks = tokenize(text);
    let mut file = Parsed { path: path.into(), module: module.to_vec(), refs: vec![], inline_modules: vec![] };
    let mut scope = module.to_vec();
    let (mut depth, mut open_modules) = (0usize, Vec::new());
    let mut i = 0;
    while i < toks.len() {
        match (&toks[i].tok, toks.get(i + 1).map(|t| &t.tok), toks.get(i + 2).map(|t| &t.tok)) {
            (Tok::Ident(kw), Some(Tok::Ident(name)), Some(Tok::Punct('{'))) if kw == "mod" => {
                scope.push(name.clone());
                file.inline_modules.push(scope.clone());
                depth += 1;
                open_modules.push(depth);
                i += 3;
            }
            (Tok::Punct('{'), _, _) => {
                depth += 1;
                i += 1;
            }
            (Tok::Punct('}'), _, _) => {
                if open_modules.last() == Some(&depth) {
                    open_modules.pop();
                    scope.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            (Tok::Ident(kw), _, _) if kw == "use" => {
                let mut leaves = Vec::new();
                i += 1;
                use_tree(&toks, &mut i, &[], &mut leaves);
                while toks.get(i).is_some_and(|t| t.tok != Tok::Punct(';')) {
                    i += 1;
                }
                for (segs, line) in leaves.into_iter().filter(|(segs, _)| !segs.is_empty()) {
                    file.refs.push(Ref { segs, line, scope: scope.clone() });
                }
            }
            (Tok::Ident(kw), Some(Tok::Ident(krate)), Some(Tok::Ident(name))) if kw == "extern" && krate == "crate" => {
                file.refs.push(Ref { segs: vec![name.clone()], line: toks[i].line, scope: scope.clone() });
                i += 3;
            }
            (Tok::Ident(first), Some(Tok::PathSep), _) if path_starts_at(&toks, i) => {
                let mut segs = vec![first.clone()];
                let line = toks[i].line;
                i += 1;
                while let (Some(Tok::PathSep), Some(Tok::Ident(s))) =
                    (toks.get(i).map(|t| &t.tok), toks.get(i + 1).map(|t| &t.tok))
                {
                    segs.push(s.clone());
                    i += 2;
                }
                file.refs.push(Ref { segs, line, scope: scope.clone() });
            }
            _ => i += 1,
        }
    }
    file
}

/// Whether the identifier at `i` starts a path: not after `::`, except a leading `::` (`::aya::x`).
fn path_starts_at(toks: &[Token], i: usize) -> bool {
    if i == 0 || toks[i - 1].tok != Tok::PathSep {
        return true;
    }
    !matches!(i.checked_sub(2).map(|j| &toks[j].tok), Some(Tok::Ident(_) | Tok::Punct('>')))
}

/// Parses one use tree at `*i` below `prefix`, adding each leaf path with the line it starts on.
/// Stops after the tree (at `,`, `}` or `;`).
fn use_tree(toks: &[Token], i: &mut usize, prefix: &[String], out: &mut Vec<(Vec<String>, usize)>) {
    let mut segs = prefix.to_vec();
    let line = toks.get(*i).map_or(0, |t| t.line);
    if toks.get(*i).is_some_and(|t| t.tok == Tok::PathSep) {
        *i += 1;
    }
    while let Some(t) = toks.get(*i) {
        match &t.tok {
            Tok::Ident(name) => {
                segs.push(name.clone());
                *i += 1;
                if toks.get(*i).is_some_and(|t| t.tok == Tok::PathSep) {
                    *i += 1;
                    continue;
                }
                if matches!(toks.get(*i).map(|t| &t.tok), Some(Tok::Ident(a)) if a == "as") {
                    *i += 2;
                }
                out.push((segs, line));
                break;
            }
            Tok::Punct('*') => {
                *i += 1;
                out.push((segs, line));
                break;
            }
            Tok::Punct('{') => {
                *i += 1;
                use_group(toks, i, &segs, out);
                break;
            }
            _ => break,
        }
    }
}

/// Parses the trees of a `{ a, b::c, ... }` group after its `{`, and the closing `}`.
fn use_group(toks: &[Token], i: &mut usize, prefix: &[String], out: &mut Vec<(Vec<String>, usize)>) {
    while let Some(t) = toks.get(*i) {
        match t.tok {
            Tok::Punct('}') => {
                *i += 1;
                return;
            }
            Tok::Punct(',') => *i += 1,
            Tok::Punct(';') => return,
            _ => {
                let before = *i;
                use_tree(toks, i, prefix, out);
                if *i == before {
                    *i += 1;
                }
            }
        }
    }
}

/// The crate-absolute module path (without `crate`) a path leads to, or `None` if it does not
/// start in this crate. In `main.rs` the library is `gatekeeper::`; `self` and `*` leaves drop out.
fn resolve(scope: &[String], segs: &[String], in_main: bool) -> Option<Vec<String>> {
    let supers = segs.iter().take_while(|s| *s == "super").count();
    let (mut target, rest) = match segs[0].as_str() {
        "gatekeeper" if in_main => (vec![], &segs[1..]),
        _ if in_main => return None,
        "crate" => (vec![], &segs[1..]),
        "self" => (scope.to_vec(), &segs[1..]),
        "super" if supers <= scope.len() => (scope[..scope.len() - supers].to_vec(), &segs[supers..]),
        _ => return None,
    };
    target.extend(rest.iter().filter(|s| *s != "self" && *s != "*").cloned());
    Some(target)
}

// ---- Rules ----

/// Rule 1: refer only to lower layers (or the own top-level module, or an allowed exception).
fn check_layers(file: &Parsed, r: &Ref, target: &[String], out: &mut Vec<String>) {
    let (from, Some(to)) = (file.module[0].as_str(), target.first().map(String::as_str)) else { return };
    if from == to || SAME_LAYER_ALLOWED.contains(&(from, to)) {
        return;
    }
    let (from_layer, shown) = (layer(from).unwrap(), r.segs.join("::"));
    let why = match layer(to) {
        None => format!("`{to}` is not a top-level module in LAYERS"),
        Some(EDGES) if from_layer == EDGES => format!("edges never refer to other edges ({from} -> {to})"),
        Some(l) if l == from_layer => format!("{from} and {to} share layer {l} and may not refer to each other"),
        Some(l) if l > from_layer => format!("{from} (layer {from_layer}) may not refer to {to} (layer {l})"),
        Some(_) => return,
    };
    out.push(format!("{}:{}: `{shown}`: {why}", file.path, r.line));
}

/// Rule 2: the lower layers keep away from some external crates.
fn check_crates(file: &Parsed, r: &Ref, out: &mut Vec<String>) {
    let Some(&(module, forbidden)) = FORBIDDEN_CRATES.iter().find(|(m, _)| *m == file.module[0]) else { return };
    if forbidden.contains(&r.segs[0].as_str()) {
        let shown = r.segs.join("::");
        out.push(format!("{}:{}: `{shown}`: {module} must not use the crate `{}`", file.path, r.line, r.segs[0]));
    }
}

/// Every module the files define, with their ancestors and inline `mod`s.
fn known_modules(files: &[Parsed]) -> BTreeSet<Vec<String>> {
    let mut known = BTreeSet::new();
    for file in files {
        for n in 1..=file.module.len() {
            known.insert(file.module[..n].to_vec());
        }
        known.extend(file.inline_modules.iter().cloned());
    }
    known
}

/// For each parent module (empty: the crate root), the edges between its children, each with
/// the first place it was seen.
type Graphs = BTreeMap<Vec<String>, BTreeMap<(String, String), String>>;

/// Rule 3's graph: `scope` refers to `target`; the edge is between the two children of their
/// deepest common ancestor, if the target's child is a module (not an item of the ancestor).
fn add_edge(graphs: &mut Graphs, known: &BTreeSet<Vec<String>>, file: &Parsed, r: &Ref, target: &[String]) {
    let common = r.scope.iter().zip(target).take_while(|(a, b)| a == b).count();
    if common >= r.scope.len() || common >= target.len() || !known.contains(&target[..=common]) {
        return;
    }
    let edge = (r.scope[common].clone(), target[common].clone());
    let at = format!("{}:{}", file.path, r.line);
    graphs.entry(r.scope[..common].to_vec()).or_default().entry(edge).or_insert(at);
}

/// Rule 3: every strongly connected set of siblings, with the edges that tie it.
fn cycles(graphs: &Graphs) -> Vec<String> {
    let mut out = Vec::new();
    for (parent, edges) in graphs {
        let nodes: BTreeSet<&String> = edges.keys().flat_map(|(a, b)| [a, b]).collect();
        let reach: BTreeMap<&String, BTreeSet<&String>> = nodes.iter().map(|&n| (n, reachable(edges, n))).collect();
        let mut seen = BTreeSet::new();
        for &n in &nodes {
            let members: BTreeSet<&String> =
                nodes.iter().copied().filter(|m| reach[n].contains(m) && reach[m].contains(n)).collect();
            if members.len() < 2 || !seen.insert(members.clone()) {
                continue;
            }
            let ties: Vec<String> = edges
                .iter()
                .filter(|((a, b), _)| members.contains(a) && members.contains(b))
                .map(|((a, b), at)| format!("{at}: {a} -> {b}"))
                .collect();
            let whose = if parent.is_empty() {
                "top-level modules".into()
            } else {
                format!("children of `crate::{}`", parent.join("::"))
            };
            let names: Vec<&str> = members.iter().map(|s| s.as_str()).collect();
            out.push(format!("import cycle among the {whose}: {} ({})", names.join(", "), ties.join("; ")));
        }
    }
    out
}

fn reachable<'a>(edges: &'a BTreeMap<(String, String), String>, from: &'a String) -> BTreeSet<&'a String> {
    let (mut seen, mut todo) = (BTreeSet::new(), vec![from]);
    while let Some(n) = todo.pop() {
        for (_, b) in edges.keys().filter(|(a, _)| a == n) {
            if seen.insert(b) {
                todo.push(b);
            }
        }
    }
    seen
}

// ---- The checker on small trees ----

fn check(files: &[(&str, &str)]) -> Vec<String> {
    violations(&files.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect::<Vec<_>>())
}

fn assert_one(found: &[String], parts: &[&str]) {
    assert_eq!(found.len(), 1, "{found:#?}");
    for part in parts {
        assert!(found[0].contains(part), "{part:?} not in {found:#?}");
    }
}

#[test]
fn a_clean_tree_has_no_violation() {
    let found = check(&[
        ("lib.rs", "pub mod policy; pub mod api; use crate::api::x;"),
        ("policy/mod.rs", "pub mod document;\npub mod selector;\npub use document::*;"),
        ("policy/document.rs", "use super::selector::{self, Selector};\nuse crate::policy::Asset;"),
        ("policy/selector.rs", "use super::{Asset, Policy};\nuse ipnet::IpNet;\nfn f() { Self::x(); }"),
        ("compile.rs", "use crate::policy::{Policy, membership};\n#[cfg(test)]\nmod tests {\n    use super::*;\n}"),
        ("dataplane/mod.rs", "mod load;\nuse aya::maps::HashMap;\nuse crate::compile::Compiled;"),
        ("dataplane/load.rs", "use super::{BpfDataplane, pin::remove_pins};\nfn f() { libc::close(3); }"),
        ("control/store.rs", "use super::netskope::{Integration, KEY};\nuse rusqlite::Connection;"),
        ("control/netskope.rs", "use crate::policy::Policy;\nfn f() -> tokio::task::JoinHandle<()> { todo!() }"),
        ("tls.rs", "use tokio_rustls::rustls::ServerConfig;"),
        ("api/mod.rs", "mod netskope;\nuse axum::Router;\nuse crate::{control::store::Store, tls::TlsListener};"),
        ("api/netskope.rs", "use super::AppState;\nuse crate::control::netskope::Integration;"),
        ("cli.rs", "fn f() { let c = crate::tls::load_certs(p); }"),
        ("metrics.rs", "use crate::control::{Control, telemetry};"),
        ("netskope_sync/mod.rs", "use crate::control::netskope::Integration;\nfn f() { ureq::get(u); }"),
        ("daemon.rs", "use crate::{api, cli, config::Config, metrics, netskope_sync};"),
        ("config.rs", "use crate::{compile::Timeouts, dataplane::XdpAttachMode};"),
        ("main.rs", "use gatekeeper::{config::Config, daemon};\nfn main() { gatekeeper::cli::run(); }"),
    ]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn policy_may_not_refer_to_control() {
    let found = check(&[("policy/document.rs", "use std::fmt;\n\nuse crate::control::x;\n")]);
    assert_one(&found, &["policy/document.rs:3:", "`crate::control::x`", "policy (layer 0)", "control (layer 3)"]);
}

#[test]
fn control_may_not_use_axum() {
    let found = check(&[("control/store.rs", "fn router() -> axum::Router {\n    todo!()\n}\n")]);
    assert_one(&found, &["control/store.rs:1:", "`axum::Router`", "crate `axum`"]);
    let found = check(&[("control/store.rs", "use axum::{Json, Router};\n")]);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found.iter().all(|v| v.contains("control must not use the crate `axum`")), "{found:#?}");
}

#[test]
fn lower_layers_may_not_use_their_forbidden_crates() {
    let found = check(&[
        ("policy/mod.rs", "extern crate libc;\n"),
        ("compile.rs", "#[tokio::main]\nasync fn main() {}\n"),
        ("dataplane/mod.rs", "fn f() { let _ = ::prometheus::Counter::new(); }\n"),
    ]);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found[0].starts_with("policy/mod.rs:1: `libc`"), "{found:#?}");
    assert!(found[1].starts_with("compile.rs:1: `tokio::main`"), "{found:#?}");
    assert!(found[2].starts_with("dataplane/mod.rs:1: `prometheus::Counter::new`"), "{found:#?}");
}

#[test]
fn crate_names_count_only_at_the_start_of_a_path() {
    let text = "use ipnet::IpNet;\nfn f() { Self::tokio(); x.tokio; my_tokio::x(); foo::tokio::x(); }\n";
    assert!(check(&[("policy/mod.rs", text)]).is_empty());
    // `tokio_rustls` is its own crate: not `rustls`.
    assert!(check(&[("dataplane/mod.rs", "use tokio_rustls::TlsAcceptor;")]).is_empty());
}

#[test]
fn edges_never_refer_to_other_edges() {
    let found = check(&[("cli.rs", "use crate::api::Client;\n")]);
    assert_one(&found, &["cli.rs:1:", "`crate::api::Client`", "edges never refer to other edges (cli -> api)"]);
    let found = check(&[("api/netskope.rs", "fn f() {\n    super::super::metrics::render();\n}\n")]);
    assert_one(&found, &["api/netskope.rs:2:", "`super::super::metrics::render`", "(api -> metrics)"]);
}

#[test]
fn only_the_wiring_refers_to_daemon_and_config() {
    let found = check(&[
        ("dataplane/mod.rs", "use crate::config::Config;\n"),
        ("api/mod.rs", "use crate::daemon::Enforcer;\n"),
        ("daemon.rs", "use crate::config::Config;\n"),
        ("main.rs", "use gatekeeper::{config::Config, daemon};\n"),
    ]);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found[0].starts_with("dataplane/mod.rs:1: `crate::config::Config`: dataplane (layer 2)"), "{found:#?}");
    assert!(found[1].starts_with("api/mod.rs:1: `crate::daemon::Enforcer`: api (layer 4)"), "{found:#?}");
}

#[test]
fn config_may_not_refer_to_daemon_nor_tls_to_control() {
    let found = check(&[("config.rs", "use crate::daemon::run;\n"), ("tls.rs", "use crate::control::Control;\n")]);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found[0].contains("config and daemon share layer 5"), "{found:#?}");
    assert!(found[1].contains("tls and control share layer 3"), "{found:#?}");
}

#[test]
fn a_grouped_multi_line_use_is_checked_leaf_by_leaf() {
    let found = check(&[("control/store.rs", "use crate::{\n    api::x,\n    policy::y,\n};\n")]);
    assert_one(&found, &["control/store.rs:2:", "`crate::api::x`", "control (layer 3) may not refer to api (layer 4)"]);
}

#[test]
fn an_inline_path_in_code_is_checked() {
    let found = check(&[("control/telemetry.rs", "fn f() {\n    crate::metrics::netskope_sync(false);\n}\n")]);
    assert_one(&found, &["control/telemetry.rs:2:", "`crate::metrics::netskope_sync`", "may not refer to metrics"]);
}

#[test]
fn tests_modules_follow_the_layers_but_may_use_their_module() {
    let text = "fn f() {}\n#[cfg(test)]\nmod tests {\n    use super::*;\n    use crate::dataplane::fake::Fake;\n}\n";
    let found = check(&[("compile.rs", text)]);
    assert_one(&found, &["compile.rs:5:", "`crate::dataplane::fake::Fake`", "compile (layer 1)"]);
}

#[test]
fn unknown_modules_are_reported() {
    let found = check(&[("util.rs", "pub fn f() {}\n"), ("daemon.rs", "use crate::netskope::Settings;\n")]);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found[0].starts_with("util.rs: top-level module `util` is not in LAYERS"), "{found:#?}");
    assert!(found[1].starts_with("daemon.rs:1: `crate::netskope::Settings`: `netskope` is not"), "{found:#?}");
}

#[test]
fn a_cycle_between_siblings_is_reported() {
    let found = check(&[
        ("control/a.rs", "use super::b::X;\npub struct Y;\n"),
        ("control/b.rs", "pub struct X;\nuse super::a::Y;\n"),
        ("control/c.rs", "use super::{a::Y, b};\n"),
    ]);
    assert_one(&found, &["children of `crate::control`: a, b", "control/a.rs:1: a -> b", "control/b.rs:2: b -> a"]);
}

#[test]
fn a_cycle_through_a_grouped_use_and_tests_is_reported() {
    let found = check(&[
        ("control/mod.rs", "mod a;\nmod b;\npub struct Item;\n"),
        ("control/a.rs", "use super::{Item, b};\n"),
        ("control/b.rs", "use super::Item;\n#[cfg(test)]\nmod tests {\n    fn f(_: super::super::a::Z) {}\n}\n"),
    ]);
    assert_one(&found, &["children of `crate::control`: a, b", "control/a.rs:1: a -> b", "control/b.rs:4: b -> a"]);
}

#[test]
fn items_of_the_parent_module_are_not_nodes() {
    let found = check(&[
        ("control/mod.rs", "pub struct Item;\n"),
        ("control/a.rs", "use super::{Item, b::X};\npub struct Y;\n"),
        ("control/b.rs", "use super::Item;\nuse crate::control::Item as Other;\n"),
    ]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn a_cycle_between_top_level_modules_is_reported() {
    let found = check(&[("daemon.rs", "use crate::config::Config;\n"), ("config.rs", "use crate::daemon::run;\n")]);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found[0].starts_with("config.rs:1: `crate::daemon::run`"), "{found:#?}");
    assert!(found[1].starts_with("import cycle among the top-level modules: config, daemon"), "{found:#?}");
}

#[test]
fn comments_strings_and_doc_links_do_not_count() {
    let text = r####"//! Sits below [`crate::control::App`] and [`crate::api`].
/// Like [`crate::daemon::run`], without `tokio::spawn`.
// crate::metrics::render(); axum::Router
/* crate::cli::run(); /* nested: tokio::spawn */ axum::Router */
const A: &str = "crate::control::x; tokio::spawn \" crate::api::x";
const B: &str = r#"crate::control::x "quoted" axum::Router"#;
const C: &[u8] = b"tokio::spawn";
const D: &[u8] = br##"crate::api "# x"##;
const E: char = '"';
const F: char = '\'';
fn f<'a>(s: &'a str, t: &'static str) -> &'a str {
    let multi = "line one
crate::control::x";
    s
}
"####;
    assert!(check(&[("policy/mod.rs", text)]).is_empty());
    let after = format!("{text}use crate::control::y;\n");
    let found = check(&[("policy/mod.rs", &after)]);
    assert_one(&found, &["policy/mod.rs:16: `crate::control::y`"]);
}
