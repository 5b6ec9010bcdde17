//! Phone-number verification at registration: the one-time code and the registration-lock PIN as they travel in
//! `Register` and `SetRegistrationLock`, and the fixed rules around them (code length, lifetime and attempts, how long
//! a registration lock holds), shared by the relay and clients so that both refuse the same inputs.
//!
//! Neither type prints its secret: their `Debug` output is redacted, and they implement no `Display`, so a code or a
//! PIN cannot end up in a log line by formatting a value that holds it.

use std::fmt;

/// Digits in a verification code.
pub const CODE_DIGITS: usize = 6;
/// How long a code is accepted after it was requested: 10 minutes.
pub const CODE_TTL_MS: u64 = 10 * 60 * 1000;
/// `Register` requests one code allows, right or wrong (a right code with a missing or wrong PIN counts too).
pub const CODE_ATTEMPTS: u8 = 5;
/// A registration lock holds while its account was active (authenticated) within this period: 7 days.
pub const LOCK_INACTIVITY_MS: u64 = 7 * 24 * 3600 * 1000;
/// Shortest registration-lock PIN, in bytes.
pub const PIN_MIN: usize = 4;
/// Longest registration-lock PIN, in bytes.
pub const PIN_MAX: usize = 64;

/// Why a code or a PIN is refused before it is checked against anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// A code is exactly [`CODE_DIGITS`] ASCII digits.
    #[error("a verification code is exactly {CODE_DIGITS} digits")]
    Code,
    /// A PIN is [`PIN_MIN`] to [`PIN_MAX`] bytes of printable text.
    #[error("a registration lock PIN is {PIN_MIN} to {PIN_MAX} bytes of printable text")]
    Pin,
}

/// A verification code as sent in `Register.code`: exactly six ASCII digits.
#[derive(Clone, PartialEq, Eq)]
pub struct VerificationCode(String);

impl VerificationCode {
    /// Validates the wire form (no repair).
    pub fn parse(s: &str) -> Result<Self, FormatError> {
        if s.len() == CODE_DIGITS && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Self(s.to_owned()))
        } else {
            Err(FormatError::Code)
        }
    }

    /// What a person typed or pasted: spaces, dashes and surrounding whitespace are dropped ("123 456", "123-456"),
    /// then the digits are validated as [`VerificationCode::parse`] does.
    pub fn from_user_input(s: &str) -> Result<Self, FormatError> {
        let digits: String = s.chars().filter(|c| !c.is_whitespace() && *c != '-').collect();
        Self::parse(&digits)
    }

    /// A code from a number below 10^6, zero-padded (the relay draws it uniformly).
    pub fn from_number(n: u32) -> Option<Self> {
        (n < 1_000_000).then(|| Self(format!("{n:06}")))
    }

    /// The six digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for VerificationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VerificationCode(******)")
    }
}

/// A registration-lock PIN: 4 to 64 bytes, no control characters.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistrationPin(String);

impl RegistrationPin {
    /// Validates a PIN (no repair: the PIN is compared as given).
    pub fn parse(s: &str) -> Result<Self, FormatError> {
        if (PIN_MIN..=PIN_MAX).contains(&s.len()) && !s.chars().any(char::is_control) {
            Ok(Self(s.to_owned()))
        } else {
            Err(FormatError::Pin)
        }
    }

    /// The PIN's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The PIN as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RegistrationPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RegistrationPin(****)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_six_digits_and_typed_input_is_tidied_first() {
        assert!(VerificationCode::parse("012345").is_ok());
        for bad in ["12345", "1234567", "12345a", " 12345", "١٢٣٤٥٦", ""] {
            assert_eq!(VerificationCode::parse(bad), Err(FormatError::Code), "{bad:?}");
        }
        assert_eq!(VerificationCode::from_user_input(" 123-456\n").map(|c| c.as_str().to_owned()), Ok("123456".into()));
        assert_eq!(VerificationCode::from_number(42).map(|c| c.as_str().to_owned()), Some("000042".into()));
        assert_eq!(VerificationCode::from_number(1_000_000), None);
    }

    #[test]
    fn pins_are_bounded_printable_text() {
        assert!(RegistrationPin::parse("1234").is_ok());
        assert!(RegistrationPin::parse("correct horse").is_ok());
        assert!(RegistrationPin::parse("123").is_err());
        assert!(RegistrationPin::parse(&"9".repeat(PIN_MAX + 1)).is_err());
        assert!(RegistrationPin::parse("12\n34").is_err());
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let code = VerificationCode::parse("987654").expect("valid");
        let pin = RegistrationPin::parse("24680").expect("valid");
        assert!(!format!("{code:?}").contains("987654"));
        assert!(!format!("{pin:?}").contains("24680"));
    }
}
