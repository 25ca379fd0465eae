//! MSI-X: the capability's message control, the vector table and the pending bit array
//! (PCI Local Bus 3.0, section 6.8.2), independent of how the VMM delivers messages.
//!
//! The VMM supplies an [`MsiController`]. [`MsiController::update`] tells it, only when it
//! changes, whether a vector can be delivered and with which message (the VMM maps it to a
//! KVM GSI route); [`MsiController::trigger`] delivers one (the VMM writes the vector's
//! irqfd, or signals the message directly). A trigger of a masked vector (vector or function
//! mask) sets its pending bit instead, and the message goes out when the vector is unmasked.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Size of one vector table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// The most vectors a function can have.
pub const MSIX_MAX_VECTORS: u16 = 2048;

/// Message control: MSI-X enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: every vector masked.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: this vector masked.
const VECTOR_MASKED: u32 = 1;

/// What a vector sends: a write of `data` at `address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// How a VMM delivers MSI-X messages (the PCI code never talks to KVM).
///
/// Both methods are called with the function's MSI-X state locked, so calls for one function
/// are serialized and ordered; they must not call back into the same [`Msix`].
pub trait MsiController: Send + Sync {
    /// Vector `vector` became deliverable with `msg` (`Some`), or stopped being deliverable
    /// (`None`: masked, function-masked or MSI-X disabled). Called only on a change. A KVM VMM
    /// points the vector's GSI route at `msg` here (and may drop it on `None`).
    fn update(&self, vector: u16, msg: Option<MsiMessage>);

    /// Deliver `vector`, which is deliverable with `msg` (the last message given to
    /// [`MsiController::update`]).
    fn trigger(&self, vector: u16, msg: MsiMessage) -> io::Result<()>;
}

/// Why an MSI-X function could not be built (a VMM bug, never guest input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsixError {
    #[error("an MSI-X function has 1 to 2048 vectors, not {0}")]
    VectorCount(u16),
    #[error("MSI-X table or PBA offset {0:#x} is not 8-byte aligned")]
    Alignment(u32),
    #[error("MSI-X BAR index {0} is not 0 to 5")]
    Bar(u8),
}

/// The MSI-X state of a function, for a snapshot: each vector's table entry
/// (address low, address high, data, vector control), the pending bits, and the enable and
/// function mask bits of message control.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    pub table: Vec<[u32; 4]>,
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// Why a saved MSI-X state does not fit this function.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsixStateError {
    #[error("the saved MSI-X state has {saved} vectors, the function has {actual}")]
    Vectors { saved: usize, actual: usize },
    #[error("the saved MSI-X pending bit array has {saved} words instead of {actual}")]
    Pending { saved: usize, actual: usize },
}

/// Where the table or the PBA lives: a BAR and an offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLocation {
    pub bar: u8,
    pub offset: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.addr_lo.to_le_bytes());
        b[4..8].copy_from_slice(&self.addr_hi.to_le_bytes());
        b[8..12].copy_from_slice(&self.data.to_le_bytes());
        b[12..16].copy_from_slice(&self.control.to_le_bytes());
        b
    }

    fn from_bytes(b: [u8; 16]) -> Self {
        let dw = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Entry {
            addr_lo: dw(0),
            addr_hi: dw(4),
            data: dw(8),
            // Bits other than the mask bit are reserved.
            control: dw(12) & VECTOR_MASKED,
        }
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

struct Inner {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// What the controller was last told, per vector.
    routed: Vec<Option<MsiMessage>>,
    controller: Arc<dyn MsiController>,
}

impl Inner {
    fn is_pending(&self, v: usize) -> bool {
        self.pending[v / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if on {
            self.pending[v / 64] |= 1 << (v % 64);
        } else {
            self.pending[v / 64] &= !(1 << (v % 64));
        }
    }

    /// Tells the controller about a change in vector `v`'s deliverability and sends its
    /// pending message if it can go now.
    fn sync(&mut self, v: usize) {
        let e = self.entries[v];
        let want = (self.enabled && !self.function_masked && e.control & VECTOR_MASKED == 0)
            .then(|| e.message());
        if self.routed[v] != want {
            self.routed[v] = want;
            self.controller.update(v as u16, want);
        }
        if let Some(msg) = want {
            if self.is_pending(v) {
                self.set_pending(v, false);
                if let Err(e) = self.controller.trigger(v as u16, msg) {
                    log::warn!("msix: cannot deliver pending vector {v}: {e}");
                }
            }
        }
    }
}

/// The MSI-X state of one function. Cheap to clone: clones share the state (the config space,
/// the BAR and the device's interrupt path each hold one).
#[derive(Clone)]
pub struct Msix {
    state: Arc<Mutex<Inner>>,
    vectors: u16,
    table: MsixLocation,
    pba: MsixLocation,
}

impl Msix {
    /// `vectors` vectors, all masked and MSI-X disabled (the reset state), with the table and
    /// PBA at `table` and `pba`.
    pub fn new(
        vectors: u16,
        table: MsixLocation,
        pba: MsixLocation,
        controller: Arc<dyn MsiController>,
    ) -> Result<Self, MsixError> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(MsixError::VectorCount(vectors));
        }
        for loc in [table, pba] {
            if !loc.offset.is_multiple_of(8) {
                return Err(MsixError::Alignment(loc.offset));
            }
            if loc.bar > 5 {
                return Err(MsixError::Bar(loc.bar));
            }
        }
        let n = usize::from(vectors);
        let state = Inner {
            entries: vec![
                Entry {
                    addr_lo: 0,
                    addr_hi: 0,
                    data: 0,
                    control: VECTOR_MASKED,
                };
                n
            ],
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            routed: vec![None; n],
            controller,
        };
        Ok(Msix {
            state: Arc::new(Mutex::new(state)),
            vectors,
            table,
            pba,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn num_vectors(&self) -> u16 {
        self.vectors
    }

    pub fn table(&self) -> MsixLocation {
        self.table
    }

    pub fn pba(&self) -> MsixLocation {
        self.pba
    }

    /// Length of the vector table in bytes.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }

    /// Length of the pending bit array in bytes (whole qwords).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }

    /// The capability's bytes after its id and next pointer: message control (table size,
    /// reset state), table offset/BIR, PBA offset/BIR.
    pub fn capability_body(&self) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[0..2].copy_from_slice(&(self.vectors - 1).to_le_bytes());
        b[2..6].copy_from_slice(&(self.table.offset | u32::from(self.table.bar)).to_le_bytes());
        b[6..10].copy_from_slice(&(self.pba.offset | u32::from(self.pba.bar)).to_le_bytes());
        b
    }

    /// The guest wrote message control (only enable and function mask matter).
    pub fn set_message_control(&self, control: u16) {
        let mut s = self.lock();
        let enabled = control & CONTROL_ENABLE != 0;
        let masked = control & CONTROL_FUNCTION_MASK != 0;
        if s.enabled == enabled && s.function_masked == masked {
            return;
        }
        s.enabled = enabled;
        s.function_masked = masked;
        for v in 0..s.entries.len() {
            s.sync(v);
        }
    }

    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    pub fn function_masked(&self) -> bool {
        self.lock().function_masked
    }

    /// Whether vector `v` is masked by its own mask bit (false for a vector that does not
    /// exist).
    pub fn vector_masked(&self, v: u16) -> bool {
        self.lock()
            .entries
            .get(usize::from(v))
            .is_some_and(|e| e.control & VECTOR_MASKED != 0)
    }

    pub fn pending(&self, v: u16) -> bool {
        let s = self.lock();
        usize::from(v) < s.entries.len() && s.is_pending(usize::from(v))
    }

    /// Reads the vector table at `offset` (any width; bytes outside the table read zero).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        let mut cached: Option<(usize, [u8; 16])> = None;
        for (i, b) in data.iter_mut().enumerate() {
            let Some(off) = offset.checked_add(i as u64) else {
                *b = 0;
                continue;
            };
            let v = usize::try_from(off / MSIX_ENTRY_SIZE).unwrap_or(usize::MAX);
            *b = match s.entries.get(v) {
                Some(e) => {
                    let bytes = match cached {
                        Some((cv, bytes)) if cv == v => bytes,
                        _ => {
                            let bytes = e.to_bytes();
                            cached = Some((v, bytes));
                            bytes
                        }
                    };
                    bytes[(off % MSIX_ENTRY_SIZE) as usize]
                }
                None => 0,
            };
        }
    }

    /// Writes the vector table at `offset` (any width; bytes outside the table are dropped).
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        let mut i = 0;
        while i < data.len() {
            let Some(off) = offset.checked_add(i as u64) else {
                return;
            };
            let v = usize::try_from(off / MSIX_ENTRY_SIZE).unwrap_or(usize::MAX);
            let Some(entry) = s.entries.get(v) else {
                return;
            };
            let mut bytes = entry.to_bytes();
            // Patch every byte of this entry the access covers, then apply once.
            let mut o = (off % MSIX_ENTRY_SIZE) as usize;
            while o < 16 && i < data.len() {
                bytes[o] = data[i];
                o += 1;
                i += 1;
            }
            s.entries[v] = Entry::from_bytes(bytes);
            s.sync(v);
        }
    }

    /// Reads the pending bit array at `offset` (any width; bytes outside read zero).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| s.pending.get(o / 8).map(|q| q.to_le_bytes()[o % 8]))
                .unwrap_or(0);
        }
    }

    /// Writes to the PBA are ignored (it is read-only).
    pub fn write_pba(&self, offset: u64, data: &[u8]) {
        log::debug!(
            "msix: write of {} bytes to the PBA at {offset:#x}",
            data.len()
        );
    }

    /// The table, pending bits and control bits, for a snapshot.
    pub fn save_state(&self) -> MsixState {
        let s = self.lock();
        MsixState {
            table: s
                .entries
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
                .collect(),
            pending: s.pending.clone(),
            enabled: s.enabled,
            function_masked: s.function_masked,
        }
    }

    /// Puts back a saved state (of a function with as many vectors). Every vector that is
    /// deliverable is announced to the [`MsiController`] (so a fresh VMM re-creates its
    /// routes), and pending vectors that are deliverable go out. Nothing changes when the
    /// state does not fit.
    pub fn restore_state(&self, state: &MsixState) -> Result<(), MsixStateError> {
        let mut s = self.lock();
        if state.table.len() != s.entries.len() {
            return Err(MsixStateError::Vectors {
                saved: state.table.len(),
                actual: s.entries.len(),
            });
        }
        if state.pending.len() != s.pending.len() {
            return Err(MsixStateError::Pending {
                saved: state.pending.len(),
                actual: s.pending.len(),
            });
        }
        for (e, t) in s.entries.iter_mut().zip(&state.table) {
            *e = Entry {
                addr_lo: t[0],
                addr_hi: t[1],
                data: t[2],
                control: t[3] & VECTOR_MASKED,
            };
        }
        s.pending.copy_from_slice(&state.pending);
        // Bits past the last vector do not exist.
        let n = s.entries.len();
        if !n.is_multiple_of(64) {
            if let Some(last) = s.pending.last_mut() {
                *last &= (1u64 << (n % 64)) - 1;
            }
        }
        s.enabled = state.enabled;
        s.function_masked = state.function_masked;
        for v in 0..n {
            s.sync(v);
        }
        Ok(())
    }

    /// Raises vector `v`: delivered now if it is deliverable, left pending if it is masked,
    /// dropped if MSI-X is disabled. Fails only for a vector the function does not have.
    pub fn trigger(&self, v: u16) -> io::Result<()> {
        let mut s = self.lock();
        let i = usize::from(v);
        if i >= s.entries.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("msix: no vector {v}"),
            ));
        }
        match s.routed[i] {
            Some(msg) => s.controller.trigger(v, msg),
            None => {
                if s.enabled {
                    s.set_pending(i, true);
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records every call.
    #[derive(Default)]
    pub(crate) struct RecordingController {
        pub updates: Mutex<Vec<(u16, Option<MsiMessage>)>>,
        pub triggers: Mutex<Vec<(u16, MsiMessage)>>,
    }

    impl RecordingController {
        pub(crate) fn take_updates(&self) -> Vec<(u16, Option<MsiMessage>)> {
            std::mem::take(&mut self.updates.lock().unwrap())
        }
        pub(crate) fn take_triggers(&self) -> Vec<(u16, MsiMessage)> {
            std::mem::take(&mut self.triggers.lock().unwrap())
        }
    }

    impl MsiController for RecordingController {
        fn update(&self, vector: u16, msg: Option<MsiMessage>) {
            self.updates.lock().unwrap().push((vector, msg));
        }
        fn trigger(&self, vector: u16, msg: MsiMessage) -> io::Result<()> {
            self.triggers.lock().unwrap().push((vector, msg));
            Ok(())
        }
    }

    fn msix(vectors: u16) -> (Msix, Arc<RecordingController>) {
        let ctl = Arc::new(RecordingController::default());
        let m = Msix::new(
            vectors,
            MsixLocation {
                bar: 0,
                offset: 0x4000,
            },
            MsixLocation {
                bar: 2,
                offset: 0x800,
            },
            ctl.clone(),
        )
        .unwrap();
        (m, ctl)
    }

    fn program(m: &Msix, v: u16, addr: u64, data: u32) {
        let base = u64::from(v) * 16;
        m.write_table(base, &(addr as u32).to_le_bytes());
        m.write_table(base + 4, &((addr >> 32) as u32).to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
    }

    fn unmask(m: &Msix, v: u16) {
        m.write_table(u64::from(v) * 16 + 12, &0u32.to_le_bytes());
    }

    fn mask(m: &Msix, v: u16) {
        m.write_table(u64::from(v) * 16 + 12, &1u32.to_le_bytes());
    }

    const MSG: MsiMessage = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };

    #[test]
    fn capability_body_and_lengths() {
        let (m, _) = msix(3);
        assert_eq!(
            m.capability_body(),
            [2, 0, 0x00, 0x40, 0, 0, 0x02, 0x08, 0, 0]
        );
        assert_eq!(m.table_len(), 48);
        assert_eq!(m.pba_len(), 8);
        let (m, _) = msix(65);
        assert_eq!(m.pba_len(), 16);
        let ctl = Arc::new(RecordingController::default());
        let loc = MsixLocation { bar: 0, offset: 0 };
        assert_eq!(
            Msix::new(0, loc, loc, ctl.clone()).err(),
            Some(MsixError::VectorCount(0))
        );
        assert_eq!(
            Msix::new(2049, loc, loc, ctl.clone()).err(),
            Some(MsixError::VectorCount(2049))
        );
        let odd = MsixLocation { bar: 0, offset: 4 };
        assert_eq!(
            Msix::new(1, odd, loc, ctl.clone()).err(),
            Some(MsixError::Alignment(4))
        );
        let bad = MsixLocation { bar: 6, offset: 0 };
        assert_eq!(Msix::new(1, loc, bad, ctl).err(), Some(MsixError::Bar(6)));
    }

    #[test]
    fn table_reads_back_any_width() {
        let (m, _) = msix(2);
        // Reset state: every vector masked.
        let mut d = [0u8; 16];
        m.read_table(16, &mut d);
        assert_eq!(d, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        program(&m, 1, 0x1_fee0_1000, 0x4021);
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
        // A qword write of address, and odd reads spanning entries.
        m.write_table(0, &0xfee0_2000u64.to_le_bytes());
        let mut b = [0u8; 3];
        m.read_table(14, &mut b);
        assert_eq!(b, [0, 0, 0x00], "control high bytes, then entry 1 byte 0");
        let mut b = [0u8; 2];
        m.read_table(1, &mut b);
        assert_eq!(b, [0x20, 0xe0]);
        // Reserved control bits do not stick.
        m.write_table(12, &0xffff_fffeu32.to_le_bytes());
        let mut c = [0u8; 4];
        m.read_table(12, &mut c);
        assert_eq!(u32::from_le_bytes(c), 0);
        // Outside the table: zero, and writes are dropped.
        let mut d = [0x55u8; 8];
        m.read_table(32, &mut d);
        assert_eq!(d, [0; 8]);
        m.write_table(30, &[0xff; 8]);
        m.read_table(u64::MAX - 3, &mut d);
        m.write_table(u64::MAX - 3, &[1; 8]);
    }

    #[test]
    fn updates_follow_enable_and_masks() {
        let (m, ctl) = msix(2);
        program(&m, 0, MSG.address, MSG.data);
        // Unmasking while MSI-X is disabled is not deliverable yet.
        unmask(&m, 0);
        assert!(ctl.take_updates().is_empty());
        m.set_message_control(CONTROL_ENABLE);
        assert_eq!(ctl.take_updates(), vec![(0, Some(MSG))]);
        assert!(m.enabled());
        // Changing the message of a live vector updates the route.
        program(&m, 0, MSG.address, 0x42);
        let updates = ctl.take_updates();
        assert_eq!(
            updates.last(),
            Some(&(
                0,
                Some(MsiMessage {
                    address: MSG.address,
                    data: 0x42
                })
            ))
        );
        // Function mask withdraws it, unmasking restores it.
        m.set_message_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(m.function_masked());
        assert_eq!(ctl.take_updates(), vec![(0, None)]);
        m.set_message_control(CONTROL_ENABLE);
        assert_eq!(ctl.take_updates().len(), 1);
        // The same control again changes nothing.
        m.set_message_control(CONTROL_ENABLE);
        assert!(ctl.take_updates().is_empty());
        mask(&m, 0);
        assert!(m.vector_masked(0));
        assert_eq!(ctl.take_updates(), vec![(0, None)]);
        m.set_message_control(0);
        assert!(ctl.take_updates().is_empty(), "already undeliverable");
    }

    #[test]
    fn masked_triggers_pend_and_fire_on_unmask() {
        let (m, ctl) = msix(70);
        program(&m, 65, MSG.address, MSG.data);
        m.set_message_control(CONTROL_ENABLE);
        // Vector 65 is masked: the trigger sets its pending bit.
        m.trigger(65).unwrap();
        assert!(ctl.take_triggers().is_empty());
        assert!(m.pending(65));
        let mut pba = [0u8; 16];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba[8..].try_into().unwrap()), 1 << 1);
        // The PBA is read-only.
        m.write_pba(8, &[0; 8]);
        assert!(m.pending(65));
        // Unmask: the route is set up first, then the pending message goes out.
        ctl.take_updates();
        unmask(&m, 65);
        assert_eq!(ctl.take_updates(), vec![(65, Some(MSG))]);
        assert_eq!(ctl.take_triggers(), vec![(65, MSG)]);
        assert!(!m.pending(65));
        // Now it is delivered at once.
        m.trigger(65).unwrap();
        assert_eq!(ctl.take_triggers(), vec![(65, MSG)]);
        // Function mask pends too, and unmasking the function delivers.
        m.set_message_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.trigger(65).unwrap();
        m.trigger(65).unwrap();
        assert!(ctl.take_triggers().is_empty());
        m.set_message_control(CONTROL_ENABLE);
        assert_eq!(ctl.take_triggers(), vec![(65, MSG)], "pending is one bit");
        // Disabled MSI-X drops the trigger without pending it.
        m.set_message_control(0);
        m.trigger(65).unwrap();
        assert!(!m.pending(65));
        m.set_message_control(CONTROL_ENABLE);
        assert!(ctl.take_triggers().is_empty());
        // A vector the function lacks is an error, not a panic.
        assert!(m.trigger(70).is_err());
        assert!(!m.pending(70));
        assert!(!m.vector_masked(70));
    }

    #[test]
    fn state_restores_routes_and_pending_vectors() {
        let (m, _) = msix(70);
        program(&m, 0, MSG.address, MSG.data);
        unmask(&m, 0);
        program(&m, 65, MSG.address, 0x42);
        m.set_message_control(CONTROL_ENABLE);
        // Vector 65 stays masked with a pending trigger.
        m.trigger(65).unwrap();
        let state = m.save_state();
        let json = serde_json::to_string(&state).unwrap();
        let state: MsixState = serde_json::from_str(&json).unwrap();

        let (fresh, ctl) = msix(70);
        fresh.restore_state(&state).unwrap();
        // The live vector is routed again; the masked one keeps its pending bit.
        assert_eq!(ctl.take_updates(), vec![(0, Some(MSG))]);
        assert!(ctl.take_triggers().is_empty());
        assert!(fresh.enabled());
        assert!(fresh.pending(65));
        assert!(fresh.vector_masked(65));
        let mut e = [0u8; 16];
        fresh.read_table(65 * 16, &mut e);
        let mut want = [0u8; 16];
        m.read_table(65 * 16, &mut want);
        assert_eq!(e, want);
        unmask(&fresh, 65);
        let msg65 = MsiMessage {
            address: MSG.address,
            data: 0x42,
        };
        assert_eq!(ctl.take_triggers(), vec![(65, msg65)]);

        // A state of another size is refused and changes nothing.
        let (small, ctl) = msix(3);
        assert_eq!(
            small.restore_state(&state),
            Err(MsixStateError::Vectors {
                saved: 70,
                actual: 3
            })
        );
        assert!(ctl.take_updates().is_empty());
        assert!(!small.enabled());
    }
}
