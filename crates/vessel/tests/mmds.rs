//! MMDS end to end (`VESSEL_E2E=1`, root for the TAP): Firecracker mode boots the kit's
//! `minimal` guest from a `--config-file` with `mmds-config` and a virtio-net device on a
//! TAP, seeded by `--metadata`. A script on an ext4 disk routes 169.254.169.254 through
//! eth0 and talks to MMDS with busybox `wget` (GETs) and `nc` (the token PUT), printing
//! `MMDS-RESULT` lines on the console; the host then changes the store through the API
//! socket and the guest reads the new value. One test per MMDS version.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use vessel_api::client::Client;

const LIMIT: Duration = Duration::from_secs(15 * 60);
const AMI: &str = "ami-vessel-42";

const SCRIPT: &str = r#"
ip addr add 172.30.97.2/24 dev eth0 && ip link set eth0 up
ip route add 169.254.169.254 dev eth0
M=http://169.254.169.254
r() { echo "MMDS-RESULT $1 $2"; }
if wget -q -O /tmp/plain $M/latest/meta-data/ami-id 2>/dev/null; then
    r plain "$(cat /tmp/plain)"
else
    r plain refused
fi
tok=$(printf 'PUT /latest/api/token HTTP/1.1\r\nHost: mmds\r\nX-metadata-token-ttl-seconds: 600\r\nConnection: close\r\n\r\n' | nc 169.254.169.254 80 | tail -n 1)
r token-len "${#tok}"
r token-get "$(wget -q -O - --header "X-metadata-token: $tok" $M/latest/meta-data/ami-id)"
r json "$(wget -q -O - --header "X-metadata-token: $tok" --header 'Accept: application/json' $M/latest/meta-data)"
r bad-token "$(wget -q -O - --header 'X-metadata-token: nope' $M/latest/meta-data/ami-id 2>/dev/null || echo refused)"
echo MMDS-WAIT
i=0
while [ $i -lt 300 ]; do
    v=$(wget -q -O - --header "X-metadata-token: $tok" $M/latest/rotated 2>/dev/null) && break
    i=$((i + 1))
    sleep 1
done
r rotated "$v"
"#;

fn results(console: &str) -> Vec<(String, String)> {
    console
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("MMDS-RESULT "))
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap_or((l, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn result<'a>(r: &'a [(String, String)], key: &str) -> Option<&'a str> {
    r.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn wait_for(console: &Mutex<String>, child: &mut Child, needle: &str, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if console.lock().unwrap().contains(needle) {
            return true;
        }
        if child.try_wait().ok().flatten().is_some() {
            return console.lock().unwrap().contains(needle);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn guest_reads_mmds(version: &str, tap: &str) {
    if std::env::var("VESSEL_E2E").ok().as_deref() != Some("1") {
        eprintln!("note: set VESSEL_E2E=1 to boot the minimal guest against MMDS");
        return;
    }
    let Some((kernel, initrd)) = kit_image("minimal") else {
        return;
    };
    if !Path::new("/dev/net/tun").exists() {
        eprintln!("note: no /dev/net/tun; the MMDS test is skipped");
        return;
    }
    let _ = sh(&format!("ip link del {tap} 2>/dev/null"));
    if !sh(&format!(
        "ip tuntap add {tap} mode tap && ip link set {tap} up"
    )) {
        eprintln!("note: cannot create a TAP here; the MMDS test is skipped");
        return;
    }
    let dir = scratch(&format!("mmds-{version}"));
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("vessel-run"), SCRIPT).unwrap();
    let disk = ext4_image(&dir, &files, 8);
    let metadata = dir.join("metadata.json");
    std::fs::write(
        &metadata,
        json!({"latest": {"meta-data": {"ami-id": AMI}}}).to_string(),
    )
    .unwrap();
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        json!({
            "boot-source": {
                "kernel_image_path": kernel,
                "initrd_path": initrd,
                "boot_args": format!("{} vessel.poweroff", vessel_vmm::DEFAULT_CMDLINE),
            },
            "machine-config": { "vcpu_count": 1, "mem_size_mib": 128 },
            "drives": [{
                "drive_id": "script", "path_on_host": disk,
                "is_root_device": false, "is_read_only": false
            }],
            "network-interfaces": [{
                "iface_id": "eth0", "host_dev_name": tap, "guest_mac": "06:00:ac:10:00:02"
            }],
            "mmds-config": { "version": version, "network_interfaces": ["eth0"] }
        })
        .to_string(),
    )
    .unwrap();
    let sock = dir.join("api.sock");
    let mut cmd = vessel();
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&config)
        .arg("--metadata")
        .arg(&metadata)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = cmd.spawn().expect("spawn vessel");
    let console = collect_output(child.stdout.take().unwrap());
    let stderr = collect_output(child.stderr.take().unwrap());
    let waited = wait_for(&console, &mut child, "MMDS-WAIT", LIMIT);
    let rotated = waited && {
        // The host rotates a value after boot: the guest must see it.
        let mut c = Client::new(&sock, Duration::from_secs(30));
        let body = json!({"latest": {"rotated": "second-value"}}).to_string();
        let r = c.request("PATCH", "/mmds", Some(&body)).unwrap();
        assert_eq!(r.status, 204, "{}", r.text());
        wait_for(&console, &mut child, "MMDS-RESULT rotated", LIMIT)
    };
    // vessel.poweroff: the guest powers off after the script, and vessel exits.
    let end = Instant::now() + Duration::from_secs(5 * 60);
    let exited = loop {
        if child.try_wait().ok().flatten().is_some() {
            break true;
        }
        if Instant::now() > end {
            let _ = child.kill();
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.wait();
    let _ = sh(&format!("ip link del {tap}"));
    let console = console.lock().unwrap().clone();
    let tail: String = {
        let lines: Vec<&str> = console.lines().rev().take(40).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    eprintln!(
        "MMDS {version}: guest finished in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let err = stderr.lock().unwrap().clone();
    assert!(waited, "the guest never got to MMDS-WAIT\n{tail}\n{err}");
    assert!(rotated, "the guest never read the rotated value\n{tail}");
    assert!(exited, "the guest did not power off\n{tail}");
    let r = results(&console);
    let expect_plain = if version == "V1" { AMI } else { "refused" };
    assert_eq!(result(&r, "plain"), Some(expect_plain), "{tail}");
    assert_eq!(result(&r, "token-len"), Some("64"), "{tail}");
    assert_eq!(result(&r, "token-get"), Some(AMI), "{tail}");
    assert_eq!(
        result(&r, "json"),
        Some(format!("{{\"ami-id\":\"{AMI}\"}}").as_str()),
        "{tail}"
    );
    let expect_bad = if version == "V1" { AMI } else { "refused" };
    assert_eq!(result(&r, "bad-token"), Some(expect_bad), "{tail}");
    assert_eq!(result(&r, "rotated"), Some("second-value"), "{tail}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn minimal_guest_reads_mmds_v1() {
    guest_reads_mmds("V1", "vsltap-mm1");
}

#[test]
fn minimal_guest_reads_mmds_v2_with_a_session_token() {
    guest_reads_mmds("V2", "vsltap-mm2");
}
