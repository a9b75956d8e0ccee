//! PostgreSQL's binary `numeric` format, both ways, exactly.
//!
//! Treaty carries numerics as decimal strings. Going through a fixed-size decimal type (e.g.
//! `rust_decimal`, 28 digits) would refuse or round values PostgreSQL holds without trouble, so the
//! wire format is built and read here directly: a header (digit count, weight, sign, display scale)
//! followed by base-10000 digits, the first of which is worth `10000^weight`.

use std::fmt::Write;

const POSITIVE: u16 = 0x0000;
const NEGATIVE: u16 = 0x4000;
const NAN: u16 = 0xC000;
const POSITIVE_INFINITY: u16 = 0xD000;
const NEGATIVE_INFINITY: u16 = 0xF000;
/// PostgreSQL's `NUMERIC_DSCALE_MAX`.
const MAX_SCALE: usize = 0x3FFF;
const BASE_DIGITS: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumericError {
    #[error("{0:?} is not a decimal number (expected e.g. \"-12.50\")")]
    Syntax(String),
    #[error("has {0} digits after the decimal point; PostgreSQL allows at most {MAX_SCALE}")]
    Scale(usize),
    #[error("has too many digits for PostgreSQL's numeric type")]
    TooLong,
    #[error("malformed binary numeric from the server: {0}")]
    Malformed(&'static str),
}

fn header(digits: usize, weight: i32, sign: u16, scale: usize) -> Result<Vec<u8>, NumericError> {
    let digits = i16::try_from(digits).map_err(|_| NumericError::TooLong)?;
    let weight = i16::try_from(weight).map_err(|_| NumericError::TooLong)?;
    let scale = u16::try_from(scale).map_err(|_| NumericError::Scale(scale))?;
    let mut out = Vec::with_capacity(8 + 2 * digits.unsigned_abs() as usize);
    out.extend_from_slice(&digits.to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&scale.to_be_bytes());
    Ok(out)
}

/// Encodes a decimal string (`-12.50`, `+3`, `.5`, `5.`, `NaN`) in the binary format.
pub fn encode(text: &str) -> Result<Vec<u8>, NumericError> {
    let syntax = || NumericError::Syntax(text.to_owned());
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if unsigned == "NaN" {
        return header(0, 0, NAN, 0);
    }
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return Err(syntax());
    }
    if fraction.len() > MAX_SCALE {
        return Err(NumericError::Scale(fraction.len()));
    }
    let whole = whole.trim_start_matches('0');
    // Align to base-10000 digits around the decimal point.
    let lead = (BASE_DIGITS - whole.len() % BASE_DIGITS) % BASE_DIGITS;
    let tail = (BASE_DIGITS - fraction.len() % BASE_DIGITS) % BASE_DIGITS;
    let mut decimal = String::with_capacity(lead + whole.len() + fraction.len() + tail);
    decimal.extend(std::iter::repeat_n('0', lead));
    decimal.push_str(whole);
    decimal.push_str(fraction);
    decimal.extend(std::iter::repeat_n('0', tail));
    let mut groups: Vec<i16> = decimal
        .as_bytes()
        .chunks(BASE_DIGITS)
        .map(|chunk| chunk.iter().fold(0i16, |n, b| n * 10 + i16::from(b - b'0')))
        .collect();
    let whole_groups = (lead + whole.len()) / BASE_DIGITS;
    let mut weight = i32::try_from(whole_groups).map_err(|_| NumericError::TooLong)? - 1;
    let leading_zeros = groups.iter().take_while(|&&g| g == 0).count();
    groups.drain(..leading_zeros);
    weight -= i32::try_from(leading_zeros).map_err(|_| NumericError::TooLong)?;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    let (sign, weight) = match (groups.is_empty(), negative) {
        (true, _) => (POSITIVE, 0),
        (false, true) => (NEGATIVE, weight),
        (false, false) => (POSITIVE, weight),
    };
    let mut out = header(groups.len(), weight, sign, fraction.len())?;
    for group in groups {
        out.extend_from_slice(&group.to_be_bytes());
    }
    Ok(out)
}

fn read_u16(bytes: &[u8], at: usize) -> Result<u16, NumericError> {
    bytes
        .get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(NumericError::Malformed("truncated"))
}

/// Decodes the binary format into PostgreSQL's own text form (`numeric_out`).
pub fn decode(bytes: &[u8]) -> Result<String, NumericError> {
    let count = read_u16(bytes, 0)? as i16;
    let weight = i32::from(read_u16(bytes, 2)? as i16);
    let sign = read_u16(bytes, 4)?;
    let scale = usize::from(read_u16(bytes, 6)?);
    let count = usize::try_from(count).map_err(|_| NumericError::Malformed("negative digit count"))?;
    if bytes.len() != 8 + 2 * count {
        return Err(NumericError::Malformed("length does not match the digit count"));
    }
    let negative = match sign {
        NAN => return Ok("NaN".into()),
        POSITIVE_INFINITY => return Ok("Infinity".into()),
        NEGATIVE_INFINITY => return Ok("-Infinity".into()),
        POSITIVE => false,
        NEGATIVE => true,
        _ => return Err(NumericError::Malformed("unknown sign")),
    };
    let digits = (0..count)
        .map(|i| read_u16(bytes, 8 + 2 * i).map(|d| d as i16))
        .collect::<Result<Vec<i16>, _>>()?;
    if digits.iter().any(|d| !(0..10_000).contains(d)) {
        return Err(NumericError::Malformed("digit out of range"));
    }
    // The digit worth 10000^(weight - k) is digits[k]; anything outside the array is zero.
    let digit = |k: i32| {
        usize::try_from(k)
            .ok()
            .and_then(|k| digits.get(k))
            .copied()
            .unwrap_or(0)
    };
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        let _ = write!(out, "{}", digit(0));
        for k in 1..=weight {
            let _ = write!(out, "{:04}", digit(k));
        }
    }
    if scale > 0 {
        out.push('.');
        let start = out.len();
        let mut k = weight + 1;
        while out.len() - start < scale {
            let _ = write!(out, "{:04}", digit(k));
            k += 1;
        }
        out.truncate(start + scale);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) -> String {
        decode(&encode(text).unwrap()).unwrap()
    }

    #[test]
    fn round_trips_in_postgres_text_form() {
        for (input, expected) in [
            ("0", "0"),
            ("-0", "0"),
            ("-0.00", "0.00"),
            ("1", "1"),
            ("+3", "3"),
            (".5", "0.5"),
            ("5.", "5"),
            ("-12.50", "-12.50"),
            ("10000", "10000"),
            ("9999", "9999"),
            ("0.0001", "0.0001"),
            ("0.00005", "0.00005"),
            ("123456789.987654321", "123456789.987654321"),
            ("000123.4500", "123.4500"),
            ("NaN", "NaN"),
            (
                "12345678901234567890123456789012345678901234567890.000000000000000000001",
                "12345678901234567890123456789012345678901234567890.000000000000000000001",
            ),
        ] {
            assert_eq!(round_trip(input), expected, "{input}");
        }
    }

    #[test]
    fn encodes_the_documented_layout() {
        // 12.5 = 12 * 10000^0 + 5000 * 10000^-1, one fractional digit shown.
        assert_eq!(
            encode("12.5").unwrap(),
            [0, 2, 0, 0, 0, 0, 0, 1, 0, 12, 0x13, 0x88]
        );
        // -0.00005 = 5000 * 10000^-2.
        assert_eq!(
            encode("-0.00005").unwrap(),
            [0, 1, 0xff, 0xfe, 0x40, 0, 0, 5, 0x13, 0x88]
        );
        assert_eq!(encode("0").unwrap(), [0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn decodes_values_with_implicit_zeros() {
        // 10000^2 with no stored trailing digits and a display scale of 2.
        assert_eq!(decode(&[0, 1, 0, 2, 0, 0, 0, 2, 0, 1]).unwrap(), "100000000.00");
        assert_eq!(decode(&[0, 0, 0, 0, 0xD0, 0, 0, 0]).unwrap(), "Infinity");
    }

    #[test]
    fn rejects_bad_input() {
        for bad in ["", "-", ".", "1e5", "1.2.3", "abc", "nan", "1 "] {
            assert!(encode(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            encode(&format!("0.{}", "1".repeat(20_000))),
            Err(NumericError::Scale(_))
        ));
        assert!(decode(&[0, 1, 0, 0]).is_err());
        assert!(
            decode(&[0, 1, 0, 0, 0, 0, 0, 0, 0x27, 0x10]).is_err(),
            "digit 10000"
        );
        assert!(decode(&[0, 0, 0, 0, 0x12, 0x34, 0, 0]).is_err(), "unknown sign");
    }
}
