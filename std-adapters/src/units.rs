//! Parsing of the sizes and rates the CLI takes: memory sizes such as `256MiB`, `1GiB`, `4096`,
//! and link rates such as `1Gbit`, `100Mbit`, `500MB/s`, `unlimited`.

use memferry::time::ByteRate;

/// A size in bytes: a number with an optional unit (`KiB`, `MiB`, `GiB`, `TiB`, `KB`, `MB`,
/// `GB`, `B`; case-insensitive). Binary units are powers of 1024, decimal ones of 1000.
pub fn parse_size(text: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .parse_size(text.trim())
        .map_err(|e| format!("'{text}' is not a size ({e}); try 256MiB, 1GiB or 4096"))
}

/// A rate: `unlimited`, `N[k|M|G]bit` (bits per second, decimal), or a size per second
/// (`500MB/s`, `1GiB/s`). `Gbps`/`Mbps` are accepted for bits too.
pub fn parse_rate(text: &str) -> Result<ByteRate, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("none") {
        return Ok(ByteRate::UNLIMITED);
    }
    let lower = t.to_ascii_lowercase();
    let bad = |why: String| {
        format!("'{text}' is not a rate ({why}); try 1Gbit, 100Mbit, 500MB/s or unlimited")
    };
    for (suffix, scale) in [
        ("kbit", 1e3),
        ("mbit", 1e6),
        ("gbit", 1e9),
        ("tbit", 1e12),
        ("kbps", 1e3),
        ("mbps", 1e6),
        ("gbps", 1e9),
        ("bit", 1.0),
    ] {
        if let Some(number) = lower.strip_suffix(suffix) {
            let n: f64 = number.trim().parse().map_err(|e| bad(format!("{e}")))?;
            if !(n.is_finite() && n > 0.0) {
                return Err(bad("must be positive".into()));
            }
            return Ok(ByteRate::from_bits_per_sec((n * scale) as u64));
        }
    }
    let per_second = lower.strip_suffix("/s").unwrap_or(&lower);
    let bytes = parse_size(per_second).map_err(|_| bad("unknown unit".into()))?;
    if bytes == 0 {
        return Err(bad("must be positive".into()));
    }
    Ok(ByteRate(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1Gbit").unwrap(), ByteRate(125_000_000));
        assert_eq!(parse_rate("100Mbit").unwrap(), ByteRate(12_500_000));
        assert_eq!(parse_rate("2.5gbps").unwrap(), ByteRate(312_500_000));
        assert_eq!(parse_rate("500MB/s").unwrap(), ByteRate(500_000_000));
        assert_eq!(parse_rate("1GiB/s").unwrap(), ByteRate(1 << 30));
        assert_eq!(parse_rate("unlimited").unwrap(), ByteRate::UNLIMITED);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0Gbit").is_err());
        assert!(parse_rate("-1Mbit").is_err());
    }
}
