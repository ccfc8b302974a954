//! The portable engine: blocking socket calls with `SO_RCVTIMEO` and
//! `SO_SNDTIMEO` as deadlines. Operations run to completion inside
//! [`SocketIo::start`]; [`SocketIo::wait`] hands back the results. Meant for
//! one connection per thread (the reader spawns one thread per connection).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::Duration;

use super::{Completion, Dir, EngineKind, SocketIo};
use crate::conn::IoBuf;
use crate::error::{Error, Result};
use crate::transport::Stream;

/// Blocking engine.
#[derive(Debug)]
pub(crate) struct SyncIo {
    streams: Vec<Stream>,
    ready: VecDeque<Completion>,
}

impl SyncIo {
    pub fn new(streams: Vec<Stream>, idle_timeout: Duration) -> Result<SyncIo> {
        for s in &streams {
            s.set_timeouts(Some(idle_timeout))
                .map_err(|source| Error::Io {
                    step: "setting socket timeouts",
                    source,
                })?;
        }
        Ok(SyncIo {
            streams,
            ready: VecDeque::new(),
        })
    }
}

/// Reads until `buf` is full or the stream ends; returns bytes read.
fn read_full(s: &mut Stream, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match s.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Bytes already read are progress; report them, the error will
            // recur on the next call.
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// One read: whatever has arrived (at least one byte, or end of stream).
fn read_some(s: &mut Stream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

impl SocketIo for SyncIo {
    fn start(&mut self, conn: usize, dir: Dir, mut buf: IoBuf) {
        let result = match self.streams.get_mut(conn) {
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such connection",
            )),
            Some(s) => {
                let range = buf.start..buf.end;
                match dir {
                    Dir::Send => s.write_all(&buf.data[range]).map(|()| buf.len()),
                    Dir::Recv if buf.exact => read_full(s, &mut buf.data[range]),
                    Dir::Recv => read_some(s, &mut buf.data[range]),
                }
            }
        };
        self.ready.push_back(Completion {
            conn,
            dir,
            buf,
            result,
            retry: false,
        });
    }

    fn wait(&mut self, _timeout: Duration, out: &mut Vec<Completion>) -> io::Result<()> {
        out.extend(self.ready.drain(..));
        Ok(())
    }

    fn outstanding(&self) -> usize {
        self.ready.len()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }
}
