//! Strict E.164 phone numbers: `+`, a country code that does not start with 0, and 7 to 15 digits in all.
//!
//! Input is validated, never repaired: spaces, dashes, letters or a missing `+` are rejected, so that the same
//! person cannot appear in the directory under two spellings.
//!
//! Two checks, for two places:
//! - [`PhoneNumber::parse`], the syntax alone, for numbers read back from a store or a certificate: what was accepted
//!   once stays readable when the numbering plans change;
//! - [`PhoneNumber::parse_valid`], the syntax and then the numbering plan (the `phonenumber` crate's copy of
//!   libphonenumber's metadata): the country code must exist, and the national number must have a length and a
//!   range the plan assigns (`+99912345678`, a French number one digit short, or one in an unassigned range are
//!   refused). The number must also already be in its one canonical E.164 form: the library's own parse, which
//!   would drop a trunk prefix (`+330612345678`), must give back the very same string. This runs wherever a number
//!   enters the system: the relay's registration and verification requests, and the client before it sends one.

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
    /// No numbering plan has this country calling code.
    #[error("phone number has a country calling code that no numbering plan has")]
    UnknownCountryCode,
    /// The country code exists, but its numbering plan assigns no number of this length or in this range.
    #[error("phone number is not a valid number of its country's numbering plan ({0})")]
    NotInPlan(PlanProblem),
    /// The number is valid only once rewritten (a trunk prefix dropped, ...): it is refused, not repaired.
    #[error("phone number is not in canonical E.164 form (the numbering plan reads it differently)")]
    NotCanonical,
}

/// Why a number with a known country code is not in that country's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanProblem {
    /// Fewer digits than any number of the plan.
    #[error("too short for its country")]
    TooShort,
    /// More digits than any number of the plan.
    #[error("too long for its country")]
    TooLong,
    /// A length the plan has no numbers of.
    #[error("no number of the plan has this length")]
    Length,
    /// A length the plan uses, but a range it does not assign.
    #[error("a range the plan does not assign")]
    Unassigned,
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

    /// Validates `s` as an E.164 number and then against its country's numbering plan (module header); refused,
    /// never repaired.
    pub fn parse_valid(s: &str) -> Result<Self, PhoneError> {
        let number = Self::parse(s)?;
        plan_check(&number)?;
        Ok(number)
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

/// The numbering-plan check of [`PhoneNumber::parse_valid`], on a number whose syntax was already checked.
fn plan_check(number: &PhoneNumber) -> Result<(), PhoneError> {
    use phonenumber::{Mode, ParseError};
    let parsed = phonenumber::parse(None, number.as_str()).map_err(|e| match e {
        ParseError::InvalidCountryCode => PhoneError::UnknownCountryCode,
        ParseError::TooShortNsn | ParseError::TooShortAfterIdd | ParseError::NoNumber => {
            PhoneError::NotInPlan(PlanProblem::TooShort)
        }
        ParseError::TooLong => PhoneError::NotInPlan(PlanProblem::TooLong),
        _ => PhoneError::NotInPlan(PlanProblem::Unassigned),
    })?;
    if parsed.format().mode(Mode::E164).to_string() != number.as_str() {
        return Err(PhoneError::NotCanonical);
    }
    if parsed.is_valid() {
        return Ok(());
    }
    // The lengths the plans of this calling code use (several regions share +1 or +7): those of each kind of number
    // they assign, since a plan's general descriptor often lists none.
    let regions = phonenumber::metadata::DATABASE.by_code(&parsed.code().value()).unwrap_or_default();
    let lengths: Vec<u16> = regions
        .iter()
        .flat_map(|meta| {
            let d = meta.descriptors();
            [
                d.fixed_line(),
                d.mobile(),
                d.toll_free(),
                d.premium_rate(),
                d.shared_cost(),
                d.personal_number(),
                d.voip(),
                d.pager(),
                d.uan(),
                d.voicemail(),
            ]
        })
        .flatten()
        .flat_map(|k| k.possible_length().iter().copied())
        .collect();
    let len = u16::try_from(parsed.national().to_string().len()).unwrap_or(u16::MAX);
    let problem = match (lengths.iter().min(), lengths.iter().max()) {
        (Some(&min), _) if len < min => PlanProblem::TooShort,
        (_, Some(&max)) if len > max => PlanProblem::TooLong,
        _ if !lengths.contains(&len) => PlanProblem::Length,
        _ => PlanProblem::Unassigned,
    };
    Err(PhoneError::NotInPlan(problem))
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

    /// Every number the test suites, the demo, the load tool and the docs use is a valid number of a real plan.
    #[test]
    fn numbers_in_use_are_in_their_plans() {
        let fixed = [
            "+33612345678",
            "+33698765432",
            "+33611111111",
            "+33622222222",
            "+33633333333",
            "+33655555555",
            "+33644444444",
            "+33611112222",
            "+33612345679",
            "+33678829916",
            "+33655501234",
            "+33620000000",
            "+33612345602",
            "+33610000009",
            "+33610000000",
            "+33600000000",
            "+33600000001",
            // The load tool's range.
            "+33609999999",
            "+14155550100",
            "+14155550101",
            "+14155550123",
            "+14153333333",
            "+14152222222",
        ];
        for s in fixed {
            assert_eq!(PhoneNumber::parse_valid(s).map(|p| p.as_str().to_owned()), Ok(s.to_owned()));
        }
    }

    #[test]
    fn refuses_numbers_outside_any_plan_without_repairing() {
        let refused = [
            // No country has calling code 999.
            ("+99912345678", PhoneError::UnknownCountryCode),
            // France: nine digits after +33; eight are too few.
            ("+3361234567", PhoneError::NotInPlan(PlanProblem::TooShort)),
            // France: ten digits after +33 are too many.
            ("+336123456789", PhoneError::NotInPlan(PlanProblem::TooLong)),
            // France: the right length, but 069 0x.. is not an assigned range (syntax alone accepts it).
            ("+33690123456", PhoneError::NotInPlan(PlanProblem::Unassigned)),
            // North America: area code 555 is not assigned.
            ("+15551234567", PhoneError::NotInPlan(PlanProblem::Unassigned)),
        ];
        for (s, expected) in refused {
            assert!(PhoneNumber::parse(s).is_ok(), "{s} passes the syntax check alone");
            assert_eq!(PhoneNumber::parse_valid(s), Err(expected), "{s}");
        }
        // The French trunk prefix 0 after the country code: the plan would read +33612345678; refused, not rewritten.
        assert_eq!(PhoneNumber::parse_valid("+330612345678"), Err(PhoneError::NotCanonical));
        // The syntax check still runs first.
        assert_eq!(PhoneNumber::parse_valid("+33 612345678"), Err(PhoneError::NotADigit(' ')));
        assert_eq!(PhoneNumber::parse_valid("33612345678"), Err(PhoneError::MissingPlus));
        let message = PhoneNumber::parse_valid("+3361234567").expect_err("too short").to_string();
        assert!(message.contains("numbering plan") && message.contains("too short"), "{message}");
    }

    /// Whatever the digits, the plan check answers (no panic), and what it accepts it accepts exactly as written.
    #[test]
    fn plan_check_answers_any_syntactically_valid_number() {
        let mut state = 0x0123_4567_89ab_cdef_u64;
        let mut accepted = 0;
        for _ in 0..500 {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let len = MIN_DIGITS + (state >> 60) as usize % (MAX_DIGITS - MIN_DIGITS + 1);
            let digits: String = (0..len).map(|i| char::from(b'0' + ((state >> (i * 4 % 60)) % 10) as u8)).collect();
            let s = format!("+{}{}", 1 + state % 9, &digits[1..]);
            if let Ok(p) = PhoneNumber::parse_valid(&s) {
                assert_eq!(p.as_str(), s);
                accepted += 1;
            }
        }
        assert!(accepted > 0, "some random numbers fall in assigned ranges");
    }

    #[test]
    fn debug_redacts() {
        let p = PhoneNumber::parse("+33612345678").expect("valid");
        assert!(!format!("{p:?}").contains("612345678"));
    }
}
