//! The names of the images Vessel can build.

use std::fmt;
use std::str::FromStr;

use crate::ImageError;

/// A guest image Vessel builds from Debian packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageName {
    /// Debian's stock `linux-image-amd64` kernel (bzImage) plus its virtio and
    /// ext4 modules in the initramfs.
    Debian,
    /// Upstream Linux from `linux-source-6.1`, configured with tinyconfig plus
    /// guest/minimal.config, everything built in, booted as an ELF vmlinux.
    Minimal,
    /// The minimal kernel plus guest/kata.config: the guest kernel for Kata
    /// Containers' agent (scripts/kata-e2e.sh).
    Kata,
}

impl ImageName {
    /// Every image, in the order `vessel image` lists them.
    pub const ALL: [ImageName; 3] = [ImageName::Debian, ImageName::Minimal, ImageName::Kata];

    /// The lower-case name used on the command line and in the cache.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageName::Debian => "debian",
            ImageName::Minimal => "minimal",
            ImageName::Kata => "kata",
        }
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageName {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageName::ALL
            .into_iter()
            .find(|n| n.as_str() == s.trim())
            .ok_or_else(|| ImageError::UnknownImage(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_names_and_round_trips_display() {
        for name in ImageName::ALL {
            let text = name.to_string();
            assert_eq!(text.parse::<ImageName>().unwrap(), name);
        }
        assert_eq!("debian".parse::<ImageName>().unwrap(), ImageName::Debian);
        assert_eq!("minimal".parse::<ImageName>().unwrap(), ImageName::Minimal);
        assert_eq!("kata".parse::<ImageName>().unwrap(), ImageName::Kata);
    }

    #[test]
    fn unknown_name_lists_the_valid_ones() {
        let err = "ubuntu".parse::<ImageName>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"ubuntu\""), "{msg}");
        assert!(msg.contains("debian") && msg.contains("minimal"), "{msg}");
        assert!(
            "Debian".parse::<ImageName>().is_err(),
            "names are lower case"
        );
        assert!("".parse::<ImageName>().is_err());
    }
}
