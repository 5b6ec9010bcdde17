//! Peer-provided text on its way to a terminal. A message's text (and anything else another party chose) may hold
//! control characters: escape sequences that move the cursor, clear the screen, retitle the window, hide text or
//! fake a line from someone else. None of them reaches a terminal from here.
//!
//! - [`terminal_safe`] is for human-readable output: it drops every control character (Unicode `Cc`: C0, DEL, C1)
//!   and the bidirectional-formatting characters that can reorder what is shown (`U+200E`, `U+200F`, `U+202A` to
//!   `U+202E`, `U+2066` to `U+2069`); a tab or a line feed becomes a space, so one message stays one line.
//! - [`json_line`] is for `--json` output: the value is kept exactly, but every such character inside a string is
//!   written as a JSON `\uXXXX` escape, so a script decodes the original text and a terminal shows only ASCII
//!   escapes. serde_json escapes C0 itself but writes DEL, C1 (`U+009B` is a one-byte CSI on some terminals) and
//!   the bidi controls raw.

use std::borrow::Cow;

use serde::Serialize;

/// Whether `c` must not reach a terminal as is.
fn unsafe_for_terminal(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `text` without control or bidirectional-formatting characters (a tab or a line feed becomes a space).
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(unsafe_for_terminal) {
        return Cow::Borrowed(text);
    }
    let shown = text.chars().filter_map(|c| match c {
        '\t' | '\n' => Some(' '),
        c if unsafe_for_terminal(c) => None,
        c => Some(c),
    });
    Cow::Owned(shown.collect())
}

/// `value` as one line of JSON whose every control or bidirectional-formatting character is `\u`-escaped.
pub fn json_line<T: Serialize>(value: &T) -> serde_json::Result<String> {
    let json = serde_json::to_string(value)?;
    // Outside strings, serde_json writes ASCII punctuation, digits and letters only; so every character rewritten
    // here is inside a string, where `\uXXXX` stands for it. All of them are in the Basic Multilingual Plane.
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if unsafe_for_terminal(c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "\u{1b}[2J\u{1b}]0;title\u{7}hi\r\n\u{9b}31m\u{7f}\u{202e}txt.exe\u{2066}\tend";

    #[test]
    fn nothing_hostile_reaches_the_terminal_and_plain_text_is_untouched() {
        let shown = terminal_safe(HOSTILE);
        assert!(!shown.chars().any(unsafe_for_terminal), "{shown:?}");
        assert_eq!(shown, "[2J]0;titlehi 31mtxt.exe end");
        assert!(matches!(terminal_safe("héllo, +33612345678 ✓"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_keeps_the_value_and_escapes_what_a_terminal_would_obey() {
        #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
        struct M {
            text: String,
        }
        let m = M { text: HOSTILE.to_owned() };
        let line = json_line(&m).expect("serialize");
        assert!(!line.chars().any(unsafe_for_terminal), "{line:?}");
        assert!(line.contains(r"\u009b") && line.contains(r"\u202e") && line.contains(r"\u001b"), "{line:?}");
        assert_eq!(serde_json::from_str::<M>(&line).expect("still JSON"), m, "a script reads the original text");
        assert_eq!(json_line(&M { text: "plain".into() }).expect("serialize"), r#"{"text":"plain"}"#);
    }
}
