//! The `http` output's request body framed from a block of JSON lines, written to the socket
//! with `writev` from the block itself.
//!
//! Why: the `json` / `json_lines` body of a block with a date key is the block's lines, each
//! after a small prefix (`{"date":1700000000.123,`), joined as the format says. Built as one
//! bytes object (`frame_lines`), every request filled a fresh buffer as large as its batch, and
//! aiohttp (3.12+, on Python before 3.12.9) then joined the headers and that body into a second
//! one: two copies of the input into memory never touched before, which on this VM cost more
//! than the kernel's own copy into the socket. Here only the prefixes are formatted (one small
//! buffer, `jsonlines::Frames`); the lines go from the block to the kernel once, as the file
//! output's `write_framed` writes them to a file.
//!
//! The socket belongs to an asyncio transport, so this writes only while the transport has
//! nothing queued (the caller checks) and never waits: it stops where the socket would block
//! and returns the offset reached; the caller hands what is left (`tobytes(offset)`) to the
//! transport, which queues it and waits for the socket as usual. Python ignores SIGPIPE, so a
//! connection closed by the peer is an `OSError` (EPIPE, ECONNRESET), not a signal.

use std::io::{IoSlice, Write};
use std::os::fd::FromRawFd;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::jsonlines::Frames;
use crate::new_bytes_filled;

/// Linux's IOV_MAX: slices per `writev`.
const IOV_MAX: usize = 1024;

#[pyclass(module = "kubetrail_native", frozen)]
pub struct FramedBody {
    /// The blocks the lines are taken from (kept alive: `bodies` are ranges into them); one,
    /// or several for a body that `join` made of several batches.
    blocks: Vec<Py<PyBytes>>,
    /// Per line, the block and the range of it written after its glue.
    bodies: Vec<(usize, usize, usize)>,
    /// The glues back to back (see `Frames`); `ends[k]` is where glue k ends.
    glue: Vec<u8>,
    ends: Vec<usize>,
    size: usize,
}

impl FramedBody {
    /// Every non-empty piece in order: `head` (the request's headers, or nothing), then the
    /// body's glue 0, line 0, glue 1, ..., glue n.
    fn pieces<'s>(&'s self, blocks: &[&'s [u8]], head: &'s [u8]) -> Vec<&'s [u8]> {
        let mut out: Vec<&[u8]> = Vec::with_capacity(self.bodies.len() * 2 + 2);
        let mut push = |piece: &'s [u8]| {
            if !piece.is_empty() {
                out.push(piece);
            }
        };
        push(head);
        push(&self.glue[..self.ends[0]]);
        for (i, &(block, start, end)) in self.bodies.iter().enumerate() {
            push(&blocks[block][start..end]);
            push(&self.glue[self.ends[i]..self.ends[i + 1]]);
        }
        out
    }

    /// The blocks' bytes, in `blocks` order.
    fn datas<'s>(&'s self, py: Python<'s>) -> Vec<&'s [u8]> {
        self.blocks.iter().map(|block| block.as_bytes(py)).collect()
    }

    /// The pieces from byte `offset` of `head` + body on (the first one cut where it starts).
    fn pieces_from<'s>(
        &'s self,
        blocks: &[&'s [u8]],
        head: &'s [u8],
        offset: usize,
    ) -> Vec<&'s [u8]> {
        let all = self.pieces(blocks, head);
        if offset == 0 {
            return all; // the usual call: no second list
        }
        let mut at = 0usize;
        let mut out = Vec::new();
        for piece in all {
            let end = at + piece.len();
            if end > offset {
                out.push(&piece[offset.saturating_sub(at)..]);
            }
            at = end;
        }
        out
    }
}

#[pymethods]
impl FramedBody {
    /// The body of `block` (newline-terminated JSON lines) framed as `jsonlines::Frames` says
    /// for `style`, `text` and `join` (`times`: a native-endian int64 per line for the dated
    /// styles). None when `Frames` refuses (the caller then formats records).
    #[staticmethod]
    #[pyo3(signature = (block, times, style, text, join))]
    fn build(
        block: Bound<'_, PyBytes>,
        times: &[u8],
        style: u8,
        text: &[u8],
        join: u8,
    ) -> Option<Self> {
        let data = block.as_bytes();
        let base = data.as_ptr() as usize;
        let Frames {
            bodies: lines,
            prefixes: glue,
            ends,
        } = Frames::new(data, times, style, text, 0, join)?;
        // Each line is a sub-slice of the block: keep where it lies, not the borrow.
        let bodies: Vec<(usize, usize, usize)> = lines
            .iter()
            .map(|line| {
                let start = line.as_ptr() as usize - base;
                (0, start, start + line.len())
            })
            .collect();
        drop(lines);
        let size = glue.len() + bodies.iter().map(|(_, s, e)| e - s).sum::<usize>();
        Some(Self {
            blocks: vec![block.unbind()],
            bodies,
            glue,
            ends,
            size,
        })
    }

    /// One body of several batches' bodies (each from `build` with the same `join`), as
    /// `build` would frame their blocks joined: for `join` 1 (`json`) one array, the first
    /// body's `]` and the next one's `[` turned into a `,`; otherwise the bodies back to back.
    /// A body without lines adds nothing. No line is copied: the result keeps every block.
    /// None when a body does not have the shape `join` says (the caller then joins bytes).
    #[staticmethod]
    fn join(py: Python<'_>, parts: Vec<PyRef<'_, FramedBody>>, join: u8) -> Option<Self> {
        let (open, close): (&[u8], &[u8]) = if join == 1 {
            (b"[", b"]\n")
        } else {
            (b"", b"")
        };
        let full: Vec<&FramedBody> = parts
            .iter()
            .map(|p| &**p)
            .filter(|p| !p.bodies.is_empty())
            .collect();
        let Some(first) = parts.first() else {
            return None;
        };
        if full.is_empty() {
            return Some(Self {
                blocks: first.blocks.iter().map(|b| b.clone_ref(py)).collect(),
                bodies: Vec::new(),
                glue: first.glue.clone(),
                ends: first.ends.clone(),
                size: first.size,
            });
        }
        let mut out = Self {
            blocks: Vec::new(),
            bodies: Vec::with_capacity(full.iter().map(|p| p.bodies.len()).sum()),
            glue: Vec::with_capacity(full.iter().map(|p| p.glue.len()).sum()),
            ends: Vec::new(),
            size: 0,
        };
        out.ends.reserve(out.bodies.capacity() + 1);
        for (k, part) in full.iter().enumerate() {
            let base = out.blocks.len();
            out.blocks
                .extend(part.blocks.iter().map(|b| b.clone_ref(py)));
            let mut head = &part.glue[..part.ends[0]];
            if k > 0 {
                // The previous body's closing glue, already in `out.glue`, lost its `]`.
                head = head.strip_prefix(open)?;
                if join == 1 {
                    out.glue.push(b',');
                }
            }
            out.glue.extend_from_slice(head);
            let last = part.bodies.len() - 1;
            for (i, &(block, start, end)) in part.bodies.iter().enumerate() {
                out.ends.push(out.glue.len());
                out.bodies.push((base + block, start, end));
                let mut tail = &part.glue[part.ends[i]..part.ends[i + 1]];
                if i == last && k + 1 < full.len() {
                    tail = tail.strip_suffix(close)?;
                }
                out.glue.extend_from_slice(tail);
            }
        }
        out.ends.push(out.glue.len());
        out.size = out.glue.len() + out.bodies.iter().map(|(_, s, e)| e - s).sum::<usize>();
        Some(out)
    }

    /// Bytes in the body.
    #[getter]
    fn size(&self) -> usize {
        self.size
    }

    fn __len__(&self) -> usize {
        self.size
    }

    /// Writes `head` (the request's headers: one `writev` carries them with the body, one
    /// segment train and one wake-up of the receiver instead of two) and the body, from byte
    /// `offset` of the two on, to the non-blocking socket `fd` with `writev` (the GIL released)
    /// until all is written or the socket would block; returns the offset reached (counted
    /// over `head` + body). Other errors are raised as `OSError`.
    #[pyo3(signature = (fd, offset, head=None))]
    fn send(&self, py: Python<'_>, fd: i32, offset: usize, head: Option<&[u8]>) -> PyResult<usize> {
        let blocks = self.datas(py);
        let pieces = self.pieces_from(&blocks, head.unwrap_or(b""), offset);
        py.detach(|| {
            // SAFETY: the descriptor is the caller's open socket; ManuallyDrop never closes it.
            let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
            let mut out: &std::fs::File = &file;
            let mut at = offset;
            let (mut first, mut cut) = (0usize, 0usize); // next piece, bytes of it already sent
            while first < pieces.len() {
                let last = pieces.len().min(first + IOV_MAX);
                let slices: Vec<IoSlice<'_>> = pieces[first..last]
                    .iter()
                    .enumerate()
                    .map(|(k, piece)| IoSlice::new(if k == 0 { &piece[cut..] } else { piece }))
                    .collect();
                match out.write_vectored(&slices) {
                    Ok(0) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::WriteZero,
                            "the socket took no bytes",
                        ))
                    }
                    Ok(mut n) => {
                        at += n;
                        while n > 0 {
                            let left = pieces[first].len() - cut;
                            if n >= left {
                                n -= left;
                                first += 1;
                                cut = 0;
                            } else {
                                cut += n;
                                n = 0;
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(at),
                    Err(e) => return Err(e),
                }
            }
            Ok(at)
        })
        .map_err(PyErr::from)
    }

    /// The body from byte `offset` on as one bytes object: what the socket did not take, for
    /// the transport to queue (or the whole body, for a TLS connection).
    #[pyo3(signature = (offset=0))]
    fn tobytes<'py>(&self, py: Python<'py>, offset: usize) -> PyResult<Bound<'py, PyBytes>> {
        let blocks = self.datas(py);
        let pieces = self.pieces_from(&blocks, b"", offset);
        let total = self.size.saturating_sub(offset);
        let pieces = &pieces;
        new_bytes_filled(py, total, move |out| {
            for piece in pieces {
                out.put(piece);
            }
        })
    }
}
