//! cloud-init NoCloud seed disks: what a cloud image waits for at its first boot (a user, a
//! password, SSH keys, a hostname), handed to it the way `cloud-localds` does, as a disk
//! holding a bare FAT filesystem (no partition table) labelled `CIDATA` (cloud-init matches
//! the label without regard to case) with the files `user-data`, `meta-data` and, when given,
//! `network-config` and `vendor-data`. The image is made in memory with the `fatfs` crate; the
//! VMM attaches it as one more (read-only) disk.
//!
//! The user-data is checked before it is written: cloud-init silently ignores user-data it
//! does not recognise, which leaves the user at a login prompt with no idea why, so a file
//! without one of cloud-init's headers (`#cloud-config`, `#!`, ...) is refused here, by name.

use std::io::{Cursor, Write};
use std::path::Path;

/// The largest user-data (and meta-data, network-config, vendor-data) file a seed takes.
pub const MAX_SEED_FILE: usize = 16 << 20;

/// The headers cloud-init recognises at the start of user-data (gzip-compressed user-data,
/// which it also takes, is recognised by its magic number).
pub const USER_DATA_HEADERS: [&str; 10] = [
    "#cloud-config",
    "#!",
    "#include",
    "#include-once",
    "#cloud-boothook",
    "#part-handler",
    "#cloud-config-archive",
    "#cloud-config-jsonp",
    "## template: jinja",
    "Content-Type:",
];

/// The volume label cloud-init looks for.
const LABEL: [u8; 11] = *b"CIDATA     ";

/// Why a seed disk could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CloudInitError {
    #[error("the user-data is empty (cloud-init needs at least a `#cloud-config` line)")]
    EmptyUserData,
    #[error(
        "the user-data starts with {start:?}, which cloud-init does not recognise: it must start with one of {}, or be gzip-compressed",
        USER_DATA_HEADERS.join(", ")
    )]
    UnknownUserData { start: String },
    #[error("the {file} is {size} bytes, more than the {MAX_SEED_FILE} a seed file may be")]
    TooLarge { file: &'static str, size: usize },
    #[error("writing the seed filesystem")]
    Write(#[source] std::io::Error),
}

/// What goes on a seed disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedConfig {
    /// The `user-data` file (see [`default_user_data`]); checked by [`check_user_data`].
    pub user_data: Vec<u8>,
    /// The `meta-data` file; `None` for [`default_meta_data`] with `instance_id` and
    /// `hostname`.
    pub meta_data: Option<Vec<u8>>,
    /// The `network-config` file (cloud-init's network configuration, version 1 or 2).
    pub network_config: Option<Vec<u8>>,
    /// The `vendor-data` file.
    pub vendor_data: Option<Vec<u8>>,
    /// The instance id of the default meta-data; a random one when `None` (cloud-init runs
    /// its once-per-instance modules again when the id changes).
    pub instance_id: Option<String>,
    /// The hostname of the default meta-data; `vessel` when `None`.
    pub hostname: Option<String>,
}

impl SeedConfig {
    /// A seed with `user_data` and default meta-data.
    pub fn new(user_data: Vec<u8>) -> SeedConfig {
        SeedConfig {
            user_data,
            ..SeedConfig::default()
        }
    }
}

/// `s` as a YAML double-quoted scalar: whatever it holds (quotes, colons, `#`, newlines,
/// control characters) stays a string.
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{FEFF}') => {
                out.push_str(&format!("\\u{:04X}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The user-data Vessel gives a cloud image by default: `password` for the image's default
/// user (`debian`, `ubuntu`, `fedora`...), not to be changed at first login, password logins
/// over SSH allowed, and `ssh_keys` authorized.
pub fn default_user_data(password: &str, ssh_keys: &[String]) -> Vec<u8> {
    let mut s = String::from("#cloud-config\n");
    s.push_str(&format!("password: {}\n", yaml_quote(password)));
    s.push_str("chpasswd:\n  expire: false\n");
    s.push_str("ssh_pwauth: true\n");
    if !ssh_keys.is_empty() {
        s.push_str("ssh_authorized_keys:\n");
        for k in ssh_keys {
            s.push_str(&format!("  - {}\n", yaml_quote(k)));
        }
    }
    s.into_bytes()
}

/// The meta-data of an instance: its id and hostname.
pub fn default_meta_data(instance_id: &str, hostname: &str) -> Vec<u8> {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_quote(instance_id),
        yaml_quote(hostname)
    )
    .into_bytes()
}

/// A new random instance id, `iid-` and 16 hex digits.
pub fn random_instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.write_u32(std::process::id());
    format!("iid-{:016x}", h.finish())
}

/// The public keys in `home`/.ssh (`*.pub`: `id_ed25519.pub`, `id_ecdsa.pub`, `id_rsa.pub`...),
/// in file name order, one per line that looks like a key; unreadable, empty and very large
/// files are passed over.
pub fn host_ssh_keys(home: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(home.join(".ssh")) else {
        return Vec::new();
    };
    let mut files: Vec<_> = dir
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pub"))
        .collect();
    files.sort();
    let mut keys = Vec::new();
    for f in files {
        if std::fs::metadata(&f).map_or(true, |m| !m.is_file() || m.len() > 64 << 10) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            let key_like = ["ssh-", "ecdsa-", "sk-"]
                .iter()
                .any(|p| line.starts_with(p));
            if key_like && !keys.iter().any(|k| k == line) {
                keys.push(line.to_string());
            }
        }
    }
    keys
}

/// Checks that cloud-init will take `data` as user-data (see the module docs).
pub fn check_user_data(data: &[u8]) -> Result<(), CloudInitError> {
    if data.len() > MAX_SEED_FILE {
        return Err(CloudInitError::TooLarge {
            file: "user-data",
            size: data.len(),
        });
    }
    if data.iter().all(u8::is_ascii_whitespace) {
        return Err(CloudInitError::EmptyUserData);
    }
    if data.starts_with(&[0x1F, 0x8B]) {
        return Ok(());
    }
    // cloud-init matches its `#` headers exactly, and a MIME header without regard to case.
    let known = USER_DATA_HEADERS.iter().any(|h| match data.get(..h.len()) {
        Some(start) if h.starts_with('#') => start == h.as_bytes(),
        Some(start) => start.eq_ignore_ascii_case(h.as_bytes()),
        None => false,
    });
    if known {
        return Ok(());
    }
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    let start: String = String::from_utf8_lossy(line).chars().take(40).collect();
    Err(CloudInitError::UnknownUserData { start })
}

/// Checks `config` as [`build_seed`] would, without building the image.
pub fn check_seed(config: &SeedConfig) -> Result<(), CloudInitError> {
    seed_files(config).map(drop)
}

/// The files of the seed, checked.
fn seed_files(config: &SeedConfig) -> Result<Vec<(&'static str, Vec<u8>)>, CloudInitError> {
    check_user_data(&config.user_data)?;
    let meta_data = config.meta_data.clone().unwrap_or_else(|| {
        default_meta_data(
            &config
                .instance_id
                .clone()
                .unwrap_or_else(random_instance_id),
            config.hostname.as_deref().unwrap_or("vessel"),
        )
    });
    let mut files = vec![
        ("user-data", config.user_data.clone()),
        ("meta-data", meta_data),
    ];
    if let Some(n) = &config.network_config {
        files.push(("network-config", n.clone()));
    }
    if let Some(v) = &config.vendor_data {
        files.push(("vendor-data", v.clone()));
    }
    for (file, data) in &files {
        if data.len() > MAX_SEED_FILE {
            return Err(CloudInitError::TooLarge {
                file,
                size: data.len(),
            });
        }
    }
    Ok(files)
}

/// The image of a seed disk holding `config`: a FAT12 or FAT16 filesystem labelled `CIDATA`,
/// of whole MiB, at least 1 MiB and enough for the files.
pub fn build_seed(config: &SeedConfig) -> Result<Vec<u8>, CloudInitError> {
    let files = seed_files(config)?;
    // Each file rounded up to 4 KiB clusters, and room for the tables and directory.
    let data: u64 = files
        .iter()
        .map(|(_, d)| (d.len() as u64).div_ceil(4096) * 4096)
        .sum();
    let mib = (data + (256 << 10)).div_ceil(1 << 20).max(1);
    // A few sizes fall between FAT types for `fatfs`: the next MiB does not.
    let mut last = None;
    for mib in mib..mib + 4 {
        match write_seed(&files, mib) {
            Ok(image) => return Ok(image),
            Err(e) => last = Some(e),
        }
    }
    Err(CloudInitError::Write(last.unwrap_or_else(|| {
        std::io::Error::other("no size fits the files")
    })))
}

fn write_seed(files: &[(&str, Vec<u8>)], mib: u64) -> std::io::Result<Vec<u8>> {
    let mut img = Cursor::new(vec![0u8; (mib << 20) as usize]);
    let options = fatfs::FormatVolumeOptions::new().volume_label(LABEL);
    fatfs::format_volume(&mut img, options)?;
    {
        let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new())?;
        let root = fs.root_dir();
        for (name, data) in files {
            let mut f = root.create_file(name)?;
            f.truncate()?;
            f.write_all(data)?;
            f.flush()?;
        }
        drop(root);
        fs.unmount()?;
    }
    Ok(img.into_inner())
}

#[cfg(test)]
mod tests;
