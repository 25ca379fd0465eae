//! The bootloader configurations Vessel reads to know what a disk boots: GRUB's `grub.cfg`
//! (the default `menuentry`) and Boot Loader Spec entries (`loader/entries/*.conf`).
//!
//! Only what a direct boot needs is read: the kernel path, the initrd paths and the command
//! line. GRUB's scripting is not run: `$variables` in a command line are dropped (Ubuntu's
//! `$vt_handoff`, for one), `search` and `insmod` are ignored, and a `submenu`'s entries
//! count after the top-level ones, as GRUB numbers them (`default="1>2"` names the third
//! entry of the second item).

/// One bootable entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub title: String,
    /// The kernel, as the configuration names it (a path on its partition).
    pub kernel: String,
    pub initrds: Vec<String>,
    pub cmdline: String,
}

/// Splits a GRUB line into words, honouring single and double quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A menu item: an entry, or a submenu of entries.
enum Item {
    Entry(Entry),
    Submenu(Vec<Entry>),
}

/// The default entry of a `grub.cfg`, or `None` when it has none GRUB could boot directly.
pub fn grub_default(cfg: &str) -> Option<Entry> {
    let mut items: Vec<Item> = Vec::new();
    let mut default = String::from("0");
    // The entry being read, and whether it is inside a submenu.
    let mut current: Option<Entry> = None;
    let mut submenu: Option<Vec<Entry>> = None;
    for raw in cfg.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let w = words(line);
        match w.first().map(String::as_str) {
            Some("set") if current.is_none() && submenu.is_none() => {
                if let Some(v) = w.get(1).and_then(|a| a.strip_prefix("default=")) {
                    default = v.to_string();
                }
            }
            Some("menuentry") => {
                current = Some(Entry {
                    title: w.get(1).cloned().unwrap_or_default(),
                    kernel: String::new(),
                    initrds: Vec::new(),
                    cmdline: String::new(),
                });
            }
            Some("submenu") => submenu = Some(Vec::new()),
            Some("linux" | "linux16" | "linuxefi") if current.is_some() => {
                if let (Some(e), Some(k)) = (current.as_mut(), w.get(1)) {
                    e.kernel = k.clone();
                    let args: Vec<&str> = w[2..]
                        .iter()
                        .map(String::as_str)
                        .filter(|a| !a.starts_with('$'))
                        .collect();
                    e.cmdline = args.join(" ");
                }
            }
            Some("initrd" | "initrd16" | "initrdefi") if current.is_some() => {
                if let Some(e) = current.as_mut() {
                    e.initrds.extend(w[1..].iter().cloned());
                }
            }
            Some("}") => match (current.take(), submenu.as_mut()) {
                (Some(e), Some(s)) => s.push(e),
                (Some(e), None) => items.push(Item::Entry(e)),
                (None, Some(_)) => items.push(Item::Submenu(submenu.take().unwrap_or_default())),
                (None, None) => {}
            },
            _ => {}
        }
    }
    let pick = |item: &Item, sub: Option<&str>| -> Option<Entry> {
        match (item, sub) {
            (Item::Entry(e), None) => Some(e.clone()),
            (Item::Submenu(s), Some(i)) => s.get(i.parse::<usize>().ok()?).cloned(),
            (Item::Submenu(s), None) => s.first().cloned(),
            (Item::Entry(_), Some(_)) => None,
        }
    };
    let (top, sub) = match default.split_once('>') {
        Some((t, s)) => (t, Some(s)),
        None => (default.as_str(), None),
    };
    let chosen = match top.parse::<usize>() {
        Ok(i) => items.get(i).and_then(|it| pick(it, sub)),
        // `saved` (no grubenv here) and unknown names: the first entry, as GRUB falls back.
        Err(_) => items.iter().find_map(|it| match it {
            Item::Entry(e) if e.title == top => Some(e.clone()),
            _ => None,
        }),
    };
    chosen
        .or_else(|| items.first().and_then(|it| pick(it, None)))
        .filter(|e| !e.kernel.is_empty())
}

/// The entry of a Boot Loader Spec file (`title`, `linux`, `initrd`, `options`).
pub fn bls_entry(text: &str) -> Option<Entry> {
    let mut e = Entry {
        title: String::new(),
        kernel: String::new(),
        initrds: Vec::new(),
        cmdline: String::new(),
    };
    for line in text.lines() {
        let line = line.trim();
        let (key, value) = match line.split_once(char::is_whitespace) {
            Some((k, v)) => (k, v.trim()),
            None => continue,
        };
        match key {
            "title" => e.title = value.to_string(),
            "linux" => e.kernel = value.to_string(),
            "initrd" => e.initrds.push(value.to_string()),
            "options" => {
                if !e.cmdline.is_empty() {
                    e.cmdline.push(' ');
                }
                e.cmdline.push_str(value);
            }
            _ => {}
        }
    }
    (!e.kernel.is_empty()).then_some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of a Debian cloud image's `grub.cfg` (trimmed).
    const DEBIAN: &str = r#"
set default="0"
if [ x"${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
fi
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux $menuentry_id_option 'gnulinux-simple-1234' {
	load_video
	insmod ext2
	search --no-floppy --fs-uuid --set=root 1234-abcd
	echo	'Loading Linux 6.1.0-28-cloud-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-28-cloud-amd64 root=PARTUUID=5678 ro  console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0 $vt_handoff
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-6.1.0-28-cloud-amd64
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-1234' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-28-cloud-amd64' --class debian {
		linux	/boot/vmlinuz-6.1.0-28-cloud-amd64 root=PARTUUID=5678 ro single
		initrd	/boot/initrd.img-6.1.0-28-cloud-amd64
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-27-cloud-amd64' --class debian {
		linux	/boot/vmlinuz-6.1.0-27-cloud-amd64 root=PARTUUID=5678 ro
		initrd	/boot/initrd.img-6.1.0-27-cloud-amd64 /boot/extra.img
	}
}
"#;

    #[test]
    fn the_default_grub_entry_gives_kernel_initrd_and_command_line() {
        let e = grub_default(DEBIAN).unwrap();
        assert_eq!(e.title, "Debian GNU/Linux");
        assert_eq!(e.kernel, "/boot/vmlinuz-6.1.0-28-cloud-amd64");
        assert_eq!(e.initrds, ["/boot/initrd.img-6.1.0-28-cloud-amd64"]);
        assert_eq!(
            e.cmdline,
            "root=PARTUUID=5678 ro console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0"
        );
    }

    #[test]
    fn grub_defaults_name_submenu_entries_and_titles() {
        let cfg = DEBIAN.replace(r#"set default="0""#, r#"set default="1>1""#);
        let e = grub_default(&cfg).unwrap();
        assert_eq!(e.kernel, "/boot/vmlinuz-6.1.0-27-cloud-amd64");
        assert_eq!(e.initrds.len(), 2);
        let cfg = DEBIAN.replace(r#"set default="0""#, "set default=saved");
        assert_eq!(grub_default(&cfg).unwrap().title, "Debian GNU/Linux");
        let cfg = DEBIAN.replace(r#"set default="0""#, "set default=7");
        assert_eq!(
            grub_default(&cfg).unwrap().title,
            "Debian GNU/Linux",
            "an entry that does not exist falls back to the first"
        );
    }

    #[test]
    fn configurations_without_a_linux_entry_give_none() {
        assert_eq!(grub_default(""), None);
        assert_eq!(
            grub_default("menuentry 'Windows' {\n chainloader +1\n}\n"),
            None
        );
        assert_eq!(bls_entry("title nothing\n"), None);
    }

    #[test]
    fn boot_loader_spec_entries_parse() {
        let e = bls_entry(
            "title Fedora Linux (6.11.4)\nversion 6.11.4\nlinux /vmlinuz-6.11.4\ninitrd /initramfs-6.11.4.img\noptions root=UUID=1 ro\noptions quiet\n",
        )
        .unwrap();
        assert_eq!(e.title, "Fedora Linux (6.11.4)");
        assert_eq!(e.kernel, "/vmlinuz-6.11.4");
        assert_eq!(e.initrds, ["/initramfs-6.11.4.img"]);
        assert_eq!(e.cmdline, "root=UUID=1 ro quiet");
    }

    #[test]
    fn grub_words_keep_quoted_spaces() {
        assert_eq!(
            words(r#"menuentry 'A B' --class x "C D""#),
            ["menuentry", "A B", "--class", "x", "C D"]
        );
        assert_eq!(words("linux\t/k  a=1"), ["linux", "/k", "a=1"]);
    }
}
