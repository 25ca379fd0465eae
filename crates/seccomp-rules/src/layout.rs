//! Lays a thread's rules out as one BPF program that finds the syscall by binary search.
//!
//! seccompiler compiles a filter as a chain: one comparison per listed syscall, in number
//! order, so a syscall late in the list (or not in it) runs through a few hundred
//! instructions. The kernel pays that twice: on every syscall the thread makes (a vCPU's
//! `KVM_RUN` went through about 150 instructions of two stacked lists, 145 ns per exit on
//! this project's lab host), and when the filter is installed, where it evaluates the filter
//! once for every syscall number to find those it may allow without running it (0.6-0.7 ms
//! per list, on the path of every thread's start). Here seccompiler still compiles each
//! syscall's argument checks; this module only puts a search over the syscall numbers in
//! front of them, so any syscall costs about fifteen instructions, and folds in the answers
//! that used to be a second, stacked filter (`clone3` fails with `ENOSYS`).

use seccompiler::{sock_filter, BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

use crate::rules::Rules;
use crate::Error;

const LD_W_ABS: u16 = 0x20;
const JMP_JA: u16 = 0x05;
const JMP_JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;
/// Where `struct seccomp_data` holds the syscall number.
const NR_OFFSET: u32 = 0;
/// The kernel's limit on one program's length.
const MAX_LEN: usize = 4096;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// What a syscall found by the search leads to.
enum Leaf {
    /// One answer whatever the arguments.
    Ret(u32),
    /// seccompiler's checks of the arguments, which end in an answer on every path.
    Checks(Vec<sock_filter>),
}

/// One program for `rules` (anything not listed gets `mismatch`, what is listed and matches
/// its arguments `allow`), with `answers` taking precedence over the rules for their
/// syscalls.
pub(crate) fn program(
    rules: Rules,
    answers: &[(i64, SeccompAction)],
    mismatch: SeccompAction,
    allow: SeccompAction,
    arch: TargetArch,
) -> Result<BpfProgram, Error> {
    // seccompiler's architecture check: a filter without rules is that check and `mismatch`.
    let mut out: BpfProgram =
        SeccompFilter::new(Rules::new(), mismatch.clone(), allow.clone(), arch)?.try_into()?;
    out.pop();
    let header = out.len();

    let mut leaves: Vec<(u32, Leaf)> = Vec::with_capacity(rules.len() + answers.len());
    for (nr, action) in answers {
        leaves.push((syscall_number(*nr)?, Leaf::Ret(u32::from(action.clone()))));
    }
    for (nr, chain) in rules {
        if answers.iter().any(|(a, _)| *a == nr) {
            continue;
        }
        let leaf = if chain.is_empty() {
            Leaf::Ret(u32::from(allow.clone()))
        } else {
            Leaf::Checks(checks(nr, chain, &mismatch, &allow, arch, header)?)
        };
        leaves.push((syscall_number(nr)?, leaf));
    }
    leaves.sort_by_key(|(nr, _)| *nr);

    out.push(stmt(LD_W_ABS, NR_OFFSET));
    let tree_at = out.len();
    let (tree, far) = search(&intervals(&leaves, u32::from(mismatch)));
    out.extend(tree);
    let mut starts = vec![None; leaves.len()];
    for (i, (_, leaf)) in leaves.iter().enumerate() {
        if let Leaf::Checks(code) = leaf {
            starts[i] = Some(out.len());
            out.extend_from_slice(code);
        }
    }
    for (at, leaf) in far {
        let at = tree_at + at;
        let to = starts[leaf].expect("only leaves with checks are jumped to");
        out[at].k = (to - at - 1) as u32;
    }
    if out.len() >= MAX_LEN {
        return Err(Error::TooLong(out.len()));
    }
    Ok(out)
}

fn syscall_number(nr: i64) -> Result<u32, Error> {
    u32::try_from(nr).map_err(|_| Error::SyscallNumber(nr))
}

/// seccompiler's checks of one syscall's arguments: its whole program for that syscall alone,
/// less the architecture check and the load of the number. The checks open with the
/// comparison of the number, which holds when they are reached (the paths for another
/// number, never taken, end in the program's last answer, `mismatch`), and every jump in them
/// stays in them (checked).
fn checks(
    nr: i64,
    chain: Vec<SeccompRule>,
    mismatch: &SeccompAction,
    allow: &SeccompAction,
    arch: TargetArch,
    header: usize,
) -> Result<Vec<sock_filter>, Error> {
    let one = [(nr, chain)].into_iter().collect();
    let whole: BpfProgram =
        SeccompFilter::new(one, mismatch.clone(), allow.clone(), arch)?.try_into()?;
    let body = &whole[header + 1..];
    let contained = body.iter().enumerate().all(|(i, ins)| {
        let end = |off: usize| i + 1 + off < body.len();
        match ins.code & 0x07 {
            // BPF_JMP: JA jumps by k, the others by jt or jf.
            0x05 if ins.code == JMP_JA => end(ins.k as usize),
            0x05 => end(ins.jt.into()) && end(ins.jf.into()),
            // BPF_RET ends the program; anything else goes on to the next instruction.
            0x06 => true,
            _ => i + 1 < body.len(),
        }
    });
    if !contained {
        return Err(Error::LooseChecks(nr));
    }
    Ok(body.to_vec())
}

/// What a range of syscall numbers leads to.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Ret(u32),
    /// The checks of leaf `i`.
    Checks(usize),
}

/// The syscall numbers cut into ranges of one answer each, as `(first number, answer)` in
/// order (each range runs to the next one's first number; the last to the end): neighbours
/// with the same answer merge, so a run of syscalls allowed alike is one range.
fn intervals(leaves: &[(u32, Leaf)], miss: u32) -> Vec<(u32, Answer)> {
    let mut out: Vec<(u32, Answer)> = vec![(0, Answer::Ret(miss))];
    let mut push = |at: u32, a: Answer| match out.last_mut() {
        Some(last) if last.1 == a => {}
        Some(last) if last.0 == at => {
            last.1 = a;
            if out.len() > 1 && out[out.len() - 2].1 == a {
                out.pop();
            }
        }
        _ => out.push((at, a)),
    };
    for (i, (nr, leaf)) in leaves.iter().enumerate() {
        push(
            *nr,
            match leaf {
                Leaf::Ret(k) => Answer::Ret(*k),
                Leaf::Checks(_) => Answer::Checks(i),
            },
        );
        if let Some(next) = nr.checked_add(1) {
            push(next, Answer::Ret(miss));
        }
    }
    out
}

/// A binary search of the number in the accumulator over `ranges`: one `JGE` per level, the
/// lower half first; answers are inlined, and a jump to checks is a `JA` (whose offset has 32
/// bits) returned in `far` (position in the code, leaf) to be filled in once the checks are
/// placed.
fn search(ranges: &[(u32, Answer)]) -> (Vec<sock_filter>, Vec<(usize, usize)>) {
    if let [(_, answer)] = ranges {
        return match *answer {
            Answer::Ret(k) => (vec![stmt(RET_K, k)], Vec::new()),
            Answer::Checks(leaf) => (vec![stmt(JMP_JA, 0)], vec![(0, leaf)]),
        };
    }
    let mid = ranges.len() / 2;
    let (lower, lower_far) = search(&ranges[..mid]);
    let (upper, upper_far) = search(&ranges[mid..]);
    let boundary = ranges[mid].0;
    let mut code = Vec::with_capacity(lower.len() + upper.len() + 2);
    match u8::try_from(lower.len()) {
        // nr >= boundary: over the lower half; else into it.
        Ok(n) => code.push(jump(JMP_JGE_K, boundary, n, 0)),
        Err(_) => {
            code.push(jump(JMP_JGE_K, boundary, 0, 1));
            code.push(stmt(JMP_JA, lower.len() as u32));
        }
    }
    let lower_at = code.len();
    code.extend(lower);
    let upper_at = code.len();
    code.extend(upper);
    let far = lower_far
        .into_iter()
        .map(|(at, leaf)| (lower_at + at, leaf))
        .chain(
            upper_far
                .into_iter()
                .map(|(at, leaf)| (upper_at + at, leaf)),
        )
        .collect();
    (code, far)
}

#[cfg(test)]
pub(crate) mod interp {
    //! A classic BPF interpreter for what filters use, to compare programs' answers.
    use super::*;

    /// `struct seccomp_data`.
    #[derive(Clone, Copy)]
    pub struct Data {
        pub nr: u32,
        pub arch: u32,
        pub args: [u64; 6],
    }

    impl Data {
        fn word(&self, off: u32) -> u32 {
            match off {
                0 => self.nr,
                4 => self.arch,
                16..=63 if off.is_multiple_of(4) => {
                    let a = self.args[(off as usize - 16) / 8];
                    if off.is_multiple_of(8) {
                        a as u32
                    } else {
                        (a >> 32) as u32
                    }
                }
                _ => panic!("load at {off}"),
            }
        }
    }

    /// The program's answer for `d`.
    pub fn run(p: &[sock_filter], d: &Data) -> u32 {
        trace(p, d).0
    }

    /// The program's answer for `d`, and the instructions run before the first load of an
    /// argument (or the answer).
    pub fn trace(p: &[sock_filter], d: &Data) -> (u32, usize) {
        let (mut a, mut pc) = (0u32, 0usize);
        let mut before_args = None;
        let mut steps = 0;
        loop {
            let i = &p[pc];
            pc += 1;
            if i.code == 0x20 && i.k >= 16 && before_args.is_none() {
                before_args = Some(steps);
            }
            steps += 1;
            match i.code {
                0x20 => a = d.word(i.k),
                0x54 => a &= i.k,
                0x06 => return (i.k, before_args.unwrap_or(steps)),
                0x05 => pc += i.k as usize,
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let t = match i.code {
                        0x15 => a == i.k,
                        0x25 => a > i.k,
                        0x35 => a >= i.k,
                        _ => a & i.k != 0,
                    };
                    pc += usize::from(if t { i.jt } else { i.jf });
                }
                c => panic!("instruction {c:#x}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::interp::{run, Data};
    use super::*;
    use crate::{Action, ThreadKind};

    const X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    const KILL: u32 = 0x8000_0000;
    const ALLOW: u32 = 0x7fff_0000;
    const ENOSYS: u32 = 0x0005_0000 | libc::ENOSYS as u32;

    /// The kernel's precedence among stacked filters' answers: the lowest action wins.
    fn strictest(a: u32, b: u32) -> u32 {
        let rank = |r: u32| match r & 0xffff_0000 {
            0x8000_0000 => 0,
            0 => 1,
            0x0003_0000 => 2,
            0x0005_0000 => 3,
            0x7ffc_0000 => 6,
            _ => 7,
        };
        if rank(a) <= rank(b) {
            a
        } else {
            b
        }
    }

    /// Every argument value the program compares with, and its neighbours, in both halves.
    fn values(p: &[sock_filter]) -> Vec<u64> {
        let mut v = vec![0, u64::MAX, 1 << 32];
        for i in p {
            let k = u64::from(i.k);
            v.extend([k, k.wrapping_sub(1), k + 1, k << 32, (k << 32) | k, !k]);
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The new layout answers every syscall and argument exactly as seccompiler's chain with
    /// the `clone3` filter stacked on it did.
    #[test]
    fn searched_programs_answer_as_the_stacked_chains() {
        let clone3 = crate::clone3_enosys().unwrap();
        for kind in ThreadKind::all() {
            for action in [Action::Kill, Action::Log] {
                let chain: BpfProgram = crate::filter(kind, action, std::process::id())
                    .unwrap()
                    .try_into()
                    .unwrap();
                let searched = &crate::compile(kind, action, std::process::id()).unwrap();
                let vals = values(&chain);
                let checked_args = crate::rules::rules(kind, std::process::id()).unwrap();
                let mut checked = 0u64;
                for nr in 0..480u32 {
                    let mut probe = |d: Data| {
                        let want = strictest(run(&clone3, &d), run(&chain, &d));
                        assert_eq!(run(searched, &d), want, "{kind:?} nr {nr} {:x?}", d.args);
                        checked += 1;
                    };
                    let base = Data {
                        nr,
                        arch: X86_64,
                        args: [0; 6],
                    };
                    probe(base);
                    // Another architecture is refused before anything.
                    probe(Data { arch: 3, ..base });
                    if checked_args.get(&i64::from(nr)).is_none_or(Vec::is_empty) {
                        continue;
                    }
                    for arg in 0..6 {
                        for &v in &vals {
                            let mut d = base;
                            d.args[arg] = v;
                            probe(d);
                        }
                    }
                }
                assert!(checked > 10_000, "{checked}");
            }
        }
    }

    #[test]
    fn any_syscall_is_answered_in_a_few_instructions() {
        for kind in ThreadKind::all() {
            let p = &crate::compile(kind, Action::Kill, std::process::id()).unwrap();
            // Instructions run to an answer or to the syscall's own argument checks.
            let worst = (0..480u32)
                .map(|nr| {
                    let d = Data {
                        nr,
                        arch: X86_64,
                        args: [0; 6],
                    };
                    super::interp::trace(p, &d).1
                })
                .max()
                .unwrap();
            let chain: BpfProgram = crate::filter(kind, Action::Kill, std::process::id())
                .unwrap()
                .try_into()
                .unwrap();
            assert!(worst <= 16, "{kind:?}: {worst} steps");
            // Shorter than the chain too: the kernel compiles the whole program when a thread
            // installs it.
            assert!(
                p.len() * 10 <= chain.len() * 7,
                "{kind:?}: {} instructions, the chain {}",
                p.len(),
                chain.len()
            );
        }
        // The vCPU's KVM_RUN, the call of every exit, is allowed.
        let vcpu = &crate::compile(ThreadKind::Vcpu, Action::Kill, std::process::id()).unwrap();
        let mut d = Data {
            nr: libc::SYS_ioctl as u32,
            arch: X86_64,
            args: [0; 6],
        };
        d.args[1] = 0xae80;
        assert_eq!(run(vcpu, &d), ALLOW);
        d.args[1] = 0x5401; // TCGETS
        assert_eq!(run(vcpu, &d), KILL);
        d.nr = libc::SYS_clone3 as u32;
        assert_eq!(run(vcpu, &d), ENOSYS);
    }

    #[test]
    fn a_negative_syscall_number_is_refused() {
        let rules: Rules = [(-1i64, Vec::new())].into_iter().collect();
        let e = program(
            rules,
            &[],
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .unwrap_err();
        assert!(matches!(e, Error::SyscallNumber(-1)), "{e}");
    }
}
