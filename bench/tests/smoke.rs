//! The benchmark's smoke mode, run in `cargo xtask test` so the benchmark cannot rot: every
//! section runs end to end on tiny sizes and its results are checked for sense, not speed.
//! Needs root (BPF, network namespaces) and nftables.

use serde_json::Value;

#[test]
fn smoke_run_measures_every_section() {
    let out = std::env::temp_dir().join(format!("gk-bench-smoke-{}", std::process::id()));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_gatekeeper-bench"))
        .args(["--smoke", "--out"])
        .arg(&out)
        .output()
        .expect("running gatekeeper-bench");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "gatekeeper-bench --smoke failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("SMOKE RUN"), "{stdout}");
    let file = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().ends_with("-smoke.json"))
        .expect("results file");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(file.path()).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&out);

    let program = r["program"].as_array().unwrap();
    for kind in ["allowed", "new-flow", "flow-hit", "denied", "non-ip"] {
        let cells: Vec<&Value> = program.iter().filter(|c| c["kind"] == kind).collect();
        assert!(!cells.is_empty(), "no {kind} cells");
        for c in cells {
            let ns = c["net_ns_median"].as_f64().unwrap();
            assert!(ns.is_finite() && ns > -50.0 && ns < 100_000.0, "{kind}: {ns} ns is not a plausible cost");
        }
    }
    let bridge = r["bridge"].as_array().unwrap();
    for filter in ["none", "gatekeeper", "nft-bridge-set", "nft-netdev-set", "nft-bridge-linear"] {
        for traffic in ["allowed", "denied"] {
            let c = bridge
                .iter()
                .find(|c| c["filter"] == filter && c["traffic"] == traffic)
                .unwrap_or_else(|| panic!("no {filter} {traffic}"));
            assert!(c["pps_median"].as_f64().unwrap() > 1000.0, "{filter} {traffic}: {c}");
        }
    }
    let control = &r["control"];
    assert!(control["full_entries"].as_u64().unwrap() > 0);
    assert!(control["change_entries"].as_u64().unwrap() > 0, "a tag change wrote nothing");
}
