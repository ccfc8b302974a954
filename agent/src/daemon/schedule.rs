//! When a job runs: a systemd calendar event (systemd.time(7)) in the
//! local time zone.
//!
//! [`Schedule`] is the one place the daemon touches calendar events: it
//! keeps the text (for the API and reloads) and answers
//! [`Schedule::next_after`] through the `calendar` crate (systemd's
//! semantics, DST included).

use std::fmt;
use std::str::FromStr;

use jiff::Zoned;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    text: String,
    event: calendar::CalendarEvent,
}

impl Schedule {
    /// The text as written in the config.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first slot strictly after `after`, in `after`'s time zone.
    pub fn next_after(&self, after: &Zoned) -> Option<Zoned> {
        self.event.next_after(after)
    }

    /// The calendar event.
    pub fn event(&self) -> &calendar::CalendarEvent {
        &self.event
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Schedule {
            text: s.to_owned(),
            event: s.parse().map_err(|e: calendar::ParseError| e.reason)?,
        })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Zoned {
        s.parse().expect("zoned")
    }

    #[test]
    fn next_slots() {
        let s: Schedule = "*:*:0/5".parse().unwrap();
        let t = at("2026-03-29T01:59:58+01:00[Europe/Berlin]");
        let n = s.next_after(&t).unwrap();
        assert_eq!(n.to_string(), "2026-03-29T03:00:00+02:00[Europe/Berlin]");
        let d: Schedule = "daily".parse().unwrap();
        let n = d.next_after(&t).unwrap();
        assert_eq!(n.to_string(), "2026-03-30T00:00:00+02:00[Europe/Berlin]");
        "sometime".parse::<Schedule>().unwrap_err();
    }
}
