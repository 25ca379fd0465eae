//! The live-migration wire format: typed, length-prefixed frames over any byte stream (a TCP
//! or Unix socket).
//!
//! ```text
//! frame := type (u8) | length (u64 LE) | payload
//! ```
//!
//! Frames, in order: `Hello` (the VM's configuration and memory regions, JSON), any number of
//! `Pages` (guest address u64 LE, then whole pages), then `State` (a state file as
//! [`crate::format::encode`] writes it, checksum included), and the receiver answers `Ack`
//! once the VM runs on its side, or `Error` with a message. Lengths are checked against
//! [`MAX_FRAME`] before anything is allocated.

use std::io::{self, Read, Write};

/// The largest frame accepted (pages are sent in runs of at most [`MAX_PAGES_RUN`]).
pub const MAX_FRAME: u64 = 64 << 20;
/// Bytes of pages per `Pages` frame, at most.
pub const MAX_PAGES_RUN: usize = 1 << 20;

/// Frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 1,
    Pages = 2,
    State = 3,
    Ack = 4,
    Error = 5,
}

impl FrameType {
    fn from_u8(b: u8) -> Option<FrameType> {
        Some(match b {
            1 => FrameType::Hello,
            2 => FrameType::Pages,
            3 => FrameType::State,
            4 => FrameType::Ack,
            5 => FrameType::Error,
            _ => return None,
        })
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: FrameType, payload: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)
}

/// Writes a `Pages` frame: `data` (whole pages) for guest address `gpa`.
pub fn write_pages(w: &mut impl Write, gpa: u64, data: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 17];
    head[0] = FrameType::Pages as u8;
    head[1..9].copy_from_slice(&(data.len() as u64 + 8).to_le_bytes());
    head[9..].copy_from_slice(&gpa.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(data)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one frame into `buf` (reused between calls); returns its type.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<FrameType> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    let kind = FrameType::from_u8(head[0])
        .ok_or_else(|| invalid(format!("unknown migration frame type {}", head[0])))?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[1..]);
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(invalid(format!(
            "migration frame of {len} bytes is too large"
        )));
    }
    // Read what arrives rather than allocating the announced length up front: a 9-byte header
    // claiming MAX_FRAME must not cost 64 MiB when the stream then ends.
    buf.clear();
    let got = r.take(len).read_to_end(buf)?;
    if got as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("migration frame cut short: {got} of {len} bytes"),
        ));
    }
    Ok(kind)
}

/// Splits a `Pages` payload into its guest address and data.
pub fn parse_pages(payload: &[u8]) -> io::Result<(u64, &[u8])> {
    if payload.len() < 8 {
        return Err(invalid("short pages frame".into()));
    }
    let mut gpa = [0u8; 8];
    gpa.copy_from_slice(&payload[..8]);
    Ok((u64::from_le_bytes(gpa), &payload[8..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        write_frame(&mut wire, FrameType::Hello, b"{}").unwrap();
        write_pages(&mut wire, 0x1000, &[7u8; 4096]).unwrap();
        write_frame(&mut wire, FrameType::Ack, &[]).unwrap();
        let mut r = &wire[..];
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), FrameType::Hello);
        assert_eq!(buf, b"{}");
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), FrameType::Pages);
        let (gpa, data) = parse_pages(&buf).unwrap();
        assert_eq!((gpa, data.len(), data[0]), (0x1000, 4096, 7));
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), FrameType::Ack);
        assert!(buf.is_empty());
        // The end of the stream is an error, not a frame.
        assert!(read_frame(&mut r, &mut buf).is_err());
    }

    #[test]
    fn hostile_frames_are_refused_before_allocating() {
        let mut buf = Vec::new();
        let mut huge = vec![FrameType::Pages as u8];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(read_frame(&mut &huge[..], &mut buf).is_err());
        assert!(buf.capacity() < 1 << 20);
        let bad_type = [99u8, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(read_frame(&mut &bad_type[..], &mut buf).is_err());
        let mut short = vec![FrameType::State as u8];
        short.extend_from_slice(&100u64.to_le_bytes());
        short.extend_from_slice(&[0; 10]);
        assert!(read_frame(&mut &short[..], &mut buf).is_err());
        assert!(parse_pages(&[1, 2, 3]).is_err());
    }

    /// Found by fuzzing (fuzz/, target snapshot_frame): a header announcing the largest
    /// allowed frame made the reader allocate and zero all of it before reading a byte.
    #[test]
    fn a_short_stream_behind_a_large_header_allocates_only_what_arrived() {
        let mut buf = Vec::new();
        let mut wire = vec![FrameType::Pages as u8];
        wire.extend_from_slice(&MAX_FRAME.to_le_bytes());
        wire.extend_from_slice(&[1; 100]);
        let e = read_frame(&mut &wire[..], &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            buf.capacity() < 1 << 20,
            "{} bytes allocated",
            buf.capacity()
        );
    }
}
