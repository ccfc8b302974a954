//! `shear serve --vhost-user`: one backup disk as a vhost-user-blk
//! backend, so a VM attaches the backup as a virtio disk
//! (`-chardev socket,path=… -device vhost-user-blk-pci,chardev=…`; the
//! guest's RAM must be shared: `memory-backend-memfd,share=on`).
//!
//! The vhost-user protocol (memory table, vrings, kicks) is the rust-vmm
//! `vhost-user-backend` crate's; this module answers the virtio-blk
//! requests: `T_IN`, `T_OUT` (only into an overlay), `T_FLUSH` and
//! `T_GET_ID`, from the same [`BlockSource`]s `shear serve` exports over
//! NBD. Read-only by default: `VIRTIO_BLK_F_RO` is offered and a write is
//! answered `VIRTIO_BLK_S_IOERR`.
//!
//! The guest is hostile. Every descriptor goes through virtio-queue's
//! [`Reader`]/[`Writer`], which map only what lies inside the guest's
//! memory regions; a chain too short for a header, a data length not a
//! multiple of 512, a sector range past the end (or overflowing) gets
//! `VIRTIO_BLK_S_IOERR`; a chain with no device-writable byte for the
//! status is completed with length 0. Nothing here panics on guest data,
//! and no `unsafe` is needed (vm-memory's slices do the copying).
//!
//! One frontend at a time: when it disconnects, the overlay is flushed and
//! the next connection on the same socket is served.

use std::io::{self, Read, Write};
use std::ops::Deref;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, PoisonError, RwLock};

use nbd_export::server::BlockSource;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VuError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{DescriptorChain, QueueOwnedT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Sector size of virtio-blk requests.
const SECTOR: u64 = 512;
/// Bytes of a request header: le32 type, le32 reserved, le64 sector.
const HEADER: usize = 16;
/// Largest piece copied between the disk and guest memory at once (a
/// request's size is only bounded by the disk).
const PIECE: usize = 1 << 20;
/// Virtqueues offered (QEMU uses as many as it has vCPUs, up to this).
pub const NUM_QUEUES: usize = 4;
/// Largest ring the frontend may set up.
const MAX_QUEUE_SIZE: usize = 1024;
/// Segments per request announced in the config space (a 128-entry ring,
/// QEMU's default, minus header and status).
const SEG_MAX: u32 = 126;
/// Config space served (zero-padded beyond the fields we set).
const CONFIG_LEN: usize = 64;
/// Serial bytes (`VIRTIO_BLK_ID_BYTES`).
const ID_BYTES: usize = 20;

/// Status bytes (virtio 1.2 §5.2.6).
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const _: () = assert!(S_OK as u32 == VIRTIO_BLK_S_OK);
const _: () = assert!(S_IOERR as u32 == VIRTIO_BLK_S_IOERR);
const _: () = assert!(S_UNSUPP as u32 == VIRTIO_BLK_S_UNSUPP);
const _: () = assert!(ID_BYTES == VIRTIO_BLK_ID_BYTES as usize);

/// Guest memory as the backend sees it.
type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Errors of the vhost-user server.
#[derive(Debug, thiserror::Error)]
pub enum VhostServeError {
    /// Setting up the daemon (vring worker threads).
    #[error("cannot start the vhost-user daemon: {0}")]
    Daemon(String),
    /// Accepting a frontend on the socket.
    #[error("cannot accept a vhost-user connection: {0}")]
    Accept(String),
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Read `len` bytes at `offset` into the guest.
    Read { offset: u64, len: u64 },
    /// Write `len` bytes from the guest at `offset`.
    Write { offset: u64, len: u64 },
    /// Make completed writes durable.
    Flush,
    /// The serial (`len` bytes of it fit).
    GetId { len: usize },
}

/// `len` bytes at `sector`, if that lies inside `capacity` bytes and is
/// whole sectors (no arithmetic on guest values can overflow).
fn sector_range(sector: u64, len: usize, capacity: u64) -> Option<(u64, u64)> {
    let len = u64::try_from(len).ok()?;
    if len % SECTOR != 0 {
        return None;
    }
    let offset = sector.checked_mul(SECTOR)?;
    let end = offset.checked_add(len)?;
    (end <= capacity).then_some((offset, len))
}

/// Validates a request header against the disk: `readable` bytes follow
/// the header, `writable` bytes precede the status byte. `Err` is the
/// status to answer.
fn parse(
    header: &[u8; HEADER],
    readable: usize,
    writable: usize,
    capacity: u64,
    disk_writable: bool,
) -> Result<Op, u8> {
    let ty = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(s);
    match ty {
        VIRTIO_BLK_T_IN => sector_range(sector, writable, capacity)
            .map(|(offset, len)| Op::Read { offset, len })
            .ok_or(S_IOERR),
        VIRTIO_BLK_T_OUT if !disk_writable => Err(S_IOERR),
        VIRTIO_BLK_T_OUT => sector_range(sector, readable, capacity)
            .map(|(offset, len)| Op::Write { offset, len })
            .ok_or(S_IOERR),
        VIRTIO_BLK_T_FLUSH => Ok(Op::Flush),
        VIRTIO_BLK_T_GET_ID => Ok(Op::GetId {
            len: writable.min(ID_BYTES),
        }),
        _ => Err(S_UNSUPP),
    }
}

/// A piece of `len - done` bytes, at most [`PIECE`].
fn piece(len: u64, done: u64) -> usize {
    usize::try_from(len - done).map_or(PIECE, |n| n.min(PIECE))
}

/// The disk behind the device and what the guest is told about it.
pub struct BlkDevice {
    disk: Arc<dyn BlockSource>,
    /// Bytes addressable by whole sectors.
    capacity: u64,
    serial: [u8; ID_BYTES],
}

impl std::fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("capacity", &self.capacity)
            .field("writable", &self.disk.writable())
            .finish_non_exhaustive()
    }
}

impl BlkDevice {
    /// `disk` as a virtio-blk device with serial `serial` (at most 20
    /// bytes kept). Writable only if `disk` is.
    pub fn new(disk: Arc<dyn BlockSource>, serial: &str) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        BlkDevice {
            capacity: disk.size() / SECTOR * SECTOR,
            disk,
            serial: id,
        }
    }

    /// The virtio feature bits offered.
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if !self.disk.writable() {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        f
    }

    /// `struct virtio_blk_config` (capacity, seg_max, blk_size,
    /// num_queues; the rest zero).
    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(self.capacity / SECTOR).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        let nq = u16::try_from(NUM_QUEUES).unwrap_or(1);
        c[34..36].copy_from_slice(&nq.to_le_bytes());
        c
    }

    /// `size` bytes of the config space from `offset`, zero-padded; empty
    /// (the frontend is told it failed) for a range past 4 KiB.
    pub fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (Ok(o), Ok(n)) = (usize::try_from(offset), usize::try_from(size)) else {
            return Vec::new();
        };
        if o.checked_add(n).is_none_or(|end| end > 4096) {
            return Vec::new();
        }
        let c = self.config_space();
        let mut v = vec![0u8; n];
        if o < c.len() {
            let m = (c.len() - o).min(n);
            v[..m].copy_from_slice(&c[o..o + m]);
        }
        v
    }

    /// Answers one descriptor chain: executes it and writes the status
    /// byte (the last device-writable byte). Returns the used length
    /// (bytes written into the guest's buffers, status included).
    pub fn process<M>(&self, chain: &DescriptorChain<M>) -> u32
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        let mem = chain.memory();
        let Ok(mut data) = chain.clone().writer(mem) else {
            tracing::debug!(
                head = chain.head_index(),
                "vhost-user-blk: a writable descriptor lies outside guest memory"
            );
            return 0;
        };
        let Some(data_len) = data.available_bytes().checked_sub(1) else {
            tracing::debug!(
                head = chain.head_index(),
                "vhost-user-blk: request without a status byte"
            );
            return 0;
        };
        let Ok(mut status) = data.split_at(data_len) else {
            return 0;
        };
        let (st, written) = match chain.clone().reader(mem) {
            Ok(mut r) => self.execute(&mut r, &mut data),
            Err(_) => {
                tracing::debug!(
                    head = chain.head_index(),
                    "vhost-user-blk: a readable descriptor lies outside guest memory"
                );
                (S_IOERR, 0)
            }
        };
        let used = match status.write_all(&[st]) {
            Ok(()) => written.saturating_add(1),
            Err(_) => written,
        };
        u32::try_from(used).unwrap_or(u32::MAX)
    }

    /// Executes a request read from `r`, its data going to `w`: the status
    /// and the bytes written to `w`.
    fn execute(&self, r: &mut Reader<'_>, w: &mut Writer<'_>) -> (u8, usize) {
        let mut h = [0u8; HEADER];
        if r.read_exact(&mut h).is_err() {
            tracing::debug!("vhost-user-blk: request shorter than its header");
            return (S_IOERR, 0);
        }
        let readable = r.available_bytes();
        let writable = w.available_bytes();
        let op = match parse(&h, readable, writable, self.capacity, self.disk.writable()) {
            Ok(op) => op,
            Err(st) => {
                tracing::debug!(
                    header = ?h,
                    readable,
                    writable,
                    status = st,
                    "vhost-user-blk: request refused"
                );
                return (st, 0);
            }
        };
        match op {
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; piece(len, 0)];
                let mut done = 0u64;
                let mut written = 0usize;
                while done < len {
                    let n = piece(len, done);
                    if let Err(e) = self.disk.read_at(offset + done, &mut buf[..n]) {
                        tracing::warn!(offset = offset + done, error = %e, "vhost-user-blk: read failed");
                        return (S_IOERR, written);
                    }
                    if w.write_all(&buf[..n]).is_err() {
                        return (S_IOERR, written);
                    }
                    written += n;
                    done += n as u64;
                }
                (S_OK, written)
            }
            Op::Write { offset, len } => {
                let mut buf = vec![0u8; piece(len, 0)];
                let mut done = 0u64;
                while done < len {
                    let n = piece(len, done);
                    if r.read_exact(&mut buf[..n]).is_err() {
                        return (S_IOERR, 0);
                    }
                    if let Err(e) = self.disk.write_at(offset + done, &buf[..n]) {
                        tracing::warn!(offset = offset + done, error = %e, "vhost-user-blk: write failed");
                        return (S_IOERR, 0);
                    }
                    done += n as u64;
                }
                (S_OK, 0)
            }
            Op::Flush => match self.disk.flush() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    tracing::warn!(error = %e, "vhost-user-blk: flush failed");
                    (S_IOERR, 0)
                }
            },
            Op::GetId { len } => match w.write_all(&self.serial[..len]) {
                Ok(()) => (S_OK, len),
                Err(_) => (S_IOERR, 0),
            },
        }
    }
}

/// The vhost-user backend: a [`BlkDevice`] and the guest memory the
/// frontend shared.
pub struct BlkBackend {
    dev: BlkDevice,
    mem: RwLock<Option<Mem>>,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("dev", &self.dev)
            .finish_non_exhaustive()
    }
}

impl BlkBackend {
    /// A backend serving `dev`.
    pub fn new(dev: BlkDevice) -> Self {
        BlkBackend {
            dev,
            mem: RwLock::new(None),
        }
    }

    fn memory(&self) -> Option<Mem> {
        self.mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn forget_memory(&self) {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Completes every available request of `vring`.
    fn drain(&self, vring: &VringRwLock) {
        let Some(atomic) = self.memory() else {
            return;
        };
        let mem = atomic.memory();
        let chains: Vec<_> = match vring.get_mut().get_queue_mut().iter(mem.clone()) {
            Ok(it) => it.collect(),
            Err(e) => {
                tracing::debug!(error = %e, "vhost-user-blk: queue not usable");
                return;
            }
        };
        if chains.is_empty() {
            return;
        }
        for c in &chains {
            let len = self.dev.process(c);
            if let Err(e) = vring.add_used(c.head_index(), len) {
                tracing::debug!(error = %e, "vhost-user-blk: cannot return a used descriptor");
            }
        }
        if let Err(e) = vring.signal_used_queue() {
            tracing::debug!(error = %e, "vhost-user-blk: cannot signal the used queue");
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.dev.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, _enabled: bool) {
        // VIRTIO_RING_F_EVENT_IDX is not offered.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.dev.config(offset, size)
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An error here would end the worker thread: never return one.
        if evset != EventSet::IN {
            return Ok(());
        }
        if let Some(vring) = vrings.get(usize::from(device_event)) {
            self.drain(vring);
        }
        Ok(())
    }
}

/// Serves `dev` on `listener` until the process ends: one frontend at a
/// time; after each disconnect the disk is flushed and the next
/// connection accepted. Returns only if accepting fails.
pub fn serve(listener: UnixListener, dev: BlkDevice) -> Result<(), VhostServeError> {
    let backend = Arc::new(BlkBackend::new(dev));
    let mut listener = Listener::from(listener);
    loop {
        let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new("shear-vhost-user-blk".to_owned(), Arc::clone(&backend), mem)
                .map_err(|e| VhostServeError::Daemon(e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| VhostServeError::Accept(e.to_string()))?;
        tracing::info!("vhost-user frontend connected");
        let res = daemon.wait();
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        backend.forget_memory();
        match res {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VuError::Disconnected | VuError::PartialMessage,
            )) => tracing::info!("vhost-user frontend disconnected"),
            Err(e) => tracing::warn!(error = %e, "vhost-user connection ended"),
        }
        if let Err(e) = backend.dev.disk.flush() {
            tracing::warn!(error = %e, "flush after the vhost-user frontend left failed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use nbd_export::server::SourceExtent;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u64 = 1 << 20;
    const DISK: u64 = 64 << 10;

    /// An in-memory disk that counts flushes.
    struct MemDisk {
        data: Mutex<Vec<u8>>,
        writable: bool,
        flushes: AtomicUsize,
    }

    impl BlockSource for MemDisk {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let o = usize::try_from(offset).unwrap();
            buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
            Ok(())
        }
        fn extents(&self, _offset: u64, len: u64) -> io::Result<Vec<SourceExtent>> {
            Ok(vec![SourceExtent {
                length: len,
                hole: false,
            }])
        }
        fn writable(&self) -> bool {
            self.writable
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            let o = usize::try_from(offset).unwrap();
            self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn pattern() -> Vec<u8> {
        (0..DISK)
            .map(|i| u8::try_from(i * 7 % 251).unwrap())
            .collect()
    }

    fn device(writable: bool) -> (BlkDevice, Arc<MemDisk>) {
        let disk = Arc::new(MemDisk {
            data: Mutex::new(pattern()),
            writable,
            flushes: AtomicUsize::new(0),
        });
        (BlkDevice::new(disk.clone(), "scsi0"), disk)
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MIB).unwrap())]).unwrap()
    }

    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x8_0000;

    fn header(mem: &GuestMemoryMmap, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        mem.write_slice(&[0xEE], GuestAddress(STATUS)).unwrap();
    }

    fn r(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
    }

    fn w(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            u16::try_from(VRING_DESC_F_WRITE).unwrap(),
            0,
        ))
    }

    /// Builds `descs` as one chain and processes it: (used len, status).
    fn run(dev: &BlkDevice, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u32, u8) {
        let q = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let used = dev.process(&chain);
        let mut st = [0u8];
        mem.read_slice(&mut st, GuestAddress(STATUS)).unwrap();
        (used, st[0])
    }

    fn guest(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    #[test]
    fn read_split_header_and_data_any_layout() {
        let (dev, _) = device(false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 3);
        // Header in two pieces, data in two, status alone.
        let descs = [
            r(HDR, 8),
            r(HDR + 8, 8),
            w(DATA, 1024),
            w(DATA + 4096, 512),
            w(STATUS, 1),
        ];
        assert_eq!(run(&dev, &mem, &descs), (1537, S_OK));
        let p = pattern();
        assert_eq!(guest(&mem, DATA, 1024), p[1536..2560]);
        assert_eq!(guest(&mem, DATA + 4096, 512), p[2560..3072]);
        // Status in the same descriptor as the data: the last byte.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let descs = [r(HDR, 16), w(STATUS - 512, 513)];
        assert_eq!(run(&dev, &mem, &descs), (513, S_OK));
        assert_eq!(guest(&mem, STATUS - 512, 512), p[..512]);
    }

    #[test]
    fn hostile_ranges_get_ioerr_and_write_nothing() {
        let (dev, _) = device(false);
        let mem = memory();
        let last = DISK / SECTOR - 1;
        for (sector, len) in [
            (last, 1024),           // crosses the end
            (last + 1, 512),        // starts at the end
            (u64::MAX, 512),        // sector * 512 overflows
            (u64::MAX / 512, 1024), // offset + len overflows
            (0, 100),               // not whole sectors
        ] {
            header(&mem, VIRTIO_BLK_T_IN, sector);
            mem.write_slice(&[0xAB; 1024], GuestAddress(DATA)).unwrap();
            let descs = [r(HDR, 16), w(DATA, len), w(STATUS, 1)];
            assert_eq!(
                run(&dev, &mem, &descs),
                (1, S_IOERR),
                "sector {sector} len {len}"
            );
            assert_eq!(guest(&mem, DATA, 1024), vec![0xAB; 1024]);
        }
        // The last sector exactly is fine; so is a zero-length read.
        header(&mem, VIRTIO_BLK_T_IN, last);
        assert_eq!(
            run(&dev, &mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
            (513, S_OK)
        );
        header(&mem, VIRTIO_BLK_T_IN, last + 1);
        assert_eq!(run(&dev, &mem, &[r(HDR, 16), w(STATUS, 1)]), (1, S_OK));
    }

    #[test]
    fn malformed_chains_never_panic() {
        let (dev, _) = device(true);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // Header too short.
        assert_eq!(run(&dev, &mem, &[r(HDR, 8), w(STATUS, 1)]), (1, S_IOERR));
        // No header at all.
        assert_eq!(run(&dev, &mem, &[w(STATUS, 1)]), (1, S_IOERR));
        // No writable byte: nowhere to put a status, nothing written.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(run(&dev, &mem, &[r(HDR, 16)]), (0, 0xEE));
        // A data descriptor outside guest memory, or crossing its end.
        for (addr, len) in [(1 << 40, 512), (MIB - 256, 512), (DATA, u32::MAX)] {
            header(&mem, VIRTIO_BLK_T_IN, 0);
            assert_eq!(
                run(&dev, &mem, &[r(HDR, 16), w(addr, len), w(STATUS, 1)]),
                (0, 0xEE),
                "{addr:#x}+{len:#x}"
            );
        }
        // A header outside guest memory: the status says so.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(&dev, &mem, &[r(1 << 40, 16), w(DATA, 512), w(STATUS, 1)]),
            (1, S_IOERR)
        );
        // A write whose data is not whole sectors, or runs past the end.
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            run(&dev, &mem, &[r(HDR, 16), r(DATA, 100), w(STATUS, 1)]),
            (1, S_IOERR)
        );
        header(&mem, VIRTIO_BLK_T_OUT, DISK / SECTOR);
        assert_eq!(
            run(&dev, &mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]),
            (1, S_IOERR)
        );
        // An unknown request type.
        header(&mem, 42, 0);
        assert_eq!(run(&dev, &mem, &[r(HDR, 16), w(STATUS, 1)]), (1, S_UNSUPP));
        // An indirect table of a length not a multiple of 16: the chain
        // ends there, nothing to answer into.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let ind = RawDescriptor::from(SplitDescriptor::new(
            DATA,
            17,
            u16::try_from(VRING_DESC_F_INDIRECT).unwrap(),
            0,
        ));
        assert_eq!(run(&dev, &mem, &[ind]), (0, 0xEE));
    }

    #[test]
    fn descriptor_loop_ends() {
        let (dev, _) = device(false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        // Descriptor 0 chains to itself: a loop.
        let d = RawDescriptor::from(SplitDescriptor::new(
            HDR,
            16,
            u16::try_from(virtio_bindings::virtio_ring::VRING_DESC_F_NEXT).unwrap(),
            0,
        ));
        q.add_desc_chains(&[d], 0).unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        assert_eq!(dev.process(&chain), 0);
    }

    #[test]
    fn read_only_refuses_writes_overlay_takes_them() {
        let (dev, disk) = device(false);
        let mem = memory();
        mem.write_slice(&[0x33; 1024], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 2);
        let descs = [r(HDR, 16), r(DATA, 1024), w(STATUS, 1)];
        assert_eq!(run(&dev, &mem, &descs), (1, S_IOERR));
        assert_eq!(
            *disk.data.lock().unwrap(),
            pattern(),
            "read-only disk written"
        );
        assert_ne!(dev.features() & (1 << VIRTIO_BLK_F_RO), 0);

        let (dev, disk) = device(true);
        assert_eq!(dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
        header(&mem, VIRTIO_BLK_T_OUT, 2);
        assert_eq!(run(&dev, &mem, &descs), (1, S_OK));
        let mut want = pattern();
        want[1024..2048].fill(0x33);
        assert_eq!(*disk.data.lock().unwrap(), want);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&dev, &mem, &[r(HDR, 16), w(STATUS, 1)]), (1, S_OK));
        assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn get_id_and_config() {
        let (dev, _) = device(false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xAB; 20], GuestAddress(DATA)).unwrap();
        assert_eq!(
            run(&dev, &mem, &[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]),
            (21, S_OK)
        );
        let mut want = b"scsi0".to_vec();
        want.resize(20, 0);
        assert_eq!(guest(&mem, DATA, 20), want);
        // A short buffer gets what fits.
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            run(&dev, &mem, &[r(HDR, 16), w(DATA, 3), w(STATUS, 1)]),
            (4, S_OK)
        );

        let c = dev.config(0, 60);
        assert_eq!(c.len(), 60);
        assert_eq!(c[..8], (DISK / SECTOR).to_le_bytes());
        assert_eq!(c[20..24], 512u32.to_le_bytes());
        assert_eq!(dev.config(34, 2), vec![4, 0]);
        assert_eq!(dev.config(200, 8), vec![0; 8]);
        assert!(dev.config(4090, 8).is_empty());
        assert!(dev.config(u32::MAX, 8).is_empty());
    }

    #[test]
    fn parse_rejects_what_the_spec_forbids() {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..].copy_from_slice(&1u64.to_le_bytes());
        assert_eq!(
            parse(&h, 0, 4096, 8192, false),
            Ok(Op::Read {
                offset: 512,
                len: 4096
            })
        );
        assert_eq!(parse(&h, 0, 8192, 8192, false), Err(S_IOERR));
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        assert_eq!(parse(&h, 512, 0, 8192, false), Err(S_IOERR));
        assert_eq!(
            parse(&h, 512, 0, 8192, true),
            Ok(Op::Write {
                offset: 512,
                len: 512
            })
        );
        // A disk of an odd size: its partial last sector is not addressable.
        let mut data = pattern();
        data.extend_from_slice(&[1; 100]);
        let disk = Arc::new(MemDisk {
            data: Mutex::new(data),
            writable: false,
            flushes: AtomicUsize::new(0),
        });
        let odd = BlkDevice::new(disk, "a-serial-longer-than-twenty-bytes");
        assert_eq!(odd.capacity, DISK);
        assert_eq!(odd.config(0, 8), (DISK / SECTOR).to_le_bytes());
        assert_eq!(&odd.serial, b"a-serial-longer-than");
    }
}
