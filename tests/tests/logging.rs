//! The daemon's log settings, end to end: `[log] format = "json"` makes every stderr line a JSON
//! record (lab, needs root), and a bad `GATEKEEPER_LOG` or `GATEKEEPER_LOG_FORMAT` stops the
//! binary with a precise error instead of logging at some default.

use std::process::{Command, Stdio};

use gatekeeper_tests::lab::{Lab, gatekeeper_bin};

const POLICY: &str =
    "assets:\n  - {name: a, ips: [10.0.0.1], tags: {role: x}}\nsegments:\n  - {name: s, selector: role=x}\nrules: []\n";

#[test]
fn the_daemon_logs_json_lines_when_configured() {
    let lab = Lab::new(&[("a", 1), ("b", 2)]).unwrap();
    let bin = gatekeeper_bin().unwrap();
    // `extra` goes into [dataplane]; the [log] table after it is a section of its own.
    let daemon = lab.start_daemon_with(&bin, POLICY, "ephemeral = true\n\n[log]\nformat = \"json\"").unwrap();
    let log = daemon.stop().unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    let mut messages = Vec::new();
    for line in &lines {
        let record: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n{log}"));
        assert!(record["timestamp"].is_string(), "{line}");
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&record["level"].as_str().unwrap_or("")),
            "{line}"
        );
        messages.push(record["fields"]["message"].as_str().unwrap_or_else(|| panic!("no message: {line}")).to_string());
    }
    assert!(messages.iter().any(|m| m == "gatekeeper running"), "{messages:#?}");
    assert!(!log.contains('\x1b'), "no ANSI escapes in a log file: {log:?}");
}

#[test]
fn a_bad_filter_or_format_stops_the_binary() {
    let dir = std::env::temp_dir().join(format!("gk-logging-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let config = dir.join("gatekeeper.toml");
    // `run` reads its configuration before it sets up the log; nothing is attached to `gk-none0`.
    std::fs::write(&config, "[dataplane]\ninterfaces = [\"gk-none0\"]\nephemeral = true\n").unwrap();
    let bin = gatekeeper_bin().unwrap();
    let cases: [(&[&str], &str, &str, &str); 4] = [
        (
            &["check", policy.to_str().unwrap()],
            "GATEKEEPER_LOG",
            "gatekeeper=loud",
            "GATEKEEPER_LOG=\"gatekeeper=loud\" is not a log filter: ",
        ),
        (
            &["check", policy.to_str().unwrap()],
            "GATEKEEPER_LOG_FORMAT",
            "xml",
            "GATEKEEPER_LOG_FORMAT=\"xml\": expected \"text\" or \"json\"",
        ),
        (
            &["run", "--config", config.to_str().unwrap()],
            "GATEKEEPER_LOG",
            "info,[{",
            "GATEKEEPER_LOG=\"info,[{\" is not a log filter: ",
        ),
        (
            &["run", "--config", config.to_str().unwrap()],
            "GATEKEEPER_LOG_FORMAT",
            "JSON",
            "GATEKEEPER_LOG_FORMAT=\"JSON\"",
        ),
    ];
    for (args, var, value, want) in cases {
        let out = Command::new(&bin)
            .args(args)
            .env_remove("GATEKEEPER_LOG")
            .env_remove("GATEKEEPER_LOG_FORMAT")
            .env(var, value)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} {var}={value}: {stderr}");
        assert!(stderr.starts_with(&format!("error: {want}")), "{args:?} {var}={value}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} {var}={value}: nothing ran");
    }
    // The same check with a good filter passes: the failures above are the log settings'.
    let out =
        Command::new(&bin).args(["check", policy.to_str().unwrap()]).env("GATEKEEPER_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}
