//! The host terminal as the guest's console: raw mode while the VM runs, restored on every
//! way out (normal return, error, panic, and the signals Vessel handles).

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// The settings to put back, kept where a panic hook can reach them.
static SAVED: OnceLock<Mutex<Option<libc::termios>>> = OnceLock::new();

fn saved() -> &'static Mutex<Option<libc::termios>> {
    SAVED.get_or_init(|| Mutex::new(None))
}

/// Put the terminal back as it was (idempotent).
pub fn restore() {
    if let Ok(mut s) = saved().lock() {
        if let Some(t) = s.take() {
            // SAFETY: tcsetattr reads the termios struct we own; fd 0 is stdin.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

/// Raw mode on stdin for the life of this guard, when stdin is a terminal.
pub struct RawTerminal(());

impl RawTerminal {
    pub fn enable() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: an all-zero termios is a valid value to be filled by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into the termios we own.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return None;
        }
        *saved().lock().ok()? = Some(t);
        let mut raw = t;
        // SAFETY: cfmakeraw edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side messages still start at column 0.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: tcsetattr reads the termios we own.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            prev(info);
        }));
        Some(RawTerminal(()))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

/// The escape sequence that ends the VM from the console: Ctrl-A then `x`.
pub const ESCAPE: u8 = 0x01;

/// Feeds stdin to `sink` until EOF; Ctrl-A x sets `quit`. Ctrl-A Ctrl-A sends one Ctrl-A.
pub fn pump_stdin(mut sink: impl FnMut(&[u8]), quit: &AtomicBool, on_quit: impl Fn()) {
    let mut buf = [0u8; 64];
    let mut escaped = false;
    let mut stdin = io::stdin().lock();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut out = [0u8; 64];
        let mut len = 0;
        for &b in &buf[..n] {
            if escaped {
                escaped = false;
                if b == b'x' || b == b'X' {
                    quit.store(true, Ordering::Release);
                    on_quit();
                    return;
                }
                out[len] = b;
                len += 1;
            } else if b == ESCAPE {
                escaped = true;
            } else {
                out[len] = b;
                len += 1;
            }
        }
        if len > 0 {
            sink(&out[..len]);
        }
    }
}
