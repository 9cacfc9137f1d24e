//! The `gatekeeper` command-line client, the real binary, against the real API router and
//! server over a real store (the data plane is the XDP program as root, the in-memory one
//! otherwise: see `gatekeeper_tests::control`): field diffs, get/describe/delete, output formats,
//! standard input, a closed pipe, foreign error pages, usage errors and the version.
//!
//! Needs the binary built first (`cargo build -p gatekeeper`; `cargo xtask test` does).

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use gatekeeper::{control::auth::Tokens, daemon::http_router};
use gatekeeper_tests::lab::gatekeeper_bin;
use serde_json::Value;

const ADMIN: &str = "admin-token-0123456789";

const POLICY: &str = r#"
assets:
  - {name: hmi-1, ips: [10.0.0.1], tags: {role: hmi}}
  - {name: plc-1, ips: [10.0.0.11], tags: {role: plc, zone: cell-1}}
segments:
  - {name: hmi, selector: role=hmi, mode: label}
  - {name: plc, selector: role=plc, mode: enforce}
rules:
  - {name: hmi-modbus, from: hmi, to: plc, protocol: tcp, ports: [502]}
"#;

/// The API on a loopback port, a token file, and a directory removed on drop.
struct Server {
    url: String,
    dir: PathBuf,
    token: PathBuf,
    _rt: tokio::runtime::Runtime,
}

/// How a run of the binary ended.
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Server {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("gk-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("admin.token");
        std::fs::write(&token, ADMIN).unwrap();
        let control = gatekeeper_tests::control::control(&dir.join("state.db"));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let r =
            http_router(&control, &Tokens::admin_reader(Some(ADMIN), None), gatekeeper::config::DEFAULT_MAX_BODY_BYTES)
                .unwrap();
        rt.spawn(async move { gatekeeper::api::serve::serve(listener, None, r).await });
        Self { url, dir, token, _rt: rt }
    }

    /// `gatekeeper ARGS` against this server (through the environment, as an operator's shell
    /// would have it), with `stdin` on standard input.
    fn gk(&self, args: &[&str], stdin: Option<&str>) -> Run {
        gk(args, stdin, &[("GATEKEEPER_API", &self.url), ("GATEKEEPER_TOKEN_FILE", self.token.to_str().unwrap())])
    }

    /// Like [`Server::gk`], and the command must succeed.
    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let r = self.gk(args, stdin);
        assert_eq!(r.code, 0, "gatekeeper {args:?}: {}{}", r.out, r.err);
        r.out
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args, None);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("gatekeeper {args:?}: {e}: {out}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the binary with `args`, `env` and `stdin`, within 60 s.
fn gk(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Run {
    let mut child = Command::new(gatekeeper_bin().unwrap())
        .args(args)
        .env_remove("GATEKEEPER_API")
        .env_remove("GATEKEEPER_TOKEN_FILE")
        .env_remove("GATEKEEPER_CA_CERT")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gatekeeper");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).unwrap();
    }
    let (mut out, mut err) = (String::new(), String::new());
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut e = String::new();
        se.read_to_string(&mut e).map(|_| e)
    });
    so.read_to_string(&mut out).unwrap();
    err.push_str(&reader.join().unwrap().unwrap());
    let status = wait(&mut child, Duration::from_secs(60));
    Run { code: status.code().unwrap_or(-1), out, err }
}

fn wait(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("gatekeeper did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn diff_and_dry_run_show_field_changes_and_change_nothing() {
    let s = Server::start("diff");
    let out = s.ok(&["apply", "-f", "-"], Some(POLICY));
    assert!(out.contains("asset plc-1: created") && out.contains("5 object(s) changed"), "{out}");

    let changed = POLICY
        .replace("zone: cell-1}", "zone: cell-2, site: plant-1}")
        .replace("ips: [10.0.0.1]", "ips: [10.0.0.1, 10.0.0.2]");
    let out = s.ok(&["diff", "-f", "-"], Some(&changed));
    for line in [
        r#"asset plc-1: tags.site: added "plant-1""#,
        r#"asset plc-1: tags.zone: "cell-1" -> "cell-2""#,
        r#"asset hmi-1: ips: added "10.0.0.2""#,
        "2 object(s) would change",
    ] {
        assert!(out.lines().any(|l| l == line), "no line {line:?} in:\n{out}");
    }
    // The same from a file, through apply --dry-run, and in JSON with the field list.
    let file = s.dir.join("changed.yaml");
    std::fs::write(&file, &changed).unwrap();
    let out = s.ok(&["apply", "--dry-run", "-f", file.to_str().unwrap()], None);
    assert!(out.contains(r#"asset plc-1: tags.zone: "cell-1" -> "cell-2""#), "{out}");
    let v = s.json(&["diff", "-f", file.to_str().unwrap(), "-o", "json"]);
    let plc = v["changes"].as_array().unwrap().iter().find(|c| c["name"] == "plc-1").unwrap();
    assert!(
        plc["fields"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"path": "tags.zone", "old": "cell-1", "new": "cell-2"}))
    );

    // Nothing changed.
    let plc = s.json(&["get", "asset", "plc-1", "-o", "json"]);
    assert_eq!(plc["tags"]["zone"], "cell-1");
    // A tag change through the CLI, then the diff against the file shows what is left.
    s.ok(&["tag", "plc-1", "zone=cell-2", "site=plant-1"], None);
    let out = s.ok(&["diff", "-f", "-"], Some(&changed));
    assert!(!out.contains("plc-1") && out.contains("1 object(s) would change"), "{out}");
    s.ok(&["apply", "-f", "-"], Some(&changed));
    assert!(s.ok(&["diff", "-f", "-"], Some(&changed)).starts_with("no changes"));
}

#[test]
fn get_describe_delete_round_trip_and_yaml_parses_back() {
    let s = Server::start("objects");
    s.ok(&["apply", "-f", "-"], Some(POLICY));

    let out = s.ok(&["get", "assets"], None);
    let header = out.lines().next().unwrap();
    assert!(header.starts_with("NAME") && header.contains("IPS") && header.contains("TAGS"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("plc-1") && l.contains("10.0.0.11") && l.contains("role=plc")), "{out}");
    assert!(s.ok(&["get", "segs"], None).lines().any(|l| l.starts_with("plc ") && l.contains("enforce")));
    let out = s.ok(&["get", "assets", "-l", "role=hmi"], None);
    assert!(out.contains("hmi-1") && !out.contains("plc-1"), "{out}");

    // -o yaml is the same data as -o json.
    let json = s.json(&["get", "assets", "-o", "json"]);
    let yaml: Value = serde_saphyr::from_str(&s.ok(&["get", "assets", "-o", "yaml"], None)).unwrap();
    assert_eq!(yaml, json);
    let status: Value = serde_saphyr::from_str(&s.ok(&["status", "-o", "yaml"], None)).unwrap();
    assert_eq!(status["objects"]["assets"], 2);

    let out = s.ok(&["describe", "asset", "plc-1"], None);
    assert!(out.contains("Name:") && out.contains("zone=cell-1"), "{out}");
    let segments = out.split("Segments:").nth(1).unwrap().split("Rules:").next().unwrap();
    assert!(segments.contains("plc") && !segments.contains("hmi"), "plc-1 is in plc only:\n{out}");
    assert!(out.contains("hmi-modbus"), "the rule reaching plc-1's segment:\n{out}");
    let v = s.json(&["describe", "asset", "plc-1", "-o", "json"]);
    assert_eq!(v["segments"][0]["name"], "plc");
    assert_eq!(v["recent_changes"][0]["name"], "plc-1");

    let out = s.ok(&["describe", "segment", "plc"], None);
    let members = out.split("Members:").nth(1).unwrap();
    assert!(members.contains("plc-1") && members.contains("10.0.0.11") && !members.contains("hmi-1"), "{out}");
    let out = s.ok(&["describe", "rule", "hmi-modbus"], None);
    assert!(out.contains("From hmi:") && out.contains("To plc:"), "{out}");
    assert!(out.split("To plc:").nth(1).unwrap().contains("plc-1"), "{out}");

    // A segment a rule uses is refused (409, exit 1) and stays.
    let r = s.gk(&["delete", "segment", "plc"], None);
    assert_eq!(r.code, 1, "{}{}", r.out, r.err);
    assert!(r.err.contains("409"), "{}", r.err);
    assert_eq!(s.ok(&["delete", "rule", "hmi-modbus"], None).trim(), r#"rule "hmi-modbus" deleted"#);
    assert_eq!(s.ok(&["delete", "segments", "plc"], None).trim(), r#"segment "plc" deleted"#);
    s.ok(&["delete", "asset", "plc-1"], None);
    let r = s.gk(&["get", "asset", "plc-1"], None);
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(r.err.contains("404") && r.err.contains("plc-1"), "{}", r.err);
    assert!(s.json(&["get", "rules", "-o", "json"]).as_array().unwrap().is_empty());
}

#[test]
fn check_reads_standard_input() {
    let r = gk(&["check", "-"], Some(POLICY), &[]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.starts_with("<stdin>: OK: 2 assets, 2 segments, 1 rules"), "{}", r.out);
    let r = gk(&["check", "-"], Some(&POLICY.replace("to: plc", "to: nope")), &[]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("<stdin>") && r.err.contains("unknown segment \"nope\""), "{}", r.err);
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let s = Server::start("pipe");
    // Well over a pipe's 64 KiB buffer, so the writer meets the closed pipe whatever the timing.
    let assets: String = (0..1500)
        .map(|i| format!("  - {{name: asset-{i:04}, ips: [10.1.{}.{}], tags: {{role: plc}}}}\n", i / 250, i % 250 + 1))
        .collect();
    s.ok(&["apply", "-f", "-"], Some(&format!("assets:\n{assets}")));

    let mut child = Command::new(gatekeeper_bin().unwrap())
        .args(["get", "assets", "-o", "json", "--api", &s.url, "--token-file", s.token.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -c 1`: read a little, then close the pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"[");
    drop(stdout);
    let status = wait(&mut child, Duration::from_secs(60));
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!err.contains("panicked") && err.is_empty(), "stderr: {err}");
    assert_eq!(status.code(), Some(0), "stderr: {err}");
}

/// A stand-in for a proxy in front of the API: answers each of `answers` connections in turn
/// with that status line, content type and body, then stops.
fn foreign_server(answers: Vec<(&'static str, &'static str, &'static str)>) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        for (status, ct, body) in answers {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // The request head (the client sends no body on GET).
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
                if conn.read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes());
        }
    });
    (url, handle)
}

#[test]
fn error_bodies_that_are_not_problem_documents_are_printed() {
    let page = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx/1.24</center></body></html>";
    let (url, server) = foreign_server(vec![
        ("502 Bad Gateway", "text/html", page),
        ("403 Forbidden", "text/plain", "blocked by the plant firewall\n"),
    ]);
    let r = gk(&["status", "--api", &url], None, &[]);
    assert_eq!(r.code, 3, "a failed gateway is 'failed': {}", r.err);
    assert!(r.err.contains("502 Bad Gateway (text/html)") && r.err.contains("nginx/1.24"), "{}", r.err);
    let r = gk(&["get", "assets", "--api", &url], None, &[]);
    assert_eq!(r.code, 1, "a 4xx is 'refused': {}", r.err);
    assert!(r.err.contains("403") && r.err.contains("blocked by the plant firewall"), "{}", r.err);
    server.join().unwrap();

    // Nothing listening: unreachable.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let r = gk(&["status", "--api", &format!("http://127.0.0.1:{port}")], None, &[]);
    assert_eq!(r.code, 3, "{}", r.err);
}

#[test]
fn usage_errors_exit_2_and_help_and_version_say_what_they_should() {
    for args in [
        &["get", "nodes"][..],
        &["frobnicate"],
        &["describe", "asset"],
        &["run", "--api", "http://127.0.0.1:1"],
        &["delete", "app", "42"],
        &["apply"],
    ] {
        let r = gk(args, None, &[]);
        assert_eq!(r.code, 2, "gatekeeper {args:?}: {}", r.err);
        assert!(!r.err.is_empty());
    }
    // Ours, not clap's: still 2.
    let r = gk(&["get", "rules", "--selector", "role=plc", "--api", "http://127.0.0.1:1"], None, &[]);
    assert_eq!(r.code, 2, "{}", r.err);

    let r = gk(&["--version"], None, &[]);
    assert_eq!(r.code, 0);
    let v = r.out.trim();
    let layout = format!("map layout v{})", gatekeeper_common::LAYOUT_VERSION);
    assert!(v.starts_with("gatekeeper 0.") && v.ends_with(&layout), "{v}");
    let rev = v.split("(git ").nth(1).and_then(|r| r.split(',').next()).unwrap();
    assert!(rev.len() >= 7 && rev.bytes().all(|b| b.is_ascii_hexdigit()), "revision {rev:?} in {v}");
    let known = Command::new("git").args(["cat-file", "-e", &format!("{rev}^{{commit}}")]).status();
    assert!(known.is_ok_and(|s| s.success()), "{rev} is not a commit of this repository");

    let help = gk(&["--help"], None, &[]).out;
    assert!(help.contains("Exit codes:") && help.contains("describe") && !help.contains("--api"), "{help}");
    let help = gk(&["run", "--help"], None, &[]).out;
    assert!(!help.contains("--api") && !help.contains("--token-file"), "{help}");
    let help = gk(&["get", "--help"], None, &[]).out;
    assert!(help.contains("--api") && help.contains("--ca-cert") && help.contains("Exit codes:"), "{help}");
}

#[test]
fn the_older_spelling_of_the_connection_options_still_works() {
    let s = Server::start("compat");
    let r = gk(&["--api", &s.url, "--token-file", s.token.to_str().unwrap(), "status", "-o", "json"], None, &[]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(serde_json::from_str::<Value>(&r.out).unwrap()["epoch"].is_number());
}
