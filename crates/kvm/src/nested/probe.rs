//! Detecting a nested host whose KVM emulates guest kernel code.
//!
//! On the nested hosts this is for, guest kernel code is emulated instruction by instruction
//! by the host's KVM while guest user code runs natively. Two signs give such a host away, and
//! [`probe_nested_host`] takes either:
//!
//! - [`probe_cpuid_passthrough`]: guests read the host's real CPUID whatever the VMM's table
//!   says. Kernel code's CPUID is answered by the emulator from the table; user code's by the
//!   outer hypervisor with the real values. So the probe runs its CPUID in 64-bit user mode.
//!   Some of these hosts honour the table (the lab host did not, then did), so this alone
//!   does not decide.
//! - [`probe_kernel_mode_emulated`]: the same short loop takes hundreds of times longer in
//!   kernel mode than in user mode.

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use kvm_ioctls::{Kvm, VcpuExit};

use crate::error::KvmError;
use crate::scratch_vm::ScratchVm;

/// The leaf the probe's CPUID table marks.
const PROBE_LEAF: u32 = 0x4000_0000;
/// The marker, as the vendor signature in EBX, ECX, EDX.
const MARKER: &[u8; 12] = b"VesselProbe!";
/// The port the probe guest reports on.
const PROBE_PORT: u16 = 0x80;
/// Iterations of the timed loop (two instructions each): a few us natively, milliseconds where
/// each instruction is emulated.
const TIMED_LOOP: u32 = 5000;
/// Kernel mode is taken for emulated when the loop takes this long there...
const EMULATED_AT_LEAST: Duration = Duration::from_micros(300);
/// ... and this many times as long as in user mode (where it runs natively on both kinds).
const EMULATED_RATIO: u32 = 8;

/// True when this host is a nested host that needs Vessel's fallback: guests read the real
/// CPUID, or guest kernel code is emulated. Takes a few milliseconds.
pub fn probe_nested_host(kvm: &Kvm) -> Result<bool, KvmError> {
    Ok(probe_cpuid_passthrough(kvm)? || probe_kernel_mode_emulated(kvm)?)
}

/// True when a loop of plain instructions runs many times slower in guest kernel mode than in
/// guest user mode: the host emulates kernel code. Best of three runs each, so that a
/// preempted run does not decide; a host where kernel mode is native needs one kernel run.
pub fn probe_kernel_mode_emulated(kvm: &Kvm) -> Result<bool, KvmError> {
    let start = Instant::now();
    let mut vm = ScratchVm::new(kvm, &timed_loop_code())?;
    vm.enter_long_mode(3)?;
    let user = (0..3)
        .map(|_| time_one_loop(&mut vm))
        .try_fold(Duration::MAX, |best, t| t.map(|t| best.min(t)))?;
    vm.enter_long_mode(0)?;
    let looks_emulated = |t: Duration| t >= EMULATED_AT_LEAST && t >= user * EMULATED_RATIO;
    let mut kernel = time_one_loop(&mut vm)?;
    for _ in 0..2 {
        if !looks_emulated(kernel) {
            break;
        }
        kernel = kernel.min(time_one_loop(&mut vm)?);
    }
    let emulated = looks_emulated(kernel);
    log::info!(
        "kernel-mode probe: {TIMED_LOOP} iterations took {user:?} in user mode, {kernel:?} in kernel mode: emulated={emulated} ({:?})",
        start.elapsed()
    );
    Ok(emulated)
}

/// Runs the timed loop once: from the exit before it to the exit after it.
fn time_one_loop(vm: &mut ScratchVm) -> Result<Duration, KvmError> {
    let mut report = || match vm.vcpu.run().map_err(KvmError::ioctl("KVM_RUN"))? {
        VcpuExit::IoOut(PROBE_PORT, _) => Ok(()),
        other => Err(KvmError::Probe(format!("unexpected exit {other:?}"))),
    };
    report()?; // the guest is at the start of the loop
    let t = Instant::now();
    report()?;
    Ok(t.elapsed())
}

/// 64-bit code, forever: an exit, the loop, an exit. Encoded here rather than with iced's
/// assembler, whose first use builds tables of a few hundred KiB that would stay in every
/// VMM's heap (the probe runs in each VM build); a test checks the bytes against iced.
fn timed_loop_code() -> Vec<u8> {
    let [p0, p1] = PROBE_PORT.to_le_bytes();
    let n = TIMED_LOOP.to_le_bytes();
    vec![
        0x66, 0xba, p0, p1,   // top: mov dx, PROBE_PORT
        0xef, // out dx, eax
        0xb9, n[0], n[1], n[2], n[3], // mov ecx, TIMED_LOOP
        0xff, 0xc9, // spin: dec ecx
        0x75, 0xfc, // jnz spin
        0xef, // out dx, eax
        0xeb, 0xef, // jmp top
    ]
}

/// True when guests on this host do not see the CPUID table the VMM sets: runs a throwaway
/// one-vCPU guest whose table gives leaf 0x4000_0000 the signature "VesselProbe!", lets it
/// execute CPUID for that leaf in 64-bit user mode and report EBX, ECX, EDX on an I/O port, and
/// compares. Takes a few milliseconds.
pub fn probe_cpuid_passthrough(kvm: &Kvm) -> Result<bool, KvmError> {
    let start = Instant::now();
    let seen = guest_signature(kvm, 3)?;
    let passthrough = &seen != MARKER;
    log::info!(
        "CPUID probe: user-mode guest saw {:?} for leaf {PROBE_LEAF:#x}: passthrough={passthrough} ({:?})",
        String::from_utf8_lossy(&seen),
        start.elapsed()
    );
    Ok(passthrough)
}

/// Runs the probe guest at privilege level `cpl` and returns the signature it read.
fn guest_signature(kvm: &Kvm, cpl: u8) -> Result<[u8; 12], KvmError> {
    let [_, b, c, d] = guest_cpuid(kvm, &marker_cpuid()?, cpl, PROBE_LEAF, 0)?;
    let mut seen = [0u8; 12];
    for (chunk, reg) in seen.chunks_exact_mut(4).zip([b, c, d]) {
        chunk.copy_from_slice(&reg.to_le_bytes());
    }
    Ok(seen)
}

/// What CPUID `leaf`.`subleaf` returns to a 64-bit guest at privilege level `cpl` whose vCPU
/// has the table `cpuid`: EAX, EBX, ECX, EDX.
fn guest_cpuid(
    kvm: &Kvm,
    cpuid: &CpuId,
    cpl: u8,
    leaf: u32,
    subleaf: u32,
) -> Result<[u32; 4], KvmError> {
    let mut vm = ScratchVm::new(kvm, &probe_code(leaf, subleaf))?;
    vm.enter_long_mode(cpl)?;
    vm.vcpu
        .set_cpuid2(cpuid)
        .map_err(KvmError::ioctl("KVM_SET_CPUID2"))?;

    let mut seen = [0u32; 4];
    for reg in seen.iter_mut() {
        match vm.vcpu.run().map_err(KvmError::ioctl("KVM_RUN"))? {
            VcpuExit::IoOut(PROBE_PORT, data) => {
                let bytes: [u8; 4] = data.try_into().map_err(|_| {
                    KvmError::Probe(format!("reported {} bytes, not 4", data.len()))
                })?;
                *reg = u32::from_le_bytes(bytes);
            }
            other => return Err(KvmError::Probe(format!("unexpected exit {other:?}"))),
        }
    }
    Ok(seen)
}

/// 64-bit code: CPUID(leaf, subleaf), then EAX, EBX, ECX, EDX out to the probe port. (The VMM
/// stops after the fourth `out`; the HLT after it is only a backstop.) Encoded by hand like
/// [`timed_loop_code`].
fn probe_code(leaf: u32, subleaf: u32) -> Vec<u8> {
    let mut c = vec![0xb8]; // mov eax, leaf
    c.extend_from_slice(&leaf.to_le_bytes());
    c.push(0xb9); // mov ecx, subleaf
    c.extend_from_slice(&subleaf.to_le_bytes());
    c.extend_from_slice(&[0x0f, 0xa2]); // cpuid
    c.extend_from_slice(&[0x89, 0xd6]); // mov esi, edx: DX is about to hold the port
    c.extend_from_slice(&[0x89, 0xc7]); // mov edi, eax
    c.extend_from_slice(&[0x66, 0xba]); // mov dx, PROBE_PORT
    c.extend_from_slice(&PROBE_PORT.to_le_bytes());
    // mov eax, edi / ebx / ecx / esi, each followed by out dx, eax.
    for modrm in [0xf8, 0xd8, 0xc8, 0xf0] {
        c.extend_from_slice(&[0x89, modrm, 0xef]);
    }
    c.push(0xf4); // hlt
    c
}

/// A CPUID table of one leaf: 0x4000_0000 with the marker as its signature.
fn marker_cpuid() -> Result<CpuId, KvmError> {
    let word =
        |i: usize| u32::from_le_bytes([MARKER[i], MARKER[i + 1], MARKER[i + 2], MARKER[i + 3]]);
    let entry = kvm_cpuid_entry2 {
        function: PROBE_LEAF,
        eax: PROBE_LEAF,
        ebx: word(0),
        ecx: word(4),
        edx: word(8),
        ..Default::default()
    };
    CpuId::from_entries(&[entry]).map_err(|_| KvmError::TooManyEntries {
        what: "probe CPUID table",
        len: 1,
        max: kvm_bindings::KVM_MAX_CPUID_ENTRIES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch_vm::CODE_GPA;
    use iced_x86::code_asm::{dx, eax, ebx, ecx, edi, edx, esi, CodeAssembler};

    #[test]
    fn the_hand_encoded_probes_are_what_iced_assembles() {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut top = a.create_label();
        let mut spin = a.create_label();
        a.set_label(&mut top).unwrap();
        a.mov(dx, u32::from(PROBE_PORT)).unwrap();
        a.out(dx, eax).unwrap();
        a.mov(ecx, TIMED_LOOP).unwrap();
        a.set_label(&mut spin).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(spin).unwrap();
        a.out(dx, eax).unwrap();
        a.jmp(top).unwrap();
        assert_eq!(timed_loop_code(), a.assemble(CODE_GPA).unwrap());

        let (leaf, subleaf) = (0x4000_0000, 0x1234_5678);
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(eax, leaf).unwrap();
        a.mov(ecx, subleaf).unwrap();
        a.cpuid().unwrap();
        a.mov(esi, edx).unwrap();
        a.mov(edi, eax).unwrap();
        a.mov(dx, u32::from(PROBE_PORT)).unwrap();
        for reg in [edi, ebx, ecx, esi] {
            a.mov(eax, reg).unwrap();
            a.out(dx, eax).unwrap();
        }
        a.hlt().unwrap();
        assert_eq!(probe_code(leaf, subleaf), a.assemble(CODE_GPA).unwrap());
    }

    /// The kernel-mode probe agrees with a direct look: the same loop's time at each level.
    /// (Both kinds of host exist; this checks the verdict is consistent with the timings, and
    /// that the probe is cheap where kernel mode is native.)
    #[test]
    fn kernel_mode_probe_matches_the_timings() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("/dev/kvm not openable: skipping");
            return;
        };
        let emulated = probe_kernel_mode_emulated(&kvm).unwrap();
        let code = timed_loop_code();
        let mut vm = ScratchVm::new(&kvm, &code).unwrap();
        let mut best = |cpl: u8| {
            vm.enter_long_mode(cpl).unwrap();
            (0..5)
                .map(|_| time_one_loop(&mut vm).unwrap())
                .min()
                .unwrap()
        };
        let (user, kernel) = (best(3), best(0));
        println!("emulated = {emulated}: user {user:?}, kernel {kernel:?}");
        if emulated {
            assert!(kernel >= EMULATED_AT_LEAST, "{kernel:?}");
            assert!(kernel > user * 4, "user {user:?}, kernel {kernel:?}");
        } else {
            assert!(
                kernel < user * 20 + EMULATED_AT_LEAST,
                "user {user:?}, kernel {kernel:?}"
            );
        }
    }

    #[test]
    fn marker_is_the_signature_registers() {
        let cpuid = marker_cpuid().unwrap();
        let e = cpuid.as_slice()[0];
        let mut sig = Vec::new();
        for r in [e.ebx, e.ecx, e.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, MARKER);
    }

    /// The probe's verdict matches what the guest really read: the marker on a host that honours
    /// KVM_SET_CPUID2, else the signature this process reads itself (the real CPUID). On the lab
    /// host it is the latter for user mode, while kernel mode (emulated) sees the marker.
    #[test]
    fn probe_on_this_host() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("/dev/kvm not openable: skipping");
            return;
        };
        let start = Instant::now();
        let passthrough = probe_cpuid_passthrough(&kvm).unwrap();
        let took = start.elapsed();
        println!("probe_cpuid_passthrough = {passthrough} in {took:?}");
        assert!(took.as_secs() < 2, "probe took {took:?}");

        let user = guest_signature(&kvm, 3).unwrap();
        let kernel = guest_signature(&kvm, 0).unwrap();
        let host = std::arch::x86_64::__cpuid(PROBE_LEAF);
        let mut own = Vec::new();
        for r in [host.ebx, host.ecx, host.edx] {
            own.extend_from_slice(&r.to_le_bytes());
        }
        println!(
            "user mode saw {:?}, kernel mode saw {:?}, this process sees {:?}",
            String::from_utf8_lossy(&user),
            String::from_utf8_lossy(&kernel),
            String::from_utf8_lossy(&own)
        );
        if passthrough {
            assert_eq!(
                user.as_slice(),
                own.as_slice(),
                "passthrough: the real CPUID"
            );
        } else {
            assert_eq!(&user, MARKER);
        }
        assert_eq!(
            &kernel, MARKER,
            "kernel mode gets the table's hypervisor leaf on both kinds"
        );
    }
}
