//! Strings from the network (ids, stream names) as logs show them.

use std::fmt;

/// Most characters of a string from the network that a log line shows.
pub const MAX_LOGGED_CHARS: usize = 64;

/// A string from the network as a log line shows it: its first [`MAX_LOGGED_CHARS`]
/// characters, escaped (control characters, quotes and backslashes as `\n`, `\u{1b}`,
/// `\"` ...), then how many bytes were left out. A sender can neither flood a log with
/// a 64 KiB id nor forge log lines or terminal escapes with one.
///
/// ```
/// use ott_proto::untrusted;
/// assert_eq!(untrusted("p1").to_string(), "p1");
/// assert_eq!(untrusted("a\nb\u{1b}[2J").to_string(), "a\\nb\\u{1b}[2J");
/// assert_eq!(untrusted(&"x".repeat(100)).to_string(), format!("{}...(+36 bytes)", "x".repeat(64)));
/// ```
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

/// Wraps `s` for logging: see [`Untrusted`].
pub fn untrusted(s: &str) -> Untrusted<'_> {
    Untrusted(s)
}

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = 0;
        for (n, c) in self.0.chars().enumerate() {
            if n == MAX_LOGGED_CHARS {
                return write!(f, "...(+{} bytes)", self.0.len() - shown);
            }
            write!(f, "{}", c.escape_debug())?;
            shown += c.len_utf8();
        }
        Ok(())
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_short_strings_are_shown_whole() {
        assert_eq!(untrusted("countdown").to_string(), "countdown");
        assert_eq!(untrusted("café ✓").to_string(), "café ✓");
        assert_eq!(untrusted("").to_string(), "");
        assert_eq!(format!("{:?}", untrusted("a\"b")), "\"a\\\"b\"");
    }

    #[test]
    fn test_long_strings_are_cut_at_a_character() {
        let s = "é".repeat(MAX_LOGGED_CHARS + 1000);
        let shown = untrusted(&s).to_string();
        assert_eq!(
            shown,
            format!("{}...(+2000 bytes)", "é".repeat(MAX_LOGGED_CHARS))
        );
        let exact = "y".repeat(MAX_LOGGED_CHARS);
        assert_eq!(untrusted(&exact).to_string(), exact);
    }

    #[test]
    fn test_control_characters_cannot_forge_lines() {
        let shown = untrusted("x\r\n2026-01-01 INFO forged\u{7}").to_string();
        assert!(!shown.contains('\n') && !shown.contains('\r') && !shown.contains('\u{7}'));
        assert_eq!(shown, "x\\r\\n2026-01-01 INFO forged\\u{7}");
    }
}
