//! Shifting the times an S3 server reports (the proxy's clock skew):
//! HTTP dates (`Last-Modified`, `Date`) and ISO 8601 times
//! (`<LastModified>` of listings), rewritten to the same length.

use calendar::{civil_from_days, days_from_civil};

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];

fn num(s: &str) -> Option<i64> {
    s.parse().ok()
}

fn split_secs(t: i64) -> (i64, i64, i64, i64) {
    let days = t.div_euclid(86_400);
    let s = t.rem_euclid(86_400);
    (days, s / 3600, s / 60 % 60, s % 60)
}

/// `YYYY-MM-DDTHH:MM:SS` shifted by `secs`.
pub(crate) fn shift_iso(s: &str, secs: i64) -> Option<String> {
    let b = s.as_bytes();
    if b.len() != 19 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let t = days_from_civil(num(&s[0..4])?, num(&s[5..7])?, num(&s[8..10])?) * 86_400
        + num(&s[11..13])? * 3600
        + num(&s[14..16])? * 60
        + num(&s[17..19])?
        + secs;
    let (days, h, mi, se) = split_secs(t);
    let (y, m, d) = civil_from_days(days);
    Some(format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{se:02}"))
}

/// An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`) shifted by `secs`.
pub(crate) fn shift_http_date(s: &str, secs: i64) -> Option<String> {
    let w: Vec<&str> = s.split_whitespace().collect();
    if w.len() != 6 || w[5] != "GMT" {
        return None;
    }
    let m = i64::try_from(MONTHS.iter().position(|x| *x == w[2])?).ok()? + 1;
    let hms: Vec<&str> = w[4].split(':').collect();
    if hms.len() != 3 {
        return None;
    }
    let t = days_from_civil(num(w[3])?, m, num(w[1])?) * 86_400
        + num(hms[0])? * 3600
        + num(hms[1])? * 60
        + num(hms[2])?
        + secs;
    let (days, h, mi, se) = split_secs(t);
    let (y, mo, d) = civil_from_days(days);
    let wd = DAYS[usize::try_from(days.rem_euclid(7)).ok()?];
    let mon = MONTHS[usize::try_from(mo - 1).ok()?];
    Some(format!(
        "{wd}, {d:02} {mon} {y:04} {h:02}:{mi:02}:{se:02} GMT"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_keep_the_format_and_cross_days_and_years() {
        assert_eq!(
            shift_http_date("Thu, 01 Jan 1970 00:00:00 GMT", 0).as_deref(),
            Some("Thu, 01 Jan 1970 00:00:00 GMT")
        );
        assert_eq!(
            shift_http_date("Mon, 30 Nov 2026 20:06:40 GMT", 2 * 86_400).as_deref(),
            Some("Wed, 02 Dec 2026 20:06:40 GMT")
        );
        assert_eq!(
            shift_http_date("Fri, 01 Jan 2027 00:00:10 GMT", -20).as_deref(),
            Some("Thu, 31 Dec 2026 23:59:50 GMT")
        );
        assert_eq!(
            shift_iso("2024-03-01T00:00:00", -1).as_deref(),
            Some("2024-02-29T23:59:59")
        );
        assert_eq!(
            shift_iso("2026-11-30T20:06:40", -2 * 86_400).as_deref(),
            Some("2026-11-28T20:06:40")
        );
        assert_eq!(shift_iso("garbage", 1), None);
    }
}
