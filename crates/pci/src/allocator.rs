//! Guest address ranges for BARs, assigned by the VMM when it creates a device (as firmware
//! would), inside the windows the host bridge's ACPI `_CRS` describes.
//!
//! A thin layer over `vm_allocator::AddressAllocator` (its interval tree handles alignment
//! and freeing) that knows BARs: natural alignment, 64-bit BARs preferring the window above
//! 4 GiB, and exact reservations when the guest moves a BAR.

use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::config::{BarKind, BarSpec};

/// BARs never share a page: ioeventfds and mappings work per page.
const MIN_ALIGN: u64 = 0x1000;

/// Why a range could not be allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("invalid PCI window: {0}")]
    Window(vm_allocator::Error),
    #[error("no room for a BAR of {size:#x} bytes")]
    NoSpace { size: u64 },
    #[error("range {base:#x}+{size:#x} is not free")]
    NotFree { base: u64, size: u64 },
    #[error("range {base:#x}+{size:#x} was not allocated")]
    NotAllocated { base: u64, size: u64 },
}

/// Allocates BAR ranges from a 32-bit window (below 4 GiB) and an optional 64-bit window.
#[derive(Debug, Clone)]
pub struct BarAllocator {
    mem32: AddressAllocator,
    mem64: Option<AddressAllocator>,
}

fn span(size: u64) -> u64 {
    size.max(MIN_ALIGN)
}

impl BarAllocator {
    /// `mem32` and `mem64` are `(base, length)` windows.
    pub fn new(mem32: (u64, u64), mem64: Option<(u64, u64)>) -> Result<Self, AllocError> {
        Ok(BarAllocator {
            mem32: AddressAllocator::new(mem32.0, mem32.1).map_err(AllocError::Window)?,
            mem64: mem64
                .map(|(b, l)| AddressAllocator::new(b, l))
                .transpose()
                .map_err(AllocError::Window)?,
        })
    }

    /// A base for a BAR like `spec`, aligned to its size (and at least a page). 64-bit BARs go
    /// above 4 GiB when that window exists and has room, else below.
    pub fn allocate(&mut self, spec: BarSpec) -> Result<u64, AllocError> {
        let size = span(spec.size);
        let none = AllocError::NoSpace { size: spec.size };
        if !spec.size.is_power_of_two() {
            return Err(none);
        }
        if spec.kind == BarKind::Memory64 {
            if let Some(a) = &mut self.mem64 {
                if let Ok(r) = a.allocate(size, size, AllocPolicy::FirstMatch) {
                    return Ok(r.start());
                }
            }
        }
        let r = self
            .mem32
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map_err(|_| none)?;
        Ok(r.start())
    }

    fn window_for(&mut self, base: u64) -> &mut AddressAllocator {
        match &mut self.mem64 {
            Some(a) if (a.base()..=a.end()).contains(&base) => a,
            _ => &mut self.mem32,
        }
    }

    /// Takes exactly `base..base + size` (where the guest moved a BAR to).
    pub fn reserve(&mut self, base: u64, size: u64) -> Result<(), AllocError> {
        let err = AllocError::NotFree { base, size };
        let span = span(size);
        if !base.is_multiple_of(span) {
            return Err(err);
        }
        self.window_for(base)
            .allocate(span, span, AllocPolicy::ExactMatch(base))
            .map(|_| ())
            .map_err(|_| err)
    }

    /// Gives back a range [`BarAllocator::allocate`] or [`BarAllocator::reserve`] returned.
    pub fn free(&mut self, base: u64, size: u64) -> Result<(), AllocError> {
        let err = AllocError::NotAllocated { base, size };
        let end = base.checked_add(span(size) - 1).ok_or(err.clone())?;
        let range = RangeInclusive::new(base, end).map_err(|_| err.clone())?;
        self.window_for(base).free(&range).map_err(|_| err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: u64, kind: BarKind) -> BarSpec {
        BarSpec {
            size,
            kind,
            prefetchable: false,
        }
    }

    #[test]
    fn natural_alignment_and_windows() {
        let mut a =
            BarAllocator::new((0xe000_0000, 0x1000_0000), Some((1 << 40, 1 << 32))).unwrap();
        let small = a.allocate(spec(0x100, BarKind::Memory32)).unwrap();
        assert_eq!(small, 0xe000_0000);
        let big = a.allocate(spec(0x10_0000, BarKind::Memory32)).unwrap();
        assert_eq!(big % 0x10_0000, 0);
        assert!(big >= small + 0x1000, "BARs do not share a page");
        let wide = a.allocate(spec(0x8000, BarKind::Memory64)).unwrap();
        assert_eq!(wide, 1 << 40);
        assert_eq!(
            a.allocate(spec(0x1800, BarKind::Memory32)),
            Err(AllocError::NoSpace { size: 0x1800 })
        );
    }

    #[test]
    fn wide_bars_fall_back_below_4g() {
        let mut a = BarAllocator::new((0xe000_0000, 0x10_0000), None).unwrap();
        let b = a.allocate(spec(0x8000, BarKind::Memory64)).unwrap();
        assert!((0xe000_0000..0xe010_0000).contains(&b));
        // The window fills up.
        for _ in 0..31 {
            a.allocate(spec(0x8000, BarKind::Memory32)).unwrap();
        }
        assert!(a.allocate(spec(0x8000, BarKind::Memory32)).is_err());
    }

    #[test]
    fn reserve_and_free() {
        let mut a = BarAllocator::new((0xe000_0000, 0x10_0000), Some((1 << 40, 1 << 30))).unwrap();
        let b = a.allocate(spec(0x4000, BarKind::Memory64)).unwrap();
        // The guest moves it: reserve the new place, free the old one.
        a.reserve(0xe008_0000, 0x4000).unwrap();
        assert_eq!(
            a.reserve(0xe008_0000, 0x4000),
            Err(AllocError::NotFree {
                base: 0xe008_0000,
                size: 0x4000
            })
        );
        assert!(a.reserve(0xe008_1000, 0x4000).is_err(), "misaligned");
        a.free(b, 0x4000).unwrap();
        assert!(a.free(b, 0x4000).is_err());
        assert_eq!(a.allocate(spec(0x4000, BarKind::Memory64)).unwrap(), b);
        a.free(0xe008_0000, 0x4000).unwrap();
        assert!(a.free(u64::MAX, 0x4000).is_err());
        assert!(BarAllocator::new((0, 0), None).is_err());
    }
}
