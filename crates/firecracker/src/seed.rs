//! `--cloud-init`: a NoCloud seed disk (vfat labelled `cidata`, made in memory by
//! `vessel_diskboot::cloudinit`) so that a downloaded cloud image gives a login with one
//! command. With no files given, the user-data sets a fresh console password for the image's
//! default user (printed once) and authorises the host user's SSH public keys.

use std::path::{Path, PathBuf};

use vessel_diskboot::cloudinit::{self, SeedConfig};
use vessel_vmm::device_config::{DiskConfig, DiskFormat, Transport};
use vessel_vmm::ErrorChain;

use crate::memfile::MemFile;

/// The serial number the seed disk shows the guest.
pub const SEED_SERIAL: &str = "cidata";

/// The seed `image` as a disk: a memfd (keep it open as long as the VM runs) and its
/// read-only raw disk on `transport`.
pub fn seed_disk(image: &[u8], transport: Transport) -> Result<(MemFile, DiskConfig), String> {
    let file = MemFile::new(c"vessel-cidata", image)?;
    let disk = DiskConfig {
        path: file.path(),
        format: Some(DiskFormat::Raw),
        read_only: true,
        serial: Some(SEED_SERIAL.into()),
        transport,
        rate_limiter: None,
    };
    Ok((file, disk))
}

/// What `--cloud-init` names: `user-data=FILE[,meta-data=FILE][,network-config=FILE]`, or
/// nothing for the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedOptions {
    pub user_data: Option<PathBuf>,
    pub meta_data: Option<PathBuf>,
    pub network_config: Option<PathBuf>,
}

/// Parses the value of `--cloud-init`.
pub fn parse(s: &str) -> Result<SeedOptions, String> {
    let mut o = SeedOptions::default();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not KEY=FILE"))?;
        let slot = match key {
            "user-data" => &mut o.user_data,
            "meta-data" => &mut o.meta_data,
            "network-config" => &mut o.network_config,
            _ => {
                return Err(format!(
                    "unknown cloud-init option '{key}': use user-data, meta-data or network-config"
                ))
            }
        };
        if value.is_empty() {
            return Err(format!("{key}= needs a file"));
        }
        *slot = Some(PathBuf::from(value));
    }
    Ok(o)
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cloud-init {what} {}: {e}", path.display()))
}

/// A random password of 16 letters and digits.
fn new_password() -> Result<String, String> {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzACDEFGHJKLMNPQRTUVWXY345679";
    let mut bytes = [0u8; 16];
    getrandom(&mut bytes)?;
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect())
}

fn getrandom(buf: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| format!("cannot read random bytes: {e}"))
}

/// The seed disk's image; `log` hears what the guest will accept (the password).
pub fn build(o: &SeedOptions, log: &mut dyn FnMut(&str)) -> Result<Vec<u8>, String> {
    let user_data = match &o.user_data {
        Some(p) => read("user-data", p)?,
        None => {
            let keys = std::env::var_os("HOME")
                .map(|h| cloudinit::host_ssh_keys(Path::new(&h)))
                .unwrap_or_default();
            let password = new_password()?;
            log(&format!(
                "cloud-init: log in as the image's default user (e.g. debian, ubuntu) with password {password}{}",
                if keys.is_empty() {
                    String::new()
                } else {
                    format!(", or over SSH with your {} key(s)", keys.len())
                }
            ));
            cloudinit::default_user_data(&password, &keys)
        }
    };
    let config = SeedConfig {
        user_data,
        meta_data: o
            .meta_data
            .as_deref()
            .map(|p| read("meta-data", p))
            .transpose()?,
        network_config: o
            .network_config
            .as_deref()
            .map(|p| read("network-config", p))
            .transpose()?,
        ..SeedConfig::default()
    };
    cloudinit::build_seed(&config).map_err(|e| format!("cloud-init: {}", ErrorChain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_bad_ones_say_why() {
        assert_eq!(parse("").unwrap(), SeedOptions::default());
        let o = parse("user-data=/u,meta-data=/m").unwrap();
        assert_eq!(o.user_data, Some("/u".into()));
        assert_eq!(o.meta_data, Some("/m".into()));
        assert!(parse("vendor=/x")
            .unwrap_err()
            .contains("unknown cloud-init option"));
        assert!(parse("user-data").unwrap_err().contains("KEY=FILE"));
        assert!(parse("user-data=").unwrap_err().contains("needs a file"));
    }

    #[test]
    fn the_default_seed_carries_a_fresh_password_that_is_reported() {
        let mut said = String::new();
        let seed = build(&SeedOptions::default(), &mut |l| said.push_str(l)).unwrap();
        let password = said.split("password ").nth(1).unwrap()[..16].to_string();
        assert!(password.chars().all(|c| c.is_ascii_alphanumeric()));
        let hay = String::from_utf8_lossy(&seed);
        assert!(hay.contains(&password), "the user-data holds the password");
        assert_ne!(new_password().unwrap(), new_password().unwrap());
    }

    #[test]
    fn a_missing_user_data_file_is_named() {
        let o = parse("user-data=/nonexistent/ud").unwrap();
        let e = build(&o, &mut |_| {}).unwrap_err();
        assert!(e.contains("/nonexistent/ud"), "{e}");
    }
}
