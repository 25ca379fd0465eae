//! The MC146818 CMOS real-time clock.
//!
//! Insert at `vessel_memory::ports::RTC_INDEX` with length [`Rtc::PORT_LEN`] (2): offset 0 is
//! the index register (bit 7, the NMI mask, is ignored), offset 1 the data register.
//!
//! The clock reads the host's UTC time (or an injected clock) in BCD and 24-hour mode by
//! default (status B = 0x02); the guest may switch to binary and/or 12-hour mode through
//! status B. Status A reads 0x26 with update-in-progress always clear, status C reads 0 (no
//! interrupt ever pending: the device raises no interrupts), status D reads 0x80 (valid RAM).
//!
//! Writes to the time registers set the guest's clock: the device keeps an offset from the
//! host clock. While the guest holds status B's SET bit, the clock is frozen, writes change it
//! field by field, and clearing SET commits the new time (as on the real chip); without SET
//! each write takes effect at once, an impossible date being carried over (November 31st
//! becomes December 1st), so guests should hold SET as Linux does. The day-of-week register is derived from the date and
//! writes to it are ignored. All other bytes are plain CMOS RAM (128 bytes).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

const INDEX: u64 = 0;
const DATA: u64 = 1;

// Register indices.
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Status A: 32.768 kHz time base, 1024 Hz periodic rate; bit 7 (UIP) always clear.
const REG_A_DEFAULT: u8 = 0x26;
const REG_A_UIP: u8 = 0x80;
/// Status B: SET (updates frozen), DM (binary), 24/12 (24-hour mode).
const REG_B_SET: u8 = 0x80;
const REG_B_BINARY: u8 = 0x04;
const REG_B_24H: u8 = 0x02;
const REG_B_DEFAULT: u8 = REG_B_24H;
/// Status D: the RAM and time are valid (battery good).
const REG_D_VRT: u8 = 0x80;
/// The PM bit of the hours register in 12-hour mode.
const HOUR_PM: u8 = 0x80;

const SECS_PER_DAY: i64 = 86_400;

/// A source of the current time, in seconds since the Unix epoch (UTC).
pub type Clock = Box<dyn Fn() -> i64 + Send>;

/// The host's current UTC time in seconds since the epoch.
pub fn host_clock() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// A broken-down UTC date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    /// 1..=12
    month: u8,
    /// 1..=31
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1..=7, Sunday = 1 (the MC146818 convention).
    weekday: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
/// Out-of-range months and days are carried over, so any field values give *some* date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    // Normalize the month into 1..=12 first.
    let year = year + (month - 1).div_euclid(12);
    let month = (month - 1).rem_euclid(12) + 1;
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // 0..=399
    let mp = (month + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // 0..=146096
    era * 146_097 + doe - 719_468
}

/// Day of the week, 1..=7 with Sunday = 1, of a day counted from 1970-01-01 (a Thursday).
fn weekday(days: i64) -> u8 {
    ((days + 4).rem_euclid(7) + 1) as u8
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let rem = secs.rem_euclid(SECS_PER_DAY);
        // Howard Hinnant's `civil_from_days`.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097; // 0..=146096
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..=365
        let mp = (5 * doy + 2) / 153; // 0..=11, March = 0
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        DateTime {
            year,
            month: month as u8,
            day: day as u8,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            weekday: weekday(days),
        }
    }

    fn to_unix(self) -> i64 {
        days_from_civil(self.year, i64::from(self.month), i64::from(self.day)) * SECS_PER_DAY
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// Decodes BCD; invalid digits are taken at face value.
fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0f)
}

/// What a snapshot keeps of the RTC: its RAM and the guest's offset from the host clock
/// (a restored guest's clock keeps that offset from the host's time).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RtcSnapshot {
    pub index: u8,
    pub cmos: Vec<u8>,
    pub offset: i64,
    /// The time being set (Unix seconds) while status B's SET bit is held.
    pub frozen: Option<i64>,
}

/// The CMOS RTC and its 128 bytes of RAM.
pub struct Rtc {
    index: u8,
    cmos: [u8; 128],
    clock: Clock,
    /// Guest time minus clock time, in seconds.
    offset: i64,
    /// The time being set while status B's SET bit is held.
    frozen: Option<DateTime>,
}

impl Default for Rtc {
    fn default() -> Self {
        Rtc::new()
    }
}

impl Rtc {
    /// Number of ports (index and data).
    pub const PORT_LEN: u64 = 2;

    /// An RTC reading the host's UTC time.
    pub fn new() -> Self {
        Rtc::with_clock(host_clock)
    }

    /// An RTC reading `clock` (seconds since the Unix epoch, UTC).
    pub fn with_clock(clock: impl Fn() -> i64 + Send + 'static) -> Self {
        let mut cmos = [0; 128];
        cmos[usize::from(REG_A)] = REG_A_DEFAULT;
        cmos[usize::from(REG_B)] = REG_B_DEFAULT;
        cmos[usize::from(REG_D)] = REG_D_VRT;
        Rtc {
            index: 0,
            cmos,
            clock: Box::new(clock),
            offset: 0,
            frozen: None,
        }
    }

    /// The RTC's RAM and clock offset, for a snapshot.
    pub fn save_state(&self) -> RtcSnapshot {
        RtcSnapshot {
            index: self.index,
            cmos: self.cmos.to_vec(),
            offset: self.offset,
            frozen: self.frozen.map(DateTime::to_unix),
        }
    }

    /// Loads a saved state.
    pub fn restore_state(&mut self, s: &RtcSnapshot) -> Result<(), crate::SavedStateError> {
        if s.cmos.len() != self.cmos.len() {
            return Err(crate::SavedStateError::RtcCmos(s.cmos.len()));
        }
        self.index = s.index & 0x7f;
        self.cmos.copy_from_slice(&s.cmos);
        self.offset = s.offset;
        self.frozen = s.frozen.map(DateTime::from_unix);
        Ok(())
    }

    fn reg_b(&self) -> u8 {
        self.cmos[usize::from(REG_B)]
    }

    /// The guest's current time.
    fn now(&self) -> DateTime {
        match self.frozen {
            Some(t) => t,
            None => DateTime::from_unix((self.clock)().saturating_add(self.offset)),
        }
    }

    /// A value as the guest reads it: BCD unless status B selects binary.
    fn encode(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & !HOUR_PM) % 12;
        if v & HOUR_PM != 0 {
            h12 + 12
        } else {
            h12
        }
    }

    fn read_reg(&mut self, reg: u8) -> u8 {
        let t = self.now();
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode(t.year.div_euclid(100).clamp(0, 99) as u8),
            REG_A => self.cmos[usize::from(REG_A)] & !REG_A_UIP,
            // No interrupt flags are ever pending (reading would clear them).
            REG_C => 0,
            _ => self.cmos[usize::from(reg)],
        }
    }

    fn write_reg(&mut self, reg: u8, value: u8) {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR
            | REG_CENTURY => self.set_time_field(reg, value),
            // Derived from the date.
            REG_WEEKDAY => {}
            REG_A => self.cmos[usize::from(REG_A)] = value & !REG_A_UIP,
            REG_B => {
                let was_set = self.reg_b() & REG_B_SET != 0;
                let now = self.now();
                self.cmos[usize::from(REG_B)] = value;
                match (was_set, value & REG_B_SET != 0) {
                    (false, true) => self.frozen = Some(now),
                    (true, false) => {
                        if let Some(t) = self.frozen.take() {
                            self.commit(t);
                        }
                    }
                    _ => {}
                }
            }
            // Read-only.
            REG_C | REG_D => {}
            _ => self.cmos[usize::from(reg)] = value,
        }
    }

    fn set_time_field(&mut self, reg: u8, value: u8) {
        let mut t = self.now();
        match reg {
            REG_SECONDS => t.second = self.decode(value),
            REG_MINUTES => t.minute = self.decode(value),
            REG_HOURS => t.hour = self.decode_hour(value),
            REG_DAY => t.day = self.decode(value),
            REG_MONTH => t.month = self.decode(value),
            REG_YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(self.decode(value)),
            REG_CENTURY => t.year = i64::from(self.decode(value)) * 100 + t.year.rem_euclid(100),
            _ => return,
        }
        if self.frozen.is_some() {
            // Kept as written (not normalized: the guest may be half-way through setting a
            // date), with the weekday following the date.
            t.weekday = weekday(days_from_civil(t.year, t.month.into(), t.day.into()));
            self.frozen = Some(t);
        } else {
            self.commit(t);
        }
    }

    /// Make `t` the guest's current time.
    fn commit(&mut self, t: DateTime) {
        // Normalize (e.g. February 30th becomes March 2nd) so reads give a real date.
        self.offset = t.to_unix().saturating_sub((self.clock)());
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (port, byte) in (offset..).zip(data.iter_mut()) {
            *byte = match port {
                INDEX => self.index,
                DATA => self.read_reg(self.index),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (port, &value) in (offset..).zip(data) {
            match port {
                // Bit 7 masks NMIs on a PC; there is nothing to mask here.
                INDEX => self.index = value & 0x7f,
                DATA => self.write_reg(self.index, value),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    /// 2026-11-25 04:45:50 UTC, a Wednesday.
    const NOV_25_2026: i64 = 1_795_581_950;

    fn rtc_at(t: i64) -> Rtc {
        Rtc::with_clock(move || t)
    }

    /// An RTC on a clock the test can move.
    fn rtc_moving(t: i64) -> (Rtc, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(t));
        let n = now.clone();
        (Rtc::with_clock(move || n.load(Ordering::Relaxed)), now)
    }

    fn rd(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(INDEX, &[reg]);
        let mut b = [0];
        rtc.read(DATA, &mut b);
        b[0]
    }

    fn wr(rtc: &mut Rtc, reg: u8, v: u8) {
        rtc.write(INDEX, &[reg]);
        rtc.write(DATA, &[v]);
    }

    /// seconds, minutes, hours, weekday, day, month, year, century
    fn time_regs(rtc: &mut Rtc) -> [u8; 8] {
        [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|r| rd(rtc, r))
    }

    #[test]
    fn bcd_time_of_a_known_date() {
        let mut rtc = rtc_at(NOV_25_2026);
        assert_eq!(
            time_regs(&mut rtc),
            [0x50, 0x45, 0x04, 0x04, 0x25, 0x11, 0x26, 0x20]
        );
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut rtc = rtc_at(NOV_25_2026 + 12 * 3600); // 16:45:50
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x16);
        wr(&mut rtc, REG_B, REG_B_24H | REG_B_BINARY);
        assert_eq!(time_regs(&mut rtc), [50, 45, 16, 4, 25, 11, 26, 20]);
        // 12-hour binary: 4 PM.
        wr(&mut rtc, REG_B, REG_B_BINARY);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x80 | 4);
        // 12-hour BCD at 00:xx is 12 AM, at 12:xx 12 PM.
        let mut rtc = rtc_at(NOV_25_2026 - 4 * 3600);
        wr(&mut rtc, REG_B, 0);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x12);
        let mut rtc = rtc_at(NOV_25_2026 + 8 * 3600);
        wr(&mut rtc, REG_B, 0);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x80 | 0x12);
    }

    #[test]
    fn status_registers() {
        let mut rtc = rtc_at(0);
        assert_eq!(rd(&mut rtc, REG_A), 0x26);
        assert_eq!(rd(&mut rtc, REG_B), 0x02);
        assert_eq!(rd(&mut rtc, REG_C), 0x00);
        assert_eq!(rd(&mut rtc, REG_D), 0x80);
        // UIP cannot be set; C and D are read-only.
        wr(&mut rtc, REG_A, 0xa6);
        assert_eq!(rd(&mut rtc, REG_A), 0x26);
        wr(&mut rtc, REG_C, 0xff);
        wr(&mut rtc, REG_D, 0x00);
        assert_eq!(rd(&mut rtc, REG_C), 0x00);
        assert_eq!(rd(&mut rtc, REG_D), 0x80);
        // The epoch: Thursday 1970-01-01 00:00:00.
        assert_eq!(
            time_regs(&mut rtc),
            [0x00, 0x00, 0x00, 0x05, 0x01, 0x01, 0x70, 0x19]
        );
    }

    #[test]
    fn index_ignores_nmi_mask_and_ram_is_kept() {
        let mut rtc = rtc_at(NOV_25_2026);
        // With the NMI mask bit set the index still selects register 0x00.
        rtc.write(INDEX, &[0x80]);
        let mut b = [0];
        rtc.read(DATA, &mut b);
        assert_eq!(b[0], 0x50);
        let mut idx = [0];
        rtc.read(INDEX, &mut idx);
        assert_eq!(idx[0], 0x00);
        wr(&mut rtc, 0x0f, 0x0a);
        wr(&mut rtc, 0x7f, 0x5a);
        wr(&mut rtc, 0x01, 0x30); // alarm seconds: plain RAM
        assert_eq!(rd(&mut rtc, 0x0f), 0x0a);
        assert_eq!(rd(&mut rtc, 0xff), 0x5a);
        assert_eq!(rd(&mut rtc, 0x01), 0x30);
        assert_eq!(rd(&mut rtc, 0x40), 0x00);
    }

    #[test]
    fn leap_years_and_centuries() {
        let cases = [
            // 2000-02-29 23:59:59 Tuesday (2000 is a leap year: divisible by 400).
            (
                951_868_799,
                [0x59, 0x59, 0x23, 0x03, 0x29, 0x02, 0x00, 0x20],
            ),
            // One second later: 2000-03-01 Wednesday.
            (
                951_868_800,
                [0x00, 0x00, 0x00, 0x04, 0x01, 0x03, 0x00, 0x20],
            ),
            // 1999-12-31 23:59:59 Friday.
            (
                946_684_799,
                [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19],
            ),
            // 2100-03-01 00:00:00 Monday (2100 is not a leap year: no February 29th).
            (
                4_107_542_400,
                [0x00, 0x00, 0x00, 0x02, 0x01, 0x03, 0x00, 0x21],
            ),
            (
                4_107_542_399,
                [0x59, 0x59, 0x23, 0x01, 0x28, 0x02, 0x00, 0x21],
            ),
            // 2024-02-29 12:00:00 Thursday.
            (
                1_709_208_000,
                [0x00, 0x00, 0x12, 0x05, 0x29, 0x02, 0x24, 0x20],
            ),
        ];
        for (t, regs) in cases {
            assert_eq!(time_regs(&mut rtc_at(t)), regs, "t = {t}");
        }
    }

    #[test]
    fn civil_conversion_round_trips() {
        for t in (-100 * 365 * SECS_PER_DAY..400 * 365 * SECS_PER_DAY).step_by(7_919_993) {
            let dt = DateTime::from_unix(t);
            assert_eq!(dt.to_unix(), t);
            assert!((1..=12).contains(&dt.month) && (1..=31).contains(&dt.day));
            assert!((1..=7).contains(&dt.weekday));
        }
    }

    #[test]
    fn writing_the_time_keeps_an_offset_from_the_clock() {
        let (mut rtc, now) = rtc_moving(NOV_25_2026);
        // Set the year to 2030 and the hour to 10 (BCD): the date moves, the clock runs on.
        wr(&mut rtc, REG_YEAR, 0x30);
        wr(&mut rtc, REG_HOURS, 0x10);
        assert_eq!(
            time_regs(&mut rtc),
            [0x50, 0x45, 0x10, 0x02, 0x25, 0x11, 0x30, 0x20] // 2030-11-25 is a Monday
        );
        now.fetch_add(15, Ordering::Relaxed);
        assert_eq!(rd(&mut rtc, REG_SECONDS), 0x05);
        assert_eq!(rd(&mut rtc, REG_MINUTES), 0x46);
        // Writes to the weekday are ignored.
        wr(&mut rtc, REG_WEEKDAY, 0x07);
        assert_eq!(rd(&mut rtc, REG_WEEKDAY), 0x02);
    }

    #[test]
    fn set_bit_freezes_then_commits() {
        let (mut rtc, now) = rtc_moving(NOV_25_2026);
        // Linux's mc146818_set_time: SET, write all fields (binary here), clear SET.
        wr(&mut rtc, REG_B, REG_B_SET | REG_B_24H | REG_B_BINARY);
        for (reg, v) in [
            (REG_YEAR, 24),
            (REG_MONTH, 2),
            (REG_DAY, 29),
            (REG_HOURS, 23),
            (REG_MINUTES, 59),
            (REG_SECONDS, 58),
            (REG_CENTURY, 20),
        ] {
            wr(&mut rtc, reg, v);
        }
        // Frozen: the clock moving does not show.
        now.fetch_add(100, Ordering::Relaxed);
        assert_eq!(time_regs(&mut rtc), [58, 59, 23, 5, 29, 2, 24, 20]);
        wr(&mut rtc, REG_B, REG_B_24H | REG_B_BINARY);
        assert_eq!(time_regs(&mut rtc), [58, 59, 23, 5, 29, 2, 24, 20]);
        // Running again: three seconds later it is March 1st, Friday.
        now.fetch_add(3, Ordering::Relaxed);
        assert_eq!(time_regs(&mut rtc), [1, 0, 0, 6, 1, 3, 24, 20]);
    }

    #[test]
    fn set_bit_allows_passing_through_impossible_dates() {
        let mut rtc = rtc_at(NOV_25_2026);
        wr(&mut rtc, REG_B, REG_B_SET | REG_B_24H);
        // Linux writes the day before the month: November 31st only exists for a moment.
        wr(&mut rtc, REG_DAY, 0x31);
        wr(&mut rtc, REG_MONTH, 0x01);
        wr(&mut rtc, REG_YEAR, 0x27);
        wr(&mut rtc, REG_B, REG_B_24H);
        // 2027-01-31 is a Sunday.
        assert_eq!(
            time_regs(&mut rtc),
            [0x50, 0x45, 0x04, 0x01, 0x31, 0x01, 0x27, 0x20]
        );
    }

    #[test]
    fn twelve_hour_write() {
        let mut rtc = rtc_at(NOV_25_2026);
        wr(&mut rtc, REG_B, 0); // BCD, 12-hour
        wr(&mut rtc, REG_HOURS, 0x80 | 0x12); // 12 PM
        wr(&mut rtc, REG_B, REG_B_24H);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x12);
        wr(&mut rtc, REG_B, 0);
        wr(&mut rtc, REG_HOURS, 0x12); // 12 AM
        wr(&mut rtc, REG_B, REG_B_24H);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x00);
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::BusDevice;

    #[test]
    fn guest_clock_offset_and_ram_carry_over() {
        let mut a = Rtc::with_clock(|| 1_000_000);
        // The guest writes CMOS byte 0x40 and sets the clock one hour ahead.
        a.write(0, &[0x40]);
        a.write(1, &[0x99]);
        a.offset = 3600;
        let s = a.save_state();
        let mut b = Rtc::with_clock(|| 1_000_000);
        b.restore_state(&s).unwrap();
        assert_eq!(b.save_state(), s);
        assert_eq!(b.now().to_unix(), 1_003_600);
        b.write(0, &[0x40]);
        let mut v = [0u8];
        b.read(1, &mut v);
        assert_eq!(v[0], 0x99);
        let mut bad = s;
        bad.cmos.pop();
        assert!(b.restore_state(&bad).is_err());
    }
}
