//! Signals during start-up: a SIGHUP or SIGTERM that arrives while the daemon compiles its policy
//! does not kill it with the default action. A SIGHUP is applied once it runs; a SIGTERM stops it
//! cleanly (enforcement stays pinned, as on any SIGTERM). Needs root (BPF, network namespaces).

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use gatekeeper_tests::lab::{Lab, gatekeeper_bin};

/// A policy large enough that the start takes a while (compile and map writes).
fn big_policy(assets: usize) -> String {
    let mut p = String::from("assets:\n");
    for i in 0..assets {
        let ip = format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256);
        p.push_str(&format!("  - {{name: a{i}, ips: [{ip}], tags: {{role: r{}}}}}\n", i % 50));
    }
    p.push_str("segments:\n");
    for s in 0..50 {
        p.push_str(&format!("  - {{name: s{s}, selector: role=r{s}}}\n"));
    }
    p.push_str("rules:\n  - {name: r0, from: s0, to: s1, protocol: tcp, ports: [502]}\n");
    p
}

struct Started {
    child: Child,
    log: std::path::PathBuf,
}

impl Started {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log contains `needle`.
    fn wait_for(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, sig) }, 0);
    }

    /// Waits (bounded) for the exit status.
    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Started {
    /// A failed assertion must not leave a daemon running.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start(lab: &Lab, name: &str, policy: &str) -> Started {
    let dir = &lab.dir;
    let policy_path = dir.join(format!("{name}-policy.yaml"));
    std::fs::write(&policy_path, policy).unwrap();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[dataplane]\ninterfaces = [\"p-a\", \"p-b\"]\npin_dir = {:?}\n[store]\npath = {:?}\n[policy]\nfile = {:?}\n",
            lab.pin_dir().display().to_string(),
            dir.join(format!("{name}-state.db")).display().to_string(),
            policy_path.display().to_string()
        ),
    )
    .unwrap();
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", lab.appliance))
        .arg("--")
        .arg(gatekeeper_bin().unwrap())
        .args(["run", "--config"])
        .arg(&config)
        .env("GATEKEEPER_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap();
    Started { child, log }
}

#[test]
fn signals_during_start_up_are_handled() {
    let lab = Lab::new(&[("a", 1), ("b", 2)]).unwrap();
    let bin = gatekeeper_bin().unwrap();
    let policy = big_policy(40_000);

    // SIGHUP while compiling: applied once running, the daemon stays up.
    let mut d = start(&lab, "hup", &policy);
    assert!(d.wait_for("compiling the policy", Duration::from_secs(30)), "{}", d.log());
    d.signal(libc::SIGHUP);
    assert!(d.wait_for("gatekeeper running", Duration::from_secs(60)), "died on SIGHUP during start: {}", d.log());
    assert!(d.wait_for("reason=\"reload\"", Duration::from_secs(30)), "the SIGHUP was not applied: {}", d.log());
    assert!(d.child.try_wait().unwrap().is_none(), "exited: {}", d.log());
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(Duration::from_secs(30)).expect("stops on SIGTERM");
    assert!(st.success(), "{st}: {}", d.log());

    // SIGTERM while compiling: a clean stop, said in the log.
    let mut d = start(&lab, "term", &policy);
    assert!(d.wait_for("compiling the policy", Duration::from_secs(30)), "{}", d.log());
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(Duration::from_secs(60)).expect("stops after SIGTERM during start");
    assert!(st.success(), "killed by SIGTERM during start ({st}): {}", d.log());
    assert!(d.log().contains("gatekeeper stopped"), "{}", d.log());
    lab.detach(&bin).unwrap();
}
