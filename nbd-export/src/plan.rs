//! Extents and the extent planner.
//!
//! Block status gives, per metadata context, consecutive extents with flags.
//! The planner turns them into runs: data to read, zeroes (never read), and
//! ranges clean in the dirty bitmap (never read for an incremental), then
//! into per-chunk plans with coalesced, aligned read requests.

use crate::violation::Violation;
use crate::wire::{self, Descriptor};

/// One block status extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start in the export.
    pub offset: u64,
    /// Length (nonzero).
    pub len: u64,
    /// Context-specific status flags.
    pub flags: u32,
}

impl Extent {
    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Validates the descriptors of one block status chunk answering a request
/// for `req_len` bytes at `req_offset`, and turns them into extents clamped
/// to the request. Rules (spec + F-20): every length nonzero; no descriptor
/// may start after the request is covered (that would be an overlapping or
/// runaway list); no extent may end past the export.
pub(crate) fn validate_descriptors(
    context: u32,
    descs: &[Descriptor],
    req_offset: u64,
    req_len: u64,
    export_size: u64,
) -> Result<Vec<Extent>, Violation> {
    let mut out = Vec::with_capacity(descs.len());
    let mut covered: u64 = 0;
    for d in descs {
        let len = u64::from(d.length.get());
        if len == 0 {
            return Err(Violation::ZeroLengthExtent(context));
        }
        if covered >= req_len {
            return Err(Violation::ExtentsBeyondRequest(context));
        }
        let start = req_offset + covered;
        // req_offset + req_len ≤ export_size < 2^63 and len < 2^32: no overflow.
        let end = start + len;
        if end > export_size {
            return Err(Violation::ExtentPastEof {
                end,
                size: export_size,
            });
        }
        let clamped = len.min(req_len - covered);
        out.push(Extent {
            offset: start,
            len: clamped,
            flags: d.flags.get(),
        });
        covered += len;
    }
    Ok(out)
}

/// Merges neighbouring extents with equal flags (what `nbdinfo --map`
/// prints is the same map, possibly split differently).
pub fn merge_extents(extents: &mut Vec<Extent>) {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents.drain(..) {
        match out.last_mut() {
            Some(last) if last.end() == e.offset && last.flags == e.flags => last.len += e.len,
            _ => out.push(e),
        }
    }
    *extents = out;
}

/// What to do with a run of the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// Must be read.
    Data,
    /// Reads as zeroes (`NBD_STATE_ZERO`): never read.
    Zero,
    /// Not dirty in the bitmap: never read for an incremental.
    Clean,
}

/// A coalesced run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Start in the export.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// What it is.
    pub kind: RunKind,
}

impl Run {
    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

fn push_run(runs: &mut Vec<Run>, offset: u64, len: u64, kind: RunKind) {
    if len == 0 {
        return;
    }
    match runs.last_mut() {
        Some(last) if last.kind == kind && last.end() == offset => last.len += len,
        _ => runs.push(Run { offset, len, kind }),
    }
}

/// Plans `[offset, offset+len)` from `base:allocation` extents (if the
/// server offers them) and dirty bitmap extents (for an incremental).
///
/// A byte is `Clean` if a bitmap is given and does not mark it dirty; else
/// `Zero` if allocation says `NBD_STATE_ZERO`; else `Data`. A hole without
/// `NBD_STATE_ZERO` has undefined contents by the spec, so it is read. Bytes
/// no extent describes are `Data` (reading is always safe). Adjacent runs of
/// one kind are coalesced.
pub fn plan_runs(
    offset: u64,
    len: u64,
    allocation: Option<&[Extent]>,
    dirty: Option<&[Extent]>,
) -> Vec<Run> {
    let end = offset + len;
    // Boundaries where either map changes, within the range.
    let mut cuts: Vec<u64> = vec![offset, end];
    for e in allocation.into_iter().chain(dirty).flatten() {
        for b in [e.offset, e.end()] {
            if b > offset && b < end {
                cuts.push(b);
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    let flags_at = |map: &[Extent], pos: u64| -> Option<u32> {
        let i = map.partition_point(|e| e.end() <= pos);
        map.get(i).filter(|e| e.offset <= pos).map(|e| e.flags)
    };
    let mut runs = Vec::new();
    for w in cuts.windows(2) {
        let (a, b) = (w[0], w[1]);
        let clean =
            dirty.is_some_and(|d| flags_at(d, a).is_some_and(|f| f & wire::NBD_STATE_DIRTY == 0));
        let zero = allocation
            .is_some_and(|m| flags_at(m, a).is_some_and(|f| f & wire::NBD_STATE_ZERO != 0));
        let kind = if clean {
            RunKind::Clean
        } else if zero {
            RunKind::Zero
        } else {
            RunKind::Data
        };
        push_run(&mut runs, a, b - a, kind);
    }
    runs
}

/// What a chunk needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPlan {
    /// Reads as all zeroes: nothing to read.
    Zero,
    /// Entirely clean in the dirty bitmap: nothing to read.
    Clean,
    /// Read these `(offset, len)` requests; the rest of the chunk is zero.
    Data(Vec<(u64, u32)>),
}

/// Plans one chunk `[offset, offset+len)`.
///
/// With a bitmap, a chunk that has any dirty byte is captured whole (the
/// store keeps whole chunks), so its reads come from the allocation map
/// alone. Read ranges are widened to `min_block` alignment inside the chunk,
/// coalesced, and split into requests of at most `request_len` bytes.
pub fn plan_chunk(
    offset: u64,
    len: u64,
    allocation: Option<&[Extent]>,
    dirty: Option<&[Extent]>,
    min_block: u32,
    request_len: u32,
) -> ChunkPlan {
    if let Some(d) = dirty {
        let runs = plan_runs(offset, len, None, Some(d));
        if runs.iter().all(|r| r.kind == RunKind::Clean) {
            return ChunkPlan::Clean;
        }
    }
    let end = offset + len;
    let min = u64::from(min_block.max(1));
    let mut reads: Vec<(u64, u64)> = Vec::new();
    for r in plan_runs(offset, len, allocation, None) {
        if r.kind != RunKind::Data {
            continue;
        }
        let a = (r.offset / min * min).max(offset);
        let b = r.end().div_ceil(min).saturating_mul(min).min(end);
        match reads.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => reads.push((a, b)),
        }
    }
    if reads.is_empty() {
        return ChunkPlan::Zero;
    }
    // request_len is a multiple of min_block (ExportInfo::max_request).
    let step = u64::from(request_len.max(min_block).max(1));
    let mut reqs = Vec::new();
    for (a, b) in reads {
        let mut pos = a;
        while pos < b {
            let n = (b - pos).min(step);
            // n ≤ request_len.
            reqs.push((pos, wire::sat_u32(n)));
            pos += n;
        }
    }
    ChunkPlan::Data(reqs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use zerocopy::IntoBytes;

    fn ext(offset: u64, len: u64, flags: u32) -> Extent {
        Extent { offset, len, flags }
    }

    fn descs(list: &[(u32, u32)]) -> Vec<Descriptor> {
        let bytes = wire::encode_block_status(1, list);
        let (_, d) = wire::decode_block_status(&bytes).unwrap();
        d.to_vec()
    }

    #[test]
    fn descriptors_clamp_and_validate() {
        let d = descs(&[(4096, 0), (8192, 3)]);
        let e = validate_descriptors(1, &d, 0, 6000, 1 << 20).unwrap();
        assert_eq!(e, vec![ext(0, 4096, 0), ext(4096, 1904, 3)]);
        // Ends early: fine, covers less.
        let e = validate_descriptors(1, &d[..1], 0, 6000, 1 << 20).unwrap();
        assert_eq!(e.len(), 1);
        // Zero length.
        let z = descs(&[(0, 0)]);
        assert_eq!(
            validate_descriptors(1, &z, 0, 10, 100),
            Err(Violation::ZeroLengthExtent(1))
        );
        // Past EOF.
        assert!(matches!(
            validate_descriptors(1, &d, 0, 6000, 10000),
            Err(Violation::ExtentPastEof { .. })
        ));
        // Continuing after the request is covered.
        let over = descs(&[(4096, 0), (4096, 0), (4096, 0)]);
        assert_eq!(
            validate_descriptors(1, &over, 0, 4096, 1 << 20),
            Err(Violation::ExtentsBeyondRequest(1))
        );
        validate_descriptors(1, &over[..2], 0, 4097, 1 << 20).unwrap();
        let _ = d.as_bytes();
    }

    #[test]
    fn runs_combine_maps() {
        let alloc = [ext(0, 100, 0), ext(100, 100, 3), ext(200, 56, 0)];
        let dirty = [ext(0, 150, 0), ext(150, 106, 1)];
        let runs = plan_runs(0, 256, Some(&alloc), Some(&dirty));
        assert_eq!(
            runs,
            vec![
                Run {
                    offset: 0,
                    len: 150,
                    kind: RunKind::Clean
                },
                Run {
                    offset: 150,
                    len: 50,
                    kind: RunKind::Zero
                },
                Run {
                    offset: 200,
                    len: 56,
                    kind: RunKind::Data
                },
            ]
        );
        // No maps: all data.
        assert_eq!(
            plan_runs(10, 20, None, None),
            vec![Run {
                offset: 10,
                len: 20,
                kind: RunKind::Data
            }]
        );
        // Hole without ZERO is data (undefined contents are read).
        let holey = [ext(0, 64, wire::NBD_STATE_HOLE)];
        assert_eq!(plan_runs(0, 64, Some(&holey), None)[0].kind, RunKind::Data);
    }

    #[test]
    fn chunk_plans() {
        let alloc = [ext(0, 4096, 0), ext(4096, 4096, 3), ext(8192, 8192, 0)];
        assert_eq!(
            plan_chunk(0, 16384, Some(&alloc), None, 512, 4096),
            ChunkPlan::Data(vec![(0, 4096), (8192, 4096), (12288, 4096)])
        );
        let zero = [ext(0, 16384, 3)];
        assert_eq!(
            plan_chunk(0, 16384, Some(&zero), None, 1, 4096),
            ChunkPlan::Zero
        );
        let clean = [ext(0, 16384, 0)];
        assert_eq!(
            plan_chunk(0, 16384, Some(&alloc), Some(&clean), 1, 4096),
            ChunkPlan::Clean
        );
        // One dirty byte: the whole chunk's data is read, clean parts too.
        let dirty = [ext(0, 16383, 0), ext(16383, 1, 1)];
        assert_eq!(
            plan_chunk(0, 16384, Some(&alloc), Some(&dirty), 1, 1 << 20),
            ChunkPlan::Data(vec![(0, 4096), (8192, 8192)])
        );
        // Unaligned extents widen to min_block, merging neighbours.
        let odd = [
            ext(0, 100, 3),
            ext(100, 10, 0),
            ext(110, 4000, 3),
            ext(4110, 10, 0),
            ext(4120, 12264, 3),
        ];
        assert_eq!(
            plan_chunk(0, 16384, Some(&odd), None, 4096, 1 << 20),
            ChunkPlan::Data(vec![(0, 8192)])
        );
    }

    proptest! {
        /// Runs tile the range exactly, are coalesced, and agree with the maps.
        #[test]
        fn runs_tile_and_agree(
            alloc in proptest::collection::vec((1u64..5000, 0u32..4), 1..20),
            dirty in proptest::collection::vec((1u64..5000, 0u32..2), 1..20),
            start in 0u64..3000,
            len in 1u64..20000,
        ) {
            let mk = |v: &[(u64, u32)]| {
                let mut pos = 0;
                v.iter().map(|&(l, f)| { let e = ext(pos, l, f); pos += l; e }).collect::<Vec<_>>()
            };
            let a = mk(&alloc);
            let d = mk(&dirty);
            let runs = plan_runs(start, len, Some(&a), Some(&d));
            let mut pos = start;
            for (i, r) in runs.iter().enumerate() {
                prop_assert_eq!(r.offset, pos);
                prop_assert!(r.len > 0);
                if i > 0 { prop_assert_ne!(runs[i - 1].kind, r.kind); }
                for b in [r.offset, r.end() - 1] {
                    let f = |m: &[Extent]| m.iter().find(|e| e.offset <= b && b < e.end()).map(|e| e.flags);
                    let expect = match (f(&d), f(&a)) {
                        (Some(df), _) if df & 1 == 0 => RunKind::Clean,
                        (_, Some(af)) if af & 2 != 0 => RunKind::Zero,
                        _ => RunKind::Data,
                    };
                    prop_assert_eq!(r.kind, expect);
                }
                pos = r.end();
            }
            prop_assert_eq!(pos, start + len);
        }

        /// Chunk reads cover every data byte, stay in the chunk, are aligned
        /// and bounded.
        #[test]
        fn chunk_reads_cover_data(
            alloc in proptest::collection::vec((1u64..9000, 0u32..4), 1..30),
            min_shift in 0u32..13,
            req_shift in 12u32..16,
        ) {
            let mut pos = 0;
            let a: Vec<Extent> = alloc.iter().map(|&(l, f)| { let e = ext(pos, l, f); pos += l; e }).collect();
            let min = 1u32 << min_shift;
            let chunk = 1u64 << 16;
            let req = 1u32 << req_shift;
            for c in 0..(pos / chunk) {
                let off = c * chunk;
                match plan_chunk(off, chunk, Some(&a), None, min, req) {
                    ChunkPlan::Clean => prop_assert!(false, "no bitmap given"),
                    ChunkPlan::Zero => {
                        for r in plan_runs(off, chunk, Some(&a), None) {
                            prop_assert_eq!(r.kind, RunKind::Zero);
                        }
                    }
                    ChunkPlan::Data(reqs) => {
                        let mut last_end = off;
                        for &(o, l) in &reqs {
                            prop_assert!(o >= last_end && l > 0 && l <= req);
                            prop_assert!(o + u64::from(l) <= off + chunk);
                            prop_assert_eq!(o % u64::from(min), 0);
                            prop_assert_eq!(u64::from(l) % u64::from(min), 0);
                            last_end = o + u64::from(l);
                        }
                        for r in plan_runs(off, chunk, Some(&a), None) {
                            if r.kind == RunKind::Data {
                                for b in [r.offset, r.end() - 1] {
                                    prop_assert!(reqs.iter().any(|&(o, l)| o <= b && b < o + u64::from(l)));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
