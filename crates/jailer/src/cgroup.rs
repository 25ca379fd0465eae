//! Cgroups for a jailed VM: finding the hierarchies in `/proc/self/mounts`, choosing v2 or v1,
//! creating `<mount>/<parent_cgroup>/<id>` with the limits written, and the handles the VMM
//! process uses to join it (written from inside the jail, so the jailer itself stays outside).
//! As with Firecracker's jailer, nothing removes the cgroup: that is the integrator's job once
//! the VMM has gone.
//!
//! Everything here works on plain paths, so the tests run it against a directory tree that
//! looks like a cgroup mount.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::spec::CgroupSetting;
use crate::JailError;

/// Which cgroup hierarchy to use (`--cgroup-version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VersionChoice {
    /// v2 when a cgroup2 mount offers every controller needed, else v1.
    Auto,
    #[value(name = "1")]
    V1,
    #[value(name = "2")]
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A cgroup filesystem mounted on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub path: PathBuf,
    pub version: Version,
    /// v1: the controllers bound to this hierarchy (from the mount options).
    pub controllers: Vec<String>,
}

/// The cgroup v1 controllers (what may appear among a v1 mount's options).
const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// The cgroup mounts listed in a `/proc/mounts` text.
pub fn parse_mounts(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let path = PathBuf::from(unescape_mount_path(f[1]));
        match f[2] {
            "cgroup2" => out.push(CgroupMount {
                path,
                version: Version::V2,
                controllers: Vec::new(),
            }),
            "cgroup" => out.push(CgroupMount {
                path,
                version: Version::V1,
                controllers: f[3]
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o))
                    .map(str::to_string)
                    .collect(),
            }),
            _ => {}
        }
    }
    out
}

/// `/proc/mounts` writes space, tab, newline and backslash in octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The settings for `--cpus`, `--memory` and `--pids` in the chosen hierarchy's file names.
pub fn limit_settings(
    version: Version,
    cpus: Option<f64>,
    memory: Option<u64>,
    pids: Option<u64>,
) -> Vec<CgroupSetting> {
    const PERIOD_US: u64 = 100_000;
    let s = |file: &str, value: String| CgroupSetting {
        file: file.to_string(),
        value,
    };
    let mut out = Vec::new();
    if let Some(c) = cpus {
        // At least 1 ms, the kernel's minimum quota.
        let quota = ((c * PERIOD_US as f64).round() as u64).max(1000);
        match version {
            Version::V2 => out.push(s("cpu.max", format!("{quota} {PERIOD_US}"))),
            Version::V1 => {
                out.push(s("cpu.cfs_period_us", PERIOD_US.to_string()));
                out.push(s("cpu.cfs_quota_us", quota.to_string()));
            }
        }
    }
    if let Some(m) = memory {
        match version {
            Version::V2 => {
                out.push(s("memory.max", m.to_string()));
            }
            Version::V1 => out.push(s("memory.limit_in_bytes", m.to_string())),
        }
    }
    if let Some(p) = pids {
        out.push(s("pids.max", p.to_string()));
    }
    out
}

/// The controllers a set of settings needs.
pub fn controllers_of(settings: &[CgroupSetting]) -> BTreeSet<String> {
    settings
        .iter()
        .filter_map(|s| s.controller().map(str::to_string))
        .collect()
}

fn read_words(path: &Path) -> BTreeSet<String> {
    fs::read_to_string(path)
        .map(|t| t.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Pick the hierarchy: with `Auto`, the first cgroup2 mount whose root offers every needed
/// controller, else v1 when every controller has a v1 hierarchy.
pub fn choose_version(
    choice: VersionChoice,
    mounts: &[CgroupMount],
    needed: &BTreeSet<String>,
) -> Result<Version, JailError> {
    let v2_ok = mounts.iter().any(|m| {
        m.version == Version::V2
            && needed.is_subset(&read_words(&m.path.join("cgroup.controllers")))
    });
    let v1_ok = needed.iter().all(|c| {
        mounts
            .iter()
            .any(|m| m.version == Version::V1 && m.controllers.contains(c))
    });
    match choice {
        VersionChoice::V2 => Ok(Version::V2),
        VersionChoice::V1 => Ok(Version::V1),
        VersionChoice::Auto if v2_ok => Ok(Version::V2),
        VersionChoice::Auto if v1_ok && !needed.is_empty() => Ok(Version::V1),
        VersionChoice::Auto => {
            if mounts.iter().any(|m| m.version == Version::V2) {
                Ok(Version::V2)
            } else if mounts.is_empty() {
                Err(JailError::Invalid(
                    "no cgroup filesystem is mounted (see /proc/mounts)".into(),
                ))
            } else {
                Ok(Version::V1)
            }
        }
    }
}

/// One directory the VM's cgroup lives in (v2: one; v1: one per hierarchy used).
#[derive(Debug)]
pub struct VmCgroup {
    /// `<mount>/<parent>/<id>`.
    pub path: PathBuf,
    /// `cgroup.procs` of that directory, open for writing: the VMM writes `0` to join.
    procs: File,
}

impl VmCgroup {
    /// Move the calling process into this cgroup (its children follow it).
    pub fn join(&self) -> std::io::Result<()> {
        (&self.procs).write_all(b"0")
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Io { what, source }
}

fn write_file(path: &Path, value: &str) -> Result<(), JailError> {
    // O_CREAT changes nothing on a cgroup filesystem (the files exist or cannot be made); it
    // lets the tests use a plain directory.
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(format!("open {}", path.display())))?;
    f.write_all(value.as_bytes())
        .map_err(io_err(format!("write {value:?} to {}", path.display())))
}

fn open_procs(dir: &Path) -> Result<File, JailError> {
    let p = dir.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&p)
        .map_err(io_err(format!("open {}", p.display())))
}

fn mkdir(path: &Path) -> Result<bool, JailError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_err(format!("create {}", path.display()))(e)),
    }
}

/// Create the VM's cgroup(s) under each hierarchy and write the settings; the processes join
/// later through [`VmCgroup::join`].
pub fn create(
    version: Version,
    mounts: &[CgroupMount],
    parent: &Path,
    id: &str,
    settings: &[CgroupSetting],
) -> Result<Vec<VmCgroup>, JailError> {
    match version {
        Version::V2 => create_v2(mounts, parent, id, settings).map(|c| vec![c]),
        Version::V1 => create_v1(mounts, parent, id, settings),
    }
}

fn create_v2(
    mounts: &[CgroupMount],
    parent: &Path,
    id: &str,
    settings: &[CgroupSetting],
) -> Result<VmCgroup, JailError> {
    let needed = controllers_of(settings);
    let mount = mounts
        .iter()
        .filter(|m| m.version == Version::V2)
        .find(|m| needed.is_subset(&read_words(&m.path.join("cgroup.controllers"))))
        .or_else(|| mounts.iter().find(|m| m.version == Version::V2))
        .ok_or_else(|| JailError::Invalid("no cgroup2 filesystem is mounted".into()))?;
    let available = read_words(&mount.path.join("cgroup.controllers"));
    if let Some(c) = needed.iter().find(|c| !available.contains(*c)) {
        return Err(JailError::Invalid(format!(
            "the cgroup2 hierarchy at {} has no {c} controller (it has: {})",
            mount.path.display(),
            available.into_iter().collect::<Vec<_>>().join(" ")
        )));
    }
    // Each level from the mount root down to the parent passes the controllers on.
    let mut dir = mount.path.clone();
    let mut levels = vec![dir.clone()];
    for c in parent.components() {
        dir.push(c);
        mkdir(&dir)?;
        levels.push(dir.clone());
    }
    for level in &levels {
        let ctl = level.join("cgroup.subtree_control");
        let on = read_words(&ctl);
        for c in needed.iter().filter(|c| !on.contains(*c)) {
            write_file(&ctl, &format!("+{c}"))?;
        }
    }
    let path = dir.join(id);
    mkdir(&path)?;
    for s in settings {
        write_file(&path.join(&s.file), &s.value)?;
    }
    Ok(VmCgroup {
        procs: open_procs(&path)?,
        path,
    })
}

fn create_v1(
    mounts: &[CgroupMount],
    parent: &Path,
    id: &str,
    settings: &[CgroupSetting],
) -> Result<Vec<VmCgroup>, JailError> {
    // Group the settings by hierarchy (cpu and cpuacct often share one), in order.
    let mut groups: Vec<(&CgroupMount, Vec<&CgroupSetting>)> = Vec::new();
    for s in settings {
        let Some(c) = s.controller() else {
            return Err(JailError::Invalid(format!(
                "--cgroup {}: cgroup v1 has no core cgroup.* settings",
                s.file
            )));
        };
        let mount = mounts
            .iter()
            .find(|m| m.version == Version::V1 && m.controllers.iter().any(|x| x == c))
            .ok_or_else(|| {
                JailError::Invalid(format!("no cgroup v1 hierarchy has the {c} controller"))
            })?;
        match groups.iter_mut().find(|(m, _)| m.path == mount.path) {
            Some((_, v)) => v.push(s),
            None => groups.push((mount, vec![s])),
        }
    }
    let mut out = Vec::new();
    for (mount, group) in groups {
        let cpuset = mount.controllers.iter().any(|c| c == "cpuset");
        let mut dir = mount.path.clone();
        for c in parent.components().map(|c| c.as_os_str().to_owned()) {
            let up = dir.clone();
            dir.push(c);
            mkdir(&dir)?;
            if cpuset {
                inherit_cpuset(&up, &dir)?;
            }
        }
        let path = dir.join(id);
        mkdir(&path)?;
        if cpuset {
            inherit_cpuset(&dir, &path)?;
        }
        for s in group {
            write_file(&path.join(&s.file), &s.value)?;
        }
        out.push(VmCgroup {
            procs: open_procs(&path)?,
            path,
        });
    }
    Ok(out)
}

/// A new v1 cpuset starts with no CPUs and no memory nodes, and takes no task until given
/// some: where the child's are empty, copy the parent's.
fn inherit_cpuset(parent: &Path, child: &Path) -> Result<(), JailError> {
    let read = |p: PathBuf| {
        let mut v = String::new();
        let _ = File::open(p).and_then(|mut h| h.read_to_string(&mut v));
        v.trim().to_string()
    };
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let theirs = read(parent.join(f));
        if read(child.join(f)).is_empty() && !theirs.is_empty() {
            write_file(&child.join(f), &theirs)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_cgroup;

    const HYBRID: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,xattr,name=systemd 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset,clone_children 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
";

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vessel-jailer-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn mounts_are_parsed() {
        let m = parse_mounts(HYBRID);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].path, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(m[0].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(m[1].controllers, vec!["memory"]);
        assert!(m[2].controllers.is_empty(), "{:?}", m[2].controllers);
        assert_eq!(m[3].controllers, vec!["cpuset"]);
        assert_eq!(m[4].version, Version::V2);
        let esc = parse_mounts("cgroup2 /mnt/a\\040b cgroup2 rw 0 0\n");
        assert_eq!(esc[0].path, PathBuf::from("/mnt/a b"));
    }

    #[test]
    fn limits_in_each_version() {
        let v2 = limit_settings(Version::V2, Some(1.5), Some(512 << 20), Some(64));
        let f = |v: &[CgroupSetting]| {
            v.iter()
                .map(|s| format!("{}={}", s.file, s.value))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            f(&v2),
            [
                "cpu.max=150000 100000",
                "memory.max=536870912",
                "pids.max=64"
            ]
        );
        let v1 = limit_settings(Version::V1, Some(0.001), Some(1 << 30), None);
        assert_eq!(
            f(&v1),
            [
                "cpu.cfs_period_us=100000",
                "cpu.cfs_quota_us=1000",
                "memory.limit_in_bytes=1073741824"
            ]
        );
        assert_eq!(
            controllers_of(&v1).into_iter().collect::<Vec<_>>(),
            ["cpu", "memory"]
        );
    }

    /// A fake cgroup2 mount: a directory with `cgroup.controllers` and the files the kernel
    /// would create in each new cgroup.
    #[test]
    fn v2_tree_is_created_and_joined() {
        let root = scratch("v2");
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        fs::write(root.join("cgroup.subtree_control"), "memory\n").unwrap();
        let mounts = vec![CgroupMount {
            path: root.clone(),
            version: Version::V2,
            controllers: vec![],
        }];
        let settings = limit_settings(Version::V2, Some(1.0), Some(1 << 28), Some(32));
        let needed = controllers_of(&settings);
        assert_eq!(
            choose_version(VersionChoice::Auto, &mounts, &needed).unwrap(),
            Version::V2
        );
        // The kernel makes these; the fake tree needs them before the jailer writes them.
        let parent = root.join("vessel");
        let vm = parent.join("vm-1");
        fs::create_dir_all(&vm).unwrap();
        for d in [&parent, &vm] {
            for f in ["cgroup.subtree_control", "cgroup.procs"] {
                fs::write(d.join(f), "").unwrap();
            }
        }
        let cgs = create(Version::V2, &mounts, Path::new("vessel"), "vm-1", &settings).unwrap();
        assert_eq!(cgs.len(), 1);
        assert_eq!(cgs[0].path, vm);
        assert_eq!(
            fs::read_to_string(vm.join("cpu.max")).unwrap(),
            "100000 100000"
        );
        assert_eq!(
            fs::read_to_string(vm.join("memory.max")).unwrap(),
            "268435456"
        );
        assert_eq!(fs::read_to_string(vm.join("pids.max")).unwrap(), "32");
        // The root already had memory on; cpu and pids were added (each write is one `+c`:
        // a plain file keeps the last one).
        assert_eq!(
            fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap(),
            "+pids"
        );
        cgs[0].join().unwrap();
        assert_eq!(fs::read_to_string(vm.join("cgroup.procs")).unwrap(), "0");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v2_missing_controller_is_an_error() {
        let root = scratch("v2-missing");
        fs::write(root.join("cgroup.controllers"), "memory\n").unwrap();
        let mounts = vec![CgroupMount {
            path: root.clone(),
            version: Version::V2,
            controllers: vec![],
        }];
        let settings = vec![parse_cgroup("pids.max=10").unwrap()];
        let e = create(Version::V2, &mounts, Path::new("p"), "vm", &settings).unwrap_err();
        assert!(e.to_string().contains("no pids controller"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    /// A fake v1 layout: auto picks v1 when the cgroup2 mount offers nothing; settings are
    /// split by hierarchy; a new cpuset inherits the parent's CPUs and nodes.
    #[test]
    fn v1_tree_is_created_per_hierarchy() {
        let root = scratch("v1");
        let mounts: Vec<CgroupMount> = [
            ("cpu,cpuacct", vec!["cpu", "cpuacct"]),
            ("memory", vec!["memory"]),
            ("cpuset", vec!["cpuset"]),
            ("unified", vec![]),
        ]
        .into_iter()
        .map(|(p, c)| {
            fs::create_dir_all(root.join(p)).unwrap();
            CgroupMount {
                path: root.join(p),
                version: if p == "unified" {
                    Version::V2
                } else {
                    Version::V1
                },
                controllers: c.into_iter().map(String::from).collect(),
            }
        })
        .collect();
        fs::write(root.join("unified/cgroup.controllers"), "").unwrap();
        fs::write(root.join("cpuset/cpuset.cpus"), "0-3\n").unwrap();
        fs::write(root.join("cpuset/cpuset.mems"), "0\n").unwrap();
        let mut settings = limit_settings(Version::V1, Some(2.0), Some(1 << 29), None);
        settings.push(parse_cgroup("cpuset.cpus=1").unwrap());
        let needed = controllers_of(&settings);
        assert_eq!(
            choose_version(VersionChoice::Auto, &mounts, &needed).unwrap(),
            Version::V1
        );
        for p in ["cpu,cpuacct", "memory", "cpuset"] {
            let d = root.join(p).join("fc/vm");
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("cgroup.procs"), "").unwrap();
        }
        let cgs = create(Version::V1, &mounts, Path::new("fc"), "vm", &settings).unwrap();
        let paths: Vec<_> = cgs.iter().map(|c| c.path.clone()).collect();
        assert_eq!(
            paths,
            [
                root.join("cpu,cpuacct/fc/vm"),
                root.join("memory/fc/vm"),
                root.join("cpuset/fc/vm")
            ]
        );
        let read = |p: &str| fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(read("cpu,cpuacct/fc/vm/cpu.cfs_quota_us"), "200000");
        assert_eq!(read("memory/fc/vm/memory.limit_in_bytes"), "536870912");
        assert_eq!(read("cpuset/fc/vm/cpuset.cpus"), "1");
        assert_eq!(read("cpuset/fc/vm/cpuset.mems"), "0");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v1_without_the_controller_is_an_error() {
        let mounts = parse_mounts(HYBRID);
        let settings = vec![parse_cgroup("pids.max=10").unwrap()];
        let e = create(Version::V1, &mounts, Path::new("p"), "vm", &settings).unwrap_err();
        assert!(e.to_string().contains("pids"), "{e}");
    }
}
