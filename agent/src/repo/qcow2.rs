//! A minimal qcow2 (version 3) image writer for restore.
//!
//! Layout: cluster 0 = header; then data clusters in arrival order (all-zero
//! clusters are not allocated, so holes stay holes); then the L2 tables, the
//! L1 table, the refcount table and refcount blocks. The header is written
//! last, so an interrupted restore never looks like a valid image. 64 KiB
//! clusters, 16-bit refcounts, no backing file, no compression, no snapshots.
//! Checked by `qemu-img check` and `qemu-img compare` in the tests.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::format::to_usize;

/// Cluster size exponent (64 KiB).
pub const CLUSTER_BITS: u32 = 16;
/// Cluster size.
pub const CLUSTER_SIZE: u64 = 1 << CLUSTER_BITS;
const CLUSTER: usize = 1 << CLUSTER_BITS;
const L2_ENTRIES: u64 = CLUSTER_SIZE / 8;
const REFCOUNT_ORDER: u32 = 4; // 16-bit refcounts
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER_SIZE * 8 / (1 << REFCOUNT_ORDER);
const COPIED: u64 = 1 << 63;
const HEADER_LEN: u32 = 104;

/// Streams guest data into a new qcow2 file.
#[derive(Debug)]
pub struct Qcow2Writer {
    file: File,
    virtual_size: u64,
    next_cluster: u64,
    /// L2 table number → entries (host offsets, 0 = unallocated).
    l2: BTreeMap<u64, Vec<u64>>,
}

impl Qcow2Writer {
    /// Starts an image of `virtual_size` bytes in an empty file.
    pub fn new(file: File, virtual_size: u64) -> Self {
        Qcow2Writer {
            file,
            virtual_size,
            next_cluster: 1,
            l2: BTreeMap::new(),
        }
    }

    /// Writes `data` at guest `offset` (a multiple of the cluster size).
    /// All-zero clusters are skipped.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if !offset.is_multiple_of(CLUSTER_SIZE) || offset + data.len() as u64 > self.virtual_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "qcow2 write not cluster aligned or past the end",
            ));
        }
        for (n, piece) in data.chunks(CLUSTER).enumerate() {
            if super::format::is_zero(piece) {
                continue;
            }
            let guest_cluster = offset / CLUSTER_SIZE + n as u64;
            let host = self.next_cluster * CLUSTER_SIZE;
            self.next_cluster += 1;
            if piece.len() as u64 == CLUSTER_SIZE {
                self.file.write_all_at(piece, host)?;
            } else {
                let mut full = vec![0u8; CLUSTER];
                full[..piece.len()].copy_from_slice(piece);
                self.file.write_all_at(&full, host)?;
            }
            let table = self
                .l2
                .entry(guest_cluster / L2_ENTRIES)
                .or_insert_with(|| vec![0; CLUSTER / 8]);
            // Index is < L2_ENTRIES (8192).
            table[to_usize(guest_cluster % L2_ENTRIES)] = host | COPIED;
        }
        Ok(())
    }

    /// Writes the metadata and the header, syncs, and returns the file.
    pub fn finish(self) -> io::Result<File> {
        let file = self.finish_unsynced()?;
        file.sync_all()?;
        Ok(file)
    }

    /// Like [`Qcow2Writer::finish`] without the final fsync: for scratch
    /// images (a backup's fleece image) that need not survive a crash.
    pub fn finish_unsynced(self) -> io::Result<File> {
        let guest_clusters = self.virtual_size.div_ceil(CLUSTER_SIZE);
        let l1_entries = guest_clusters.div_ceil(L2_ENTRIES).max(1);
        let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER_SIZE);
        let l2_first = self.next_cluster;
        let l1_first = l2_first + self.l2.len() as u64;
        let rc_table_first = l1_first + l1_clusters;
        // Smallest refcount table + blocks that also cover themselves.
        let before_rc = rc_table_first;
        let (mut table_clusters, mut blocks) = (1u64, 1u64);
        loop {
            let total = before_rc + table_clusters + blocks;
            let need_blocks = total.div_ceil(REFCOUNTS_PER_BLOCK);
            let need_table = (need_blocks * 8).div_ceil(CLUSTER_SIZE);
            if need_blocks == blocks && need_table == table_clusters {
                break;
            }
            blocks = need_blocks;
            table_clusters = need_table;
        }
        let blocks_first = rc_table_first + table_clusters;
        let total = blocks_first + blocks;

        // L2 tables and the L1 table.
        let mut l1 = vec![0u8; to_usize(l1_clusters * CLUSTER_SIZE)];
        for (n, (table_no, table)) in self.l2.iter().enumerate() {
            let host = (l2_first + n as u64) * CLUSTER_SIZE;
            let mut buf = Vec::with_capacity(CLUSTER);
            for e in table {
                buf.extend_from_slice(&e.to_be_bytes());
            }
            self.file.write_all_at(&buf, host)?;
            let at = to_usize(*table_no * 8);
            l1[at..at + 8].copy_from_slice(&(host | COPIED).to_be_bytes());
        }
        self.file.write_all_at(&l1, l1_first * CLUSTER_SIZE)?;

        // Refcount table and blocks: every cluster up to `total` is used once.
        let mut table = vec![0u8; to_usize(table_clusters * CLUSTER_SIZE)];
        for b in 0..blocks {
            let host = (blocks_first + b) * CLUSTER_SIZE;
            let at = to_usize(b * 8);
            table[at..at + 8].copy_from_slice(&host.to_be_bytes());
            let mut block = vec![0u8; CLUSTER];
            let first = b * REFCOUNTS_PER_BLOCK;
            let last = ((b + 1) * REFCOUNTS_PER_BLOCK).min(total);
            for c in first..last {
                let at = to_usize((c - first) * 2);
                block[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            self.file.write_all_at(&block, host)?;
        }
        self.file
            .write_all_at(&table, rc_table_first * CLUSTER_SIZE)?;

        // Header last.
        let mut h = vec![0u8; CLUSTER];
        h[0..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        // 8..20 backing file offset/size: none.
        h[20..24].copy_from_slice(&CLUSTER_BITS.to_be_bytes());
        h[24..32].copy_from_slice(&self.virtual_size.to_be_bytes());
        // 32..36 crypt method: none.
        let l1_size = u32::try_from(l1_entries)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "image too large"))?;
        h[36..40].copy_from_slice(&l1_size.to_be_bytes());
        h[40..48].copy_from_slice(&(l1_first * CLUSTER_SIZE).to_be_bytes());
        h[48..56].copy_from_slice(&(rc_table_first * CLUSTER_SIZE).to_be_bytes());
        let tc = u32::try_from(table_clusters)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "image too large"))?;
        h[56..60].copy_from_slice(&tc.to_be_bytes());
        // 60..72 snapshots: none; 72..96 feature bits: none.
        h[96..100].copy_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        h[100..104].copy_from_slice(&HEADER_LEN.to_be_bytes());
        // 104..112: header extension end marker (type 0, length 0) = zeros.
        self.file.write_all_at(&h, 0)?;
        self.file.set_len(total * CLUSTER_SIZE)?;
        Ok(self.file)
    }
}

/// Most L1 table bytes [`metadata_clusters`] reads (1 Mi L2 tables: 512 TiB
/// of virtual disk).
const MAX_L1_BYTES: u64 = 8 << 20;
/// Most refcount table clusters [`metadata_clusters`] reads.
const MAX_REFCOUNT_TABLE_CLUSTERS: u64 = 256;
/// The host-offset bits of an L1 or refcount table entry.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// How many metadata clusters a qcow2 image with 64 KiB clusters has
/// beyond its header, L1 table and refcount table: its allocated L2
/// tables and refcount blocks, counted from the L1 and refcount tables.
/// For a fleece image that QEMU is filling, so the bytes it holds can be
/// told from the L2 tables that map them. Reads at most a few MiB; an
/// image it cannot vouch for is an `InvalidData` error.
pub fn metadata_clusters(file: &File) -> io::Result<u64> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("qcow2: {what}"));
    let mut h = [0u8; 64];
    file.read_exact_at(&mut h, 0)?;
    let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
    if &h[0..4] != b"QFI\xfb" || be32(20) != CLUSTER_BITS {
        return Err(bad("not a qcow2 image with 64 KiB clusters"));
    }
    let l1_bytes = u64::from(be32(36)) * 8;
    let rc_bytes = u64::from(be32(56)) * CLUSTER_SIZE;
    if l1_bytes > MAX_L1_BYTES || rc_bytes > MAX_REFCOUNT_TABLE_CLUSTERS * CLUSTER_SIZE {
        return Err(bad("L1 or refcount table too large"));
    }
    let count = |offset: u64, len: u64| -> io::Result<u64> {
        let mut table = vec![0u8; to_usize(len)];
        file.read_exact_at(&mut table, offset)?;
        Ok(table
            .chunks_exact(8)
            .filter(|e| {
                let v = u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                v & OFFSET_MASK != 0
            })
            .count() as u64)
    };
    Ok(count(be64(40), l1_bytes)? + count(be64(48), rc_bytes)?)
}
