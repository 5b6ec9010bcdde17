//! Strict E.164 phone numbers: `+`, a country code that does not start with 0, and 7 to 15 digits in all.
//!
//! Input is validated, never repaired: spaces, dashes, letters or a missing `+` are rejected, so that the same
//! person cannot appear in the directory under two spellings.

use std::fmt;

/// Fewest digits accepted (the shortest national numbers plus country code).
pub const MIN_DIGITS: usize = 7;
/// Most digits E.164 allows.
pub const MAX_DIGITS: usize = 15;

/// A validated E.164 phone number.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber(String);

/// Why a string is not an E.164 number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PhoneError {
    /// The number does not start with `+`.
    #[error("phone number must start with '+' followed by the country code")]
    MissingPlus,
    /// A character other than an ASCII digit follows the `+`.
    #[error("phone number may contain only digits after '+' (found {0:?})")]
    NotADigit(char),
    /// The country code starts with 0.
    #[error("country code cannot start with 0")]
    LeadingZero,
    /// Too few or too many digits.
    #[error("phone number must have {MIN_DIGITS} to {MAX_DIGITS} digits, found {0}")]
    Length(usize),
}

impl PhoneNumber {
    /// Validates `s` as an E.164 number.
    pub fn parse(s: &str) -> Result<Self, PhoneError> {
        let digits = s.strip_prefix('+').ok_or(PhoneError::MissingPlus)?;
        if let Some(c) = digits.chars().find(|c| !c.is_ascii_digit()) {
            return Err(PhoneError::NotADigit(c));
        }
        if !(MIN_DIGITS..=MAX_DIGITS).contains(&digits.len()) {
            return Err(PhoneError::Length(digits.len()));
        }
        if digits.starts_with('0') {
            return Err(PhoneError::LeadingZero);
        }
        Ok(Self(s.to_owned()))
    }

    /// The number as written, `+` included.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Phone numbers are personal data: `Debug` does not print them, so they cannot leak into logs by accident.
impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PhoneNumber(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_numbers() {
        for s in ["+33612345678", "+14155550123", "+6831234", "+123456789012345"] {
            assert_eq!(PhoneNumber::parse(s).expect(s).as_str(), s);
        }
    }

    #[test]
    fn rejects_without_repairing() {
        assert_eq!(PhoneNumber::parse("+3367a829916"), Err(PhoneError::NotADigit('a')));
        assert_eq!(PhoneNumber::parse("33612345678"), Err(PhoneError::MissingPlus));
        assert_eq!(PhoneNumber::parse("+33 612345678"), Err(PhoneError::NotADigit(' ')));
        assert_eq!(PhoneNumber::parse("+33-612345678"), Err(PhoneError::NotADigit('-')));
        assert_eq!(PhoneNumber::parse("+0612345678"), Err(PhoneError::LeadingZero));
        assert_eq!(PhoneNumber::parse("+123456"), Err(PhoneError::Length(6)));
        assert_eq!(PhoneNumber::parse("+1234567890123456"), Err(PhoneError::Length(16)));
        assert_eq!(PhoneNumber::parse("+"), Err(PhoneError::Length(0)));
        assert_eq!(PhoneNumber::parse("+٣٣٦١٢٣٤٥٦٧٨"), Err(PhoneError::NotADigit('٣')));
        assert_eq!(PhoneNumber::parse(""), Err(PhoneError::MissingPlus));
    }

    #[test]
    fn debug_redacts() {
        let p = PhoneNumber::parse("+33612345678").expect("valid");
        assert!(!format!("{p:?}").contains("612345678"));
    }
}
