//! Host-side decompression of a bzImage's payload (the compressed `vmlinux` inside it).
//!
//! The kernel's build compresses `vmlinux` (stripped, with its relocation table appended) with
//! one of several compressors, appends the uncompressed size as a little-endian `u32`, and
//! links the result into the bzImage's decompressor; the setup header's `payload_offset` and
//! `payload_length` say where it lies. The payload is recognised by its magic bytes, as the
//! kernel's own `decompress_method()` does.
//!
//! Everything happens in memory, and the output is capped (see [`output_limit`]) so that a
//! crafted payload cannot make the VMM allocate without bound.

use std::fmt;
use std::io::Read;

use thiserror::Error;

use crate::error::Size;

/// The most a payload may decompress to, whatever the guest's size.
pub const MAX_DECOMPRESSED: u64 = 512 << 20;

/// The largest block of the lz4 legacy frame format (`LZ4_LEGACY_BLOCK_SIZE` in the kernel's
/// `unlz4`): each block decompresses to at most this many bytes.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// The lz4 legacy frame magic (`ARCHIVE_MAGICNUMBER`), little-endian.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;

/// How a bzImage's payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// `CONFIG_KERNEL_UNCOMPRESSED`: the payload is the ELF itself.
    None,
    /// gzip (`CONFIG_KERNEL_GZIP`).
    Gzip,
    /// xz, with the x86 BCJ filter (`CONFIG_KERNEL_XZ`).
    Xz,
    /// The legacy `.lzma` format (`CONFIG_KERNEL_LZMA`).
    Lzma,
    /// zstd (`CONFIG_KERNEL_ZSTD`).
    Zstd,
    /// lz4's legacy frame format (`CONFIG_KERNEL_LZ4`).
    Lz4,
}

impl Compression {
    /// The compressor's usual name: "gzip", "xz", ...
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Lzma => "lzma",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        }
    }

    /// Recognise a payload by its first bytes.
    pub(crate) fn detect(payload: &[u8]) -> Result<Compression, DecompressError> {
        let starts = |magic: &[u8]| payload.starts_with(magic);
        if starts(b"\x7fELF") {
            Ok(Compression::None)
        } else if starts(&[0x1f, 0x8b]) || starts(&[0x1f, 0x9e]) {
            Ok(Compression::Gzip)
        } else if starts(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Ok(Compression::Xz)
        } else if starts(&[0x5d, 0x00, 0x00]) {
            Ok(Compression::Lzma)
        } else if starts(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Ok(Compression::Zstd)
        } else if starts(&LZ4_LEGACY_MAGIC.to_le_bytes()) {
            Ok(Compression::Lz4)
        } else if starts(b"BZh") {
            Err(DecompressError::Unsupported("bzip2"))
        } else if starts(&[0x89, b'L', b'Z', b'O']) {
            Err(DecompressError::Unsupported("lzo"))
        } else {
            let shown = &payload[..payload.len().min(6)];
            Err(DecompressError::UnknownFormat(
                shown.iter().map(|b| format!("{b:02x}")).collect(),
            ))
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a payload could not be decompressed on the host.
#[derive(Debug, Error)]
pub(crate) enum DecompressError {
    /// The header announces no payload.
    #[error("its setup header announces no compressed payload")]
    NoPayload,
    /// The payload's magic is a known compressor Vessel does not decode.
    #[error("its payload is {0}-compressed, which Vessel cannot decompress on the host")]
    Unsupported(&'static str),
    /// The payload's first bytes match no compressor.
    #[error("its payload's format is unknown (it starts with {0})")]
    UnknownFormat(String),
    /// The payload decompresses to more than the cap.
    #[error("its {format} payload decompresses to more than {}, the most Vessel accepts for this guest (the smaller of 512 MiB and the guest's memory)", Size(*.limit))]
    TooLarge {
        /// The payload's format.
        format: Compression,
        /// The cap.
        limit: u64,
    },
    /// The decoder rejected the payload.
    #[error("its {format} payload is corrupt: {reason}")]
    Corrupt {
        /// The payload's format.
        format: Compression,
        /// What the decoder reported.
        reason: String,
    },
}

/// The cap on the decompressed size for a guest of `mem_size` bytes.
pub(crate) fn output_limit(mem_size: u64) -> u64 {
    mem_size.min(MAX_DECOMPRESSED)
}

/// Decompress `payload` (a whole bzImage payload, trailing size word included) into memory,
/// producing at most `limit` bytes.
pub(crate) fn decompress(
    payload: &[u8],
    limit: u64,
) -> Result<(Compression, Vec<u8>), DecompressError> {
    if payload.is_empty() {
        return Err(DecompressError::NoPayload);
    }
    let format = Compression::detect(payload)?;
    let corrupt = |reason: String| DecompressError::Corrupt { format, reason };
    // The kernel's build appends the uncompressed size: a good first guess at the capacity,
    // never trusted beyond the cap.
    let hint = payload
        .len()
        .checked_sub(4)
        .map(|at| u32::from_le_bytes(payload[at..].try_into().unwrap_or_default()))
        .map_or(0, u64::from);
    let capacity = if hint <= limit { hint as usize } else { 0 };
    // liblzma allocates the dictionary the stream header asks for; one larger than the output
    // may be is of no use, so it is refused rather than allocated.
    let lzma_memlimit = limit.saturating_add(16 << 20);

    let out = match format {
        Compression::None => {
            if payload.len() as u64 > limit {
                return Err(DecompressError::TooLarge { format, limit });
            }
            payload.to_vec()
        }
        Compression::Gzip => read_capped(
            flate2::bufread::GzDecoder::new(payload),
            format,
            limit,
            capacity,
        )?,
        Compression::Xz => {
            // One stream: the size word after it is not a second stream.
            let stream = liblzma::stream::Stream::new_stream_decoder(lzma_memlimit, 0)
                .map_err(|e| corrupt(e.to_string()))?;
            read_capped(
                liblzma::bufread::XzDecoder::new_stream(payload, stream),
                format,
                limit,
                capacity,
            )?
        }
        Compression::Lzma => {
            let stream = liblzma::stream::Stream::new_lzma_decoder(lzma_memlimit)
                .map_err(|e| corrupt(e.to_string()))?;
            read_capped(
                liblzma::bufread::XzDecoder::new_stream(payload, stream),
                format,
                limit,
                capacity,
            )?
        }
        Compression::Zstd => {
            let decoder =
                ruzstd::StreamingDecoder::new(payload).map_err(|e| corrupt(e.to_string()))?;
            read_capped(decoder, format, limit, capacity)?
        }
        Compression::Lz4 => lz4_legacy(payload, limit, capacity)?,
    };
    if out.is_empty() {
        return Err(corrupt("it decompresses to nothing".into()));
    }
    Ok((format, out))
}

/// Read `decoder` to its end into a vector of at most `limit` bytes.
fn read_capped<R: Read>(
    decoder: R,
    format: Compression,
    limit: u64,
    capacity: usize,
) -> Result<Vec<u8>, DecompressError> {
    let mut out = Vec::with_capacity(capacity);
    decoder
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| DecompressError::Corrupt {
            format,
            reason: e.to_string(),
        })?;
    if out.len() as u64 > limit {
        return Err(DecompressError::TooLarge { format, limit });
    }
    Ok(out)
}

/// Decode lz4's legacy frame format: the magic, then blocks, each a little-endian `u32`
/// compressed length and an lz4 block of at most 8 MiB of output. What follows the last
/// block (the kernel's size word) is too short to be a block and ends the frame; a repeated
/// magic starts a concatenated frame.
fn lz4_legacy(payload: &[u8], limit: u64, capacity: usize) -> Result<Vec<u8>, DecompressError> {
    let format = Compression::Lz4;
    let corrupt = |reason: String| DecompressError::Corrupt { format, reason };
    let mut out = Vec::with_capacity(capacity);
    let mut rest = &payload[4..];
    while rest.len() > 4 {
        let (len, after) = rest.split_at(4);
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default());
        rest = after;
        if len == LZ4_LEGACY_MAGIC {
            continue;
        }
        let Some(block) = rest.get(..len as usize) else {
            return Err(corrupt(format!(
                "a block of {len} bytes runs past the payload's end ({} bytes left)",
                rest.len()
            )));
        };
        rest = &rest[len as usize..];
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| corrupt(e.to_string()))?;
        out.truncate(start + n);
        if out.len() as u64 > limit {
            return Err(DecompressError::TooLarge { format, limit });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{gzip, lz4_legacy_frame, lzma_alone, xz, zstd_raw_frame};

    fn sample() -> Vec<u8> {
        (0..300_000u32)
            .map(|i| (i / 7 % 251) as u8 ^ (i % 3) as u8)
            .collect()
    }

    /// A payload as the kernel's build makes it: compressed data, then the size word.
    fn with_size(mut compressed: Vec<u8>, size: usize) -> Vec<u8> {
        compressed.extend_from_slice(&(size as u32).to_le_bytes());
        compressed
    }

    #[test]
    fn every_supported_format_round_trips() {
        let data = sample();
        for (want, compressed) in [
            (Compression::Gzip, gzip(&data)),
            (Compression::Xz, xz(&data)),
            (Compression::Lzma, lzma_alone(&data)),
            (Compression::Zstd, zstd_raw_frame(&data)),
            (Compression::Lz4, lz4_legacy_frame(&data)),
        ] {
            assert!(compressed.len() < data.len() || want == Compression::Zstd);
            let payload = with_size(compressed, data.len());
            let (format, out) = decompress(&payload, MAX_DECOMPRESSED).unwrap();
            assert_eq!(format, want);
            assert!(out == data, "{want}: output differs");
            // Without the size word, too.
            let (_, out) = decompress(&payload[..payload.len() - 4], MAX_DECOMPRESSED).unwrap();
            assert!(out == data, "{want}: output differs without the size word");
        }
    }

    #[test]
    fn uncompressed_elf_is_taken_as_is() {
        let mut data = b"\x7fELF".to_vec();
        data.extend(sample());
        let (format, out) = decompress(&data, MAX_DECOMPRESSED).unwrap();
        assert_eq!(format, Compression::None);
        assert_eq!(out, data);
    }

    #[test]
    fn output_is_capped() {
        // 64 KiB of zeros compress to almost nothing: a small bomb.
        let data = vec![0u8; 64 * 1024];
        for compressed in [
            gzip(&data),
            xz(&data),
            lzma_alone(&data),
            zstd_raw_frame(&data),
            lz4_legacy_frame(&data),
        ] {
            let err = decompress(&with_size(compressed, data.len()), 60_000).unwrap_err();
            assert!(
                matches!(err, DecompressError::TooLarge { limit: 60_000, .. }),
                "{err}"
            );
            assert!(
                err.to_string().contains("decompresses to more than"),
                "{err}"
            );
        }
        // Exactly at the cap is fine.
        let (_, out) = decompress(&xz(&data), 64 * 1024).unwrap();
        assert_eq!(out.len(), 64 * 1024);
        assert_eq!(output_limit(64 << 20), 64 << 20);
        assert_eq!(output_limit(8 << 30), MAX_DECOMPRESSED);
    }

    #[test]
    fn a_dictionary_larger_than_the_cap_is_refused() {
        let data = sample();
        let mut compressed = lzma_alone(&data);
        // The .lzma header: properties, then the dictionary size. Claim 256 MiB.
        compressed[1..5].copy_from_slice(&(256u32 << 20).to_le_bytes());
        let err = decompress(&compressed, 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                DecompressError::Corrupt {
                    format: Compression::Lzma,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("limit"), "{err}");
    }

    #[test]
    fn a_lying_size_word_is_only_a_hint() {
        let data = sample();
        // Claims 4 GiB: over the cap, ignored as a capacity.
        let payload = with_size(xz(&data), u32::MAX as usize);
        let (_, out) = decompress(&payload, 1 << 20).unwrap();
        assert!(out == data);
        // Claims too little.
        let payload = with_size(gzip(&data), 10);
        let (_, out) = decompress(&payload, 1 << 20).unwrap();
        assert!(out == data);
    }

    #[test]
    fn garbage_behind_a_valid_magic_is_corrupt() {
        let noise: Vec<u8> = (0..5000u32).map(|i| (i * 97 + 13) as u8).collect();
        for magic in [
            &[0x1f, 0x8b, 0x08][..],
            &[0xfd, b'7', b'z', b'X', b'Z', 0x00],
            &[0x5d, 0x00, 0x00],
            &[0x28, 0xb5, 0x2f, 0xfd],
            &[0x02, 0x21, 0x4c, 0x18],
        ] {
            let mut payload = magic.to_vec();
            payload.extend_from_slice(&noise);
            let err = decompress(&payload, MAX_DECOMPRESSED).unwrap_err();
            assert!(
                matches!(err, DecompressError::Corrupt { .. }),
                "{magic:02x?}: {err}"
            );
        }
        // A truncated stream is corrupt too.
        let compressed = xz(&sample());
        let err = decompress(&compressed[..compressed.len() / 2], MAX_DECOMPRESSED).unwrap_err();
        assert!(
            matches!(
                err,
                DecompressError::Corrupt {
                    format: Compression::Xz,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_and_unsupported_formats_are_named() {
        let err = decompress(b"BZh91AY&SY....", MAX_DECOMPRESSED).unwrap_err();
        assert_eq!(
            err.to_string(),
            "its payload is bzip2-compressed, which Vessel cannot decompress on the host"
        );
        let err = decompress(b"\x89LZO\x00\r\n", MAX_DECOMPRESSED).unwrap_err();
        assert!(matches!(err, DecompressError::Unsupported("lzo")), "{err}");
        let err = decompress(&[1, 2, 3, 4, 5, 6, 7, 8], MAX_DECOMPRESSED).unwrap_err();
        assert_eq!(
            err.to_string(),
            "its payload's format is unknown (it starts with 010203040506)"
        );
        let err = decompress(&[], MAX_DECOMPRESSED).unwrap_err();
        assert!(matches!(err, DecompressError::NoPayload), "{err}");
    }
}
