//! Compiles the built-in seccomp programs (`vessel-seccomp-rules`) when Vessel is built, so
//! that a thread only installs its program at run time. Writes `$OUT_DIR/ahead.rs`: `AHEAD`,
//! each thread kind's key and program for the default action (`Action::Kill`), with
//! `PID_PLACEHOLDER` where the process id goes. A cross build writes none (the rules would be
//! the build host's syscall numbers): its threads compile their programs as they start.

use std::fmt::Write;

use vessel_seccomp_rules::{compile, Action, ThreadKind, PID_PLACEHOLDER};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target = |key: &str| std::env::var(key).unwrap_or_default();
    let native = target("CARGO_CFG_TARGET_ARCH") == std::env::consts::ARCH
        && target("CARGO_CFG_TARGET_OS") == std::env::consts::OS;
    let mut src =
        String::from("pub(crate) static AHEAD: &[(&str, &[seccompiler::sock_filter])] = &[\n");
    if native && cfg!(target_os = "linux") {
        for kind in ThreadKind::all() {
            let program = compile(kind, Action::Kill, PID_PLACEHOLDER)
                .unwrap_or_else(|e| panic!("the built-in filter of {kind:?}: {e}"));
            let _ = writeln!(src, "    ({:?}, &[", kind.key());
            for i in program {
                let _ = writeln!(
                    src,
                    "        seccompiler::sock_filter {{ code: {:#x}, jt: {}, jf: {}, k: {:#x} }},",
                    i.code, i.jt, i.jf, i.k
                );
            }
            src.push_str("    ]),\n");
        }
    }
    src.push_str("];\n");
    std::fs::write(out.join("ahead.rs"), src).expect("writing ahead.rs");
}
