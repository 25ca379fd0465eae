//! Virtio end to end: the kit's `minimal` guest (CI, `VESSEL_E2E=1`) finds a virtio-blk disk
//! holding an ext4 file system with a script, runs it, and the host reads the results back
//! from the disk after the VM powered off. The script also reads a raw disk on the other
//! transport, reads the virtio-rng, makes vsock connections both ways, and brings up
//! virtio-net on a TAP the host pings (when the host allows TAP devices).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(15 * 60);

/// The TAP and addresses of one image's test (the two tests may run at once).
struct NetPlan {
    tap: String,
    host_ip: String,
    guest_ip: String,
}

impl NetPlan {
    fn for_image(image: &str) -> Self {
        let subnet = if image == "debian" { 98 } else { 99 };
        NetPlan {
            tap: format!("vsltap-{}", &image[..3]),
            host_ip: format!("172.30.{subnet}.1"),
            guest_ip: format!("172.30.{subnet}.2"),
        }
    }
}

/// Compiles the guest's vsock tool (static, so it needs nothing from the initramfs).
fn build_vsock_tool(dir: &Path) -> PathBuf {
    let out = dir.join("vsock");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/vsock.c");
    let st = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run gcc");
    assert!(st.success(), "gcc -static failed for {}", src.display());
    out
}

/// A file of an ext4 image, read with debugfs.
fn read_from_image(img: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {file}"))
        .arg(img)
        .output()
        .expect("run debugfs");
    text(&out.stdout)
}

/// Waits until the console file holds `needle` (or `stop` is set).
fn wait_console(console: &Path, needle: &str, stop: &AtomicBool) -> bool {
    while !stop.load(Ordering::Relaxed) {
        if std::fs::read_to_string(console).is_ok_and(|c| c.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Host side of the guest-initiated vsock connection: listens on `<uds>_5000`.
fn vsock_host_listener(uds: &Path, stop: Arc<AtomicBool>) -> JoinHandle<String> {
    let path = PathBuf::from(format!("{}_5000", uds.display()));
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut c = loop {
            match l.accept() {
                Ok((c, _)) => break c,
                Err(_) if !stop.load(Ordering::Relaxed) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(_) => return "the guest never connected".into(),
            }
        };
        c.set_nonblocking(false).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut line = String::new();
        BufReader::new(c.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        c.write_all(b"hello-guest\n").unwrap();
        line.trim().to_string()
    })
}

/// Host side of the host-initiated vsock connection: once the guest listens on port 6000,
/// connects to `uds`, asks for the port, and exchanges a line.
fn vsock_host_connect(uds: PathBuf, console: PathBuf, stop: Arc<AtomicBool>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        if !wait_console(&console, "LISTENING 6000", &stop) {
            return "guest never listened".into();
        }
        let mut c = UnixStream::connect(&uds).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        c.write_all(b"CONNECT 6000\n").unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut ok = String::new();
        r.read_line(&mut ok).unwrap();
        c.write_all(b"ping-guest\n").unwrap();
        let mut echo = String::new();
        r.read_line(&mut echo).unwrap();
        format!("{} | {}", ok.trim(), echo.trim())
    })
}

/// Creates the TAP for the test (root only); false when this host cannot.
fn setup_tap(p: &NetPlan) -> bool {
    if !Path::new("/dev/net/tun").exists() {
        return false;
    }
    let tap = &p.tap;
    let _ = sh(&format!("ip link del {tap} 2>/dev/null"));
    sh(&format!(
        "ip tuntap add {tap} mode tap && ip addr add {}/24 dev {tap} && ip link set {tap} up",
        p.host_ip
    ))
}

fn host_pings_guest(console: PathBuf, guest_ip: String, stop: Arc<AtomicBool>) -> JoinHandle<bool> {
    std::thread::spawn(move || {
        wait_console(&console, "NET-UP", &stop)
            && sh(&format!("ping -c 2 -i 0.5 -W 10 {guest_ip} >/dev/null"))
    })
}

const SCRIPT: &str = r#"
out=/mnt/output.txt
echo "md5 $(md5sum /mnt/input.txt | cut -d' ' -f1)" > $out
for d in /sys/block/vd*; do
    [ "$(cat $d/serial 2>/dev/null)" = rawdata ] && raw=/dev/${d##*/}
done
echo "raw $raw $(head -c 16 $raw)" >> $out
for d in /sys/block/vd*; do
    [ "$(cat $d/serial 2>/dev/null)" = qcow2data ] && q=/dev/${d##*/}
done
echo "qcow2 $q $(head -c 16 $q)" >> $out
echo -n QCOW2-GUEST-WROTE > /tmp/qw
dd if=/tmp/qw of=$q bs=512 seek=8 conv=notrunc 2>/dev/null && sync && echo "qcow2 written" >> $out
echo "rng $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null) $(head -c 16 /dev/hwrng | od -An -tx1 | tr -d ' \n')" >> $out
if [ -d /sys/class/net/eth0 ]; then
    ip addr add GUEST_IP/24 dev eth0 && ip link set eth0 up
    echo NET-UP
    ping -c 3 -W 10 HOST_IP >/dev/null && echo "net guest-ping ok" >> $out
    sleep 3
fi
echo "vsock $(/mnt/vsock connect 2 5000 hello-host)" >> $out
# The host connects once it sees LISTENING on the console.
timeout 300 /mnt/vsock serve 6000 | tee -a $out
echo done >> $out
cat $out
"#;

#[test]
fn minimal_guest_uses_block_rng_vsock_and_net_on_both_transports() {
    guest_uses_virtio_devices("minimal", LIMIT);
}

#[test]
fn debian_guest_uses_block_rng_vsock_and_net_on_both_transports() {
    if std::env::var("VESSEL_E2E_DEBIAN").is_ok_and(|v| v == "1") {
        guest_uses_virtio_devices("debian", Duration::from_secs(60 * 60));
    } else {
        eprintln!("note: the debian virtio test runs in the extended test command");
    }
}

fn guest_uses_virtio_devices(image: &str, limit: Duration) {
    let Some((kernel, initrd)) = kit_image(image) else {
        return;
    };
    let dir = scratch(&format!("virtio-{image}"));
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let input: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(files.join("input.txt"), &input).unwrap();
    std::fs::copy(build_vsock_tool(&dir), files.join("vsock")).unwrap();
    let plan = NetPlan::for_image(image);
    let script = SCRIPT
        .replace("GUEST_IP", &plan.guest_ip)
        .replace("HOST_IP", &plan.host_ip);
    std::fs::write(files.join("vessel-run"), script).unwrap();
    let disk = ext4_image(&dir, &files, 32);
    let raw = dir.join("raw.img");
    let mut data = b"RAW-DISK-MARKER!".to_vec();
    data.resize(1 << 20, 0x5a);
    std::fs::write(&raw, &data).unwrap();
    // A qcow2 overlay over a raw base: the guest reads the base through it and writes into it.
    let base = dir.join("qcow2-base.raw");
    let mut base_data = b"QCOW2-BASE-MARK!".to_vec();
    base_data.resize(1 << 20, 0xa5);
    std::fs::write(&base, &base_data).unwrap();
    let overlay = dir.join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        base.to_str().unwrap(),
        overlay.to_str().unwrap(),
    ]);
    let uds = dir.join("vsock.sock");
    let console = dir.join("console.txt");

    let net = setup_tap(&plan);
    if !net {
        eprintln!("note: no TAP on this host; the network part is skipped");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let listener = vsock_host_listener(&uds, stop.clone());
    let connector = vsock_host_connect(uds.clone(), console.clone(), stop.clone());
    let pinger =
        net.then(|| host_pings_guest(console.clone(), plan.guest_ip.clone(), stop.clone()));

    let mut cmd = vessel();
    cmd.args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory", if image == "debian" { "256M" } else { "128M" }])
        .args(["--append", "vessel.poweroff", "--stats"])
        .arg(format!("--disk=path={},transport=mmio", disk.display()))
        .arg(format!(
            "--disk=path={},readonly=on,serial=rawdata,transport=pci",
            raw.display()
        ))
        .arg(format!(
            "--disk=path={},serial=qcow2data,transport=pci",
            overlay.display()
        ))
        .arg("--rng=transport=pci")
        .arg(format!(
            "--vsock=cid=3,uds={},transport=mmio",
            uds.display()
        ))
        .arg(format!("--serial=file={}", console.display()));
    if net {
        cmd.arg(format!("--net=tap={},transport=pci", plan.tap));
    }
    let t = Instant::now();
    let out = run_with_timeout(cmd, limit);
    stop.store(true, Ordering::Relaxed);
    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    let tail: Vec<&str> = console_text.lines().rev().take(60).collect();
    let tail: String = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    if net {
        let _ = sh(&format!("ip link del {}", plan.tap));
    }
    assert!(
        out.status.success(),
        "vessel failed: {}\nconsole tail:\n{tail}",
        text(&out.stderr)
    );
    eprintln!(
        "{image} virtio guest finished in {:.1} s\n{}",
        t.elapsed().as_secs_f64(),
        text(&out.stderr)
    );

    // What the guest wrote reached the disk (sync + power-off lost nothing).
    let result = read_from_image(&disk, "/output.txt");
    let md5 = {
        let o = Command::new("md5sum")
            .arg(files.join("input.txt"))
            .output()
            .unwrap();
        text(&o.stdout).split(' ').next().unwrap().to_string()
    };
    assert!(result.contains(&format!("md5 {md5}")), "{result}\n{tail}");
    assert!(result.contains(" RAW-DISK-MARKER!"), "{result}\n{tail}");
    // The qcow2 disk: the base read through it, the guest's write in the overlay, which QEMU's
    // own tools find consistent; the base untouched.
    assert!(result.contains(" QCOW2-BASE-MARK!"), "{result}\n{tail}");
    assert!(result.contains("qcow2 written"), "{result}\n{tail}");
    qemu_img(&["check", "-q", overlay.to_str().unwrap()]);
    let flat = dir.join("overlay.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        overlay.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    let flat = std::fs::read(&flat).unwrap();
    assert_eq!(&flat[4096..4096 + 17], b"QCOW2-GUEST-WROTE");
    assert_eq!(&flat[..16], b"QCOW2-BASE-MARK!");
    assert!(
        std::fs::read(&base).unwrap() == base_data,
        "the base is never written"
    );
    let rng_line = result.lines().find(|l| l.starts_with("rng ")).unwrap_or("");
    assert!(rng_line.contains("virtio_rng"), "{result}");
    let hex = rng_line.rsplit(' ').next().unwrap_or("");
    assert_eq!(hex.len(), 32, "16 random bytes: {rng_line}");
    assert_ne!(hex, "0".repeat(32));
    assert!(
        result.contains("vsock REPLY hello-guest"),
        "{result}\n{tail}"
    );
    assert!(result.contains("SERVED ping-guest"), "{result}\n{tail}");
    assert!(result.trim_end().ends_with("done"), "{result}");
    assert_eq!(listener.join().unwrap(), "hello-host");
    let host_side = connector.join().unwrap();
    assert!(host_side.starts_with("OK "), "{host_side}");
    assert!(host_side.ends_with("| echo ping-guest"), "{host_side}");
    if let Some(p) = pinger {
        assert!(
            p.join().unwrap(),
            "the host could not ping the guest\n{tail}"
        );
        assert!(result.contains("net guest-ping ok"), "{result}\n{tail}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs Debian's `qemu-img` (qemu-utils, installed by scripts/install-deps.sh).
fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian's qemu-utils) is needed");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        text(&out.stderr)
    );
}

/// The guest's side of the passt test: DHCP through passt, then HTTP to the host's loopback
/// through the default gateway's address (passt maps it there).
const PASST_SCRIPT: &str = r#"
out=/mnt/output.txt
cat > /tmp/udhcpc.sh <<'EOS'
#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr add $ip/$mask dev $interface
ip route add default via $router
echo "lease $ip/$mask via $router" > /tmp/lease
echo $router > /tmp/gw
EOS
chmod +x /tmp/udhcpc.sh
ip link set eth0 up
busybox udhcpc -i eth0 -q -n -t 10 -s /tmp/udhcpc.sh
cat /tmp/lease >> $out
gw=$(cat /tmp/gw)
echo "gateway $gw" >> $out
# busybox-static's wget crashes looking up the "http" service (static glibc NSS): nc.
printf 'GET / HTTP/1.0\r\n\r\n' | timeout 30 nc $gw HTTP_PORT > /tmp/http 2>> $out
echo "http $(tail -n 1 /tmp/http)" >> $out
# A server in the guest, reached from the host through passt's forwarded port (the host
# retries until it answers: the first connections may come before nc listens).
echo GUEST-LISTENING
for i in 1 2 3 4 5 6 7 8 9 10; do
    printf 'HTTP/1.0 200 OK\r\n\r\nGUEST-HTTP-OK\n' | timeout 60 nc -l -p 8080 > /tmp/req
    grep -q '^GET / HTTP/1.0' /tmp/req && break
done
echo "served $(head -n 1 /tmp/req)" >> $out
echo done >> $out
cat $out
"#;

/// Once the guest's console says its server listens, fetches a page from it through the
/// forwarded `port` (retrying: a connection that comes before the guest's `nc` listens is
/// reset); returns the answer.
fn fetch_from_guest(console: PathBuf, port: u16, stop: Arc<AtomicBool>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        use std::io::Read;
        while !stop.load(Ordering::Relaxed) {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if text.contains("GUEST-LISTENING") {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        while !stop.load(Ordering::Relaxed) {
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                // The client speaks first: Debian 12's passt leaves the guest's handshake
                // to be completed by the first data it forwards.
                let _ = c.write_all(b"GET / HTTP/1.0\r\n\r\n");
                let mut answer = String::new();
                let _ = c.read_to_string(&mut answer);
                if answer.contains("GUEST-HTTP-OK") {
                    return answer;
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        String::new()
    })
}

/// Answers every connection on `l` with one HTTP response until `stop` is set.
fn http_server(l: std::net::TcpListener, stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut served = 0;
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut c, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            c.set_nonblocking(false).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let body = "PASST-HTTP-OK";
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            served += 1;
        }
        served
    })
}

/// `vessel`, run as a user who is not root but can open `/dev/kvm`. Run as root, the test
/// makes one without touching the host: in a mount namespace of its own, `/dev/kvm` is a
/// node owned by `nobody`, and Vessel runs as `nobody` (`setpriv`), with the kernel, initrd
/// and the scratch directory readable and writable there. Returns the command (arguments
/// for Vessel still to add) and the kernel and initrd to give it.
fn unprivileged_vessel(dir: &Path, kernel: &Path, initrd: &Path) -> (Command, PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return (vessel(), kernel.to_path_buf(), initrd.to_path_buf());
    }
    let k = dir.join("kernel");
    let i = dir.join("initrd");
    std::fs::copy(kernel, &k).unwrap();
    std::fs::copy(initrd, &i).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let node = dir.join("kvm");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mknod \"$0\" c 10 232 && chown nobody \"$0\" && chmod 600 \"$0\" \
             && mount --bind \"$0\" /dev/kvm \
             && exec setpriv --reuid=nobody --regid=nogroup --clear-groups -- \"$@\"",
        )
        .arg(&node)
        .arg(env!("CARGO_BIN_EXE_vessel"))
        .stdin(std::process::Stdio::null());
    (cmd, k, i)
}

fn passt_installed() -> bool {
    Command::new("passt").arg("--version").output().is_ok()
}

#[test]
fn minimal_guest_gets_an_address_reaches_the_host_and_serves_it_through_passt() {
    let Some((kernel, initrd)) = kit_image("minimal") else {
        return;
    };
    if !passt_installed() {
        eprintln!("note: passt is not installed (apt-get install passt); test skipped");
        return;
    }
    let dir = scratch("virtio-passt");
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = PASST_SCRIPT.replace("HTTP_PORT", &port.to_string());
    std::fs::write(files.join("vessel-run"), script).unwrap();
    let disk = ext4_image(&dir, &files, 16);
    let console = dir.join("console.txt");
    let stop = Arc::new(AtomicBool::new(false));
    let server = http_server(listener, stop.clone());
    let forwarded = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap().port()
    };
    let client = fetch_from_guest(console.clone(), forwarded, stop.clone());

    // User-mode networking is for users without root: Vessel runs as one.
    let (mut cmd, kernel, initrd) = unprivileged_vessel(&dir, &kernel, &initrd);
    cmd.args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory", "128M", "--append", "vessel.poweroff"])
        .arg(format!("--disk=path={},transport=mmio", disk.display()))
        .arg(format!(
            "--net=user,mac=02:00:00:00:00:42,transport=pci,hostfwd=tcp:{forwarded}:8080"
        ))
        .arg(format!("--serial=file={}", console.display()));
    let t = Instant::now();
    let out = run_with_timeout(cmd, LIMIT);
    stop.store(true, Ordering::Relaxed);
    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    let tail: Vec<&str> = console_text.lines().rev().take(40).collect();
    let tail: String = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    assert!(
        out.status.success(),
        "vessel failed: {}\nconsole tail:\n{tail}",
        text(&out.stderr)
    );
    eprintln!("passt guest finished in {:.1} s", t.elapsed().as_secs_f64());
    let result = read_from_image(&disk, "/output.txt");
    assert!(result.contains("lease "), "no DHCP lease: {result}\n{tail}");
    assert!(
        result.contains("http PASST-HTTP-OK"),
        "no HTTP answer: {result}\n{tail}"
    );
    assert!(
        result.contains("served GET / HTTP/1.0"),
        "the guest's server was not reached: {result}\n{tail}"
    );
    assert!(result.trim_end().ends_with("done"), "{result}");
    assert!(server.join().unwrap() >= 1);
    let answer = client.join().unwrap();
    assert!(answer.contains("GUEST-HTTP-OK"), "{answer:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
