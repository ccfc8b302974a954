//! Units shared by the CLI, notifications and the config: human byte
//! sizes and `"48h"`-style durations.

use std::time::Duration;

/// `1536` → `"1.5 KiB"`; below 1 KiB in bytes.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[allow(clippy::cast_precision_loss)]
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `"2d 3h"`, `"5h 10m"`, `"45m"`, `"30s"`: the two largest units.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, h, m) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    match (days, s / 3600, s / 60) {
        (1.., _, _) if h > 0 => format!("{days}d {h}h"),
        (1.., _, _) => format!("{days}d"),
        (0, 1.., _) if m > 0 => format!("{h}h {m}m"),
        (0, 1.., _) => format!("{h}h"),
        (0, 0, 1..) => format!("{m}m"),
        _ => format!("{s}s"),
    }
}

/// Parse `"90s"`, `"30m"`, `"48h"`, `"7d"`, `"2w"`, `"0"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("bad duration {s:?}: use a number and s, m, h, d or w"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(format!("bad duration {s:?}: use s, m, h, d or w")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(parse_duration("48h"), Ok(Duration::from_secs(48 * 3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        parse_duration("48").unwrap_err();
        parse_duration("1y").unwrap_err();
        assert_eq!(human_duration(Duration::from_secs(30)), "30s");
        assert_eq!(human_duration(Duration::from_secs(45 * 60)), "45m");
        assert_eq!(
            human_duration(Duration::from_secs(5 * 3600 + 600)),
            "5h 10m"
        );
        assert_eq!(human_duration(Duration::from_secs(48 * 3600)), "2d");
        assert_eq!(human_duration(Duration::from_secs(51 * 3600 + 59)), "2d 3h");
    }
}
