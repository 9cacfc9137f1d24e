//! A refused write changes nothing, at every instant: with the store's filesystem full, rule
//! writes (a full compile) and tag edits (written in place) are refused, and a flood of packets
//! the policy drops never gets one packet through while they are tried. Once there is room again
//! the same writes apply and the same flood passes (so the flood would have shown a leak). Needs
//! root (network namespaces, XDP, a tmpfs mount).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use gatekeeper_tests::lab::{DaemonSpec, Lab, gatekeeper_bin, in_netns};

const HOSTS: &[(&str, u8)] = &[("hmi", 1), ("eng", 2), ("plc1", 11)];

/// The HMI may send to the PLC's UDP port 5020; the engineering workstation may not.
const POLICY: &str = r#"
assets:
  - {name: hmi-1, ips: [10.0.0.1], tags: {role: hmi}}
  - {name: eng-ws, ips: [10.0.0.2], tags: {role: eng}}
  - {name: plc-1, ips: [10.0.0.11], tags: {role: plc}}
segments:
  - {name: hmi, selector: role=hmi, mode: label}
  - {name: eng, selector: role=eng, mode: label}
  - {name: plc, selector: role=plc, mode: enforce}
rules:
  - {name: hmi-udp, from: hmi, to: plc, protocol: udp, ports: [5020]}
"#;

const PORT: u16 = 5020;
const TOKEN: &str = "admin-secret-token-full-store";
const API: &str = "127.0.0.1:8086";
/// Refused writes of each kind.
const TRIES: usize = 40;

/// A small tmpfs of the test's own, unmounted (and its directory removed) on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Self(dir)
    }

    /// Fills every free byte with one file; returns its path.
    fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xa5u8; 4096];
        // Bounded: the filesystem is a few MiB.
        for _ in 0..1_000_000 {
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
        // Any partial page left, byte by byte.
        for _ in 0..4096 {
            if f.write_all(&[0]).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One HTTP/1.1 request to the API inside the appliance namespace: status and body.
fn http(lab: &Lab, method: &str, path: &str, body: &str) -> (u16, String) {
    let addr: SocketAddr = API.parse().unwrap();
    let mut s = in_netns(&lab.appliance, move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .unwrap()
        .expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "{method} /api/v1{path} HTTP/1.1\r\nHost: gatekeeper\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// UDP datagrams from one host to another as fast as it can send them, counted where they
/// arrive, until stopped (at most 60 s and 20 million datagrams).
struct Flood {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Flood {
    fn start(lab: &Lab, from: &str, to: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (received, sent) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let target = SocketAddr::new(lab.host(to).addr(false), PORT);
        let rx = in_netns(&lab.host(to).netns, move || UdpSocket::bind(("0.0.0.0", PORT))).unwrap().unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let tx = in_netns(&lab.host(from).netns, || UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let receiver = {
            let (stop, received) = (Arc::clone(&stop), Arc::clone(&received));
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    if rx.recv(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        };
        let sender = {
            let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
            std::thread::spawn(move || {
                for i in 0..20_000_000u64 {
                    if stop.load(Ordering::Relaxed) || (i % 1024 == 0 && Instant::now() > deadline) {
                        break;
                    }
                    if tx.send_to(b"lateral-move", target).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Self { stop, received, sent, threads: vec![receiver, sender] }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn token_file(lab: &Lab) -> PathBuf {
    lab.secret("admin.token", TOKEN).unwrap()
}

fn extra(token: &Path) -> String {
    format!("\n[api]\nlisten = {API:?}\nadmin_token_file = {:?}\n", token.display().to_string())
}

/// Waits (bounded) until the flood has sent at least `n` more datagrams than `from`.
fn sent_past(flood: &Flood, from: u64, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while flood.sent() < from + n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn writes_refused_by_a_full_store_never_reach_a_packet() {
    let lab = Lab::new(HOSTS).expect("lab (needs root, iproute2)");
    let fs = SmallFs::mount(lab.dir.join("small"), "4m");
    let token = token_file(&lab);
    let extra = extra(&token);
    let spec = DaemonSpec { extra: &extra, store: Some(fs.0.join("state.db")), ..DaemonSpec::default() };
    let daemon = match lab.try_start_daemon(&gatekeeper_bin().unwrap(), POLICY, spec).unwrap() {
        Ok(d) => d,
        Err(e) => panic!("the daemon did not start ({}):\n{}", e.status, e.log),
    };
    let rule = r#"{"name": "eng-udp", "from": "eng", "to": "plc", "protocol": "udp", "ports": [5020]}"#;
    let untag = r#"{"tags": {"role": "hmi"}}"#;

    let flood = Flood::start(&lab, "eng", "plc1");
    sent_past(&flood, 0, 10_000);
    assert_eq!(flood.received(), 0, "the policy drops the flood before any write");

    let filler = fs.fill();
    let mut statuses = Vec::new();
    for _ in 0..TRIES {
        let at = flood.sent();
        statuses.push(http(&lab, "PUT", "/rules/eng-udp", rule));
        statuses.push(http(&lab, "PATCH", "/assets/eng-ws", untag));
        // Packets in flight during and right after each refusal.
        sent_past(&flood, at, 200);
    }
    let during = flood.sent();
    std::thread::sleep(Duration::from_millis(200));
    let leaked = flood.received();
    eprintln!("{} refused writes, {during} datagrams flooded meanwhile, {leaked} passed", statuses.len());
    for (status, body) in &statuses {
        assert!(*status >= 500, "a write the store cannot take is refused: {status} {body}");
        assert!(body.contains("full"), "the error says the store is full: {body}");
    }
    assert!(during > 10_000, "the flood ran during the refused writes ({during} datagrams)");
    assert_eq!(leaked, 0, "{leaked} of {during} flooded datagrams passed while refused writes were tried");
    let (_, rules) = http(&lab, "GET", "/rules", "");
    assert!(!rules.contains("eng-udp"), "the refused rule is not there: {rules}");
    let (_, asset) = http(&lab, "GET", "/assets/eng-ws", "");
    assert!(asset.contains("\"eng\""), "the refused tag edit is not kept: {asset}");

    // Room again: the same tag edit applies and the same flood passes.
    std::fs::remove_file(&filler).unwrap();
    let (status, body) = http(&lab, "PATCH", "/assets/eng-ws", untag);
    assert_eq!(status, 200, "{body}");
    let at = flood.sent();
    sent_past(&flood, at, 10_000);
    std::thread::sleep(Duration::from_millis(100));
    assert!(flood.received() > 1_000, "once applied the flood passes ({} datagrams)", flood.received());
    let log = daemon.log();
    assert!(log.contains("full"), "the refusals are logged with their cause:\n{log}");
    drop(flood);
    drop(daemon);
}
