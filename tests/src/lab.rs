//! The lab: OT hosts in their own network namespaces, wired by veth pairs to a Linux bridge in
//! an appliance namespace where the gatekeeper daemon runs with XDP on every bridge port.
//!
//! Nothing touches the host's own namespace: links are created inside the lab's namespaces and
//! disappear with them. Every namespace name carries the creating process id, so a lab left
//! behind by a killed run is removed by the next one ([`Lab::new`] sweeps them).

use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// Runs `cmd args..`, failing with its stderr.
pub fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    sh("ip", args)
}

/// Runs `f` on a thread that has entered network namespace `ns`; sockets it creates stay in
/// that namespace wherever they are used afterwards.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<T> {
        enter_netns(&path)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

fn enter_netns(path: &str) -> anyhow::Result<()> {
    let file = fs::File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a valid fd; affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One host of the lab.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub netns: String,
    /// The bridge port (in the appliance namespace) this host hangs off.
    pub port: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// How a connection attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Connected and the echo came back.
    Echoed,
    /// Actively refused (RST): the packets passed, nothing listened.
    Refused,
    /// No answer in time: dropped.
    Silent,
}

impl Host {
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { IpAddr::V6(self.ipv6) } else { IpAddr::V4(self.ipv4) }
    }

    /// Connects from this host; the stream lives in this host's namespace.
    pub fn connect(&self, to: IpAddr, port: u16, timeout: Duration) -> anyhow::Result<Result<TcpStream, Reach>> {
        in_netns(&self.netns, move || match TcpStream::connect_timeout(&SocketAddr::new(to, port), timeout) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(Reach::Refused),
            Err(_) => Err(Reach::Silent),
        })
    }

    /// Opens a TCP connection, sends a line and waits for its echo.
    pub fn tcp(&self, to: IpAddr, port: u16, timeout: Duration) -> anyhow::Result<Reach> {
        Ok(match self.connect(to, port, timeout)? {
            Ok(mut s) => {
                if echo(&mut s, b"ping\n", timeout) {
                    Reach::Echoed
                } else {
                    Reach::Silent
                }
            }
            Err(r) => r,
        })
    }

    /// Sends a UDP datagram and waits for the echo.
    pub fn udp(&self, to: IpAddr, port: u16, timeout: Duration) -> anyhow::Result<Reach> {
        in_netns(&self.netns, move || -> anyhow::Result<Reach> {
            let bind: SocketAddr = if to.is_ipv6() { "[::]:0".parse()? } else { "0.0.0.0:0".parse()? };
            let sock = UdpSocket::bind(bind)?;
            sock.set_read_timeout(Some(timeout))?;
            sock.send_to(b"ping", SocketAddr::new(to, port))?;
            let mut buf = [0u8; 64];
            Ok(match sock.recv_from(&mut buf) {
                Ok((n, _)) if &buf[..n] == b"ping" => Reach::Echoed,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Reach::Refused,
                _ => Reach::Silent,
            })
        })?
    }

    /// One ICMP echo (ping) with a one-second deadline.
    pub fn ping(&self, to: IpAddr) -> anyhow::Result<bool> {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.netns, "ping", "-c", "1", "-W", "1", "-n", "-q", &to.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running ping (package iputils-ping)")?;
        Ok(status.success())
    }
}

/// Writes `msg` and waits up to `timeout` to read it back.
pub fn echo(stream: &mut TcpStream, msg: &[u8], timeout: Duration) -> bool {
    let _ = stream.set_read_timeout(Some(timeout));
    if stream.write_all(msg).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    stream.read_exact(&mut buf).is_ok() && buf == msg
}

/// Echo servers on one host; stopped (and joined) on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Servers {
    /// TCP and UDP echo on every port in `tcp` / `udp`, both IPv4 and IPv6, on `host`.
    pub fn start(host: &Host, tcp: &[u16], udp: &[u16]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in tcp {
            let listener = in_netns(&host.netns, move || TcpListener::bind(("::", port)))??;
            listener.set_nonblocking(true)?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut conns: Vec<JoinHandle<()>> = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let stop = stop.clone();
                            conns.push(std::thread::spawn(move || {
                                let _ = s.set_nonblocking(false);
                                let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                                let mut buf = [0u8; 1024];
                                while !stop.load(Ordering::SeqCst) {
                                    match s.read(&mut buf) {
                                        Ok(0) => break,
                                        Ok(n) => {
                                            if s.write_all(&buf[..n]).is_err() {
                                                break;
                                            }
                                        }
                                        Err(e)
                                            if matches!(
                                                e.kind(),
                                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                            ) => {}
                                        Err(_) => break,
                                    }
                                }
                            }));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            }));
        }
        for &port in udp {
            let sock = in_netns(&host.netns, move || UdpSocket::bind(("::", port)))??;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            }));
        }
        Ok(Self { stop, threads })
    }
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The lab's usual policy: the HMI may reach the PLC's Modbus port, nothing else reaches the
/// PLC (the engineering workstation is tagged but in no segment).
pub const HMI_PLC_POLICY: &str = r#"
assets:
  - {name: hmi-1, ips: [10.0.0.1], tags: {role: hmi}}
  - {name: eng-ws, ips: [10.0.0.2], tags: {role: eng}}
  - {name: plc-1, ips: [10.0.0.11], tags: {role: plc}}
segments:
  - {name: hmi, selector: role=hmi, mode: label}
  - {name: plc, selector: role=plc, mode: enforce}
rules:
  - {name: hmi-modbus, from: hmi, to: plc, protocol: tcp, ports: [502]}
"#;

/// Hosts, bridge and (optionally) the daemon. Everything is removed on drop.
pub struct Lab {
    pub id: String,
    pub appliance: String,
    pub bridge: String,
    pub hosts: Vec<Host>,
    pub dir: PathBuf,
}

impl Lab {
    /// Builds a lab with `hosts` given as `(name, last address byte)`: host `n` gets
    /// `10.0.0.n/24` and `fd00::n/64`. Names must be at most 10 characters.
    pub fn new(hosts: &[(&str, u8)]) -> anyhow::Result<Self> {
        sweep_stale_labs();
        let id = format!("gk{}x{}", std::process::id(), LAB_COUNTER.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(format!("{id}-lab"));
        fs::create_dir_all(&dir)?;
        let appliance = format!("{id}-app");
        let mut lab = Self { id: id.clone(), appliance: appliance.clone(), bridge: "br0".into(), hosts: vec![], dir };
        // From here on, Drop cleans up whatever was created.
        ip(&["netns", "add", &appliance])?;
        ip(&["-n", &appliance, "link", "set", "lo", "up"])?;
        ip(&["-n", &appliance, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &appliance, "link", "set", "br0", "up"])?;
        for &(name, n) in hosts {
            if name.len() > 10 {
                bail!("host name {name:?} is longer than 10 characters");
            }
            let netns = format!("{id}-{name}");
            let port = format!("p-{name}");
            ip(&["netns", "add", &netns])?;
            lab.hosts.push(Host {
                name: name.into(),
                netns: netns.clone(),
                port: port.clone(),
                ipv4: Ipv4Addr::new(10, 0, 0, n),
                ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(n)),
            });
            ip(&["-n", &appliance, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
            ip(&["-n", &appliance, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&["-n", &netns, "addr", "add", &format!("10.0.0.{n}/24"), "dev", "eth0"])?;
            ip(&["-n", &netns, "addr", "add", &format!("fd00::{n:x}/64"), "dev", "eth0", "nodad"])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        }
        Ok(lab)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name} in the lab"))
    }

    /// This lab's own bpffs pin directory (bpffs is not per network namespace).
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.id))
    }

    /// `gatekeeper detach` for this lab: removes the pins, which detaches a stopped daemon's
    /// program. The kernel releases a link asynchronously, so this waits (up to 5 s) until no port
    /// shows a program any more.
    pub fn detach(&self, gatekeeper: &Path) -> anyhow::Result<()> {
        sh(&gatekeeper.display().to_string(), &["detach", "--pin-dir", &self.pin_dir().display().to_string()])?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.xdp_attached()?.is_empty() {
            if Instant::now() > deadline {
                bail!("XDP still attached 5 s after detach: {:?}", self.xdp_attached()?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Writes `secret` to `name` in the lab's directory, owner-only (as the daemon requires for
    /// token files); returns the path.
    pub fn secret(&self, name: &str, secret: &str) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.dir.join(name);
        fs::write(&path, secret).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }

    /// A fake Netskope tenant listening on loopback inside the appliance namespace, where the
    /// daemon runs.
    pub fn netskope_tenant(&self, token: &str) -> anyhow::Result<crate::netskope_fake::FakeTenant> {
        let listener = in_netns(&self.appliance, || TcpListener::bind("127.0.0.1:0"))??;
        Ok(crate::netskope_fake::FakeTenant::start_on(listener, token))
    }

    /// Runs the gatekeeper CLI against the API at `api` from inside the appliance namespace
    /// (where the daemon listens): exit code, stdout, stderr.
    pub fn cli(
        &self,
        gatekeeper: &Path,
        api: &str,
        token: &Path,
        args: &[&str],
    ) -> anyhow::Result<(i32, String, String)> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.appliance))
            .arg("--")
            .arg(gatekeeper)
            .args(["--api", api, "--token-file"])
            .arg(token)
            .args(args)
            .output()
            .context("running the gatekeeper CLI")?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Ok((out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr)))
    }

    /// The bridge ports, for the daemon's `interfaces`.
    pub fn ports(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.port.clone()).collect()
    }

    /// The XDP program ids attached to each bridge port (empty when none).
    pub fn xdp_attached(&self) -> anyhow::Result<Vec<String>> {
        let out = ip(&["-n", &self.appliance, "-d", "link", "show"])?;
        Ok(out.lines().filter(|l| l.contains("prog/xdp")).map(|l| l.trim().to_string()).collect())
    }

    /// Starts the daemon in the appliance namespace with `policy` (YAML).
    pub fn start_daemon(&self, gatekeeper: &Path, policy: &str) -> anyhow::Result<Daemon> {
        Daemon::start(self, gatekeeper, policy, "")
    }

    /// Like [`Lab::start_daemon`], with `extra` TOML added to the `[dataplane]` section (it may
    /// open sub-tables such as `[dataplane.flow_timeouts]`).
    pub fn start_daemon_with(&self, gatekeeper: &Path, policy: &str, extra: &str) -> anyhow::Result<Daemon> {
        Daemon::start(self, gatekeeper, policy, extra)
    }
}

/// A raw packet socket on a host's `eth0`: sends hand-built frames (VLAN tags and all, which
/// needs no 802.1Q support in the kernel) and watches what arrives.
pub struct RawSocket {
    fd: std::os::fd::OwnedFd,
}

impl RawSocket {
    pub fn open(host: &Host) -> anyhow::Result<Self> {
        in_netns(&host.netns, || -> anyhow::Result<Self> {
            use std::os::fd::FromRawFd;
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket calls with valid arguments; the fd is owned right away.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                if fd < 0 {
                    bail!("packet socket: {}", std::io::Error::last_os_error());
                }
                let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
                let ifindex = libc::if_nametoindex(c"eth0".as_ptr());
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = proto;
                addr.sll_ifindex = ifindex as i32;
                let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                if libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) != 0 {
                    bail!("bind packet socket: {}", std::io::Error::last_os_error());
                }
                Ok(Self { fd })
            }
        })?
    }

    pub fn send(&self, frame: &[u8]) -> anyhow::Result<()> {
        // SAFETY: valid buffer and fd.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            bail!("send: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for a frame containing every one of `needles`.
    pub fn saw(&self, needles: &[&[u8]], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
            // SAFETY: valid option buffer, valid receive buffer.
            let n = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
            };
            if n > 0 {
                let got = &buf[..n as usize];
                if needles.iter().all(|nd| got.windows(nd.len()).any(|w| w == *nd)) {
                    return true;
                }
            }
        }
        false
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Pins are global, not per namespace: remove ours, releasing any program left attached.
        let _ = fs::remove_dir_all(self.pin_dir());
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.netns]);
        }
        let _ = ip(&["netns", "del", &self.appliance]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Removes namespaces of labs whose creating process is gone.
fn sweep_stale_labs() {
    let Ok(list) = ip(&["netns", "list"]) else { return };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name.strip_prefix("gk").and_then(|r| r.split('x').next()).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// The `gatekeeper` binary next to the running test or tool (`target/<profile>/gatekeeper`),
/// or `$GATEKEEPER_BIN`.
pub fn gatekeeper_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("GATEKEEPER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("gatekeeper");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no gatekeeper binary near {}: build it first (`cargo build -p gatekeeper`; `cargo xtask test` does)",
        exe.display()
    )
}

/// A running daemon in the lab's appliance namespace.
pub struct Daemon {
    child: Option<Child>,
    pub policy_path: PathBuf,
    pub log_path: PathBuf,
}

/// How a daemon is started in the appliance namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Launcher {
    /// `nsenter --net=/var/run/netns/<appliance>`: only the network namespace changes.
    #[default]
    Nsenter,
    /// `ip netns exec <appliance>`: also a private mount namespace with a fresh /sys.
    IpNetnsExec,
}

/// A daemon that exited before it was running: its exit status and log.
#[derive(Debug)]
pub struct Exited {
    pub status: std::process::ExitStatus,
    pub log: String,
}

/// How [`Lab::try_start_daemon`] starts a daemon; the default is what [`Lab::start_daemon`] does,
/// with files of its own.
#[derive(Debug, Clone, Default)]
pub struct DaemonSpec<'a> {
    /// Names the daemon's files (config, policy, store, log) in the lab's directory, so that
    /// several daemons can exist side by side.
    pub name: &'a str,
    /// TOML added to `[dataplane]`.
    pub extra: &'a str,
    pub launcher: Launcher,
    /// Instead of [`Lab::pin_dir`] (the caller removes it).
    pub pin_dir: Option<PathBuf>,
    /// The store's path instead of one in the lab's directory (the caller removes it).
    pub store: Option<PathBuf>,
}

impl Lab {
    /// Starts a daemon as `spec` says. `Ok(Err(_))` when it exits before it is running (within
    /// 20 s): its exit status and log.
    pub fn try_start_daemon(
        &self,
        gatekeeper: &Path,
        policy: &str,
        spec: DaemonSpec<'_>,
    ) -> anyhow::Result<Result<Daemon, Exited>> {
        let name = if spec.name.is_empty() { "daemon" } else { spec.name };
        let file = |suffix: &str| self.dir.join(format!("{name}{suffix}"));
        let files = DaemonFiles {
            policy: file("-policy.yaml"),
            config: file(".toml"),
            log: file(".log"),
            store: spec.store.unwrap_or_else(|| file("-state.db")),
            pin_dir: spec.pin_dir.unwrap_or_else(|| self.pin_dir()),
        };
        Daemon::launch(self, gatekeeper, policy, spec.extra, files, spec.launcher)
    }
}

struct DaemonFiles {
    policy: PathBuf,
    config: PathBuf,
    log: PathBuf,
    store: PathBuf,
    pin_dir: PathBuf,
}

impl Daemon {
    fn start(lab: &Lab, gatekeeper: &Path, policy: &str, extra: &str) -> anyhow::Result<Self> {
        let files = DaemonFiles {
            policy: lab.dir.join("policy.yaml"),
            config: lab.dir.join("gatekeeper.toml"),
            log: lab.dir.join("gatekeeper.log"),
            store: lab.dir.join("state.db"),
            pin_dir: lab.pin_dir(),
        };
        match Self::launch(lab, gatekeeper, policy, extra, files, Launcher::Nsenter)? {
            Ok(d) => Ok(d),
            Err(Exited { status, log }) => bail!("gatekeeper exited ({status}):\n{log}"),
        }
    }

    fn launch(
        lab: &Lab,
        gatekeeper: &Path,
        policy: &str,
        extra: &str,
        files: DaemonFiles,
        launcher: Launcher,
    ) -> anyhow::Result<Result<Self, Exited>> {
        let DaemonFiles { policy: policy_path, config: config_path, log: log_path, store, pin_dir } = files;
        fs::write(&policy_path, policy)?;
        let interfaces: Vec<String> = lab.ports().iter().map(|p| format!("{p:?}")).collect();
        fs::write(
            &config_path,
            format!(
                "[dataplane]\ninterfaces = [{}]\nxdp_mode = \"auto\"\npin_dir = {:?}\n{extra}\n\n[store]\npath = {:?}\n\n[policy]\nfile = {:?}\n",
                interfaces.join(", "),
                pin_dir.display().to_string(),
                store.display().to_string(),
                policy_path.display().to_string()
            ),
        )?;
        let log = fs::File::create(&log_path)?;
        // nsenter switches only the network namespace; `ip netns exec` would also remount /sys
        // and hide the bpffs at /sys/fs/bpf, where the daemon pins its maps and links.
        let mut command = match launcher {
            Launcher::Nsenter => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{}", lab.appliance)).arg("--");
                c
            }
            Launcher::IpNetnsExec => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &lab.appliance]);
                c
            }
        };
        let child = command
            .arg(gatekeeper)
            .args(["run", "--config"])
            .arg(&config_path)
            .env("GATEKEEPER_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting gatekeeper")?;
        let mut d = Self { child: Some(child), policy_path, log_path };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if d.count(&|l: &str| l.contains("gatekeeper running")) >= 1 {
                return Ok(Ok(d));
            }
            if let Some(child) = d.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                d.child = None;
                return Ok(Err(Exited { status, log: d.log() }));
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for gatekeeper; log:\n{}", d.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's process id (`nsenter` and `ip netns exec` exec it, so this is the
    /// daemon's own).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn count(&self, pred: &impl Fn(&str) -> bool) -> usize {
        self.log().lines().filter(|l| pred(l)).count()
    }

    /// Waits until `n` log lines satisfy `pred`; fails if the daemon exits first.
    fn wait_for_log(&mut self, pred: impl Fn(&str) -> bool, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count(&pred) >= n {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("gatekeeper exited ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for gatekeeper; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("daemon not running")?;
        // SAFETY: kill on our own child's pid.
        if unsafe { libc::kill(child.id() as i32, sig) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Writes a new policy file, sends SIGHUP, and waits for the daemon's answer:
    /// `Ok(())` when applied, `Err(message)` with the daemon's rejection otherwise.
    pub fn reload(&mut self, policy: &str) -> anyhow::Result<Result<(), String>> {
        let applied =
            |l: &str| l.contains("applied policy") && l.contains("reason=\"reload\"") || l.contains("reason=reload");
        let rejected = |l: &str| l.contains("policy reload rejected");
        let (a0, r0) = (self.count(&applied), self.count(&rejected));
        fs::write(&self.policy_path, policy)?;
        self.signal(libc::SIGHUP)?;
        self.wait_for_log(|l| applied(l) || rejected(l), a0 + r0 + 1, Duration::from_secs(20))?;
        if self.count(&rejected) > r0 {
            let msg = self.log().lines().rfind(|l| rejected(l)).unwrap_or_default().to_string();
            return Ok(Err(msg));
        }
        Ok(Ok(()))
    }

    /// SIGKILL: the daemon dies without any clean-up, as in a crash.
    pub fn kill(mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("daemon not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit; returns the log. Enforcement stays in place (pinned)
    /// unless the daemon was told to detach on exit; [`Lab::detach`] removes it.
    pub fn stop(mut self) -> anyhow::Result<String> {
        self.signal(libc::SIGTERM)?;
        let mut child = self.child.take().context("daemon not running")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                let log = self.log();
                if !status.success() {
                    bail!("gatekeeper exited with {status}:\n{log}");
                }
                return Ok(log);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("gatekeeper did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
