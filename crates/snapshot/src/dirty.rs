//! Dirty-page bitmaps over guest memory: one bit per 4 KiB page, region by region, in the
//! layout KVM's `KVM_GET_DIRTY_LOG` returns (bit `i` of word `w` is page `64 * w + i` of the
//! memory slot).

use serde::{Deserialize, Serialize};

/// The page size dirty tracking works in.
pub const PAGE_SIZE: u64 = 4096;

/// One guest memory region: where it starts in the guest and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemRegion {
    pub gpa: u64,
    pub size: u64,
}

impl MemRegion {
    pub fn pages(&self) -> u64 {
        self.size.div_ceil(PAGE_SIZE)
    }
}

/// A set of dirty pages over a list of regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    regions: Vec<MemRegion>,
    bits: Vec<Vec<u64>>,
}

/// Clears the bits of a region's last word that lie past its last page (`pages` pages).
fn clear_past_last_page(bits: &mut [u64], pages: u64) {
    if !pages.is_multiple_of(64) {
        if let Some(last) = bits.last_mut() {
            *last &= (1u64 << (pages % 64)) - 1;
        }
    }
}

impl DirtyBitmap {
    /// An empty (all clean) bitmap over `regions`.
    pub fn new(regions: &[MemRegion]) -> Self {
        DirtyBitmap {
            regions: regions.to_vec(),
            bits: regions
                .iter()
                .map(|r| vec![0u64; r.pages().div_ceil(64) as usize])
                .collect(),
        }
    }

    /// A bitmap made of each region's words as KVM's dirty log returns them (one vector
    /// per region, taken over without a copy: a large VM's log is hundreds of KiB). Missing
    /// words are clean; extra words and bits past a region's last page are dropped.
    pub fn from_words(regions: &[MemRegion], mut words: Vec<Vec<u64>>) -> Self {
        words.resize_with(regions.len(), Vec::new);
        words.truncate(regions.len());
        for (r, bits) in regions.iter().zip(words.iter_mut()) {
            let pages = r.pages();
            bits.resize(pages.div_ceil(64) as usize, 0);
            clear_past_last_page(bits, pages);
        }
        DirtyBitmap {
            regions: regions.to_vec(),
            bits: words,
        }
    }

    /// A bitmap with every page dirty.
    pub fn all(regions: &[MemRegion]) -> Self {
        let mut b = Self::new(regions);
        for r in regions {
            b.mark(r.gpa, r.size);
        }
        b
    }

    pub fn regions(&self) -> &[MemRegion] {
        &self.regions
    }

    /// ORs in a region's words as KVM's dirty log returns them (extra words are ignored).
    pub fn merge_words(&mut self, region: usize, words: &[u64]) {
        let Some(pages) = self.regions.get(region).map(MemRegion::pages) else {
            return;
        };
        let bits = &mut self.bits[region];
        // Clean words are not written: a fresh bitmap's untouched pages stay unallocated.
        for (b, w) in bits.iter_mut().zip(words) {
            if *w != 0 {
                *b |= w;
            }
        }
        clear_past_last_page(bits, pages);
    }

    /// Marks page `page` of region `region` (nothing past the region).
    pub fn set_page(&mut self, region: usize, page: u64) {
        let Some(r) = self.regions.get(region) else {
            return;
        };
        if page < r.pages() {
            self.bits[region][(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// ORs in another bitmap over the same regions.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (i, words) in other.bits.iter().enumerate() {
            self.merge_words(i, words);
        }
    }

    /// Keeps only the pages also set in `other` (over the same regions).
    pub fn intersect(&mut self, other: &DirtyBitmap) {
        for (mine, theirs) in self.bits.iter_mut().zip(&other.bits) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a &= b;
            }
        }
    }

    /// Marks every page that `[gpa, gpa + len)` touches. Addresses outside the regions are
    /// ignored.
    pub fn mark(&mut self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = gpa.saturating_add(len);
        for (r, bits) in self.regions.iter().zip(self.bits.iter_mut()) {
            let r_end = r.gpa + r.size;
            let (s, e) = (gpa.max(r.gpa), end.min(r_end));
            if s >= e {
                continue;
            }
            let first = (s - r.gpa) / PAGE_SIZE;
            let last = (e - 1 - r.gpa) / PAGE_SIZE;
            for p in first..=last {
                bits[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
    }

    /// Whether the page holding `gpa` is dirty.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        self.regions
            .iter()
            .zip(&self.bits)
            .find(|(r, _)| gpa >= r.gpa && gpa < r.gpa + r.size)
            .is_some_and(|(r, bits)| {
                let p = (gpa - r.gpa) / PAGE_SIZE;
                bits[(p / 64) as usize] & (1 << (p % 64)) != 0
            })
    }

    /// The number of dirty pages.
    pub fn count(&self) -> u64 {
        self.bits
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Runs of consecutive dirty pages in region `region`, as (first page, page count).
    pub fn runs(&self, region: usize) -> Vec<(u64, u64)> {
        let Some(bits) = self.bits.get(region) else {
            return Vec::new();
        };
        let pages = self.regions[region].pages();
        let mut out = Vec::new();
        let mut start: Option<u64> = None;
        for p in 0..pages {
            let dirty = bits[(p / 64) as usize] & (1 << (p % 64)) != 0;
            match (dirty, start) {
                (true, None) => start = Some(p),
                (false, Some(s)) => {
                    out.push((s, p - s));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push((s, pages - s));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Vec<MemRegion> {
        vec![
            MemRegion {
                gpa: 0,
                size: 64 * PAGE_SIZE + 100,
            },
            MemRegion {
                gpa: 1 << 32,
                size: 8 * PAGE_SIZE,
            },
        ]
    }

    #[test]
    fn marks_and_runs() {
        let mut b = DirtyBitmap::new(&regions());
        assert_eq!(b.count(), 0);
        b.mark(PAGE_SIZE - 1, 2); // pages 0 and 1
        b.mark(10 * PAGE_SIZE, 1);
        b.mark(64 * PAGE_SIZE, 1); // the partial page 64
        b.mark((1 << 32) + 7 * PAGE_SIZE, 1 << 20); // clipped to page 7
        b.mark(1 << 40, 4096); // outside: ignored
        assert_eq!(b.count(), 5);
        assert_eq!(b.runs(0), [(0, 2), (10, 1), (64, 1)]);
        assert_eq!(b.runs(1), [(7, 1)]);
        assert!(b.is_dirty(10 * PAGE_SIZE + 5));
        assert!(!b.is_dirty(11 * PAGE_SIZE));
        assert!(b.runs(9).is_empty());
    }

    #[test]
    fn kvm_words_merge() {
        let mut b = DirtyBitmap::new(&regions());
        b.merge_words(0, &[0b1010, 0b110, 99]);
        assert_eq!(b.runs(0), [(1, 1), (3, 1)]);
        assert_eq!(b.count(), 2, "bits past the region are dropped");
        let all = DirtyBitmap::all(&regions());
        assert_eq!(all.count(), 65 + 8);
        let mut only = all.clone();
        only.intersect(&b);
        assert_eq!(only, b);
        b.merge(&all);
        assert_eq!(b, all);
    }

    #[test]
    fn kvm_words_become_a_bitmap_as_merged_into_a_clean_one() {
        let logs = vec![vec![0b1010, 0b110, 99], vec![u64::MAX]];
        let mut merged = DirtyBitmap::new(&regions());
        for (i, w) in logs.iter().enumerate() {
            merged.merge_words(i, w);
        }
        let taken = DirtyBitmap::from_words(&regions(), logs);
        assert_eq!(taken, merged);
        let mut set = DirtyBitmap::new(&regions());
        for (region, page) in [(0, 1), (0, 3), (0, 65), (1, 0), (1, 7), (1, 8), (2, 0)] {
            set.set_page(region, page);
        }
        assert_eq!(set.runs(0), [(1, 1), (3, 1)], "page 65 is past the region");
        assert_eq!(set.runs(1), [(0, 1), (7, 1)]);
        assert_eq!(
            taken.runs(1),
            [(0, 8)],
            "bits past the last page are dropped"
        );
        // A missing region's log is clean; an extra one is ignored.
        let short = DirtyBitmap::from_words(&regions(), vec![vec![1]]);
        assert_eq!((short.count(), short.runs(0)), (1, vec![(0, 1)]));
        let long = DirtyBitmap::from_words(&regions(), vec![vec![], vec![], vec![1]]);
        assert_eq!(long, DirtyBitmap::new(&regions()));
    }
}
