//! Seeds reopened with `fatfs` (and with this crate's own FAT reader), the default user-data
//! and meta-data, the host's keys, and the user-data checks.

use std::io::Read;

use super::*;

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vessel-cloudinit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A seed image as `fatfs` reads it.
struct Seed {
    /// Name and contents, in directory order.
    files: Vec<(String, Vec<u8>)>,
    /// The labels of the boot sector and of the root directory.
    label: String,
    root_label: Option<String>,
}

fn open(image: Vec<u8>) -> Seed {
    let mut cursor = std::io::Cursor::new(image);
    let fs = fatfs::FileSystem::new(&mut cursor, fatfs::FsOptions::new()).unwrap();
    let mut files = Vec::new();
    for e in fs.root_dir().iter() {
        let e = e.unwrap();
        let mut data = Vec::new();
        e.to_file().read_to_end(&mut data).unwrap();
        files.push((e.file_name(), data));
    }
    let label = fs.volume_label();
    let root_label = fs.read_volume_label_from_root_dir().unwrap();
    Seed {
        files,
        label,
        root_label,
    }
}

#[test]
fn a_seed_is_a_bare_fat_labelled_cidata_with_the_files() {
    let config = SeedConfig {
        user_data: default_user_data("secret", &[]),
        meta_data: Some(b"instance-id: i-1\n".to_vec()),
        network_config: Some(b"version: 2\n".to_vec()),
        vendor_data: Some(b"#cloud-config\n".to_vec()),
        ..SeedConfig::default()
    };
    let image = build_seed(&config).unwrap();
    assert_eq!(image.len(), 1 << 20, "the smallest seed is 1 MiB");
    // No partition table: the filesystem's boot sector is the first sector.
    assert_eq!(&image[510..512], &[0x55, 0xAA]);
    assert_eq!(&image[0x36..0x3B], b"FAT12");
    let seed = open(image.clone());
    assert_eq!(seed.label, "CIDATA");
    assert_eq!(seed.root_label.as_deref(), Some("CIDATA"));
    assert_eq!(
        seed.files,
        [
            ("user-data".to_string(), config.user_data.clone()),
            ("meta-data".to_string(), b"instance-id: i-1\n".to_vec()),
            ("network-config".to_string(), b"version: 2\n".to_vec()),
            ("vendor-data".to_string(), b"#cloud-config\n".to_vec()),
        ]
    );
    // This crate's own reader reads it too (FAT names, any case).
    let fs = crate::fat::Fat::open(Mem(image)).unwrap();
    assert_eq!(fs.read("/USER-DATA").unwrap(), config.user_data);
}

struct Mem(Vec<u8>);

impl crate::fat::ReadAt for Mem {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let at = offset as usize;
        let src = self
            .0
            .get(at..at + buf.len())
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

#[test]
fn large_user_data_gets_a_larger_seed() {
    let mut user_data = b"#!/bin/sh\n".to_vec();
    user_data.extend((0..5 << 20).map(|i| b'a' + (i % 26) as u8));
    let image = build_seed(&SeedConfig::new(user_data.clone())).unwrap();
    assert_eq!(image.len() % (1 << 20), 0);
    assert!(
        image.len() >= 6 << 20 && image.len() <= 8 << 20,
        "{}",
        image.len()
    );
    let files = open(image).files;
    assert_eq!(files[0], ("user-data".to_string(), user_data));
}

#[test]
fn default_meta_data_has_the_given_or_a_random_instance_id() {
    let given = SeedConfig {
        instance_id: Some("i-42".into()),
        hostname: Some("box".into()),
        ..SeedConfig::new(b"#cloud-config\n".to_vec())
    };
    let files = open(build_seed(&given).unwrap()).files;
    assert_eq!(files[1].0, "meta-data");
    assert_eq!(
        files[1].1,
        b"instance-id: \"i-42\"\nlocal-hostname: \"box\"\n"
    );
    let files = open(build_seed(&SeedConfig::new(b"#cloud-config\n".to_vec())).unwrap()).files;
    let text = String::from_utf8(files[1].1.clone()).unwrap();
    assert!(text.starts_with("instance-id: \"iid-"), "{text}");
    assert!(text.ends_with("local-hostname: \"vessel\"\n"), "{text}");
    assert_ne!(random_instance_id(), random_instance_id());
}

#[test]
fn default_user_data_sets_the_password_and_keys_as_yaml_strings() {
    let keys = [
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx me@host".to_string(),
        "ssh-rsa AAAAB3Nza \"quoted\" #comment".to_string(),
    ];
    let text = String::from_utf8(default_user_data("p@ss: \"w\\o#rd\"\nx", &keys)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "#cloud-config",
            r#"password: "p@ss: \"w\\o#rd\"\nx""#,
            "chpasswd:",
            "  expire: false",
            "ssh_pwauth: true",
            "ssh_authorized_keys:",
            r#"  - "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx me@host""#,
            r#"  - "ssh-rsa AAAAB3Nza \"quoted\" #comment""#,
        ]
    );
    // Every line is a comment, a `key:` or `key: value`, or a list item, with no tabs.
    for line in &lines[1..] {
        let body = line.trim_start_matches(' ');
        assert!(!line.contains('\t'));
        assert!(
            body.starts_with("- \"")
                || body
                    .split_once(':')
                    .is_some_and(|(k, _)| !k.is_empty() && !k.contains(' ')),
            "{line}"
        );
    }
    let text = String::from_utf8(default_user_data("pw", &[])).unwrap();
    assert!(!text.contains("ssh_authorized_keys"), "{text}");
    assert_eq!(yaml_quote("a\u{7}b\u{2028}"), r#""a\u0007b\u2028""#);
}

#[test]
fn host_keys_are_the_ssh_public_keys_that_look_like_keys() {
    let home = scratch("keys");
    assert!(host_ssh_keys(&home).is_empty(), "no ~/.ssh: no keys");
    let ssh = home.join(".ssh");
    std::fs::create_dir_all(ssh.join("dir.pub")).unwrap();
    std::fs::write(ssh.join("id_rsa.pub"), "  ssh-rsa AAAAB3 me@host  \n\n").unwrap();
    std::fs::write(ssh.join("id_ed25519.pub"), "ssh-ed25519 AAAAC3 me@host\n").unwrap();
    std::fs::write(
        ssh.join("id_ecdsa.pub"),
        "ecdsa-sha2-nistp256 AAAAE2 me@host",
    )
    .unwrap();
    std::fs::write(ssh.join("empty.pub"), "").unwrap();
    std::fs::write(ssh.join("notes.pub"), "not a key\n").unwrap();
    std::fs::write(
        ssh.join("id_ed25519"),
        "-----BEGIN OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::write(ssh.join("copy.pub"), "ssh-ed25519 AAAAC3 me@host\n").unwrap();
    assert_eq!(
        host_ssh_keys(&home),
        [
            "ssh-ed25519 AAAAC3 me@host",
            "ecdsa-sha2-nistp256 AAAAE2 me@host",
            "ssh-rsa AAAAB3 me@host",
        ]
    );
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn user_data_cloud_init_would_ignore_is_refused() {
    for ok in [
        &b"#cloud-config\nusers: []\n"[..],
        b"#!/bin/sh\necho hi\n",
        b"#include https://example.com/x\n",
        b"Content-Type: multipart/mixed; boundary=x\n",
        b"content-type: text/x-shellscript\n",
        b"## template: jinja\n#cloud-config\n",
        &[0x1F, 0x8B, 8, 0],
    ] {
        check_user_data(ok).unwrap();
    }
    assert!(matches!(
        check_user_data(b""),
        Err(CloudInitError::EmptyUserData)
    ));
    assert!(matches!(
        check_user_data(b" \n\t\n"),
        Err(CloudInitError::EmptyUserData)
    ));
    for bad in [&b"users: []\n"[..], b"#Cloud-Config\n", b" #cloud-config\n"] {
        let e = check_user_data(bad).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, CloudInitError::UnknownUserData { .. }), "{e:?}");
        assert!(text.contains("#cloud-config, #!, #include"), "{text}");
        assert!(
            text.contains(&format!(
                "{:?}",
                String::from_utf8_lossy(bad).lines().next().unwrap()
            )),
            "{text}"
        );
    }
    let mut big = b"#cloud-config\n".to_vec();
    big.resize(MAX_SEED_FILE + 1, b'#');
    assert!(matches!(
        build_seed(&SeedConfig::new(big)),
        Err(CloudInitError::TooLarge {
            file: "user-data",
            ..
        })
    ));
    let config = SeedConfig {
        network_config: Some(vec![b' '; MAX_SEED_FILE + 1]),
        ..SeedConfig::new(b"#cloud-config\n".to_vec())
    };
    let e = build_seed(&config).unwrap_err();
    assert!(
        matches!(
            e,
            CloudInitError::TooLarge {
                file: "network-config",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("the network-config is 16777217 bytes"),
        "{e}"
    );
    assert!(matches!(
        build_seed(&SeedConfig::new(b"hello\n".to_vec())),
        Err(CloudInitError::UnknownUserData { .. })
    ));
}
