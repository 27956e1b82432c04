//! Time and rates: [`Nanos`] (a point or span of time in nanoseconds) and [`ByteRate`]
//! (bytes per second). The core never reads a clock: every "now" is an argument.

use core::fmt;
use core::ops::{Add, AddAssign, Sub};

/// Nanoseconds: a point in time (since an arbitrary origin the caller picks) or a duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Nanos(pub u64);

impl Nanos {
    /// Zero.
    pub const ZERO: Nanos = Nanos(0);
    /// The largest representable time (about 584 years).
    pub const MAX: Nanos = Nanos(u64::MAX);

    /// `us` microseconds.
    pub const fn from_micros(us: u64) -> Nanos {
        Nanos(us.saturating_mul(1_000))
    }
    /// `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Nanos {
        Nanos(ms.saturating_mul(1_000_000))
    }
    /// `s` seconds.
    pub const fn from_secs(s: u64) -> Nanos {
        Nanos(s.saturating_mul(1_000_000_000))
    }
    /// As fractional seconds.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }
    /// As fractional milliseconds.
    pub fn as_millis_f64(self) -> f64 {
        self.0 as f64 / 1e6
    }
    /// `self - earlier`, or zero if `earlier` is later.
    pub const fn saturating_sub(self, earlier: Nanos) -> Nanos {
        Nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add for Nanos {
    type Output = Nanos;
    fn add(self, rhs: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Nanos {
    fn add_assign(&mut self, rhs: Nanos) {
        *self = *self + rhs;
    }
}

impl Sub for Nanos {
    type Output = Nanos;
    /// Saturating: a span is never negative.
    fn sub(self, rhs: Nanos) -> Nanos {
        self.saturating_sub(rhs)
    }
}

impl fmt::Display for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3} ms", self.as_millis_f64())
    }
}

/// A rate in bytes per second. `ByteRate::UNLIMITED` means "no limit".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ByteRate(pub u64);

impl ByteRate {
    /// No limit.
    pub const UNLIMITED: ByteRate = ByteRate(u64::MAX);

    /// `bits` per second (a link speed), rounded down to whole bytes.
    pub const fn from_bits_per_sec(bits: u64) -> ByteRate {
        ByteRate(bits / 8)
    }

    /// Whether this is [`ByteRate::UNLIMITED`].
    pub const fn is_unlimited(self) -> bool {
        self.0 == u64::MAX
    }

    /// The rate of `bytes` moved in `span` (zero span gives [`ByteRate::UNLIMITED`]).
    pub fn measured(bytes: u64, span: Nanos) -> ByteRate {
        if span.0 == 0 {
            return ByteRate::UNLIMITED;
        }
        let rate = (bytes as u128 * 1_000_000_000) / span.0 as u128;
        ByteRate(rate.min(u64::MAX as u128 - 1) as u64)
    }

    /// How long `bytes` take at this rate (zero when unlimited; `Nanos::MAX` at zero rate).
    pub fn time_for(self, bytes: u64) -> Nanos {
        if self.is_unlimited() {
            return Nanos::ZERO;
        }
        if self.0 == 0 {
            return if bytes == 0 { Nanos::ZERO } else { Nanos::MAX };
        }
        let ns = (bytes as u128 * 1_000_000_000).div_ceil(self.0 as u128);
        Nanos(ns.min(u64::MAX as u128) as u64)
    }

    /// How many bytes this rate allows in `span` (saturating; `u64::MAX` when unlimited).
    pub fn bytes_in(self, span: Nanos) -> u64 {
        if self.is_unlimited() {
            return u64::MAX;
        }
        let b = self.0 as u128 * span.0 as u128 / 1_000_000_000;
        b.min(u64::MAX as u128) as u64
    }

    /// Saturating sum.
    pub const fn saturating_add(self, other: ByteRate) -> ByteRate {
        ByteRate(self.0.saturating_add(other.0))
    }
}

impl fmt::Display for ByteRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unlimited() {
            write!(f, "unlimited")
        } else {
            write!(f, "{:.1} MB/s", self.0 as f64 / 1e6)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let gbit = ByteRate::from_bits_per_sec(1_000_000_000);
        assert_eq!(gbit.0, 125_000_000);
        assert_eq!(gbit.time_for(125_000_000), Nanos::from_secs(1));
        assert_eq!(gbit.bytes_in(Nanos::from_millis(8)), 1_000_000);
        assert_eq!(ByteRate::measured(1000, Nanos::from_millis(1)).0, 1_000_000);
        assert_eq!(ByteRate::UNLIMITED.time_for(1 << 40), Nanos::ZERO);
        assert_eq!(ByteRate(0).time_for(1), Nanos::MAX);
        assert_eq!(Nanos(5) - Nanos(7), Nanos::ZERO);
    }
}
