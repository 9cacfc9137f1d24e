//! BPF_PROG_TEST_RUN: judging frames with the loaded program (tests, benchmarks, the
//! differential test), from this handle or from a program fd on other threads.

use aya::programs::{TestRun, TestRunOptions};

use super::{BpfDataplane, DataplaneError, io_err};

impl BpfDataplane {
    /// A handle on the loaded program for [`test_run_fd`], usable from other threads while
    /// this `BpfDataplane` applies policies.
    pub fn program_fd(&self) -> Result<std::os::fd::OwnedFd, DataplaneError> {
        use std::os::fd::AsFd as _;
        let fd = self.program()?.fd()?.as_fd().try_clone_to_owned();
        fd.map_err(io_err("dup program fd"))
    }

    /// Runs the program once on `frame` through BPF_PROG_TEST_RUN: returns the XDP action.
    pub fn test_run(&self, frame: &[u8]) -> Result<u32, DataplaneError> {
        let opts = TestRunOptions { data_in: Some(frame), repeat: 1, ..Default::default() };
        Ok(self.program()?.test_run(opts)?.return_value)
    }
}

/// `BPF_PROG_TEST_RUN` on a program fd: runs it `repeat` times on `frame`; returns the last
/// action and the mean time per run in nanoseconds.
pub fn test_run_fd(prog: std::os::fd::BorrowedFd<'_>, frame: &[u8], repeat: u32) -> std::io::Result<(u32, u32)> {
    test_run_raw(prog, frame, repeat, 0, 0)
}

/// `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`: the program's redirects really
/// transmit, `batch` frames at a time. Runs in the calling thread's network namespace.
pub fn test_run_live_fd(
    prog: std::os::fd::BorrowedFd<'_>,
    frame: &[u8],
    repeat: u32,
    batch: u32,
) -> std::io::Result<()> {
    const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
    test_run_raw(prog, frame, repeat, BPF_F_TEST_XDP_LIVE_FRAMES, batch).map(|_| ())
}

fn test_run_raw(
    prog: std::os::fd::BorrowedFd<'_>,
    frame: &[u8],
    repeat: u32,
    flags: u32,
    batch_size: u32,
) -> std::io::Result<(u32, u32)> {
    use std::os::fd::AsRawFd as _;
    /// The `test` member of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let mut attr = TestAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        flags,
        batch_size,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix of the size passed; `frame` outlives the call.
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &raw mut attr, std::mem::size_of::<TestAttr>() as u32)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((attr.retval, attr.duration))
}
