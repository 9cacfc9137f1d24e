//! The `gatekeeper check` command, run as a user would.
use std::process::Command;

fn check(policy: &str) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!("gk-cli-{}-{}", std::process::id(), policy.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("policy.yaml");
    std::fs::write(&path, policy).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gatekeeper")).arg("check").arg(&path).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn check_accepts_the_demo_policy() {
    let (ok, stdout, stderr) = check(include_str!("../../xtask/demo/policy.yaml"));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("OK: 4 assets, 3 segments, 4 rules (0 expired); 8 prefixes"), "{stdout}");
}

#[test]
fn check_lists_every_problem_and_fails() {
    let (ok, stdout, stderr) = check(
        "segments:\n  - {name: plc, selector: 'role=plc'}\nrules:\n  - {name: a, from: hmi, to: plc}\n  - {name: a, from: plc, to: plc, protocol: udp, ports: ['9-']}\n",
    );
    assert!(!ok);
    assert!(stdout.is_empty());
    assert!(stderr.contains("policy.yaml: 3 problem(s):"), "{stderr}");
    assert!(stderr.contains("rules[1] \"a\": name: duplicate name"), "{stderr}");
    assert!(stderr.contains("rules[0] \"a\": from: unknown segment \"hmi\""), "{stderr}");
    assert!(stderr.contains("rules[1] \"a\": ports: \"\" is not a port (0-65535)"), "{stderr}");
}

#[test]
fn check_reports_yaml_syntax_with_location() {
    let (ok, _, stderr) = check("rules:\n  - {name: a, from: x\n");
    assert!(!ok);
    assert!(stderr.contains("policy.yaml: ") && stderr.contains("line 2"), "{stderr}");
}
