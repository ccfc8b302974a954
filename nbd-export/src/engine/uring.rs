//! io_uring engine: one ring drives every connection from one thread.
//!
//! The only module of the workspace with `unsafe`. The contract that makes
//! it sound (the kernel never holds a pointer to memory we do not own):
//!
//! - [`UringIo::push`] takes ownership of the buffer and keeps it in
//!   `in_flight`, keyed by the SQE's `user_data`, until the matching CQE is
//!   reaped. Only then does the buffer go back to its owner. Moving a `Vec`
//!   moves its header, not its heap block, so the pointer the kernel holds
//!   stays valid while the `Vec` sits in the map untouched.
//! - A failed push hands the buffer back (`Err((error, buf))`), which
//!   [`SocketIo::start`] turns into a local completion: nothing leaks.
//! - On drop, sockets are shut down (pending receives complete at once) and
//!   CQEs are reaped until `in_flight` is empty. If the kernel does not
//!   return a buffer within [`tuning::URING_DRAIN_TIMEOUT`], it is leaked,
//!   never freed.
//! - Restrictions: the ring accepts only `IORING_OP_RECV` and
//!   `IORING_OP_SEND` on registered (fixed) files.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::register::Restriction;
use io_uring::types::{Fixed, SubmitArgs, Timespec};
use io_uring::{opcode, squeue, IoUring};

use super::{Completion, Dir, EngineKind, SocketIo};
use crate::conn::IoBuf;
use crate::error::{Error, Result};
use crate::transport::Stream;
use crate::tuning;

/// Checks that the kernel lets us create a ring.
pub(crate) fn probe() -> io::Result<()> {
    probe_entries(8)
}

/// Creates and drops a ring of `entries` entries.
pub(crate) fn probe_entries(entries: u32) -> io::Result<()> {
    IoUring::new(entries).map(drop)
}

#[derive(Debug)]
struct InFlight {
    conn: usize,
    dir: Dir,
    buf: IoBuf,
}

/// The io_uring engine.
pub(crate) struct UringIo {
    // Drop order is field order. `ring` is dropped first; by then `Drop`
    // has reaped (or leaked) every buffer in `in_flight`, so the kernel
    // holds no pointer into memory freed after it. `streams` go last: the
    // registered files keep their own references anyway.
    ring: IoUring,
    in_flight: HashMap<u64, InFlight>,
    local: VecDeque<Completion>,
    streams: Vec<Stream>,
    next_user_data: u64,
}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIo")
            .field("in_flight", &self.in_flight.len())
            .field("streams", &self.streams.len())
            .finish_non_exhaustive()
    }
}

fn setup_err(step: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Uring { step, source }
}

impl UringIo {
    /// Creates a ring for `streams`, registers them as fixed files and
    /// restricts the ring to receive and send.
    pub fn new(streams: Vec<Stream>) -> Result<UringIo> {
        // At most one send and one receive per connection are in flight.
        let entries = u32::try_from(2 * streams.len())
            .unwrap_or(u32::MAX)
            .max(8)
            .next_power_of_two();
        // COOP_TASKRUN (Linux 5.19+): completions run when we enter the
        // ring instead of interrupting us; older kernels reject the flag.
        let ring = IoUring::builder()
            .setup_r_disabled()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_r_disabled().build(entries))
            .map_err(setup_err("io_uring_setup"))?;
        let fds: Vec<RawFd> = streams.iter().map(AsRawFd::as_raw_fd).collect();
        let sub = ring.submitter();
        sub.register_files(&fds)
            .map_err(setup_err("IORING_REGISTER_FILES"))?;
        let mut allow = [
            Restriction::sqe_op(opcode::Recv::CODE),
            Restriction::sqe_op(opcode::Send::CODE),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
        ];
        sub.register_restrictions(&mut allow)
            .map_err(setup_err("IORING_REGISTER_RESTRICTIONS"))?;
        sub.register_enable_rings()
            .map_err(setup_err("IORING_REGISTER_ENABLE_RINGS"))?;
        for s in &streams {
            // io_uring ignores SO_RCVTIMEO; the driver keeps the deadlines.
            s.set_timeouts(None).map_err(|source| Error::Io {
                step: "clearing socket timeouts",
                source,
            })?;
        }
        Ok(UringIo {
            ring,
            in_flight: HashMap::new(),
            local: VecDeque::new(),
            streams,
            next_user_data: 1,
        })
    }

    /// Queues one operation. On failure the buffer comes back with the error.
    fn push(&mut self, conn: usize, dir: Dir, mut buf: IoBuf) -> Result<(), (io::Error, IoBuf)> {
        let (Ok(fixed), Ok(len)) = (u32::try_from(conn), u32::try_from(buf.len())) else {
            return Err((io::Error::from(io::ErrorKind::InvalidInput), buf));
        };
        if conn >= self.streams.len() || buf.end > buf.data.len() || buf.start > buf.end {
            return Err((io::Error::from(io::ErrorKind::InvalidInput), buf));
        }
        let user_data = self.next_user_data;
        self.next_user_data = self.next_user_data.wrapping_add(1);
        let ptr = buf.data[buf.start..].as_mut_ptr();
        let entry = match dir {
            // MSG_WAITALL for exact receives: the kernel keeps receiving
            // until the range is full (or EOF/error), so a payload is one
            // CQE. Staging receives take whatever has arrived.
            Dir::Recv => opcode::Recv::new(Fixed(fixed), ptr, len)
                .flags(if buf.exact { libc::MSG_WAITALL } else { 0 })
                .build(),
            Dir::Send => opcode::Send::new(Fixed(fixed), ptr.cast_const(), len)
                .flags(libc::MSG_NOSIGNAL)
                .build(),
        }
        .user_data(user_data);
        let mut pushed = false;
        for attempt in 0..2 {
            // SAFETY: `entry` points at `buf.data[buf.start..buf.end]`, a live
            // heap block of `len` bytes. Right after a successful push, `buf`
            // (which owns that block) moves into `self.in_flight` and stays
            // there, unread and unmodified, until its CQE is reaped in
            // `reap`; `Drop` reaps or leaks every entry before the memory
            // could be freed. The fixed file index `fixed` was bounds-checked
            // against the registered files above.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                pushed = true;
                break;
            }
            if attempt == 0 {
                // Queue full: hand what is queued to the kernel and retry once.
                if let Err(e) = self.ring.submit() {
                    return Err((e, buf));
                }
            }
        }
        if !pushed {
            return Err((io::Error::from(io::ErrorKind::WouldBlock), buf));
        }
        self.in_flight
            .insert(user_data, InFlight { conn, dir, buf });
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            let Some(f) = self.in_flight.remove(&cqe.user_data()) else {
                continue;
            };
            let res = cqe.result();
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res.unsigned_abs() as usize)
            };
            out.push(Completion {
                conn: f.conn,
                dir: f.dir,
                buf: f.buf,
                result,
                retry: false,
            });
        }
    }
}

impl SocketIo for UringIo {
    fn start(&mut self, conn: usize, dir: Dir, buf: IoBuf) {
        if buf.len() == 0 {
            self.local.push_back(Completion {
                conn,
                dir,
                buf,
                result: Ok(0),
                retry: false,
            });
            return;
        }
        if let Err((e, buf)) = self.push(conn, dir, buf) {
            let retry = e.kind() == io::ErrorKind::WouldBlock;
            self.local.push_back(Completion {
                conn,
                dir,
                buf,
                result: Err(e),
                retry,
            });
        }
    }

    fn wait(&mut self, timeout: Duration, out: &mut Vec<Completion>) -> io::Result<()> {
        let before = out.len();
        out.extend(self.local.drain(..));
        let want = usize::from(out.len() == before && !self.in_flight.is_empty());
        let ts = Timespec::from(timeout);
        let args = SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        self.reap(out);
        Ok(())
    }

    fn outstanding(&self) -> usize {
        self.in_flight.len() + self.local.len()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }
}

impl Drop for UringIo {
    fn drop(&mut self) {
        if self.in_flight.is_empty() {
            return;
        }
        for s in &self.streams {
            s.shutdown();
        }
        let deadline = Instant::now() + tuning::URING_DRAIN_TIMEOUT;
        let mut sink = Vec::new();
        while !self.in_flight.is_empty() && Instant::now() < deadline {
            if self.wait(Duration::from_millis(50), &mut sink).is_err() {
                break;
            }
            sink.clear();
        }
        if !self.in_flight.is_empty() {
            tracing::error!(
                buffers = self.in_flight.len(),
                "io_uring did not return buffers; leaking them rather than freeing memory the kernel may write"
            );
            for (_, f) in self.in_flight.drain() {
                std::mem::forget(f.buf.data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn uring_or_skip() -> bool {
        match probe() {
            Ok(()) => true,
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "io_uring unavailable under CI: {e}"
                );
                eprintln!("skipping: io_uring unavailable: {e}");
                false
            }
        }
    }

    #[test]
    fn send_and_receive_through_the_ring() {
        if !uring_or_skip() {
            return;
        }
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut io = UringIo::new(vec![Stream::Unix(a)]).unwrap();
        io.start(
            0,
            Dir::Send,
            IoBuf {
                data: b"hello world".to_vec(),
                start: 6,
                end: 11,
                exact: true,
            },
        );
        io.start(
            0,
            Dir::Recv,
            IoBuf {
                data: vec![0; 8],
                start: 2,
                end: 6,
                exact: true,
            },
        );
        b.write_all(b"abcd").unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            io.wait(Duration::from_secs(5), &mut got).unwrap();
        }
        for c in got {
            match c.dir {
                Dir::Send => assert_eq!(c.result.unwrap(), 5),
                Dir::Recv => {
                    assert_eq!(c.result.unwrap(), 4);
                    assert_eq!(&c.buf.data, b"\0\0abcd\0\0");
                }
            }
        }
        let mut sent = [0u8; 5];
        b.read_exact(&mut sent).unwrap();
        assert_eq!(&sent, b"world");
        assert_eq!(io.outstanding(), 0);
    }

    #[test]
    fn drop_with_pending_receive_reclaims_the_buffer() {
        if !uring_or_skip() {
            return;
        }
        let (a, _b) = UnixStream::pair().unwrap();
        let mut io = UringIo::new(vec![Stream::Unix(a)]).unwrap();
        io.start(
            0,
            Dir::Recv,
            IoBuf {
                data: vec![0; 1 << 20],
                start: 0,
                end: 1 << 20,
                exact: true,
            },
        );
        let mut got = Vec::new();
        io.wait(Duration::from_millis(20), &mut got).unwrap();
        assert!(got.is_empty());
        let t = Instant::now();
        drop(io);
        assert!(t.elapsed() < tuning::URING_DRAIN_TIMEOUT);
    }

    #[test]
    fn bad_connection_index_hands_the_buffer_back() {
        if !uring_or_skip() {
            return;
        }
        let (a, _b) = UnixStream::pair().unwrap();
        let mut io = UringIo::new(vec![Stream::Unix(a)]).unwrap();
        io.start(
            3,
            Dir::Recv,
            IoBuf {
                data: vec![7; 4],
                start: 0,
                end: 4,
                exact: true,
            },
        );
        let mut got = Vec::new();
        io.wait(Duration::from_millis(10), &mut got).unwrap();
        assert_eq!(got.len(), 1);
        got[0].result.as_ref().unwrap_err();
        assert_eq!(got[0].buf.data, vec![7; 4]);
    }
}
