//! Running host commands with one-line errors, and checking that the host
//! tools a build needs are installed before starting it.

use std::env;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::error::IoContext;
use crate::ImageError;

/// A host requirement: a program on `$PATH` or a file (a header), and the
/// Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Need {
    /// A program looked up in `$PATH`.
    Program(&'static str, &'static str),
    /// An absolute file path (e.g. a development header).
    File(&'static str, &'static str),
}

impl Need {
    fn package(self) -> &'static str {
        match self {
            Need::Program(_, p) | Need::File(_, p) => p,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Need::Program(w, _) | Need::File(w, _) => w,
        }
    }
}

/// What fetching and unpacking Debian packages needs.
pub(crate) const APT_TOOLS: &[Need] = &[
    Need::Program("apt-get", "apt"),
    Need::Program("apt-cache", "apt"),
    Need::Program("dpkg-deb", "dpkg"),
];

/// What building the minimal kernel needs on top of [`APT_TOOLS`].
pub(crate) const KERNEL_TOOLS: &[Need] = &[
    Need::Program("tar", "tar"),
    Need::Program("xz", "xz-utils"),
    Need::Program("make", "make"),
    Need::Program("gcc", "gcc"),
    Need::Program("ld", "binutils"),
    Need::Program("strip", "binutils"),
    Need::Program("flex", "flex"),
    Need::Program("bison", "bison"),
    Need::Program("bc", "bc"),
    Need::Program("lz4", "lz4"),
    Need::File("/usr/include/gelf.h", "libelf-dev"),
];

/// Finds `program` in `$PATH` (an executable regular file).
pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Fails naming every missing requirement and the packages to install.
pub(crate) fn check_needs(needs: &[Need]) -> Result<(), ImageError> {
    let missing: Vec<Need> = needs
        .iter()
        .copied()
        .filter(|n| match n {
            Need::Program(p, _) => find_program(p).is_none(),
            Need::File(f, _) => !Path::new(f).exists(),
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let tools: Vec<&str> = missing.iter().map(|n| n.what()).collect();
    let mut packages: Vec<&str> = Vec::new();
    for p in missing.iter().map(|n| n.package()) {
        if !packages.contains(&p) {
            packages.push(p);
        }
    }
    Err(ImageError::MissingTools {
        tools: tools.join(", "),
        packages: packages.join(" "),
    })
}

/// The command line as text, for errors: program and arguments.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// The last non-empty lines of `text`, joined with " | " into one line of at
/// most `max_chars` characters (the end is kept).
pub(crate) fn tail_line(text: &str, max_lines: usize, max_chars: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(max_lines);
    let joined = lines[start..].join(" | ");
    let count = joined.chars().count();
    if count <= max_chars {
        joined
    } else {
        let skip = count - max_chars;
        format!("...{}", joined.chars().skip(skip).collect::<String>())
    }
}

fn failure(cmd: &Command, status: std::process::ExitStatus, output: &str) -> ImageError {
    let tail = tail_line(output, 4, 400);
    ImageError::Command {
        command: describe(cmd),
        detail: if tail.is_empty() {
            status.to_string()
        } else {
            format!("{status}: {tail}")
        },
    }
}

fn spawn_error(cmd: &Command, e: std::io::Error) -> ImageError {
    ImageError::Command {
        command: describe(cmd),
        detail: format!("cannot start: {e}"),
    }
}

/// Runs `cmd` to completion capturing its output; a non-zero exit is an
/// error carrying the tail of stderr (or stdout when stderr is empty).
pub(crate) fn run(cmd: &mut Command) -> Result<Output, ImageError> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd, e))?;
    if output.status.success() {
        return Ok(output);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = if stderr.trim().is_empty() {
        String::from_utf8_lossy(&output.stdout)
    } else {
        stderr
    };
    Err(failure(cmd, output.status, &text))
}

/// Runs `cmd` with stdout and stderr appended to `log_file` (long builds);
/// on failure the error carries the log's tail and its path.
pub(crate) fn run_logged(cmd: &mut Command, log_file: &Path) -> Result<(), ImageError> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .ctx("open log", log_file)?;
    let log2 = log.try_clone().ctx("open log", log_file)?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .status()
        .map_err(|e| spawn_error(cmd, e))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read(log_file).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    // Only the end matters; keep the scan cheap for multi-megabyte logs.
    let start = text.len().saturating_sub(8192);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    let mut err = failure(cmd, status, &text[start..]);
    if let ImageError::Command { detail, .. } = &mut err {
        detail.push_str(&format!(" (full log: {})", log_file.display()));
    }
    Err(err)
}

/// Runs `cmd` and returns its stdout as text.
pub(crate) fn run_stdout(cmd: &mut Command) -> Result<String, ImageError> {
    let out = run(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_line_keeps_last_lines_on_one_line() {
        let text = "one\n\ntwo\nthree\nfour\nfive\n";
        assert_eq!(tail_line(text, 3, 100), "three | four | five");
        assert_eq!(tail_line(text, 10, 100), "one | two | three | four | five");
        assert_eq!(tail_line(text, 1, 3), "...ive");
        assert_eq!(tail_line("", 3, 10), "");
    }

    #[test]
    fn missing_tools_are_named_with_their_packages() {
        let needs = [
            Need::Program("sh", "dash"),
            Need::Program("vessel-no-such-tool", "vessel-pkg"),
            Need::File("/vessel/no/such/header.h", "libvessel-dev"),
        ];
        let msg = check_needs(&needs).unwrap_err().to_string();
        assert!(msg.contains("vessel-no-such-tool"), "{msg}");
        assert!(msg.contains("/vessel/no/such/header.h"), "{msg}");
        assert!(
            msg.contains("apt-get install -y vessel-pkg libvessel-dev"),
            "{msg}"
        );
        assert!(!msg.contains("dash"), "{msg}");
        assert!(check_needs(&needs[..1]).is_ok());
    }

    #[test]
    fn failing_command_reports_stderr_tail() {
        let err = run(Command::new("sh").args(["-c", "echo out; echo bad thing >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("sh -c"), "{err}");
        assert!(err.contains("bad thing"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(!err.contains('\n'));
        let err = run(&mut Command::new("/vessel/no/such/program"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot start"), "{err}");
        assert_eq!(run_stdout(Command::new("echo").arg("hi")).unwrap(), "hi\n");
    }

    #[test]
    fn logged_command_failure_points_at_log() {
        let log = env::temp_dir().join(format!("vessel-image-log-{}", std::process::id()));
        let _ = fs::remove_file(&log);
        run_logged(Command::new("sh").args(["-c", "echo fine"]), &log).unwrap();
        let err = run_logged(
            Command::new("sh").args(["-c", "echo step; echo broken >&2; exit 2"]),
            &log,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("broken") && err.contains("full log"), "{err}");
        let text = fs::read_to_string(&log).unwrap();
        assert!(text.contains("fine") && text.contains("step"), "{text}");
        fs::remove_file(&log).unwrap();
    }
}
