//! `shear serve`: a backup's disks as NBD exports, or one disk as a
//! vhost-user-blk backend ([`vhost_user`]).
//!
//! Each disk is a [`crate::repo::SharedDisk`] (owned, cached, verified
//! reads) behind the protocol-only server of `nbd-export`. Read-only by
//! default; with an overlay directory each disk is writable into a local
//! sparse overlay file ([`overlay`]), and the backup is never written.

pub mod live;
pub mod overlay;
pub mod vhost_user;

use std::io;
use std::sync::Arc;

use nbd_export::server::{BlockSource, SharedBytes, SourceExtent};

use crate::repo::{RepoError, SharedDisk};

/// Maps a repository error to an I/O error for the server (the message
/// is logged by the server and sent to the client as the error text).
pub(crate) fn repo_io(e: &RepoError) -> io::Error {
    let kind = match e.kind() {
        crate::repo::ErrorKind::InvalidInput => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, crate::chain(e))
}

/// A backup disk served read-only.
#[derive(Debug)]
pub struct BackupSource(pub Arc<SharedDisk>);

impl BlockSource for BackupSource {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(offset, buf).map_err(|e| repo_io(&e))
    }

    fn read_shared(&self, offset: u64, len: usize) -> io::Result<Option<SharedBytes>> {
        Ok(self
            .0
            .chunk_slice(offset, len)
            .map_err(|e| repo_io(&e))?
            .and_then(|(chunk, start)| SharedBytes::new(chunk, start, len)))
    }

    fn read_ready(&self, offset: u64, len: usize) -> Option<SharedBytes> {
        let (chunk, start) = self.0.cached_slice(offset, len)?;
        SharedBytes::new(chunk, start, len)
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<SourceExtent>> {
        Ok(self
            .0
            .extents(offset, len)
            .map_err(|e| repo_io(&e))?
            .into_iter()
            .map(|e| SourceExtent {
                length: e.len,
                hole: e.zero,
            })
            .collect())
    }

    fn preferred_block_size(&self) -> u32 {
        // Whole chunks decode once; 64 KiB keeps small requests cheap too.
        64 << 10
    }
}
