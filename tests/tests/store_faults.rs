//! Store faults found at start: a corrupt store (garbage, a truncated file, damaged pages) or one
//! that cannot be written (the file, its directory, a read-only mount) makes `Store::open` fail
//! with an error naming the file, what is wrong and what to do, and changes nothing: once the
//! fault is gone the store opens with its data. The real daemon refuses to start on a corrupt
//! store before it loads or attaches anything, and a pinned enforcement stays as it was.
//!
//! Read-only stores and root: these tests run as root, and root ignores file modes (a 0400 file
//! or a 0500 directory is still writable for it). As root they make the file or the directory
//! immutable (`chattr +i`, ext4/xfs/btrfs; root cannot write those either), and mount the
//! directory read-only in a private mount namespace of one thread (what an appliance with a
//! read-only `/var` looks like). Without root they use the modes. The daemon tests need root
//! (network namespaces, XDP), like `lab.rs`.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use gatekeeper::{
    control::{Store, StoreError},
    policy::{PolicyDocument, diff::changes},
};
use gatekeeper_tests::lab::{Lab, Reach, Servers, gatekeeper_bin};

const ASSETS: usize = 300;

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A scratch directory, removed (immutable flags and modes cleared first) on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("gk-store-faults-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }

    fn store(&self) -> PathBuf {
        self.0.join("state.db")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if root() {
            let _ = Command::new("chattr").arg("-R").arg("-i").arg(&self.0).output();
        }
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o700));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn policy(n: usize) -> PolicyDocument {
    let mut yaml = String::from("assets:\n");
    for i in 0..n {
        yaml.push_str(&format!(
            "  - {{name: asset-{i:04}, ips: [10.1.{}.{}], tags: {{role: plc, line: l{}, site: plant-1}}}}\n",
            i / 250,
            i % 250 + 1,
            i % 7
        ));
    }
    PolicyDocument::from_yaml(&yaml, "test").unwrap()
}

/// A healthy store at `path` with [`ASSETS`] assets and their audit rows, closed (its -wal
/// checkpointed and removed), as a stopped daemon leaves it.
fn populated(path: &Path) -> PolicyDocument {
    let doc = policy(ASSETS);
    let mut store = Store::open(path).expect("a new store opens");
    store.commit(&changes(&PolicyDocument::default(), &doc), &"test".into(), "apply").unwrap();
    drop(store);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    assert!(!Path::new(&wal).exists(), "the last connection's close removes the -wal");
    doc
}

/// Overwrites the second half of the database's pages with garbage; the header (page 1, with the
/// schema) stays intact, so the store still opens as far as SQLite is concerned.
fn damage_pages(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let page = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
    let pages = bytes.len() / page;
    assert!(pages >= 8, "{pages} pages: too few to damage some and keep the header");
    let mut rng = fastrand::Rng::with_seed(7);
    for b in &mut bytes[pages / 2 * page..] {
        *b = rng.u8(..);
    }
    std::fs::write(path, bytes).unwrap();
}

fn open_err(path: &Path) -> StoreError {
    match Store::open(path) {
        Ok(_) => panic!("{} opened although it is broken", path.display()),
        Err(e) => e,
    }
}

/// The error and its causes, as the daemon prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

fn assert_damaged(e: &StoreError, path: &Path, detail: &str) {
    let msg = chain(e);
    assert!(matches!(e, StoreError::Damaged { .. }), "not StoreError::Damaged: {e:?}");
    assert!(msg.contains(&format!("store {} is corrupt", path.display())), "{msg}");
    assert!(msg.contains("will not start") && msg.contains("Restore it from a backup"), "{msg}");
    assert!(msg.contains("-wal and -shm"), "{msg}");
    assert!(msg.contains(detail), "{msg}");
}

fn assert_read_only(e: &StoreError, path: &Path, detail: &str) {
    let msg = chain(e);
    assert!(matches!(e, StoreError::ReadOnly { .. }), "not StoreError::ReadOnly: {e:?}");
    assert!(msg.contains(&format!("store {} is not writable", path.display())), "{msg}");
    assert!(msg.contains("will not start") && msg.contains("read-only"), "{msg}");
    assert!(msg.contains(detail), "{msg}");
}

/// No probe or journal files left beside the store.
fn assert_only_the_database(dir: &Path) {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["state.db"], "files left in {}", dir.display());
}

#[test]
fn a_file_that_is_not_a_database_is_refused_as_corrupt() {
    let d = Dir::new("garbage");
    let mut rng = fastrand::Rng::with_seed(3);
    let garbage: Vec<u8> = (0..64 * 1024).map(|_| rng.u8(..)).collect();
    std::fs::write(d.store(), &garbage).unwrap();
    let e = open_err(&d.store());
    assert_damaged(&e, &d.store(), "file is not a database");
    assert_eq!(std::fs::read(d.store()).unwrap(), garbage, "the file is left as it was");
}

#[test]
fn a_truncated_store_is_refused_as_corrupt() {
    let d = Dir::new("truncated");
    populated(&d.store());
    let len = std::fs::metadata(d.store()).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(d.store()).unwrap().set_len(len / 2).unwrap();
    let e = open_err(&d.store());
    assert_damaged(&e, &d.store(), "malformed");
    assert_eq!(std::fs::metadata(d.store()).unwrap().len(), len / 2, "the file is left as it was");
}

#[test]
fn damaged_pages_behind_an_intact_header_are_found_by_the_quick_check() {
    let d = Dir::new("pages");
    populated(&d.store());
    damage_pages(&d.store());
    let before = std::fs::read(d.store()).unwrap();
    let e = open_err(&d.store());
    assert_damaged(&e, &d.store(), "quick_check");
    assert_eq!(std::fs::read(d.store()).unwrap(), before, "the file is left as it was");
}

/// Makes `path` unwritable for this process: `chattr +i` as root (modes do not bind root),
/// `mode` otherwise. Returns how, for the messages.
fn make_unwritable(path: &Path, mode: u32) -> &'static str {
    if root() {
        let out = Command::new("chattr").arg("+i").arg(path).output().expect("chattr (e2fsprogs)");
        assert!(
            out.status.success(),
            "chattr +i {}: {} (the filesystem must support the immutable flag)",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        "chattr +i"
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        "chmod"
    }
}

fn make_writable(path: &Path, mode: u32) {
    if root() {
        assert!(Command::new("chattr").arg("-i").arg(path).status().unwrap().success());
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

#[test]
fn a_store_file_that_cannot_be_written_is_refused() {
    let d = Dir::new("ro-file");
    let doc = populated(&d.store());
    let how = make_unwritable(&d.store(), 0o400);
    let e = open_err(&d.store());
    assert_read_only(&e, &d.store(), "SQLite could open it for reading only");
    make_writable(&d.store(), 0o600);
    assert_only_the_database(&d.0);
    let store = Store::open(&d.store()).unwrap_or_else(|e| panic!("after undoing {how}: {e}"));
    assert_eq!(store.load().unwrap(), doc, "the refused open changed nothing");
}

#[test]
fn a_store_whose_directory_cannot_take_the_wal_is_refused() {
    let d = Dir::new("ro-dir");
    let doc = populated(&d.store());
    let how = make_unwritable(&d.0, 0o500);
    let e = open_err(&d.store());
    assert_read_only(&e, &d.store(), &format!("cannot create files in {} for its -wal and -shm", d.0.display()));
    make_writable(&d.0, 0o700);
    assert_only_the_database(&d.0);
    let store = Store::open(&d.store()).unwrap_or_else(|e| panic!("after undoing {how}: {e}"));
    assert_eq!(store.load().unwrap(), doc, "the refused open changed nothing");
}

#[test]
fn a_store_left_with_an_unwritable_wal_is_refused() {
    // A crash leaves the -wal (with committed changes) beside the database; if it cannot be
    // written, SQLite cannot recover or append to it.
    let d = Dir::new("ro-wal");
    populated(&d.store());
    let wal = d.0.join("state.db-wal");
    std::fs::write(&wal, b"").unwrap();
    make_unwritable(&wal, 0o400);
    let e = open_err(&d.store());
    assert_read_only(&e, &d.store(), &format!("cannot write {}", wal.display()));
    make_writable(&wal, 0o600);
}

/// Runs `f` on a thread of its own mount namespace in which `dir` is mounted read-only; `None`
/// when this kernel or environment does not let us (the reason is printed).
fn with_read_only_mount<T: Send>(dir: &Path, f: impl FnOnce() -> T + Send) -> Option<T> {
    use std::ffi::CString;
    let target = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let fail = |what: &str| {
                eprintln!("skipping the read-only mount: {what}: {}", std::io::Error::last_os_error());
                None
            };
            // SAFETY: plain syscalls on this thread; unshare(CLONE_NEWNS) also unshares this
            // thread's filesystem attributes, so the mounts below are seen by this thread only,
            // and the namespace goes away with it.
            unsafe {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return fail("unshare(CLONE_NEWNS)");
                }
                let root = c"/";
                if libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return fail("making mounts private");
                }
                if libc::mount(target.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) != 0
                {
                    return fail("bind mount");
                }
                let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
                if libc::mount(std::ptr::null(), target.as_ptr(), std::ptr::null(), flags, std::ptr::null()) != 0 {
                    return fail("read-only remount");
                }
            }
            Some(f())
        })
        .join()
        .unwrap()
    })
}

#[test]
fn a_store_on_a_read_only_mount_is_refused() {
    if !root() {
        eprintln!("skipping: mounting needs root");
        return;
    }
    let d = Dir::new("ro-mount");
    let doc = populated(&d.store());
    let store = d.store();
    let Some(e) = with_read_only_mount(&d.0, || Store::open(&store).err()) else { return };
    let e = e.expect("the store opened on a read-only mount");
    assert_read_only(&e, &d.store(), "Read-only file system");
    // Outside that namespace nothing changed.
    assert_only_the_database(&d.0);
    assert_eq!(Store::open(&d.store()).unwrap().load().unwrap(), doc);
}

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(3);

const LAB_POLICY: &str = gatekeeper_tests::lab::HMI_PLC_POLICY;

#[test]
fn the_daemon_refuses_to_start_on_a_corrupt_store_before_attaching_anything() {
    let lab = Lab::new(&[("hmi", 1), ("eng", 2), ("plc1", 11)]).expect("lab (needs root, iproute2)");
    std::fs::write(lab.dir.join("state.db"), b"this is not an SQLite database, it is a text file\n".repeat(100))
        .unwrap();
    let err = lab.start_daemon(&gatekeeper_bin().unwrap(), LAB_POLICY);
    let msg = format!("{:#}", err.err().expect("the daemon started on a corrupt store"));
    let store = lab.dir.join("state.db");
    assert!(msg.contains("exited (exit status: 1)"), "{msg}");
    assert!(msg.contains(&format!("error: store {} is corrupt", store.display())), "{msg}");
    assert!(msg.contains("file is not a database") && msg.contains("Restore it from a backup"), "{msg}");
    assert!(!msg.contains("attached") && !msg.contains("compiling"), "it went on after the store: {msg}");
    assert!(lab.xdp_attached().unwrap().is_empty(), "nothing attached");
    assert!(!lab.pin_dir().exists(), "nothing pinned");
}

#[test]
fn a_corrupt_store_at_restart_leaves_the_pinned_enforcement_in_place() {
    let lab = Lab::new(&[("hmi", 1), ("eng", 2), ("plc1", 11)]).expect("lab (needs root, iproute2)");
    let _servers = Servers::start(lab.host("plc1"), &[502], &[]).unwrap();
    let bin = gatekeeper_bin().unwrap();
    let plc = lab.host("plc1").addr(false);
    let reach = |from: &str, timeout| lab.host(from).tcp(plc, 502, timeout).unwrap();
    let daemon = lab.start_daemon(&bin, LAB_POLICY).unwrap();
    assert_eq!(reach("hmi", LONG), Reach::Echoed);
    assert_eq!(reach("eng", SHORT), Reach::Silent);
    daemon.stop().unwrap();
    let attached = lab.xdp_attached().unwrap();
    assert_eq!(attached.len(), 3, "SIGTERM leaves the enforcement pinned: {attached:?}");

    // The daemon exits with its -wal beside the database; one close checkpoints it into the
    // database file, whose pages are then damaged.
    drop(Store::open(&lab.dir.join("state.db")).unwrap());
    damage_pages(&lab.dir.join("state.db"));
    let err = lab.start_daemon(&bin, LAB_POLICY);
    let msg = format!("{:#}", err.err().expect("the daemon started on a corrupt store"));
    assert!(msg.contains(&format!("store {} is corrupt", lab.dir.join("state.db").display())), "{msg}");
    assert!(msg.contains("quick_check"), "{msg}");
    assert!(!msg.contains("adopted") && !msg.contains("attached"), "it went on after the store: {msg}");
    // The enforcement the stopped daemon left keeps enforcing, untouched.
    assert_eq!(lab.xdp_attached().unwrap(), attached, "the pinned programs changed");
    assert_eq!(reach("hmi", LONG), Reach::Echoed, "allowed traffic cut after the refused start");
    assert_eq!(reach("eng", SHORT), Reach::Silent, "denied traffic passes after the refused start");
    lab.detach(&bin).unwrap();
}
