use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use super::*;

fn pair() -> (PasstStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (PasstStream::new(a).unwrap(), b)
}

fn framed(frame: &[u8]) -> Vec<u8> {
    let mut v = (frame.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(frame);
    v
}

/// Retries `f` for a few seconds while it returns `Ok`: a child that another test forks
/// holds copies of our descriptors until it execs, so the peer's end of a socket pair may
/// stay open for a moment after the test closes it.
fn until_err<T>(mut f: impl FnMut() -> Result<T, StreamEnd>) -> StreamEnd {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Err(e) = f() {
            return e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stream did not end"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

fn take(s: &mut PasstStream) -> Option<Vec<u8>> {
    let len = s.peek_frame().unwrap()?;
    let f = s.frame().to_vec();
    assert_eq!(f.len(), len);
    s.consume_frame();
    Some(f)
}

#[test]
fn a_frame_split_across_reads_is_whole_once_its_last_byte_arrives() {
    let (mut s, mut peer) = pair();
    let f: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
    let bytes = framed(&f);
    peer.write_all(&bytes[..2]).unwrap();
    assert_eq!(s.peek_frame(), Ok(None), "half a length");
    peer.write_all(&bytes[2..700]).unwrap();
    assert_eq!(s.peek_frame(), Ok(None), "part of the frame");
    assert!(s.frame().len() < f.len());
    peer.write_all(&bytes[700..]).unwrap();
    assert_eq!(take(&mut s), Some(f));
    assert_eq!(s.peek_frame(), Ok(None));
}

#[test]
fn several_frames_in_one_read_come_out_one_by_one() {
    let (mut s, mut peer) = pair();
    let frames: Vec<Vec<u8>> = (1..=5u8).map(|i| vec![i; 60 * usize::from(i)]).collect();
    let all: Vec<u8> = frames.iter().flat_map(|f| framed(f)).collect();
    peer.write_all(&all).unwrap();
    for f in &frames {
        assert_eq!(take(&mut s).as_ref(), Some(f));
    }
    assert_eq!(s.peek_frame(), Ok(None));
}

#[test]
fn frames_larger_than_what_is_left_of_the_buffer_are_still_received() {
    let (mut s, mut peer) = pair();
    // Enough 64 KiB frames to wrap the receive buffer several times, written from a
    // thread so the socket's buffer never blocks the test.
    let frames: Vec<Vec<u8>> = (0..10u8)
        .map(|i| vec![i; 65_000 + usize::from(i)])
        .collect();
    let sent = frames.clone();
    let t = std::thread::spawn(move || {
        for f in &sent {
            peer.write_all(&framed(f)).unwrap();
        }
        peer
    });
    let mut got = Vec::new();
    while got.len() < frames.len() {
        match s.peek_frame().unwrap() {
            Some(_) => {
                got.push(s.frame().to_vec());
                s.consume_frame();
            }
            None => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
    assert_eq!(got, frames);
    drop(t.join().unwrap());
}

#[test]
fn zero_length_frames_are_dropped_and_counted() {
    let (mut s, mut peer) = pair();
    let mut bytes = framed(&[]);
    bytes.extend(framed(b"abc"));
    bytes.extend(framed(&[]));
    peer.write_all(&bytes).unwrap();
    assert_eq!(take(&mut s), Some(b"abc".to_vec()));
    assert_eq!(s.peek_frame(), Ok(None));
    assert_eq!(s.stats.rx_dropped, 2);
}

#[test]
fn an_absurd_length_ends_the_stream() {
    let (mut s, mut peer) = pair();
    let mut bytes = framed(b"ok");
    bytes.extend_from_slice(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes());
    bytes.extend_from_slice(&[0; 100]);
    peer.write_all(&bytes).unwrap();
    assert_eq!(take(&mut s), Some(b"ok".to_vec()));
    let end = StreamEnd::Desync(MAX_FRAME_LEN as u32 + 1);
    assert_eq!(s.peek_frame(), Err(end));
    assert_eq!(s.end(), Some(end));
    assert!(!s.queue_bytes(b"late"), "nothing is sent on a lost stream");
    // The largest length allowed is fine.
    let (mut s, mut peer) = pair();
    let big = vec![7u8; MAX_FRAME_LEN];
    let t = std::thread::spawn(move || peer.write_all(&framed(&big)).map(|_| peer));
    let len = loop {
        if let Some(n) = s.peek_frame().unwrap() {
            break n;
        }
    };
    assert_eq!(len, MAX_FRAME_LEN);
    drop(t.join().unwrap());
}

#[test]
fn eof_ends_the_stream() {
    let (mut s, peer) = pair();
    drop(peer);
    assert_eq!(until_err(|| s.peek_frame()), StreamEnd::Closed);
    assert!(!s.queue_bytes(b"x"));
    assert_eq!(s.stats.tx_dropped, 1);
}

#[test]
fn queued_frames_go_out_with_their_length_and_without_the_header() {
    let (mut s, mut peer) = pair();
    let a = [1u8; 10];
    let b = [2u8; 30];
    let iovs = [
        libc::iovec {
            iov_base: a.as_ptr() as *mut libc::c_void,
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        },
    ];
    // Skip a 12-byte "header": 28 bytes of frame remain.
    assert!(s.queue_frame(&iovs, 12, 28));
    assert!(s.wants_out());
    s.flush().unwrap();
    assert!(!s.wants_out());
    let mut got = vec![0u8; 32];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got[..4], &28u32.to_be_bytes());
    assert!(got[4..].iter().all(|&x| x == 2));
}

#[test]
fn partial_writes_keep_frames_whole_and_in_order() {
    let (mut s, mut peer) = pair();
    let small: libc::c_int = 4096;
    // SAFETY: sets an int option from a live int; the result is checked.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    let frames: Vec<Vec<u8>> = (0..200u32)
        .map(|i| (0..(60 + i * 37 % 1400)).map(|j| (i + j) as u8).collect())
        .collect();
    for f in &frames {
        assert!(s.queue_bytes(f));
    }
    s.flush().unwrap();
    assert!(s.wants_out(), "a 4 KiB socket buffer cannot take it all");
    // Read and flush in turns until everything is through.
    let mut bytes = Vec::new();
    peer.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 8192];
    let total: usize = frames.iter().map(|f| 4 + f.len()).sum();
    while bytes.len() < total {
        match peer.read(&mut buf) {
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        s.flush().unwrap();
    }
    assert!(!s.wants_out());
    let expected: Vec<u8> = frames.iter().flat_map(|f| framed(f)).collect();
    assert_eq!(bytes, expected);
    assert_eq!(s.stats.tx_dropped, 0);
}

#[test]
fn frames_are_dropped_once_passt_stops_reading_and_sending_to_a_dead_passt_fails() {
    let (mut s, peer) = pair();
    let f = vec![0u8; 60_000];
    let mut dropped = false;
    for _ in 0..100 {
        if !s.queue_bytes(&f) {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "the send buffer is bounded");
    assert_eq!(s.stats.tx_dropped, 1);
    drop(peer);
    assert_eq!(until_err(|| s.flush()), StreamEnd::Closed);
    assert_eq!(s.end(), Some(StreamEnd::Closed));
}

#[test]
fn a_missing_passt_is_named() {
    let e = PasstProcess::spawn_program(Path::new("/nonexistent/passt"), &[]).unwrap_err();
    assert!(matches!(e, PasstError::NotInstalled), "{e:?}");
    assert!(e.to_string().contains("apt-get install passt"));
}

#[test]
fn the_child_gets_its_end_of_the_socket_and_dies_with_the_process_handle() {
    // A stand-in for passt: a shell that echoes what arrives on the descriptor it is given.
    let dir = std::env::temp_dir().join(format!("vessel-fake-passt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prog = dir.join("passt");
    std::fs::write(
        &prog,
        "#!/bin/sh\n[ \"$1\" = --fd ] || exit 1\nexec cat <&$2 >&$2\n",
    )
    .unwrap();
    std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (mut p, sock) = PasstProcess::spawn_program(&prog, &[]).unwrap();
    let mut s = PasstStream::new(sock).unwrap();
    assert!(s.queue_bytes(b"hello"));
    s.flush().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let got = loop {
        if s.peek_frame().unwrap().is_some() {
            let f = s.frame().to_vec();
            s.consume_frame();
            break f;
        }
        assert!(std::time::Instant::now() < deadline, "no echo");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert_eq!(got, b"hello");
    assert!(!p.has_exited());
    // Closing our end is what ends passt (here, its stand-in).
    drop(s);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !p.has_exited() {
        assert!(
            std::time::Instant::now() < deadline,
            "passt outlived its socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A DHCP DISCOVER from `mac`, built by hand: Ethernet broadcast, IPv4 UDP 68 → 67, BOOTP
/// with the magic cookie and option 53 (message type) = 1.
pub(crate) fn dhcp_discover(mac: [u8; 6], xid: u32) -> Vec<u8> {
    let mut bootp = vec![0u8; 236];
    bootp[0] = 1; // BOOTREQUEST
    bootp[1] = 1; // Ethernet
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&xid.to_be_bytes());
    bootp[10] = 0x80; // broadcast reply
    bootp[28..34].copy_from_slice(&mac);
    bootp.extend_from_slice(&[99, 130, 83, 99, 53, 1, 1, 255]);
    bootp.resize(300, 0);
    let udp_len = 8 + bootp.len();
    let mut udp = Vec::new();
    udp.extend_from_slice(&68u16.to_be_bytes());
    udp.extend_from_slice(&67u16.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no checksum
    udp.extend_from_slice(&bootp);
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255,
    ];
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    let sum = ip
        .chunks(2)
        .fold(0u32, |a, w| a + u32::from(u16::from_be_bytes([w[0], w[1]])));
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&udp);
    f
}

/// The DHCP message type (option 53) of a DHCP reply to `xid` in an Ethernet frame.
pub(crate) fn dhcp_reply_type(f: &[u8], xid: u32) -> Option<u8> {
    if f.len() < 14 + 20 + 8 + 240 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 17 {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let udp = &f[14 + ihl..];
    if udp[0..2] != 67u16.to_be_bytes() || udp[2..4] != 68u16.to_be_bytes() {
        return None;
    }
    let bootp = &udp[8..];
    if bootp[0] != 2 || bootp[4..8] != xid.to_be_bytes() || bootp[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let mut opts = &bootp[240..];
    while opts.len() >= 2 && opts[0] != 255 {
        if opts[0] == 0 {
            opts = &opts[1..];
            continue;
        }
        let len = usize::from(opts[1]);
        if opts[0] == 53 && len == 1 && opts.len() >= 3 {
            return Some(opts[2]);
        }
        opts = opts.get(2 + len..)?;
    }
    None
}

pub(crate) fn passt_installed() -> bool {
    Command::new("passt")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[test]
fn a_real_passt_offers_an_address_to_a_dhcp_discover() {
    if !passt_installed() {
        eprintln!("skipped: passt is not installed (apt-get install passt)");
        return;
    }
    let (mut p, sock) = PasstProcess::spawn(&[]).unwrap();
    let mut s = PasstStream::new(sock).unwrap();
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let xid = 0x1234_5678;
    assert!(s.queue_bytes(&dhcp_discover(mac, xid)));
    s.flush().unwrap();
    assert_eq!(wait_dhcp_reply(&mut s, xid), 2, "DHCPOFFER");
    // passt exits once its socket closes.
    drop(s);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !p.has_exited() {
        assert!(
            std::time::Instant::now() < deadline,
            "passt outlived its socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_real_passt_forwards_a_host_port_to_the_guest() {
    if !passt_installed() {
        eprintln!("skipped: passt is not installed (apt-get install passt)");
        return;
    }
    let host_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let guest_port = 8080u16;
    let (p, sock) = PasstProcess::spawn(&[format!("{host_port}:{guest_port}")]).unwrap();
    let mut s = PasstStream::new(sock).unwrap();
    // Let passt learn the guest's MAC address first.
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
    assert!(s.queue_bytes(&dhcp_discover(mac, 7)));
    s.flush().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut conn = None;
    let syn = loop {
        assert!(std::time::Instant::now() < deadline, "no SYN from passt");
        if conn.is_none() {
            // passt listens once it runs: retry until it does.
            conn = std::net::TcpStream::connect(("127.0.0.1", host_port)).ok();
        }
        match s.peek_frame() {
            Ok(Some(_)) => {
                let f = s.frame().to_vec();
                s.consume_frame();
                // IPv4, TCP, SYN without ACK, to the guest port.
                if f.len() >= 54 && f[12..14] == [0x08, 0x00] && f[23] == 6 {
                    let tcp = &f[14 + usize::from(f[14] & 0x0f) * 4..];
                    if tcp[2..4] == guest_port.to_be_bytes() && tcp[13] & 0x12 == 0x02 {
                        break f;
                    }
                }
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(e) => panic!("passt went away: {e}"),
        }
    };
    assert_eq!(&syn[..6], &mac, "to the guest's MAC");
    drop(conn);
    drop(s);
    drop(p);
}

/// Waits for a DHCP reply to `xid` on `s`; returns its message type.
pub(crate) fn wait_dhcp_reply(s: &mut PasstStream, xid: u32) -> u8 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match s.peek_frame() {
            Ok(Some(_)) => {
                let t = dhcp_reply_type(s.frame(), xid);
                s.consume_frame();
                if let Some(t) = t {
                    return t;
                }
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(e) => panic!("passt went away: {e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no DHCP reply from passt"
        );
    }
}

#[test]
fn a_passt_the_user_started_is_reached_at_its_socket() {
    if !passt_installed() {
        eprintln!("skipped: passt is not installed (apt-get install passt)");
        return;
    }
    let path = std::env::temp_dir().join(format!("vessel-passt-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut passt = Command::new("passt")
        .arg("--socket")
        .arg(&path)
        .args(["--foreground", "--quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut s = loop {
        match PasstStream::connect(&path) {
            Ok(s) => break s,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    };
    assert!(s.queue_bytes(&dhcp_discover([0x52, 0x54, 0, 1, 2, 3], 99)));
    s.flush().unwrap();
    assert_eq!(wait_dhcp_reply(&mut s, 99), 2, "DHCPOFFER");
    let _ = passt.kill();
    let _ = passt.wait();
    let _ = std::fs::remove_file(&path);
    // A socket nobody listens on is named in the error.
    let e = PasstStream::connect(&path).unwrap_err();
    assert!(e.to_string().contains(path.to_str().unwrap()), "{e}");
}
