//! The fallback for nested hosts where guest kernel code is emulated by the host's KVM and the
//! guest's CPU features are the host's whatever `KVM_SET_CPUID2` says.
//!
//! On such a host the guest kernel must be kept off instructions the host emulator lacks, and
//! the CPUID table cannot do it. Measured on the lab host: guest user code runs natively and
//! reads the real CPUID; guest kernel code gets the VMM's table for the topology and hypervisor
//! leaves, but KVM_SET_CPUID2 replaces the feature words of leaves 0x1 and 0x7 with the host's
//! own (`KVM_GET_CPUID2` shows them). So the guest kernel is told on its command line,
//! [`nested_kernel_params`]; what no parameter avoids is completed in user space by
//! [`crate::emulate`]. [`probe_nested_host`] detects such a host; [`probe_nested_host_cached`]
//! keeps its answer for the host's boot.

mod cache;
mod probe;

pub use cache::probe_nested_host_cached;
pub use probe::{probe_cpuid_passthrough, probe_kernel_mode_emulated, probe_nested_host};

/// A CPU feature the guest kernel must not use, as Linux 6.1 numbers it in
/// `arch/x86/include/asm/cpufeatures.h`: `X86_FEATURE_<name> = word * 32 + bit`.
struct Feature {
    name: &'static str,
    word: u32,
    bit: u32,
}

impl Feature {
    const fn number(&self) -> u32 {
        self.word * 32 + self.bit
    }
}

const fn feature(name: &'static str, word: u32, bit: u32) -> Feature {
    Feature { name, word, bit }
}

/// Features whose instructions the host emulator fails on (or, for MOVBE and RDPID, answers with
/// #UD), by cpufeatures.h word: word 1 = CPUID.8000_0001:EDX, word 4 = CPUID.1:ECX,
/// word 6 = CPUID.8000_0001:ECX, word 9 = CPUID.7.0:EBX, word 16 = CPUID.7.0:ECX (checked
/// against Linux 6.1's cpufeatures.h). RDTSCP is here because `rdtsc_ordered()` uses it when
/// present and the lab host's emulator fails on it.
const CLEARED: &[Feature] = &[
    feature("RDTSCP", 1, 27),     // 59
    feature("REP_GOOD", 3, 16),   // 112: speed: rep movsq/stosq copies (see below)
    feature("PCLMULQDQ", 4, 1),   // 129: pclmulqdq
    feature("SSSE3", 4, 9),       // 137
    feature("FMA", 4, 12),        // 140
    feature("CX16", 4, 13),       // 141: cmpxchg16b
    feature("XMM4_1", 4, 19),     // 147: SSE4.1
    feature("XMM4_2", 4, 20),     // 148: SSE4.2 (crc32)
    feature("MOVBE", 4, 22),      // 150
    feature("POPCNT", 4, 23),     // 151
    feature("AES", 4, 25),        // 153: AES-NI
    feature("XSAVE", 4, 26),      // 154: what `noxsave` clears (see below)
    feature("RDRAND", 4, 30),     // 158
    feature("ABM", 6, 5),         // 197: lzcnt
    feature("FSGSBASE", 9, 0),    // 288: rd/wr{fs,gs}base
    feature("BMI1", 9, 3),        // 291
    feature("BMI2", 9, 8),        // 296
    feature("ERMS", 9, 9),        // 297: speed: rep movsb/stosb copies (see below)
    feature("INVPCID", 9, 10),    // 298
    feature("RDSEED", 9, 18),     // 306
    feature("ADX", 9, 19),        // 307
    feature("SMAP", 9, 20),       // 308: clac/stac
    feature("CLFLUSHOPT", 9, 23), // 311
    feature("CLWB", 9, 24),       // 312
    feature("SHA_NI", 9, 29),     // 317
    feature("RDPID", 16, 22),     // 534
    feature("FSRM", 18, 4),       // 580: speed: rep movsb memcpy (see below)
];
// REP_GOOD, ERMS and FSRM are cleared for speed, not correctness: the host emulates a `rep`
// string instruction one iteration at a time, so clearing a page with `rep stosb` costs 4096
// emulated steps where Linux's unrolled fallback (`clear_page_orig`, `memcpy_orig`, ...) needs
// a few hundred.

/// Kernel parameters for a guest on a nested host: `clearcpuid=` with XSAVE (`xsave`/`xrstor`
/// and friends; what `noxsave` does), RDTSCP, PCLMULQDQ, SSSE3, FMA, CX16, SSE4.1, SSE4.2, MOVBE, POPCNT, AES,
/// RDRAND, ABM, FSGSBASE, BMI1, BMI2, INVPCID, RDSEED, ADX, SMAP, CLFLUSHOPT, CLWB, SHA_NI and
/// RDPID (and, for speed, REP_GOOD, ERMS and FSRM); no paravirtual features (their hypercalls
/// never complete); a TSC trusted without a clocksource watchdog, and no lockup watchdogs (a
/// guest whose kernel code is emulated looks locked up to them); and no boot-time rewrite of the
/// trace events' enum names (`trace_eval_init`): distribution kernels with thousands of trace
/// events spend many emulated minutes there while PID 1 waits on it (the formats then show
/// enum names instead of numbers); no crypto self-tests and no jitter-entropy RNG, whose
/// boot-time timing loops run for minutes when every instruction is emulated (the DRBG then
/// seeds from the kernel's CRNG alone).
///
/// Two more, found by profiling Debian's 6.1 kernel on such a host:
/// - `rodata=off`: with `CONFIG_DEBUG_WX`, marking the kernel read-only is followed by a walk
///   of every kernel page-table entry looking for W+X mappings: 11 emulated minutes. The
///   guest's kernel text and rodata then stay writable (a hardening the guest gives up on
///   nested hosts only).
/// - `spec_rstack_overflow=off retbleed=off`: on AMD hosts every kernel `ret` otherwise goes
///   through the SRSO return thunk, the hottest code of an emulated boot. Speculation
///   mitigations for kernel returns protect nothing here: the host emulates guest kernel code
///   one instruction at a time, with no speculative execution (user-mode mitigations stay).
/// - the initcalls that register BPF kfuncs (`cubictcp_register`, `kfunc_init`, ...): the first
///   of them parses the whole vmlinux BTF, over 4 emulated minutes. The guest then has no BPF
///   kfuncs and uses Reno instead of CUBIC for TCP. (Modules in Vessel's images carry no BTF,
///   which would trigger the same parse.)
/// - `ftrace_check_for_weak_functions`: a background check that looks up the symbol of every
///   one of the kernel's ~50,000 ftrace call sites (to disable those of overridden weak
///   functions): 40 emulated seconds, while PID 1 waits for the CPU. Without it the function
///   tracer may stumble on a weak function's record when told to trace everything (ftrace
///   then reports the site and stops tracing); nothing else changes.
/// - `blake2s_mod_init`: BLAKE2s's boot-time self-test, all that initcall does (4.5 s).
///
/// And one found by timing the kit's `minimal` kernel's initcalls (`initcall_debug`):
/// - `pty.legacy_count=0`: a kernel built with `CONFIG_LEGACY_PTYS` registers 256 BSD pty
///   pairs at boot, 512 devices with their sysfs entries, uevents and devtmpfs nodes: 11.6 of
///   the 34 emulated seconds before `/init`. Nothing current opens `/dev/ptyXX` (everything,
///   Kata's agent too, uses `/dev/ptmx`); a kernel without legacy ptys ignores the parameter.
///
/// Every parameter has a `=`, names a module's parameter, or is one that Linux always knows
/// (`nopv`): the kernel hands an
/// unknown bare word to init as an argument, and an init that parses its arguments strictly
/// (Kata Containers' kata-agent) then exits. So XSAVE is cleared through `clearcpuid=`
/// rather than `noxsave` (which 6.1 reads without registering it), and the lockup watchdogs
/// are off through `watchdog_thresh=0 nmi_watchdog=0` rather than `nowatchdog` (unknown to a
/// kernel without them). Unknown `name=value` parameters become init's environment instead.
pub fn nested_kernel_params() -> String {
    let numbers: Vec<String> = CLEARED.iter().map(|f| f.number().to_string()).collect();
    let names: Vec<&str> = CLEARED.iter().map(|f| f.name).collect();
    log::debug!("nested host: guest kernel clears {}", names.join(" "));
    format!(
        "clearcpuid={} nopv tsc=reliable watchdog_thresh=0 nmi_watchdog=0 cryptomgr.notests \
         rodata=off spec_rstack_overflow=off retbleed=off pty.legacy_count=0 \
         initcall_blacklist={}",
        numbers.join(","),
        BLACKLISTED_INITCALLS.join(",")
    )
}

/// Initcalls skipped on nested hosts (see [`nested_kernel_params`]).
const BLACKLISTED_INITCALLS: &[&str] = &[
    "trace_eval_init",
    "jent_mod_init",
    "cubictcp_register",
    "kfunc_init",
    "bpf_rstat_kfunc_init",
    "bpf_key_sig_kfuncs_init",
    "bpf_prog_test_run_init",
    "bpf_tcp_ca_kfunc_init",
    "ftrace_check_for_weak_functions",
    "blake2s_mod_init",
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux 6.1 reads `clearcpuid=` into a 128-byte buffer and drops what does not fit.
    const CLEARCPUID_MAX: usize = 127;

    #[test]
    fn exact_params() {
        assert_eq!(
            nested_kernel_params(),
            "clearcpuid=59,112,129,137,140,141,147,148,150,151,153,154,158,197,288,291,296,\
             297,298,306,307,308,311,312,317,534,580 nopv tsc=reliable watchdog_thresh=0 \
             nmi_watchdog=0 cryptomgr.notests rodata=off spec_rstack_overflow=off retbleed=off \
             pty.legacy_count=0 initcall_blacklist=trace_eval_init,jent_mod_init,\
             cubictcp_register,kfunc_init,bpf_rstat_kfunc_init,bpf_key_sig_kfuncs_init,\
             bpf_prog_test_run_init,bpf_tcp_ca_kfunc_init,\
             ftrace_check_for_weak_functions,blake2s_mod_init"
        );
    }

    #[test]
    fn numbers_match_the_feature_words() {
        let by_name = |name: &str| CLEARED.iter().find(|f| f.name == name).unwrap().number();
        // Spot checks against cpufeatures.h's ( word*32+bit ) definitions.
        assert_eq!(by_name("CX16"), 4 * 32 + 13);
        assert_eq!(by_name("POPCNT"), 151);
        assert_eq!(by_name("SMAP"), 9 * 32 + 20);
        assert_eq!(by_name("RDPID"), 16 * 32 + 22);
        let mut numbers: Vec<u32> = CLEARED.iter().map(Feature::number).collect();
        let before = numbers.clone();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers, before, "sorted, no duplicates");
        assert!(CLEARED.iter().all(|f| f.bit < 32));
    }

    /// Linux passes an unknown bare word to init as an argument (kata-agent exits on one);
    /// never a module's `module.param`.
    #[test]
    fn no_bare_word_but_nopv() {
        for p in nested_kernel_params().split(' ') {
            assert!(p.contains('=') || p.contains('.') || p == "nopv", "{p}");
        }
        let by_name = |name: &str| CLEARED.iter().find(|f| f.name == name).unwrap().number();
        assert_eq!(
            by_name("XSAVE"),
            4 * 32 + 26,
            "X86_FEATURE_XSAVE, what noxsave clears"
        );
    }

    #[test]
    fn clearcpuid_fits_linux_buffer() {
        let params = nested_kernel_params();
        let list = params
            .split(' ')
            .find_map(|p| p.strip_prefix("clearcpuid="))
            .unwrap();
        assert!(list.len() <= CLEARCPUID_MAX, "{} bytes", list.len());
    }
}
