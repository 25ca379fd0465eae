//! TAP interfaces: opening `/dev/net/tun` for one queue of a (possibly multi-queue) TAP
//! device with virtio-net headers, and the offload / queue ioctls the device needs.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Largest interface name, terminating NUL excluded (`IFNAMSIZ - 1`).
pub const MAX_NAME_LEN: usize = 15;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

/// `TUNSETOFFLOAD` flags: what the kernel may hand us (what the guest can receive).
pub mod offload {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
    pub const UFO: u32 = 0x10;
}

/// `struct ifreq` with the flags member of its union (40 bytes on Linux).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Why a TAP could not be opened or configured.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("/dev/net/tun does not exist (is the tun module loaded?)")]
    NoTunDevice,
    #[error(
        "permission denied opening TAP {name:?} (needs CAP_NET_ADMIN or a TAP owned by this user)"
    )]
    Permission {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP name {0:?} is longer than 15 bytes or contains a NUL")]
    BadName(String),
    #[error("TAP {name:?} exists with other flags (single- vs multi-queue?) or is busy")]
    Busy {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP {name:?}: {what}")]
    Io {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// One queue (file descriptor) of a TAP interface, non-blocking, with 12-byte virtio-net
/// headers (`virtio_net_hdr_v1`) in front of every frame.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to TAP `name` (creating it if it does not exist, which needs
    /// `CAP_NET_ADMIN`); an empty name lets the kernel choose one (see [`Tap::name`]).
    pub fn open(name: &str, multi_queue: bool) -> Result<Tap, TapError> {
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        if multi_queue {
            req.flags |= IFF_MULTI_QUEUE;
        }
        if name.len() > MAX_NAME_LEN || name.as_bytes().contains(&0) {
            return Err(TapError::BadName(name.to_string()));
        }
        req.name[..name.len()].copy_from_slice(name.as_bytes());

        // SAFETY: the path is a NUL-terminated string; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    TapError::NoTunDevice
                }
                Some(libc::EACCES) | Some(libc::EPERM) => TapError::Permission {
                    name: name.to_string(),
                    source: e,
                },
                _ => TapError::Io {
                    name: name.to_string(),
                    what: "open /dev/net/tun",
                    source: e,
                },
            });
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });

        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is (same layout,
        // same size); the result is checked.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission {
                    name: name.to_string(),
                    source: e,
                },
                Some(libc::EBUSY) | Some(libc::EINVAL) => TapError::Busy {
                    name: name.to_string(),
                    source: e,
                },
                _ => TapError::Io {
                    name: name.to_string(),
                    what: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let actual = CStr::from_bytes_until_nul(&req.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| name.to_string());
        let tap = Tap { file, name: actual };
        tap.set_vnet_hdr_size(super::VNET_HDR_LEN as i32)?;
        Ok(tap)
    }

    /// Opens `queues` descriptors of the same TAP (multi-queue when more than one).
    pub fn open_queues(name: &str, queues: usize) -> Result<Vec<Tap>, TapError> {
        let first = Tap::open(name, queues > 1)?;
        let name = first.name.clone();
        let mut taps = vec![first];
        for _ in 1..queues {
            taps.push(Tap::open(&name, true)?);
        }
        Ok(taps)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl_int(&self, req: libc::c_ulong, val: &libc::c_int) -> io::Result<()> {
        // SAFETY: the TUN ioctls used here read one `int` (or `unsigned int`) through the
        // pointer, which points to a live value; the result is checked.
        let ret =
            unsafe { libc::ioctl(self.file.as_raw_fd(), req as _, val as *const libc::c_int) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Sets the size of the virtio-net header in front of every frame.
    pub fn set_vnet_hdr_size(&self, size: i32) -> Result<(), TapError> {
        self.ioctl_int(TUNSETVNETHDRSZ, &size)
            .map_err(|source| TapError::Io {
                name: self.name.clone(),
                what: "TUNSETVNETHDRSZ",
                source,
            })
    }

    /// Tells the kernel which offloads the reader (the guest) handles (see [`offload`]).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes the flags by value, not through a pointer.
        // SAFETY: the ioctl takes an integer argument and touches no memory of ours.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        };
        if ret < 0 {
            return Err(TapError::Io {
                name: self.name.clone(),
                what: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Attaches (or detaches) this queue of a multi-queue TAP: the kernel only hands frames
    /// to attached queues.
    pub fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError> {
        let mut req = IfReq {
            name: [0; 16],
            flags: if enabled {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads a `struct ifreq`, which `req` is; the result is checked.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE as _, &mut req) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            // Attaching an attached queue (or detaching a detached one) is not an error.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(TapError::Io {
                name: self.name.clone(),
                what: "TUNSETQUEUE",
                source: e,
            });
        }
        Ok(())
    }

    /// Wraps any datagram descriptor (a socket pair in tests) as a "TAP".
    #[cfg(test)]
    pub(crate) fn from_fd(fd: OwnedFd, name: &str) -> Tap {
        Tap {
            file: File::from(fd),
            name: name.to_string(),
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
